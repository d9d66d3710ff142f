//! Restoring Weft's nftables tables within moments of a change made behind
//! the agent's back, rather than at the next resync.
//!
//! A dedicated thread listens to the kernel's nftables notifications
//! (netlink `NETLINK_NETFILTER`, multicast group `NFNLGRP_NFTABLES`), which
//! name the table of every object a committed transaction adds or deletes.
//! When a notification names a registered table, the thread waits for the
//! burst to settle (a transaction sends one message per object) and calls
//! that table's check, which compares the kernel's table with what its owner
//! last wrote and writes it again if they differ. The agent's own writes
//! notify too; since a check compares before it writes, they cost one
//! comparison and cause no restore, and a restore's own notifications find
//! the table intact, so nothing loops.
//!
//! # Registering a table
//!
//! ```ignore
//! let registration = watch.registry().register("inet weft-guard", move || {
//!     guard.restore_if_changed() // -> Result<TableCheck, NftError>
//! });
//! // Checks stop when `registration` is dropped.
//! ```
//!
//! A check runs on the watch thread, in the network namespace the watch was
//! started in, and may block (run `nft`). The simplest check keeps
//! [`fingerprint`] of its table right after each of its own writes and
//! compares it with the kernel's current one. When the socket overflows and
//! notifications are lost, every registered table is checked.

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use weft_core::nft::{self, NftError};

use crate::metrics::AgentMetrics;

/// The nftables multicast group (`NFNLGRP_NFTABLES`).
const NFNLGRP_NFTABLES: u32 = 7;
/// nfnetlink's nftables subsystem, the high byte of a message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// The message that ends each committed transaction; it names no table.
const NFT_MSG_NEWGEN: u16 = 15;
/// Every nftables object's message carries its table's name as attribute 1
/// (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`, `NFTA_RULE_TABLE`, …).
const TABLE_ATTRIBUTE: u16 = 1;
/// The attribute type without its nested and byte-order flags.
const ATTRIBUTE_TYPE_MASK: u16 = 0x3fff;
const NETLINK_HEADER: usize = 16;

/// A burst of notifications is over after this long without one.
const SETTLE: Duration = Duration::from_millis(20);
/// Checks never wait longer than this for a burst to end.
const SETTLE_AT_MOST: Duration = Duration::from_millis(200);

/// What a table's check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableCheck {
    /// The table is as its owner last wrote it.
    Intact,
    /// It was missing or different, and has been written again.
    Restored,
}

/// A table's check: compare, and restore when it differs.
type Check = Box<dyn FnMut() -> Result<TableCheck, NftError> + Send>;

struct Watched {
    id: u64,
    /// Family and name, as nft spells it (`inet weft-policy`).
    table: &'static str,
    /// The family's number and the name, as notifications carry them.
    key: (u8, String),
    check: Check,
    /// Why the last check failed; `None` once one succeeds.
    failure: Option<String>,
}

#[derive(Default)]
struct Tables {
    next_id: u64,
    watched: Vec<Watched>,
}

/// The tables that notifications named since the last check.
#[derive(Debug, Default)]
struct Touched {
    tables: BTreeSet<(u8, String)>,
    /// Notifications were lost, or one could not be read: check them all.
    all: bool,
}

impl Touched {
    fn names(&self, watched: &Watched) -> bool {
        self.all || self.tables.contains(&watched.key)
    }
}

/// Where tables register their checks; cheap to clone and to move into a
/// task.
#[derive(Clone, Default)]
pub struct TableRegistry {
    tables: Arc<Mutex<Tables>>,
}

impl std::fmt::Debug for TableRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tables: Vec<&str> = lock(&self.tables).watched.iter().map(|w| w.table).collect();
        f.debug_struct("TableRegistry")
            .field("tables", &tables)
            .finish()
    }
}

fn lock(tables: &Mutex<Tables>) -> MutexGuard<'_, Tables> {
    tables.lock().expect("table watch lock poisoned")
}

