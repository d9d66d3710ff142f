//! Host-local IPAM: a per-network directory of claimed addresses.
//!
//! Layout of a store directory (`<dataDir>/<network name>/`):
//! - `<ip>` (e.g. `10.244.1.5`, `fd00::5`): one file per allocated address,
//!   containing the owner's container ID, a newline, and the interface name.
//! - `last_reserved_ip.<n>`: the address last handed out from range `n` (the
//!   range's position in the list passed to [`Store::allocate`]), so the next
//!   allocation continues after it and a freed address is not reused at once.
//! - `lock`: held with `flock` for the whole of every operation, so separate
//!   plugin processes never interleave.
//! - `.tmp-*`: a claim in progress, or a leftover from one that was killed.
//!
//! Crash safety: an address is claimed by writing the owner into a private
//! temp file and then `link()`ing it to the address's name. `link` either
//! creates the name, pointing at a file already holding the complete owner, or
//! fails with EEXIST; it never replaces an existing file. So a kill at any
//! moment leaves either no file for the address (still free) or a complete
//! one (owned), plus perhaps a stray temp file that no reader mistakes for an
//! allocation and GC removes. Nothing is fsynced: process kills keep the page
//! cache, and a power loss also ends every pod the store could describe,
//! after which the runtime re-adds and garbage-collects anyway. A file whose
//! content is not a valid owner (foreign tools, disk corruption) still blocks
//! its address and is freed by GC, never handed out.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};

use weft_core::ip::{addr_bits, IpFamily};
use weft_core::ipam_store::{address_of, LAST_RESERVED_PREFIX, LOCK_FILE, TEMP_PREFIX};

use crate::cni::Attachment;

/// Why an IPAM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// A filesystem operation on the store failed.
    #[error("IPAM store: cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Every allocatable address of the range is taken.
    #[error("IP range {subnet} ({first} to {last}) has no free address: delete unused pods, run CNI GC to free leaked addresses, or give the node a larger pod CIDR")]
    Exhausted {
        /// The range's subnet.
        subnet: IpNet,
        /// First allocatable address.
        first: IpAddr,
        /// Last allocatable address.
        last: IpAddr,
    },
    /// The subnet has no address left after the reserved ones.
    #[error("subnet {subnet} is too small to hand out pod addresses: use at least a /30 for IPv4 or a /126 for IPv6")]
    RangeTooSmall {
        /// The subnet.
        subnet: IpNet,
    },
}

/// The addresses of one subnet that may be handed to pods: everything except
/// the network address (IPv6: the subnet-router anycast), the first host
/// and, for IPv4, the broadcast address. The first host stays reserved
/// because a node attached by the bridge design keeps it on `weft0` until
/// its last bridged pod is gone, and a pod holding it would be shadowed by
/// that local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllocRange {
    subnet: IpNet,
    first: u128,
    last: u128,
}

impl AllocRange {
    /// The allocatable range of `subnet` (host bits are ignored).
    pub fn new(subnet: IpNet) -> Result<AllocRange, IpamError> {
        let subnet = subnet.trunc();
        let network = addr_bits(subnet.network());
        let top = addr_bits(subnet.broadcast());
        // Skip the network address and the first host; IPv4 also loses
        // broadcast.
        let first = network.checked_add(2);
        let last = match subnet {
            IpNet::V4(_) => top.checked_sub(1),
            IpNet::V6(_) => Some(top),
        };
        match (first, last) {
            (Some(first), Some(last)) if first <= last => Ok(AllocRange {
                subnet,
                first,
                last,
            }),
            _ => Err(IpamError::RangeTooSmall { subnet }),
        }
    }

    /// The subnet the range belongs to.
    pub fn subnet(&self) -> IpNet {
        self.subnet
    }

    /// First allocatable address.
    pub fn first(&self) -> IpAddr {
        self.at(self.first)
    }

    /// Last allocatable address.
    pub fn last(&self) -> IpAddr {
        self.at(self.last)
    }

    /// Whether `ip` may be handed out from this range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.subnet.addr().is_ipv4()
            && (self.first..=self.last).contains(&addr_bits(ip))
    }

    /// The address after `ip` in the range, wrapping from last to first.
    fn after(&self, ip: u128) -> u128 {
        if ip >= self.last || ip < self.first {
            self.first
        } else {
            ip + 1
        }
    }

    fn at(&self, value: u128) -> IpAddr {
        IpFamily::of(&self.subnet).addr_from_bits(value)
    }
}

