//! The `weft.dev/*` annotations Weft keeps on Node objects, and their formats.
//!
//! Pod CIDR annotations hold one CIDR in its usual text form
//! (`10.244.3.0/24`, `fd00:10:0:3::/64`). The controller writes each once,
//! where it is unset, even when `spec.podCIDRs` carries the same slice, and
//! never changes or removes it (the write policy holds it to that), so that
//! `kubectl get nodes -o custom-columns=NAME:.metadata.name,CIDR:.metadata.annotations.weft\.dev/pod-cidr`
//! shows every node's slice, and so an IPv6 slice can be recorded on a node
//! whose immutable `spec.podCIDRs` was set single-stack.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ip::IpFamily;

/// The node's IPv4 pod CIDR slice.
pub const POD_CIDR: &str = "weft.dev/pod-cidr";

/// The node's IPv6 pod CIDR slice (dual-stack clusters only).
pub const POD_CIDR_V6: &str = "weft.dev/pod-cidr-v6";

/// The pod CIDR annotation key for `family`.
pub fn pod_cidr_key(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => POD_CIDR,
        IpFamily::V6 => POD_CIDR_V6,
    }
}

/// The backend the node's agent runs: `vxlan`, `host-gw` or `direct`.
/// Written by the agent.
pub const BACKEND_TYPE: &str = "weft.dev/backend-type";

/// Backend parameters peers need, as JSON: `{"vtepMAC":"0a:58:0a:f4:01:00"}`
/// for a node with a VXLAN device ([`BackendData`]). Written by the agent;
/// it is also where the agent restores its VTEP MAC from after a restart.
pub const BACKEND_DATA: &str = "weft.dev/backend-data";

/// The underlay address peers send tunnel packets and host-gw traffic to.
/// Written by the agent.
pub const PUBLIC_IP: &str = "weft.dev/public-ip";

/// Set by an operator to make the agent publish this address as
/// [`PUBLIC_IP`] instead of the node's own (e.g. a node behind NAT).
pub const PUBLIC_IP_OVERWRITE: &str = "weft.dev/public-ip-overwrite";

/// The JSON value of [`BACKEND_DATA`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendData {
    /// The MAC of the node's `weft.1` device, `aa:bb:cc:dd:ee:ff`; absent
    /// for host-gw nodes.
    #[serde(rename = "vtepMAC", default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<VtepMac>,
}

/// The MAC address of a node's VXLAN tunnel endpoint (the `weft.1` device).
///
/// Published in the node's `weft.dev/backend-data` annotation; peers point
/// their neighbour and FDB entries at it. The agent derives it from the
/// node's slice ([`VtepMac::for_slices`]), so it stays the same while the
/// node keeps its slice, survives device re-creation without being stored,
/// and has exactly one rightful holder: peers give a derived MAC to the node
/// whose slice it comes from, whoever else publishes it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VtepMac([u8; 6]);

/// Why a string is not a VTEP MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a usable unicast MAC address: write six hex octets separated by ':', not all zero and with the multicast bit clear, e.g. 0a:58:0a:f4:01:00")]
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

    /// The MAC derived from `slice`: `0a:58` (locally administered, unicast)
    /// followed by the last four bytes of the slice's network part. For
    /// IPv4 that is the whole network address (`10.244.1.0/24` gives
    /// `0a:58:0a:f4:01:00`). For IPv6 it is the 32 bits that end at the
    /// prefix (`fd00:10:244:1::/64` gives `0a:58:02:44:00:01`), not the
    /// address's last bytes, which are zero in every slice of /96 or wider.
    /// Distinct IPv4 slices always give distinct MACs; IPv6 slices of one
    /// size do as long as their cluster CIDR holds at most 2^32 of them.
    pub fn derived_from(slice: &IpNet) -> Self {
        let tail = match slice.network() {
            IpAddr::V4(network) => network.octets(),
            IpAddr::V6(network) => {
                let host_bits = 128 - u32::from(slice.prefix_len());
                let network_part = u128::from(network).checked_shr(host_bits).unwrap_or(0);
                // Truncating keeps the low 32 bits, where slices differ.
                (network_part as u32).to_be_bytes()
            }
        };
        let [a, b, c, d] = tail;
        VtepMac([0x0a, 0x58, a, b, c, d])
    }

    /// The MAC a node with `slices` uses: derived from its IPv4 slice, else
    /// from its IPv6 slice; `None` for a node without a slice. Agents and
    /// peers both use this one choice, so they agree on who holds a MAC.
    pub fn for_slices(slices: &[IpNet]) -> Option<Self> {
        [IpFamily::V4, IpFamily::V6].into_iter().find_map(|family| {
            slices
                .iter()
                .find(|slice| IpFamily::of(slice) == family)
                .map(Self::derived_from)
        })
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
        // All zero is no address; the kernel refuses it in an FDB entry.
        if parts.next().is_some() || octets[0] & 0x01 != 0 || octets == [0; 6] {
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
    fn mac_rejects_malformed_multicast_and_zero() {
        for bad in [
            "00:00:00:00:00:00",
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
    fn macs_derive_from_the_slice_network_part() {
        let derived = |slice: &str| VtepMac::derived_from(&slice.parse().unwrap()).to_string();
        assert_eq!(derived("10.244.1.0/24"), "0a:58:0a:f4:01:00");
        assert_eq!(derived("10.244.255.128/25"), "0a:58:0a:f4:ff:80");
        assert_eq!(derived("fd00:10:244:1::/64"), "0a:58:02:44:00:01");
        assert_eq!(derived("fd00:10:244:1:0:0:7:0/112"), "0a:58:00:00:00:07");
        assert_eq!(derived("fd00::/60"), "0a:58:00:00:00:00");
        assert_eq!(derived("::/0"), "0a:58:00:00:00:00");
        // Derived MACs are usable unicast addresses.
        let mac = derived("0.0.0.0/24");
        assert_eq!(mac.parse::<VtepMac>().unwrap().to_string(), mac);
    }

    #[test]
    fn a_node_uses_its_ipv4_slice_and_else_its_ipv6_slice() {
        let slices = |list: &[&str]| -> Vec<IpNet> {
            list.iter().map(|slice| slice.parse().unwrap()).collect()
        };
        let dual = slices(&["fd00:10:244:3::/64", "10.244.3.0/24"]);
        let v6_only = slices(&["fd00:10:244:3::/64"]);
        assert_eq!(
            VtepMac::for_slices(&dual).unwrap().to_string(),
            "0a:58:0a:f4:03:00"
        );
        assert_eq!(
            VtepMac::for_slices(&v6_only).unwrap().to_string(),
            "0a:58:02:44:00:03"
        );
        assert_eq!(VtepMac::for_slices(&[]), None);
    }
}