impl TableRegistry {
    /// Has `check` called after any change to `table` (family and name, as
    /// `inet weft-policy`; the families are nft's: ip, ip6, inet, arp,
    /// bridge, netdev) until the returned registration is dropped.
    ///
    /// # Panics
    ///
    /// If `table` is not a family and a name.
    pub fn register(
        &self,
        table: &'static str,
        check: impl FnMut() -> Result<TableCheck, NftError> + Send + 'static,
    ) -> Registration {
        let key = table_key(table)
            .unwrap_or_else(|| panic!("{table:?} is not an nftables family and table name"));
        let mut tables = lock(&self.tables);
        let id = tables.next_id;
        tables.next_id += 1;
        tables.watched.push(Watched {
            id,
            table,
            key,
            check: Box::new(check),
            failure: None,
        });
        Registration {
            tables: Arc::downgrade(&self.tables),
            id,
        }
    }

    /// The registered tables whose last check failed, each with the error:
    /// a table changed behind the agent's back that could not be restored
    /// (or not even read), which may differ from what its owner last wrote
    /// until a later check or its owner's next write succeeds. A table
    /// changed moments ago is not among them: its check, due within
    /// [`SETTLE_AT_MOST`], restores it. Reads what the checks left, runs
    /// no check and no `nft`.
    pub fn failed_checks(&self) -> Vec<(&'static str, String)> {
        lock(&self.tables)
            .watched
            .iter()
            .filter_map(|w| Some((w.table, w.failure.clone()?)))
            .collect()
    }

    /// Runs the checks of the tables `touched` names.
    fn check(&self, touched: &Touched, since: Instant, metrics: &AgentMetrics) {
        for watched in lock(&self.tables)
            .watched
            .iter_mut()
            .filter(|w| touched.names(w))
        {
            let table = watched.table;
            let checked = (watched.check)();
            watched.failure = checked.as_ref().err().map(ToString::to_string);
            match checked {
                Ok(TableCheck::Intact) => {}
                Ok(TableCheck::Restored) => {
                    metrics.record_table_restored(table);
                    tracing::warn!(
                        table,
                        elapsed_ms = since.elapsed().as_millis() as u64,
                        "nftables table changed or deleted behind the agent's back; restored"
                    );
                }
                Err(error) => {
                    metrics.record_error("table_restore");
                    tracing::warn!(table, %error, "checking an nftables table after a change failed; the next change or resync tries again");
                }
            }
        }
    }
}

/// A table's place in a [`TableRegistry`]; dropping it stops the checks.
#[must_use = "dropping the registration stops the table's checks"]
#[derive(Debug)]
pub struct Registration {
    tables: Weak<Mutex<Tables>>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(tables) = self.tables.upgrade() {
            lock(&tables).watched.retain(|w| w.id != self.id);
        }
    }
}

/// Why the watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum TableWatchError {
    /// The netlink socket could not be opened or joined to the group.
    #[error("subscribing to nftables notifications: {0} (the agent needs CAP_NET_ADMIN; without it changed tables are restored only at resync)")]
    Subscribe(Errno),
    /// The thread or its stop signal could not be created.
    #[error("starting the nftables watch thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The running watch; dropping it stops the thread.
