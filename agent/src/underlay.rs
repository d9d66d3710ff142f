//! Choosing the underlay: the interface and address tunnel packets and
//! host-gw routes use.

use std::net::IpAddr;

use ipnet::IpNet;

use weft_core::netlink::{Address, Link, Netlink, NetlinkError};

/// How the operator (or the Node object) names the underlay.
#[derive(Debug, Clone)]
pub enum UnderlayChoice {
    /// The link carrying this address (the Node's InternalIP).
    Address(IpAddr),
    /// The link with this name (`iface`), preferring an address of
    /// `family_of`'s family.
    Interface {
        /// Link name.
        name: String,
        /// An address whose family is preferred (the InternalIP).
        family_of: Option<IpAddr>,
    },
    /// The first link, by index, whose name matches (`ifaceRegex`) and that
    /// has a usable address.
    Pattern {
        /// The compiled pattern.
        pattern: regex::Regex,
        /// An address whose family is preferred (the InternalIP).
        family_of: Option<IpAddr>,
    },
}

/// The chosen underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Link index.
    pub link_index: u32,
    /// Link name.
    pub link_name: String,
    /// The node's address on it, with the subnet prefix.
    pub address: IpNet,
    /// The link's MTU.
    pub mtu: u32,
}

impl Underlay {
    /// Bytes a VXLAN encapsulation adds on this underlay: outer IP + UDP +
    /// VXLAN + inner Ethernet (20+8+8+14 = 50 over IPv4, 40+8+8+14 = 70 over
    /// IPv6).
    pub fn vxlan_overhead(&self) -> u32 {
        match self.address {
            IpNet::V4(_) => 50,
            IpNet::V6(_) => 70,
        }
    }
}

/// Why no underlay could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    /// Reading links or addresses failed.
    #[error("reading links and addresses to find the underlay: {0}")]
    Netlink(#[from] NetlinkError),
    /// Nothing fits the choice.
    #[error("no underlay interface: {what}; {fix}")]
    NotFound {
        /// What was looked for.
        what: String,
        /// What to change.
        fix: &'static str,
    },
}

