//! The policy data plane: a [`PolicyPlan`] as nftables table `weft-policy`.
//!
//! One chain on the forward hook sees every packet a node passes between a
//! pod and anything else. Packets of connections already accepted go
//! first; then the source address picks the egress check of an isolated
//! local pod and the destination address the ingress check, each one
//! verdict-map lookup that jumps to the chain of the pod's allow set. That
//! chain is one lookup of (peer address, protocol, port) in a
//! concatenated interval set: it returns when the traffic is allowed and
//! counts and drops it otherwise. Per packet that is at most four lookups,
//! however many policies there are. Traffic between a pod and its own node
//! (kubelet probes, the node's own processes) takes the input and output
//! hooks and is never checked, as NetworkPolicy expects.
//!
//! The table is written whole (create, delete, recreate in one transaction)
//! on the first apply and on resync, and changed in place otherwise: an
//! allow set's entries and the map's pod addresses are added and deleted
//! element by element, so pod churn never rewrites the table.
//!
//! A whole write restarts the named drop counters at zero, so the packets
//! they counted are tallied just before (see `DeniedTally`) and the agent's
//! count of denied packets only ever goes up.
//!
//! After each write the table's fingerprint ([`crate::nft_watch::fingerprint`])
//! is kept, so that [`PolicyDataplane::restore_if_changed`], called by the
//! table watch on any change to the table, can tell the agent's own writes
//! from anyone else's and write the table whole again only after the latter.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

use weft_core::ip::IpFamily;
use weft_core::netlink::Removal;
use weft_core::nft::{self, NftError};

use super::compile::{AddressRange, Allow, AllowSetId, Direction, PolicyPlan};
use crate::nft_watch::{fingerprint, TableCheck};

/// Family and name of Weft's policy table.
pub const TABLE: &str = "inet weft-policy";

/// The packet field that holds the local pod's address in `direction`
/// (the destination of ingress).
fn local_address(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "daddr",
        Direction::Egress => "saddr",
    }
}

/// The packet field that holds the peer's address.
fn peer_address(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    }
}

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// The transaction that replaces the table with one enforcing `plan`.
fn replace_script(plan: &PolicyPlan) -> String {
    let mut out = format!("add table {TABLE}\ndelete table {TABLE}\nadd table {TABLE}\n");
    for side in Direction::BOTH {
        let name = side.name();
        let _ = writeln!(out, "add counter {TABLE} {name}-denied");
        for family in FAMILIES {
            let _ = writeln!(
                out,
                "add map {TABLE} {name}-{v} {{ type {t} : verdict; }}",
                v = nft::suffix(family),
                t = nft::address_type(family),
            );
        }
    }
    let _ = writeln!(
        out,
        "add chain {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}"
    );
    let _ = writeln!(
        out,
        "add rule {TABLE} forward ct state established,related accept"
    );
    // Neighbour discovery between a pod and its neighbours on the
    // bridge is not traffic policy speaks of; dropping it would leave
    // IPv6 neighbours unresolved.
    let _ = writeln!(
        out,
        "add rule {TABLE} forward icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept"
    );
    for side in Direction::BOTH {
        for family in FAMILIES {
            let _ = writeln!(
                out,
                "add rule {TABLE} forward {h} {a} vmap @{n}-{v}",
                h = nft::header(family),
                a = local_address(side),
                n = side.name(),
                v = nft::suffix(family),
            );
        }
    }
    for side in Direction::BOTH {
        let direction = side.of(plan);
        for (id, set) in &direction.allow_sets {
            add_allow_set(&mut out, side, *id);
            elements(&mut out, "add", side, *id, set);
        }
        map_entries(&mut out, "add", side, &direction.isolated);
    }
    out
}

