//! The effective network of one invocation: the plugin config merged with
//! the node file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnet::IpNet;

use crate::cni::{CniError, Dns, ErrorCode, NetConf, Route};
use crate::ipam::{AllocRange, Store};
use weft_core::ip::IpFamily;
use weft_core::nodefile::NodeConfig;

/// The smallest MTU IPv6 allows on a link.
const IPV6_MIN_MTU: u32 = 1280;

/// Every pod's IPv4 next hop. It is on no interface: the pod resolves it
/// with a permanent neighbour entry to its host veth's MAC, and the node
/// forwards whatever arrives there. Link-local, so it never collides with
/// a pod or node address and no node forwards it.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Every pod's IPv6 next hop, resolved like [`POD_GATEWAY_V4`].
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// One address family of the pod network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyNetwork {
    /// The pod subnet: the node's slice, or the config's `subnet` override.
    pub subnet: IpNet,
    /// The addresses IPAM may hand out.
    pub range: AllocRange,
    /// Destinations the pod routes via [`FamilyNetwork::gateway`]: the
    /// default route when `isDefaultGateway` is set, else the cluster CIDRs
    /// of this family.
    pub route_dsts: Vec<IpNet>,
}

impl FamilyNetwork {
    /// This family's IP family.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.subnet)
    }

    /// The pods' next hop in this family: [`POD_GATEWAY_V4`] or
    /// [`POD_GATEWAY_V6`].
    pub fn gateway(&self) -> IpAddr {
        match self.family() {
            IpFamily::V4 => POD_GATEWAY_V4.into(),
            IpFamily::V6 => POD_GATEWAY_V6.into(),
        }
    }
}

/// A pod's address as its interface carries it: alone (/32 or /128), so
/// the pod shares no subnet with anyone and sends everything to its gateway.
pub fn pod_address(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Everything the plugin needs to attach a pod, after merging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The network name.
    pub name: String,
    /// MTU for both veth ends.
    pub mtu: u32,
    /// The IPAM store directory (`<dataDir>/<name>`).
    pub ipam_dir: PathBuf,
    /// Resolver settings to return in the result.
    pub dns: Dns,
    /// IPv4 first, then IPv6; one entry per configured family.
    pub families: Vec<FamilyNetwork>,
}

impl Network {
    /// Merges `conf` with `node`. The config's `subnet` and `mtu` override the
    /// node's; a config the node file contradicts (an override outside the
    /// node's slice or of a family the node lacks, an MTU IPv6 cannot use) is
    /// code 7 naming the field and the fix.
    pub fn resolve(conf: &NetConf, node: &NodeConfig) -> Result<Network, CniError> {
        let subnets = if conf.subnets.is_empty() {
            node.pod_cidrs.clone()
        } else {
            for subnet in &conf.subnets {
                check_override(*subnet, node)?;
            }
            conf.subnets.clone()
        };
        let mut families = subnets
            .into_iter()
            .map(|subnet| family(conf, node, subnet))
            .collect::<Result<Vec<_>, _>>()?;
        families.sort_by_key(|f| f.subnet.addr().is_ipv6());
        let mtu = conf.mtu.unwrap_or(node.mtu);
        if mtu < IPV6_MIN_MTU && families.iter().any(|f| f.subnet.addr().is_ipv6()) {
            let source = if conf.mtu.is_some() {
                "network config field \"mtu\"".to_owned()
            } else {
                format!("node file {} field \"mtu\"", conf.node_file.display())
            };
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("{source} is {mtu}, below IPv6's minimum: use {IPV6_MIN_MTU} or more when pods get IPv6"),
            ));
        }
        Ok(Network {
            name: conf.name.clone(),
            mtu,
            ipam_dir: conf.ipam_dir(),
            dns: conf.dns.clone(),
            families,
        })
    }

    /// The IPAM ranges, in family order (index `n` of `last_reserved_ip.<n>`).
    pub fn ranges(&self) -> Vec<AllocRange> {
        self.families.iter().map(|f| f.range).collect()
    }

    /// The IPAM store of this network.
    pub fn ipam_store(&self) -> Store {
        Store::new(&self.ipam_dir)
    }

    /// The routes to install in the pod, as the result reports them.
    pub fn pod_routes(&self) -> Vec<Route> {
        self.families
            .iter()
            .flat_map(|f| {
                f.route_dsts.iter().map(|dst| Route {
                    dst: *dst,
                    gw: Some(f.gateway()),
                })
            })
            .collect()
    }
}

fn check_override(subnet: IpNet, node: &NodeConfig) -> Result<(), CniError> {
    let (family, slice) = match subnet {
        IpNet::V4(_) => ("IPv4", node.pod_cidr_v4()),
        IpNet::V6(_) => ("IPv6", node.pod_cidr_v6()),
    };
    let problem = match slice {
        None => format!(
            "{subnet} is {family} but node {} has no {family} pod CIDR: remove it from \"subnet\" or give the node an {family} slice",
            node.node_name
        ),
        Some(slice) if !slice.contains(&subnet) => format!(
            "{subnet} is not inside node {}'s pod CIDR {slice}: use a subnet within {slice} or remove \"subnet\"",
            node.node_name
        ),
        Some(_) => return Ok(()),
    };
    Err(CniError::new(
        ErrorCode::InvalidNetworkConfig,
        format!("network config field \"subnet\" {problem}"),
    ))
}

