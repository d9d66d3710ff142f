//! The kernel side of the agent: the `weft.1` device, dumps of what Weft
//! owns, and applying a plan through netlink.
//!
//! The one path by which the agent changes neighbours, FDB entries and
//! routes: [`Dataplane::reconcile_holding`] dumps, plans ([`plan_routes`]
//! over [`super::overlay::plan`]) and applies, for the peers and this
//! node's slices on every reconcile, and with an empty desired state when
//! uninstall empties the node ([`super::uninstall`]).
//!
//! Routes: Weft replaces or deletes only routes with [`ROUTE_PROTOCOL`],
//! the ones its dump shows as its own; any other route it wants is created
//! exclusively (EEXIST leaves what is there). A destination the main table
//! already routes with someone else's route (a kernel route of a bridge, an
//! operator's blackhole) is a [`RouteConflict`]: that route stays, Weft adds
//! none beside it, and the caller holds the entries that need it until the
//! other route is gone, checked again on every reconcile.
//!
//! This node's slices get an `unreachable` route ([`OwnSlices`]): a packet
//! for a pod address no pod holds stops here instead of following the
//! default route out of the node. The plugin's pod routes (/32, /128) are
//! more specific.
//!
//! With the tunnel, replies to a peer's own connections through it go back
//! the same way (docs/host-traffic.md): the return routes of the overlay's
//! plan live in [`RETURN_TABLE`], which one rule per own slice of the
//! underlay's family ([`return_rule`]) has looked up for packets carrying
//! [`HOST_RETURN_MARK`]. The table is Weft's alone: its routes are replaced
//! in place. Rules, like routes, are Weft's when they carry
//! [`ROUTE_PROTOCOL`], and only those are ever removed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::mem;
use std::net::IpAddr;

use futures::StreamExt;
use ipnet::IpNet;

use super::config::AgentConfig;
use super::masquerade::HOST_RETURN_MARK;
use super::node::{check_own_slices, NodeAddress, OwnNode, OwnSliceError};
use super::overlay::{
    plan, DesiredState, FdbEntry, KernelState, Neighbour, NextHop, Operation, OverlayRoute,
    ReturnRoute,
};
use super::peer::Peer;
use super::ROUTE_PROTOCOL;
use weft_core::annotations::VtepMac;
use weft_core::ip::IpFamily;
use weft_core::netlink::{
    FdbRemote, FwMark, Link, Netlink, NetlinkError, Outcome, PermanentNeighbour, Removal, Route,
    RouteProtocol, RouteType, Rule, VxlanChange, VxlanSettings,
};
use weft_core::DEFAULT_BRIDGE;

/// The name of Weft's VXLAN device.
pub const VXLAN_DEVICE: &str = "weft.1";

/// The routing table of the return routes: a peer's node address through
/// the tunnel. Clear of `main`, `local` and `default` (254, 255, 253) and
/// of the low numbers other network add-ons take (1 to 250 for Calico's
/// and kube-router's, per-interface tables of cloud CNIs, 200 and 2004 to
/// 2005 for Cilium's).
pub const RETURN_TABLE: u32 = 8787;

/// The priority of the return rules: after `local` (0), before `main`
/// (32766), where the rule is asked for every packet that does not go to
/// this node itself. It matches only packets with [`HOST_RETURN_MARK`].
pub const RETURN_RULE_PRIORITY: u32 = 87;

/// The rule that sends the replies from `slice` (one of this node's) that
/// carry [`HOST_RETURN_MARK`] to [`RETURN_TABLE`].
pub fn return_rule(slice: IpNet) -> Rule {
    Rule {
        family: IpFamily::of(&slice),
        priority: RETURN_RULE_PRIORITY,
        source: Some(slice.trunc()),
        mark: Some(FwMark {
            value: HOST_RETURN_MARK,
            mask: HOST_RETURN_MARK,
        }),
        table: RETURN_TABLE,
        protocol: RouteProtocol::from(ROUTE_PROTOCOL),
    }
}

/// Requests one run of [`Dataplane::apply`] keeps awaiting their answers on
/// the node's netlink socket. The kernel carries out each as it arrives;
/// having many sent saves a round trip through the socket per change
/// (5,000 peers are 15,000 changes), and this many answers stay well within
/// the socket's receive buffer.
const IN_FLIGHT: usize = 32;

/// Why the data plane could not be read or set up.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The plan needs the VXLAN device but there is none (host-gw mode, or
    /// `ensure_vtep` was not called).
    #[error("{operation:?} needs the {VXLAN_DEVICE} device, which is not set up; use backend vxlan or direct for peers beyond the underlay subnet")]
    NoVxlanDevice {
        /// The operation that needed it.
        operation: Operation,
    },
    /// This node's slice annotation is refused.
    #[error(transparent)]
    OwnSlice(#[from] OwnSliceError),
}

