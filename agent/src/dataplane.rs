//! The kernel side of the agent: the `weft.1` device, dumps of what Weft
//! owns, and applying a plan through netlink.
//!
//! The one path by which the agent changes neighbours, FDB entries and
//! routes: [`Dataplane::reconcile`] dumps, plans ([`super::overlay::plan`])
//! and applies, for the peers on every reconcile and with an empty desired
//! state when uninstall empties the node ([`super::uninstall`]).

use std::collections::HashSet;
use std::mem;
use std::net::IpAddr;

use futures::StreamExt;
use ipnet::IpNet;

use super::overlay::{
    plan, DesiredState, FdbEntry, KernelState, Neighbour, NextHop, Operation, OverlayRoute,
};
use super::ROUTE_PROTOCOL;
use weft_core::annotations::VtepMac;
use weft_core::ip::IpFamily;
use weft_core::netlink::{
    FdbRemote, Link, Netlink, NetlinkError, PermanentNeighbour, Removal, Route, RouteProtocol,
    VxlanChange, VxlanSettings,
};

/// The name of Weft's VXLAN device.
pub const VXLAN_DEVICE: &str = "weft.1";

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
        self.vxlan_index = Some(link.index);
        Ok(change)
    }

    /// Removes `weft.1` (host-gw mode after an earlier vxlan run). Its
    /// neighbours, FDB entries and routes go with it.
    pub async fn remove_vtep(&mut self) -> Result<Removal, DataplaneError> {
        self.vxlan_index = None;
        Ok(self.netlink.delete_link_by_name(VXLAN_DEVICE).await?)
    }

    /// The MAC of an existing `weft.1`, if there is one.
    pub async fn existing_vtep_mac(&self) -> Result<Option<VtepMac>, DataplaneError> {
        Ok(self
            .existing_vtep()
            .await?
            .and_then(|l| l.mac)
            .and_then(|mac| VtepMac::try_from(mac.as_slice()).ok()))
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

    /// Dumps the entries Weft owns: permanent neighbours and FDB remotes on
    /// `weft.1`, and routes with [`ROUTE_PROTOCOL`] in the main table.
    pub async fn dump(&self) -> Result<KernelState, DataplaneError> {
        let mut state = KernelState::default();
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
                    continue;
                }
                // Weft only makes routes with a gateway; any other route
                // with its protocol number is left alone rather than guessed at.
                let Some(gateway) = route.gateway else {
                    continue;
                };
                let next_hop = match (self.vxlan_index, route.output_interface) {
                    (Some(vxlan), Some(oif)) if vxlan == oif => NextHop::Vtep(gateway),
                    _ => NextHop::Underlay(gateway),
                };
                state.routes.push(OverlayRoute {
                    destination: route.destination,
                    next_hop,
                });
            }
        }
        Ok(state)
    }

    /// Dumps, plans and applies: one reconcile of the kernel against
    /// `desired`.
    pub async fn reconcile(&self, desired: &DesiredState) -> Result<ApplyReport, DataplaneError> {
        self.reconcile_holding(desired, |_| false).await
    }

    /// [`Dataplane::reconcile`], leaving out the operations `hold` picks:
    /// their entries stay as the kernel has them (a peer the kernel keeps
    /// refusing, waiting out its backoff).
    pub async fn reconcile_holding(
        &self,
        desired: &DesiredState,
        hold: impl Fn(&Operation) -> bool,
    ) -> Result<ApplyReport, DataplaneError> {
        let current = self.dump().await?;
        let mut operations = plan(desired, &current);
        operations.retain(|operation| !hold(operation));
        self.apply(&operations).await
    }

    /// Applies operations in order. A failed operation does not stop the
    /// others, except that routes through a VTEP whose neighbour or FDB
    /// entry failed are held back.
    ///
    /// Consecutive operations of one kind (as [`plan`] groups them: set
    /// neighbours, FDB entries, routes, then delete routes, FDB entries,
    /// neighbours) touch distinct kernel entries, so each such run goes out
    /// with up to `IN_FLIGHT` requests awaiting their answers; a run starts
    /// only once the one before it is answered, which keeps neighbour, FDB
    /// entry, route in that order, and removal in reverse.
    pub async fn apply(&self, operations: &[Operation]) -> Result<ApplyReport, DataplaneError> {
        let mut report = ApplyReport::default();
        // VTEP addresses whose neighbour, or whose MAC's FDB entry, could
        // not be set: a route through them would lead nowhere.
        let mut broken_vteps: HashSet<IpAddr> = HashSet::new();
        for run in operations.chunk_by(|a, b| mem::discriminant(a) == mem::discriminant(b)) {
            let (held_back, ready): (Vec<Operation>, Vec<Operation>) =
                run.iter().partition(|operation| {
                    matches!(operation, Operation::SetRoute(OverlayRoute {
                        next_hop: NextHop::Vtep(vtep),
                        ..
                    }) if broken_vteps.contains(vtep))
                });
            report.held_back.extend(held_back);
            let outcomes: Vec<_> = futures::stream::iter(ready)
                .map(|operation| async move { (operation, self.apply_one(operation).await) })
                .buffered(IN_FLIGHT)
                .collect()
                .await;
            let mut broken_macs: HashSet<VtepMac> = HashSet::new();
            for (operation, outcome) in outcomes {
                match outcome {
                    Ok(()) => report.applied.push(operation),
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

    async fn apply_one(&self, operation: Operation) -> Result<(), DataplaneError> {
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
            Operation::SetRoute(r) => self.netlink.replace_route(&self.kernel_route(r)?).await?,
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
        Ok(())
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
