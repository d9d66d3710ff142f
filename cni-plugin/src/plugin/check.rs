//! CHECK: the attachment still looks the way ADD left it, as `prevResult`
//! describes it.

use std::net::IpAddr;

use super::host_veth::HostVeth;
use super::hostport;
use super::{ipam_error, kernel_error, node_netlink, open_netns, CODE_CHECK_FAILED};
use crate::cni::{CniError, ErrorCode, Invocation, NetConf, PortMapping};
use crate::ipam::Store;
use weft_core::ip::IpFamily;
use weft_core::netlink::{Netlink, Route};

/// Verifies the pod interface (MAC, MTU, up), its addresses, the routes in
/// the pod, the host veth on the bridge, the IPAM records and the hostPorts.
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
    let sandbox = netns.path().display().to_string();
    let mismatch = |what: String| {
        CniError::new(
            CODE_CHECK_FAILED,
            format!("{what}: delete and re-create the pod to repair its network"),
        )
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
    let pod_nl = Netlink::in_netns(&netns).map_err(kernel_error)?;
    let Some(link) = pod_nl
        .link_by_name(&attachment.ifname)
        .await
        .map_err(kernel_error)?
    else {
        return Err(mismatch(format!(
            "interface {} is missing from CNI_NETNS {sandbox}",
            attachment.ifname
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

    let ours: Vec<_> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(position))
        .collect();
    let present = pod_nl
        .addresses(Some(link.index))
        .await
        .map_err(kernel_error)?;
    for ip in &ours {
        if !present.iter().any(|a| a.address == ip.address) {
            return Err(mismatch(format!(
                "address {} is missing from interface {} in CNI_NETNS {sandbox}",
                ip.address, link.name
            )));
        }
    }

    let gateway_of = |destination: IpAddr| {
        ours.iter()
            .find(|ip| ip.address.addr().is_ipv4() == destination.is_ipv4())
            .and_then(|ip| ip.gateway)
    };
    for family in [IpFamily::V4, IpFamily::V6] {
        let wanted: Vec<_> = prev
            .routes
            .iter()
            .filter(|r| r.dst.addr().is_ipv4() == (family == IpFamily::V4))
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let routes = pod_nl
            .routes(family, Route::MAIN_TABLE)
            .await
            .map_err(kernel_error)?;
        for route in wanted {
            let gateway = route.gw.or_else(|| gateway_of(route.dst.addr()));
            let found = routes
                .iter()
                .any(|r| r.destination == route.dst && (gateway.is_none() || r.gateway == gateway));
            if !found {
                let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
                return Err(mismatch(format!(
                    "route {}{via} is missing from CNI_NETNS {sandbox}",
                    route.dst
                )));
            }
        }
    }

    check_host_side(conf, attachment, &mismatch).await?;

    let allocations = Store::new(conf.ipam_dir())
        .allocations()
        .map_err(ipam_error)?;
    for ip in &ours {
        let owned = allocations
            .iter()
            .any(|a| a.ip == ip.address.addr() && a.owner.as_ref() == Some(attachment));
        if !owned {
            return Err(mismatch(format!(
                "address {} is not recorded for this container in the IPAM store {}",
                ip.address.addr(),
                conf.ipam_dir().display()
            )));
        }
    }
    let mappings = PortMapping::from_runtime_config(&conf.runtime_config)?;
    if !mappings.is_empty() {
        let pod_ips: Vec<IpAddr> = ours.iter().map(|ip| ip.address.addr()).collect();
        hostport::check(&hostport::entries(&mappings, &pod_ips)?)?;
    }
    Ok(())
}

/// The host veth exists, belongs to this attachment, is up and sits on the
/// bridge.
async fn check_host_side(
    conf: &NetConf,
    attachment: &crate::cni::Attachment,
    mismatch: &impl Fn(String) -> CniError,
) -> Result<(), CniError> {
    let node_nl = node_netlink()?;
    let host_veth = HostVeth::of(&conf.name, attachment);
    let host = node_nl
        .link_by_name(&host_veth.name)
        .await
        .map_err(kernel_error)?
        .filter(|link| host_veth.owns(link))
        .ok_or_else(|| mismatch(format!("host interface {} is missing", host_veth.name)))?;
    let bridge = node_nl
        .link_by_name(&conf.bridge)
        .await
        .map_err(kernel_error)?
        .ok_or_else(|| mismatch(format!("bridge {} is missing", conf.bridge)))?;
    if host.controller != Some(bridge.index) {
        return Err(mismatch(format!(
            "host interface {} is not attached to bridge {}",
            host.name, bridge.name
        )));
    }
    if !host.up {
        return Err(mismatch(format!("host interface {} is down", host.name)));
    }
    Ok(())
}
