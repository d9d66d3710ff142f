//! Desired state, diff, plan: what the kernel should hold for the peers, and
//! the ordered operations that take the kernel there.
//!
//! Pure: the agent fills a [`KernelState`] from netlink dumps of what Weft
//! owns (entries on `weft.1`, routes with [`crate::ROUTE_PROTOCOL`]),
//! asks [`plan`] for the difference, and applies it in the order given.
//!
//! Besides the routes to peer slices, a node with the tunnel holds a
//! return route per tunnelled peer: the peer's node address via its VTEP,
//! in the return table ([`crate::dataplane::RETURN_TABLE`]) that only
//! replies to the peer's own connections through the tunnel look up (see
//! docs/host-traffic.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use super::config::Backend;
use super::peer::{vtep_address, LocalNode, Peer};
use weft_core::annotations::VtepMac;

/// A permanent neighbour on `weft.1`: a peer's VTEP address → its VTEP MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    /// The peer slice's VTEP address.
    pub ip: IpAddr,
    /// The peer's VTEP MAC.
    pub mac: VtepMac,
}

/// A permanent forwarding-database entry on `weft.1`: a peer's VTEP MAC → the
/// underlay address its tunnel packets are sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    /// The peer's VTEP MAC.
    pub mac: VtepMac,
    /// The peer's public (underlay) address.
    pub remote: IpAddr,
}

/// How a peer's slice is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NextHop {
    /// Through the tunnel: via the peer's VTEP address, onlink on `weft.1`.
    Vtep(IpAddr),
    /// host-gw: via the peer's node address on the underlay.
    Underlay(IpAddr),
}

/// A route Weft owns, to one peer slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OverlayRoute {
    /// The peer's slice.
    pub destination: IpNet,
    /// Where it goes.
    pub next_hop: NextHop,
}

/// A route Weft owns in the return table: a peer's node address through
/// the tunnel, for replies to the connections it made through the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReturnRoute {
    /// The peer's node (public) address, the destination.
    pub node_ip: IpAddr,
    /// The VTEP address of the peer's slice of that family, the next hop.
    pub vtep: IpAddr,
}

/// Why a peer (or one of its slices) gets no entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// VXLAN is needed but the peer has published no VTEP MAC yet.
    NoVtepMac,
    /// host-gw is configured but the peer is not on this node's underlay
    /// subnet, so a route via its address cannot work.
    NotOnUnderlaySubnet,
    /// The address families do not fit: a host-gw route needs a next hop of
    /// the slice's family, a tunnel needs a remote of the underlay's family.
    AddressFamily,
}

/// A peer slice that is not programmed, and why (logged, counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPeer {
    /// The peer's node name.
    pub node_name: String,
    /// The slice concerned.
    pub slice: IpNet,
    /// Why.
    pub reason: SkipReason,
}

/// Everything the kernel should hold for the current peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// VTEP address → MAC.
    pub neighbours: BTreeMap<IpAddr, VtepMac>,
    /// MAC → remote.
    pub fdb: BTreeMap<VtepMac, IpAddr>,
    /// Slice → next hop.
    pub routes: BTreeMap<IpNet, NextHop>,
    /// Tunnelled peer's node address → its VTEP address, in the return
    /// table.
    pub return_routes: BTreeMap<IpAddr, IpAddr>,
    /// This node's slices whose replies to peers' node addresses return
    /// through the tunnel: one return rule each. Those of the underlay's
    /// family, on backends with the tunnel.
    pub return_sources: BTreeSet<IpNet>,
    /// Peer slices left out, with the reason.
    pub skipped: Vec<SkippedPeer>,
}

/// What a netlink dump found of the entries Weft owns. Lists, not maps: the
/// kernel may hold duplicates (e.g. several FDB remotes for one MAC) that the
/// plan must remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Permanent neighbours on `weft.1`.
    pub neighbours: Vec<Neighbour>,
    /// FDB entries with a remote on `weft.1`.
    pub fdb: Vec<FdbEntry>,
    /// Routes carrying Weft's protocol number.
    pub routes: Vec<OverlayRoute>,
    /// Routes of the return table carrying Weft's protocol number.
    pub return_routes: Vec<ReturnRoute>,
}

