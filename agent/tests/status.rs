//! The agent's `/status` against a real apiserver, the real controller and
//! a real agent per node (vxlan, two nodes on one segment): a healthy
//! cluster reports every node ready with its slice and every other node
//! accepted, the last reconcile ok and policy enforced; a hostile Node
//! publishing node 0's own address is listed as rejected, with the
//! annotation at fault and why; `?check=kernel` finds the kernel as the
//! agent wants it; an unknown check is refused. Needs root.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use serde_json::json;
use weft_core::status::{AgentStatus, RejectedPeer};
use weft_e2e::ClusterNode;
use weft_testing::{require_root, wait_for};

mod testbed;

use testbed::{agent_get, Overlay, OverlaySpec, PATIENCE};

/// The status line and body of `GET path` on `node`'s agent.
fn get(node: &ClusterNode, path: &str) -> Result<(String, String)> {
    let response = agent_get(node, path)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{path} answered without a header end: {response:?}"))?;
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// `node`'s agent's `/status`, parsed.
fn status(node: &ClusterNode) -> Result<AgentStatus> {
    let (line, body) = get(node, "/status")?;
    ensure!(line.starts_with("HTTP/1.1 200"), "/status: {line}: {body}");
    serde_json::from_str(&body).with_context(|| format!("/status body: {body}"))
}

/// Waits until `node`'s `/status` satisfies `healthy` (which names what
/// is still missing), and returns it.
fn wait_status(
    overlay: &Overlay,
    node: &ClusterNode,
    what: &str,
    healthy: impl Fn(&AgentStatus) -> Result<()>,
) -> Result<AgentStatus> {
    wait_for(PATIENCE, &format!("{}'s /status {what}", node.name), || {
        let status = status(node)?;
        // Not yet: the reason is what a timeout reports.
        healthy(&status)?;
        Ok(Some(status))
    })
    .with_context(|| overlay.logs())
}

/// The resident set of `node`'s agent in KiB, when its process can be read.
fn agent_rss_kib(overlay: &Overlay, node: &ClusterNode) -> Option<u64> {
    let pid = overlay.agents[&node.name].pid();
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_healthy_node_and_a_rejected_peer() -> Result<()> {
    require_root!("the e2e harness");
    let mut overlay = Overlay::start(OverlaySpec {
        nodes: 2,
        routed_nodes: 0,
        ..OverlaySpec::default()
    })
    .await?;
    overlay.start_agents()?;
    overlay.wait_programmed(1).await?;
    let slices = overlay.slices().await?;
    let names: Vec<String> = overlay
        .cluster
        .nodes()
        .iter()
        .map(|n| n.name.clone())
        .collect();

    let mut documents = BTreeMap::new();
    for node in overlay.cluster.nodes().to_vec() {
        let others: Vec<String> = names.iter().filter(|n| **n != node.name).cloned().collect();
        let document = wait_status(&overlay, &node, "to be healthy", |status| {
            ensure!(status.readiness.ready, "not ready: {:?}", status.readiness);
            ensure!(
                status.peers.accepted == others,
                "accepted {:?}",
                status.peers
            );
            let reconcile = status.last_reconcile.as_ref().context("no reconcile yet")?;
            ensure!(reconcile.result == "ok", "last reconcile: {reconcile:?}");
            let policy = status.policy.as_ref().context("no policy section")?;
            let synced = policy.last_sync.as_ref().context("policy not synced yet")?;
            ensure!(synced.result == "ok", "policy sync: {synced:?}");
            Ok(())
        })?;
        assert_eq!(document.node, node.name);
        assert_eq!(document.backend, "vxlan");
        assert_eq!(document.slices, vec![slices[&node.name].clone()]);
        assert!(document.readiness.reason.is_none());
        assert!(document.peers.rejected.is_empty() && document.peers.held.is_empty());
        let underlay = document.underlay.as_ref().context("no underlay")?;
        assert_eq!(underlay.address, node.underlay_ip().to_string());
        assert!(!underlay.device.is_empty());
        assert!(document.mtu.is_some_and(|mtu| mtu > 0));
        assert!(document.vtep_mac.is_some());
        let policy = document.policy.as_ref().context("no policy section")?;
        assert!(policy.enabled && policy.refused.is_empty());
        assert!(policy.fingerprint.is_some());
        assert!(document.kernel.is_none());
        documents.insert(node.name.clone(), document);
    }
    // No pods, no policies: both nodes enforce the same (empty) plan.
    let fingerprints: Vec<_> = documents
        .values()
        .map(|d| d.policy.as_ref().map(|p| p.fingerprint.clone()))
        .collect();
    assert_eq!(fingerprints[0], fingerprints[1]);

    // Serving /status is reading memory: many requests leave the agent's
    // resident set where it was (printed, not asserted: allocators vary).
    let node0 = overlay.node(0);
    let before = agent_rss_kib(&overlay, &node0);
    for _ in 0..200 {
        status(&node0)?;
    }
    let after = agent_rss_kib(&overlay, &node0);
    eprintln!("agent RSS before 200 /status requests: {before:?} KiB, after: {after:?} KiB");
    let (_, body) = get(&node0, "/status")?;
    eprintln!("GET /status on {}:\n{body}", node0.name);

    // A Node publishing node 0's own address as its public IP.
    let nodes: Api<Node> = Api::all(overlay.admin.clone());
    let impostor: Node = serde_json::from_value(json!({
        "metadata": {
            "name": "aaa-impostor",
            "annotations": {
                "weft.dev/public-ip": node0.underlay_ip().to_string(),
                "weft.dev/backend-type": "vxlan",
                "weft.dev/backend-data": r#"{"vtepMAC":"0a:58:00:00:0b:04"}"#,
            },
        },
    }))?;
    nodes.create(&Default::default(), &impostor).await?;
    let expected = RejectedPeer {
        node: "aaa-impostor".into(),
        field: "weft.dev/public-ip".into(),
        reason: format!("{} is this node's address", node0.underlay_ip()),
    };
    let document = wait_status(&overlay, &node0, "to reject the impostor", |status| {
        ensure!(
            status.peers.rejected.contains(&expected),
            "rejected {:?}",
            status.peers.rejected
        );
        Ok(())
    })?;
    // Nothing else moved: the real peer is still accepted.
    assert_eq!(document.peers.accepted, vec![names[1].clone()]);
    assert!(document.readiness.ready);
    let (_, body) = get(&node0, "/status")?;
    eprintln!("GET /status on {} with the impostor:\n{body}", node0.name);

    // The kernel holds what the agent wants, and the plugin's store (none
    // at the default path here: the test pods keep theirs per node) is
    // audited.
    let (line, body) = get(&node0, "/status?check=kernel")?;
    ensure!(
        line.starts_with("HTTP/1.1 200"),
        "check=kernel: {line}: {body}"
    );
    eprintln!("GET /status?check=kernel on {}:\n{body}", node0.name);
    let checked: AgentStatus = serde_json::from_str(&body)?;
    let kernel = checked
        .kernel
        .context("check=kernel gave no kernel section")?;
    assert!(kernel.is_clean(), "{kernel:?}");
    assert!(checked.ipam.is_some(), "no IPAM audit: {}", overlay.logs());

    let (line, body) = get(&node0, "/status?check=nope")?;
    if !line.starts_with("HTTP/1.1 400") {
        bail!("/status?check=nope answered {line}: {body}");
    }
    assert!(body.contains("check=kernel"), "{body}");
    overlay.cluster.stop().await
}
