//! Screening peers before anything of theirs reaches the kernel.
//!
//! Every Node object is input from a node that may be compromised, so a
//! peer's slices, public IP and VTEP MAC are checked against the cluster's
//! settings and this node before the overlay plans a single entry for it. A
//! peer that fails any check is rejected as a whole: it gets no neighbour,
//! FDB entry or route, and the agent logs and counts it by reason
//! ([`Rejection::label`]). Pure: [`screen`] reads the peers and decides.
//!
//! Two peers claiming one slice or one VTEP MAC are a conflict, and a
//! conflict must never move traffic away from the node the claim belongs
//! to. Slices come only from the controller's annotations, which only the
//! controller may write and which it never gives out twice; the slices
//! screening keeps never overlap. A VTEP MAC is derived from its node's
//! slice ([`VtepMac::for_slices`]), so a MAC one kept slice derives belongs
//! to that slice's peer: it keeps the MAC and every other peer publishing
//! it is rejected, whenever their Nodes were created. A copier therefore
//! cuts nobody off.
//!
//! Claims nothing settles that way (a slice claimed twice, a MAC of the
//! random kind agents used before MACs were derived) go by the Nodes'
//! `creationTimestamp`: the API server sets it, no client can change it,
//! and every agent sees the same value, so all nodes decide alike. The
//! older Node keeps the claim and the newer one is rejected; Nodes created
//! in the same second with one claim are all rejected, since nothing
//! unforgeable tells them apart. Names decide nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::config::AgentConfig;
use super::peer::{LocalNode, Peer};
use weft_core::annotations::{self, VtepMac};
use weft_core::ip::IpFamily;

/// What peers are checked against: the cluster's settings and this node.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The cluster CIDRs and slice sizes.
    pub config: &'a AgentConfig,
    /// This node: its slices and underlay subnet.
    pub local: &'a LocalNode,
    /// The address this node publishes.
    pub public_ip: IpAddr,
    /// This node's VTEP MAC, when it has a VXLAN device.
    pub vtep_mac: Option<VtepMac>,
}

/// Why a peer is rejected. Each names the value, and the message says what
/// is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// An annotation does not parse.
    Malformed {
        /// The annotation key.
        field: &'static str,
        /// Its value (at most 64 characters of it).
        value: String,
    },
    /// A slice lies outside every cluster CIDR of its family.
    OutsideClusterCidr(IpNet),
    /// A slice is not a network of the configured slice size.
    SliceSize {
        /// The slice.
        slice: IpNet,
        /// The configured prefix length.
        size: u8,
    },
    /// A slice overlaps one of this node's slices.
    OverlapsOwnSlice(IpNet),
    /// A slice overlaps this node's underlay subnet.
    OverlapsUnderlay(IpNet),
    /// Another peer holds the slice.
    SliceTaken {
        /// The slice.
        slice: IpNet,
        /// The peer that keeps it (or, on a tie, that also claims it).
        holder: String,
    },
    /// The public IP is not a usable unicast address (loopback, unspecified,
    /// multicast, broadcast or link-local).
    UnusablePublicIp(IpAddr),
    /// The public IP is this node's.
    OwnPublicIp(IpAddr),
    /// The public IP lies inside a cluster CIDR.
    PublicIpInClusterCidr(IpAddr),
    /// The VTEP MAC is this node's.
    OwnVtepMac(VtepMac),
    /// The VTEP MAC is derived from another peer's slice.
    VtepMacDerived {
        /// The MAC.
        mac: VtepMac,
        /// The peer whose slice it is derived from.
        owner: String,
    },
    /// Another peer holds the VTEP MAC, which no peer's slice derives.
    VtepMacTaken {
        /// The MAC.
        mac: VtepMac,
        /// The peer that keeps it (or, on a tie, that also claims it).
        holder: String,
    },
}

