//! Node writes: what this agent tells the cluster about its node. The
//! backend annotations peers route by (backend type, VTEP MAC, public IP),
//! and the NetworkUnavailable=False condition once the node is programmed.
//! Both are written only when the Node does not already say so, so a steady
//! node makes no API writes.

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::Api;

use super::config::Backend;
use super::error::AgentError;
use super::node::{network_up_patch, OwnNode, Published};
use super::setup::AppliedSetup;

/// Field manager of the agent's writes to its Node.
pub const FIELD_MANAGER: &str = "weft-agent";

/// Writes to the Node this agent runs on.
#[derive(Debug)]
pub(crate) struct NodePublisher {
    nodes: Api<Node>,
    node_name: String,
}

impl NodePublisher {
    /// A publisher for Node `node_name`.
    pub(crate) fn new(nodes: Api<Node>, node_name: String) -> Self {
        NodePublisher { nodes, node_name }
    }

    /// Writes the annotations for `backend` and `setup` (only when `own`
    /// shows them different) and, unless `own` already has it, the
    /// NetworkUnavailable=False condition. Called once the node is
    /// programmed.
    pub(crate) async fn publish(
        &self,
        backend: Backend,
        own: &OwnNode,
        setup: &AppliedSetup,
    ) -> Result<(), AgentError> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let wanted =
            Published::wanted(backend, setup.public_ip, setup.vtep.as_ref().map(|v| v.mac));
        if own.published != wanted {
            self.nodes
                .patch(&self.node_name, &params, &Patch::Merge(wanted.patch()))
                .await
                .map_err(|source| self.api_error("publishing backend annotations", source))?;
            tracing::info!(public_ip = %setup.public_ip, backend = backend.as_str(), "annotations published");
        }
        if !own.network_up {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            self.nodes
                .patch_status(
                    &self.node_name,
                    &params,
                    &Patch::Strategic(network_up_patch(&now)),
                )
                .await
                .map_err(|source| self.api_error("setting NetworkUnavailable=False", source))?;
            tracing::info!("node condition NetworkUnavailable=False (WeftIsUp) set");
        }
        Ok(())
    }

    fn api_error(&self, action: &'static str, source: kube::Error) -> AgentError {
        AgentError::Api {
            action,
            node: self.node_name.clone(),
            source,
        }
    }
}