#[derive(Debug)]
pub struct TableWatch {
    registry: TableRegistry,
    /// Closed on drop, which wakes the thread to end.
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl TableWatch {
    /// Starts watching the network namespace of the calling thread (the
    /// new thread inherits it, and so do the `nft` processes the checks
    /// run), counting restorations in `metrics`.
    pub fn start(metrics: AgentMetrics) -> Result<Self, TableWatchError> {
        let socket = subscribe().map_err(TableWatchError::Subscribe)?;
        let (stop, stopped) = UnixStream::pair()?;
        let registry = TableRegistry::default();
        let thread = std::thread::Builder::new()
            .name("nft-watch".into())
            .spawn({
                let registry = registry.clone();
                move || watch(&socket, &stopped, &registry, &metrics)
            })?;
        Ok(Self {
            registry,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where tables register their checks.
    pub fn registry(&self) -> TableRegistry {
        self.registry.clone()
    }
}

impl Drop for TableWatch {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the nftables watch thread panicked");
            }
        }
    }
}

/// A netlink socket joined to the nftables group, in the calling thread's
/// namespace.
fn subscribe() -> Result<OwnedFd, Errno> {
    let socket = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    // Groups 1-32 can be joined at bind time, as a bit mask.
    bind(
        socket.as_raw_fd(),
        &NetlinkAddr::new(0, 1 << (NFNLGRP_NFTABLES - 1)),
    )?;
    Ok(socket)
}

/// What woke the thread.
enum Woken {
    Notified,
    Quiet,
    Stopped,
}

fn wait(socket: &OwnedFd, stopped: &UnixStream, timeout: Option<Duration>) -> Woken {
    let timeout = timeout.map_or(PollTimeout::NONE, |t| {
        PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX)
    });
    let mut fds = [
        PollFd::new(socket.as_fd(), PollFlags::POLLIN),
        PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, timeout) {
        Ok(0) => Woken::Quiet,
        Ok(_) if fds[1].any().unwrap_or(true) => Woken::Stopped,
        Ok(_) => Woken::Notified,
        Err(Errno::EINTR) => Woken::Quiet,
        Err(error) => {
            tracing::warn!(%error, "waiting for nftables notifications failed; the watch stops, changed tables are restored only at resync");
            Woken::Stopped
        }
    }
}

/// The thread: wait for a notification naming a registered table, let the
/// burst settle, check; until stopped.
fn watch(socket: &OwnedFd, stopped: &UnixStream, registry: &TableRegistry, metrics: &AgentMetrics) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let mut touched = Touched::default();
        match wait(socket, stopped, None) {
            Woken::Stopped => return,
            Woken::Quiet => continue,
            Woken::Notified => receive(socket, &mut buffer, &mut touched),
        }
        let concerned = lock(&registry.tables)
            .watched
            .iter()
            .any(|w| touched.names(w));
        if !concerned {
            continue;
        }
        let since = Instant::now();
        while since.elapsed() < SETTLE_AT_MOST {
            match wait(socket, stopped, Some(SETTLE)) {
                Woken::Stopped => return,
                Woken::Quiet => break,
                Woken::Notified => receive(socket, &mut buffer, &mut touched),
            }
        }
        registry.check(&touched, since, metrics);
    }
}

/// Reads every notification waiting on `socket` into `touched`.
fn receive(socket: &OwnedFd, buffer: &mut [u8], touched: &mut Touched) {
    loop {
        match recv(socket.as_raw_fd(), buffer, MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(Errno::EAGAIN) => return,
            Ok(length) => tables_named(&buffer[..length], touched),
            // The receive queue overflowed: notifications were lost.
            Err(Errno::ENOBUFS) => touched.all = true,
            Err(Errno::EINTR) => {}
            Err(error) => {
                tracing::debug!(%error, "reading nftables notifications failed");
                touched.all = true;
                return;
            }
        }
    }
}

/// Adds the tables the netlink messages in `datagram` name to `touched`.
fn tables_named(mut datagram: &[u8], touched: &mut Touched) {
    while datagram.len() >= NETLINK_HEADER {
        let length = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]);
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length < NETLINK_HEADER || length > datagram.len() {
            touched.all = true;
            return;
        }
        let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
        if kind >> 8 == NFNL_SUBSYS_NFTABLES && kind & 0xff != NFT_MSG_NEWGEN {
            match table_of(&datagram[NETLINK_HEADER..length]) {
                Some(table) => {
                    touched.tables.insert(table);
                }
                None => touched.all = true,
            }
        }
        datagram = &datagram[aligned(length).min(datagram.len())..];
    }
}