impl Rejection {
    /// Every [`Rejection::label`].
    pub const LABELS: &'static [&'static str] = &[
        "malformed",
        "slice_outside_cluster_cidr",
        "slice_size",
        "slice_overlaps_node",
        "slice_overlaps_underlay",
        "slice_conflict",
        "public_ip_unusable",
        "public_ip_own",
        "public_ip_in_cluster_cidr",
        "vtep_mac_own",
        "vtep_mac_conflict",
    ];

    /// The `reason` label of `weft_agent_rejected_peers`.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Malformed { .. } => "malformed",
            Rejection::OutsideClusterCidr(_) => "slice_outside_cluster_cidr",
            Rejection::SliceSize { .. } => "slice_size",
            Rejection::OverlapsOwnSlice(_) => "slice_overlaps_node",
            Rejection::OverlapsUnderlay(_) => "slice_overlaps_underlay",
            Rejection::SliceTaken { .. } => "slice_conflict",
            Rejection::UnusablePublicIp(_) => "public_ip_unusable",
            Rejection::OwnPublicIp(_) => "public_ip_own",
            Rejection::PublicIpInClusterCidr(_) => "public_ip_in_cluster_cidr",
            Rejection::OwnVtepMac(_) => "vtep_mac_own",
            Rejection::VtepMacDerived { .. } | Rejection::VtepMacTaken { .. } => {
                "vtep_mac_conflict"
            }
        }
    }

    /// The Node annotation the rejected value came from.
    pub fn field(&self) -> &'static str {
        match self {
            Rejection::Malformed { field, .. } => field,
            Rejection::OutsideClusterCidr(slice)
            | Rejection::SliceSize { slice, .. }
            | Rejection::OverlapsOwnSlice(slice)
            | Rejection::OverlapsUnderlay(slice)
            | Rejection::SliceTaken { slice, .. } => annotations::pod_cidr_key(IpFamily::of(slice)),
            Rejection::UnusablePublicIp(_)
            | Rejection::OwnPublicIp(_)
            | Rejection::PublicIpInClusterCidr(_) => annotations::PUBLIC_IP,
            Rejection::OwnVtepMac(_)
            | Rejection::VtepMacDerived { .. }
            | Rejection::VtepMacTaken { .. } => annotations::BACKEND_DATA,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Malformed { value, .. } => write!(f, "{value:?} does not parse"),
            Rejection::OutsideClusterCidr(slice) => {
                write!(f, "slice {slice} is outside the cluster CIDR")
            }
            Rejection::SliceSize { slice, size } => {
                write!(f, "slice {slice} is not a /{size} network, the slice size")
            }
            Rejection::OverlapsOwnSlice(slice) => {
                write!(f, "slice {slice} overlaps this node's slice")
            }
            Rejection::OverlapsUnderlay(slice) => {
                write!(f, "slice {slice} overlaps this node's underlay subnet")
            }
            Rejection::SliceTaken { slice, holder } => write!(
                f,
                "slice {slice} is also claimed by node {holder}, whose Node is older or as old"
            ),
            Rejection::UnusablePublicIp(ip) => {
                write!(f, "{ip} is not a usable unicast address")
            }
            Rejection::OwnPublicIp(ip) => write!(f, "{ip} is this node's address"),
            Rejection::PublicIpInClusterCidr(ip) => {
                write!(f, "{ip} lies inside the cluster CIDR")
            }
            Rejection::OwnVtepMac(mac) => write!(f, "VTEP MAC {mac} is this node's"),
            Rejection::VtepMacDerived { mac, owner } => write!(
                f,
                "VTEP MAC {mac} is derived from the slice of node {owner}, which holds it"
            ),
            Rejection::VtepMacTaken { mac, holder } => write!(
                f,
                "VTEP MAC {mac} is also claimed by node {holder}, whose Node is older or as old"
            ),
        }
    }
}

/// A peer that gets no kernel entries, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The peer's node name.
    pub node_name: String,
    /// Why (the first problem found).
    pub reason: Rejection,
}

/// The outcome of [`screen`].
#[derive(Debug, Default)]
pub struct Screened<'p> {
    /// Peers the overlay may program, in the order given.
    pub accepted: Vec<&'p Peer>,
    /// Peers rejected, in the order given.
    pub rejected: Vec<Rejected>,
}

/// Checks every peer against `rules` and against each other.
pub fn screen<'p>(rules: &Rules<'_>, peers: impl IntoIterator<Item = &'p Peer>) -> Screened<'p> {
    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    for peer in peers {
        if peer.node_name == rules.local.name {
            continue;
        }
        match check_peer(rules, peer) {
            Ok(()) => candidates.push(peer),
            Err(reason) => rejected.push(Rejected {
                node_name: peer.node_name.clone(),
                reason,
            }),
        }
    }
    let mut losers = vec![None; candidates.len()];
    // Checked slices are networks of one size per family, so two overlap
    // only when equal.
    let slices = candidates.iter().enumerate().flat_map(|(index, peer)| {
        peer.pod_cidrs
            .iter()
            .map(move |slice| (*slice, peer.created, index))
    });
    let taken = |slice, holder| Rejection::SliceTaken { slice, holder };
    by_claim(slices, |group| {
        settle_by_age(group, &candidates, &mut losers, &taken);
    });
    settle_vtep_macs(&candidates, &mut losers);
    let mut accepted = Vec::with_capacity(candidates.len());
    for (peer, lost) in candidates.into_iter().zip(losers) {
        match lost {
            None => accepted.push(peer),
            Some(reason) => rejected.push(Rejected {
                node_name: peer.node_name.clone(),
                reason,
            }),
        }
    }
    Screened { accepted, rejected }
}

