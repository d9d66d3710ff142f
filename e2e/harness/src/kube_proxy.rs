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
/// The conntrack settings kube-proxy would write (`nf_conntrack_max` is one
/// for the whole machine) are left as they are: a node is a namespace here.
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
        .arg(format!("--cluster-cidr={CLUSTER_CIDR}"))
        .arg("--conntrack-max-per-core=0")
        .arg("--conntrack-tcp-timeout-established=0s")
        .arg("--conntrack-tcp-timeout-close-wait=0s")
        .arg("--v=1");
    run.spawn(
        Some(&node.name),
        &format!("{}-kube-proxy", node.name),
        command,
    )
}
