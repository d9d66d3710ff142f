//! The plugin's address store against the Pods on this node, for
//! `/status`: how many addresses the store holds, and which of them no Pod
//! on this node has (leak suspects), as `calicoctl ipam check` reports.
//!
//! The agent only reads the store ([`weft_core::ipam_store`]): it never
//! takes the plugin's lock, so a pod's ADD or DEL never waits for
//! `/status`, and it never changes a file, so freeing a leak stays with
//! the runtime's CNI GC or an operator. Without the lock, files come and go
//! while it reads: a file gone by the time it is read was released and is
//! left out; one that cannot be read is left out and named in
//! [`StoreReading::skipped`].
//!
//! An address is a leak suspect only once its file is older than
//! [`LEAK_GRACE`]: a pod's address is in the store before the API shows it
//! in `status.podIPs`.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use weft_core::ipam_store::{address_of, parse_owner};
use weft_core::status::IpamStatus;

use crate::policy::model::PodRecord;

/// How old an address file must be before an address no Pod on this node
/// has counts as leaked. The plugin claims the address during the pod's
/// ADD; the kubelet reports it in `status.podIPs` once the sandbox is up,
/// and the agent sees that through the API some time later. Seconds
/// usually; five minutes leaves room for a slow runtime and a lagging
/// watch, and still names a real leak long before the slice runs out.
pub const LEAK_GRACE: Duration = Duration::from_secs(5 * 60);

/// Why the store could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the plugin's address store {}: {source} (the agent needs read access to the directory: mount it read-only into the agent's pod)", dir.display())]
pub struct IpamAuditError {
    /// The store directory.
    pub dir: PathBuf,
    /// The OS error.
    pub source: io::Error,
}

/// One address file of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEntry {
    /// The allocated address.
    pub ip: IpAddr,
    /// When the plugin claimed it (the file's modification time).
    pub claimed: SystemTime,
    /// Whether the file holds an owner record the plugin could have
    /// written. One that does not still blocks its address.
    pub owner_readable: bool,
}

/// What one read of the store found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreReading {
    /// The address files, sorted by address.
    pub entries: Vec<StoreEntry>,
    /// What could not be read, one line each, naming the file and why.
    pub skipped: Vec<String>,
}

/// The audit of the store: what `/status` shows, and what could not be
/// read (for the agent's log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpamAudit {
    /// Addresses held, and the leak suspects.
    pub status: IpamStatus,
    /// Files that could not be read, and files without a readable owner.
    pub notes: Vec<String>,
}

/// Reads the store in `dir` without its lock. A missing directory is an
/// empty store (no pod on the pod network got an address on this node
/// yet) and says so in [`StoreReading::skipped`].
pub fn read_store(dir: &Path) -> Result<StoreReading, IpamAuditError> {
    let mut reading = StoreReading::default();
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            reading.skipped.push(format!(
                "{}: no such directory (no pod got an address on this node yet, or the directory is not mounted into the agent's pod)",
                dir.display()
            ));
            return Ok(reading);
        }
        Err(source) => {
            return Err(IpamAuditError {
                dir: dir.to_path_buf(),
                source,
            })
        }
    };
    for item in listing {
        let item = match item {
            Ok(item) => item,
            Err(error) => {
                reading
                    .skipped
                    .push(format!("{}: listing: {error}", dir.display()));
                continue;
            }
        };
        // Names that are not UTF-8 are not the plugin's.
        let Some(ip) = item.file_name().to_str().and_then(address_of) else {
            continue;
        };
        match read_entry(&item.path(), ip) {
            Ok(Some(entry)) => reading.entries.push(entry),
            Ok(None) => {}
            Err(error) => reading
                .skipped
                .push(format!("{}: {error}", item.path().display())),
        }
    }
    reading
        .entries
        .sort_by_key(|entry| (entry.ip.is_ipv6(), entry.ip));
    Ok(reading)
}

/// One address file; `None` when it was removed (the address released)
/// while the store was being read.
fn read_entry(path: &Path, ip: IpAddr) -> io::Result<Option<StoreEntry>> {
    let gone = |error: io::Error| match error.kind() {
        io::ErrorKind::NotFound => Ok(None),
        _ => Err(error),
    };
    let claimed = match fs::symlink_metadata(path).and_then(|m| m.modified()) {
        Ok(claimed) => claimed,
        Err(error) => return gone(error),
    };
    let owner_readable = match fs::read_to_string(path) {
        Ok(record) => {
            parse_owner(&record).is_some_and(|(id, ifname)| !id.is_empty() && !ifname.is_empty())
        }
        Err(error) if error.kind() == io::ErrorKind::InvalidData => false,
        Err(error) => return gone(error),
    };
    Ok(Some(StoreEntry {
        ip,
        claimed,
        owner_readable,
    }))
}

/// The addresses among `entries` that no Pod has (`pod_addresses`) and
/// that were claimed more than `grace` before `now`. A claim time after
/// `now` (a clock set back) counts as just claimed.
pub fn leak_suspects(
    entries: &[StoreEntry],
    pod_addresses: &BTreeSet<IpAddr>,
    now: SystemTime,
    grace: Duration,
) -> Vec<IpAddr> {
    entries
        .iter()
        .filter(|entry| !pod_addresses.contains(&entry.ip))
        .filter(|entry| now.duration_since(entry.claimed).unwrap_or_default() > grace)
        .map(|entry| entry.ip)
        .collect()
}