/// The settings of this node's tunnel endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vtep {
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// The node's underlay address (tunnel source).
    pub local: IpAddr,
    /// The underlay link index.
    pub underlay_index: u32,
    /// The device MAC, stable for the node's life.
    pub mac: VtepMac,
    /// The device MTU.
    pub mtu: u32,
    /// The VTEP addresses: each own slice's network address as /32 or /128.
    pub addresses: Vec<IpNet>,
}

/// What applying a plan did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Operations the kernel accepted (including deletes of entries that
    /// were already gone).
    pub applied: Vec<Operation>,
    /// Operations the kernel refused; the next reconcile retries them.
    pub failed: Vec<(Operation, NetlinkError)>,
    /// Routes not attempted because their neighbour or FDB entry failed: a
    /// route through an unresolvable VTEP would blackhole the slice.
    pub held_back: Vec<Operation>,
    /// Destinations Weft wants that someone else's route holds: the plan's
    /// conflicts, then the routes the kernel refused to add beside one that
    /// appeared after the dump.
    pub conflicts: Vec<RouteConflict>,
    /// The changes made to this node's `unreachable` slice routes.
    pub own_slices: Vec<OwnSliceChange>,
    /// The changes made to the return rules.
    pub rules: Vec<RuleChange>,
}

/// A route in the main table that is not Weft's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignRoute {
    /// Who made it (`proto` in `ip route`).
    pub protocol: RouteProtocol,
    /// Its type: unicast, blackhole, unreachable, …
    pub kind: RouteType,
}

impl fmt::Display for ForeignRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = format!("{:?}", self.kind).to_lowercase();
        write!(
            f,
            "a {kind} route of proto {} ({})",
            self.protocol,
            u8::from(self.protocol)
        )
    }
}

/// A destination Weft wants to route that the main table already routes
/// with another owner's route. That route is left as it is, Weft adds no
/// route beside it, and the entries that need the destination (the peer's
/// neighbour, FDB entry and routes) are held until the route is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteConflict {
    /// A peer's slice or one of this node's.
    pub destination: IpNet,
    /// The other route as the dump showed it; `None` when only the kernel
    /// told of it, refusing to add Weft's route beside one that appeared
    /// after the dump.
    pub foreign: Option<ForeignRoute>,
}

impl RouteConflict {
    /// Whether the destination is one of `peer`'s slices.
    pub fn concerns(&self, peer: &Peer) -> bool {
        peer.pod_cidrs
            .iter()
            .any(|slice| slice.trunc() == self.destination)
    }
}

impl fmt::Display for RouteConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.foreign {
            Some(foreign) => write!(f, "{} is already routed by {foreign}", self.destination),
            None => write!(
                f,
                "{} is already routed: the kernel refused to add Weft's route beside another",
                self.destination
            ),
        }
    }
}

/// This node's slices once they passed [`check_own_slices`] (see
/// [`Dataplane::check_own_slices`]); each gets an `unreachable` route with
/// [`ROUTE_PROTOCOL`]. The default, no slices, removes those routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnSlices(Vec<IpNet>);

impl OwnSlices {
    /// The slices.
    pub fn slices(&self) -> &[IpNet] {
        &self.0
    }

    /// Slices taken as they are, without [`check_own_slices`]: for unit
    /// tests of what plans from them.
    #[cfg(test)]
    pub(crate) fn unchecked(slices: Vec<IpNet>) -> Self {
        OwnSlices(slices)
    }
}

/// A change to the `unreachable` route of one of this node's slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnSliceChange {
    /// Create it (or turn Weft's route to the slice into it).
    Set(IpNet),
    /// Remove it: the slice is no longer this node's.
    Delete(IpNet),
}

/// A change to one of Weft's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleChange {
    /// Add it.
    Add(Rule),
    /// Remove it: not wanted, or not as wanted.
    Delete(Rule),
}

/// What a dump of the main table and of `weft.1` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dump {
    /// Weft's neighbours, FDB entries and peer routes, which the overlay
    /// plans from.
    pub owned: KernelState,
    /// Slices with Weft's `unreachable` route.
    pub own_slices: BTreeSet<IpNet>,
    /// The destinations of every route with [`ROUTE_PROTOCOL`], of any type
    /// and next hop: the only routes Weft replaces.
    pub owned_destinations: BTreeSet<IpNet>,
    /// Per destination, a route of another owner (the first the dump met).
    pub foreign: BTreeMap<IpNet, ForeignRoute>,
    /// The rules with [`ROUTE_PROTOCOL`], of both families.
    pub rules: Vec<Rule>,
}

