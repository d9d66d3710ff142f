//! Weft installed on a kubelet cluster the way an operator installs it:
//! the image built by `packaging/build-image.sh` (imported on every node
//! through [`crate::ClusterSpec::images`]), then `kubectl apply -f
//! manifests/`, done once the agents run everywhere and every node is Ready.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};

use crate::Cluster;

/// The namespace `manifests/` installs Weft into.
const NAMESPACE: &str = "kube-system";

/// The label of Weft's agent pods.
const AGENT_SELECTOR: &str = "app.kubernetes.io/component=agent";

/// Guards against a hang: on a loaded two-core machine the agents and the
/// nodes are usually ready within a minute.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// The repository's root directory.
pub(crate) fn repository() -> PathBuf {
    // The crate is e2e/harness.
    let harness = Path::new(env!("CARGO_MANIFEST_DIR"));
    harness.ancestors().nth(2).unwrap_or(harness).to_owned()
}

/// Runs `script` (a path from the repository's root) with bash in the
/// repository, its progress on stderr, and returns its trimmed stdout.
pub fn run_repository_script(script: &str) -> Result<String> {
    let output = Command::new("bash")
        .arg(repository().join(script))
        .current_dir(repository())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {script}"))?;
    ensure!(
        output.status.success(),
        "{script} failed ({}); its output above says why",
        output.status
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Builds Weft's image with `packaging/build-image.sh` (release binaries,
/// minutes when cold) and returns the OCI archive to pass in
/// [`crate::ClusterSpec::images`].
pub fn build_weft_image() -> Result<PathBuf> {
    run_repository_script("packaging/build-image.sh").map(PathBuf::from)
}

/// Applies `manifests/` to `cluster` (whose nodes have Weft's image) and
/// waits until an agent pod is ready on every node and every node is Ready.
pub async fn install_from_manifests(cluster: &Cluster) -> Result<()> {
    let manifests = repository().join("manifests");
    let output = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .arg("apply")
        .arg("-f")
        .arg(&manifests)
        .output()
        .context("running kubectl (is it installed?)")?;
    ensure!(
        output.status.success(),
        "kubectl apply -f {} failed ({}): {}",
        manifests.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let client = cluster.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let nodes: Api<Node> = Api::all(client);
    let node_names: BTreeSet<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
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
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "Weft not ready after {READY_TIMEOUT:?}: agents ready on {agents_ready:?}, \
                 nodes Ready {nodes_ready:?}, of {node_names:?}; see the logs in {}",
                cluster.run_dir().display()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether conditions, as (type, status), hold `Ready=True` (for a pod or a
/// node alike).
fn is_ready<'a>(mut conditions: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    conditions.any(|(kind, status)| kind == "Ready" && status == "True")
}
