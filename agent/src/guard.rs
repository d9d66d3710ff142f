//! The guard table `inet weft-guard`: what no pod and no stranger may send,
//! whatever NetworkPolicy says and whichever backend runs.
//!
//! Pods are checked on the prerouting hook, VXLAN on the input hook, both at
//! priority raw - 10 so they run before conntrack: a dropped packet never
//! creates or matches a conntrack entry, so forged replies cannot seed one.
//!
//! - Packets from pod veths (`veth*`, the host ends the plugin makes):
//!   from an IPv6 link-local or unspecified source only neighbour discovery
//!   and MLD reports pass (to link-local or link-scope multicast
//!   destinations, so they reach only the node); the rest is dropped as
//!   `link-local`. Then strict reverse path: a pod may send only from the
//!   addresses routed to its own veth (its /32 and /128), everything else
//!   is dropped as `spoofed`.
//! - VXLAN datagrams from pods, to any address: dropped as
//!   `vxlan-stranger` (a pod's datagram to a peer would leave masqueraded
//!   as this node and pass the peer's check below).
//! - VXLAN datagrams to this node's port (the input hook sees only what is
//!   addressed to the node, with no route lookup per packet): accepted only
//!   when the outer
//!   source is an accepted peer's public IP and the inner source lies in
//!   that peer's slices or is that same public IP (a peer's own traffic
//!   into the tunnel carries its node IP), looked up in concatenated
//!   interval sets (outer source . inner source). A peer may so send as
//!   itself, never as another node: the outer source decides, and two
//!   peers claiming one address share its elements. Anything else to the port, inner frames that are neither
//!   IPv4 nor IPv6 included, is dropped as `vxlan-stranger`.
//!   Backends without a VXLAN device (host-gw) get no VXLAN chain: the port
//!   is not Weft's to police there.
//!
//! The table is written whole (create, delete, recreate in one
//! transaction, which the kernel swaps in atomically) at start-up, when
//! its chains change and when it was found gone; a change of peers only
//! adds and deletes the changed set elements, in one transaction too. At
//! 5,000 dual-stack peers a whole write costs about 0.35 s, one peer's
//! change a few tens of milliseconds; flushing and refilling the sets
//! would take seconds. A whole write restarts the named drop counters, so
//! they are read just before and the counts the agent exports only ever go
//! up.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ipnet::IpNet;

use super::masquerade::POD_VETHS;
use super::nft_watch::{fingerprint, Registration, TableCheck, TableRegistry};
use super::peer::Peer;
use weft_core::ip::{addr_bits, IpFamily};
use weft_core::nft::{self, NftError};

/// Family and name of the guard table.
pub const TABLE: &str = "inet weft-guard";

/// Why the guard dropped a packet: one named counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// A pod sent from an address not routed to its veth.
    Spoofed,
    /// A pod sent from an IPv6 link-local or unspecified address, and not
    /// neighbour discovery or MLD.
    LinkLocal,
    /// A VXLAN datagram from no accepted peer, or carrying an inner source
    /// that is neither in the sender's slices nor the sender's public IP.
    VxlanStranger,
}

impl DropReason {
    /// Every reason, in the order [`Drops`] keeps them.
    pub const ALL: [DropReason; 3] = [
        DropReason::Spoofed,
        DropReason::LinkLocal,
        DropReason::VxlanStranger,
    ];

    /// The name of its counter in the table.
    pub fn counter(self) -> &'static str {
        match self {
            DropReason::Spoofed => "spoofed",
            DropReason::LinkLocal => "link-local",
            DropReason::VxlanStranger => "vxlan-stranger",
        }
    }

    /// Its label in `weft_agent_guard_dropped_packets_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Spoofed => "spoofed",
            DropReason::LinkLocal => "link_local",
            DropReason::VxlanStranger => "vxlan_stranger",
        }
    }
}

/// Dropped packets, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops([u64; 3]);

impl Drops {
    /// The packets dropped for `reason`.
    pub fn of(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    /// Every reason with its packets.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .into_iter()
            .map(|reason| (reason, self.of(reason)))
    }
}

