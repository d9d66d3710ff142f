//! CHECK: the attachment still looks the way ADD left it, as `prevResult`
//! describes it: in the pod its interface, addresses, gateway neighbours
//! and routes; on the node the host veth, its routes and neighbours to the
//! pod; the IPAM records and the hostPorts.

use std::net::IpAddr;

use super::add::{gateway_route, host_route};
use super::host_veth::HostVeth;
use super::hostport;
use super::{ipam_error, kernel_error, node_netlink, open_netns, CODE_CHECK_FAILED};
use crate::cni::{Attachment, CniError, ErrorCode, Invocation, IpConfig, NetConf, PortMapping};
use crate::ipam::Store;
use weft_core::ip::IpFamily;
use weft_core::netlink::{Link, Netlink, PermanentNeighbour, Route};

/// A difference from what ADD made, as the CNI error CHECK returns.
fn mismatch(what: String) -> CniError {
    CniError::new(
        CODE_CHECK_FAILED,
        format!("{what}: delete and re-create the pod to repair its network"),
    )
}

/// Verifies the attachment; the first difference found is the error.
pub(super) async fn check(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let attachment = invocation
        .attachment
        .as_ref()
        .expect("Invocation::from_env requires an attachment for CHECK");
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidNetworkConfig,
            "network config field \"prevResult\" is missing: CHECK needs the result of this attachment's ADD",
        )
    })?;
    let netns = open_netns(invocation)?;
    let pod = Side {
        netlink: Netlink::in_netns(&netns).map_err(kernel_error)?,
        place: format!("CNI_NETNS {}", netns.path().display()),
    };

    let Some(position) = prev
        .interfaces
        .iter()
        .position(|i| i.name == attachment.ifname && i.sandbox.is_some())
    else {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!(
                "network config field \"prevResult\" has no sandbox interface {}: pass the result of this attachment's ADD",
                attachment.ifname
            ),
        ));
    };
    let expected = &prev.interfaces[position];
    let Some(link) = pod.link(&attachment.ifname).await? else {
        return Err(mismatch(format!(
            "interface {} is missing from {}",
            attachment.ifname, pod.place
        )));
    };
    if let Some(mac) = &expected.mac {
        if !mac.to_string().eq_ignore_ascii_case(&link.mac_text()) {
            return Err(mismatch(format!(
                "interface {} has MAC {} but prevResult says {mac}",
                link.name,
                link.mac_text()
            )));
        }
    }
    if let Some(mtu) = expected.mtu.filter(|mtu| *mtu != link.mtu) {
        return Err(mismatch(format!(
            "interface {} has MTU {} but prevResult says {mtu}",
            link.name, link.mtu
        )));
    }
    if !link.up {
        return Err(mismatch(format!("interface {} is down", link.name)));
    }
    let ours: Vec<&IpConfig> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(position))
        .collect();

    // The node's side first: a host veth that is not routed explains
    // everything missing in the pod.
    let node = Side {
        netlink: node_netlink()?,
        place: "the node".to_owned(),
    };
    let host = check_host_veth(&node, conf, attachment).await?;
    let pod_ips: Vec<IpAddr> = ours.iter().map(|ip| ip.address.addr()).collect();
    let host_routes: Vec<Route> = pod_ips
        .iter()
        .map(|ip| host_route(*ip, host.index))
        .collect();
    node.require_routes(&host_routes, &host.name).await?;
    node.require_neighbours(&host, &pod_ips, &link).await?;

    let present = pod
        .netlink
        .addresses(Some(link.index))
        .await
        .map_err(kernel_error)?;
    for ip in &ours {
        if !present.iter().any(|a| a.address == ip.address) {
            return Err(mismatch(format!(
                "address {} is missing from interface {} in {}",
                ip.address, link.name, pod.place
            )));
        }
    }
    let gateways: Vec<IpAddr> = ours.iter().filter_map(|ip| ip.gateway).collect();
    pod.require_neighbours(&link, &gateways, &host).await?;
    let gateway_of = |destination: IpAddr| {
        gateways
            .iter()
            .copied()
            .find(|gateway| gateway.is_ipv4() == destination.is_ipv4())
    };
    let mut pod_routes: Vec<Route> = gateways
        .iter()
        .filter(|gateway| gateway.is_ipv4())
        .map(|gateway| gateway_route(*gateway, link.index))
        .collect();
    pod_routes.extend(prev.routes.iter().map(|route| Route {
        gateway: route.gw.or_else(|| gateway_of(route.dst.addr())),
        ..Route::new(route.dst)
    }));
    pod.require_routes(&pod_routes, &link.name).await?;

    let allocations = Store::new(conf.ipam_dir())
        .allocations()
        .map_err(ipam_error)?;
    for ip in &pod_ips {
        let owned = allocations
            .iter()
            .any(|a| a.ip == *ip && a.owner.as_ref() == Some(attachment));
        if !owned {
            return Err(mismatch(format!(
                "address {ip} is not recorded for this container in the IPAM store {}",
                conf.ipam_dir().display()
            )));
        }
    }
    let mappings = PortMapping::from_runtime_config(&conf.runtime_config)?;
    if !mappings.is_empty() {
        hostport::check(&hostport::entries(&mappings, &pod_ips)?)?;
    }
    Ok(())
}

