//! ADD: allocate the pod's addresses, wire a veth pair from the node bridge
//! into the pod, and report what was made.
//!
//! Every input is validated, and the pod's namespace checked, before the
//! first change. Once IPAM has handed out addresses, any failure rolls the
//! attachment back (host veth deleted, addresses released) so a failed ADD
//! leaves nothing behind; the bridge and its gateway addresses are shared by
//! every pod and stay.

use std::net::IpAddr;

use futures::future::try_join_all;
use ipnet::IpNet;

use super::gateways::set_bridge_gateways;
use super::host_veth::HostVeth;
use super::hostport;
use super::Network;
use super::{ipam_error, kernel_error, load_node, node_netlink, open_netns, CODE_KERNEL};
use crate::cni::{
    Attachment, CniError, CniResult, ErrorCode, Interface, Invocation, IpConfig, MacAddress,
    NetConf, PortMapping,
};
use crate::ipam::Store;
use weft_core::ip::{self, IpFamily};
use weft_core::netlink::{Link, Netlink, Outcome, Route, VethPair};
use weft_core::netns::Netns;

/// The loopback device is always interface 1 in a network namespace (the
/// kernel registers it first, as LOOPBACK_IFINDEX).
const LOOPBACK_INDEX: u32 = 1;
/// Position of the pod interface in the result's `interfaces` (after the
/// bridge and the host veth).
const POD_INTERFACE: usize = 2;