/// The (family, table name) an nftables message is about: the family from
/// its `nfgenmsg` header, the name from its first attribute.
fn table_of(message: &[u8]) -> Option<(u8, String)> {
    let family = *message.first()?;
    let mut attributes = message.get(4..)?;
    while attributes.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & ATTRIBUTE_TYPE_MASK;
        if length < 4 || length > attributes.len() {
            return None;
        }
        if kind == TABLE_ATTRIBUTE {
            let name = attributes[4..length].strip_suffix(&[0])?;
            return Some((family, String::from_utf8(name.to_vec()).ok()?));
        }
        attributes = &attributes[aligned(length).min(attributes.len())..];
    }
    None
}

/// Netlink's 4-byte alignment.
fn aligned(length: usize) -> usize {
    (length + 3) & !3
}

/// (family number, name) of `table` as nft spells it (`inet weft`).
fn table_key(table: &str) -> Option<(u8, String)> {
    let (family, name) = table.split_once(' ')?;
    // NFPROTO_* numbers.
    let family = match family {
        "inet" => 1,
        "ip" => 2,
        "arp" => 3,
        "netdev" => 5,
        "bridge" => 7,
        "ip6" => 10,
        _ => return None,
    };
    Some((family, name.to_owned())).filter(|(_, name)| !name.is_empty() && !name.contains(' '))
}

/// A fingerprint of `table` (family and name) as the kernel holds it: its
/// chains, rules, sets with their elements, maps and objects, without the
/// handles and counter values that change with no change to the rules;
/// `None` when there is no such table. Blocking: runs `nft`.
pub fn fingerprint(table: &str) -> Result<Option<u64>, NftError> {
    let Some(listing) = nft::list_table(table, true, "read an nftables table back")? else {
        return Ok(None);
    };
    let mut hasher = DefaultHasher::new();
    match serde_json::from_str::<serde_json::Value>(&listing) {
        Ok(mut parsed) => {
            strip_volatile(&mut parsed);
            parsed.to_string().hash(&mut hasher);
        }
        // Not JSON: the text itself is the best fingerprint there is.
        Err(_) => listing.hash(&mut hasher),
    }
    Ok(Some(hasher.finish()))
}