/// Whether an address can carry tunnel traffic to other nodes (not
/// loopback, link-local or multicast).
fn usable(address: &IpNet) -> bool {
    match address.addr() {
        IpAddr::V4(ip) => {
            !(ip.is_loopback() || ip.is_link_local() || ip.is_multicast() || ip.is_unspecified())
        }
        IpAddr::V6(ip) => {
            !(ip.is_loopback()
                || ip.is_multicast()
                || ip.is_unspecified()
                || (ip.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Picks the underlay from the namespace's links and addresses.
pub fn select_underlay(
    links: &[Link],
    addresses: &[Address],
    choice: &UnderlayChoice,
) -> Result<Underlay, UnderlayError> {
    let on_link = |link: &Link, family_of: Option<IpAddr>| -> Option<Underlay> {
        let mut candidates: Vec<&Address> = addresses
            .iter()
            .filter(|a| a.link_index == link.index && usable(&a.address))
            .collect();
        // Preferred family first, IPv4 before IPv6 otherwise; stable sort
        // keeps the kernel's order (primary address first) within a family.
        candidates.sort_by_key(|a| match family_of {
            Some(preferred) => a.address.addr().is_ipv4() != preferred.is_ipv4(),
            None => a.address.addr().is_ipv6(),
        });
        candidates.first().map(|a| Underlay {
            link_index: link.index,
            link_name: link.name.clone(),
            address: a.address,
            mtu: link.mtu,
        })
    };
    match choice {
        UnderlayChoice::Address(ip) => {
            let address = addresses.iter().find(|a| a.address.addr() == *ip).ok_or_else(|| UnderlayError::NotFound {
                what: format!("no link in this namespace has the node address {ip}"),
                fix: "run the agent in the node's host network namespace, or name the interface with iface / ifaceRegex",
            })?;
            let link = links
                .iter()
                .find(|l| l.index == address.link_index)
                .ok_or_else(|| UnderlayError::NotFound {
                    what: format!("the link holding {ip} vanished while it was read"),
                    fix: "retry; the agent does so by itself",
                })?;
            Ok(Underlay {
                link_index: link.index,
                link_name: link.name.clone(),
                address: address.address,
                mtu: link.mtu,
            })
        }
        UnderlayChoice::Interface { name, family_of } => {
            let link =
                links
                    .iter()
                    .find(|l| &l.name == name)
                    .ok_or_else(|| UnderlayError::NotFound {
                        what: format!("no link called {name}"),
                        fix: "set iface to an existing interface name (see `ip link`)",
                    })?;
            on_link(link, *family_of).ok_or_else(|| UnderlayError::NotFound {
                what: format!("link {name} has no global address"),
                fix: "give the interface an address or choose another one with iface",
            })
        }
        UnderlayChoice::Pattern { pattern, family_of } => {
            let mut matching: Vec<&Link> =
                links.iter().filter(|l| pattern.is_match(&l.name)).collect();
            matching.sort_by_key(|l| l.index);
            matching
                .into_iter()
                .find_map(|link| on_link(link, *family_of))
                .ok_or_else(|| UnderlayError::NotFound {
                    what: format!("no link whose name matches {pattern} has a global address"),
                    fix: "adjust ifaceRegex (see `ip -br addr`)",
                })
        }
    }
}

/// Reads the namespace's links and addresses and picks the underlay.
pub async fn find_underlay(
    netlink: &Netlink,
    choice: &UnderlayChoice,
) -> Result<Underlay, UnderlayError> {
    let links = netlink.links().await?;
    let addresses = netlink.addresses(None).await?;
    select_underlay(&links, &addresses, choice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, mtu: u32) -> Link {
        Link {
            index,
            name: name.into(),
            kind: None,
            mtu,
            up: true,
            mac: None,
            controller: None,
            alias: None,
            peer_index: None,
        }
    }

    fn address(link_index: u32, text: &str) -> Address {
        Address {
            link_index,
            address: text.parse().unwrap(),
        }
    }

    fn namespace() -> (Vec<Link>, Vec<Address>) {
        (
            vec![
                link(1, "lo", 65536),
                link(2, "eth0", 1500),
                link(3, "eth1", 9000),
            ],
            vec![
                address(1, "127.0.0.1/8"),
                address(2, "fe80::1/64"),
                address(2, "fd00:31::10/64"),
                address(2, "172.31.0.10/24"),
                address(3, "192.168.9.10/24"),
            ],
        )
    }

    #[test]
    fn node_address_picks_its_link_and_prefix() {
        let (links, addresses) = namespace();
        let underlay = select_underlay(
            &links,
            &addresses,
            &UnderlayChoice::Address("172.31.0.10".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(underlay.link_name, "eth0");
        assert_eq!(underlay.address, "172.31.0.10/24".parse::<IpNet>().unwrap());
        assert_eq!(underlay.mtu, 1500);
        assert_eq!(underlay.vxlan_overhead(), 50);
    }

    #[test]
    fn interface_name_prefers_the_node_address_family() {
        let (links, addresses) = namespace();
        let v4 = select_underlay(
            &links,
            &addresses,
            &UnderlayChoice::Interface {
                name: "eth0".into(),
                family_of: None,
            },
        )
        .unwrap();
        assert_eq!(v4.address.to_string(), "172.31.0.10/24");
        let v6 = select_underlay(
            &links,
            &addresses,
            &UnderlayChoice::Interface {
                name: "eth0".into(),
                family_of: Some("fd00::1".parse().unwrap()),
            },
        )
        .unwrap();
        assert_eq!(v6.address.to_string(), "fd00:31::10/64");
        assert_eq!(v6.vxlan_overhead(), 70);
    }

    #[test]
    fn pattern_takes_the_first_usable_match() {
        let (links, addresses) = namespace();
        let choice = UnderlayChoice::Pattern {
            pattern: regex::Regex::new("^eth[13]$|^lo$").unwrap(),
            family_of: None,
        };
        let underlay = select_underlay(&links, &addresses, &choice).unwrap();
        assert_eq!(underlay.link_name, "eth1");
    }

    #[test]
    fn misses_say_what_to_change() {
        let (links, addresses) = namespace();
        let cases = [
            (
                UnderlayChoice::Address("10.9.9.9".parse().unwrap()),
                "iface",
            ),
            (
                UnderlayChoice::Interface {
                    name: "wlan0".into(),
                    family_of: None,
                },
                "iface",
            ),
            (
                UnderlayChoice::Interface {
                    name: "lo".into(),
                    family_of: None,
                },
                "iface",
            ),
            (
                UnderlayChoice::Pattern {
                    pattern: regex::Regex::new("^ens").unwrap(),
                    family_of: None,
                },
                "ifaceRegex",
            ),
        ];
        for (choice, key) in cases {
            let error = select_underlay(&links, &addresses, &choice).unwrap_err();
            assert!(error.to_string().contains(key), "{error}");
        }
    }
}
