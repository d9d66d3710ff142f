//! Weft installed on a kubelet cluster the way an operator installs it:
//! the image built by `packaging/build-image.sh` (imported on every node
//! through [`crate::ClusterSpec::images`]), then `kubectl apply -f
//! manifests/`, done once the agents run everywhere and every node is Ready.
//! On a dual-stack cluster the manifests get `clusterCidrV6` first, as an
//! operator edits the ConfigMap for dual-stack (docs/configuration.md).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use weft_testing::{eventually, printed_path, repository};

use crate::kube_proxy::CLUSTER_CIDR_V6;
use crate::kubectl::Kubectl;
use crate::Cluster;

/// The manifest file under `manifests/`.
const MANIFEST: &str = "weft.yaml";

/// The key of the IPv4 pod network in the controller's and the agent's
/// configuration files; `clusterCidrV6` goes beside each.
const CLUSTER_CIDR_KEY: &str = "clusterCidr:";

/// How many configuration files in the manifest carry the cluster CIDR: the
/// controller's and the agent's.
const CONFIG_FILES: usize = 2;

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

/// The manifests to install Weft on `cluster` with: `manifests/` itself,
/// or on a dual-stack cluster ([`crate::ClusterSpec::dual_stack`]) a copy in
/// the run directory with `clusterCidrV6` ([`CLUSTER_CIDR_V6`]) beside each
/// `clusterCidr`. `kubectl delete -f` the same directory uninstalls.
pub fn weft_manifests(cluster: &Cluster) -> Result<PathBuf> {
    let manifests = repository().join("manifests");
    if !cluster.spec().dual_stack {
        return Ok(manifests);
    }
    let source = manifests.join(MANIFEST);
    let text = std::fs::read_to_string(&source)
        .with_context(|| format!("reading {}", source.display()))?;
    let dual_stack = with_cluster_cidr_v6(&text, CLUSTER_CIDR_V6)
        .with_context(|| format!("adding clusterCidrV6 to {}", source.display()))?;
    let dir = cluster.run_dir().join("manifests-dual-stack");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(MANIFEST);
    std::fs::write(&file, dual_stack).with_context(|| format!("writing {}", file.display()))?;
    Ok(dir)
}

/// `manifest` with a `clusterCidrV6: "<cidr>"` line after every
/// `clusterCidr:` line, indented alike; there must be one in each of the
/// controller's and the agent's files, and no `clusterCidrV6` yet.
fn with_cluster_cidr_v6(manifest: &str, cidr: &str) -> Result<String> {
    if manifest.contains("clusterCidrV6:") {
        bail!("it sets clusterCidrV6 already; render it with the chart's default values");
    }
    let mut out = String::with_capacity(manifest.len() + 100);
    let mut added = 0;
    for line in manifest.lines() {
        out.push_str(line);
        out.push('\n');
        let key = line.trim_start();
        if key.starts_with(CLUSTER_CIDR_KEY) {
            let indent = &line[..line.len() - key.len()];
            out.push_str(&format!("{indent}clusterCidrV6: \"{cidr}\"\n"));
            added += 1;
        }
    }
    if added != CONFIG_FILES {
        bail!(
            "found {added} `{CLUSTER_CIDR_KEY}` lines where the controller's and the agent's \
             configuration have {CONFIG_FILES}; re-render it with packaging/render-manifests.sh"
        );
    }
    Ok(out)
}

/// Applies [`weft_manifests`] to `cluster` (whose nodes have Weft's image)
/// and waits until an agent pod is ready on every node and every node is
/// Ready.
pub async fn install_from_manifests(cluster: &Cluster) -> Result<()> {
    Kubectl::new(cluster.kubeconfig()).apply(&weft_manifests(cluster)?)?;

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
            .filter(|pod| pod_is_ready(pod))
            .filter_map(|pod| pod.spec.as_ref()?.node_name.clone())
            .collect();
        let nodes_ready: BTreeSet<String> = nodes
            .list(&ListParams::default())
            .await
            .context("listing the nodes")?
            .items
            .iter()
            .filter(|node| node_is_ready(node))
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

/// Whether `pod` has the condition `Ready=True`.
pub fn pod_is_ready(pod: &Pod) -> bool {
    let conditions = pod
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten());
    is_ready(conditions.map(|c| (c.type_.as_str(), c.status.as_str())))
}

/// Whether `node` has the condition `Ready=True`.
pub fn node_is_ready(node: &Node) -> bool {
    let conditions = node
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten());
    is_ready(conditions.map(|c| (c.type_.as_str(), c.status.as_str())))
}

/// Whether conditions, as (type, status), hold `Ready=True` (for a pod or a
/// node alike).
fn is_ready<'a>(mut conditions: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    conditions.any(|(kind, status)| kind == "Ready" && status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_stack_manifests_set_the_ipv6_pod_network_for_both_components() {
        let manifest = include_str!("../../../manifests/weft.yaml");
        let dual = with_cluster_cidr_v6(manifest, CLUSTER_CIDR_V6).unwrap();
        let wanted = format!("    clusterCidrV6: \"{CLUSTER_CIDR_V6}\"");
        assert_eq!(dual.matches(&wanted).count(), CONFIG_FILES, "{dual}");
        // Nothing else changed.
        let without: Vec<&str> = dual.lines().filter(|line| *line != wanted).collect();
        assert_eq!(without, manifest.lines().collect::<Vec<_>>());
        let again = with_cluster_cidr_v6(&dual, CLUSTER_CIDR_V6).unwrap_err();
        assert!(again.to_string().contains("clusterCidrV6"), "{again}");
        let unknown = with_cluster_cidr_v6("kind: List\n", CLUSTER_CIDR_V6).unwrap_err();
        assert!(
            unknown.to_string().contains("render-manifests"),
            "{unknown}"
        );
    }
}