/// Every change one reconcile makes, decided from a dump by
/// [`plan_routes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// This node's `unreachable` slice routes, changed first.
    pub own_slices: Vec<OwnSliceChange>,
    /// The return rules, changed next: added ahead of the return routes
    /// they lead to, removed ahead of them too (a rule whose table lacks a
    /// route lets the lookup go on to `main`).
    pub rules: Vec<RuleChange>,
    /// The overlay's operations, in the overlay's order, without routes to
    /// a conflicting destination.
    pub operations: Vec<Operation>,
    /// Wanted destinations that another owner's route holds.
    pub conflicts: Vec<RouteConflict>,
    /// Destinations whose route is Weft's, which a set replaces in place; a
    /// route to any other destination is created exclusively, so one that
    /// appeared after the dump is never overwritten.
    pub replaceable: BTreeSet<IpNet>,
}

/// The plan that takes the kernel from `dump` to `desired` and `own`: the
/// overlay's operations ([`plan`]), the own-slice routes and the return
/// rules ([`return_rule`] of each of [`DesiredState::return_sources`]),
/// leaving out every route whose destination another owner's route holds
/// (reported as [`RoutePlan::conflicts`]).
///
/// A slice that changes hands between this node and a peer keeps one route
/// throughout: Weft's route to it is replaced in place (unreachable to via
/// the peer, or back), never deleted first.
pub fn plan_routes(desired: &DesiredState, own: &OwnSlices, dump: &Dump) -> RoutePlan {
    let taken = |destination: &IpNet| dump.foreign.contains_key(destination);
    let conflicts = own
        .slices()
        .iter()
        .chain(desired.routes.keys())
        .filter_map(|&destination| {
            dump.foreign
                .get(&destination)
                .map(|&foreign| RouteConflict {
                    destination,
                    foreign: Some(foreign),
                })
        })
        .collect();
    let mut operations = plan(desired, &dump.owned);
    operations.retain(
        |operation| !matches!(operation, Operation::SetRoute(route) if taken(&route.destination)),
    );
    let wanted: BTreeSet<IpNet> = own.slices().iter().copied().collect();
    let mut own_slices: Vec<OwnSliceChange> = wanted
        .iter()
        .filter(|slice| !dump.own_slices.contains(slice) && !taken(slice))
        .map(|&slice| OwnSliceChange::Set(slice))
        .collect();
    // A former slice now a peer's is replaced in place by the peer's route;
    // deleting it as well could remove that route (an IPv6 delete does not
    // match on the route type).
    own_slices.extend(
        dump.own_slices
            .iter()
            .filter(|slice| !wanted.contains(slice) && !desired.routes.contains_key(slice))
            .map(|&slice| OwnSliceChange::Delete(slice)),
    );
    RoutePlan {
        own_slices,
        rules: plan_rules(desired, dump),
        operations,
        conflicts,
        replaceable: dump.owned_destinations.clone(),
    }
}

/// The rule changes that leave exactly the return rules of `desired`.
fn plan_rules(desired: &DesiredState, dump: &Dump) -> Vec<RuleChange> {
    let wanted: Vec<Rule> = desired
        .return_sources
        .iter()
        .map(|&slice| return_rule(slice))
        .collect();
    let add = wanted
        .iter()
        .filter(|rule| !dump.rules.contains(rule))
        .map(|&rule| RuleChange::Add(rule));
    let delete = dump
        .rules
        .iter()
        .filter(|rule| !wanted.contains(rule))
        .map(|&rule| RuleChange::Delete(rule));
    add.chain(delete).collect()
}

/// What one route set found.
enum RouteSet {
    Done,
    /// The kernel already has a route to the destination (EEXIST).
    Taken,
}

/// The data plane of one network namespace.
#[derive(Debug, Clone)]
pub struct Dataplane {
    netlink: Netlink,
    vxlan_index: Option<u32>,
}

impl Dataplane {
    /// A data plane driven through `netlink`; no device known yet.
    pub fn new(netlink: Netlink) -> Self {
        Dataplane {
            netlink,
            vxlan_index: None,
        }
    }

    /// The netlink socket in use.
    pub fn netlink(&self) -> &Netlink {
        &self.netlink
    }