#[cfg(test)]
impl KernelState {
    /// Exactly the entries of `desired`, as a kernel that matches it holds
    /// them: for tests of what plans from a dump.
    pub(crate) fn matching(desired: &DesiredState) -> Self {
        KernelState {
            neighbours: desired
                .neighbours
                .iter()
                .map(|(&ip, &mac)| Neighbour { ip, mac })
                .collect(),
            fdb: desired
                .fdb
                .iter()
                .map(|(&mac, &remote)| FdbEntry { mac, remote })
                .collect(),
            routes: desired
                .routes
                .iter()
                .map(|(&destination, &next_hop)| OverlayRoute {
                    destination,
                    next_hop,
                })
                .collect(),
            return_routes: desired
                .return_routes
                .iter()
                .map(|(&node_ip, &vtep)| ReturnRoute { node_ip, vtep })
                .collect(),
        }
    }
}

/// One kernel change. `Set*` is a netlink replace (create or update in
/// place), `Delete*` treats "already gone" as success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Create or update a neighbour.
    SetNeighbour(Neighbour),
    /// Create or update an FDB entry.
    SetFdb(FdbEntry),
    /// Create or update a route.
    SetRoute(OverlayRoute),
    /// Create or update a return route.
    SetReturnRoute(ReturnRoute),
    /// Remove a return route.
    DeleteReturnRoute(ReturnRoute),
    /// Remove a route.
    DeleteRoute(OverlayRoute),
    /// Remove an FDB entry.
    DeleteFdb(FdbEntry),
    /// Remove a neighbour.
    DeleteNeighbour(Neighbour),
}

/// Computes the entries this node should hold for `peers` with `backend`.
///
/// vxlan: per peer slice a neighbour (VTEP address → MAC) and a route via
/// that VTEP address onlink on `weft.1`, plus one FDB entry (MAC → public IP)
/// per peer. host-gw: a route via the peer's public IP, for peers on this
/// node's underlay subnet and slices of the public IP's family. direct:
/// host-gw where host-gw works, vxlan otherwise. Each peer reached through
/// the tunnel gets a return route to its public IP via its VTEP address of
/// that family; with the tunnel, this node's slices of the underlay's
/// family are return sources.
///
/// `peers` are taken as given: [`crate::screen`] has rejected those whose
/// slices or MACs are unsound or claimed twice. A public IP two peers
/// publish is not rejected (copying one draws nothing), but it gets no
/// return route: which VTEP answers for it is not knowable, and a reply
/// sent to the copier's VTEP would be lost.
pub fn desired_state<'a>(
    backend: Backend,
    local: &LocalNode,
    peers: impl IntoIterator<Item = &'a Peer>,
) -> DesiredState {
    let mut state = DesiredState::default();
    if backend.uses_vxlan() {
        state.return_sources = local
            .pod_cidrs
            .iter()
            .filter(|slice| same_family(&slice.addr(), &local.underlay.addr()))
            .map(IpNet::trunc)
            .collect();
    }
    let mut claimed_by: BTreeMap<IpAddr, &str> = BTreeMap::new();
    let mut contested = BTreeSet::new();
    for peer in peers {
        if peer.node_name == local.name {
            continue;
        }
        if *claimed_by
            .entry(peer.public_ip)
            .or_insert(peer.node_name.as_str())
            != peer.node_name
        {
            contested.insert(peer.public_ip);
        }
        let same_subnet = local.shares_underlay_subnet(peer.public_ip);
        for slice in &peer.pod_cidrs {
            let slice = slice.trunc();
            let skip = |reason| SkippedPeer {
                node_name: peer.node_name.clone(),
                slice,
                reason,
            };
            let host_gw_fits = same_subnet && same_family(&slice.addr(), &peer.public_ip);
            let result = match backend {
                Backend::HostGw if host_gw_fits => Ok(NextHop::Underlay(peer.public_ip)),
                Backend::HostGw if !same_subnet => Err(SkipReason::NotOnUnderlaySubnet),
                Backend::HostGw => Err(SkipReason::AddressFamily),
                Backend::Direct if host_gw_fits => Ok(NextHop::Underlay(peer.public_ip)),
                Backend::Vxlan | Backend::Direct => tunnel_to(&mut state, local, peer, &slice),
            };
            match result {
                Ok(next_hop) => {
                    state.routes.insert(slice, next_hop);
                }
                Err(reason) => state.skipped.push(skip(reason)),
            }
        }
    }
    state.return_routes.retain(|ip, _| !contested.contains(ip));
    state
}

