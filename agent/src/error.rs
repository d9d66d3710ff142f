//! The agent's one error type: what stops the agent or fails one reconcile,
//! and the label it is counted under in `weft_agent_errors_total`.

use super::dataplane::{DataplaneError, VXLAN_DEVICE};
use super::install::InstallError;
use super::underlay::UnderlayError;
use weft_core::ip::ForwardingError;
use weft_core::netlink::NetlinkError;
use weft_core::nft::NftError;
use weft_core::nodefile::NodeFileError;
use weft_daemon::serve::ServeError;

/// What stops the agent or one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The health and metrics endpoint failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Setting up or reading the data plane failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// Forwarding could not be turned on; the error names the sysctl file.
    #[error(transparent)]
    Forwarding(#[from] ForwardingError),
    /// No underlay interface fits the configuration.
    #[error(transparent)]
    Underlay(#[from] UnderlayError),
    /// Installing the CNI plugin or conflist failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// Writing the node file failed.
    #[error(transparent)]
    NodeFile(#[from] NodeFileError),
    /// The masquerade table could not be applied.
    #[error(transparent)]
    Masquerade(#[from] NftError),
    /// The guard table could not be applied.
    #[error(transparent)]
    Guard(NftError),
    /// Checksum offload on the VXLAN device could not be read or set.
    #[error("setting tx checksum offload on {VXLAN_DEVICE}: {0} (set checksumOffload: on to leave it alone)")]
    Offload(std::io::Error),
    /// Set-up ran for a node without a slice, from which the VTEP MAC
    /// derives (the agent waits for one first, so this is a bug).
    #[error("no pod slice to derive the VTEP MAC from: wait for weft-controller to assign one")]
    NoSlice,
    /// The Node has no InternalIP and no interface is configured.
    #[error("node {node} has no InternalIP address: set iface or ifaceRegex so the agent can find its underlay")]
    NoNodeAddress {
        /// The node.
        node: String,
    },
    /// A write to the Node failed.
    #[error("{action} on node {node}: {source}")]
    Api {
        /// What was written.
        action: &'static str,
        /// The node.
        node: String,
        /// The client error.
        source: kube::Error,
    },
}

impl AgentError {
    /// A short label for the errors metric, from the fixed set docs/metrics.md
    /// lists.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            AgentError::Serve(_) => "serve",
            // IP forwarding is part of the node's kernel set-up, counted
            // with the other kernel writes.
            AgentError::Dataplane(DataplaneError::OwnSlice(_)) => "own_slice",
            AgentError::Netlink(_) | AgentError::Dataplane(_) | AgentError::Forwarding(_) => {
                "netlink"
            }
            AgentError::Underlay(_) | AgentError::NoNodeAddress { .. } => "underlay",
            AgentError::Install(_) => "cni_install",
            AgentError::NodeFile(_) => "node_file",
            AgentError::Masquerade(_) => "masquerade",
            AgentError::Guard(_) => "guard",
            AgentError::Offload(_) => "checksum_offload",
            AgentError::NoSlice => "vtep_mac",
            AgentError::Api { .. } => "api",
        }
    }
}
