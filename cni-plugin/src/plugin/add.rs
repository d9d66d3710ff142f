//! ADD: allocate the pod's addresses, wire a routed veth pair into the pod,
//! and report what was made.
//!
//! The pod shares no link with anyone: its addresses are alone on its
//! interface (/32, /128), it sends everything to a link-local gateway that
//! a permanent neighbour entry resolves to its host veth, and the node
//! routes each pod address to its host veth, resolved by a permanent
//! neighbour entry too. Neither side ever asks ARP or ND, so nothing a pod
//! sends can change where traffic goes.
//!
//! Every input is validated, the node file's slices screened and the pod's
//! namespace checked before the first change. Once IPAM has handed out
//! addresses, any failure rolls the attachment back (host veth deleted,
//! which takes its routes and neighbours along, and addresses released) so
//! a failed ADD leaves nothing behind.

use std::net::IpAddr;

use futures::future::try_join_all;
use ipnet::IpNet;

use super::host_veth::HostVeth;
use super::network::pod_address;
use super::{hostport, node_slices, Network};
use super::{
    ipam_error, kernel_error, load_node, node_netlink, open_netns, CODE_KERNEL, LOOPBACK_INDEX,
};
use crate::cni::{
    Attachment, CniError, CniResult, ErrorCode, Interface, Invocation, IpConfig, MacAddress,
    NetConf, PortMapping,
};
use crate::ipam::Store;
use weft_core::ip::{self, IpFamily};
use weft_core::netlink::{
    Link, Netlink, NetlinkError, Outcome, PermanentNeighbour, Route, RouteScope, VethPair,
};
use weft_core::netns::Netns;

/// Position of the pod interface in the result's `interfaces` (after the
/// host veth).
const POD_INTERFACE: usize = 1;

/// Runs ADD and returns this plugin's result, chained after `prevResult`
/// when the config carries one.
pub(super) async fn add(invocation: &Invocation, conf: &NetConf) -> Result<CniResult, CniError> {
    let attachment = invocation
        .attachment
        .as_ref()
        .expect("Invocation::from_env requires an attachment for ADD");
    let node = load_node(conf)?;
    node_slices::check_usable(&node, &conf.node_file)?;
    let network = Network::resolve(conf, &node)?;
    let pod_mac = requested_mac(conf)?;
    let port_mappings = PortMapping::from_runtime_config(&conf.runtime_config)?;
    // The pod gets one address per family of the network: check now, before
    // any change, that each hostIP is of one of them (each family's gateway
    // stands in for the pod's address).
    let one_per_family: Vec<IpAddr> = network.families.iter().map(|f| f.gateway()).collect();
    hostport::entries(&port_mappings, &one_per_family)?;
    let host_veth = HostVeth::of(&network.name, attachment);
    host_veth.check_alias_fits()?;
    let netns = open_netns(invocation)?;
    let node_nl = node_netlink()?;
    let pod_nl = Netlink::in_netns(&netns).map_err(kernel_error)?;
    // Both only read, one socket each: their requests travel together.
    futures::try_join!(
        async {
            node_slices::check_underlay(&node_nl, &node, &conf.node_file)
                .await
                .map_err(CniError::from)
        },
        check_ifname_free(&node_nl, &pod_nl, &host_veth, attachment, &netns),
    )?;

    let store = network.ipam_store();
    let ips = store
        .allocate(attachment, &network.ranges())
        .map_err(ipam_error)?;
    tracing::debug!(?ips, container = %attachment.container_id, "addresses allocated");

    let pod = PodWiring {
        network: &network,
        attachment,
        host_veth: &host_veth,
        netns: &netns,
        node_nl: &node_nl,
        pod_nl: &pod_nl,
        pod_mac,
    };
    let attached = match pod.attach(&ips).await {
        Ok(result) => map_host_ports(&port_mappings, &ips, &network, &store).map(|()| result),
        Err(error) => Err(error),
    };
    match attached {
        Ok(result) => Ok(match &conf.prev_result {
            Some(prev) => result.chained_after(prev),
            None => result,
        }),
        Err(error) => {
            pod.roll_back(&store).await;
            Err(error)
        }
    }
}

/// Maps the pod's hostPorts (nothing to do, and no `nft` run, without any).
fn map_host_ports(
    mappings: &[PortMapping],
    ips: &[IpAddr],
    network: &Network,
    store: &Store,
) -> Result<(), CniError> {
    if mappings.is_empty() {
        return Ok(());
    }
    let entries = hostport::entries(mappings, ips)?;
    let slices: Vec<IpNet> = network.families.iter().map(|f| f.subnet).collect();
    // Under the store's lock, so two ADDs wanting one hostPort cannot both
    // find it free: the second sees the first's mapping and is refused.
    store
        .while_locked(|allocations| {
            let allocated = allocations.iter().map(|allocation| allocation.ip).collect();
            hostport::add(&entries, &slices, &allocated)
        })
        .map_err(ipam_error)?
}

