//! What the agent knows about nodes: its own node and the peers it routes to.
//!
//! Only the fields routing needs are kept per node (never whole Node
//! objects), so a cluster of 5,000 nodes costs the agent a few hundred KiB.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The MAC address of a node's VXLAN tunnel endpoint (the `weft.1` device).
///
/// Published in the node's `weft.dev/backend-data` annotation; peers point
/// their neighbour and FDB entries at it, so it must not change while the
/// node lives (the agent restores it from that annotation when it recreates
/// the device).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VtepMac([u8; 6]);

/// Why a string is not a VTEP MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a unicast MAC address: write six hex octets separated by ':', e.g. 0a:58:0a:f4:01:00")]
pub struct VtepMacError {
    /// The rejected text.
    pub input: String,
}

impl VtepMac {
    /// Wraps six octets. Callers pass unicast addresses (the kernel refuses a
    /// multicast address on a link).
    pub const fn new(octets: [u8; 6]) -> Self {
        VtepMac(octets)
    }

    /// The six octets, for netlink.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// A fresh random, locally administered unicast address, for a node that
    /// has never published one.
    pub fn random() -> std::io::Result<Self> {
        use std::io::Read;
        let mut octets = [0u8; 6];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut octets)?;
        // Clear the multicast bit, set the locally-administered bit.
        octets[0] = (octets[0] & 0xfe) | 0x02;
        Ok(VtepMac(octets))
    }
}

impl TryFrom<&[u8]> for VtepMac {
    type Error = VtepMacError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let octets: [u8; 6] = bytes.try_into().map_err(|_| VtepMacError {
            input: format!("{bytes:02x?}"),
        })?;
        Ok(VtepMac(octets))
    }
}

impl fmt::Display for VtepMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for VtepMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for VtepMac {
    type Err = VtepMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || VtepMacError {
            input: s.to_string(),
        };
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(error)?;
            if part.len() != 2 {
                return Err(error());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() || octets[0] & 0x01 != 0 {
            return Err(error());
        }
        Ok(VtepMac(octets))
    }
}

impl Serialize for VtepMac {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VtepMac {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

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
/// slice owner's `weft.1` (/32 or /128) and is never handed to a pod, since
/// the plugin's allocatable range starts after the gateway.
pub fn vtep_address(slice: &IpNet) -> IpAddr {
    slice.network()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_through_text_and_json() {
        let mac: VtepMac = "0a:58:0A:f4:01:ff".parse().unwrap();
        assert_eq!(mac.octets(), [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0xff]);
        assert_eq!(mac.to_string(), "0a:58:0a:f4:01:ff");
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"0a:58:0a:f4:01:ff\"");
        assert_eq!(serde_json::from_str::<VtepMac>(&json).unwrap(), mac);
    }

    #[test]
    fn mac_rejects_malformed_and_multicast() {
        for bad in [
            "",
            "0a:58:0a:f4:01",
            "0a:58:0a:f4:01:ff:00",
            "0a:58:0a:f4:1:ff",
            "zz:58:0a:f4:01:ff",
            "01:00:5e:00:00:01",
        ] {
            let error = bad.parse::<VtepMac>().unwrap_err();
            assert!(error.to_string().contains("six hex octets"), "{bad}");
        }
    }

    #[test]
    fn random_mac_is_local_unicast() {
        let mac = VtepMac::random().unwrap();
        assert_eq!(mac.octets()[0] & 0x03, 0x02);
    }

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