/// Who may send VXLAN to this node, and on which port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanGuard {
    /// This node's VXLAN UDP port.
    pub port: u16,
    /// (outer source, inner sources) pairs allowed: each accepted peer's
    /// public IP with each of its slices and with itself (a /32 or /128).
    pub senders: BTreeSet<(IpAddr, IpNet)>,
}

/// What the guard table enforces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuardState {
    /// The VXLAN check; `None` checks pods only: the node has no VXLAN
    /// device (host-gw), or no peer is known yet and a check now would cut
    /// every peer off.
    pub vxlan: Option<VxlanGuard>,
}

impl GuardState {
    /// The state for a node listening for VXLAN on `port` (`None` for
    /// host-gw) with `accepted` peers, as screening accepts them: slices
    /// never overlap and no public IP lies inside a cluster CIDR, so no two
    /// elements of a set overlap (two peers claiming one public IP give one
    /// `<IP> . <IP>` element, a set).
    pub fn of<'p>(port: Option<u16>, accepted: impl IntoIterator<Item = &'p Peer>) -> Self {
        GuardState {
            vxlan: port.map(|port| VxlanGuard {
                port,
                senders: accepted
                    .into_iter()
                    .flat_map(|peer| {
                        // A peer's own traffic into the tunnel carries its
                        // public IP (it SNATs to it when that is its
                        // underlay address).
                        let itself = IpNet::from(peer.public_ip);
                        peer.pod_cidrs
                            .iter()
                            .map(IpNet::trunc)
                            .chain([itself])
                            .map(|inner| (peer.public_ip, inner))
                    })
                    .collect(),
            }),
        }
    }
}

/// Bit offsets from the start of the UDP header of a VXLAN datagram: UDP
/// (8 bytes), VXLAN (8), inner Ethernet (14) then the inner IP header.
const INNER_ETHERTYPE: &str = "@th,224,16";

/// The inner source address of `family`, as a raw payload field.
fn inner_source(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "@th,336,32",
        IpFamily::V6 => "@th,304,128",
    }
}

fn ethertype(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "0x0800",
        IpFamily::V6 => "0x86dd",
    }
}

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// The set of (outer source . inner source) for one pair of families.
fn set_name(outer: IpFamily, inner: IpFamily) -> String {
    format!("vxlan-{}-{}", nft::suffix(outer), nft::suffix(inner))
}

/// A slice as the raw payload integer range nft compares the inner source
/// with (a raw field has no address type, so no prefix notation).
fn inner_range(slice: &IpNet) -> String {
    // `0x` and two hex digits per byte of the address.
    let width = 2 + usize::from(IpFamily::of(slice).max_prefix_len()) / 4;
    let hex = |addr: IpAddr| format!("{:#0width$x}", addr_bits(addr));
    let (first, last) = (hex(slice.network()), hex(slice.broadcast()));
    if first == last {
        first
    } else {
        format!("{first}-{last}")
    }
}

/// The set that holds `sender`.
fn set_of((ip, slice): &(IpAddr, IpNet)) -> String {
    set_name(IpFamily::of_addr(*ip), IpFamily::of(slice))
}

/// `sender` as an element of its set.
fn element((ip, slice): &(IpAddr, IpNet)) -> String {
    format!("{ip} . {}", inner_range(slice))
}

/// The transaction that changes only the VXLAN senders from `old`'s to
/// `new`'s, element by element; `None` when the chains differ too and the
/// table must be written whole.
fn update_script(old: &GuardState, new: &GuardState) -> Option<String> {
    let (Some(old), Some(new)) = (&old.vxlan, &new.vxlan) else {
        return None;
    };
    if old.port != new.port {
        return None;
    }
    let mut out = String::new();
    // Deletions first: a peer's new slice may overlap its old one, and an
    // interval set refuses overlapping elements.
    for (verb, from, without) in [
        ("delete", &old.senders, &new.senders),
        ("add", &new.senders, &old.senders),
    ] {
        for sender in from.difference(without) {
            let _ = writeln!(
                out,
                "{verb} element {TABLE} {} {{ {} }}",
                set_of(sender),
                element(sender)
            );
        }
    }
    Some(out)
}

