//! Weft installed on a kubelet cluster the way an operator installs it:
//! the image built by `packaging/build-image.sh` (imported on every node
//! through [`crate::ClusterSpec::images`]), then `kubectl apply -f
//! manifests/`, done once the agents run everywhere and every node is Ready.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use weft_testing::{eventually, printed_path, repository};

use crate::kubectl::Kubectl;
use crate::Cluster;

/// The namespace `manifests/` installs Weft into.
const NAMESPACE: &str = "kube-system";

/// The label of Weft's agent pods.
const AGENT_SELECTOR: &str = "app.kubernetes.io/component=agent";

/// Guards against a hang: on a loaded two-core machine the agents and the
/// nodes are usually ready within a minute.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Builds Weft's image with `packaging/build-image.sh` (release binaries,
/// minutes when cold) and returns the OCI archive to pass in
/// [`crate::ClusterSpec::images`].
pub fn build_weft_image() -> Result<PathBuf> {
    printed_path(
        Command::new("bash")
            .arg(repository().join("packaging/build-image.sh"))
            .current_dir(repository()),
    )
}

/// Applies `manifests/` to `cluster` (whose nodes have Weft's image) and
/// waits until an agent pod is ready on every node and every node is Ready.
pub async fn install_from_manifests(cluster: &Cluster) -> Result<()> {
    Kubectl::new(cluster.kubeconfig()).apply(&repository().join("manifests"))?;

    let client = cluster.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let nodes: Api<Node> = Api::all(client);
    let node_names: BTreeSet<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let what = format!(
        "Weft's agents ready and every node Ready (logs in {})",
        cluster.run_dir().display()
    );
    eventually(READY_TIMEOUT, &what, || async {
        let agents = pods
            .list(&ListParams::default().labels(AGENT_SELECTOR))
            .await
            .context("listing Weft's agent pods")?;
        let agents_ready: BTreeSet<String> = agents
            .items
            .iter()
            .filter(|pod| {
                let conditions = pod
                    .status
                    .iter()
                    .flat_map(|s| s.conditions.iter().flatten());
                is_ready(conditions.map(|c| (c.type_.as_str(), c.status.as_str())))
            })
            .filter_map(|pod| pod.spec.as_ref()?.node_name.clone())
            .collect();
        let nodes_ready: BTreeSet<String> = nodes
            .list(&ListParams::default())
            .await
            .context("listing the nodes")?
            .items
            .iter()
            .filter(|node| {
                let conditions = node
                    .status
                    .iter()
                    .flat_map(|s| s.conditions.iter().flatten());
                is_ready(conditions.map(|c| (c.type_.as_str(), c.status.as_str())))
            })
            .filter_map(|node| node.metadata.name.clone())
            .collect();
        if agents_ready == node_names && nodes_ready == node_names {
            return Ok(Some(()));
        }
        // Not yet; the state, as an error, is what a timeout reports.
        bail!("agents ready on {agents_ready:?}, nodes Ready {nodes_ready:?}, of {node_names:?}")
    })
    .await
}

/// Whether conditions, as (type, status), hold `Ready=True` (for a pod or a
/// node alike).
fn is_ready<'a>(mut conditions: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    conditions.any(|(kind, status)| kind == "Ready" && status == "True")
}