/// Runs ADD and returns this plugin's result, chained after `prevResult`
/// when the config carries one.
pub(super) async fn add(invocation: &Invocation, conf: &NetConf) -> Result<CniResult, CniError> {
    let attachment = invocation
        .attachment
        .as_ref()
        .expect("Invocation::from_env requires an attachment for ADD");
    let node = load_node(conf)?;
    let network = Network::resolve(conf, &node)?;
    let pod_mac = requested_mac(conf)?;
    let port_mappings = PortMapping::from_runtime_config(&conf.runtime_config)?;
    // The pod gets one address per family of the network: check now, before
    // any change, that each hostIP is of one of them.
    let gateways: Vec<IpAddr> = network.families.iter().map(|f| f.gateway).collect();
    hostport::entries(&port_mappings, &gateways)?;
    let host_veth = HostVeth::of(&network.name, attachment);
    host_veth.check_alias_fits()?;
    let netns = open_netns(invocation)?;
    let node_nl = node_netlink()?;
    let pod_nl = Netlink::in_netns(&netns).map_err(kernel_error)?;
    check_ifname_free(&node_nl, &pod_nl, &host_veth, attachment, &netns).await?;

    let store = network.ipam_store();
    let ips = store
        .allocate(attachment, &network.ranges())
        .map_err(ipam_error)?;
    tracing::debug!(?ips, container = %attachment.container_id, "addresses allocated");

    let pod = PodWiring {
        network: &network,
        slices: &node.pod_cidrs,
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
    /// The node's pod slices, which tell earlier slices' gateways apart.
    slices: &'a [IpNet],
    attachment: &'a Attachment,
    host_veth: &'a HostVeth,
    netns: &'a Netns,
    node_nl: &'a Netlink,
    pod_nl: &'a Netlink,
    pod_mac: Option<MacAddress>,
}

impl PodWiring<'_> {
    async fn attach(&self, ips: &[IpAddr]) -> Result<CniResult, CniError> {
        let bridge = self.ensure_bridge().await?;
        enable_forwarding(self.network)?;
        let (host, pod) = self.create_veth(&bridge).await?;
        // Requests on one socket are carried out in the order they are sent,
        // so everything left is sent before the first answer is awaited:
        // the pod's interfaces come up before its addresses are added, and
        // the addresses before the routes through the gateway.
        let port = self.node_nl.set_bridge_port(
            host.index,
            &self.host_veth.alias,
            self.network.hairpin_mode,
        );
        let loopback_up = self.pod_nl.set_up(LOOPBACK_INDEX);
        let pod_up = self.pod_nl.set_up(pod.index);
        let addresses = try_join_all(self.network.families.iter().zip(ips).map(|(family, ip)| {
            let address = IpNet::new(*ip, family.subnet.prefix_len())
                .expect("an address from IPAM fits its subnet's prefix length");
            self.pod_nl.ensure_address(pod.index, address)
        }));
        let routes: Vec<Route> = self
            .network
            .families
            .iter()
            .flat_map(|family| {
                family.route_dsts.iter().map(|destination| Route {
                    gateway: Some(family.gateway),
                    output_interface: Some(pod.index),
                    ..Route::new(*destination)
                })
            })
            .collect();
        let added = try_join_all(routes.iter().map(|route| self.pod_nl.add_route(route)));
        let (_, _, _, _, outcomes) =
            futures::try_join!(port, loopback_up, pod_up, addresses, added)
                .map_err(kernel_error)?;
        for (route, outcome) in routes.iter().zip(outcomes) {
            if outcome == Outcome::AlreadyPresent {
                tracing::warn!(%route, "pod already had this route; keeping it");
            }
        }

        tracing::debug!(pod = %pod.name, host = %host.name, "attached");
        let sandbox = self.netns.path().display().to_string();
        Ok(CniResult {
            interfaces: vec![
                result_interface(&bridge, None),
                result_interface(&host, None),
                result_interface(&pod, Some(sandbox)),
            ],
            ips: self
                .network
                .families
                .iter()
                .zip(ips)
                .map(|(family, ip)| IpConfig {
                    address: IpNet::new(*ip, family.subnet.prefix_len())
                        .expect("an address from IPAM fits its subnet's prefix length"),
                    gateway: Some(family.gateway),
                    interface: Some(POD_INTERFACE),
                })
                .collect(),
            routes: self.network.pod_routes(),
            dns: self.network.dns.clone(),
        })
    }

    /// The node bridge with every family's gateway address on it, and no
    /// gateway of an earlier slice.
    async fn ensure_bridge(&self) -> Result<Link, CniError> {
        let bridge = self
            .node_nl
            .ensure_bridge(
                &self.network.bridge,
                self.network.mtu,
                Some(self.bridge_mac()),
            )
            .await
            .map_err(kernel_error)?;
        let gateways: Vec<IpNet> = self
            .network
            .families
            .iter()
            .map(|family| {
                IpNet::new(family.gateway, family.subnet.prefix_len())
                    .expect("the gateway lies in its subnet")
            })
            .collect();
        set_bridge_gateways(self.node_nl, bridge.index, &gateways, self.slices).await?;
        Ok(bridge)
    }

    /// A fixed, locally administered bridge MAC: 0a:58 and the IPv4 gateway
    /// (the convention Kubernetes network plugins share), or bytes of the
    /// IPv6 gateway on IPv6-only nodes.
    fn bridge_mac(&self) -> [u8; 6] {
        let tail: [u8; 4] = match self.network.families.first().map(|f| f.gateway) {
            Some(IpAddr::V4(gateway)) => gateway.octets(),
            Some(IpAddr::V6(gateway)) => {
                let octets = gateway.octets();
                [octets[12], octets[13], octets[14], octets[15]]
            }
            None => [0; 4],
        };
        [0x0a, 0x58, tail[0], tail[1], tail[2], tail[3]]
    }

    /// Creates the pair, replacing a leftover of an earlier, interrupted ADD
    /// of this same attachment. Returns the host end and the pod end.
    ///
    /// The host end is created with a MAC of our choosing and found through
    /// the pod end's peer index, so one lookup serves both ends.
    async fn create_veth(&self, bridge: &Link) -> Result<(Link, Link), CniError> {
        let host_mac = self.host_veth.mac();
        let pair = VethPair {
            name: &self.host_veth.name,
            mac: Some(&host_mac),
            peer_name: &self.attachment.ifname,
            peer_netns: self.netns,
            peer_mac: self.pod_mac.as_ref().map(|mac| mac.octets()),
            mtu: self.network.mtu,
            controller: Some(bridge.index),
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
            controller: Some(bridge.index),
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
/// pods use: the bridge is their gateway, so the node must route for them.
/// `/proc/sys/net` shows the namespace of whoever opens it, which is the
/// node's here.
fn enable_forwarding(network: &Network) -> Result<(), CniError> {
    for family in &network.families {
        ip::enable_forwarding(IpFamily::of_addr(family.gateway)).map_err(|error| {
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