/// Removes what changes without a change to the rules: object handles
/// (renumbered when a table is recreated) and counter values.
fn strip_volatile(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for key in ["handle", "packets", "bytes"] {
                map.remove(key);
            }
            map.values_mut().for_each(strip_volatile);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_volatile),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message of nftables type `message` for `family`, with
    /// `attributes` ((type, value) pairs).
    fn message(message: u16, family: u8, attributes: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        for (kind, value) in attributes {
            let length = 4 + value.len();
            body.extend((length as u16).to_ne_bytes());
            body.extend(kind.to_ne_bytes());
            body.extend(*value);
            body.resize(aligned(body.len()), 0);
        }
        let mut out = Vec::new();
        out.extend(((NETLINK_HEADER + body.len()) as u32).to_ne_bytes());
        out.extend(((NFNL_SUBSYS_NFTABLES << 8) | message).to_ne_bytes());
        out.extend([0u8; 10]);
        out.extend(body);
        out
    }

    #[test]
    fn notifications_name_the_tables_they_change() {
        let mut datagram = message(2, 1, &[(1, b"weft-policy\0")]); // DELTABLE
        datagram.extend(message(12, 2, &[(1, b"kube-proxy\0"), (2, b"set\0")])); // NEWSETELEM
        datagram.extend(message(NFT_MSG_NEWGEN, 0, &[(1, &[0, 0, 0, 7])]));
        let mut touched = Touched::default();
        tables_named(&datagram, &mut touched);
        assert!(!touched.all);
        assert_eq!(
            touched.tables,
            BTreeSet::from([(1, "weft-policy".into()), (2, "kube-proxy".into())])
        );
    }

    #[test]
    fn an_unreadable_notification_checks_every_table() {
        let mut touched = Touched::default();
        tables_named(&message(6, 1, &[(3, b"chain\0")]), &mut touched);
        assert!(touched.all, "a message without a table name");
        let mut touched = Touched::default();
        let mut cut = message(6, 1, &[(1, b"weft\0")]);
        cut.truncate(18);
        cut[0] = 40;
        tables_named(&cut, &mut touched);
        assert!(touched.all, "a truncated message");
    }

    #[test]
    fn tables_are_keyed_as_notifications_carry_them() {
        assert_eq!(
            table_key("inet weft-policy"),
            Some((1, "weft-policy".into()))
        );
        assert_eq!(table_key("ip6 filter"), Some((10, "filter".into())));
        assert_eq!(table_key("weft"), None);
        assert_eq!(table_key("inet "), None);
        assert_eq!(table_key("nonsense weft"), None);
    }

    #[test]
    fn checks_run_for_the_tables_touched_until_unregistered() {
        let registry = TableRegistry::default();
        let metrics = AgentMetrics::register(&mut prometheus_client::registry::Registry::default());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let check = |table: &'static str, result: TableCheck| {
            let calls = calls.clone();
            move || {
                calls.lock().unwrap().push(table);
                Ok(result)
            }
        };
        let policy = registry.register("inet weft-policy", check("policy", TableCheck::Restored));
        let _masquerade = registry.register("inet weft", check("masquerade", TableCheck::Intact));
        let touched = Touched {
            tables: BTreeSet::from([(1, "weft-policy".into())]),
            all: false,
        };
        registry.check(&touched, Instant::now(), &metrics);
        registry.check(
            &Touched {
                all: true,
                ..Touched::default()
            },
            Instant::now(),
            &metrics,
        );
        drop(policy);
        registry.check(&touched, Instant::now(), &metrics);
        assert_eq!(*calls.lock().unwrap(), ["policy", "policy", "masquerade"]);
    }

    #[test]
    fn a_failed_check_is_reported_until_a_check_succeeds() {
        let registry = TableRegistry::default();
        let metrics = AgentMetrics::register(&mut prometheus_client::registry::Registry::default());
        let fail = Arc::new(Mutex::new(true));
        let _guard = registry.register("inet weft-guard", {
            let fail = fail.clone();
            move || match *fail.lock().unwrap() {
                true => Err(NftError::Nft {
                    action: "write the guard table inet weft-guard",
                    status: "exit status: 1".into(),
                    stderr: "Error: Could not process rule".into(),
                }),
                false => Ok(TableCheck::Restored),
            }
        });
        let _policy = registry.register("inet weft-policy", || Ok(TableCheck::Intact));
        assert!(registry.failed_checks().is_empty(), "nothing checked yet");
        let all = Touched {
            all: true,
            ..Touched::default()
        };
        registry.check(&all, Instant::now(), &metrics);
        let failed = registry.failed_checks();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, "inet weft-guard");
        assert!(failed[0].1.contains("Could not process rule"), "{failed:?}");
        *fail.lock().unwrap() = false;
        registry.check(&all, Instant::now(), &metrics);
        assert!(registry.failed_checks().is_empty());
    }

    #[test]
    fn fingerprints_ignore_handles_and_counter_values() {
        let mut a = serde_json::json!({"nftables": [
            {"counter": {"name": "ingress-denied", "handle": 3, "packets": 9, "bytes": 540}},
            {"rule": {"chain": "forward", "handle": 7, "expr": [{"accept": null}]}},
        ]});
        let mut b = serde_json::json!({"nftables": [
            {"counter": {"name": "ingress-denied", "handle": 4, "packets": 0, "bytes": 0}},
            {"rule": {"chain": "forward", "handle": 8, "expr": [{"accept": null}]}},
        ]});
        strip_volatile(&mut a);
        strip_volatile(&mut b);
        assert_eq!(a, b);
    }
}
