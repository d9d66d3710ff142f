//! The agent's `/status` against a real apiserver, the real controller and
//! a real agent per node (vxlan, two nodes on one segment): a healthy
//! cluster reports every node ready with its slice and every other node
//! accepted, the last reconcile ok and policy enforced; a hostile Node
//! publishing node 0's own address is listed as rejected, with the
//! annotation at fault and why; `?check=kernel` finds the kernel as the
//! agent wants it; an unknown check is refused. `?check=kernel&peer=<node>`
//! lists what a node holds for one peer, and `?check=dump` reads Weft's
//! part of the kernel. Needs root.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use serde_json::json;
use weft_core::status::{AgentStatus, KernelDump, PeerEntries, RejectedPeer};
use weft_e2e::ClusterNode;
use weft_testing::{require_root, run, wait_for};

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

/// `node`'s agent's `/status?<query>`, which must answer 200, parsed.
fn checked(node: &ClusterNode, query: &str) -> Result<AgentStatus> {
    let (line, body) = get(node, &format!("/status?{query}"))?;
    ensure!(line.starts_with("HTTP/1.1 200"), "?{query}: {line}: {body}");
    serde_json::from_str(&body).with_context(|| format!("?{query} body: {body}"))
}

/// What `node`'s agent holds for `peer` (`?check=kernel&peer=<peer>`).
fn peer_entries(node: &ClusterNode, peer: &str) -> Result<PeerEntries> {
    checked(node, &format!("check=kernel&peer={peer}"))?
        .kernel
        .context("check=kernel gave no kernel section")?
        .peer
        .context("check=kernel&peer= gave no peer section")
}

/// A Node publishing `address` as its public IP, with a VTEP MAC.
async fn impostor(overlay: &Overlay, name: &str, address: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(overlay.admin.clone());
    let impostor: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": {
                "weft.dev/public-ip": address,
                "weft.dev/backend-type": "vxlan",
                "weft.dev/backend-data": r#"{"vtepMAC":"0a:58:00:00:0b:04"}"#,
            },
        },
    }))?;
    nodes.create(&Default::default(), &impostor).await?;
    Ok(())
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