/// Adds the neighbour and FDB entry that carry `slice` of `peer` through the
/// tunnel, and returns the route's next hop.
fn tunnel_to(
    state: &mut DesiredState,
    local: &LocalNode,
    peer: &Peer,
    slice: &IpNet,
) -> Result<NextHop, SkipReason> {
    let mac = peer.vtep_mac.ok_or(SkipReason::NoVtepMac)?;
    if !same_family(&local.underlay.addr(), &peer.public_ip) {
        return Err(SkipReason::AddressFamily);
    }
    let vtep = vtep_address(slice);
    state.fdb.insert(mac, peer.public_ip);
    state.neighbours.insert(vtep, mac);
    if same_family(&vtep, &peer.public_ip) {
        // A peer with two slices of the family answers on the first.
        state.return_routes.entry(peer.public_ip).or_insert(vtep);
    }
    Ok(NextHop::Vtep(vtep))
}

fn same_family(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// Which peer each overlay entry belongs to: a slice's route, the
/// neighbour of its VTEP address, the FDB entry of a MAC and the return
/// route to a node address. It tells which
/// peer an [`Operation`] concerns, to hold back the entries of a peer the
/// kernel keeps refusing and to name it in logs.
#[derive(Debug, Default)]
pub struct EntryOwners<'p> {
    slices: HashMap<IpNet, &'p str>,
    vteps: HashMap<IpAddr, &'p str>,
    macs: HashMap<VtepMac, &'p str>,
    node_ips: HashMap<IpAddr, &'p str>,
}

impl<'p> EntryOwners<'p> {
    /// The entries of `peers`.
    pub fn of(peers: impl IntoIterator<Item = &'p Peer>) -> Self {
        let mut owners = EntryOwners::default();
        for peer in peers {
            let name = peer.node_name.as_str();
            for slice in &peer.pod_cidrs {
                let slice = slice.trunc();
                owners.slices.insert(slice, name);
                owners.vteps.insert(vtep_address(&slice), name);
            }
            if let Some(mac) = peer.vtep_mac {
                owners.macs.insert(mac, name);
            }
            owners.node_ips.insert(peer.public_ip, name);
        }
        owners
    }

    /// The peer whose entry `operation` changes, if it is one of these.
    pub fn owner(&self, operation: &Operation) -> Option<&'p str> {
        match operation {
            Operation::SetNeighbour(n) | Operation::DeleteNeighbour(n) => self
                .vteps
                .get(&n.ip)
                .or_else(|| self.macs.get(&n.mac))
                .copied(),
            Operation::SetFdb(f) | Operation::DeleteFdb(f) => self.macs.get(&f.mac).copied(),
            Operation::SetRoute(r) | Operation::DeleteRoute(r) => {
                self.slices.get(&r.destination).copied()
            }
            Operation::SetReturnRoute(r) | Operation::DeleteReturnRoute(r) => self
                .node_ips
                .get(&r.node_ip)
                .or_else(|| self.vteps.get(&r.vtep))
                .copied(),
        }
    }
}