/// The transaction that takes the table from enforcing `old` to
/// enforcing `new`, element by element; empty when nothing changed.
fn update_script(old: &PolicyPlan, new: &PolicyPlan) -> String {
    let mut out = String::new();
    for side in Direction::BOTH {
        let (old, new) = (side.of(old), side.of(new));
        // New allow sets first, so a pod moved to another finds it
        // complete. In a set that stays, entries leave before others
        // come: the kernel refuses an entry overlapping one still there
        // (the transaction is atomic, so no packet sees the gap).
        for (id, set) in &new.allow_sets {
            match old.allow_sets.get(id) {
                None => {
                    add_allow_set(&mut out, side, *id);
                    elements(&mut out, "add", side, *id, set);
                }
                Some(before) => {
                    let removed: BTreeSet<Allow> = before.difference(set).copied().collect();
                    elements(&mut out, "delete", side, *id, &removed);
                    let added: BTreeSet<Allow> = set.difference(before).copied().collect();
                    elements(&mut out, "add", side, *id, &added);
                }
            }
        }
        let moved: BTreeMap<IpAddr, AllowSetId> = new
            .isolated
            .iter()
            .filter(|(ip, id)| old.isolated.get(ip) != Some(id))
            .map(|(ip, id)| (*ip, *id))
            .collect();
        let gone: BTreeMap<IpAddr, AllowSetId> = old
            .isolated
            .iter()
            .filter(|(ip, id)| new.isolated.get(ip) != Some(id))
            .map(|(ip, id)| (*ip, *id))
            .collect();
        map_entries(&mut out, "delete", side, &gone);
        map_entries(&mut out, "add", side, &moved);
        // Sets no pod uses any more go last, once no map entry jumps
        // to their chain.
        for id in old
            .allow_sets
            .keys()
            .filter(|id| !new.allow_sets.contains_key(id))
        {
            let _ = writeln!(out, "delete chain {TABLE} {}", chain_name(side, *id));
            for family in FAMILIES {
                let _ = writeln!(out, "delete set {TABLE} {}", set_name(side, *id, family));
            }
        }
    }
    out
}

fn add_allow_set(out: &mut String, side: Direction, id: AllowSetId) {
    let chain = chain_name(side, id);
    let _ = writeln!(out, "add chain {TABLE} {chain}");
    for family in FAMILIES {
        let set = set_name(side, id, family);
        let _ = writeln!(
            out,
            "add set {TABLE} {set} {{ type {t} . inet_proto . inet_service; flags interval; }}",
            t = nft::address_type(family),
        );
        let _ = writeln!(
            out,
            "add rule {TABLE} {chain} {h} {a} . meta l4proto . th dport @{set} return",
            h = nft::header(family),
            a = peer_address(side),
        );
    }
    let _ = writeln!(
        out,
        "add rule {TABLE} {chain} counter name {}-denied drop",
        side.name()
    );
}

/// `verb` (`add`, `delete`) the entries of `set` in allow set `id`.
fn elements(out: &mut String, verb: &str, side: Direction, id: AllowSetId, set: &BTreeSet<Allow>) {
    for family in FAMILIES {
        let elements: Vec<String> = set
            .iter()
            .filter(|allow| IpFamily::of_addr(allow.peer.first) == family)
            .map(element)
            .collect();
        // Bounded lines: nft reads a very long line slowly.
        for chunk in elements.chunks(512) {
            let _ = writeln!(
                out,
                "{verb} element {TABLE} {} {{ {} }}",
                set_name(side, id, family),
                chunk.join(", ")
            );
        }
    }
}

/// `verb` the map entries sending each of `isolated`'s addresses to its
/// allow set's chain.
fn map_entries(
    out: &mut String,
    verb: &str,
    side: Direction,
    isolated: &BTreeMap<IpAddr, AllowSetId>,
) {
    for family in FAMILIES {
        let entries: Vec<String> = isolated
            .iter()
            .filter(|(ip, _)| IpFamily::of_addr(**ip) == family)
            .map(|(ip, id)| match verb {
                "delete" => ip.to_string(),
                _ => format!("{ip} : jump {}", chain_name(side, *id)),
            })
            .collect();
        for chunk in entries.chunks(512) {
            let _ = writeln!(
                out,
                "{verb} element {TABLE} {}-{} {{ {} }}",
                side.name(),
                nft::suffix(family),
                chunk.join(", ")
            );
        }
    }
}

/// How [`PolicyDataplane::apply`] reached the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The table already enforced it.
    Unchanged,
    /// Elements were added and deleted in place.
    Updated,
    /// The table was written whole (first apply, resync, or an update the
    /// kernel refused because the table had drifted).
    Replaced,
}

/// Packets dropped, (egress, ingress).
type Denied = (u64, u64);