    /// Makes `weft.1` match `vtep` (reused when equal, recreated when not)
    /// with exactly the VTEP addresses.
    pub async fn ensure_vtep(&mut self, vtep: &Vtep) -> Result<VxlanChange, DataplaneError> {
        let settings = VxlanSettings {
            name: VXLAN_DEVICE.to_string(),
            vni: vtep.vni,
            port: vtep.port,
            local: vtep.local,
            underlay_index: vtep.underlay_index,
            mac: vtep.mac.octets(),
            mtu: vtep.mtu,
        };
        let (link, change) = self.netlink.ensure_vxlan(&settings).await?;
        self.netlink
            .set_exact_addresses(link.index, &vtep.addresses)
            .await?;
        // Replies routed back into the tunnel by their mark pass a strict
        // reverse-path check only if it sees the mark too.
        self.netlink.set_src_valid_mark(link.index).await?;
        self.vxlan_index = Some(link.index);
        Ok(change)
    }

    /// Removes `weft.1` (host-gw mode after an earlier vxlan run). Its
    /// neighbours, FDB entries and routes go with it.
    pub async fn remove_vtep(&mut self) -> Result<Removal, DataplaneError> {
        self.vxlan_index = None;
        Ok(self.netlink.delete_link_by_name(VXLAN_DEVICE).await?)
    }

    /// Takes an existing `weft.1` as it is, without changing it, so that
    /// [`Dataplane::dump`] and [`Dataplane::apply`] reach its neighbours
    /// and FDB entries: how uninstall empties a device it did not set up.
    /// Without such a VXLAN device only routes are reached.
    pub async fn adopt_vtep(&mut self) -> Result<(), DataplaneError> {
        self.vxlan_index = self.existing_vtep().await?.map(|l| l.index);
        Ok(())
    }

    /// `weft.1`, if it exists and is a VXLAN device: a link of another kind
    /// under that name is not Weft's.
    async fn existing_vtep(&self) -> Result<Option<Link>, DataplaneError> {
        let link = self.netlink.link_by_name(VXLAN_DEVICE).await?;
        Ok(link.filter(|l| l.kind.as_deref() == Some("vxlan")))
    }

    /// This node's slices from `own`, checked by [`check_own_slices`]
    /// against the agent's settings and this node's addresses (read here;
    /// those of `weft.1` and of the bridge earlier releases used are Weft's
    /// own and left out). Nothing may be programmed from a refused slice.
    pub async fn check_own_slices(
        &self,
        config: &AgentConfig,
        node: &str,
        own: &OwnNode,
    ) -> Result<OwnSlices, DataplaneError> {
        let links = self.netlink.links().await?;
        let addresses = self
            .netlink
            .addresses(None)
            .await?
            .into_iter()
            .filter_map(|address| {
                let link = links.iter().find(|l| l.index == address.link_index)?;
                (link.name != VXLAN_DEVICE && link.name != DEFAULT_BRIDGE).then(|| NodeAddress {
                    link: link.name.clone(),
                    address: address.address,
                })
            })
            .collect::<Vec<_>>();
        let slices = check_own_slices(node, own, config, &addresses)?;
        Ok(OwnSlices(slices))
    }

    /// Dumps what bears on Weft's entries: permanent neighbours and FDB
    /// remotes on `weft.1`, the main table's routes, Weft's (those with
    /// [`ROUTE_PROTOCOL`]) and the others', and Weft's routes of
    /// [`RETURN_TABLE`] and rules.
    pub async fn dump(&self) -> Result<Dump, DataplaneError> {
        let mut dump = Dump::default();
        let state = &mut dump.owned;
        if let Some(index) = self.vxlan_index {
            state.neighbours = self
                .netlink
                .permanent_neighbours(index)
                .await?
                .into_iter()
                .map(|n| Neighbour {
                    ip: n.ip,
                    mac: VtepMac::new(n.mac),
                })
                .collect();
            state.fdb = self
                .netlink
                .fdb_remotes(index)
                .await?
                .into_iter()
                .map(|f| FdbEntry {
                    mac: VtepMac::new(f.mac),
                    remote: f.remote,
                })
                .collect();
        }
        for family in [IpFamily::V4, IpFamily::V6] {
            for route in self.netlink.routes(family, Route::MAIN_TABLE).await? {
                if route.protocol != RouteProtocol::from(ROUTE_PROTOCOL) {
                    dump.foreign
                        .entry(route.destination)
                        .or_insert(ForeignRoute {
                            protocol: route.protocol,
                            kind: route.kind,
                        });
                    continue;
                }
                dump.owned_destinations.insert(route.destination);
                match (route.kind, route.gateway) {
                    (RouteType::Unreachable, _) => {
                        dump.own_slices.insert(route.destination);
                    }
                    (RouteType::Unicast, Some(gateway)) => {
                        let next_hop = match (self.vxlan_index, route.output_interface) {
                            (Some(vxlan), Some(oif)) if vxlan == oif => NextHop::Vtep(gateway),
                            _ => NextHop::Underlay(gateway),
                        };
                        dump.owned.routes.push(OverlayRoute {
                            destination: route.destination,
                            next_hop,
                        });
                    }
                    // Weft makes no other route; one with its protocol
                    // number is left alone rather than guessed at.
                    _ => {}
                }
            }
            dump.owned.return_routes.extend(
                self.netlink
                    .routes(family, RETURN_TABLE)
                    .await?
                    .into_iter()
                    .filter(|route| route.protocol == RouteProtocol::from(ROUTE_PROTOCOL))
                    .filter_map(|route| {
                        Some(ReturnRoute {
                            node_ip: route.destination.addr(),
                            vtep: route.gateway?,
                        })
                    }),
            );
            dump.rules.extend(
                self.netlink
                    .rules(family)
                    .await?
                    .into_iter()
                    .filter(|rule| rule.protocol == RouteProtocol::from(ROUTE_PROTOCOL)),
            );
        }
        Ok(dump)
    }

