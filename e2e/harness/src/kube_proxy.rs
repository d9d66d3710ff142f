//! kube-proxy on a kubelet node: Services (the `kubernetes` one included)
//! work for pods and the node as in a real cluster, in the mode the cluster
//! spec asks for.

use std::path::Path;

use anyhow::Result;

use crate::control_plane::{write_kubeconfig, Credentials, Pki};
use crate::machine::NodeMachine;
use crate::node::ClusterNode;
use crate::process::ProcessHandle;
use crate::run::RunGuard;

/// The pod network every real-node test installs (the manifests' default),
/// from which kube-proxy tells pod traffic from the rest.
pub(crate) const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// The IPv6 pod network of a dual-stack cluster (what the harness installs
/// Weft with as `clusterCidrV6`, a /56 as in the chart's example): each node
/// gets a /64 of it.
pub const CLUSTER_CIDR_V6: &str = "fd00:10:244::/56";

/// kube-proxy's mode on kubelet nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// `--proxy-mode=nftables`.
    #[default]
    Nftables,
    /// `--proxy-mode=iptables` (the iptables-nft backend here).
    Iptables,
}

impl ProxyMode {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
        }
    }
}

/// Starts the node's kube-proxy (`<node>-kube-proxy`) as `system:kube-proxy`,
/// the user the API server's bootstrap policy binds to `system:node-proxier`.
///
/// kube-proxy writes its conntrack defaults as on any node: the TCP
/// ESTABLISHED (24 h) and CLOSE_WAIT (1 h) timeouts are sysctls of each
/// network namespace, so they land in the node's own (upstream's KubeProxy
/// CLOSE_WAIT test reads them back from its entries). All but
/// `nf_conntrack_max`: that table limit is one for the whole machine,
/// read-only outside the initial namespace, and kube-proxy exits when it
/// cannot write the value it computes (131072 here, from 32768 a core with
/// that floor) unless it finds it already there. `--conntrack-max-per-core=0`
/// leaves it alone, as kind does for its container nodes.
pub(crate) fn start(
    run: &RunGuard,
    node: &ClusterNode,
    machine: &NodeMachine,
    pki: &Pki,
    apiserver: std::net::SocketAddr,
    binary: &Path,
    mode: ProxyMode,
) -> Result<ProcessHandle> {
    let user = "system:kube-proxy";
    let certificate =
        pki.issue_client(&format!("kube-proxy-{}", node.name), &format!("/CN={user}"))?;
    let kubeconfig = node.state_dir.join("kube-proxy.kubeconfig");
    write_kubeconfig(
        &kubeconfig,
        apiserver,
        &pki.ca_cert,
        user,
        Credentials::Certificate {
            cert: &certificate.cert,
            key: &certificate.key,
        },
    )?;
    let mut command = machine.command(binary);
    command
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--hostname-override={}", node.name))
        .arg(format!("--proxy-mode={}", mode.as_str()))
        .arg(format!("--cluster-cidr={}", cluster_cidrs(node)))
        .arg("--conntrack-max-per-core=0")
        .arg("--v=1");
    run.spawn(
        Some(&node.name),
        &format!("{}-kube-proxy", node.name),
        command,
    )
}

/// kube-proxy's `--cluster-cidr`: both pod networks, IPv4 first, on a
/// dual-stack node (one with an IPv6 underlay address), as kubeadm passes
/// its `podSubnet`.
fn cluster_cidrs(node: &ClusterNode) -> String {
    match node.underlay_address_v6 {
        Some(_) => format!("{CLUSTER_CIDR},{CLUSTER_CIDR_V6}"),
        None => CLUSTER_CIDR.to_owned(),
    }
}