/// Turns readings of the table's drop counters into packets newly dropped,
/// counting each drop once although the kernel's counters restart at zero
/// whenever the table is written whole.
#[derive(Debug, Default)]
struct DeniedTally {
    /// The last reading, or the counters' zero after a whole write. `None`
    /// before either: the first reading only sets where counting starts,
    /// since what the table counted before this process started was counted
    /// by an earlier run.
    last: Option<Denied>,
    /// Drops counted and not yet taken.
    untaken: Denied,
}

impl DeniedTally {
    /// Counts what the counters added since the last reading. A reading
    /// below the last means the table was recreated without this tally
    /// seeing it, so its counters started again from zero.
    fn read(&mut self, reading: Denied) {
        let since = |last: u64, now: u64| now.checked_sub(last).unwrap_or(now);
        if let Some(last) = self.last {
            self.untaken.0 = self.untaken.0.saturating_add(since(last.0, reading.0));
            self.untaken.1 = self.untaken.1.saturating_add(since(last.1, reading.1));
        }
        self.last = Some(reading);
    }

    /// The table was written whole: its counters start again from zero.
    fn rewritten(&mut self) {
        self.last = Some((0, 0));
    }

    /// The drops counted since the last take.
    fn take(&mut self) -> Denied {
        std::mem::take(&mut self.untaken)
    }
}

/// Keeps the kernel's policy table enforcing the latest plan, in the
/// network namespace of the calling thread. Blocking: runs `nft`.
#[derive(Debug, Default)]
pub struct PolicyDataplane {
    applied: Option<PolicyPlan>,
    /// The next apply writes the table whole.
    rewrite: bool,
    /// The table's fingerprint right after the last write; `None` when it
    /// could not be read.
    fingerprint: Option<u64>,
    denied: DeniedTally,
}

impl PolicyDataplane {
    /// Makes the table enforce `plan`: in place when the last apply
    /// succeeded, whole otherwise. Every table changes in one transaction.
    pub fn apply(&mut self, plan: PolicyPlan) -> Result<Applied, NftError> {
        let rewrite = std::mem::take(&mut self.rewrite);
        let applied = match self.applied.take() {
            Some(old) if !rewrite => {
                let script = update_script(&old, &plan);
                if script.is_empty() {
                    Applied::Unchanged
                } else {
                    match nft::apply(&script, "update the network policy table") {
                        Ok(()) => {
                            self.remember();
                            Applied::Updated
                        }
                        Err(error) => {
                            tracing::warn!(%error, "updating the network policy table in place failed; writing it whole");
                            self.replace(&plan)?
                        }
                    }
                }
            }
            _ => self.replace(&plan)?,
        };
        self.applied = Some(plan);
        Ok(applied)
    }

    /// Writes the table whole again if it is no longer what the last write
    /// left (deleted, or changed by anyone but this data plane); nothing
    /// before the first successful apply. For [`crate::nft_watch`]: the
    /// agent's own writes leave the fingerprint they are compared with, so
    /// they never cause a restore.
    pub fn restore_if_changed(&mut self) -> Result<TableCheck, NftError> {
        let Some(plan) = self.applied.take() else {
            return Ok(TableCheck::Intact);
        };
        let checked = match (fingerprint(TABLE)?, self.fingerprint) {
            (Some(now), Some(then)) if now == then => Ok(TableCheck::Intact),
            _ => self.replace(&plan).map(|_| TableCheck::Restored),
        };
        // A failed restore leaves the table unknown: the next apply writes
        // it whole.
        self.rewrite |= checked.is_err();
        self.applied = Some(plan);
        checked
    }

    /// Keeps the fingerprint of the table as this data plane just wrote it.
    fn remember(&mut self) {
        self.fingerprint = fingerprint(TABLE).unwrap_or_else(|error| {
            tracing::debug!(%error, "could not read back the network policy table; the table watch will write it whole at its next change");
            None
        });
    }

    fn replace(&mut self, plan: &PolicyPlan) -> Result<Applied, NftError> {
        // Writing the table restarts its counters: count what they hold
        // first. Without a table there is nothing to count.
        match self.counters() {
            Ok(reading) => self.denied.read(reading),
            Err(error) => {
                tracing::debug!(%error, "could not read the drop counters before writing the network policy table (there are none on a first write)")
            }
        }
        let script = replace_script(plan);
        nft::apply(&script, "write the network policy table")?;
        self.denied.rewritten();
        self.remember();
        Ok(Applied::Replaced)
    }