fn family(conf: &NetConf, node: &NodeConfig, subnet: IpNet) -> Result<FamilyNetwork, CniError> {
    let range = AllocRange::new(subnet)
        .map_err(|e| CniError::new(ErrorCode::InvalidNetworkConfig, format!("pod subnet {e}")))?;
    let route_dsts = if conf.is_default_gateway {
        vec![match subnet {
            IpNet::V4(_) => IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            IpNet::V6(_) => IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0),
        }
        .expect("prefix 0 is valid for both families")]
    } else {
        node.cluster_cidrs
            .iter()
            .copied()
            .filter(|c| c.addr().is_ipv4() == subnet.addr().is_ipv4())
            .collect()
    };
    Ok(FamilyNetwork {
        subnet,
        range,
        route_dsts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dual-stack node the node-file tests (in `weft-core`, where
    /// the format lives) parse too.
    fn node() -> NodeConfig {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../core/tests/fixtures/node-dual.json"
        );
        NodeConfig::load(std::path::Path::new(fixture)).unwrap()
    }

    fn conf(extra: serde_json::Value) -> NetConf {
        let mut json = serde_json::json!({"cniVersion": "1.1.0", "name": "weft", "type": "weft"});
        for (k, v) in extra.as_object().unwrap() {
            json[k] = v.clone();
        }
        NetConf::parse(&serde_json::to_vec(&json).unwrap()).unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn node_file_alone_gives_a_dual_stack_network() {
        let network = Network::resolve(&conf(serde_json::json!({})), &node()).unwrap();
        assert_eq!(network.name, "weft");
        assert_eq!(network.mtu, 1450);
        assert_eq!(
            network.ipam_dir,
            PathBuf::from("/var/lib/cni/networks/weft")
        );
        let [v4, v6] = &network.families[..] else {
            panic!("expected two families: {:?}", network.families)
        };
        assert_eq!(v4.subnet, net("10.244.1.0/24"));
        assert_eq!(v4.gateway(), ip("169.254.1.1"));
        assert_eq!(
            (v4.range.first(), v4.range.last()),
            (ip("10.244.1.2"), ip("10.244.1.254"))
        );
        assert_eq!(v6.gateway(), ip("fe80::1"));
        assert_eq!(
            (v6.range.first(), v6.range.last()),
            (
                ip("fd00:10:244:1::2"),
                ip("fd00:10:244:1:ffff:ffff:ffff:ffff")
            )
        );
        assert_eq!(
            network.pod_routes(),
            vec![
                Route {
                    dst: net("0.0.0.0/0"),
                    gw: Some(ip("169.254.1.1"))
                },
                Route {
                    dst: net("::/0"),
                    gw: Some(ip("fe80::1"))
                },
            ]
        );
        assert_eq!(network.ranges(), vec![v4.range, v6.range]);
        assert_eq!(network.ipam_store().dir(), network.ipam_dir);
    }

    #[test]
    fn config_overrides_win() {
        let network = Network::resolve(
            &conf(serde_json::json!({
                "subnet": "10.244.1.128/25", "mtu": 1300,
                "dataDir": "/tmp/ipam", "isDefaultGateway": false
            })),
            &node(),
        )
        .unwrap();
        assert_eq!(network.mtu, 1300);
        assert_eq!(network.ipam_dir, PathBuf::from("/tmp/ipam/weft"));
        // Only the listed family is configured.
        assert_eq!(network.families.len(), 1);
        assert_eq!(network.families[0].range.first(), ip("10.244.1.130"));
        // Without a default gateway, the pod routes the cluster CIDR only.
        assert_eq!(
            network.pod_routes(),
            vec![Route {
                dst: net("10.244.0.0/16"),
                gw: Some(ip("169.254.1.1"))
            }]
        );
    }

    #[test]
    fn contradictions_with_the_node_file_are_code_7() {
        let mut v4_only = node();
        v4_only.pod_cidrs.truncate(1);
        let cases = [
            (
                serde_json::json!({"subnet": "10.244.2.0/24"}),
                node(),
                "not inside",
            ),
            (
                serde_json::json!({"subnet": "10.0.0.0/8"}),
                node(),
                "not inside",
            ),
            (
                serde_json::json!({"subnet": "fd00:10:244:1::/64"}),
                v4_only,
                "has no IPv6",
            ),
            (
                serde_json::json!({"mtu": 1279}),
                node(),
                "below IPv6's minimum",
            ),
            (
                serde_json::json!({"subnet": "10.244.1.0/31"}),
                node(),
                "too small",
            ),
        ];
        for (extra, node, problem) in cases {
            let e = Network::resolve(&conf(extra.clone()), &node).unwrap_err();
            assert_eq!(e.code, 7, "{extra}");
            assert!(e.msg.contains(problem), "{extra}: {}", e.msg);
            let field = if extra.get("mtu").is_some() {
                "\"mtu\""
            } else {
                "subnet"
            };
            assert!(e.msg.contains(field), "{extra}: {}", e.msg);
        }
    }

    #[test]
    fn node_mtu_too_small_for_ipv6_names_the_node_file() {
        let mut node = node();
        node.mtu = 1200;
        let e = Network::resolve(&conf(serde_json::json!({})), &node).unwrap_err();
        assert!(
            e.msg.contains("node file") && e.msg.contains("\"mtu\""),
            "{}",
            e.msg
        );
        // Overriding the MTU in the config fixes it.
        assert!(Network::resolve(&conf(serde_json::json!({"mtu": 1400})), &node).is_ok());
    }
}