/// The host veth exists, belongs to this attachment, is up and is routed
/// (in no bridge).
async fn check_host_veth(
    node: &Side,
    conf: &NetConf,
    attachment: &Attachment,
) -> Result<Link, CniError> {
    let host_veth = HostVeth::of(&conf.name, attachment);
    let host = node
        .link(&host_veth.name)
        .await?
        .filter(|link| host_veth.owns(link))
        .ok_or_else(|| mismatch(format!("host interface {} is missing", host_veth.name)))?;
    if let Some(bridge) = host.controller {
        return Err(mismatch(format!(
            "host interface {} is a port of the bridge with link index {bridge}, not a routed veth",
            host.name
        )));
    }
    if !host.up {
        return Err(mismatch(format!("host interface {} is down", host.name)));
    }
    Ok(host)
}

/// One namespace of the attachment, and how messages name it.
struct Side {
    netlink: Netlink,
    place: String,
}

impl Side {
    async fn link(&self, name: &str) -> Result<Option<Link>, CniError> {
        self.netlink.link_by_name(name).await.map_err(kernel_error)
    }

    /// Each of `wanted` is in the main table: same destination, and the
    /// same gateway and output interface where `wanted` has one.
    async fn require_routes(&self, wanted: &[Route], device: &str) -> Result<(), CniError> {
        for family in [IpFamily::V4, IpFamily::V6] {
            let of_family: Vec<&Route> = wanted
                .iter()
                .filter(|route| IpFamily::of(&route.destination) == family)
                .collect();
            if of_family.is_empty() {
                continue;
            }
            let routes = self
                .netlink
                .routes(family, Route::MAIN_TABLE)
                .await
                .map_err(kernel_error)?;
            for route in of_family {
                let found = routes.iter().any(|present| {
                    present.destination == route.destination
                        && (route.gateway.is_none() || present.gateway == route.gateway)
                        && (route.output_interface.is_none()
                            || present.output_interface == route.output_interface)
                });
                if !found {
                    let via = route
                        .gateway
                        .map(|gateway| format!(" via {gateway}"))
                        .unwrap_or_default();
                    let dev = route
                        .output_interface
                        .map(|_| format!(" dev {device}"))
                        .unwrap_or_default();
                    return Err(mismatch(format!(
                        "route {}{via}{dev} is missing from {}",
                        route.destination, self.place
                    )));
                }
            }
        }
        Ok(())
    }

    /// Each of `ips` has a permanent neighbour entry on `link` that
    /// resolves it to the MAC of `target`, the other end of the pair.
    async fn require_neighbours(
        &self,
        link: &Link,
        ips: &[IpAddr],
        target: &Link,
    ) -> Result<(), CniError> {
        if ips.is_empty() {
            return Ok(());
        }
        let present = self
            .netlink
            .permanent_neighbours(link.index)
            .await
            .map_err(kernel_error)?;
        for ip in ips {
            let found = present.iter().any(|neighbour: &PermanentNeighbour| {
                neighbour.ip == *ip && target.mac.as_deref() == Some(&neighbour.mac[..])
            });
            if !found {
                return Err(mismatch(format!(
                    "permanent neighbour {ip} lladdr {} is missing from {} in {}",
                    target.mac_text(),
                    link.name,
                    self.place
                )));
            }
        }
        Ok(())
    }
}