    /// Has the next apply write the table whole, repairing any drift.
    pub fn resync(&mut self) {
        self.rewrite = true;
    }

    /// The plan the table holds since the last successful apply.
    pub fn enforced(&self) -> Option<&PolicyPlan> {
        self.applied.as_ref()
    }

    /// Packets dropped since the table was last written whole, (egress,
    /// ingress): the table's counters as they stand.
    pub fn denied_packets(&self) -> Result<(u64, u64), NftError> {
        match self.counters() {
            // No table yet: nothing denied.
            Err(NftError::Nft { .. }) if self.applied.is_none() => Ok((0, 0)),
            counted => counted,
        }
    }

    /// Packets dropped since the last call, (egress, ingress), each counted
    /// once across whole writes of the table; the first call only starts
    /// the count.
    pub fn newly_denied(&mut self) -> Result<(u64, u64), NftError> {
        match self.counters() {
            Ok(reading) => self.denied.read(reading),
            // No table yet: nothing denied.
            Err(NftError::Nft { .. }) if self.applied.is_none() => {}
            Err(error) => return Err(error),
        }
        Ok(self.denied.take())
    }

    /// The table's drop counters, read without listing its sets.
    fn counters(&self) -> Result<Denied, NftError> {
        let mut args = vec!["-j", "list", "counters", "table"];
        args.extend(TABLE.split_whitespace());
        let listing = nft::run(&args, None, "read the denied-packet counters")?;
        let parsed: serde_json::Value = serde_json::from_str(&listing).unwrap_or_default();
        let mut denied = (0, 0);
        for item in parsed["nftables"].as_array().into_iter().flatten() {
            let counter = &item["counter"];
            let packets = counter["packets"].as_u64().unwrap_or(0);
            match counter["name"].as_str() {
                Some("egress-denied") => denied.0 += packets,
                Some("ingress-denied") => denied.1 += packets,
                _ => {}
            }
        }
        Ok(denied)
    }
}

/// Removes the table, if there is one (policy turned off).
pub fn remove_table() -> Result<Removal, NftError> {
    nft::delete_table(TABLE, "remove the network policy table")
}

fn chain_name(side: Direction, id: AllowSetId) -> String {
    format!("{}-{:016x}", side.name(), id.0)
}

fn set_name(side: Direction, id: AllowSetId, family: IpFamily) -> String {
    format!("{}-{:016x}-{}", side.name(), id.0, nft::suffix(family))
}