/// Refuses an ADD whose CNI_IFNAME is already taken in the pod, unless it is
/// this attachment's own veth left by an interrupted ADD (its host end
/// still exists under our name), which the ADD then replaces.
async fn check_ifname_free(
    node_nl: &Netlink,
    pod_nl: &Netlink,
    host_veth: &HostVeth,
    attachment: &Attachment,
    netns: &Netns,
) -> Result<(), CniError> {
    if pod_nl
        .link_by_name(&attachment.ifname)
        .await
        .map_err(kernel_error)?
        .is_none()
    {
        return Ok(());
    }
    let leftover = node_nl
        .link_by_name(&host_veth.name)
        .await
        .map_err(kernel_error)?
        .is_some_and(|link| host_veth.owns(&link));
    if leftover {
        return Ok(());
    }
    Err(ifname_taken(attachment, netns))
}

fn ifname_taken(attachment: &Attachment, netns: &Netns) -> CniError {
    CniError::new(
        ErrorCode::InvalidEnvironment,
        format!(
            "CNI_IFNAME {} already exists in CNI_NETNS {}: choose another interface name or remove the existing interface",
            attachment.ifname,
            netns.path().display()
        ),
    )
}

/// `runtimeConfig.mac`: a MAC the runtime wants on the pod interface.
fn requested_mac(conf: &NetConf) -> Result<Option<MacAddress>, CniError> {
    let Some(value) = conf.runtime_config.get("mac") else {
        return Ok(None);
    };
    let invalid = |problem: String| {
        CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!("network config field \"runtimeConfig.mac\" {problem}"),
        )
    };
    let text = value
        .as_str()
        .ok_or_else(|| invalid("is not a string: write it as \"0a:58:0a:f4:01:02\"".into()))?;
    let mac: MacAddress = text.parse().map_err(invalid)?;
    if mac.octets().len() != 6 || mac.octets()[0] & 1 == 1 {
        return Err(invalid(format!(
            "{text:?} is not a unicast Ethernet address: use 6 bytes with the lowest bit of the first byte clear"
        )));
    }
    Ok(Some(mac))
}

/// Everything one ADD works with once its inputs are valid.
struct PodWiring<'a> {
    network: &'a Network,
    attachment: &'a Attachment,
    host_veth: &'a HostVeth,
    netns: &'a Netns,
    node_nl: &'a Netlink,
    pod_nl: &'a Netlink,
    pod_mac: Option<MacAddress>,
}

