//! Node set-up: what the node needs before any peer can be programmed. The
//! underlay interface, the VTEP device `weft.1` with its tx checksum
//! offload and `src_valid_mark` (or no device for host-gw), forwarding, the
//! node file the CNI plugin reads, the plugin and its conflist, and the
//! masquerade table with the chains for the node's own traffic into the
//! tunnel ([`HostTraffic`]; the return rules and routes are the
//! reconcile's, see [`super::dataplane`]).
//!
//! Every step compares before it changes anything, so a set-up that finds
//! the node as it should be changes nothing. It runs when this node's own
//! fields change and on every resync; in between the last result is reused.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ipnet::IpNet;

use super::config::AgentConfig;
use super::dataplane::{Dataplane, Vtep, VXLAN_DEVICE};
use super::error::AgentError;
use super::install::{install_conflist, install_plugin, render_conflist, Installed};
use super::masquerade::{HostTraffic, MasqueradeTable, TableChange, TABLE as MASQUERADE_TABLE};
use super::nft_watch::{Registration, TableRegistry};
use super::node::OwnNode;
use super::offload::{kernel_release, set_tx_checksum, tx_checksum, wanted_tx_checksum};
use super::peer::LocalNode;
use super::underlay::{find_underlay, Underlay, UnderlayChoice};
use weft_core::annotations::VtepMac;
use weft_core::ip::{enable_forwarding, IpFamily};
use weft_core::netlink::{Removal, VxlanChange};
use weft_core::nodefile::NodeConfig;

/// This node's settings, derived from its Node and the underlay, as the
/// last successful set-up applied them.
#[derive(Debug, Clone)]
pub(crate) struct AppliedSetup {
    /// The node as the overlay plans for it.
    pub(crate) local: LocalNode,
    /// The address peers reach this node at (published on the Node).
    pub(crate) public_ip: IpAddr,
    /// The VTEP device's settings; none for host-gw.
    pub(crate) vtep: Option<Vtep>,
    /// The underlay interface's name, for `/status`.
    pub(crate) underlay_device: String,
    /// The MTU written to the node file for pods, for `/status`.
    pub(crate) mtu: u32,
}

/// The set-up of the node this agent runs on, and what it last applied.
#[derive(Debug)]
pub(crate) struct NodeSetup {
    /// Shared with the table watch, which restores the table as set-up
    /// last rendered it; `nft` runs on a blocking thread.
    masquerade: Arc<Mutex<MasqueradeTable>>,
    /// The host traffic the table was last rendered for.
    host_traffic: Option<HostTraffic>,
    /// The own-node fields the last successful set-up ran for, and what it
    /// applied.
    applied: Option<(OwnNode, AppliedSetup)>,
}

impl NodeSetup {
    /// Nothing applied yet.
    pub(crate) fn new(config: &AgentConfig) -> Self {
        NodeSetup {
            masquerade: Arc::new(Mutex::new(MasqueradeTable::new(
                &config.cluster_cidrs,
                &config.no_masquerade_cidrs,
                None,
            ))),
            host_traffic: None,
            applied: None,
        }
    }

    /// Has the table watch restore the masquerade table after a change
    /// made behind the agent's back, until the registration is dropped.
    pub(crate) fn register_masquerade(&self, tables: &TableRegistry) -> Registration {
        let table = self.masquerade.clone();
        tables.register(MASQUERADE_TABLE, move || lock(&table).restore_if_changed())
    }

    /// The node's settings for `own`: the last set-up's when `own` is what
    /// it ran for and `full` is not asked, else a set-up run now.
    pub(crate) async fn ensure(
        &mut self,
        config: &AgentConfig,
        node_name: &str,
        dataplane: &mut Dataplane,
        own: &OwnNode,
        full: bool,
    ) -> Result<AppliedSetup, AgentError> {
        if let Some((seen, applied)) = &self.applied {
            if !full && seen == own {
                return Ok(applied.clone());
            }
        }
        let applied = self.set_up(config, node_name, dataplane, own).await?;
        self.applied = Some((own.clone(), applied.clone()));
        Ok(applied)
    }