    /// Dumps, plans and applies: one reconcile of the kernel against
    /// `desired`, with no slices of this node's (so their routes go, as
    /// uninstall wants).
    pub async fn reconcile(&self, desired: &DesiredState) -> Result<ApplyReport, DataplaneError> {
        self.reconcile_holding(desired, &OwnSlices::default(), |_| |_: &Operation| false)
            .await
    }

    /// One reconcile of the kernel against `desired` and this node's slices
    /// `own`, leaving out the operations that `hold` picks once it has seen
    /// the plan's conflicts: their entries stay as the kernel has them (a
    /// peer whose slice another owner's route holds, or one the kernel keeps
    /// refusing, waiting out its backoff).
    pub async fn reconcile_holding<H>(
        &self,
        desired: &DesiredState,
        own: &OwnSlices,
        hold: impl FnOnce(&[RouteConflict]) -> H,
    ) -> Result<ApplyReport, DataplaneError>
    where
        H: Fn(&Operation) -> bool,
    {
        let (_, plan) = self.plan_holding(desired, own, hold).await?;
        self.apply(&plan).await
    }

    /// Dumps and plans as [`Dataplane::reconcile_holding`] does, without
    /// applying: the plan, and the dump it was made from. What a reconcile
    /// would change now (see [`super::kernel_check`]).
    pub async fn plan_holding<H>(
        &self,
        desired: &DesiredState,
        own: &OwnSlices,
        hold: impl FnOnce(&[RouteConflict]) -> H,
    ) -> Result<(Dump, RoutePlan), DataplaneError>
    where
        H: Fn(&Operation) -> bool,
    {
        let dump = self.dump().await?;
        let mut plan = plan_routes(desired, own, &dump);
        let hold = hold(&plan.conflicts);
        plan.operations.retain(|operation| !hold(operation));
        Ok((dump, plan))
    }

    /// Applies a plan: this node's slice routes and the return rules (a
    /// failure there fails the whole apply, as node set-up does), then the
    /// operations in order. A failed operation does not stop the others,
    /// except that routes through a VTEP whose neighbour or FDB entry
    /// failed are held back.
    ///
    /// Consecutive operations of one kind (as [`plan`] groups them: set
    /// neighbours, FDB entries, routes, then delete routes, FDB entries,
    /// neighbours) touch distinct kernel entries, so each such run goes out
    /// with up to `IN_FLIGHT` requests awaiting their answers; a run starts
    /// only once the one before it is answered, which keeps neighbour, FDB
    /// entry, route in that order, and removal in reverse.
    pub async fn apply(&self, plan: &RoutePlan) -> Result<ApplyReport, DataplaneError> {
        let mut report = ApplyReport {
            conflicts: plan.conflicts.clone(),
            ..ApplyReport::default()
        };
        for &change in &plan.own_slices {
            match self.apply_own_slice(change, &plan.replaceable).await? {
                RouteSet::Done => report.own_slices.push(change),
                RouteSet::Taken => report.conflicts.push(RouteConflict {
                    destination: own_slice(change),
                    foreign: None,
                }),
            }
        }
        for &change in &plan.rules {
            match change {
                RuleChange::Add(rule) => self.netlink.add_rule(&rule).await.map(drop)?,
                RuleChange::Delete(rule) => self.netlink.delete_rule(&rule).await.map(drop)?,
            }
            report.rules.push(change);
        }
        let operations = plan.operations.as_slice();
        // VTEP addresses whose neighbour, or whose MAC's FDB entry, could
        // not be set: a route through them would lead nowhere.
        let mut broken_vteps: HashSet<IpAddr> = HashSet::new();
        for run in operations.chunk_by(|a, b| mem::discriminant(a) == mem::discriminant(b)) {
            let (held_back, ready): (Vec<Operation>, Vec<Operation>) =
                run.iter().partition(|operation| match operation {
                    Operation::SetRoute(OverlayRoute {
                        next_hop: NextHop::Vtep(vtep),
                        ..
                    })
                    | Operation::SetReturnRoute(ReturnRoute { vtep, .. }) => {
                        broken_vteps.contains(vtep)
                    }
                    _ => false,
                });
            report.held_back.extend(held_back);
            let outcomes: Vec<_> = futures::stream::iter(ready)
                .map(|operation| async move {
                    let outcome = self.apply_one(operation, &plan.replaceable).await;
                    (operation, outcome)
                })
                .buffered(IN_FLIGHT)
                .collect()
                .await;
            let mut broken_macs: HashSet<VtepMac> = HashSet::new();
            for (operation, outcome) in outcomes {
                match outcome {
                    Ok(RouteSet::Done) => report.applied.push(operation),
                    Ok(RouteSet::Taken) => {
                        if let Operation::SetRoute(route) = operation {
                            report.conflicts.push(RouteConflict {
                                destination: route.destination,
                                foreign: None,
                            });
                        }
                    }
                    Err(DataplaneError::Netlink(error)) => {
                        match operation {
                            Operation::SetNeighbour(n) => {
                                broken_vteps.insert(n.ip);
                            }
                            Operation::SetFdb(f) => {
                                broken_macs.insert(f.mac);
                            }
                            _ => {}
                        }
                        report.failed.push((operation, error));
                    }
                    Err(other) => return Err(other),
                }
            }
            if !broken_macs.is_empty() {
                broken_vteps.extend(operations.iter().filter_map(|operation| match operation {
                    Operation::SetNeighbour(n) if broken_macs.contains(&n.mac) => Some(n.ip),
                    _ => None,
                }));
            }
        }
        Ok(report)
    }