/// One address file in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The allocated address.
    pub ip: IpAddr,
    /// Its owner; `None` when the file does not hold a valid owner, which
    /// keeps the address blocked until GC frees it.
    pub owner: Option<Attachment>,
}

/// The IPAM store of one network. Every method takes the store's lock for its
/// duration, so `Store` values in separate processes or threads are safe to
/// use concurrently.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// A store in `dir` (usually `NetConf::ipam_dir()`); nothing is touched
    /// on disk until an operation needs it.
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One address per range for `owner`, in range order. A retry for an
    /// owner that already holds an address in a range returns that address.
    /// New addresses are taken round robin after the range's last reserved
    /// one. If a later range is exhausted, addresses claimed by this call in
    /// earlier ranges are released again.
    pub fn allocate(
        &self,
        owner: &Attachment,
        ranges: &[AllocRange],
    ) -> Result<Vec<IpAddr>, IpamError> {
        let _lock = self.lock(true)?;
        let held = self.scan()?;
        let taken: HashSet<IpAddr> = held.iter().map(|a| a.ip).collect();
        let mut claimed_now = Vec::new();
        let mut ips = Vec::with_capacity(ranges.len());
        for (n, range) in ranges.iter().enumerate() {
            let existing = held
                .iter()
                .find(|a| a.owner.as_ref() == Some(owner) && range.contains(a.ip));
            if let Some(existing) = existing {
                ips.push(existing.ip);
                continue;
            }
            match self.claim_next(owner, range, n, &taken) {
                Ok(ip) => {
                    claimed_now.push(ip);
                    ips.push(ip);
                }
                Err(e) => {
                    for ip in claimed_now {
                        // Best effort: the error being returned matters more,
                        // and a leftover is owned by this owner, so a retry
                        // reuses it and DEL or GC frees it.
                        let _ = fs::remove_file(self.dir.join(ip.to_string()));
                    }
                    return Err(e);
                }
            }
        }
        Ok(ips)
    }

    /// Frees every address held by `owner` and returns them; freeing nothing
    /// (never added, already released, no store yet) is success.
    pub fn release(&self, owner: &Attachment) -> Result<Vec<IpAddr>, IpamError> {
        let Some(_lock) = self.lock(false)? else {
            return Ok(Vec::new());
        };
        let mut released = Vec::new();
        for allocation in self.scan()? {
            if allocation.owner.as_ref() == Some(owner) {
                self.remove(&allocation.ip.to_string())?;
                released.push(allocation.ip);
            }
        }
        Ok(released)
    }

    /// Every address file in the store, sorted by address.
    pub fn allocations(&self) -> Result<Vec<Allocation>, IpamError> {
        match self.lock(false)? {
            Some(_lock) => self.scan(),
            None => Ok(Vec::new()),
        }
    }

    /// Runs `work` on the allocations while holding the store's lock, so
    /// that what `work` decides from them (e.g. which hostPort mappings are
    /// stale) stays true until it returns: no other operation on this store
    /// runs meanwhile. Without a store, `work` sees no allocations.
    pub fn while_locked<T>(&self, work: impl FnOnce(&[Allocation]) -> T) -> Result<T, IpamError> {
        match self.lock(false)? {
            Some(_lock) => Ok(work(&self.scan()?)),
            None => Ok(work(&[])),
        }
    }

    /// Frees every allocation whose owner is not in `valid` (including files
    /// without a valid owner) and removes leftover temp files. Returns the
    /// freed allocations.
    pub fn gc(&self, valid: &[Attachment]) -> Result<Vec<Allocation>, IpamError> {
        let Some(_lock) = self.lock(false)? else {
            return Ok(Vec::new());
        };
        let valid: HashSet<&Attachment> = valid.iter().collect();
        let mut freed = Vec::new();
        for allocation in self.scan()? {
            if !allocation.owner.as_ref().is_some_and(|o| valid.contains(o)) {
                self.remove(&allocation.ip.to_string())?;
                freed.push(allocation);
            }
        }
        // Holding the lock, no claim is in progress: any temp file is stale.
        for name in self.file_names()? {
            if name.starts_with(TEMP_PREFIX) {
                self.remove(&name)?;
            }
        }
        Ok(freed)
    }

    /// Claims the first free address after the range's last reserved one.
    fn claim_next(
        &self,
        owner: &Attachment,
        range: &AllocRange,
        n: usize,
        taken: &HashSet<IpAddr>,
    ) -> Result<IpAddr, IpamError> {
        let marker = format!("{LAST_RESERVED_PREFIX}{n}");
        // The marker is only a hint; a missing or torn one restarts the scan
        // at the range's start.
        let last_reserved = fs::read_to_string(self.dir.join(&marker))
            .ok()
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .filter(|ip| range.contains(*ip))
            .map(addr_bits)
            .unwrap_or(range.last);
        let mut candidate = last_reserved;
        loop {
            candidate = range.after(candidate);
            let ip = range.at(candidate);
            if !taken.contains(&ip) && self.claim(ip, owner)? {
                self.record_last_reserved(&marker, ip)?;
                return Ok(ip);
            }
            if candidate == last_reserved {
                return Err(IpamError::Exhausted {
                    subnet: range.subnet,
                    first: range.first(),
                    last: range.last(),
                });
            }
        }
    }

    /// Overwrites the round-robin marker in place with a fixed-width record.
    /// Truncating or renaming over it instead makes ext4 (`auto_da_alloc`)
    /// start writeback on close, which cost milliseconds per ADD. A torn
    /// record is harmless: the marker is only a hint, checked against the range.
    fn record_last_reserved(&self, marker: &str, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir.join(marker);
        // 39 characters is the longest IPv6 text form.
        let record = format!("{:<39}\n", ip.to_string());
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .and_then(|mut file| file.write_all(record.as_bytes()))
            .map_err(|source| IpamError::Io {
                action: "record last reserved address in",
                path,
                source,
            })
    }

    /// Atomically makes `ip` owned by `owner`; false if someone owns it.
    fn claim(&self, ip: IpAddr, owner: &Attachment) -> Result<bool, IpamError> {
        let tmp = self
            .dir
            .join(format!("{TEMP_PREFIX}claim-{}", std::process::id()));
        // A temp file of this name can only be a leftover of a killed claim
        // by an earlier process with the same pid, and may still be linked to
        // that claim's address file: unlink it rather than truncating through
        // it, which would empty the other owner's record.
        remove_if_present(&tmp).map_err(|source| IpamError::Io {
            action: "remove stale temp file",
            path: tmp.clone(),
            source,
        })?;
        let io_err = |action| {
            let path = tmp.clone();
            move |source| IpamError::Io {
                action,
                path,
                source,
            }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create temp file"))?;
        file.write_all(format!("{}\n{}", owner.container_id, owner.ifname).as_bytes())
            .map_err(io_err("write owner to temp file"))?;
        drop(file);
        let target = self.dir.join(ip.to_string());
        let claimed = match fs::hard_link(&tmp, &target) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(source) => {
                let _ = fs::remove_file(&tmp);
                return Err(IpamError::Io {
                    action: "link address file",
                    path: target,
                    source,
                });
            }
        };
        remove_if_present(&tmp).map_err(io_err("remove temp file"))?;
        Ok(claimed)
    }

    /// Takes the store lock. With `create`, makes the directory first;
    /// without, a missing directory gives `None` (there is nothing to read).
    fn lock(&self, create: bool) -> Result<Option<Flock<File>>, IpamError> {
        if create {
            fs::create_dir_all(&self.dir).map_err(|source| IpamError::Io {
                action: "create store directory",
                path: self.dir.clone(),
                source,
            })?;
        }
        let path = self.dir.join(LOCK_FILE);
        let file = match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(IpamError::Io {
                    action: "open lock file",
                    path,
                    source,
                })
            }
        };
        Flock::lock(file, FlockArg::LockExclusive)
            .map(Some)
            .map_err(|(_, errno)| IpamError::Io {
                action: "lock",
                path,
                source: errno.into(),
            })
    }

    fn file_names(&self) -> Result<Vec<String>, IpamError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| IpamError::Io {
            action: "list",
            path: self.dir.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| IpamError::Io {
                action: "list",
                path: self.dir.clone(),
                source,
            })?;
            // Names that are not UTF-8 are not ours.
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Reads every address file; must be called with the lock held.
    fn scan(&self) -> Result<Vec<Allocation>, IpamError> {
        let mut allocations = Vec::new();
        for name in self.file_names()? {
            let Some(ip) = address_of(&name) else {
                continue;
            };
            let path = self.dir.join(&name);
            let content = match fs::read_to_string(&path) {
                Ok(content) => Some(content),
                // Not UTF-8: not an owner we could have written.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => None,
                Err(source) => {
                    return Err(IpamError::Io {
                        action: "read address file",
                        path,
                        source,
                    })
                }
            };
            allocations.push(Allocation {
                ip,
                owner: content.as_deref().and_then(parse_owner),
            });
        }
        allocations.sort_by_key(|a| (a.ip.is_ipv6(), addr_bits(a.ip)));
        Ok(allocations)
    }

    fn remove(&self, name: &str) -> Result<(), IpamError> {
        let path = self.dir.join(name);
        remove_if_present(&path).map_err(|source| IpamError::Io {
            action: "remove",
            path,
            source,
        })
    }
}