    async fn set_up(
        &mut self,
        config: &AgentConfig,
        node_name: &str,
        dataplane: &mut Dataplane,
        own: &OwnNode,
    ) -> Result<AppliedSetup, AgentError> {
        let underlay = underlay(config, node_name, dataplane, own).await?;
        let public_ip = own.public_ip_overwrite.unwrap_or(underlay.address.addr());
        let vxlan = config.backend.uses_vxlan();
        let mtu = config.mtu.unwrap_or(if vxlan {
            underlay.mtu - underlay.vxlan_overhead()
        } else {
            underlay.mtu
        });

        let vtep = if vxlan {
            let vtep = Vtep {
                vni: config.vni,
                port: config.port,
                local: underlay.address.addr(),
                underlay_index: underlay.link_index,
                mac: vtep_mac(own)?,
                mtu,
                addresses: own
                    .pod_cidrs
                    .iter()
                    .map(|slice| {
                        IpNet::new(slice.network(), slice.max_prefix_len())
                            .expect("max prefix is valid")
                    })
                    .collect(),
            };
            let change = dataplane.ensure_vtep(&vtep).await?;
            if change != VxlanChange::Reused {
                tracing::info!(?change, mac = %vtep.mac, local = %vtep.local, mtu, "{VXLAN_DEVICE} set up");
            }
            apply_offload_policy(config)?;
            Some(vtep)
        } else {
            if dataplane.remove_vtep().await? == Removal::Removed {
                tracing::info!("{VXLAN_DEVICE} removed: backend host-gw does not use it");
            }
            None
        };

        enable_forwarding(IpFamily::V4)?;
        if own
            .pod_cidrs
            .iter()
            .any(|c| IpFamily::of(c) == IpFamily::V6)
        {
            enable_forwarding(IpFamily::V6)?;
        }
        write_node_file(config, node_name, own, mtu)?;
        install_cni(config)?;
        let host = vxlan.then(|| host_traffic(underlay.address.addr(), public_ip));
        self.ensure_masquerade(host).await?;

        Ok(AppliedSetup {
            local: LocalNode {
                name: node_name.to_string(),
                pod_cidrs: own.pod_cidrs.clone(),
                underlay: underlay.address,
            },
            public_ip,
            vtep,
            underlay_device: underlay.link_name,
            mtu,
        })
    }

    /// Renders the table for `host` traffic (logging once why the node's
    /// own traffic is not given its address, when it is not) and applies
    /// it if the kernel's differs.
    async fn ensure_masquerade(&mut self, host: Option<HostTraffic>) -> Result<(), AgentError> {
        if host != self.host_traffic {
            if let Some(HostTraffic { snat: None, .. }) = &host {
                tracing::info!("the node's own traffic into {VXLAN_DEVICE} keeps the tunnel address as its source: weft.dev/public-ip-overwrite publishes another address than the underlay's, which peers would neither take as this node's nor route replies to");
            }
            lock(&self.masquerade).set_host_traffic(host.as_ref());
            self.host_traffic = host;
        }
        let table = self.masquerade.clone();
        // nft is a child process: run it off the async workers.
        let result = tokio::task::spawn_blocking(move || lock(&table).ensure())
            .await
            .expect("the masquerade task does not panic");
        if result? == TableChange::Replaced {
            tracing::info!("masquerade table inet weft applied");
        }
        Ok(())
    }
}

/// The host traffic of a node with the tunnel, on the underlay address
/// `underlay` and published as `public_ip`: given the underlay address
/// when that is what peers know this node by (see docs/host-traffic.md).
fn host_traffic(underlay: IpAddr, public_ip: IpAddr) -> HostTraffic {
    HostTraffic {
        family: IpFamily::of_addr(underlay),
        snat: (public_ip == underlay).then_some(underlay),
    }
}