    async fn apply_own_slice(
        &self,
        change: OwnSliceChange,
        replaceable: &BTreeSet<IpNet>,
    ) -> Result<RouteSet, DataplaneError> {
        let route = Route {
            kind: RouteType::Unreachable,
            protocol: RouteProtocol::from(ROUTE_PROTOCOL),
            ..Route::new(own_slice(change))
        };
        Ok(match change {
            OwnSliceChange::Set(_) => self.set_route(&route, replaceable).await?,
            OwnSliceChange::Delete(_) => {
                self.netlink.delete_route(&route).await?;
                RouteSet::Done
            }
        })
    }

    /// Replaces the route if its destination has Weft's route, else creates
    /// it exclusively: another owner's route is never overwritten.
    async fn set_route(
        &self,
        route: &Route,
        replaceable: &BTreeSet<IpNet>,
    ) -> Result<RouteSet, NetlinkError> {
        if replaceable.contains(&route.destination) {
            self.netlink.replace_route(route).await?;
            return Ok(RouteSet::Done);
        }
        Ok(match self.netlink.add_route(route).await? {
            Outcome::Created => RouteSet::Done,
            Outcome::AlreadyPresent => RouteSet::Taken,
        })
    }

    async fn apply_one(
        &self,
        operation: Operation,
        replaceable: &BTreeSet<IpNet>,
    ) -> Result<RouteSet, DataplaneError> {
        let vxlan = || {
            self.vxlan_index
                .ok_or(DataplaneError::NoVxlanDevice { operation })
        };
        match operation {
            Operation::SetNeighbour(n) => {
                self.netlink
                    .replace_neighbour(&permanent_neighbour(vxlan()?, n))
                    .await?;
            }
            Operation::SetFdb(f) => self.netlink.replace_fdb(&fdb_remote(vxlan()?, f)).await?,
            Operation::SetRoute(r) => {
                return Ok(self.set_route(&self.kernel_route(r)?, replaceable).await?);
            }
            Operation::SetReturnRoute(r) => {
                let route = Route {
                    output_interface: Some(vxlan()?),
                    // As a peer route: the VTEP address is on no subnet.
                    onlink: true,
                    ..return_route(r)
                };
                self.netlink.replace_route(&route).await?;
            }
            Operation::DeleteReturnRoute(r) => {
                // Without the device: a route left after it went is Weft's
                // all the same, and the gateway tells it apart.
                self.netlink.delete_route(&return_route(r)).await?;
            }
            Operation::DeleteRoute(r) => {
                self.netlink.delete_route(&self.kernel_route(r)?).await?;
            }
            Operation::DeleteFdb(f) => {
                self.netlink.delete_fdb(&fdb_remote(vxlan()?, f)).await?;
            }
            Operation::DeleteNeighbour(n) => {
                self.netlink
                    .delete_neighbour(&permanent_neighbour(vxlan()?, n))
                    .await?;
            }
        }
        Ok(RouteSet::Done)
    }