impl PodWiring<'_> {
    async fn attach(&self, ips: &[IpAddr]) -> Result<CniResult, CniError> {
        enable_forwarding(self.network)?;
        let (host, pod) = self.create_veth().await?;
        let pod_mac = ethernet_mac(&pod, self.attachment)?;
        // Requests on one socket are carried out in the order they are sent,
        // so both namespaces' requests are all sent before the first answer
        // is awaited; each side orders its own (see wire_node, wire_pod).
        futures::try_join!(
            self.wire_node(host.index, pod_mac, ips),
            self.wire_pod(pod.index, ips),
        )
        .map_err(kernel_error)?;

        tracing::debug!(pod = %pod.name, host = %host.name, "attached");
        let sandbox = self.netns.path().display().to_string();
        Ok(CniResult {
            interfaces: vec![
                result_interface(&host, None),
                result_interface(&pod, Some(sandbox)),
            ],
            ips: self
                .network
                .families
                .iter()
                .zip(ips)
                .map(|(family, ip)| IpConfig {
                    address: pod_address(*ip),
                    gateway: Some(family.gateway()),
                    interface: Some(POD_INTERFACE),
                })
                .collect(),
            routes: self.network.pod_routes(),
            dns: self.network.dns.clone(),
        })
    }

    /// The node's side: the owner alias on the host veth, then per pod
    /// address a permanent neighbour to the pod's MAC and a route into the
    /// host veth. The neighbour goes first so the route never sends a
    /// packet that has to wait for ARP or ND.
    async fn wire_node(
        &self,
        host_index: u32,
        pod_mac: [u8; 6],
        ips: &[IpAddr],
    ) -> Result<(), NetlinkError> {
        let alias = self.node_nl.set_alias(host_index, &self.host_veth.alias);
        let neighbours: Vec<PermanentNeighbour> = ips
            .iter()
            .map(|ip| PermanentNeighbour {
                link_index: host_index,
                ip: *ip,
                mac: pod_mac,
            })
            .collect();
        let neighbours = try_join_all(
            neighbours
                .iter()
                .map(|neighbour| self.node_nl.replace_neighbour(neighbour)),
        );
        let routes: Vec<Route> = ips.iter().map(|ip| host_route(*ip, host_index)).collect();
        // Replace, not add: a route left for this address by an earlier
        // holder whose device is still being torn down must not keep the
        // new pod unreachable.
        let routes = try_join_all(routes.iter().map(|route| self.node_nl.replace_route(route)));
        futures::try_join!(alias, neighbours, routes).map(|_| ())
    }

    /// The pod's side, in order: interfaces up, addresses, the gateways'
    /// permanent neighbours (the host veth's MAC), the IPv4 gateway's
    /// on-link route, then the routes through the gateways.
    async fn wire_pod(&self, pod_index: u32, ips: &[IpAddr]) -> Result<(), NetlinkError> {
        let loopback_up = self.pod_nl.set_up(LOOPBACK_INDEX);
        let pod_up = self.pod_nl.set_up(pod_index);
        let addresses = try_join_all(
            ips.iter()
                .map(|ip| self.pod_nl.ensure_address(pod_index, pod_address(*ip))),
        );
        let host_mac = self.host_veth.mac();
        let gateways: Vec<PermanentNeighbour> = self
            .network
            .families
            .iter()
            .map(|family| PermanentNeighbour {
                link_index: pod_index,
                ip: family.gateway(),
                mac: host_mac,
            })
            .collect();
        let gateway_neighbours = try_join_all(
            gateways
                .iter()
                .map(|neighbour| self.pod_nl.replace_neighbour(neighbour)),
        );
        // An IPv6 link-local gateway needs no route of its own: the output
        // interface says where it is.
        let routes: Vec<Route> = self
            .network
            .families
            .iter()
            .filter(|family| family.family() == IpFamily::V4)
            .map(|family| gateway_route(family.gateway(), pod_index))
            .chain(self.network.families.iter().flat_map(|family| {
                family.route_dsts.iter().map(move |destination| Route {
                    gateway: Some(family.gateway()),
                    output_interface: Some(pod_index),
                    ..Route::new(*destination)
                })
            }))
            .collect();
        let added = try_join_all(routes.iter().map(|route| self.pod_nl.add_route(route)));
        let (_, _, _, _, outcomes) =
            futures::try_join!(loopback_up, pod_up, addresses, gateway_neighbours, added)?;
        for (route, outcome) in routes.iter().zip(outcomes) {
            if outcome == Outcome::AlreadyPresent {
                tracing::warn!(%route, "pod already had this route; keeping it");
            }
        }
        Ok(())
    }

    /// Creates the pair, replacing a leftover of an earlier, interrupted ADD
    /// of this same attachment. Returns the host end and the pod end.
    ///
    /// The host end is created with a MAC of our choosing and found through
    /// the pod end's peer index, so one lookup serves both ends.
    async fn create_veth(&self) -> Result<(Link, Link), CniError> {
        let host_mac = self.host_veth.mac();
        let pair = VethPair {
            name: &self.host_veth.name,
            mac: Some(&host_mac),
            peer_name: &self.attachment.ifname,
            peer_netns: self.netns,
            peer_mac: self.pod_mac.as_ref().map(|mac| mac.octets()),
            mtu: self.network.mtu,
        };
        let mut outcome = self
            .node_nl
            .create_veth(&pair)
            .await
            .map_err(kernel_error)?;
        if outcome == Outcome::AlreadyPresent {
            self.replace_leftover().await?;
            outcome = self
                .node_nl
                .create_veth(&pair)
                .await
                .map_err(kernel_error)?;
        }
        if outcome == Outcome::AlreadyPresent {
            return Err(CniError::new(
                CODE_KERNEL,
                format!(
                    "cannot create the veth pair {} / {}: an interface of one of those names appeared meanwhile; retry the ADD",
                    self.host_veth.name, self.attachment.ifname
                ),
            ));
        }
        let pod = self
            .required_link(self.pod_nl, &self.attachment.ifname)
            .await?;
        let host_index = pod.peer_index.ok_or_else(|| {
            CniError::new(
                CODE_KERNEL,
                format!(
                    "the kernel did not report the host end of {} in CNI_NETNS: retry the ADD",
                    self.attachment.ifname
                ),
            )
        })?;
        let host = Link {
            index: host_index,
            name: self.host_veth.name.clone(),
            kind: Some("veth".into()),
            mtu: self.network.mtu,
            up: true,
            mac: Some(host_mac.to_vec()),
            controller: None,
            alias: Some(self.host_veth.alias.clone()),
            peer_index: Some(pod.index),
        };
        Ok((host, pod))
    }

    /// The host name is taken: by this attachment's own device from an
    /// interrupted ADD (delete it and go on), or by another owner (stop).
    async fn replace_leftover(&self) -> Result<(), CniError> {
        let Some(existing) = self
            .node_nl
            .link_by_name(&self.host_veth.name)
            .await
            .map_err(kernel_error)?
        else {
            // The host name is free, so the pod name must be the one taken:
            // it appeared after the check made before allocating.
            return Err(ifname_taken(self.attachment, self.netns));
        };
        if !self.host_veth.owns(&existing) {
            return Err(CniError::new(
                CODE_KERNEL,
                format!(
                    "host interface name {} is taken by another attachment ({}): delete that pod or interface first",
                    existing.name,
                    existing.alias.as_deref().unwrap_or("no owner recorded")
                ),
            ));
        }
        tracing::info!(name = %existing.name, "replacing host veth left by an interrupted ADD");
        self.node_nl
            .delete_link(existing.index)
            .await
            .map_err(kernel_error)?;
        Ok(())
    }

    async fn required_link(&self, netlink: &Netlink, name: &str) -> Result<Link, CniError> {
        netlink
            .link_by_name(name)
            .await
            .map_err(kernel_error)?
            .ok_or_else(|| {
                CniError::new(
                    CODE_KERNEL,
                    format!(
                        "interface {name} vanished from {} right after it was created: retry the ADD",
                        netlink.namespace()
                    ),
                )
            })
    }

    /// Undoes this attachment after a failure; the original error is what
    /// the runtime needs, so failures here are only logged.
    async fn roll_back(&self, store: &Store) {
        if let Err(error) = self.host_veth.remove(self.node_nl).await {
            tracing::warn!(%error, "rollback: could not delete the host veth");
        }
        if let Err(error) = store.release(self.attachment) {
            tracing::warn!(%error, "rollback: could not release the addresses");
        }
    }
}