/// The owner an address file records ([`weft_core::ipam_store::parse_owner`]),
/// if it is a valid attachment.
fn parse_owner(content: &str) -> Option<Attachment> {
    let (container_id, ifname) = weft_core::ipam_store::parse_owner(content)?;
    Attachment::new(container_id, ifname).ok()
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::thread;

    fn owner(id: &str) -> Attachment {
        Attachment::new(id, "eth0").unwrap()
    }

    fn range(subnet: &str) -> AllocRange {
        AllocRange::new(subnet.parse().unwrap()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("weft"));
        (dir, store)
    }

    fn one(store: &Store, id: &str, r: &AllocRange) -> IpAddr {
        store.allocate(&owner(id), std::slice::from_ref(r)).unwrap()[0]
    }

    #[test]
    fn the_agent_reads_the_store_the_default_conflist_uses() {
        let default = Path::new(crate::cni::DEFAULT_DATA_DIR).join("weft");
        assert_eq!(default, Path::new(weft_core::ipam_store::STORE_DIR));
    }

    #[test]
    fn ranges_skip_network_first_host_and_broadcast() {
        let r = range("10.244.1.0/24");
        assert_eq!(
            (r.first(), r.last()),
            (ip("10.244.1.2"), ip("10.244.1.254"))
        );
        for reserved in [
            "10.244.1.0",
            "10.244.1.1",
            "10.244.1.255",
            "10.244.2.2",
            "fd00::2",
        ] {
            assert!(!r.contains(ip(reserved)), "{reserved}");
        }
        let r = range("10.0.0.0/30");
        assert_eq!((r.first(), r.last()), (ip("10.0.0.2"), ip("10.0.0.2")));
        let r = range("fd00::/126");
        assert_eq!((r.first(), r.last()), (ip("fd00::2"), ip("fd00::3")));
        let r = range("fd00:1::/64");
        assert_eq!(r.last(), ip("fd00:1::ffff:ffff:ffff:ffff"));
        for small in ["10.0.0.0/31", "10.0.0.0/32", "fd00::/127", "fd00::/128"] {
            let e = AllocRange::new(small.parse().unwrap()).unwrap_err();
            assert!(matches!(e, IpamError::RangeTooSmall { .. }), "{small}");
        }
    }

    #[test]
    fn distinct_addresses_and_owner_files() {
        let (_tmp, store) = store();
        let r = range("10.244.1.0/24");
        let a = one(&store, "a", &r);
        let b = one(&store, "b", &r);
        assert_eq!((a, b), (ip("10.244.1.2"), ip("10.244.1.3")));
        assert_eq!(
            fs::read_to_string(store.dir().join("10.244.1.2")).unwrap(),
            "a\neth0"
        );
        assert_eq!(
            store.allocations().unwrap(),
            vec![
                Allocation {
                    ip: a,
                    owner: Some(owner("a"))
                },
                Allocation {
                    ip: b,
                    owner: Some(owner("b"))
                },
            ]
        );
    }

    #[test]
    fn retry_returns_the_held_address() {
        let (_tmp, store) = store();
        let r = range("10.244.1.0/24");
        let first = one(&store, "a", &r);
        one(&store, "b", &r);
        assert_eq!(one(&store, "a", &r), first);
        // Same container, another interface: a separate attachment.
        let net1 = Attachment::new("a", "net1").unwrap();
        assert_ne!(store.allocate(&net1, &[r]).unwrap()[0], first);
    }

    #[test]
    fn release_is_idempotent_and_round_robin_skips_the_freed_address() {
        let (_tmp, store) = store();
        let r = range("10.244.1.0/24");
        let a = one(&store, "a", &r);
        one(&store, "b", &r);
        assert_eq!(store.release(&owner("a")).unwrap(), vec![a]);
        assert_eq!(store.release(&owner("a")).unwrap(), Vec::<IpAddr>::new());
        assert_eq!(
            Store::new("/nonexistent/weft")
                .release(&owner("a"))
                .unwrap(),
            Vec::<IpAddr>::new()
        );
        // The freed .2 is not handed out again at once.
        assert_eq!(one(&store, "c", &r), ip("10.244.1.4"));
    }

    #[test]
    fn round_robin_wraps_and_exhaustion_names_the_range() {
        let (_tmp, store) = store();
        let r = range("10.0.0.0/29"); // .2 to .6 allocatable
        let ips: Vec<IpAddr> = (0..5).map(|i| one(&store, &format!("c{i}"), &r)).collect();
        assert_eq!(ips.first(), Some(&ip("10.0.0.2")));
        assert_eq!(ips.last(), Some(&ip("10.0.0.6")));
        let e = store.allocate(&owner("c5"), &[r]).unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("10.0.0.0/29") && msg.contains("GC"), "{msg}");
        // Freeing one in the middle makes it the next address after a wrap.
        store.release(&owner("c2")).unwrap();
        assert_eq!(one(&store, "c5", &r), ip("10.0.0.4"));
    }

    #[test]
    fn a_shorter_marker_record_fully_replaces_a_longer_one() {
        let (_tmp, store) = store();
        let r = range("10.244.1.0/24");
        fs::create_dir_all(store.dir()).unwrap();
        store
            .record_last_reserved("last_reserved_ip.0", ip("10.244.1.253"))
            .unwrap();
        assert_eq!(one(&store, "a", &r), ip("10.244.1.254"));
        assert_eq!(one(&store, "b", &r), ip("10.244.1.2"));
        assert_eq!(one(&store, "c", &r), ip("10.244.1.3"));
    }

    #[test]
    fn reserved_addresses_are_never_handed_out() {
        let (_tmp, store) = store();
        let r = range("10.0.0.0/28");
        let mut got = HashSet::new();
        while let Ok(ips) = store.allocate(&owner(&format!("c{}", got.len())), &[r]) {
            assert!(got.insert(ips[0]), "{} handed out twice", ips[0]);
        }
        assert_eq!(got.len(), 13);
        for reserved in ["10.0.0.0", "10.0.0.1", "10.0.0.15"] {
            assert!(!got.contains(&ip(reserved)), "{reserved}");
        }
        let (_tmp, store) = self::store();
        let r6 = range("fd00::/126");
        assert_eq!(one(&store, "a", &r6), ip("fd00::2"));
        assert_eq!(one(&store, "b", &r6), ip("fd00::3"));
        assert!(store.allocate(&owner("c"), &[r6]).is_err());
    }

    #[test]
    fn dual_stack_allocation_rolls_back_when_one_family_is_exhausted() {
        let (_tmp, store) = store();
        let v4 = range("10.244.1.0/24");
        let v6 = range("fd00::/126");
        let ips = store.allocate(&owner("a"), &[v4, v6]).unwrap();
        assert_eq!(ips, vec![ip("10.244.1.2"), ip("fd00::2")]);
        store.allocate(&owner("b"), &[v4, v6]).unwrap();
        let e = store.allocate(&owner("c"), &[v4, v6]).unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { .. }), "{e}");
        assert_eq!(
            store.allocations().unwrap().len(),
            4,
            "c's IPv4 address is given back"
        );
        assert_eq!(
            fs::read_to_string(store.dir().join("last_reserved_ip.1"))
                .unwrap()
                .trim(),
            "fd00::3"
        );
    }

    #[test]
    fn gc_frees_what_is_not_valid_and_removes_temp_files() {
        let (_tmp, store) = store();
        let r = range("10.244.1.0/24");
        for id in ["a", "b", "c"] {
            one(&store, id, &r);
        }
        fs::write(store.dir().join("10.244.1.9"), "garbage").unwrap();
        fs::write(store.dir().join(".tmp-claim-999999"), "x\neth0").unwrap();
        let freed = store.gc(&[owner("b")]).unwrap();
        let freed: Vec<IpAddr> = freed.into_iter().map(|a| a.ip).collect();
        assert_eq!(
            freed,
            vec![ip("10.244.1.2"), ip("10.244.1.4"), ip("10.244.1.9")]
        );
        assert_eq!(
            store.allocations().unwrap(),
            vec![Allocation {
                ip: ip("10.244.1.3"),
                owner: Some(owner("b"))
            }]
        );
        assert!(!store.dir().join(".tmp-claim-999999").exists());
        assert!(store.dir().join("lock").exists());
        assert_eq!(Store::new("/nonexistent/weft").gc(&[]).unwrap(), vec![]);
    }

    #[test]
    fn a_file_without_a_valid_owner_blocks_its_address() {
        let (_tmp, store) = store();
        let r = range("10.0.0.0/29");
        fs::create_dir_all(store.dir()).unwrap();
        fs::write(store.dir().join("10.0.0.2"), "").unwrap();
        fs::write(store.dir().join("10.0.0.3"), [0xff, b'\n', b'x']).unwrap();
        // A torn round-robin marker is only a hint.
        fs::write(store.dir().join("last_reserved_ip.0"), "10.0.").unwrap();
        assert_eq!(one(&store, "a", &r), ip("10.0.0.4"));
        let unowned: Vec<_> = store
            .allocations()
            .unwrap()
            .into_iter()
            .filter(|a| a.owner.is_none())
            .collect();
        assert_eq!(unowned.len(), 2);
        // Records written by other host-local implementations still parse.
        fs::write(store.dir().join("10.0.0.5"), "b\r\neth0\r\n").unwrap();
        assert_eq!(store.release(&owner("b")).unwrap(), vec![ip("10.0.0.5")]);
    }

    #[test]
    fn leftovers_of_a_killed_claim_are_harmless() {
        let (_tmp, store) = store();
        let r = range("10.0.0.0/29");
        let a = one(&store, "a", &r);
        // Killed after link, before unlinking the temp name: the temp file
        // is a second name for a's record. A later claim by a process with
        // the same pid must not empty a's record through it.
        let stale = store
            .dir()
            .join(format!("{TEMP_PREFIX}claim-{}", std::process::id()));
        fs::hard_link(store.dir().join(a.to_string()), &stale).unwrap();
        let b = one(&store, "b", &r);
        assert_ne!(a, b);
        assert_eq!(
            fs::read_to_string(store.dir().join(a.to_string())).unwrap(),
            "a\neth0"
        );
        // Killed after writing the temp file, before linking: nothing claimed.
        fs::write(
            store.dir().join(format!("{TEMP_PREFIX}claim-1")),
            "ghost\neth0",
        )
        .unwrap();
        assert_eq!(store.allocations().unwrap().len(), 2);
        assert_eq!(one(&store, "c", &r), ip("10.0.0.4"));
        assert_eq!(
            store.release(&owner("ghost")).unwrap(),
            Vec::<IpAddr>::new()
        );
    }

    #[test]
    fn concurrent_stores_never_hand_out_an_address_twice() {
        let (_tmp, store) = store();
        let r = range("10.244.0.0/24");
        const THREADS: usize = 8;
        const PER_THREAD: usize = 25;
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                // A separate Store (and so a separate lock file description)
                // per thread, as separate plugin processes would have.
                let store = Store::new(store.dir());
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    (0..PER_THREAD)
                        .map(|i| {
                            let owner = owner(&format!("t{t}-{i}"));
                            let ip = store.allocate(&owner, &[r]).unwrap()[0];
                            // A retry from another thread's view returns the same.
                            assert_eq!(store.allocate(&owner, &[r]).unwrap()[0], ip);
                            ip
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for handle in handles {
            for ip in handle.join().unwrap() {
                assert!(all.insert(ip), "{ip} handed out twice");
            }
        }
        assert_eq!(all.len(), THREADS * PER_THREAD);
        assert_eq!(store.allocations().unwrap().len(), THREADS * PER_THREAD);
    }
}