    fn kernel_route(&self, route: OverlayRoute) -> Result<Route, DataplaneError> {
        let base = Route {
            protocol: RouteProtocol::from(ROUTE_PROTOCOL),
            ..Route::new(route.destination)
        };
        Ok(match route.next_hop {
            NextHop::Vtep(vtep) => Route {
                gateway: Some(vtep),
                output_interface: Some(self.vxlan_index.ok_or(DataplaneError::NoVxlanDevice {
                    operation: Operation::SetRoute(route),
                })?),
                // The VTEP address is not on any local subnet: onlink tells
                // the kernel it is directly reachable through weft.1.
                onlink: true,
                ..base
            },
            NextHop::Underlay(gateway) => Route {
                gateway: Some(gateway),
                ..base
            },
        })
    }
}

fn own_slice(change: OwnSliceChange) -> IpNet {
    match change {
        OwnSliceChange::Set(slice) | OwnSliceChange::Delete(slice) => slice,
    }
}

/// `route`'s destination, next hop, table and protocol.
fn return_route(route: ReturnRoute) -> Route {
    Route {
        gateway: Some(route.vtep),
        table: RETURN_TABLE,
        protocol: RouteProtocol::from(ROUTE_PROTOCOL),
        ..Route::new(IpNet::from(route.node_ip))
    }
}

fn permanent_neighbour(link_index: u32, neighbour: Neighbour) -> PermanentNeighbour {
    PermanentNeighbour {
        link_index,
        ip: neighbour.ip,
        mac: neighbour.mac.octets(),
    }
}