/// The route in the host to `ip` alone, into the pod's host veth (scope
/// link; IPv6 routes have no scope and ignore it).
pub(super) fn host_route(ip: IpAddr, host_index: u32) -> Route {
    Route {
        output_interface: Some(host_index),
        scope: RouteScope::Link,
        ..Route::new(pod_address(ip))
    }
}

/// The pod's route to its IPv4 `gateway` on the pod interface, which makes
/// the gateway reachable for the routes through it.
pub(super) fn gateway_route(gateway: IpAddr, pod_index: u32) -> Route {
    Route {
        output_interface: Some(pod_index),
        scope: RouteScope::Link,
        ..Route::new(pod_address(gateway))
    }
}

/// The pod interface's Ethernet address, which the node's neighbour entries
/// for the pod hold.
fn ethernet_mac(pod: &Link, attachment: &Attachment) -> Result<[u8; 6], CniError> {
    pod.mac
        .as_deref()
        .and_then(|mac| mac.try_into().ok())
        .ok_or_else(|| {
            CniError::new(
                CODE_KERNEL,
                format!(
                    "the kernel reported no Ethernet address for {} in CNI_NETNS: retry the ADD",
                    attachment.ifname
                ),
            )
        })
}

/// A link as the result's `interfaces` lists it.
fn result_interface(link: &Link, sandbox: Option<String>) -> Interface {
    Interface {
        name: link.name.clone(),
        mac: link.mac_text().parse().ok(),
        sandbox,
        mtu: Some(link.mtu),
    }
}

/// Turns on forwarding in the plugin's namespace for every family the
/// pods use: the node is their gateway, so it must route for them.
/// `/proc/sys/net` shows the namespace of whoever opens it, which is the
/// node's here.
fn enable_forwarding(network: &Network) -> Result<(), CniError> {
    for family in &network.families {
        ip::enable_forwarding(family.family()).map_err(|error| {
            CniError::new(
                ErrorCode::Io,
                format!(
                    "cannot enable forwarding via {}: run weft as root with /proc mounted",
                    error.path
                ),
            )
            .with_details(error.source.to_string())
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf_with_runtime(runtime: serde_json::Value) -> NetConf {
        let config = serde_json::json!({
            "cniVersion": "1.1.0", "name": "net", "type": "weft", "runtimeConfig": runtime,
        });
        NetConf::parse(config.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn runtime_mac_is_honoured_when_unicast() {
        let conf = conf_with_runtime(serde_json::json!({ "mac": "0a:58:0a:00:00:07" }));
        assert_eq!(
            requested_mac(&conf).unwrap().unwrap().to_string(),
            "0a:58:0a:00:00:07"
        );
        assert_eq!(
            requested_mac(&conf_with_runtime(serde_json::json!({}))).unwrap(),
            None
        );
    }

    #[test]
    fn runtime_mac_errors_name_the_field() {
        for bad in [
            serde_json::json!("01:00:5e:00:00:01"),
            serde_json::json!("zz"),
            serde_json::json!(7),
        ] {
            let err =
                requested_mac(&conf_with_runtime(serde_json::json!({ "mac": bad }))).unwrap_err();
            assert_eq!(err.code, 7);
            assert!(err.msg.contains("runtimeConfig.mac"), "{}", err.msg);
        }
    }
}