/// The operations that take `current` to `desired`, in a safe order:
/// creations and in-place updates first (neighbours, then FDB entries, then
/// routes, then return routes, so a route never points at a VTEP the kernel
/// cannot resolve), then removals in reverse (return routes, routes, FDB
/// entries, neighbours). An empty plan means the kernel already matches.
pub fn plan(desired: &DesiredState, current: &KernelState) -> Vec<Operation> {
    let mut operations = Vec::new();

    let wanted_neighbours: BTreeSet<Neighbour> = desired
        .neighbours
        .iter()
        .map(|(&ip, &mac)| Neighbour { ip, mac })
        .collect();
    let wanted_fdb: BTreeSet<FdbEntry> = desired
        .fdb
        .iter()
        .map(|(&mac, &remote)| FdbEntry { mac, remote })
        .collect();
    let wanted_routes: BTreeSet<OverlayRoute> = desired
        .routes
        .iter()
        .map(|(&destination, &next_hop)| OverlayRoute {
            destination,
            next_hop,
        })
        .collect();
    let present_neighbours: BTreeSet<Neighbour> = current.neighbours.iter().copied().collect();
    let present_fdb: BTreeSet<FdbEntry> = current.fdb.iter().copied().collect();
    let present_routes: BTreeSet<OverlayRoute> = current.routes.iter().copied().collect();
    let wanted_returns: BTreeSet<ReturnRoute> = desired
        .return_routes
        .iter()
        .map(|(&node_ip, &vtep)| ReturnRoute { node_ip, vtep })
        .collect();
    let present_returns: BTreeSet<ReturnRoute> = current.return_routes.iter().copied().collect();

    operations.extend(
        wanted_neighbours
            .difference(&present_neighbours)
            .map(|&n| Operation::SetNeighbour(n)),
    );
    operations.extend(
        wanted_fdb
            .difference(&present_fdb)
            .map(|&f| Operation::SetFdb(f)),
    );
    operations.extend(
        wanted_routes
            .difference(&present_routes)
            .map(|&r| Operation::SetRoute(r)),
    );
    operations.extend(
        wanted_returns
            .difference(&present_returns)
            .map(|&r| Operation::SetReturnRoute(r)),
    );
    // A stale entry whose key is still wanted was just replaced in place;
    // deleting it by its old value then finds nothing, or removes a
    // duplicate the kernel held beside the replaced one.
    operations.extend(
        present_returns
            .difference(&wanted_returns)
            .filter(|r| {
                !replaced_in_place(desired.return_routes.get(&r.node_ip), |&vtep| {
                    present_returns.contains(&ReturnRoute { vtep, ..**r })
                })
            })
            .map(|&r| Operation::DeleteReturnRoute(r)),
    );
    operations.extend(
        present_routes
            .difference(&wanted_routes)
            .filter(|r| {
                !replaced_in_place(desired.routes.get(&r.destination), |&next_hop| {
                    present_routes.contains(&OverlayRoute { next_hop, ..**r })
                })
            })
            .map(|&r| Operation::DeleteRoute(r)),
    );
    operations.extend(
        present_fdb
            .difference(&wanted_fdb)
            .map(|&f| Operation::DeleteFdb(f)),
    );
    operations.extend(
        present_neighbours
            .difference(&wanted_neighbours)
            .filter(|n| !desired.neighbours.contains_key(&n.ip))
            .map(|&n| Operation::DeleteNeighbour(n)),
    );
    operations
}

