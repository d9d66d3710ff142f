//! Node objects that lie, as one node's stolen credentials or a careless
//! admin could make them, against a real apiserver, the real controller and
//! an agent per node (vxlan, three nodes, one behind a router). Each hostile
//! Node is rejected by every agent, and nothing moves: every node's routes,
//! FDB entries and neighbours stay as they were, and every pod still
//! reaches every other. That holds for a copier of a node's VTEP MAC whose
//! Node is as old as the victim's, too. Needs root.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::{json, Value};
use weft_core::annotations::VtepMac;
use weft_e2e::{ClusterNode, Pod, Segment};
use weft_testing::{eventually, require_root, run, wait_for};

mod testbed;

use testbed::{agent_get, ping_all, vxlan_overlay_with_pods, weft_routes, Overlay, PATIENCE};

/// A Node to create: its name, annotations, `spec`, and the reason node 0's
/// agent gives for rejecting it (`None`: it claims nothing an agent could
/// program, so nothing is rejected).
struct Hostile {
    name: &'static str,
    annotations: Value,
    spec: Value,
    reason: Option<&'static str>,
}

/// What Weft programmed on a node: its routes, the FDB entries that lead to
/// other nodes, and the permanent neighbours on `weft.1`.
#[derive(Debug, PartialEq)]
struct Programmed {
    routes: BTreeMap<String, String>,
    fdb: Vec<String>,
    neighbours: Vec<String>,
}

fn programmed(node: &ClusterNode) -> Result<Programmed> {
    let lines = |program: &str, args: &[&str], keep: &str| -> Result<Vec<String>> {
        let mut lines: Vec<String> = run(node.command(program).args(args))?
            .lines()
            .filter(|line| line.contains(keep))
            .map(str::to_owned)
            .collect();
        lines.sort();
        Ok(lines)
    };
    Ok(Programmed {
        routes: weft_routes(node)?,
        fdb: lines("bridge", &["fdb", "show", "dev", "weft.1"], " dst ")?,
        neighbours: lines("ip", &["neigh", "show", "dev", "weft.1"], "PERMANENT")?,
    })
}

/// Every node's [`Programmed`], by name.
fn programmed_everywhere(overlay: &Overlay) -> Result<BTreeMap<String, Programmed>> {
    overlay
        .cluster
        .nodes()
        .iter()
        .map(|node| Ok((node.name.clone(), programmed(node)?)))
        .collect()
}

async fn create(overlay: &Overlay, hostile: &Hostile) -> Result<()> {
    let nodes: Api<Node> = Api::all(overlay.admin.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": hostile.name, "annotations": hostile.annotations},
        "spec": hostile.spec,
    }))?;
    nodes
        .create(&Default::default(), &node)
        .await
        .with_context(|| format!("creating Node {}", hostile.name))?;
    Ok(())
}

/// The annotation `key` of `node`.
fn annotation(node: &Node, key: &str) -> Result<String> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key).cloned())
        .with_context(|| {
            let name = node.metadata.name.as_deref().unwrap_or_default();
            format!("Node {name} has no {key}")
        })
}

/// The creation second of `node`, as the API server recorded it.
fn created(node: &Node) -> Result<i64> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let time = node.metadata.creation_timestamp.as_ref();
    Ok(time
        .with_context(|| format!("Node {name} has no creationTimestamp"))?
        .0
        .as_second())
}

/// Waits until the agent on `node` has logged a rejection of each of
/// `names` (with `reason`, where given).
fn wait_rejected(
    overlay: &Overlay,
    node: &ClusterNode,
    names: &[(&str, Option<&str>)],
) -> Result<()> {
    let agent = &overlay.agents[&node.name];
    wait_for(
        PATIENCE,
        &format!("{} to reject every hostile Node", node.name),
        || {
            let log = agent.log();
            Ok(names
                .iter()
                .all(|(name, reason)| {
                    log.lines().any(|line| {
                        line.contains("peer rejected")
                            && line.contains(name)
                            && reason.is_none_or(|reason| line.contains(reason))
                    })
                })
                .then_some(()))
        },
    )
    .with_context(|| overlay.logs())
}