/// Renders the whole transaction for `nft -f`: create-if-missing, delete,
/// recreate.
pub fn render(state: &GuardState) -> String {
    let mut out = format!("table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n");
    out.push_str("\tcomment \"Weft anti-spoofing, owned by weft-agent: replaced as a whole\"\n");
    for reason in DropReason::ALL {
        let _ = writeln!(out, "\tcounter {} {{\n\t}}", reason.counter());
    }
    if let Some(vxlan) = &state.vxlan {
        for outer in FAMILIES {
            for inner in FAMILIES {
                let elements: Vec<String> = vxlan
                    .senders
                    .iter()
                    .filter(|sender| set_of(sender) == set_name(outer, inner))
                    .map(element)
                    .collect();
                let _ = write!(
                    out,
                    "\tset {} {{\n\t\ttypeof {} saddr . {}\n\t\tflags interval\n",
                    set_name(outer, inner),
                    nft::header(outer),
                    inner_source(inner),
                );
                if !elements.is_empty() {
                    let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
                }
                out.push_str("\t}\n");
            }
        }
    }
    out.push_str(
        "\tchain prerouting {\n\t\ttype filter hook prerouting priority raw - 10; policy accept;\n",
    );
    out.push_str(&format!("\t\tiifname \"{POD_VETHS}\" jump pod-source\n"));
    if let Some(vxlan) = &state.vxlan {
        // A pod never speaks VXLAN: its datagram to a peer would leave
        // masqueraded as this node, which the peer accepts, so a pod could
        // pass as any pod of its node. Dropped whatever the destination.
        let _ = writeln!(
            out,
            "\t\tiifname \"{POD_VETHS}\" udp dport {} counter name \"{}\" drop comment \"pods never send VXLAN\"",
            vxlan.port,
            DropReason::VxlanStranger.counter(),
        );
    }
    out.push_str("\t}\n");
    // VXLAN is checked on the input hook, which sees only what is addressed
    // to this node: no route lookup per packet to tell so.
    if let Some(vxlan) = &state.vxlan {
        let _ = writeln!(
            out,
            "\tchain input {{\n\t\ttype filter hook input priority raw - 10; policy accept;\n\
             \t\tudp dport {} jump vxlan-source\n\t}}",
            vxlan.port
        );
    }
    let link_local = "ip6 saddr { ::, fe80::/10 }";
    let _ = write!(
        out,
        "\tchain pod-source {{\n\
         \t\t{link_local} ip6 daddr {{ fe80::/10, ff02::/16 }} icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report }} return comment \"neighbour discovery and MLD, for the node only\"\n\
         \t\t{link_local} counter name \"{}\" drop\n\
         \t\tfib saddr . iif oif missing counter name \"{}\" drop comment \"a pod sends only from the addresses routed to its veth\"\n\
         \t}}\n",
        DropReason::LinkLocal.counter(),
        DropReason::Spoofed.counter(),
    );
    if state.vxlan.is_some() {
        out.push_str("\tchain vxlan-source {\n");
        for outer in FAMILIES {
            for inner in FAMILIES {
                let _ = writeln!(
                    out,
                    "\t\t{INNER_ETHERTYPE} {} {} saddr . {} @{} return",
                    ethertype(inner),
                    nft::header(outer),
                    inner_source(inner),
                    set_name(outer, inner),
                );
            }
        }
        let _ = writeln!(
            out,
            "\t\tcounter name \"{}\" drop\n\t}}",
            DropReason::VxlanStranger.counter()
        );
    }
    out.push_str("}\n");
    out
}

/// Whether the guard table is in the kernel. Lists table names only, so a
/// table with thousands of set elements costs no more than an empty one.
fn table_exists() -> Result<bool, NftError> {
    let listing = nft::run(&["list", "tables"], None, "list the nftables tables")?;
    Ok(listing
        .lines()
        .any(|line| line.trim() == format!("table {TABLE}")))
}

