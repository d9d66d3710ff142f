//! DEL and GC: remove hostPort mappings and host veths, then release
//! addresses.
//!
//! The device goes first: an address is only ever freed once nothing uses
//! it, so an invocation killed in between leaves an allocation that a
//! retried DEL or the next GC frees, never an address with two pods.
//! Neither verb needs the node file or the pod's namespace: the host veth
//! is found by its derived name, and deleting it also removes the pod end.

use std::collections::HashSet;
use std::net::IpAddr;

use super::host_veth::HostVeth;
use super::hostport;
use super::{ipam_error, kernel_error, node_netlink};
use crate::cni::{Attachment, CniError, Invocation, NetConf};
use crate::ipam::Store;

/// DEL: succeeds whether or not the attachment (or its namespace) still
/// exists.
pub(super) async fn del(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let attachment = invocation
        .attachment
        .as_ref()
        .expect("Invocation::from_env requires an attachment for DEL");
    let node_nl = node_netlink()?;
    let store = Store::new(conf.ipam_dir());
    // Runtimes pass the pod's portMappings on DEL too; without them the pod
    // had no hostPort, and no nft is run.
    let had_host_ports = conf
        .runtime_config
        .get("portMappings")
        .and_then(|mappings| mappings.as_array())
        .is_some_and(|mappings| !mappings.is_empty());
    if had_host_ports {
        store
            .while_locked(|allocations| {
                let pod_ips: HashSet<IpAddr> = allocations
                    .iter()
                    .filter(|allocation| allocation.owner.as_ref() == Some(attachment))
                    .map(|allocation| allocation.ip)
                    .collect();
                hostport::remove_where(|ip| !pod_ips.contains(&ip))
            })
            .map_err(ipam_error)??;
    }
    let removal = HostVeth::of(&conf.name, attachment)
        .remove(&node_nl)
        .await
        .map_err(kernel_error)?;
    let released = store.release(attachment).map_err(ipam_error)?;
    tracing::debug!(?removal, ?released, container = %attachment.container_id, "deleted");
    Ok(())
}

/// GC: removes every attachment of this network that is not in
/// `cni.dev/valid-attachments`, whether IPAM still records it or only its
/// host veth is left. Without a list the runtime has not said what is valid,
/// so nothing is removed.
pub(super) async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let Some(valid) = &conf.valid_attachments else {
        tracing::info!("GC without cni.dev/valid-attachments: nothing removed");
        return Ok(());
    };
    let store = Store::new(conf.ipam_dir());
    let node_nl = node_netlink()?;
    let valid_set: HashSet<&Attachment> = valid.iter().collect();

    let mut stale: Vec<HostVeth> = store
        .allocations()
        .map_err(ipam_error)?
        .into_iter()
        .filter_map(|allocation| allocation.owner)
        .filter(|owner| !valid_set.contains(owner))
        .map(|owner| HostVeth::of(&conf.name, &owner))
        .collect();
    let kept_aliases: HashSet<String> = valid
        .iter()
        .map(|attachment| HostVeth::of(&conf.name, attachment).alias)
        .collect();
    let ours = HostVeth::network_alias_prefix(&conf.name);
    for link in node_nl.links().await.map_err(kernel_error)? {
        if let Some(alias) = link.alias {
            if alias.starts_with(&ours) && !kept_aliases.contains(&alias) {
                stale.push(HostVeth {
                    name: link.name,
                    alias,
                });
            }
        }
    }
    stale.sort_by(|a, b| a.name.cmp(&b.name));
    stale.dedup();
    for host_veth in &stale {
        host_veth.remove(&node_nl).await.map_err(kernel_error)?;
    }

    let freed = store.gc(valid).map_err(ipam_error)?;
    // What is left is held by valid attachments: a hostPort pointing
    // anywhere else is stale.
    let unmapped = store
        .while_locked(|allocations| {
            let held: HashSet<IpAddr> =
                allocations.iter().map(|allocation| allocation.ip).collect();
            hostport::remove_where(|ip| held.contains(&ip))
        })
        .map_err(ipam_error)??;
    tracing::debug!(
        devices = stale.len(),
        addresses = freed.len(),
        host_ports = unmapped,
        "garbage collected"
    );
    Ok(())
}