/// The sum of `weft_agent_rejected_peers` over its reasons on `node`.
fn rejected_peers(node: &ClusterNode) -> Result<u64> {
    let metrics = agent_get(node, "/metrics")?;
    Ok(metrics
        .lines()
        .filter(|line| line.starts_with("weft_agent_rejected_peers{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_nodes_are_rejected_and_move_no_traffic() -> Result<()> {
    require_root!("the e2e harness");
    let (mut overlay, mut pods) = vxlan_overlay_with_pods().await?;
    let (node0, node1, routed) = (overlay.node(0), overlay.node(1), overlay.node(2));
    let before = programmed_everywhere(&overlay)?;

    let nodes: Api<Node> = Api::all(overlay.admin.clone());
    let node1_object = nodes.get(&node1.name).await?;
    let node1_slice = annotation(&node1_object, "weft.dev/pod-cidr")?;
    let node1_data = annotation(&node1_object, "weft.dev/backend-data")?;
    let node1_network = node1_slice.split('/').next().context("node-1's slice")?;

    // Each hostile Node gets a fresh address on node 0's segment and a MAC
    // of its own, unless that is what it lies about; names sort before the
    // real nodes', which once decided conflicts.
    let mut next = 200u8;
    let mut sound = |slice: Option<String>| {
        next += 1;
        let [a, b, c, _] = node0.underlay_ip().octets();
        let mut annotations = json!({
            "weft.dev/public-ip": format!("{a}.{b}.{c}.{next}"),
            "weft.dev/backend-type": "vxlan",
            "weft.dev/backend-data": format!(r#"{{"vtepMAC":"0a:58:00:00:0a:{next:02x}"}}"#),
        });
        if let Some(slice) = slice {
            annotations["weft.dev/pod-cidr"] = Value::from(slice);
        }
        annotations
    };
    let claiming = |name, slice: String, reason| (name, Some(slice), reason);
    let mut hostile: Vec<Hostile> = [
        claiming(
            "aaa-underlay",
            node0.underlay_address.trunc().to_string(),
            "slice_outside_cluster_cidr",
        ),
        claiming(
            "aaa-routed-segment",
            routed.underlay_address.trunc().to_string(),
            "slice_outside_cluster_cidr",
        ),
        claiming("aaa-services", "10.96.0.0/12".into(), "slice_size"),
        claiming(
            "aaa-internet",
            "8.8.8.0/24".into(),
            "slice_outside_cluster_cidr",
        ),
        claiming("aaa-v6-in-v4-key", "2000::/3".into(), "malformed"),
        claiming(
            "aaa-host-route",
            format!("{}/32", node1.underlay_ip()),
            "slice_size",
        ),
        claiming("aaa-slice-thief", node1_slice.clone(), "slice_conflict"),
        claiming(
            "aaa-half-slice",
            format!("{node1_network}/25"),
            "slice_size",
        ),
    ]
    .into_iter()
    .map(|(name, slice, reason)| Hostile {
        name,
        annotations: sound(slice),
        spec: json!({}),
        reason: Some(reason),
    })
    .collect();
    // Wider than the cluster, in spec.podCIDR only: agents read slices from
    // the controller's annotation alone, and the controller adopts nothing
    // outside the cluster CIDR.
    hostile.push(Hostile {
        name: "aaa-spec-only",
        annotations: sound(None),
        spec: json!({"podCIDR": "128.0.0.0/1", "podCIDRs": ["128.0.0.0/1"]}),
        reason: None,
    });
    let mut publishing = |name, public_ip: &str, backend_data: &str, reason| {
        let mut annotations = sound(None);
        annotations["weft.dev/public-ip"] = Value::from(public_ip);
        annotations["weft.dev/backend-data"] = Value::from(backend_data);
        Hostile {
            name,
            annotations,
            spec: json!({}),
            reason: Some(reason),
        }
    };
    let free_ip = |last: u8| {
        let [a, b, c, _] = node0.underlay_ip().octets();
        format!("{a}.{b}.{c}.{last}")
    };
    let mac = |last: u8| format!(r#"{{"vtepMAC":"0a:58:00:00:0b:{last:02x}"}}"#);
    hostile.extend(
        [
            (
                "aaa-mac-thief",
                free_ip(250),
                node1_data.clone(),
                "vtep_mac_conflict",
            ),
            (
                "aaa-zero-mac",
                free_ip(251),
                r#"{"vtepMAC":"00:00:00:00:00:00"}"#.into(),
                "malformed",
            ),
            (
                "aaa-loopback",
                "127.0.0.1".into(),
                mac(1),
                "public_ip_unusable",
            ),
            (
                "aaa-unspecified",
                "0.0.0.0".into(),
                mac(2),
                "public_ip_unusable",
            ),
            (
                "aaa-multicast",
                "224.0.0.1".into(),
                mac(3),
                "public_ip_unusable",
            ),
        ]
        .map(|(name, public_ip, backend_data, reason)| {
            publishing(name, &public_ip, &backend_data, reason)
        }),
    );
    for node in &hostile {
        create(&overlay, node).await?;
    }

    // Every agent names each one it rejects; node 0 with the reason.
    let rejected: Vec<(&str, Option<&str>)> = hostile
        .iter()
        .filter_map(|node| node.reason.map(|reason| (node.name, Some(reason))))
        .collect();
    wait_rejected(&overlay, &node0, &rejected)?;
    let any_reason: Vec<_> = rejected.iter().map(|(name, _)| (*name, None)).collect();
    for node in [&node1, &routed] {
        wait_rejected(&overlay, node, &any_reason)?;
    }
    wait_for(PATIENCE, "node 0 to count every rejection", || {
        Ok((rejected_peers(&node0)? == rejected.len() as u64).then_some(()))
    })?;

    // Nothing of theirs reached any kernel, and nothing else moved.
    let after = programmed_everywhere(&overlay)?;
    for (name, was) in &before {
        assert_eq!(&after[name], was, "{name}'s programmed state moved");
    }
    ping_all(&pods, &overlay)?;

    // A Node publishing node 0's own address: node 0 refuses to send
    // anything meant for it to itself.
    let impostor = publishing(
        "aaa-impostor",
        &node0.underlay_ip().to_string(),
        &mac(4),
        "public_ip_own",
    );
    create(&overlay, &impostor).await?;
    wait_rejected(&overlay, &node0, &[(impostor.name, impostor.reason)])?;
    assert_eq!(
        programmed(&node0)?,
        before[&node0.name],
        "node 0's programmed state moved"
    );
    ping_all(&pods, &overlay)?;

    a_twin_copying_a_mac_moves_nothing(&mut overlay, &mut pods, &free_ip(252)).await?;
    overlay.cluster.stop().await
}

/// A hostile Node created in the same second as a new real node (else,
/// when the second turns in between, before it: never after) copies the
/// VTEP MAC that node derives from its slice. Agents once settled a MAC
/// by creation time and rejected both claimants of one second, cutting the
/// victim off; now the MAC stays with the node whose slice derives it, and
/// nothing moves. Screening's same-second rule itself is property-tested
/// in `screen.rs`.
async fn a_twin_copying_a_mac_moves_nothing(
    overlay: &mut Overlay,
    pods: &mut Vec<Pod>,
    twin_ip: &str,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(overlay.admin.clone());
    // Start at the top of a second, so the twin and the node registered
    // right after it (tens of milliseconds) fall into one second.
    let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?;
    tokio::time::sleep(Duration::from_nanos(
        1_000_000_000 - u64::from(since_epoch.subsec_nanos()),
    ))
    .await;
    // No MAC yet: its agent publishes one only once it copies the victim's.
    let twin = Hostile {
        name: "aaa-twin",
        annotations: json!({
            "weft.dev/public-ip": twin_ip,
            "weft.dev/backend-type": "vxlan",
        }),
        spec: json!({}),
        reason: Some("vtep_mac_conflict"),
    };
    create(overlay, &twin).await?;
    let victim = overlay.cluster.add_node(Segment::Main).await?.clone();
    let (twin_created, victim_created) = (
        created(&nodes.get(twin.name).await?)?,
        created(&nodes.get(&victim.name).await?)?,
    );
    ensure!(
        twin_created <= victim_created,
        "{} was created after {}",
        twin.name,
        victim.name
    );
    let when = match victim_created - twin_created {
        0 => "in the same second as".to_string(),
        seconds => format!("{seconds}s before"),
    };
    eprintln!("{} created {when} {}", twin.name, victim.name);

    // The victim joins: agent, pod, and every pod reaches every other.
    overlay.start_agent(&victim)?;
    let victim_mac = eventually(PATIENCE, "the new node's VTEP MAC", || async {
        let node = nodes.get(&victim.name).await?;
        let (Ok(slice), Ok(data)) = (
            annotation(&node, "weft.dev/pod-cidr"),
            annotation(&node, "weft.dev/backend-data"),
        ) else {
            return Ok(None);
        };
        Ok(Some((slice.parse::<IpNet>()?, data)))
    })
    .await
    .with_context(|| overlay.logs())?;
    let (victim_slice, victim_data) = victim_mac;
    let mac = VtepMac::derived_from(&victim_slice);
    ensure!(
        victim_data.contains(&mac.to_string()),
        "{} publishes {victim_data}, not the MAC {mac} its slice {victim_slice} derives",
        victim.name
    );
    pods.push(overlay.add_pod(&victim)?);
    ping_all(pods, overlay)?;
    let before = programmed_everywhere(overlay)?;
    let fdb_entry = format!("{mac} dst {}", victim.underlay_ip());
    for (name, programmed) in before.iter().filter(|(name, _)| **name != victim.name) {
        ensure!(
            programmed.fdb.iter().any(|line| line.contains(&fdb_entry)),
            "{name} has no FDB entry {fdb_entry}: {programmed:?}"
        );
    }

    // The twin copies the victim's MAC.
    let copy = json!({"metadata": {"annotations": {"weft.dev/backend-data": victim_data}}});
    nodes
        .patch(twin.name, &PatchParams::default(), &Patch::Merge(&copy))
        .await
        .with_context(|| format!("patching Node {}", twin.name))?;
    wait_rejected(overlay, &overlay.node(0), &[(twin.name, twin.reason)])?;
    for node in overlay.cluster.nodes().iter().skip(1) {
        wait_rejected(overlay, node, &[(twin.name, None)])?;
    }
    let after = programmed_everywhere(overlay)?;
    for (name, was) in &before {
        assert_eq!(&after[name], was, "{name}'s programmed state moved");
    }
    ping_all(pods, overlay)
}