/// Reads the store in `dir` and compares it with `pod_addresses`, the
/// addresses the API shows for the Pods on this node ([`pod_addresses`]),
/// at `now`, with [`LEAK_GRACE`].
pub fn audit(
    dir: &Path,
    pod_addresses: &BTreeSet<IpAddr>,
    now: SystemTime,
) -> Result<IpamAudit, IpamAuditError> {
    let reading = read_store(dir)?;
    let mut notes = reading.skipped;
    notes.extend(
        reading
            .entries
            .iter()
            .filter(|entry| !entry.owner_readable)
            .map(|entry| {
                format!(
                    "{}: the address file holds no owner record the plugin could have written; the address stays blocked until CNI GC frees it",
                    entry.ip
                )
            }),
    );
    let leaks = leak_suspects(&reading.entries, pod_addresses, now, LEAK_GRACE);
    Ok(IpamAudit {
        status: IpamStatus {
            allocated: reading.entries.len() as u64,
            leak_suspects: leaks.iter().map(ToString::to_string).collect(),
        },
        notes,
    })
}

/// The addresses of the Pods bound to `node` that hold one of the pod
/// network (running or about to, not on the host's network), as the API
/// reports them in `status.podIPs`: one list call, filtered by the API
/// server. Needs `list` on pods.
pub async fn pod_addresses(client: Client, node: &str) -> Result<BTreeSet<IpAddr>, kube::Error> {
    let pods: Api<Pod> = Api::all(client);
    let listed = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    Ok(listed
        .items
        .iter()
        .filter_map(PodRecord::of)
        .flat_map(|record| record.ips)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use weft_core::ipam_store::{LAST_RESERVED_PREFIX, LOCK_FILE, TEMP_PREFIX};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn entry(address: &str, claimed: u64) -> StoreEntry {
        StoreEntry {
            ip: ip(address),
            claimed: at(claimed),
            owner_readable: true,
        }
    }

    #[test]
    fn an_address_no_pod_has_is_a_suspect_only_after_the_grace_period() {
        let grace = Duration::from_secs(300);
        let entries = [
            entry("10.244.1.2", 1_000),
            entry("10.244.1.3", 1_000),
            entry("10.244.1.4", 1_250),
            // Claimed "after" now: a clock set back.
            entry("10.244.1.5", 9_000),
        ];
        let pods = BTreeSet::from([ip("10.244.1.2")]);
        assert_eq!(
            leak_suspects(&entries, &pods, at(1_300), grace),
            Vec::<IpAddr>::new(),
            "exactly the grace period is not past it"
        );
        assert_eq!(
            leak_suspects(&entries, &pods, at(1_301), grace),
            vec![ip("10.244.1.3")]
        );
        assert_eq!(
            leak_suspects(&entries, &pods, at(2_000), grace),
            vec![ip("10.244.1.3"), ip("10.244.1.4")]
        );
    }

    /// Writes an address file as the plugin does: the owner record, then
    /// claimed at `claimed`.
    fn claim(dir: &Path, address: &str, record: &[u8], claimed: SystemTime) {
        fs::write(dir.join(address), record).unwrap();
        File::options()
            .write(true)
            .open(dir.join(address))
            .unwrap()
            .set_modified(claimed)
            .unwrap();
    }

    #[test]
    fn a_store_is_read_as_the_plugin_writes_it_and_leaks_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("weft");
        fs::create_dir(&dir).unwrap();
        let now = SystemTime::now();
        let old = now - LEAK_GRACE - Duration::from_secs(60);
        claim(&dir, "10.244.1.2", b"c1\neth0", old);
        claim(&dir, "10.244.1.3", b"c2\neth0", old);
        claim(&dir, "fd00:10:244:1::3", b"c2\r\neth0\r\n", old);
        claim(&dir, "10.244.1.4", b"c3\neth0", now);
        claim(&dir, "10.244.1.9", &[0xff, 0xfe], old);
        // Not allocations: the lock, a marker, a claim in progress.
        fs::write(dir.join(LOCK_FILE), "").unwrap();
        fs::write(dir.join(format!("{LAST_RESERVED_PREFIX}0")), "10.244.1.4").unwrap();
        fs::write(dir.join(format!("{TEMP_PREFIX}claim-7")), "c9\neth0").unwrap();

        let pods = BTreeSet::from([ip("10.244.1.2"), ip("fd00:10:244:1::3")]);
        let found = audit(&dir, &pods, now).unwrap();
        assert_eq!(found.status.allocated, 5);
        assert_eq!(found.status.leak_suspects, vec!["10.244.1.3", "10.244.1.9"]);
        assert_eq!(found.notes.len(), 1, "{:?}", found.notes);
        assert!(
            found.notes[0].starts_with("10.244.1.9: "),
            "{:?}",
            found.notes
        );
    }

    #[test]
    fn a_missing_store_is_empty_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let found = audit(
            &tmp.path().join("weft"),
            &BTreeSet::new(),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(found.status, IpamStatus::default());
        assert_eq!(found.notes.len(), 1);
        assert!(found.notes[0].contains("not mounted"), "{:?}", found.notes);
    }

    #[test]
    fn a_file_that_cannot_be_read_is_skipped_and_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("weft");
        fs::create_dir(&dir).unwrap();
        claim(&dir, "10.244.1.2", b"c1\neth0", SystemTime::now());
        // A directory where an address file should be: reading it fails
        // with something other than "gone".
        fs::create_dir(dir.join("10.244.1.3")).unwrap();
        let reading = read_store(&dir).unwrap();
        assert_eq!(reading.entries.len(), 1);
        assert_eq!(reading.entries[0].ip, ip("10.244.1.2"));
        assert_eq!(reading.skipped.len(), 1, "{:?}", reading.skipped);
        assert!(
            reading.skipped[0].contains("10.244.1.3"),
            "{:?}",
            reading.skipped
        );
    }
}