/// Whether the plan's set for a stale route's destination turns that
/// route into the wanted one: `wanted` is what is wanted at the
/// destination, `present` whether the kernel already holds a route there
/// with a given next hop. A route replace rewrites the route with the same
/// destination and metric, and a later delete by the old next hop would
/// find nothing; a stale duplicate beside an already correct route must
/// go, though.
fn replaced_in_place<V>(wanted: Option<&V>, present: impl Fn(&V) -> bool) -> bool {
    wanted.is_some_and(|next_hop| !present(next_hop))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    pub(crate) fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A VTEP MAC that differs from the others by its last byte.
    pub(crate) fn mac(last: u8) -> VtepMac {
        VtepMac::new([0x0a, 0x58, 0, 0, 0, last])
    }

    fn local() -> LocalNode {
        LocalNode {
            name: "node-a".into(),
            pod_cidrs: vec![net("10.244.0.0/24"), net("fd00:10:244::/64")],
            underlay: net("172.31.0.10/24"),
        }
    }

    fn peer(name: &str, slices: &[&str], public_ip: &str, vtep: Option<u8>) -> Peer {
        Peer {
            node_name: name.into(),
            pod_cidrs: slices.iter().map(|s| net(s)).collect(),
            public_ip: ip(public_ip),
            vtep_mac: vtep.map(mac),
            created: 0,
            malformed: None,
        }
    }

    /// Two peers on the local subnet (one dual-stack), one behind a router.
    fn peers() -> Vec<Peer> {
        vec![
            peer(
                "node-b",
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
                "172.31.0.11",
                Some(1),
            ),
            peer("node-c", &["10.244.2.0/24"], "172.31.1.12", Some(2)),
        ]
    }

    #[test]
    fn vxlan_gives_neighbour_fdb_and_onlink_route_per_slice() {
        let state = desired_state(Backend::Vxlan, &local(), &peers());
        assert_eq!(state.neighbours.len(), 3);
        assert_eq!(state.neighbours[&ip("10.244.1.0")], mac(1));
        assert_eq!(state.neighbours[&ip("fd00:10:244:1::")], mac(1));
        assert_eq!(state.neighbours[&ip("10.244.2.0")], mac(2));
        assert_eq!(state.fdb.len(), 2);
        assert_eq!(state.fdb[&mac(1)], ip("172.31.0.11"));
        assert_eq!(state.fdb[&mac(2)], ip("172.31.1.12"));
        assert_eq!(
            state.routes[&net("10.244.1.0/24")],
            NextHop::Vtep(ip("10.244.1.0"))
        );
        assert_eq!(
            state.routes[&net("fd00:10:244:1::/64")],
            NextHop::Vtep(ip("fd00:10:244:1::"))
        );
        assert!(state.skipped.is_empty());
    }

    #[test]
    fn host_gw_routes_via_node_ip_and_skips_what_it_cannot_reach() {
        let state = desired_state(Backend::HostGw, &local(), &peers());
        assert!(state.neighbours.is_empty());
        assert!(state.fdb.is_empty());
        assert_eq!(state.routes.len(), 1);
        assert_eq!(
            state.routes[&net("10.244.1.0/24")],
            NextHop::Underlay(ip("172.31.0.11"))
        );
        let reasons: Vec<_> = state
            .skipped
            .iter()
            .map(|s| (s.node_name.as_str(), s.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("node-b", SkipReason::AddressFamily),
                ("node-c", SkipReason::NotOnUnderlaySubnet)
            ]
        );
    }

    #[test]
    fn direct_uses_host_gw_on_the_subnet_and_vxlan_beyond() {
        let state = desired_state(Backend::Direct, &local(), &peers());
        assert_eq!(
            state.routes[&net("10.244.1.0/24")],
            NextHop::Underlay(ip("172.31.0.11"))
        );
        // The IPv6 slice cannot use an IPv4 next hop: it rides the tunnel.
        assert_eq!(
            state.routes[&net("fd00:10:244:1::/64")],
            NextHop::Vtep(ip("fd00:10:244:1::"))
        );
        assert_eq!(
            state.routes[&net("10.244.2.0/24")],
            NextHop::Vtep(ip("10.244.2.0"))
        );
        assert_eq!(state.fdb.len(), 2);
        assert!(!state.neighbours.contains_key(&ip("10.244.1.0")));
    }

    #[test]
    fn peers_without_mac_or_self_are_skipped() {
        let peers = vec![
            peer("node-a", &["10.244.9.0/24"], "172.31.0.10", Some(9)),
            peer("node-b", &["10.244.1.0/24"], "172.31.0.11", None),
            peer("node-d", &["10.244.4.0/24"], "172.31.0.13", Some(4)),
        ];
        let state = desired_state(Backend::Vxlan, &local(), &peers);
        let reasons: Vec<_> = state
            .skipped
            .iter()
            .map(|s| (s.node_name.as_str(), s.reason))
            .collect();
        assert_eq!(reasons, vec![("node-b", SkipReason::NoVtepMac)]);
        assert_eq!(
            state.routes.keys().collect::<Vec<_>>(),
            vec![&net("10.244.4.0/24")]
        );
    }

    #[test]
    fn operations_are_traced_to_their_peer() {
        let peers = peers();
        let owners = EntryOwners::of(&peers[1..]);
        let state = desired_state(Backend::Vxlan, &local(), &peers);
        let ops = plan(&state, &KernelState::default());
        let owned: Vec<_> = ops.iter().filter_map(|op| owners.owner(op)).collect();
        // node-c's neighbour, FDB entry, route and return route; nothing
        // of node-b's.
        assert_eq!(owned, vec!["node-c"; 4]);
    }

    #[test]
    fn tunnel_needs_a_remote_of_the_underlay_family() {
        let peers = vec![peer("node-b", &["10.244.1.0/24"], "fd00:31::11", Some(1))];
        let state = desired_state(Backend::Vxlan, &local(), &peers);
        assert_eq!(state.skipped[0].reason, SkipReason::AddressFamily);
        assert!(state.fdb.is_empty());
    }

    #[test]
    fn empty_kernel_gets_neighbours_then_fdb_then_routes_then_return_routes() {
        let desired = desired_state(Backend::Vxlan, &local(), &peers());
        let ops = plan(&desired, &KernelState::default());
        assert_eq!(ops.len(), 3 + 2 + 3 + 2);
        let kinds: Vec<u8> = ops
            .iter()
            .map(|op| match op {
                Operation::SetNeighbour(_) => 0,
                Operation::SetFdb(_) => 1,
                Operation::SetRoute(_) => 2,
                Operation::SetReturnRoute(_) => 3,
                _ => 9,
            })
            .collect();
        assert!(kinds.windows(2).all(|w| w[0] <= w[1]), "{kinds:?}");
        assert!(!kinds.contains(&9));
    }

    #[test]
    fn matching_kernel_needs_nothing() {
        let desired = desired_state(Backend::Direct, &local(), &peers());
        assert!(plan(&desired, &KernelState::matching(&desired)).is_empty());
    }

    #[test]
    fn deleted_peer_is_removed_route_first() {
        let before = desired_state(Backend::Vxlan, &local(), &peers());
        let after = desired_state(Backend::Vxlan, &local(), &peers()[..1]);
        let ops = plan(&after, &KernelState::matching(&before));
        assert_eq!(
            ops,
            vec![
                Operation::DeleteReturnRoute(ReturnRoute {
                    node_ip: ip("172.31.1.12"),
                    vtep: ip("10.244.2.0"),
                }),
                Operation::DeleteRoute(OverlayRoute {
                    destination: net("10.244.2.0/24"),
                    next_hop: NextHop::Vtep(ip("10.244.2.0")),
                }),
                Operation::DeleteFdb(FdbEntry {
                    mac: mac(2),
                    remote: ip("172.31.1.12")
                }),
                Operation::DeleteNeighbour(Neighbour {
                    ip: ip("10.244.2.0"),
                    mac: mac(2)
                }),
            ]
        );
    }

    #[test]
    fn changed_mac_and_ip_are_updated_in_place() {
        let before = desired_state(Backend::Vxlan, &local(), &peers());
        let mut moved = peers();
        moved[1].vtep_mac = Some(mac(7));
        moved[1].public_ip = ip("172.31.1.99");
        let after = desired_state(Backend::Vxlan, &local(), &moved);
        let ops = plan(&after, &KernelState::matching(&before));
        assert_eq!(
            ops,
            vec![
                // The neighbour keeps its address and gets the new MAC.
                Operation::SetNeighbour(Neighbour {
                    ip: ip("10.244.2.0"),
                    mac: mac(7)
                }),
                Operation::SetFdb(FdbEntry {
                    mac: mac(7),
                    remote: ip("172.31.1.99")
                }),
                // A new node address is a new return route; the old goes.
                Operation::SetReturnRoute(ReturnRoute {
                    node_ip: ip("172.31.1.99"),
                    vtep: ip("10.244.2.0"),
                }),
                Operation::DeleteReturnRoute(ReturnRoute {
                    node_ip: ip("172.31.1.12"),
                    vtep: ip("10.244.2.0"),
                }),
                Operation::DeleteFdb(FdbEntry {
                    mac: mac(2),
                    remote: ip("172.31.1.12")
                }),
            ]
        );
    }

    #[test]
    fn changed_next_hop_is_replaced_not_deleted() {
        let before = desired_state(Backend::Vxlan, &local(), &peers());
        let after = desired_state(Backend::Direct, &local(), &peers());
        let ops = plan(&after, &KernelState::matching(&before));
        assert!(ops.contains(&Operation::SetRoute(OverlayRoute {
            destination: net("10.244.1.0/24"),
            next_hop: NextHop::Underlay(ip("172.31.0.11")),
        })));
        assert!(
            !ops.iter().any(|op| matches!(op, Operation::DeleteRoute(_))),
            "{ops:?}"
        );
        // The now unused IPv4 VTEP neighbour of node-b goes.
        assert!(ops.contains(&Operation::DeleteNeighbour(Neighbour {
            ip: ip("10.244.1.0"),
            mac: mac(1)
        })));
    }

    #[test]
    fn drift_is_repaired_and_strays_removed() {
        let desired = desired_state(Backend::Vxlan, &local(), &peers());
        let mut kernel = KernelState::matching(&desired);
        let lost = kernel.routes.remove(0);
        let stray = FdbEntry {
            mac: mac(1),
            remote: ip("172.31.0.200"),
        };
        kernel.fdb.push(stray);
        let duplicate = OverlayRoute {
            destination: net("10.244.2.0/24"),
            next_hop: NextHop::Vtep(ip("10.244.2.1")),
        };
        kernel.routes.push(duplicate);
        let ops = plan(&desired, &kernel);
        assert_eq!(
            ops,
            vec![
                Operation::SetRoute(lost),
                Operation::DeleteRoute(duplicate),
                Operation::DeleteFdb(stray)
            ]
        );
    }

    #[test]
    fn return_routes_are_for_tunnelled_peers_in_the_underlay_family() {
        let state = desired_state(Backend::Vxlan, &local(), &peers());
        // The IPv4 node addresses via the IPv4 VTEP addresses; node-b's
        // IPv6 slice gives none (its node address is IPv4).
        assert_eq!(
            state.return_routes,
            BTreeMap::from([
                (ip("172.31.0.11"), ip("10.244.1.0")),
                (ip("172.31.1.12"), ip("10.244.2.0")),
            ])
        );
        // The own IPv4 slice is a return source; the IPv6 one is not.
        assert_eq!(state.return_sources, BTreeSet::from([net("10.244.0.0/24")]));
        // direct: node-b is reached on the underlay, so no return route.
        let direct = desired_state(Backend::Direct, &local(), &peers());
        assert_eq!(
            direct.return_routes,
            BTreeMap::from([(ip("172.31.1.12"), ip("10.244.2.0"))])
        );
        assert_eq!(direct.return_sources, state.return_sources);
        // host-gw has no tunnel and nothing returns through it.
        let host_gw = desired_state(Backend::HostGw, &local(), &peers());
        assert!(host_gw.return_routes.is_empty());
        assert!(host_gw.return_sources.is_empty());
    }

    #[test]
    fn skipped_peers_get_no_return_route() {
        let peers = vec![
            peer("node-b", &["10.244.1.0/24"], "172.31.0.11", None),
            peer("node-e", &["10.244.5.0/24"], "fd00:31::15", Some(5)),
            peer(
                "node-f",
                &["fd00:10:244:6::/64", "10.244.6.0/24"],
                "172.31.0.16",
                Some(6),
            ),
        ];
        let state = desired_state(Backend::Vxlan, &local(), &peers);
        assert_eq!(state.skipped.len(), 2, "{:?}", state.skipped);
        // node-f answers on its IPv4 VTEP address, whatever the order of
        // its slices.
        assert_eq!(
            state.return_routes,
            BTreeMap::from([(ip("172.31.0.16"), ip("10.244.6.0"))])
        );
    }

    #[test]
    fn a_public_ip_two_peers_publish_gets_no_return_route() {
        let owner = peer("node-b", &["10.244.1.0/24"], "172.31.0.11", Some(1));
        let copier = peer("node-m", &["10.244.9.0/24"], "172.31.0.11", Some(9));
        let other = peer("node-c", &["10.244.2.0/24"], "172.31.0.12", Some(2));
        for peers in [
            vec![owner.clone(), copier.clone(), other.clone()],
            vec![copier, other, owner],
        ] {
            let state = desired_state(Backend::Vxlan, &local(), &peers);
            assert_eq!(
                state.return_routes,
                BTreeMap::from([(ip("172.31.0.12"), ip("10.244.2.0"))])
            );
            // Both keep their routes: the copier only hurts itself.
            assert_eq!(state.routes.len(), 3);
        }
    }

    #[test]
    fn a_return_route_to_a_new_vtep_is_replaced_in_place() {
        let desired = desired_state(Backend::Vxlan, &local(), &peers());
        let mut kernel = KernelState::matching(&desired);
        let moved = ReturnRoute {
            node_ip: ip("172.31.0.11"),
            vtep: ip("10.244.7.0"),
        };
        kernel.return_routes.retain(|r| r.node_ip != moved.node_ip);
        kernel.return_routes.push(moved);
        let stray = ReturnRoute {
            node_ip: ip("172.31.0.99"),
            vtep: ip("10.244.9.0"),
        };
        kernel.return_routes.push(stray);
        assert_eq!(
            plan(&desired, &kernel),
            vec![
                Operation::SetReturnRoute(ReturnRoute {
                    node_ip: ip("172.31.0.11"),
                    vtep: ip("10.244.1.0"),
                }),
                Operation::DeleteReturnRoute(stray),
            ]
        );
    }
}