/// Two vxlan nodes on one segment, each agent ready with the other's route.
async fn programmed_pair() -> Result<Overlay> {
    let mut overlay = Overlay::start(OverlaySpec {
        nodes: 2,
        routed_nodes: 0,
        ..OverlaySpec::default()
    })
    .await?;
    overlay.start_agents()?;
    overlay.wait_programmed(1).await?;
    Ok(overlay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_healthy_node_and_a_rejected_peer() -> Result<()> {
    require_root!("the e2e harness");
    let overlay = programmed_pair().await?;
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
    impostor(&overlay, "aaa-impostor", &node0.underlay_ip().to_string()).await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lists_its_entries_for_a_peer_and_dumps_its_kernel() -> Result<()> {
    require_root!("the e2e harness");
    let overlay = programmed_pair().await?;
    let (node0, node1) = (overlay.node(0), overlay.node(1));
    let slice = overlay.slices().await?[&node1.name].clone();
    let vtep = slice
        .split('/')
        .next()
        .context("a slice has a '/'")?
        .to_string();
    let peer_mac = wait_status(&overlay, &node1, "to publish its VTEP MAC", |status| {
        ensure!(status.vtep_mac.is_some(), "no VTEP MAC yet");
        Ok(())
    })?
    .vtep_mac
    .context("no VTEP MAC")?;
    let route = format!("route {slice} via {vtep} dev weft.1 onlink");
    let entries = vec![
        format!("neighbour {vtep} lladdr {peer_mac} dev weft.1"),
        format!("fdb {peer_mac} dst {} dev weft.1", node1.underlay_ip()),
        route.clone(),
        // Replies to node 1's own traffic through the tunnel go back in it.
        format!(
            "route {} via {vtep} dev weft.1 onlink table 8787",
            node1.underlay_ip()
        ),
    ];

    // A healthy pair: node 0 holds all four entries for node 1.
    let healthy = wait_for(PATIENCE, "node 0 to hold node 1's entries", || {
        let found = peer_entries(&node0, &node1.name)?;
        let held: Vec<&str> = found
            .entries
            .iter()
            .filter(|e| e.held)
            .map(|e| e.entry.as_str())
            .collect();
        ensure!(held == entries, "held {held:?} of {entries:?}: {found:?}");
        Ok(Some(found))
    })
    .with_context(|| overlay.logs())?;
    assert_eq!(
        (healthy.state.as_str(), &healthy.reason),
        ("accepted", &None)
    );
    assert_eq!(healthy.node, node1.name);
    let (_, body) = get(&node0, &format!("/status?check=kernel&peer={}", node1.name))?;
    eprintln!(
        "GET /status?check=kernel&peer={} on {}:\n{body}",
        node1.name, node0.name
    );

    // The route deleted by hand: not held, and missing in the same words.
    // The agent's resync (every 5 s here) puts it back, so delete it again
    // until a check lands before the repair.
    let broken = wait_for(PATIENCE, "a check to see the route gone", || {
        let _ = run(node0.command("ip").args(["route", "del", &slice]));
        let checked = checked(&node0, &format!("check=kernel&peer={}", node1.name))?;
        let kernel = checked.kernel.context("no kernel section")?;
        let peer = kernel.peer.clone().context("no peer section")?;
        let route_entry = peer.entries.iter().find(|e| e.entry == route);
        ensure!(
            route_entry.is_some_and(|e| !e.held),
            "route still held: {peer:?}"
        );
        Ok(Some((kernel, peer)))
    })?;
    let (kernel, peer) = broken;
    assert!(kernel.missing.contains(&route), "{kernel:?}");
    // The neighbour and FDB entry stay.
    assert!(peer.entries[..2].iter().all(|e| e.held), "{peer:?}");

    // A Node nobody knows, and one the screen rejects.
    let unknown = peer_entries(&node0, "no-such-node")?;
    assert_eq!(unknown.state, "unknown");
    assert!(unknown.entries.is_empty());
    impostor(&overlay, "zz-impostor", &node0.underlay_ip().to_string()).await?;
    let rejected = wait_for(PATIENCE, "node 0 to reject the impostor", || {
        let found = peer_entries(&node0, "zz-impostor")?;
        ensure!(found.state == "rejected", "{found:?}");
        Ok(Some(found))
    })?;
    assert_eq!(
        rejected.reason,
        Some(format!(
            "weft.dev/public-ip: {} is this node's address",
            node0.underlay_ip()
        ))
    );
    let (_, body) = get(&node0, "/status?check=kernel&peer=zz-impostor")?;
    eprintln!(
        "GET /status?check=kernel&peer=zz-impostor on {}:\n{body}",
        node0.name
    );

    // A value no Node can be called, and peer= without check=kernel.
    for query in ["check=kernel&peer=Node_1", "peer=node-1"] {
        let (line, body) = get(&node0, &format!("/status?{query}"))?;
        ensure!(line.starts_with("HTTP/1.1 400"), "?{query}: {line}: {body}");
        assert!(body.starts_with("peer"), "{body}");
    }

    // The dump: node 1's overlay route, its FDB entry, Weft's tables.
    let dump: KernelDump = wait_for(PATIENCE, "the dump to hold node 1's route", || {
        let dump = checked(&node0, "check=dump")?
            .dump
            .context("check=dump gave no dump section")?;
        let overlay_route = format!("{slice} via {vtep} dev weft.1 proto 87 onlink");
        ensure!(
            dump.routes.iter().any(|r| r.starts_with(&overlay_route)),
            "{overlay_route} not in {:?}",
            dump.routes
        );
        Ok(Some(dump))
    })?;
    assert!(dump.errors.is_empty(), "{:?}", dump.errors);
    let fdb = format!(
        "{peer_mac} dev weft.1 dst {} self permanent",
        node1.underlay_ip()
    );
    assert!(dump.fdb.contains(&fdb), "{fdb} not in {:?}", dump.fdb);
    // The return rule for node 0's own slice.
    assert!(
        dump.rules.iter().any(|r| r.contains("lookup 8787")),
        "no return rule in {:?}",
        dump.rules
    );
    for table in ["inet weft", "inet weft-policy", "inet weft-guard"] {
        let listing = dump
            .tables
            .get(table)
            .with_context(|| format!("{table} not dumped: {:?}", dump.tables.keys()))?;
        assert!(listing.contains(&format!("table {table} {{")), "{listing}");
    }
    assert!(
        dump.links.iter().any(|l| l.starts_with("weft.1 vxlan ")),
        "{:?}",
        dump.links
    );
    assert!(checked(&node0, "check=dump")?.kernel.is_none());
    let (_, body) = get(&node0, "/status?check=dump")?;
    eprintln!("GET /status?check=dump on {}:\n{body}", node0.name);

    // Another owner's route to node 1's slice: node 1 is held, and says why.
    run(node0
        .command("ip")
        .args(["route", "replace", "blackhole", &slice, "proto", "static"]))?;
    let held = wait_for(PATIENCE, "node 0 to hold node 1", || {
        let found = peer_entries(&node0, &node1.name)?;
        ensure!(found.state == "held", "{found:?}");
        Ok(Some(found))
    })?;
    let reason = held.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "route conflict: {slice} is already routed by a blackhole route of proto static"
        )),
        "{held:?}"
    );
    assert!(
        held.entries.iter().any(|e| e.entry == route && !e.held),
        "{held:?}"
    );
    let (_, body) = get(&node0, &format!("/status?check=kernel&peer={}", node1.name))?;
    eprintln!(
        "GET /status?check=kernel&peer={} on {} with a conflict:\n{body}",
        node1.name, node0.name
    );
    overlay.cluster.stop().await
}
