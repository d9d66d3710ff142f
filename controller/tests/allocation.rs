//! `weft-controller` against a real kube-apiserver, running as its
//! ServiceAccount bound to exactly `controller/rbac.yaml`.
//!
//! Needs root (the harness creates network namespaces) and the harness's
//! control-plane binaries (built on first use). Run with
//! `cargo test -p weft-controller --test allocation`.

mod testbed;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use kube::api::{Patch, PatchParams};
use testbed::{logs, ApiRelay, NodeCidrs, Replica, Testbed, PATIENCE};
use weft_testing::{eventually, require_root};

fn names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

fn v4_slice(cidrs: &NodeCidrs) -> Result<Ipv4Net> {
    let annotation = cidrs
        .annotation
        .as_deref()
        .context("no weft.dev/pod-cidr annotation")?;
    ensure!(
        cidrs.spec.first().map(String::as_str) == Some(annotation),
        "spec.podCIDRs {:?} and annotation {annotation} disagree",
        cidrs.spec
    );
    Ok(annotation.parse()?)
}

async fn wait_for_metric(replica: &Replica, series: &str, want: f64) -> Result<()> {
    eventually(PATIENCE, &format!("{series} to reach {want}"), || async {
        Ok((replica.metric(series)? == Some(want)).then_some(()))
    })
    .await
    .with_context(|| logs(&[replica]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_nodes_get_distinct_slices_that_survive_a_restart() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    let cluster_cidr: Ipv4Net = "10.244.0.0/16".parse()?;
    let first = bed.start_controller("controller-first", &["--cluster-cidr=10.244.0.0/16"])?;
    let nodes = names("node", 50);
    bed.create_nodes(&nodes, 16).await?;
    let before = bed.wait_for_slices(&nodes, &[&first]).await?;

    let mut slices = BTreeSet::new();
    for name in &nodes {
        let slice = v4_slice(&before[name]).with_context(|| format!("node {name}"))?;
        ensure!(
            cluster_cidr.contains(&slice) && slice.prefix_len() == 24,
            "{name} got {slice}"
        );
        ensure!(slices.insert(slice), "{slice} handed out twice");
    }
    // Lowest free each time: the first 50 slices, whatever the order.
    let lowest: BTreeSet<Ipv4Net> = cluster_cidr.subnets(24)?.take(50).collect();
    assert_eq!(slices, lowest);
    wait_for_metric(
        &first,
        "weft_controller_slices_allocated{family=\"ipv4\"}",
        50.0,
    )
    .await?;
    wait_for_metric(
        &first,
        "weft_controller_slices_free{family=\"ipv4\"}",
        206.0,
    )
    .await?;
    assert!(testbed::http_get(first.metrics_port, "/readyz")?.starts_with("HTTP/1.1 200"));
    assert!(testbed::http_get(first.metrics_port, "/healthz")?.starts_with("HTTP/1.1 200"));

    first.process.kill()?;
    let second = bed.start_controller("controller-second", &["--cluster-cidr=10.244.0.0/16"])?;
    let late = names("late", 3);
    bed.create_nodes(&late, 3).await?;
    let all: Vec<String> = nodes.iter().chain(&late).cloned().collect();
    let after = bed.wait_for_slices(&all, &[&second]).await?;
    for name in &nodes {
        assert_eq!(
            after[name], before[name],
            "node {name} changed across the restart"
        );
    }
    for name in &late {
        let slice = v4_slice(&after[name])?;
        ensure!(
            slices.insert(slice),
            "{slice} handed out twice after the restart"
        );
    }
    wait_for_metric(
        &second,
        "weft_controller_slices_allocated{family=\"ipv4\"}",
        53.0,
    )
    .await?;
    for replica in [&first, &second] {
        let log = replica.process.log();
        assert!(!log.contains("forbidden"), "{}", logs(&[replica]));
    }
    bed.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_registered_node_gets_its_held_slice_back() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    let controller = bed.start_controller("controller", &["--cluster-cidr=10.244.0.0/16"])?;
    let first = names("node", 3);
    bed.create_nodes(&first, 3).await?;
    let cidrs = bed.wait_for_slices(&first, &[&controller]).await?;
    let held = v4_slice(&cidrs["node-1"])?;

    bed.delete_node("node-1").await?;
    wait_for_metric(
        &controller,
        "weft_controller_slices_allocated{family=\"ipv4\"}",
        2.0,
    )
    .await?;
    // Another node skips the held slice while others are free...
    bed.create_nodes(&["other".to_owned()], 1).await?;
    let cidrs = bed
        .wait_for_slices(&["other".to_owned()], &[&controller])
        .await?;
    assert_eq!(
        v4_slice(&cidrs["other"])?,
        "10.244.3.0/24".parse::<Ipv4Net>()?
    );
    // ...and the node coming back under its name gets it again.
    bed.create_nodes(&["node-1".to_owned()], 1).await?;
    let cidrs = bed
        .wait_for_slices(&["node-1".to_owned()], &[&controller])
        .await?;
    assert_eq!(v4_slice(&cidrs["node-1"])?, held);
    bed.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_is_reported_and_a_deleted_nodes_slice_is_reused() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    // Four /24 slices only.
    let controller = bed.start_controller("controller", &["--cluster-cidr=10.250.0.0/22"])?;
    let full = names("node", 4);
    bed.create_nodes(&full, 4).await?;
    let cidrs = bed.wait_for_slices(&full, &[&controller]).await?;
    let freed = v4_slice(&cidrs["node-1"])?;

    bed.create_nodes(&["waiting".to_owned()], 1).await?;
    let event = bed
        .wait_for_event("waiting", "PodCidrExhausted", &[&controller])
        .await?;
    let note = event.message.unwrap_or_default();
    assert!(note.contains("10.250.0.0/22"), "{note}");
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    wait_for_metric(
        &controller,
        "weft_controller_exhaustions_total{family=\"ipv4\"}",
        1.0,
    )
    .await?;
    assert!(bed.cidrs().await?["waiting"].spec.is_empty());

    bed.delete_node("node-1").await?;
    let cidrs = bed
        .wait_for_slices(&["waiting".to_owned()], &[&controller])
        .await?;
    assert_eq!(v4_slice(&cidrs["waiting"])?, freed);
    bed.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_existing_pod_cidrs_are_reported_and_left_alone() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    // Created before the controller starts, the way it finds a cluster.
    // `dup-a` is older than (or ties with and sorts before) `dup-b`, so it keeps the slice.
    bed.create_node("kcm-node", &["10.244.5.0/24"], &[]).await?;
    bed.create_node("dup-a", &["10.244.9.0/24"], &[]).await?;
    bed.create_node("dup-b", &["10.244.9.0/24"], &[]).await?;
    bed.create_node("outside", &["192.168.7.0/24"], &[]).await?;
    bed.create_node("wide", &["10.244.16.0/20"], &[]).await?;
    bed.create_node("bad-annotation", &[], &[("weft.dev/pod-cidr", "banana")])
        .await?;
    let before = bed.cidrs().await?;

    let controller = bed.start_controller("controller", &["--cluster-cidr=10.244.0.0/16"])?;
    let fresh = names("fresh", 20);
    bed.create_nodes(&fresh, 8).await?;
    let adopted = ["kcm-node".to_owned(), "dup-a".to_owned()];
    let all: Vec<String> = fresh.iter().chain(&adopted).cloned().collect();
    let cidrs = bed.wait_for_slices(&all, &[&controller]).await?;

    for (node, reason) in [
        ("dup-b", "PodCidrDuplicate"),
        ("outside", "PodCidrOutsideClusterCidr"),
        ("wide", "PodCidrMisaligned"),
        ("bad-annotation", "PodCidrInvalid"),
    ] {
        let event = bed.wait_for_event(node, reason, &[&controller]).await?;
        let note = event.message.unwrap_or_default();
        assert!(
            note.contains("spec.podCIDRs") || note.contains("annotation"),
            "{note}"
        );
        assert_eq!(cidrs[node], before[node], "{node} was touched");
    }
    assert_eq!(
        v4_slice(&cidrs["kcm-node"])?,
        "10.244.5.0/24".parse::<Ipv4Net>()?
    );
    assert_eq!(
        v4_slice(&cidrs["dup-a"])?,
        "10.244.9.0/24".parse::<Ipv4Net>()?
    );

    // Fresh nodes get the lowest slices nobody claims: not 5, not 9, not 16-31 (the /20).
    let taken: BTreeSet<Ipv4Net> = fresh
        .iter()
        .map(|n| v4_slice(&cidrs[n]))
        .collect::<Result<_>>()?;
    let expected: BTreeSet<Ipv4Net> = (0..=40u8)
        .filter(|i| ![5, 9].contains(i) && !(16..32).contains(i))
        .take(20)
        .map(|i| format!("10.244.{i}.0/24").parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(taken, expected);
    wait_for_metric(
        &controller,
        "weft_controller_claim_problems_total{reason=\"PodCidrDuplicate\"}",
        1.0,
    )
    .await?;
    // Everything it did (watch, patch, lease, events) fit rbac.yaml.
    assert!(
        !controller.process.log().contains("forbidden"),
        "{}",
        logs(&[&controller])
    );
    bed.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_claims_neither_stall_repairs_nor_flood_events() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    let controller = bed.start_controller("controller", &["--cluster-cidr=10.244.0.0/16"])?;
    let held = ["held".to_owned()];
    bed.create_nodes(&held, 1).await?;
    let slice = v4_slice(&bed.wait_for_slices(&held, &[&controller]).await?["held"])?;

    // Claims that cover the whole cluster, or a /20 around the held slice.
    bed.create_node("everything", &["0.0.0.0/0"], &[]).await?;
    bed.create_node("wide", &[], &[("weft.dev/pod-cidr", "10.244.0.0/20")])
        .await?;
    bed.wait_for_event("everything", "PodCidrOutsideClusterCidr", &[&controller])
        .await?;
    bed.wait_for_event("wide", "PodCidrMisaligned", &[&controller])
        .await?;

    // The held node's annotation is tampered with: the controller never
    // changes a set annotation, so it reports the node and keeps both its
    // spec slice and the tampered one (outside the /20) from other nodes.
    let tampered = "10.244.16.0/24";
    let tamper = serde_json::json!({
        "metadata": { "annotations": { "weft.dev/pod-cidr": tampered } }
    });
    bed.nodes()
        .patch("held", &PatchParams::default(), &Patch::Merge(&tamper))
        .await?;
    let event = bed
        .wait_for_event("held", "AnnotationDisagreesWithSpec", &[&controller])
        .await?;
    let note = event.message.unwrap_or_default();
    for part in [
        tampered,
        &*slice.to_string(),
        "kubectl annotate node held weft.dev/pod-cidr-",
    ] {
        ensure!(note.contains(part), "{part} missing from {note}");
    }
    // And a new node still gets a slice, outside the /20 and the tampered one.
    let fresh = ["fresh".to_owned()];
    bed.create_nodes(&fresh, 1).await?;
    let cidrs = bed.wait_for_slices(&fresh, &[&controller]).await?;
    assert_eq!(
        v4_slice(&cidrs["fresh"])?,
        "10.244.17.0/24".parse::<Ipv4Net>()?
    );
    assert_eq!(cidrs["held"].annotation.as_deref(), Some(tampered));
    // The administrator's fix: remove the annotation; the controller writes
    // the node's slice into it again.
    let remove = serde_json::json!({
        "metadata": { "annotations": { "weft.dev/pod-cidr": null } }
    });
    bed.nodes()
        .patch("held", &PatchParams::default(), &Patch::Merge(&remove))
        .await?;
    eventually(
        PATIENCE,
        "the held node's annotation to be rewritten",
        || async {
            let cidrs = bed.cidrs().await?;
            Ok((cidrs["held"].annotation.as_deref() == Some(&*slice.to_string())).then_some(()))
        },
    )
    .await
    .with_context(|| logs(&[&controller]))?;

    // A claim that changes as fast as it can be written: every change is a
    // new occurrence, yet there is one Event, updated at most once a minute.
    bed.create_node("flapping", &[], &[("weft.dev/pod-cidr", "10.244.250.0/25")])
        .await?;
    bed.wait_for_event("flapping", "PodCidrMisaligned", &[&controller])
        .await?;
    for round in 0..40 {
        let value = format!("10.244.{}.0/25", 250 + round % 2);
        let flap = serde_json::json!({
            "metadata": { "annotations": { "weft.dev/pod-cidr": value } }
        });
        bed.nodes()
            .patch("flapping", &PatchParams::default(), &Patch::Merge(&flap))
            .await?;
    }
    let series = "weft_controller_claim_problems_total{reason=\"PodCidrMisaligned\"}";
    let event = eventually(
        PATIENCE,
        "the flapping node's Event to count again",
        || async {
            let events = bed.events("flapping", "PodCidrMisaligned").await?;
            ensure!(events.len() == 1, "{} events: {events:#?}", events.len());
            Ok(events
                .into_iter()
                .find(|event| event.count.unwrap_or(1) > 1))
        },
    )
    .await
    .with_context(|| logs(&[&controller]))?;
    let occurrences = controller.metric(series)?.unwrap_or(0.0);
    let count = f64::from(event.count.unwrap_or(0));
    // `wide` and at least two of the flapping node's claims were counted.
    ensure!(
        (2.0..occurrences).contains(&count),
        "event count {count}, {occurrences} occurrences counted"
    );
    ensure!(
        event.last_timestamp.is_some() && event.last_timestamp >= event.first_timestamp,
        "last {:?}, first {:?}",
        event.last_timestamp,
        event.first_timestamp
    );
    assert_eq!(bed.events("flapping", "PodCidrMisaligned").await?.len(), 1);
    assert_eq!(bed.events("wide", "PodCidrMisaligned").await?.len(), 1);
    bed.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_nodes_get_a_slice_per_family() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    bed.create_node("v4-only", &["10.244.3.0/24"], &[]).await?;
    let controller = bed.start_controller(
        "controller",
        &[
            "--cluster-cidr=10.244.0.0/16",
            "--cluster-cidr-v6=fd00:10::/48",
        ],
    )?;
    let nodes = names("node", 5);
    bed.create_nodes(&nodes, 5).await?;
    let all: Vec<String> = nodes
        .iter()
        .cloned()
        .chain(["v4-only".to_owned()])
        .collect();
    let cidrs = bed.wait_for_slices(&all, &[&controller]).await?;

    let cluster_v6: Ipv6Net = "fd00:10::/48".parse()?;
    let mut seen = BTreeSet::new();
    for name in &nodes {
        let node = &cidrs[name];
        let v6 = node
            .annotation_v6
            .as_deref()
            .context("no weft.dev/pod-cidr-v6")?;
        assert_eq!(
            node.spec,
            vec![node.annotation.clone().unwrap(), v6.to_owned()],
            "{name}"
        );
        let v6: Ipv6Net = v6.parse()?;
        ensure!(
            cluster_v6.contains(&v6) && v6.prefix_len() == 64,
            "{name} got {v6}"
        );
        ensure!(seen.insert(IpNet::V6(v6)), "{v6} handed out twice");
        ensure!(
            seen.insert(IpNet::V4(v4_slice(node)?)),
            "IPv4 slice of {name} handed out twice"
        );
    }
    // spec.podCIDRs is immutable once set: the IPv6 slice goes to the annotation only.
    let single = &cidrs["v4-only"];
    assert_eq!(single.spec, vec!["10.244.3.0/24".to_owned()]);
    let v6: Ipv6Net = single
        .annotation_v6
        .as_deref()
        .context("v4-only got no IPv6 slice")?
        .parse()?;
    ensure!(
        cluster_v6.contains(&v6) && !seen.contains(&IpNet::V6(v6)),
        "v4-only got {v6}"
    );
    wait_for_metric(
        &controller,
        "weft_controller_slices_allocated{family=\"ipv6\"}",
        6.0,
    )
    .await?;
    bed.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_fail_over_when_it_is_killed() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    let args = ["--cluster-cidr=10.244.0.0/16"];
    let replicas = [
        bed.start_controller("controller-a", &args)?,
        bed.start_controller("controller-b", &args)?,
    ];
    let both: Vec<&Replica> = replicas.iter().collect();
    let holder = eventually(PATIENCE, "a leader", || bed.lease_holder())
        .await
        .with_context(|| logs(&both))?;
    let leader = replicas
        .iter()
        .position(|r| r.is(&holder))
        .context("the lease holder is neither replica")?;
    let (leader, standby) = (&replicas[leader], &replicas[1 - leader]);

    let first = names("before", 10);
    bed.create_nodes(&first, 10).await?;
    bed.wait_for_slices(&first, &both).await?;
    assert!(leader.process.log().contains("pod CIDR written"));
    assert!(
        !standby.process.log().contains("pod CIDR written"),
        "the standby wrote:\n{}",
        logs(&[standby])
    );
    assert_eq!(standby.metric("weft_controller_leader")?, Some(0.0));
    assert!(testbed::http_get(standby.metrics_port, "/readyz")?.starts_with("HTTP/1.1 200"));

    leader.kill_hard()?;
    let killed = Instant::now();
    let second = names("after", 5);
    bed.create_nodes(&second, 5).await?;
    let cidrs = bed.wait_for_slices(&second, &[standby]).await?;
    println!(
        "fail-over: standby allocated {} new nodes {:?} after the leader was killed",
        second.len(),
        killed.elapsed()
    );
    let holder = bed
        .lease_holder()
        .await?
        .context("no lease holder after fail-over")?;
    assert!(standby.is(&holder), "holder {holder} is not the standby");
    assert_eq!(standby.metric("weft_controller_leader")?, Some(1.0));
    let slices: BTreeSet<Ipv4Net> = cidrs.values().map(v4_slice).collect::<Result<_>>()?;
    assert_eq!(
        slices.len(),
        first.len() + second.len(),
        "a slice was handed out twice"
    );
    bed.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catches_up_after_the_api_server_was_away() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    let relay = ApiRelay::start(bed.cluster.apiserver_address()).await?;
    let controller = bed.start_controller_through(
        &relay,
        "controller",
        &["--cluster-cidr=10.244.0.0/16", "--slice-hold-seconds=0"],
    )?;
    let first = names("node", 4);
    bed.create_nodes(&first, 4).await?;
    let before = bed.wait_for_slices(&first, &[&controller]).await?;
    let freed = v4_slice(&before["node-1"])?;

    relay.cut();
    // Leadership ends once the lease cannot be renewed; then it keeps retrying.
    for message in ["stopped leading", "cannot reach the API server"] {
        eventually(PATIENCE, &format!("the log to say {message:?}"), || async {
            Ok(controller.process.log().contains(message).then_some(()))
        })
        .await
        .with_context(|| logs(&[&controller]))?;
    }
    // Meanwhile the cluster changes behind its back.
    bed.delete_node("node-1").await?;
    let late = names("late", 3);
    bed.create_nodes(&late, 3).await?;

    relay.restore();
    let cidrs = bed.wait_for_slices(&late, &[&controller]).await?;
    let got: BTreeSet<Ipv4Net> = late
        .iter()
        .map(|n| v4_slice(&cidrs[n]))
        .collect::<Result<_>>()?;
    let mut want: BTreeSet<Ipv4Net> = ["10.244.4.0/24", "10.244.5.0/24"]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    want.insert(freed);
    assert_eq!(got, want, "the freed slice and the next lowest ones");
    assert_eq!(
        controller
            .process
            .log()
            .matches("leading: allocating")
            .count(),
        2
    );
    bed.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_conflicts_are_retried_without_handing_a_slice_out_twice() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    let nodes = names("node", 40);
    bed.create_nodes(&nodes, 8).await?;
    // Something else (a kubelet, say) keeps updating every node, so the
    // controller's resourceVersion-conditional writes keep meeting 409s.
    let churning = Arc::new(AtomicBool::new(true));
    let churn = tokio::spawn({
        let (api, nodes, churning) = (bed.nodes(), nodes.clone(), churning.clone());
        async move {
            let mut round = 0u64;
            while churning.load(Ordering::Relaxed) {
                round += 1;
                let label =
                    serde_json::json!({ "metadata": { "labels": { "churn": round.to_string() } } });
                let (params, patch) = (PatchParams::default(), Patch::Merge(&label));
                let patches = nodes.iter().map(|name| api.patch(name, &params, &patch));
                futures::future::join_all(patches).await;
            }
            round
        }
    });
    let controller = bed.start_controller("controller", &["--cluster-cidr=10.244.0.0/16"])?;
    let cidrs = bed.wait_for_slices(&nodes, &[&controller]).await;
    churning.store(false, Ordering::Relaxed);
    let rounds = churn.await?;
    let cidrs = cidrs?;

    let slices: BTreeSet<Ipv4Net> = nodes
        .iter()
        .map(|n| v4_slice(&cidrs[n]))
        .collect::<Result<_>>()?;
    assert_eq!(slices.len(), nodes.len(), "a slice was handed out twice");
    let conflicts = controller.metric("weft_controller_write_conflicts_total")?;
    println!("{rounds} rounds of updates; the controller met {conflicts:?} write conflicts");
    bed.stop().await
}
