//! `/status?check=kernel`: what the kernel lacks or holds in excess against
//! what the agent wants, found the way a reconcile finds it (dump, then
//! plan) but without applying anything.
//!
//! The check plans as the next reconcile would: the peers the node cache
//! holds now, screened and turned into a desired state as the reconcile
//! does ([`desired_for_peers`]), with this node's settings, slices and
//! retry waits as the last reconcile left them ([`KernelCheckHandle::record`]).
//! Nothing of it is kept between checks: until one is asked for, the check
//! costs the reconcile loop one small record per pass.
//!
//! Each entry is one line in `ip`'s words ([`drift`]):
//!
//! ```text
//! route 10.244.2.0/24 via 10.244.2.0 dev weft.1 onlink
//! route 10.244.1.0/24 via 172.31.0.11
//! route unreachable 10.244.0.0/24
//! route 172.31.0.12 via 10.244.2.0 dev weft.1 onlink table 8787
//! rule from 10.244.0.0/24 fwmark 0x10000000/0x10000000 lookup 8787 pref 87
//! neighbour 10.244.2.0 lladdr 0a:58:0a:f4:02:00 dev weft.1
//! fdb 0a:58:0a:f4:02:00 dst 172.31.0.12 dev weft.1
//! ```
//!
//! Entries the reconcile holds on purpose are in neither list: those of a
//! peer waiting out its backoff after the kernel refused it, and those of a
//! peer whose slice another owner's route holds. `/status` names those
//! peers under `peers.held`; `missing` and `excess` are what the next
//! reconcile would add, and remove or overwrite.
//!
//! `tables_changed` lists Weft's nftables tables whose last check by the
//! table watch ([`crate::nft_watch`]) failed: changed behind the agent's
//! back and not restored. A change the watch restores (within a fraction
//! of a second) is not drift; without a running watch the list is empty.
//!
//! Asked about one peer (`&peer=<node>`), the check also lists the entries
//! this node must hold to reach that peer's pods, in the same words, each
//! with whether the kernel holds it exactly ([`peer_entries`]), from the
//! same desired state and dump as the rest of the check.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use weft_core::netlink::Netlink;
use weft_core::status::{EntryCheck, HeldPeer, KernelCheck, PeerEntries};

use super::cache::NodeCache;
use super::config::AgentConfig;
use super::dataplane::{
    Dataplane, DataplaneError, Dump, OwnSliceChange, OwnSlices, RouteConflict, RoutePlan,
    RuleChange, RETURN_TABLE, VXLAN_DEVICE,
};
use super::nft_watch::TableRegistry;
use super::overlay::{
    desired_state, DesiredState, EntryOwners, FdbEntry, Neighbour, NextHop, Operation,
    OverlayRoute, ReturnRoute, SkipReason,
};
use super::peer::{Peer, PeerSet};
use super::retry::held_peers;
use super::screen::{screen, Rules, Screened};
use super::setup::AppliedSetup;
use super::status::conflict_reason;
use weft_core::netlink::Rule;

/// Why a kernel check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KernelCheckError {
    /// No reconcile has planned the peers yet, so there is nothing to
    /// check against.
    #[error("no reconcile has programmed the peers yet (the node has no pod CIDR, its slice was refused, or the first Node list is not complete): ask again once /readyz answers 200")]
    NotReconciled,
    /// Dumping the kernel failed.
    #[error("dumping the kernel's routes, neighbours and FDB entries: {0}")]
    Dump(#[from] DataplaneError),
    /// `peer=` named the node this agent runs on.
    #[error("peer={0} is this agent's own node, which needs no entries to reach its own pods: ask with another Node's name, or ask the agent of the node the traffic comes from")]
    OwnNode(String),
}

/// Dumps the kernel, plans against `desired` and this node's slices `own`
/// as [`Dataplane::reconcile_holding`] does, leaving out what `hold` picks
/// once it has seen the plan's conflicts, and reports the plan as entries
/// missing and in excess ([`drift`]) without applying it. With `tables`,
/// the tables whose last check failed are reported too
/// ([`TableRegistry::failed_checks`]).
pub async fn check_kernel<H>(
    dataplane: &Dataplane,
    desired: &DesiredState,
    own: &OwnSlices,
    hold: impl FnOnce(&[RouteConflict]) -> H,
    tables: Option<&TableRegistry>,
) -> Result<KernelCheck, DataplaneError>
where
    H: Fn(&Operation) -> bool,
{
    let (dump, plan) = dataplane.plan_holding(desired, own, hold).await?;
    let mut check = drift(&dump, &plan);
    check.tables_changed = tables_changed(tables);
    Ok(check)
}