/// A claim of one kind: `(claim, created, candidate index)`. Sorted, equal
/// claims group together oldest first.
type Claim<K> = (K, i64, usize);

/// Calls `settle` with the claimants of each claim, oldest first.
fn by_claim<K: Ord + Copy>(
    claims: impl Iterator<Item = Claim<K>>,
    settle: impl FnMut(&[Claim<K>]),
) {
    let mut claims: Vec<Claim<K>> = claims.collect();
    claims.sort_unstable();
    claims.chunk_by(|a, b| a.0 == b.0).for_each(settle);
}

/// Settles one claim among `group` (sorted oldest first) by age: the one
/// strictly oldest claimant keeps it and every other claimant gets
/// `taken(claim, holder)` in `losers`, unless it already lost something.
fn settle_by_age<K: Copy>(
    group: &[Claim<K>],
    candidates: &[&Peer],
    losers: &mut [Option<Rejection>],
    taken: &impl Fn(K, String) -> Rejection,
) {
    let [(claim, oldest, first), rest @ ..] = group else {
        return;
    };
    let Some(&(_, second_oldest, second)) = rest.first() else {
        return;
    };
    // A tie for oldest leaves nobody entitled: the first loses to the
    // second, everyone else to the first.
    let holder = |index: usize| candidates[index].node_name.clone();
    if second_oldest == *oldest {
        losers[*first].get_or_insert_with(|| taken(*claim, holder(second)));
    }
    for &(_, _, index) in rest {
        losers[index].get_or_insert_with(|| taken(*claim, holder(*first)));
    }
}

/// Settles VTEP MACs once slices are settled. A MAC derived from a kept
/// slice belongs to that slice's peer: every other claimant loses it,
/// whatever its age. The rest, and the rare MAC two kept IPv6 slices derive
/// alike, go by age among those entitled to them.
fn settle_vtep_macs(candidates: &[&Peer], losers: &mut [Option<Rejection>]) {
    // Peers that lost a slice own nothing; sorted oldest first.
    let mut owners: BTreeMap<VtepMac, Vec<(i64, usize)>> = BTreeMap::new();
    for (index, peer) in candidates.iter().enumerate() {
        if losers[index].is_some() {
            continue;
        }
        if let Some(mac) = VtepMac::for_slices(&peer.pod_cidrs) {
            owners.entry(mac).or_default().push((peer.created, index));
        }
    }
    owners
        .values_mut()
        .for_each(|owners| owners.sort_unstable());
    let claims = candidates
        .iter()
        .enumerate()
        .filter_map(|(index, peer)| peer.vtep_mac.map(|mac| (mac, peer.created, index)));
    let taken = |mac, holder| Rejection::VtepMacTaken { mac, holder };
    by_claim(claims, |group| {
        let mac = group[0].0;
        let Some(owners) = owners.get(&mac) else {
            settle_by_age(group, candidates, losers, &taken);
            return;
        };
        let (entitled, copiers): (Vec<Claim<VtepMac>>, Vec<Claim<VtepMac>>) = group
            .iter()
            .copied()
            .partition(|&(_, created, index)| owners.contains(&(created, index)));
        let owner = entitled.first().map_or(owners[0].1, |&(_, _, index)| index);
        for (_, _, index) in copiers {
            losers[index].get_or_insert_with(|| Rejection::VtepMacDerived {
                mac,
                owner: candidates[owner].node_name.clone(),
            });
        }
        settle_by_age(&entitled, candidates, losers, &taken);
    });
}

/// The first thing wrong with `peer` taken alone.
fn check_peer(rules: &Rules<'_>, peer: &Peer) -> Result<(), Rejection> {
    if let Some(malformed) = &peer.malformed {
        return Err(Rejection::Malformed {
            field: malformed.field,
            value: malformed.value.clone(),
        });
    }
    for slice in &peer.pod_cidrs {
        check_slice(rules, *slice)?;
    }
    check_public_ip(rules, peer.public_ip)?;
    match peer.vtep_mac {
        Some(mac) if Some(mac) == rules.vtep_mac => Err(Rejection::OwnVtepMac(mac)),
        _ => Ok(()),
    }
}

