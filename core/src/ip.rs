//! IP families and the address arithmetic the allocator and IPAM share:
//! an address as a 128-bit number and back, so ranges and slices are plain
//! integer steps in either family.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// An IP address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of a network.
    pub fn of(net: &IpNet) -> Self {
        Self::of_addr(net.addr())
    }

    /// The family of an address.
    pub fn of_addr(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The address length in bits: 32 or 128.
    pub fn max_prefix_len(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }

    /// The default prefix length of a node's slice, the `sliceSizeV4` and
    /// `sliceSizeV6` settings of the controller and the agent: /24 (254 pods)
    /// for IPv4, /64 (the conventional subnet) for IPv6.
    pub fn default_slice_prefix(self) -> u8 {
        match self {
            IpFamily::V4 => 24,
            IpFamily::V6 => 64,
        }
    }

    /// The address of this family whose number is `bits`. For IPv4 only the
    /// low 32 bits count; callers pass numbers taken from IPv4 addresses.
    pub fn addr_from_bits(self, bits: u128) -> IpAddr {
        match self {
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(bits as u32)),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(bits)),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        })
    }
}

/// An address as a number: IPv4 in the low 32 bits, IPv6 in all 128.
pub fn addr_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The forwarding switch of `family` in `/proc/sys/net`.
fn forwarding_sysctl(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "/proc/sys/net/ipv4/ip_forward",
        IpFamily::V6 => "/proc/sys/net/ipv6/conf/all/forwarding",
    }
}

/// Turns on forwarding for `family` in the network namespace of the calling
/// thread (`/proc/sys/net` shows the namespace of whoever opens it). Reading
/// first keeps the common case, already on, free of writes. On failure the
/// error names the sysctl path.
pub fn enable_forwarding(family: IpFamily) -> Result<(), ForwardingError> {
    let path = forwarding_sysctl(family);
    let on = std::fs::read_to_string(path)
        .map_err(|source| ForwardingError { path, source })?
        .trim()
        == "1";
    if !on {
        std::fs::write(path, "1").map_err(|source| ForwardingError { path, source })?;
    }
    Ok(())
}

/// Forwarding could not be read or turned on.
#[derive(Debug, thiserror::Error)]
#[error("cannot enable forwarding via {path}: {source}; run as root with /proc mounted")]
pub struct ForwardingError {
    /// The sysctl file.
    pub path: &'static str,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_in_both_families() {
        for text in ["10.244.3.7", "255.255.255.255", "fd00::1", "::"] {
            let addr: IpAddr = text.parse().unwrap();
            let family = IpFamily::of_addr(addr);
            assert_eq!(family.addr_from_bits(addr_bits(addr)), addr);
        }
    }

    #[test]
    fn family_of_network() {
        assert_eq!(IpFamily::of(&"10.0.0.0/8".parse().unwrap()), IpFamily::V4);
        assert_eq!(IpFamily::of(&"fd00::/8".parse().unwrap()), IpFamily::V6);
        assert_eq!(IpFamily::V6.max_prefix_len(), 128);
    }
}