/// The tables in `tables` whose last check failed, one line each.
fn tables_changed(tables: Option<&TableRegistry>) -> Vec<String> {
    tables
        .map(|tables| {
            tables
                .failed_checks()
                .into_iter()
                .map(|(table, error)| {
                    format!("{table} (changed, and checking or restoring it failed: {error})")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The entries `desired` holds for `peer` (its neighbours, its FDB entry,
/// the routes to its slices and its return route, in the order a
/// reconcile adds them), in
/// the words of [`drift`], each with whether `dump` holds it exactly. A
/// slice the desired state leaves out (see [`DesiredState::skipped`]) has
/// no entries.
pub fn peer_entries(peer: &Peer, desired: &DesiredState, dump: &Dump) -> Vec<EntryCheck> {
    let owners = EntryOwners::of([peer]);
    let owned = &dump.owned;
    let neighbours = desired
        .neighbours
        .iter()
        .map(|(&ip, &mac)| Neighbour { ip, mac })
        .filter(|n| owners.owner(&Operation::SetNeighbour(*n)).is_some())
        .map(|n| (neighbour_line(&n), owned.neighbours.contains(&n)));
    let fdb = desired
        .fdb
        .iter()
        .map(|(&mac, &remote)| FdbEntry { mac, remote })
        .filter(|f| owners.owner(&Operation::SetFdb(*f)).is_some())
        .map(|f| (fdb_line(&f), owned.fdb.contains(&f)));
    let routes = desired
        .routes
        .iter()
        .map(|(&destination, &next_hop)| OverlayRoute {
            destination,
            next_hop,
        })
        .filter(|r| owners.owner(&Operation::SetRoute(*r)).is_some())
        .map(|r| (route_line(&r), owned.routes.contains(&r)));
    let returns = desired
        .return_routes
        .iter()
        .map(|(&node_ip, &vtep)| ReturnRoute { node_ip, vtep })
        .filter(|r| owners.owner(&Operation::SetReturnRoute(*r)).is_some())
        .map(|r| (return_route_line(&r), owned.return_routes.contains(&r)));
    neighbours
        .chain(fdb)
        .chain(routes)
        .chain(returns)
        .map(|(entry, held)| EntryCheck { entry, held })
        .collect()
}

/// What one check made of the Node `name` as a peer: `rejected` (with the
/// screen's reason) when the screen rejected it, `unknown` when the screen
/// saw no such peer, otherwise its entries ([`peer_entries`]) and `held`
/// when `held_reason` gives a reason for holding them, `accepted` if not
/// (with the slices that get no entries, if any, as the reason).
pub(crate) fn peer_standing(
    name: &str,
    screened: &Screened<'_>,
    held_reason: impl Fn(&Peer) -> Option<String>,
    desired: &DesiredState,
    dump: &Dump,
) -> PeerEntries {
    let standing = |state: &str, reason: Option<String>, entries| PeerEntries {
        node: name.to_owned(),
        state: state.to_owned(),
        reason,
        entries,
    };
    if let Some(rejected) = screened.rejected.iter().find(|r| r.node_name == name) {
        let reason = format!("{}: {}", rejected.reason.field(), rejected.reason);
        return standing("rejected", Some(reason), Vec::new());
    }
    let Some(peer) = screened.accepted.iter().find(|p| p.node_name == name) else {
        let reason = format!("no Node {name} with Weft's annotations is known to this agent: check the name with `kubectl get nodes`, and that its agent published weft.dev/public-ip");
        return standing("unknown", Some(reason), Vec::new());
    };
    let entries = peer_entries(peer, desired, dump);
    if let Some(reason) = held_reason(peer) {
        return standing("held", Some(reason), entries);
    }
    let skipped: Vec<String> = desired
        .skipped
        .iter()
        .filter(|skip| skip.node_name == name)
        .map(|skip| {
            format!(
                "slice {} gets no entries: {}",
                skip.slice,
                skip_words(skip.reason)
            )
        })
        .collect();
    standing(
        "accepted",
        (!skipped.is_empty()).then(|| skipped.join("; ")),
        entries,
    )
}

/// Why a peer slice gets no entries, in words.
fn skip_words(reason: SkipReason) -> &'static str {
    match reason {
        SkipReason::NoVtepMac => "the peer has published no VTEP MAC yet",
        SkipReason::NotOnUnderlaySubnet => {
            "host-gw needs the peer on this node's underlay subnet, and it is not"
        }
        SkipReason::AddressFamily => "its address family does not fit this node's underlay",
    }
}

/// The entries `plan` would add (`missing`) and remove or overwrite
/// (`excess`), one sorted line each, from the `dump` it was made from. A
/// neighbour or route the plan replaces in place (a new MAC, a new next
/// hop) is missing with its new value and in excess with its old one.
pub fn drift(dump: &Dump, plan: &RoutePlan) -> KernelCheck {
    let mut missing = BTreeSet::new();
    let mut excess = BTreeSet::new();
    for change in &plan.own_slices {
        match change {
            OwnSliceChange::Set(slice) => missing.insert(format!("route unreachable {slice}")),
            OwnSliceChange::Delete(slice) => excess.insert(format!("route unreachable {slice}")),
        };
    }
    for change in &plan.rules {
        match change {
            RuleChange::Add(rule) => missing.insert(rule_line(rule)),
            RuleChange::Delete(rule) => excess.insert(rule_line(rule)),
        };
    }
    for operation in &plan.operations {
        match operation {
            Operation::SetNeighbour(wanted) => {
                missing.insert(neighbour_line(wanted));
                excess.extend(
                    dump.owned
                        .neighbours
                        .iter()
                        .filter(|n| n.ip == wanted.ip && n.mac != wanted.mac)
                        .map(neighbour_line),
                );
            }
            Operation::SetFdb(wanted) => {
                missing.insert(fdb_line(wanted));
            }
            Operation::SetRoute(wanted) => {
                missing.insert(route_line(wanted));
                excess.extend(
                    dump.owned
                        .routes
                        .iter()
                        .filter(|r| r.destination == wanted.destination && r != &wanted)
                        .map(route_line),
                );
            }
            Operation::SetReturnRoute(wanted) => {
                missing.insert(return_route_line(wanted));
                excess.extend(
                    dump.owned
                        .return_routes
                        .iter()
                        .filter(|r| r.node_ip == wanted.node_ip && r != &wanted)
                        .map(return_route_line),
                );
            }
            Operation::DeleteReturnRoute(stale) => {
                excess.insert(return_route_line(stale));
            }
            Operation::DeleteRoute(stale) => {
                excess.insert(route_line(stale));
            }
            Operation::DeleteFdb(stale) => {
                excess.insert(fdb_line(stale));
            }
            Operation::DeleteNeighbour(stale) => {
                excess.insert(neighbour_line(stale));
            }
        }
    }
    KernelCheck {
        missing: missing.into_iter().collect(),
        excess: excess.into_iter().collect(),
        tables_changed: Vec::new(),
        peer: None,
    }
}

fn neighbour_line(neighbour: &Neighbour) -> String {
    format!(
        "neighbour {} lladdr {} dev {VXLAN_DEVICE}",
        neighbour.ip, neighbour.mac
    )
}

fn fdb_line(entry: &FdbEntry) -> String {
    format!("fdb {} dst {} dev {VXLAN_DEVICE}", entry.mac, entry.remote)
}

fn route_line(route: &OverlayRoute) -> String {
    match route.next_hop {
        NextHop::Vtep(vtep) => format!(
            "route {} via {vtep} dev {VXLAN_DEVICE} onlink",
            route.destination
        ),
        NextHop::Underlay(gateway) => format!("route {} via {gateway}", route.destination),
    }
}

fn return_route_line(route: &ReturnRoute) -> String {
    format!(
        "route {} via {} dev {VXLAN_DEVICE} onlink table {RETURN_TABLE}",
        route.node_ip, route.vtep
    )
}

/// `rule [from S] [fwmark V/M] lookup T pref P`, as `ip rule` words it.
fn rule_line(rule: &Rule) -> String {
    let mut line = "rule".to_owned();
    if let Some(source) = rule.source {
        line.push_str(&format!(" from {source}"));
    }
    if let Some(mark) = rule.mark {
        line.push_str(&format!(" fwmark {:#x}/{:#x}", mark.value, mark.mask));
    }
    format!("{line} lookup {} pref {}", rule.table, rule.priority)
}

/// The peers the screen accepts among `peers` and the entries the node
/// wants for them: what one reconcile of the peers plans for, given this
/// node's `setup`.
pub(crate) fn desired_for_peers<'p>(
    config: &AgentConfig,
    setup: &AppliedSetup,
    peers: &'p PeerSet,
) -> (Screened<'p>, DesiredState) {
    let rules = Rules {
        config,
        local: &setup.local,
        public_ip: setup.public_ip,
        vtep_mac: setup.vtep.as_ref().map(|vtep| vtep.mac),
    };
    let screened = screen(&rules, peers.values());
    let desired = desired_state(
        config.backend,
        &setup.local,
        screened.accepted.iter().copied(),
    );
    (screened, desired)
}

/// What the last reconcile of the peers went by, besides the node cache.
#[derive(Debug, Clone)]
struct Basis {
    /// This node's settings.
    setup: AppliedSetup,
    /// This node's checked slices.
    own: OwnSlices,
    /// The peers waiting out their backoff, whose entries were held.
    waiting: HashSet<String>,
}

/// The agent's kernel check, shared by the reconcile loop (which records
/// what each reconcile of the peers went by) and `/status` (which checks).
/// Cheap to clone; costs nothing until [`KernelCheckHandle::check`] runs.
#[derive(Debug, Clone)]
pub(crate) struct KernelCheckHandle {
    config: Arc<AgentConfig>,
    nodes: Arc<NodeCache>,
    tables: Option<TableRegistry>,
    last: Arc<Mutex<Option<Basis>>>,
}

impl KernelCheckHandle {
    /// A check of the peers in `nodes` with the agent's `config`, and of
    /// the nftables tables in `tables` (the table watch's registry, when
    /// the watch runs).
    pub(crate) fn new(
        config: AgentConfig,
        nodes: Arc<NodeCache>,
        tables: Option<TableRegistry>,
    ) -> Self {
        KernelCheckHandle {
            config: Arc::new(config),
            nodes,
            tables,
            last: Arc::default(),
        }
    }

    /// Records what a reconcile of the peers went by: this node's `setup`
    /// and slices `own`, and the peers `waiting` for their retry (whose
    /// entries it held). The check dumps on a netlink socket of its own
    /// (see [`KernelCheckHandle::check`]), not the reconcile's.
    pub(crate) fn record(&self, setup: &AppliedSetup, own: &OwnSlices, waiting: &BTreeSet<&str>) {
        let basis = Basis {
            setup: setup.clone(),
            own: own.clone(),
            waiting: waiting.iter().map(|&name| name.to_owned()).collect(),
        };
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(basis);
    }

    /// Dumps the kernel and reports what the next reconcile would change,
    /// without changing anything (see the module's documentation). With
    /// `peer`, also what this node must hold for that Node
    /// ([`peer_standing`]); a held peer's reason is the one the last
    /// reconcile `recorded` for it, when there is one.
    pub(crate) async fn check(
        &self,
        peer: Option<&str>,
        recorded: &[HeldPeer],
    ) -> Result<KernelCheck, KernelCheckError> {
        let basis = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(KernelCheckError::NotReconciled)?;
        if let Some(own) = peer.filter(|&name| name == basis.setup.local.name) {
            return Err(KernelCheckError::OwnNode(own.to_owned()));
        }
        let nodes = self
            .nodes
            .snapshot()
            .ok_or(KernelCheckError::NotReconciled)?;
        let (screened, desired) = desired_for_peers(&self.config, &basis.setup, &nodes.peers);
        let waiting: BTreeSet<&str> = basis.waiting.iter().map(String::as_str).collect();
        // The kernel runs one dump at a time per netlink socket and answers
        // a second with EBUSY, so dumping on the reconcile's socket would
        // fail the check, or the reconcile, whenever the two meet. This
        // task runs in the agent's namespace, as the reconcile's does.
        let mut dataplane = Dataplane::new(Netlink::current().map_err(DataplaneError::from)?);
        dataplane.adopt_vtep().await?;
        let (dump, plan) = dataplane
            .plan_holding(&desired, &basis.own, |conflicts| {
                let held = held_peers(&screened.accepted, &waiting, conflicts);
                move |operation: &Operation| held.owner(operation).is_some()
            })
            .await?;
        let mut check = drift(&dump, &plan);
        check.tables_changed = tables_changed(self.tables.as_ref());
        check.peer = peer.map(|name| {
            // Held as the plan above held it: waiting, or in conflict now.
            let held_reason = |peer: &Peer| {
                let conflicts: Vec<String> = plan
                    .conflicts
                    .iter()
                    .filter(|conflict| conflict.concerns(peer))
                    .map(conflict_reason)
                    .collect();
                let waits = waiting.contains(peer.node_name.as_str());
                if !waits && conflicts.is_empty() {
                    return None;
                }
                let recorded = recorded.iter().find(|held| held.node == peer.node_name);
                Some(match recorded {
                    Some(held) => held.reason.clone(),
                    None if waits => {
                        "the kernel refused one of its entries; it waits for its retry".to_owned()
                    }
                    None => conflicts.join("; "),
                })
            };
            peer_standing(name, &screened, held_reason, &desired, &dump)
        });
        Ok(check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;
    use crate::dataplane::{plan_routes, return_rule};
    use crate::overlay::tests::{ip, mac, net};
    use crate::overlay::KernelState;
    use crate::peer::LocalNode;
    use crate::screen::{Rejected, Rejection};

    /// node-b on the underlay subnet, node-c behind a router.
    fn peers() -> [Peer; 2] {
        let peer = |name: &str, slice: &str, public_ip: &str, vtep: u8| Peer {
            node_name: name.into(),
            pod_cidrs: vec![net(slice)],
            public_ip: ip(public_ip),
            vtep_mac: Some(mac(vtep)),
            created: 0,
            malformed: None,
        };
        [
            peer("node-b", "10.244.1.0/24", "172.31.0.11", 1),
            peer("node-c", "10.244.2.0/24", "172.31.1.12", 2),
        ]
    }

    /// This node with 10.244.0.0/24 on 172.31.0.10/24, and [`peers`].
    fn desired(backend: Backend) -> DesiredState {
        let local = LocalNode {
            name: "node-a".into(),
            pod_cidrs: vec![net("10.244.0.0/24")],
            underlay: net("172.31.0.10/24"),
        };
        desired_state(backend, &local, &peers())
    }

    /// A dump holding exactly `desired`, and this node's unreachable route.
    fn dump_of(desired: &DesiredState) -> Dump {
        let rules = desired
            .return_sources
            .iter()
            .map(|&slice| return_rule(slice))
            .collect();
        let owned = KernelState::matching(desired);
        let own_slices = BTreeSet::from([net("10.244.0.0/24")]);
        let owned_destinations = owned
            .routes
            .iter()
            .map(|r| r.destination)
            .chain(own_slices.iter().copied())
            .collect();
        Dump {
            owned,
            own_slices,
            owned_destinations,
            rules,
            ..Dump::default()
        }
    }

    fn own() -> OwnSlices {
        OwnSlices::unchecked(vec![net("10.244.0.0/24")])
    }

    fn check(desired: &DesiredState, dump: &Dump) -> KernelCheck {
        drift(dump, &plan_routes(desired, &own(), dump))
    }

    #[test]
    fn a_kernel_that_matches_is_clean() {
        let desired = desired(Backend::Vxlan);
        assert!(check(&desired, &dump_of(&desired)).is_clean());
    }

    #[test]
    fn an_empty_kernel_lacks_every_entry_in_ip_words() {
        let desired = desired(Backend::Direct);
        let found = check(&desired, &Dump::default());
        assert_eq!(
            found.missing,
            vec![
                "fdb 0a:58:00:00:00:02 dst 172.31.1.12 dev weft.1",
                "neighbour 10.244.2.0 lladdr 0a:58:00:00:00:02 dev weft.1",
                "route 10.244.1.0/24 via 172.31.0.11",
                "route 10.244.2.0/24 via 10.244.2.0 dev weft.1 onlink",
                // node-c rides the tunnel, node-b the underlay.
                "route 172.31.1.12 via 10.244.2.0 dev weft.1 onlink table 8787",
                "route unreachable 10.244.0.0/24",
                "rule from 10.244.0.0/24 fwmark 0x10000000/0x10000000 lookup 8787 pref 87",
            ]
        );
        assert!(found.excess.is_empty(), "{:?}", found.excess);
    }

    #[test]
    fn a_deleted_route_is_missing_and_a_stray_one_in_excess() {
        let desired = desired(Backend::Vxlan);
        let mut dump = dump_of(&desired);
        dump.owned
            .routes
            .retain(|r| r.destination != net("10.244.1.0/24"));
        dump.owned.routes.push(OverlayRoute {
            destination: net("10.244.9.0/24"),
            next_hop: NextHop::Vtep(ip("10.244.9.0")),
        });
        dump.own_slices.insert(net("10.244.8.0/24"));
        let found = check(&desired, &dump);
        assert_eq!(
            found.missing,
            vec!["route 10.244.1.0/24 via 10.244.1.0 dev weft.1 onlink"]
        );
        assert_eq!(
            found.excess,
            vec![
                "route 10.244.9.0/24 via 10.244.9.0 dev weft.1 onlink",
                "route unreachable 10.244.8.0/24",
            ]
        );
    }

    #[test]
    fn a_value_replaced_in_place_is_missing_new_and_in_excess_old() {
        let desired = desired(Backend::Vxlan);
        let mut dump = dump_of(&desired);
        for neighbour in &mut dump.owned.neighbours {
            if neighbour.ip == ip("10.244.2.0") {
                neighbour.mac = mac(7);
            }
        }
        for route in &mut dump.owned.routes {
            if route.destination == net("10.244.1.0/24") {
                route.next_hop = NextHop::Underlay(ip("172.31.0.11"));
            }
        }
        let found = check(&desired, &dump);
        assert_eq!(
            found.missing,
            vec![
                "neighbour 10.244.2.0 lladdr 0a:58:00:00:00:02 dev weft.1",
                "route 10.244.1.0/24 via 10.244.1.0 dev weft.1 onlink",
            ]
        );
        assert_eq!(
            found.excess,
            vec![
                "neighbour 10.244.2.0 lladdr 0a:58:00:00:00:07 dev weft.1",
                "route 10.244.1.0/24 via 172.31.0.11",
            ]
        );
    }

    #[test]
    fn held_entries_are_neither_missing_nor_in_excess() {
        let desired = desired(Backend::Vxlan);
        let mut plan = plan_routes(&desired, &own(), &Dump::default());
        // As the reconcile holds node-c while it waits for its retry.
        plan.operations.retain(|operation| match operation {
            Operation::SetNeighbour(n) => n.mac != mac(2),
            Operation::SetFdb(f) => f.mac != mac(2),
            Operation::SetRoute(r) => r.destination != net("10.244.2.0/24"),
            Operation::SetReturnRoute(r) => r.vtep != ip("10.244.2.0"),
            _ => true,
        });
        let found = drift(&Dump::default(), &plan);
        assert!(
            !found.missing.iter().any(|line| line.contains("10.244.2.0")),
            "{:?}",
            found.missing
        );
        // node-b's four entries, the unreachable route and the rule.
        assert_eq!(found.missing.len(), 6, "{:?}", found.missing);
    }

    /// The standing of `name` among [`peers`] (both accepted) and a
    /// rejected node-d, with node-c held for `held`.
    fn standing(
        name: &str,
        desired: &DesiredState,
        dump: &Dump,
        held: Option<&str>,
    ) -> PeerEntries {
        let peers = peers();
        let screened = Screened {
            accepted: peers.iter().collect(),
            rejected: vec![Rejected {
                node_name: "node-d".into(),
                reason: Rejection::OwnPublicIp(ip("172.31.0.10")),
            }],
        };
        let held_reason = |peer: &Peer| {
            held.filter(|_| peer.node_name == "node-c")
                .map(String::from)
        };
        peer_standing(name, &screened, held_reason, desired, dump)
    }

    fn lines(entries: &PeerEntries) -> Vec<(&str, bool)> {
        entries
            .entries
            .iter()
            .map(|entry| (entry.entry.as_str(), entry.held))
            .collect()
    }

    #[test]
    fn a_peers_entries_are_listed_in_the_checks_words_with_what_the_kernel_holds() {
        let desired = desired(Backend::Vxlan);
        let mut dump = dump_of(&desired);
        let healthy = standing("node-c", &desired, &dump, None);
        assert_eq!(
            (healthy.state.as_str(), healthy.reason.as_deref()),
            ("accepted", None)
        );
        assert_eq!(
            lines(&healthy),
            vec![
                (
                    "neighbour 10.244.2.0 lladdr 0a:58:00:00:00:02 dev weft.1",
                    true
                ),
                ("fdb 0a:58:00:00:00:02 dst 172.31.1.12 dev weft.1", true),
                ("route 10.244.2.0/24 via 10.244.2.0 dev weft.1 onlink", true),
                (
                    "route 172.31.1.12 via 10.244.2.0 dev weft.1 onlink table 8787",
                    true
                ),
            ]
        );
        dump.owned
            .routes
            .retain(|r| r.destination != net("10.244.2.0/24"));
        let found = standing("node-c", &desired, &dump, None);
        let route = &found.entries[2];
        assert!(!route.held, "{found:?}");
        // The same words as the check's own list, so the two can be matched.
        assert!(check(&desired, &dump).missing.contains(&route.entry));
        // Nothing of node-b's is listed for node-c.
        assert!(found
            .entries
            .iter()
            .all(|e| !e.entry.contains("10.244.1.0")));
    }

    #[test]
    fn held_rejected_and_unknown_peers_say_why() {
        let desired = desired(Backend::Vxlan);
        let dump = Dump::default();
        let held = standing("node-c", &desired, &dump, Some("route conflict: …"));
        assert_eq!(
            (held.state.as_str(), held.reason.as_deref()),
            ("held", Some("route conflict: …"))
        );
        assert_eq!(held.entries.len(), 4);
        assert!(held.entries.iter().all(|entry| !entry.held));
        let rejected = standing("node-d", &desired, &dump, None);
        assert_eq!(rejected.state, "rejected");
        assert_eq!(
            rejected.reason.as_deref(),
            Some("weft.dev/public-ip: 172.31.0.10 is this node's address")
        );
        assert!(rejected.entries.is_empty());
        let unknown = standing("node-z", &desired, &dump, None);
        assert_eq!(unknown.state, "unknown");
        assert!(unknown.reason.unwrap().contains("no Node node-z"));
    }

    #[test]
    fn a_host_gw_peer_off_the_subnet_is_accepted_with_no_entries_and_says_why() {
        let desired = desired(Backend::HostGw);
        let dump = dump_of(&desired);
        let routed = standing("node-c", &desired, &dump, None);
        assert_eq!(routed.state, "accepted");
        assert!(routed.entries.is_empty());
        let reason = routed.reason.unwrap();
        assert!(
            reason.starts_with("slice 10.244.2.0/24 gets no entries: host-gw"),
            "{reason}"
        );
        let direct = standing("node-b", &desired, &dump, None);
        assert_eq!(
            lines(&direct),
            vec![("route 10.244.1.0/24 via 172.31.0.11", true)]
        );
    }

    #[test]
    fn return_routes_and_rules_report_drift_in_ip_words() {
        let desired = desired(Backend::Vxlan);
        let mut dump = dump_of(&desired);
        // A return route moved to another VTEP, and a rule of Weft's of an
        // older shape.
        for route in &mut dump.owned.return_routes {
            if route.node_ip == ip("172.31.0.11") {
                route.vtep = ip("10.244.7.0");
            }
        }
        let stale = weft_core::netlink::Rule {
            priority: 1000,
            ..return_rule(net("10.244.0.0/24"))
        };
        dump.rules.push(stale);
        let found = check(&desired, &dump);
        assert_eq!(
            found.missing,
            vec!["route 172.31.0.11 via 10.244.1.0 dev weft.1 onlink table 8787"]
        );
        assert_eq!(
            found.excess,
            vec![
                "route 172.31.0.11 via 10.244.7.0 dev weft.1 onlink table 8787",
                "rule from 10.244.0.0/24 fwmark 0x10000000/0x10000000 lookup 8787 pref 1000",
            ]
        );
    }
}
