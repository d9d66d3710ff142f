//! Uninstall on the e2e harness: agents told their DaemonSet (a bare
//! apps/v1 object; the harness has no kubelet to run it) keep the data plane
//! across a restart while it exists, and remove Weft from the node when
//! stopped after it is deleted, even with their RBAC already gone.
//!
//! Needs root and the harness's control-plane binaries (built on first use).

use std::path::PathBuf;

use anyhow::{ensure, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{DeleteParams, PostParams};
use kube::Api;
use weft_e2e::ClusterNode;
use weft_testing::{eventually, require_root, run, wait_for};

mod testbed;

use testbed::{Overlay, OverlaySpec, PATIENCE};

const NAMESPACE: &str = "kube-system";
const DAEMONSET: &str = "weft-agent";

/// The smallest DaemonSet the API accepts.
fn daemon_set() -> Result<DaemonSet> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": { "name": DAEMONSET, "namespace": NAMESPACE },
        "spec": {
            "selector": { "matchLabels": { "app": DAEMONSET } },
            "template": {
                "metadata": { "labels": { "app": DAEMONSET } },
                "spec": { "containers": [{ "name": "agent", "image": "localhost/weft:test" }] }
            }
        }
    }))?)
}

/// What Weft leaves on `node`, one line per thing; empty when clean.
fn weft_leftovers(node: &ClusterNode) -> Result<Vec<String>> {
    let mut found = Vec::new();
    // weft0 is the legacy pod bridge, which uninstall removes too.
    for link in ["weft.1", "weft0"] {
        if run(node.command("ip").args(["link", "show", link])).is_ok() {
            found.push(format!("link {link}"));
        }
    }
    for family in ["-4", "-6"] {
        let routes = run(node
            .command("ip")
            .args([family, "route", "show", "proto", "87"]))?;
        found.extend(routes.lines().map(|r| format!("route {r}")));
        // Every table: the return table's routes are Weft's too.
        let routes = run(node
            .command("ip")
            .args([family, "route", "show", "table", "all", "proto", "87"]))?;
        found.extend(
            routes
                .lines()
                .filter(|r| r.contains("table "))
                .map(|r| format!("route {r}")),
        );
        let rules = run(node.command("ip").args([family, "rule", "show"]))?;
        found.extend(
            rules
                .lines()
                .filter(|rule| rule.contains("proto 87"))
                .map(|rule| format!("rule {rule}")),
        );
    }
    let tables = run(node.command("nft").args(["list", "tables"]))?;
    found.extend(
        tables
            .lines()
            .filter(|table| table.starts_with("table inet weft"))
            .map(|table| format!("nft {table}")),
    );
    let files: [PathBuf; 3] = [
        node.state_dir.join("net.d/10-weft.conflist"),
        node.state_dir.join("bin/weft"),
        node.state_dir.join("node.json"),
    ];
    found.extend(
        files
            .iter()
            .filter(|f| f.exists())
            .map(|f| f.display().to_string()),
    );
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_remove_weft_only_when_their_daemon_set_is_gone() -> Result<()> {
    require_root!("the e2e harness");
    let mut overlay = Overlay::start(OverlaySpec {
        nodes: 2,
        routed_nodes: 0,
        ..OverlaySpec::default()
    })
    .await?;
    let daemon_sets: Api<DaemonSet> = Api::namespaced(overlay.admin.clone(), NAMESPACE);
    daemon_sets
        .create(&PostParams::default(), &daemon_set()?)
        .await?;
    overlay.agent_env = vec![
        ("WEFT_DAEMONSET".into(), DAEMONSET.into()),
        ("POD_NAMESPACE".into(), NAMESPACE.into()),
    ];
    overlay.start_agents()?;
    overlay.wait_programmed(1).await?;
    let pods = overlay.add_pods()?;
    let node0 = overlay.node(0);

    // A restart while the DaemonSet exists keeps everything.
    let first = overlay.agents[&node0.name].clone();
    overlay.restart_agent(&node0)?;
    ensure!(
        first.log().contains("restart, not uninstall"),
        "{}",
        first.log()
    );
    let kept = weft_leftovers(&node0)?;
    ensure!(
        kept.iter().any(|k| k == "link weft.1")
            && kept.iter().any(|k| k == "nft table inet weft-guard")
            && kept.iter().any(|k| k.starts_with("route unreachable")),
        "restart removed state: {kept:?}"
    );
    overlay.wait_programmed(1).await?;

    // Uninstall as `kubectl delete -f` does it: DaemonSet and RBAC go, then
    // the agents are stopped, now refused by the API.
    daemon_sets
        .delete(DAEMONSET, &DeleteParams::default())
        .await?;
    for agent in overlay.agents.values() {
        wait_for(PATIENCE, "the agent to see its DaemonSet deleted", || {
            Ok(agent.log().contains("DaemonSet is deleted").then_some(()))
        })?;
    }
    let bindings: Api<RoleBinding> = Api::namespaced(overlay.admin.clone(), NAMESPACE);
    bindings
        .delete("weft-agent", &DeleteParams::default())
        .await?;
    // RBAC changes reach the authorizer through a cache: wait until the
    // agents' identity is refused, as it is by the time pods are stopped.
    let as_agent: Api<DaemonSet> = Api::namespaced(
        overlay
            .cluster
            .service_account_client(NAMESPACE, "weft-agent")
            .await?,
        NAMESPACE,
    );
    eventually(PATIENCE, "the agent to be refused", || async {
        let refused =
            matches!(as_agent.get(DAEMONSET).await, Err(kube::Error::Api(s)) if s.code == 403);
        Ok(refused.then_some(()))
    })
    .await?;
    for node in overlay.cluster.nodes().to_vec() {
        let agent = overlay.agents[&node.name].clone();
        agent.kill()?;
        let log = agent.log();
        ensure!(log.contains("uninstall:"), "{log}");
        ensure!(log.contains("Refused(403)"), "{log}");
        let left = weft_leftovers(&node)?;
        ensure!(left.is_empty(), "{} kept {left:?}\n{log}", node.name);
    }
    drop(pods);
    overlay.cluster.stop().await
}