/// The table's drop counters as they stand, `None` when there is no
/// table. Reading them costs nft a fetch of every set element (about
/// 0.14 s at 5,000 dual-stack peers), so the agent reads them once per
/// resync.
pub fn dropped_packets() -> Result<Option<Drops>, NftError> {
    let mut args = vec!["-j", "list", "counters", "table"];
    args.extend(TABLE.split_whitespace());
    let listing = match nft::run(&args, None, "read the guard table's drop counters") {
        Ok(listing) => listing,
        // Listing a missing table is the only failure of a working nft.
        Err(NftError::Nft { .. }) => return Ok(None),
        Err(error) => return Err(error),
    };
    let parsed: serde_json::Value = serde_json::from_str(&listing).unwrap_or_default();
    let mut drops = Drops::default();
    for item in parsed["nftables"].as_array().into_iter().flatten() {
        let counter = &item["counter"];
        let name = counter["name"].as_str();
        if let Some(reason) = DropReason::ALL
            .into_iter()
            .find(|r| Some(r.counter()) == name)
        {
            drops.0[reason as usize] = counter["packets"].as_u64().unwrap_or(0);
        }
    }
    Ok(Some(drops))
}

/// Turns readings of counters that a rewrite sets back to zero into counts
/// that only go up.
#[derive(Debug, Default)]
struct DropTally {
    /// The counters at the last reading, or zero after a write. `None`
    /// before either: the first reading of a table an earlier run left only
    /// sets where counting starts (that run counted what came before).
    last: Option<Drops>,
    /// Counted and not yet taken.
    untaken: Drops,
}

impl DropTally {
    fn read(&mut self, reading: Drops) {
        if let Some(last) = self.last {
            for reason in DropReason::ALL {
                let (before, now) = (last.of(reason), reading.of(reason));
                // Below the last reading: recreated behind our back, so
                // the counter began again at zero.
                let added = now.checked_sub(before).unwrap_or(now);
                let slot = &mut self.untaken.0[reason as usize];
                *slot = slot.saturating_add(added);
            }
        }
        self.last = Some(reading);
    }

    fn rewritten(&mut self) {
        self.last = Some(Drops::default());
    }

    fn take(&mut self) -> Drops {
        std::mem::take(&mut self.untaken)
    }
}

/// What [`GuardTable::start`] or [`GuardTable::ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardChange {
    /// The table was left as it was.
    Unchanged,
    /// The table was written whole.
    Written,
    /// Only VXLAN senders were added or deleted.
    Updated,
}

/// Keeps the guard table enforcing the latest [`GuardState`], in the
/// network namespace of the calling thread (child processes inherit it).
/// Blocking: runs `nft`.
#[derive(Debug, Default)]
pub struct GuardTable {
    /// What the last write put in the kernel; `None` before one, after a
    /// failed one, and once the table was found gone.
    written: Option<GuardState>,
    /// The kernel's table right after the last write or update, to tell a
    /// change behind the agent's back from the agent's own.
    fingerprint: Option<u64>,
    started: bool,
    tally: DropTally,
}

impl GuardTable {
    /// Protects the node before any pod is wired: writes a table that
    /// checks pods (and no VXLAN yet) when there is none. A table an
    /// earlier run left stays as it is, peer sets included, until the
    /// first [`GuardTable::ensure`]: a restart opens no gap. Only the first
    /// call does anything.
    pub fn start(&mut self) -> Result<GuardChange, NftError> {
        if self.started {
            return Ok(GuardChange::Unchanged);
        }
        let change = if table_exists()? {
            GuardChange::Unchanged
        } else {
            self.write(&GuardState::default())?
        };
        self.started = true;
        Ok(change)
    }