/// One set element: `peer . protocols . ports`, each a value or a range.
fn element(allow: &Allow) -> String {
    let AddressRange { first, last } = allow.peer;
    let range = |a: String, b: String| if a == b { a } else { format!("{a}-{b}") };
    format!(
        "{} . {} . {}",
        range(first.to_string(), last.to_string()),
        range(allow.protocols.0.to_string(), allow.protocols.1.to_string()),
        range(allow.ports.0.to_string(), allow.ports.1.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::DirectionPlan;

    fn plan(isolated: &[(&str, u64)], sets: &[(u64, &[Allow])]) -> PolicyPlan {
        PolicyPlan {
            ingress: DirectionPlan {
                isolated: isolated
                    .iter()
                    .map(|(ip, id)| (ip.parse().unwrap(), AllowSetId(*id)))
                    .collect(),
                allow_sets: sets
                    .iter()
                    .map(|(id, entries)| (AllowSetId(*id), entries.iter().copied().collect()))
                    .collect(),
            },
            egress: DirectionPlan::default(),
        }
    }

    fn allow(first: &str, last: &str, protocol: u8, port: u16) -> Allow {
        Allow {
            peer: AddressRange {
                first: first.parse().unwrap(),
                last: last.parse().unwrap(),
            },
            protocols: (protocol, protocol),
            ports: (port, port),
        }
    }

    #[test]
    fn the_whole_table_replaces_the_old_in_one_transaction() {
        let web = allow("10.244.1.2", "10.244.1.2", 6, 8080);
        let wide = Allow {
            peer: AddressRange {
                first: "10.0.0.0".parse().unwrap(),
                last: "10.255.255.255".parse().unwrap(),
            },
            protocols: (0, 255),
            ports: (0, 65535),
        };
        let text = replace_script(&plan(
            &[("10.244.0.2", 1), ("fd00::2", 1)],
            &[(1, &[web, wide])],
        ));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            &lines[..3],
            [
                "add table inet weft-policy",
                "delete table inet weft-policy",
                "add table inet weft-policy"
            ]
        );
        for expected in [
            "add rule inet weft-policy forward ct state established,related accept",
            "add rule inet weft-policy forward ip saddr vmap @egress-v4",
            "add rule inet weft-policy forward ip6 daddr vmap @ingress-v6",
            "add set inet weft-policy ingress-0000000000000001-v4 { type ipv4_addr . inet_proto . inet_service; flags interval; }",
            "add rule inet weft-policy ingress-0000000000000001 ip saddr . meta l4proto . th dport @ingress-0000000000000001-v4 return",
            "add rule inet weft-policy ingress-0000000000000001 counter name ingress-denied drop",
            "add element inet weft-policy ingress-0000000000000001-v4 { 10.0.0.0-10.255.255.255 . 0-255 . 0-65535, 10.244.1.2 . 6 . 8080 }",
            "add element inet weft-policy ingress-v4 { 10.244.0.2 : jump ingress-0000000000000001 }",
            "add element inet weft-policy ingress-v6 { fd00::2 : jump ingress-0000000000000001 }",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        // Established traffic is accepted before any check.
        let established = text.find("ct state").unwrap();
        assert!(text.find("vmap").unwrap() > established);
        assert!(!text.contains("flush"));
    }

    #[test]
    fn denied_packets_are_counted_once_across_rewrites_and_never_go_down() {
        let mut tally = DeniedTally::default();
        let mut total = (0, 0);
        let mut take = |tally: &mut DeniedTally| {
            let (egress, ingress) = tally.take();
            total = (total.0 + egress, total.1 + ingress);
            total
        };
        // What the table counted before this process started is not counted.
        tally.read((7, 40));
        assert_eq!(take(&mut tally), (0, 0));
        tally.read((9, 45));
        assert_eq!(take(&mut tally), (2, 5));
        // Read just before a whole write, which restarts the kernel's
        // counters at zero.
        tally.read((10, 50));
        tally.rewritten();
        tally.read((1, 3));
        assert_eq!(take(&mut tally), (4, 13));
        // A rewrite the tally did not see: the reading falls.
        tally.read((0, 2));
        assert_eq!(take(&mut tally), (4, 15));
        tally.read((0, 2));
        assert_eq!(take(&mut tally), (4, 15));
        // Without any reading before the first write, counting starts at it.
        let mut fresh = DeniedTally::default();
        fresh.rewritten();
        fresh.read((4, 0));
        assert_eq!(fresh.take(), (4, 0));
    }

    #[test]
    fn updates_change_only_what_changed_and_in_a_safe_order() {
        let a = allow("10.244.1.2", "10.244.1.2", 6, 80);
        let b = allow("10.244.1.3", "10.244.1.3", 6, 80);
        let old = plan(&[("10.244.0.2", 1), ("10.244.0.3", 1)], &[(1, &[a])]);
        assert_eq!(update_script(&old, &old), "");
        // A peer pod comes: one element.
        let more = plan(&[("10.244.0.2", 1), ("10.244.0.3", 1)], &[(1, &[a, b])]);
        assert_eq!(
            update_script(&old, &more),
            "add element inet weft-policy ingress-0000000000000001-v4 { 10.244.1.3 . 6 . 80 }\n"
        );
        // One local pod moves to a new set and the old set goes with the
        // last pod leaving it.
        let moved = plan(&[("10.244.0.2", 2)], &[(2, &[b])]);
        let text = update_script(&old, &moved);
        let position = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("missing {needle:?} in\n{text}"))
        };
        let added_set = position("add set inet weft-policy ingress-0000000000000002-v4");
        let unmapped =
            position("delete element inet weft-policy ingress-v4 { 10.244.0.2, 10.244.0.3 }");
        let mapped = position("add element inet weft-policy ingress-v4 { 10.244.0.2 : jump ingress-0000000000000002 }");
        let dropped_chain = position("delete chain inet weft-policy ingress-0000000000000001");
        position("delete set inet weft-policy ingress-0000000000000001-v6");
        assert!(
            added_set < unmapped && unmapped < mapped && mapped < dropped_chain,
            "{text}"
        );
    }
}