fn check_slice(rules: &Rules<'_>, slice: IpNet) -> Result<(), Rejection> {
    let family = IpFamily::of(&slice);
    let size = rules.config.slice_size(family);
    if slice.prefix_len() != size || slice.trunc() != slice {
        return Err(Rejection::SliceSize { slice, size });
    }
    if !rules
        .config
        .cluster_cidrs
        .iter()
        .any(|c| c.contains(&slice))
    {
        return Err(Rejection::OutsideClusterCidr(slice));
    }
    if rules
        .local
        .pod_cidrs
        .iter()
        .any(|own| overlaps(own, &slice))
    {
        return Err(Rejection::OverlapsOwnSlice(slice));
    }
    if overlaps(&rules.local.underlay.trunc(), &slice) {
        return Err(Rejection::OverlapsUnderlay(slice));
    }
    Ok(())
}

fn check_public_ip(rules: &Rules<'_>, ip: IpAddr) -> Result<(), Rejection> {
    if !usable_unicast(ip) {
        return Err(Rejection::UnusablePublicIp(ip));
    }
    if ip == rules.public_ip || ip == rules.local.underlay.addr() {
        return Err(Rejection::OwnPublicIp(ip));
    }
    if rules.config.cluster_cidrs.iter().any(|c| c.contains(&ip)) {
        return Err(Rejection::PublicIpInClusterCidr(ip));
    }
    Ok(())
}