    /// Makes the table enforce `desired`: nothing when the last write
    /// already did, the changed VXLAN senders only when nothing else
    /// changed, else the table whole.
    pub fn ensure(&mut self, desired: &GuardState) -> Result<GuardChange, NftError> {
        let Some(written) = self.written.take() else {
            return self.write(desired);
        };
        if written == *desired {
            self.written = Some(written);
            return Ok(GuardChange::Unchanged);
        }
        if let Some(script) = update_script(&written, desired) {
            match nft::apply(&script, "update the guard table's VXLAN senders") {
                Ok(()) => {
                    self.written = Some(desired.clone());
                    self.fingerprint = fingerprint(TABLE)?;
                    return Ok(GuardChange::Updated);
                }
                // Typically a table deleted or edited behind our back.
                Err(error) => {
                    tracing::warn!(%error, "updating the guard table in place failed; writing it whole")
                }
            }
        }
        self.write(desired)
    }

    fn write(&mut self, desired: &GuardState) -> Result<GuardChange, NftError> {
        // The write restarts the counters: count what they hold first.
        if let Some(reading) = dropped_packets()? {
            self.tally.read(reading);
        }
        self.written = None;
        self.fingerprint = None;
        nft::apply(&render(desired), "write the guard table inet weft-guard")?;
        self.tally.rewritten();
        self.written = Some(desired.clone());
        self.fingerprint = fingerprint(TABLE)?;
        Ok(GuardChange::Written)
    }

    /// Writes the table again when it differs from what the last write or
    /// update left: the table watch ([`crate::nft_watch`]) calls this after
    /// any change to it. Before the agent's first write (a table the last
    /// run left) there is nothing to compare with; the next ensure writes.
    pub fn restore_if_changed(&mut self) -> Result<TableCheck, NftError> {
        let Some(written) = self.written.clone() else {
            return Ok(TableCheck::Intact);
        };
        let current = fingerprint(TABLE)?;
        match self.fingerprint {
            Some(known) if current == Some(known) => Ok(TableCheck::Intact),
            // Written, but its read-back failed: what is there now is the
            // best reference left.
            None if current.is_some() => {
                self.fingerprint = current;
                Ok(TableCheck::Intact)
            }
            _ => {
                self.write(&written)?;
                Ok(TableCheck::Restored)
            }
        }
    }

    /// Packets dropped since the last call, by reason, each counted once
    /// across rewrites. A table found gone is written again by the next
    /// [`GuardTable::ensure`].
    pub fn newly_dropped(&mut self) -> Result<Drops, NftError> {
        match dropped_packets()? {
            Some(reading) => self.tally.read(reading),
            None => self.written = None,
        }
        Ok(self.tally.take())
    }
}

/// A [`GuardTable`] for the async agent loop: every call runs `nft` on the
/// blocking pool, never on an async worker. Clones share one table.
#[derive(Debug, Clone, Default)]
pub(crate) struct Guard(Arc<Mutex<GuardTable>>);

impl Guard {
    /// [`GuardTable::start`].
    pub(crate) async fn start(&self) -> Result<GuardChange, NftError> {
        self.blocking(GuardTable::start).await
    }

    /// [`GuardTable::ensure`].
    pub(crate) async fn ensure(&self, desired: GuardState) -> Result<GuardChange, NftError> {
        self.blocking(move |table| table.ensure(&desired)).await
    }

    /// [`GuardTable::newly_dropped`].
    pub(crate) async fn newly_dropped(&self) -> Result<Drops, NftError> {
        self.blocking(GuardTable::newly_dropped).await
    }

    /// Has the table watch restore the table after a change made behind
    /// the agent's back, until the registration is dropped.
    pub(crate) fn register(&self, tables: &TableRegistry) -> Registration {
        let table = self.0.clone();
        tables.register(TABLE, move || lock(&table).restore_if_changed())
    }

    async fn blocking<T, F>(&self, work: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&mut GuardTable) -> T + Send + 'static,
    {
        let table = self.0.clone();
        tokio::task::spawn_blocking(move || work(&mut lock(&table)))
            .await
            .expect("the guard table task does not panic")
    }
}

