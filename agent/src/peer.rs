//! What the agent knows about nodes: its own node and the peers it routes to.
//!
//! Only the fields routing needs are kept per node (never whole Node
//! objects), so a cluster of 5,000 nodes costs the agent about 1.3 MiB.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use weft_core::annotations::VtepMac;

/// Another node, as far as routing to it is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The Node's name.
    pub node_name: String,
    /// Its pod-CIDR slices (one IPv4 and/or one IPv6).
    pub pod_cidrs: Vec<IpNet>,
    /// The address its agent published as `weft.dev/public-ip`: where tunnel
    /// packets and host-gw routes go.
    pub public_ip: IpAddr,
    /// Its VTEP MAC, absent when the node runs without a VXLAN device
    /// (host-gw) or its agent has not published one yet.
    pub vtep_mac: Option<VtepMac>,
    /// The Node's `creationTimestamp` in seconds since the epoch. The API
    /// server sets it and nobody can change it, so it decides which of two
    /// nodes claiming one slice or MAC keeps it (see [`crate::screen`]).
    pub created: i64,
    /// An annotation that does not parse, which gets the peer rejected.
    /// Boxed: almost every peer has none, and 5,000 peers are kept.
    pub malformed: Option<Box<MalformedField>>,
}

/// A peer annotation whose value does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedField {
    /// The annotation key.
    pub field: &'static str,
    /// The value found.
    pub value: String,
}

/// Every peer, keyed by node name so iteration order (and so every decision
/// made from it) is deterministic.
pub type PeerSet = BTreeMap<String, Peer>;

/// This node, as the overlay needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// The Node's name.
    pub name: String,
    /// Its own slices; never routed through the overlay.
    pub pod_cidrs: Vec<IpNet>,
    /// The node's underlay address with the prefix of its subnet. Peers
    /// inside that subnet are one L2 hop away (host-gw, direct routing).
    pub underlay: IpNet,
}

impl LocalNode {
    /// Whether `ip` sits on this node's underlay subnet, i.e. is reachable
    /// without a router.
    pub fn shares_underlay_subnet(&self, ip: IpAddr) -> bool {
        self.underlay.contains(&ip)
    }
}

/// The VTEP address of a slice: its network address. It is assigned to the
/// slice owner's `weft.1` (/32 or /128) and is never handed to a pod: the
/// plugin's allocatable range leaves out a slice's network address.
pub fn vtep_address(slice: &IpNet) -> IpAddr {
    slice.network()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_address_is_the_slice_network_address() {
        let v4: IpNet = "10.244.3.0/24".parse().unwrap();
        let v6: IpNet = "fd00:10:244:3::/64".parse().unwrap();
        assert_eq!(vtep_address(&v4), "10.244.3.0".parse::<IpAddr>().unwrap());
        assert_eq!(
            vtep_address(&v6),
            "fd00:10:244:3::".parse::<IpAddr>().unwrap()
        );
    }
}