fn lock(table: &Mutex<MasqueradeTable>) -> MutexGuard<'_, MasqueradeTable> {
    // A panic while the lock was held leaves the table as a failed write
    // does: the next ensure compares it with the kernel's again.
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The underlay the configuration names, else the interface holding the
/// Node's InternalIP.
async fn underlay(
    config: &AgentConfig,
    node_name: &str,
    dataplane: &Dataplane,
    own: &OwnNode,
) -> Result<Underlay, AgentError> {
    let family_of = own.internal_ip;
    let choice = if let Some(name) = &config.iface {
        UnderlayChoice::Interface {
            name: name.clone(),
            family_of,
        }
    } else if let Some(pattern) = &config.iface_regex {
        UnderlayChoice::Pattern {
            pattern: regex::Regex::new(pattern).expect("validated with the config"),
            family_of,
        }
    } else {
        UnderlayChoice::Address(own.internal_ip.ok_or_else(|| AgentError::NoNodeAddress {
            node: node_name.to_string(),
        })?)
    };
    Ok(find_underlay(dataplane.netlink(), &choice).await?)
}

/// The MAC to give `weft.1`: the one derived from the node's slice, which
/// peers give to this node whoever else publishes it, and which stays the
/// same across device re-creation. A node that used a random MAC (older
/// agents did) moves to the derived one: its device is re-created
/// (ensure_vtep) and peers follow the published annotation, so traffic to
/// this node drops for the moment that takes, once.
fn vtep_mac(own: &OwnNode) -> Result<VtepMac, AgentError> {
    VtepMac::for_slices(&own.pod_cidrs).ok_or(AgentError::NoSlice)
}

/// Sets `weft.1`'s tx checksum offload as the policy wants it for this
/// kernel (see [`super::offload`]).
fn apply_offload_policy(config: &AgentConfig) -> Result<(), AgentError> {
    let release = kernel_release().map_err(AgentError::Offload)?;
    let wanted = wanted_tx_checksum(config.checksum_offload, &release);
    if tx_checksum(VXLAN_DEVICE).map_err(AgentError::Offload)? != wanted {
        set_tx_checksum(VXLAN_DEVICE, wanted).map_err(AgentError::Offload)?;
        tracing::info!(kernel = %release, tx_checksum = wanted, policy = ?config.checksum_offload, "{VXLAN_DEVICE} tx checksum offload set");
    }
    Ok(())
}

/// Writes the node file the CNI plugin reads, unless it already says this.
fn write_node_file(
    config: &AgentConfig,
    node_name: &str,
    own: &OwnNode,
    mtu: u32,
) -> Result<(), AgentError> {
    let wanted = NodeConfig {
        node_name: node_name.to_string(),
        pod_cidrs: own.pod_cidrs.clone(),
        cluster_cidrs: config.cluster_cidrs.clone(),
        mtu,
    };
    if NodeConfig::load(&config.node_file).ok().as_ref() != Some(&wanted) {
        wanted.write_atomic(&config.node_file)?;
        tracing::info!(path = %config.node_file.display(), mtu, "node file written");
    }
    Ok(())
}

/// Installs the CNI plugin binary and the conflist where the runtime looks.
fn install_cni(config: &AgentConfig) -> Result<(), AgentError> {
    if install_plugin(&config.cni_plugin_source, &config.cni_bin_dir)? == Installed::Written {
        tracing::info!(dir = %config.cni_bin_dir.display(), "CNI plugin installed");
    }
    let conflist = render_conflist(&config.node_file);
    if install_conflist(&config.cni_conf_dir, &conflist)? == Installed::Written {
        tracing::info!(dir = %config.cni_conf_dir.display(), "CNI conflist installed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_traffic_is_given_the_underlay_address_only_when_published() {
        let underlay: IpAddr = "172.31.0.10".parse().unwrap();
        assert_eq!(
            host_traffic(underlay, underlay),
            HostTraffic {
                family: IpFamily::V4,
                snat: Some(underlay),
            }
        );
        // A public-IP overwrite (a NAT address) keeps the return path for
        // peers' traffic, without SNAT of this node's own.
        assert_eq!(
            host_traffic(underlay, "203.0.113.7".parse().unwrap()),
            HostTraffic {
                family: IpFamily::V4,
                snat: None,
            }
        );
    }
}