fn lock(table: &Mutex<GuardTable>) -> MutexGuard<'_, GuardTable> {
    // A panic mid-write leaves `written` cleared, so the next ensure
    // writes whole: the table is safe to use after one.
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, public_ip: &str, slices: &[&str]) -> Peer {
        Peer {
            node_name: name.into(),
            pod_cidrs: slices.iter().map(|s| s.parse().unwrap()).collect(),
            public_ip: public_ip.parse().unwrap(),
            vtep_mac: None,
            created: 0,
            malformed: None,
        }
    }

    fn dual_stack_peers() -> Vec<Peer> {
        vec![
            peer("b", "192.168.1.2", &["10.244.2.0/24", "fd00:10:244:2::/64"]),
            peer("c", "fd50::3", &["10.244.3.0/24", "fd00:10:244:3::/64"]),
        ]
    }

    #[test]
    fn the_transaction_replaces_the_table_whole() {
        let text = render(&GuardState::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "table inet weft-guard");
        assert_eq!(lines[1], "delete table inet weft-guard");
        assert_eq!(lines[2], "table inet weft-guard {");
        assert!(!text.contains("flush"), "{text}");
        for counter in ["spoofed", "link-local", "vxlan-stranger"] {
            assert!(text.contains(&format!("\tcounter {counter} {{")), "{text}");
        }
    }

    #[test]
    fn pod_veths_are_checked_before_conntrack_link_local_first() {
        let text = render(&GuardState::default());
        assert!(
            text.contains("type filter hook prerouting priority raw - 10; policy accept;"),
            "{text}"
        );
        assert!(text.contains("iifname \"veth*\" jump pod-source"), "{text}");
        let nd = text.find("icmpv6 type { nd-router-solicit").unwrap();
        let link_local = text.find("counter name \"link-local\" drop").unwrap();
        let spoofed = text
            .find("fib saddr . iif oif missing counter name \"spoofed\" drop")
            .unwrap();
        assert!(nd < link_local && link_local < spoofed, "{text}");
        assert!(
            text.contains("ip6 saddr { ::, fe80::/10 } ip6 daddr { fe80::/10, ff02::/16 }"),
            "{text}"
        );
        for kind in [
            "nd-neighbor-solicit",
            "nd-neighbor-advert",
            "mld-listener-report",
            "mld2-listener-report",
        ] {
            assert!(text.contains(kind), "{text}");
        }
    }

    #[test]
    fn without_vxlan_there_is_no_vxlan_chain() {
        let peers = dual_stack_peers();
        let state = GuardState::of(None, &peers);
        assert_eq!(state, GuardState::default());
        let text = render(&state);
        assert!(!text.contains("udp dport"), "{text}");
        assert!(!text.contains("vxlan-source"), "{text}");
        assert!(!text.contains("set vxlan"), "{text}");
    }

    #[test]
    fn vxlan_senders_pair_each_public_ip_with_its_slices() {
        let peers = dual_stack_peers();
        let state = GuardState::of(Some(8472), &peers);
        let senders = &state.vxlan.as_ref().unwrap().senders;
        assert_eq!(senders.len(), 6);
        let text = render(&state);
        assert!(
            text.contains("type filter hook input priority raw - 10; policy accept;\n\t\tudp dport 8472 jump vxlan-source")
                && text.contains("iifname \"veth*\" udp dport 8472 counter name \"vxlan-stranger\" drop"),
            "{text}"
        );
        assert!(
            text.contains("typeof ip saddr . @th,336,32\n\t\tflags interval\n\t\telements = { 192.168.1.2 . 0x0af40200-0x0af402ff, 192.168.1.2 . 0xc0a80102 }"),
            "{text}"
        );
        assert!(
            text.contains("elements = { 192.168.1.2 . 0xfd000010024400020000000000000000-0xfd00001002440002ffffffffffffffff }"),
            "{text}"
        );
        assert!(
            text.contains("typeof ip6 saddr . @th,336,32\n\t\tflags interval\n\t\telements = { fd50::3 . 0x0af40300-0x0af403ff }"),
            "{text}"
        );
        assert!(
            text.contains("typeof ip6 saddr . @th,304,128\n\t\tflags interval\n\t\telements = { fd50::3 . 0xfd000010024400030000000000000000-0xfd00001002440003ffffffffffffffff, fd50::3 . 0xfd500000000000000000000000000003 }"),
            "{text}"
        );
        for rule in [
            "@th,224,16 0x0800 ip saddr . @th,336,32 @vxlan-v4-v4 return",
            "@th,224,16 0x86dd ip saddr . @th,304,128 @vxlan-v4-v6 return",
            "@th,224,16 0x0800 ip6 saddr . @th,336,32 @vxlan-v6-v4 return",
            "@th,224,16 0x86dd ip6 saddr . @th,304,128 @vxlan-v6-v6 return",
        ] {
            assert!(text.contains(rule), "{rule}\n{text}");
        }
        // Whatever no set accepted is counted and dropped, last.
        let chain = &text[text.find("chain vxlan-source").unwrap()..];
        assert!(
            chain.contains("@vxlan-v6-v6 return\n\t\tcounter name \"vxlan-stranger\" drop\n\t}"),
            "{chain}"
        );
    }

    #[test]
    fn each_peer_may_send_as_itself_and_no_other_node() {
        let peers = dual_stack_peers();
        let state = GuardState::of(Some(8472), &peers);
        let senders = &state.vxlan.as_ref().unwrap().senders;
        let own = |ip: &str| -> (IpAddr, IpNet) {
            let ip: IpAddr = ip.parse().unwrap();
            (ip, ip.into())
        };
        // Each public IP is an inner source from that IP alone.
        let b = own("192.168.1.2");
        let c = own("fd50::3");
        assert!(senders.contains(&b) && senders.contains(&c), "{senders:?}");
        assert!(!senders.contains(&(b.0, c.1)) && !senders.contains(&(c.0, b.1)));
        assert_eq!(
            (element(&b), set_of(&b)),
            ("192.168.1.2 . 0xc0a80102".into(), "vxlan-v4-v4".into())
        );
        assert_eq!(
            (element(&c), set_of(&c)),
            (
                "fd50::3 . 0xfd500000000000000000000000000003".into(),
                "vxlan-v6-v6".into()
            )
        );
        // A peer without slices yet may still send as itself.
        let bare = peer("d", "192.168.1.4", &[]);
        let state = GuardState::of(Some(8472), [&bare]);
        assert_eq!(
            state.vxlan.unwrap().senders,
            BTreeSet::from([own("192.168.1.4")])
        );
    }

    #[test]
    fn a_copied_public_ip_lets_the_copier_send_as_nobody() {
        // Two peers publishing one address share its own element; when the
        // copier leaves, the owner's element stays.
        let owner = peer("b", "192.168.1.2", &["10.244.2.0/24"]);
        let copier = peer("m", "192.168.1.2", &["10.244.9.0/24"]);
        let both = GuardState::of(Some(8472), [&owner, &copier]);
        let senders = &both.vxlan.as_ref().unwrap().senders;
        let ip: IpAddr = "192.168.1.2".parse().unwrap();
        assert_eq!(
            senders
                .iter()
                .filter(|(_, inner)| *inner == IpNet::from(ip))
                .count(),
            1
        );
        let script = update_script(&both, &GuardState::of(Some(8472), [&owner])).unwrap();
        assert!(script.contains("0x0af40900-0x0af409ff"), "{script}");
        assert!(!script.contains("0xc0a80102"), "{script}");
    }

    #[test]
    fn a_new_public_ip_moves_the_peers_own_element() {
        let mut peers = dual_stack_peers();
        peers.truncate(1);
        let mut moved = peers.clone();
        moved[0].public_ip = "192.168.1.9".parse().unwrap();
        let script = update_script(
            &GuardState::of(Some(8472), &peers),
            &GuardState::of(Some(8472), &moved),
        )
        .unwrap();
        assert!(
            script.contains(
                "delete element inet weft-guard vxlan-v4-v4 { 192.168.1.2 . 0xc0a80102 }"
            ) && script
                .contains("add element inet weft-guard vxlan-v4-v4 { 192.168.1.9 . 0xc0a80109 }"),
            "{script}"
        );
        assert!(!script.contains("192.168.1.9 . 0xc0a80102"), "{script}");
    }

    #[test]
    fn an_empty_set_is_declared_without_elements() {
        let state = GuardState::of(Some(4789), &[]);
        let text = render(&state);
        assert!(!text.contains("elements"), "{text}");
        assert_eq!(text.matches("flags interval").count(), 4, "{text}");
        assert!(text.contains("udp dport 4789"), "{text}");
    }

    #[test]
    fn a_single_address_slice_is_one_value() {
        assert_eq!(inner_range(&"10.244.2.7/32".parse().unwrap()), "0x0af40207");
        assert_eq!(
            inner_range(&"10.244.2.7/24".parse().unwrap()),
            "0x0af40200-0x0af402ff",
            "a slice is taken as its network"
        );
    }

    #[test]
    fn a_peer_change_deletes_then_adds_only_what_changed() {
        let mut peers = dual_stack_peers();
        let old = GuardState::of(Some(8472), &peers);
        peers[0].pod_cidrs[0] = "10.244.2.0/23".parse().unwrap();
        peers.pop();
        let new = GuardState::of(Some(8472), &peers);
        let script = update_script(&old, &new).unwrap();
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(
            lines,
            [
                "delete element inet weft-guard vxlan-v4-v4 { 192.168.1.2 . 0x0af40200-0x0af402ff }",
                "delete element inet weft-guard vxlan-v6-v4 { fd50::3 . 0x0af40300-0x0af403ff }",
                "delete element inet weft-guard vxlan-v6-v6 { fd50::3 . 0xfd000010024400030000000000000000-0xfd00001002440003ffffffffffffffff }",
                "delete element inet weft-guard vxlan-v6-v6 { fd50::3 . 0xfd500000000000000000000000000003 }",
                "add element inet weft-guard vxlan-v4-v4 { 192.168.1.2 . 0x0af40200-0x0af403ff }",
            ]
        );
        assert_eq!(update_script(&new, &new).unwrap(), "");
    }

    #[test]
    fn a_new_port_or_backend_needs_a_whole_write() {
        let peers = dual_stack_peers();
        let vxlan = GuardState::of(Some(8472), &peers);
        assert!(update_script(&vxlan, &GuardState::of(Some(4789), &peers)).is_none());
        assert!(update_script(&vxlan, &GuardState::default()).is_none());
        assert!(update_script(&GuardState::default(), &vxlan).is_none());
    }

    fn drops(counts: [u64; 3]) -> Drops {
        Drops(counts)
    }

    #[test]
    fn the_tally_only_goes_up_across_rewrites() {
        let mut tally = DropTally::default();
        // A table left by an earlier run: its counts are that run's.
        tally.read(drops([5, 1, 9]));
        assert_eq!(tally.take(), Drops::default());
        tally.read(drops([7, 1, 10]));
        // Read again just before a rewrite, which zeroes the counters.
        tally.read(drops([8, 2, 10]));
        tally.rewritten();
        tally.read(drops([1, 0, 3]));
        assert_eq!(tally.take(), drops([4, 1, 4]));
        // Recreated unseen: the counters went below the last reading.
        tally.read(drops([0, 0, 2]));
        assert_eq!(tally.take(), drops([0, 0, 2]));
        assert_eq!(tally.take(), Drops::default());
    }

    #[test]
    fn reasons_have_counter_names_and_metric_labels() {
        let labels: Vec<_> = DropReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels, ["spoofed", "link_local", "vxlan_stranger"]);
        let counts = drops([1, 2, 3]);
        assert_eq!(counts.of(DropReason::LinkLocal), 2);
        assert_eq!(counts.iter().map(|(_, n)| n).collect::<Vec<_>>(), [1, 2, 3]);
    }
}