/// Whether `ip` can be a node's address: unicast, and not loopback,
/// unspecified, link-local, broadcast or an IPv4-mapped IPv6 address.
fn usable_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local()
                || v4.octets()[0] == 0)
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some())
        }
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use ipnet::{Ipv4Net, Ipv6Net};
    use proptest::prelude::*;

    use super::*;
    use crate::config::dual_stack_config as config;
    use crate::peer::MalformedField;

    fn local() -> LocalNode {
        LocalNode {
            name: "node-a".into(),
            pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
            underlay: "172.31.0.10/24".parse().unwrap(),
        }
    }

    /// Derived from this node's slice, 10.244.0.0/24.
    const OWN_MAC: VtepMac = VtepMac::new([0x0a, 0x58, 0x0a, 0xf4, 0, 0]);

    /// A MAC of the random kind agents used before MACs were derived.
    fn legacy_mac(last: u8) -> VtepMac {
        VtepMac::new([0x0a, 0x58, 0, 0, 0, last])
    }

    /// The MAC derived from `slice`.
    fn derived(slice: &str) -> VtepMac {
        VtepMac::derived_from(&slice.parse().unwrap())
    }

    /// A peer with the [`legacy_mac`] `mac`.
    fn peer(name: &str, slice: &str, public_ip: &str, mac: u8, created: i64) -> Peer {
        Peer {
            node_name: name.into(),
            pod_cidrs: vec![slice.parse().unwrap()],
            public_ip: public_ip.parse().unwrap(),
            vtep_mac: Some(legacy_mac(mac)),
            created,
            malformed: None,
        }
    }

    /// A peer publishing `mac`, with a slice and public IP of its own.
    fn publishing(name: &str, slice: &str, mac: VtepMac, created: i64) -> Peer {
        let last = slice.split('.').nth(2).unwrap();
        Peer {
            vtep_mac: Some(mac),
            ..peer(name, slice, &format!("172.31.0.{last}"), 0, created)
        }
    }

    /// This node at 172.31.0.10 with [`OWN_MAC`].
    fn rules<'a>(config: &'a AgentConfig, local: &'a LocalNode) -> Rules<'a> {
        Rules {
            config,
            local,
            public_ip: "172.31.0.10".parse().unwrap(),
            vtep_mac: Some(OWN_MAC),
        }
    }

    /// The names accepted and the (name, reason label) rejected.
    fn outcome(peers: &[Peer]) -> (Vec<String>, Vec<(String, &'static str)>) {
        let (config, local) = (config(), local());
        let rules = rules(&config, &local);
        let screened = screen(&rules, peers);
        (
            screened
                .accepted
                .iter()
                .map(|p| p.node_name.clone())
                .collect(),
            screened
                .rejected
                .iter()
                .map(|r| (r.node_name.clone(), r.reason.label()))
                .collect(),
        )
    }

    fn rejected_for(bad: Peer) -> &'static str {
        let (accepted, rejected) = outcome(&[bad]);
        assert!(accepted.is_empty());
        rejected[0].1
    }

    #[test]
    fn a_sound_peer_is_accepted() {
        let good = peer("node-b", "10.244.1.0/24", "172.31.0.11", 1, 10);
        let (accepted, rejected) = outcome(&[good]);
        assert_eq!(accepted, vec!["node-b"]);
        assert_eq!(rejected, vec![]);
    }

    #[test]
    fn slices_must_be_cluster_slices_clear_of_this_node() {
        for (slice, reason) in [
            ("172.31.0.0/24", "slice_outside_cluster_cidr"),
            ("172.31.1.0/24", "slice_outside_cluster_cidr"),
            ("8.8.8.0/24", "slice_outside_cluster_cidr"),
            ("10.96.0.0/24", "slice_outside_cluster_cidr"),
            ("fd00:99::/64", "slice_outside_cluster_cidr"),
            ("128.0.0.0/1", "slice_size"),
            ("10.96.0.0/12", "slice_size"),
            ("10.244.0.0/25", "slice_size"),
            ("10.244.1.7/24", "slice_size"),
            ("10.244.3.11/32", "slice_size"),
            ("::/0", "slice_size"),
            ("10.244.0.0/24", "slice_overlaps_node"),
        ] {
            let bad = peer("node-b", slice, "172.31.0.11", 1, 10);
            assert_eq!(rejected_for(bad), reason, "{slice}");
        }
    }

    #[test]
    fn a_slice_on_the_underlay_subnet_is_refused() {
        let mut config = config();
        config.cluster_cidrs[0] = "172.16.0.0/12".parse().unwrap();
        let local = local();
        let rules = Rules {
            config: &config,
            local: &local,
            public_ip: "172.31.0.10".parse().unwrap(),
            vtep_mac: None,
        };
        let bad = peer("node-b", "172.31.0.0/24", "172.31.0.11", 1, 10);
        let screened = screen(&rules, [&bad]);
        assert_eq!(
            screened.rejected[0].reason.label(),
            "slice_overlaps_underlay"
        );
    }

    #[test]
    fn public_ips_must_be_usable_foreign_unicast() {
        for (ip, reason) in [
            ("127.0.0.1", "public_ip_unusable"),
            ("0.0.0.0", "public_ip_unusable"),
            ("224.0.0.1", "public_ip_unusable"),
            ("255.255.255.255", "public_ip_unusable"),
            ("169.254.1.1", "public_ip_unusable"),
            ("::1", "public_ip_unusable"),
            ("fe80::1", "public_ip_unusable"),
            ("ff02::1", "public_ip_unusable"),
            ("::ffff:172.31.0.11", "public_ip_unusable"),
            ("172.31.0.10", "public_ip_own"),
            ("10.244.7.1", "public_ip_in_cluster_cidr"),
        ] {
            let bad = peer("node-b", "10.244.1.0/24", ip, 1, 10);
            assert_eq!(rejected_for(bad), reason, "{ip}");
        }
    }

    #[test]
    fn malformed_annotations_and_the_own_mac_are_refused() {
        let mut bad = peer("node-b", "10.244.1.0/24", "172.31.0.11", 1, 10);
        bad.malformed = Some(Box::new(MalformedField {
            field: annotations::POD_CIDR,
            value: "2000::/3".into(),
        }));
        assert_eq!(rejected_for(bad), "malformed");
        let mut own_mac = peer("node-b", "10.244.1.0/24", "172.31.0.11", 1, 10);
        own_mac.vtep_mac = Some(OWN_MAC);
        assert_eq!(rejected_for(own_mac), "vtep_mac_own");
    }

    #[test]
    fn the_older_node_keeps_a_slice_whatever_the_names() {
        let holder = peer("node-1", "10.244.1.0/24", "172.31.0.11", 1, 100);
        let newcomer = peer("aaa-intruder", "10.244.1.0/24", "172.31.0.66", 6, 200);
        let (accepted, rejected) = outcome(&[newcomer, holder]);
        assert_eq!(accepted, vec!["node-1"]);
        assert_eq!(rejected, vec![("aaa-intruder".into(), "slice_conflict")]);
    }

    #[test]
    fn the_older_node_keeps_a_legacy_mac_whatever_the_names() {
        let holder = peer("node-1", "10.244.1.0/24", "172.31.0.11", 1, 100);
        let newcomer = peer("aaa-intruder", "10.244.6.0/24", "172.31.0.66", 1, 200);
        let (accepted, rejected) = outcome(&[newcomer, holder]);
        assert_eq!(accepted, vec!["node-1"]);
        assert_eq!(rejected, vec![("aaa-intruder".into(), "vtep_mac_conflict")]);
    }

    #[test]
    fn a_derived_mac_stays_with_its_slice_whatever_the_age() {
        let mac = derived("10.244.1.0/24");
        for copier_created in [100, 200, 300] {
            let owner = publishing("node-1", "10.244.1.0/24", mac, 200);
            let copier = publishing("aaa-copier", "10.244.6.0/24", mac, copier_created);
            let (config, local) = (config(), local());
            let peers = [copier, owner];
            let screened = screen(&rules(&config, &local), &peers);
            let accepted: Vec<_> = screened.accepted.iter().map(|p| &p.node_name).collect();
            assert_eq!(
                accepted,
                vec!["node-1"],
                "copier created at {copier_created}"
            );
            let rejected = &screened.rejected[0];
            assert_eq!(rejected.node_name, "aaa-copier");
            assert_eq!(rejected.reason.label(), "vtep_mac_conflict");
            assert!(
                rejected.reason.to_string().contains("node-1"),
                "{}",
                rejected.reason
            );
        }
    }

    #[test]
    fn a_derived_mac_is_kept_for_an_owner_that_still_publishes_a_legacy_one() {
        let owner = peer("node-1", "10.244.1.0/24", "172.31.0.11", 1, 200);
        let squatter = publishing(
            "aaa-squatter",
            "10.244.6.0/24",
            derived("10.244.1.0/24"),
            100,
        );
        let (accepted, rejected) = outcome(&[squatter, owner]);
        assert_eq!(accepted, vec!["node-1"]);
        assert_eq!(rejected, vec![("aaa-squatter".into(), "vtep_mac_conflict")]);
    }

    #[test]
    fn a_peer_claiming_this_nodes_address_is_refused_as_own_whatever_its_age() {
        // This node publishes an overwrite; its underlay address stays its
        // own too. Its own Node's age never enters the decision.
        let (config, local) = (config(), local());
        let rules = Rules {
            public_ip: "203.0.113.10".parse().unwrap(),
            ..rules(&config, &local)
        };
        for ip in ["203.0.113.10", "172.31.0.10"] {
            let older = peer("node-0", "10.244.1.0/24", ip, 1, -100);
            let screened = screen(&rules, [&older]);
            assert!(screened.accepted.is_empty(), "{ip}");
            assert_eq!(screened.rejected[0].reason.label(), "public_ip_own", "{ip}");
        }
    }

    #[test]
    fn claimants_created_in_the_same_second_are_all_refused() {
        let peers = [
            peer("node-b", "10.244.1.0/24", "172.31.0.11", 1, 100),
            peer("node-c", "10.244.1.0/24", "172.31.0.12", 2, 100),
            peer("node-d", "10.244.1.0/24", "172.31.0.13", 3, 300),
            peer("node-e", "10.244.5.0/24", "172.31.0.14", 5, 100),
        ];
        let (accepted, rejected) = outcome(&peers);
        assert_eq!(accepted, vec!["node-e"]);
        let names: Vec<_> = rejected.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, vec!["node-b", "node-c", "node-d"]);
    }

    #[test]
    fn every_label_is_listed() {
        let slice: IpNet = "10.244.1.0/24".parse().unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mac = OWN_MAC;
        let holder = String::new;
        let all = [
            Rejection::Malformed {
                field: "",
                value: String::new(),
            },
            Rejection::OutsideClusterCidr(slice),
            Rejection::SliceSize { slice, size: 24 },
            Rejection::OverlapsOwnSlice(slice),
            Rejection::OverlapsUnderlay(slice),
            Rejection::SliceTaken {
                slice,
                holder: holder(),
            },
            Rejection::UnusablePublicIp(ip),
            Rejection::OwnPublicIp(ip),
            Rejection::PublicIpInClusterCidr(ip),
            Rejection::OwnVtepMac(mac),
            Rejection::VtepMacDerived {
                mac,
                owner: holder(),
            },
            Rejection::VtepMacTaken {
                mac,
                holder: holder(),
            },
        ];
        let mut labels: Vec<_> = all.iter().map(Rejection::label).collect();
        labels.dedup();
        assert_eq!(labels, Rejection::LABELS);
    }

    /// Slices a hostile or careless peer might claim: cluster slices (some
    /// this node's), slices of other sizes and alignments, the underlay's
    /// neighbourhood and arbitrary networks of both families.
    fn any_slice() -> impl Strategy<Value = IpNet> {
        let v4 = |a: u32, len: u8| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), len).unwrap());
        let v6 = |a: u128, len: u8| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).unwrap());
        prop_oneof![
            6 => (0u32..8).prop_map(move |x| v4(0x0af4_0000 | x << 8, 24)),
            1 => (0u32..8, 20u8..=28).prop_map(move |(x, len)| v4(0x0af4_0000 | x << 8, len)),
            1 => (0u32..4, 16u8..=32).prop_map(move |(x, len)| v4(0xac1f_0000 | x << 8, len)),
            1 => (any::<u32>(), 0u8..=32).prop_map(move |(a, len)| v4(a, len)),
            3 => (0u128..4).prop_map(move |x| v6(0xfd00_0010_0244_0000 << 64 | x << 64, 64)),
            1 => (any::<u128>(), 0u8..=128).prop_map(move |(a, len)| v6(a, len)),
        ]
    }

    /// Public IPs: sound ones, this node's, unusable and in-cluster ones,
    /// and arbitrary addresses of both families.
    fn any_public_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            8 => (11u8..20).prop_map(|x| IpAddr::from([172, 31, 0, x])),
            1 => Just(IpAddr::from([172, 31, 0, 10])),
            1 => Just(IpAddr::from([127, 0, 0, 1])),
            1 => Just(IpAddr::from([0, 0, 0, 0])),
            1 => Just(IpAddr::from([224, 0, 0, 1])),
            1 => (any::<u8>()).prop_map(|x| IpAddr::from([10, 244, 3, x])),
            1 => any::<u32>().prop_map(|a| IpAddr::from(Ipv4Addr::from(a))),
            1 => any::<u128>().prop_map(|a| IpAddr::from(Ipv6Addr::from(a))),
        ]
    }

    /// What a peer publishes as its MAC.
    #[derive(Debug, Clone, Copy)]
    enum MacChoice {
        None,
        /// A [`legacy_mac`].
        Legacy(u8),
        /// The one its own slices derive, as agents publish.
        OwnDerived,
        /// The one derived from the cluster slice 10.244.x.0/24 (x = 0 is
        /// this node's).
        DerivedFrom(u8),
    }

    fn any_mac_choice() -> impl Strategy<Value = MacChoice> {
        prop_oneof![
            1 => Just(MacChoice::None),
            3 => (0u8..6).prop_map(MacChoice::Legacy),
            3 => Just(MacChoice::OwnDerived),
            3 => (0u8..8).prop_map(MacChoice::DerivedFrom),
        ]
    }

    prop_compose! {
        fn any_peer(name: String)(
            pod_cidrs in proptest::collection::vec(any_slice(), 0..3),
            public_ip in any_public_ip(),
            mac in any_mac_choice(),
            created in 0i64..4,
        ) -> Peer {
            let vtep_mac = match mac {
                MacChoice::None => None,
                MacChoice::Legacy(last) => Some(legacy_mac(last)),
                MacChoice::OwnDerived => VtepMac::for_slices(&pod_cidrs),
                MacChoice::DerivedFrom(x) => Some(derived(&format!("10.244.{x}.0/24"))),
            };
            Peer {
                node_name: name.clone(),
                pod_cidrs,
                public_ip,
                vtep_mac,
                created,
                malformed: None,
            }
        }
    }

    fn any_peers() -> impl Strategy<Value = Vec<Peer>> {
        (0usize..12).prop_flat_map(|n| {
            (0..n)
                .map(|i| any_peer(format!("p{i}")))
                .collect::<Vec<_>>()
        })
    }

    fn accepted_names(peers: &[Peer]) -> BTreeSet<String> {
        outcome(peers).0.into_iter().collect()
    }

    proptest! {
        /// Whatever peers publish, what is accepted stays inside the cluster
        /// CIDR of its family at the slice size, clear of this node's slices
        /// and underlay subnet and of every other accepted peer, with a
        /// usable foreign public IP and a MAC of its own.
        #[test]
        fn accepted_peers_never_reach_outside_their_place(peers in any_peers()) {
            let (config, local) = (config(), local());
            let rules = rules(&config, &local);
            let screened = screen(&rules, &peers);
            prop_assert_eq!(screened.accepted.len() + screened.rejected.len(), peers.len());
            let mut slices: Vec<IpNet> = Vec::new();
            let mut macs = BTreeSet::new();
            for peer in &screened.accepted {
                for slice in &peer.pod_cidrs {
                    let family = IpFamily::of(slice);
                    prop_assert!(config.cluster_cidrs.iter().any(|c| IpFamily::of(c) == family && c.contains(slice)), "{slice}");
                    prop_assert_eq!(slice.prefix_len(), config.slice_size(family));
                    prop_assert_eq!(slice.trunc(), *slice);
                    prop_assert!(!local.pod_cidrs.iter().any(|own| overlaps(own, slice)), "{slice}");
                    prop_assert!(!overlaps(&local.underlay.trunc(), slice), "{slice}");
                    prop_assert!(!slices.iter().any(|other| overlaps(other, slice)), "{slice} twice");
                    slices.push(*slice);
                }
                let ip = peer.public_ip;
                prop_assert!(!(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast()), "{ip}");
                prop_assert!(ip != rules.public_ip && !config.cluster_cidrs.iter().any(|c| c.contains(&ip)), "{ip}");
                if let Some(mac) = peer.vtep_mac {
                    prop_assert!(mac != OWN_MAC && macs.insert(mac), "{mac}");
                }
            }
        }

        /// The outcome depends neither on the order peers come in nor on
        /// their names.
        #[test]
        fn order_and_names_decide_nothing(mut peers in any_peers()) {
            let before = accepted_names(&peers);
            peers.reverse();
            prop_assert_eq!(&accepted_names(&peers), &before);
            for peer in &mut peers {
                peer.node_name = format!("{}-renamed", peer.node_name);
            }
            let renamed: BTreeSet<String> = before.iter().map(|name| format!("{name}-renamed")).collect();
            prop_assert_eq!(accepted_names(&peers), renamed);
        }

        /// A Node created after every other one, whatever it claims, takes
        /// nothing from a peer that was accepted before it came, but the
        /// MAC its own slice derives (which no agent publishes for another
        /// node's).
        #[test]
        fn a_newcomer_moves_nothing(mut peers in any_peers(), newcomer in any_peer("newcomer".into())) {
            let before = accepted_names(&peers);
            let newcomer_mac = VtepMac::for_slices(&newcomer.pod_cidrs);
            let holding_newcomer_mac: BTreeSet<String> = peers
                .iter()
                .filter(|peer| newcomer_mac.is_some() && peer.vtep_mac == newcomer_mac)
                .map(|peer| peer.node_name.clone())
                .collect();
            peers.push(Peer { created: 4, ..newcomer });
            let after = accepted_names(&peers);
            let kept: BTreeSet<String> = before.difference(&holding_newcomer_mac).cloned().collect();
            prop_assert!(kept.is_subset(&after), "{before:?} then {after:?}");
        }

        /// Peers copying the MAC an accepted peer derives from its slice
        /// never displace it, whenever their Nodes were created (in the
        /// same second included), whatever their names and wherever they
        /// come in the list; each copier is rejected.
        #[test]
        fn a_copier_never_displaces_a_derived_mac_owner(
            mut peers in any_peers(),
            owner_slice in 8u8..12,
            owner_created in 0i64..4,
            copiers in proptest::collection::vec(
                (any_peer("copier".into()), any::<prop::sample::Index>(), "[a-z]{1,8}"),
                1..4,
            ),
        ) {
            let slice = format!("10.244.{owner_slice}.0/24");
            let mac = derived(&slice);
            peers.push(Peer {
                public_ip: IpAddr::from([172, 31, 0, 100 + owner_slice]),
                ..publishing("owner", &slice, mac, owner_created)
            });
            prop_assume!(accepted_names(&peers).contains("owner"));
            let owner_net: IpNet = slice.parse().unwrap();
            let mut copier_names = BTreeSet::new();
            for (copier, at, name) in copiers {
                // Its own slices only: the controller never gives out the
                // owner's twice.
                let pod_cidrs = copier.pod_cidrs.into_iter().filter(|s| !overlaps(s, &owner_net)).collect();
                let name = format!("copier-{name}-{}", copier_names.len());
                copier_names.insert(name.clone());
                let copier = Peer { node_name: name, pod_cidrs, vtep_mac: Some(mac), ..copier };
                peers.insert(at.index(peers.len() + 1), copier);
            }
            let (accepted, rejected) = outcome(&peers);
            prop_assert!(accepted.iter().any(|name| name == "owner"), "{rejected:?}");
            for (name, _) in &rejected {
                copier_names.remove(name);
            }
            prop_assert!(copier_names.is_empty(), "copiers accepted: {copier_names:?}");
        }
    }

    #[test]
    fn rejections_name_the_annotation() {
        let taken = Rejection::SliceTaken {
            slice: "fd00:10:244:1::/64".parse().unwrap(),
            holder: "node-1".into(),
        };
        assert_eq!(taken.field(), "weft.dev/pod-cidr-v6");
        assert!(taken.to_string().contains("node-1"));
        let ip = Rejection::UnusablePublicIp("127.0.0.1".parse().unwrap());
        assert_eq!(ip.field(), "weft.dev/public-ip");
    }
}