fn fdb_remote(link_index: u32, entry: FdbEntry) -> FdbRemote {
    FdbRemote {
        link_index,
        mac: entry.mac.octets(),
        remote: entry.remote,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;
    use crate::overlay::desired_state;
    use crate::peer::LocalNode;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn peer(name: &str, slices: &[&str], public_ip: &str, mac: u8) -> Peer {
        Peer {
            node_name: name.into(),
            pod_cidrs: slices.iter().map(|s| net(s)).collect(),
            public_ip: public_ip.parse().unwrap(),
            vtep_mac: Some(VtepMac::new([0x0a, 0x58, 0, 0, 0, mac])),
            created: 0,
            malformed: None,
        }
    }

    /// This node with 10.244.0.0/24; node-b (dual-stack) and node-c as
    /// peers over vxlan.
    fn desired() -> DesiredState {
        let local = LocalNode {
            name: "node-a".into(),
            pod_cidrs: vec![net("10.244.0.0/24")],
            underlay: net("172.31.0.10/24"),
        };
        let peers = [
            peer(
                "node-b",
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
                "172.31.0.11",
                1,
            ),
            peer("node-c", &["10.244.2.0/24"], "172.31.0.12", 2),
        ];
        desired_state(Backend::Vxlan, &local, &peers)
    }

    fn own() -> OwnSlices {
        OwnSlices(vec![net("10.244.0.0/24")])
    }

    fn foreign(protocol: RouteProtocol, kind: RouteType) -> ForeignRoute {
        ForeignRoute { protocol, kind }
    }

    fn set_routes(plan: &RoutePlan) -> Vec<IpNet> {
        plan.operations
            .iter()
            .filter_map(|operation| match operation {
                Operation::SetRoute(route) => Some(route.destination),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_empty_node_gets_its_unreachable_slice_and_every_peer() {
        let plan = plan_routes(&desired(), &own(), &Dump::default());
        assert_eq!(
            plan.own_slices,
            vec![OwnSliceChange::Set(net("10.244.0.0/24"))]
        );
        assert_eq!(set_routes(&plan).len(), 3);
        assert!(plan.conflicts.is_empty());
        // Nothing is Weft's yet: every route is created exclusively.
        assert!(plan.replaceable.is_empty());
    }

    #[test]
    fn another_owners_route_is_a_conflict_and_gets_no_route_beside_it() {
        let blackhole = foreign(RouteProtocol::Static, RouteType::BlackHole);
        let bridge = foreign(RouteProtocol::Kernel, RouteType::Unicast);
        let dump = Dump {
            foreign: BTreeMap::from([
                (net("10.244.1.0/24"), blackhole),
                (net("10.244.0.0/24"), bridge),
                // Not a wanted destination: no conflict.
                (net("10.244.0.0/16"), bridge),
            ]),
            ..Dump::default()
        };
        let plan = plan_routes(&desired(), &own(), &dump);
        assert_eq!(
            plan.conflicts,
            vec![
                RouteConflict {
                    destination: net("10.244.0.0/24"),
                    foreign: Some(bridge),
                },
                RouteConflict {
                    destination: net("10.244.1.0/24"),
                    foreign: Some(blackhole),
                },
            ]
        );
        assert!(plan.own_slices.is_empty(), "{:?}", plan.own_slices);
        assert_eq!(
            set_routes(&plan),
            vec![net("10.244.2.0/24"), net("fd00:10:244:1::/64")]
        );
        // node-b's neighbour and FDB entry stay in the plan: holding the
        // whole peer is the caller's choice (see RouteConflict::concerns).
        assert!(plan
            .operations
            .contains(&Operation::SetNeighbour(Neighbour {
                ip: "10.244.1.0".parse().unwrap(),
                mac: VtepMac::new([0x0a, 0x58, 0, 0, 0, 1]),
            })));
        let b = peer("node-b", &["10.244.1.0/24"], "172.31.0.11", 1);
        let c = peer("node-c", &["10.244.2.0/24"], "172.31.0.12", 2);
        assert!(plan.conflicts[1].concerns(&b));
        assert!(!plan.conflicts.iter().any(|conflict| conflict.concerns(&c)));
        assert_eq!(
            plan.conflicts[1].to_string(),
            "10.244.1.0/24 is already routed by a blackhole route of proto static (4)"
        );
    }

    #[test]
    fn own_slice_routes_follow_the_slice_and_are_replaced_in_place_across_owners() {
        let desired = desired();
        // The slice moved: 10.244.9.0/24 was this node's and is no longer
        // anyone's; 10.244.2.0/24 was this node's and is node-c's now.
        let dump = Dump {
            own_slices: BTreeSet::from([
                net("10.244.0.0/24"),
                net("10.244.9.0/24"),
                net("10.244.2.0/24"),
            ]),
            owned_destinations: BTreeSet::from([
                net("10.244.0.0/24"),
                net("10.244.9.0/24"),
                net("10.244.2.0/24"),
            ]),
            ..Dump::default()
        };
        let plan = plan_routes(&desired, &own(), &dump);
        assert_eq!(
            plan.own_slices,
            vec![OwnSliceChange::Delete(net("10.244.9.0/24"))]
        );
        assert!(set_routes(&plan).contains(&net("10.244.2.0/24")));
        assert!(plan.replaceable.contains(&net("10.244.2.0/24")));

        // Back: a peer's route of Weft's becomes this node's unreachable
        // route in place, and the stale peer route's delete finds nothing.
        let mut back = dump.clone();
        back.own_slices.clear();
        back.owned.routes.push(OverlayRoute {
            destination: net("10.244.0.0/24"),
            next_hop: NextHop::Vtep("10.244.0.0".parse().unwrap()),
        });
        let plan = plan_routes(&desired, &own(), &back);
        assert_eq!(
            plan.own_slices,
            vec![OwnSliceChange::Set(net("10.244.0.0/24"))]
        );
        assert!(plan.replaceable.contains(&net("10.244.0.0/24")));
    }

    #[test]
    fn no_own_slices_remove_every_unreachable_route() {
        let dump = Dump {
            own_slices: BTreeSet::from([net("10.244.0.0/24"), net("fd00:10:244::/64")]),
            ..Dump::default()
        };
        let plan = plan_routes(&DesiredState::default(), &OwnSlices::default(), &dump);
        assert_eq!(
            plan.own_slices,
            vec![
                OwnSliceChange::Delete(net("10.244.0.0/24")),
                OwnSliceChange::Delete(net("fd00:10:244::/64")),
            ]
        );
    }

    #[test]
    fn return_rules_are_added_for_own_slices_and_only_weft_s_removed() {
        let desired = desired();
        let plan = plan_routes(&desired, &own(), &Dump::default());
        let rule = return_rule(net("10.244.0.0/24"));
        assert_eq!(plan.rules, vec![RuleChange::Add(rule)]);
        assert_eq!(
            rule.to_string(),
            "ipv4 rule pref 87 from 10.244.0.0/24 fwmark 0x10000000/0x10000000 lookup 8787 proto 87"
        );
        // Present as wanted: nothing to do. A stale one of Weft's goes.
        let stale = return_rule(net("10.244.9.0/24"));
        let dump = Dump {
            rules: vec![rule, stale],
            ..Dump::default()
        };
        let plan = plan_routes(&desired, &own(), &dump);
        assert_eq!(plan.rules, vec![RuleChange::Delete(stale)]);
        // Nothing wanted (uninstall, host-gw): every rule of Weft's goes.
        let plan = plan_routes(&DesiredState::default(), &OwnSlices::default(), &dump);
        assert_eq!(
            plan.rules,
            vec![RuleChange::Delete(rule), RuleChange::Delete(stale)]
        );
    }
}
