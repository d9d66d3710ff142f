//! `weft-controller`'s `/status` against a real kube-apiserver: the leader
//! reports its slices and the nodes it leaves alone, a standby the leader
//! it sees.
//!
//! Needs root (the harness creates network namespaces) and the harness's
//! control-plane binaries (built on first use). Run with
//! `cargo test -p weft-controller --test status`.

mod testbed;

use anyhow::{Context, Result};
use testbed::{logs, Replica, Testbed, PATIENCE};
use weft_core::status::{ControllerStatus, FamilyUsage};
use weft_testing::{eventually, require_root};

const CLUSTER: &str = "--cluster-cidr=10.244.0.0/16";

/// Waits until `replica`'s `/status` satisfies `done`, and returns it.
async fn wait_for_status(
    replica: &Replica,
    what: &str,
    done: impl Fn(&ControllerStatus) -> bool,
) -> Result<ControllerStatus> {
    eventually(PATIENCE, what, || async {
        let status = replica.status()?;
        Ok(done(&status).then_some(status))
    })
    .await
    .with_context(|| logs(&[replica]))
}

fn usage(status: &ControllerStatus) -> Option<(u64, u64)> {
    match status.families.as_slice() {
        [FamilyUsage { used, free, .. }] => Some((*used, *free)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_reports_slices_and_untouched_nodes_and_a_standby_the_leader() -> Result<()> {
    require_root!("the e2e harness");
    let bed = Testbed::start().await?;
    let leader = bed.start_controller("controller-leader", &[CLUSTER])?;
    let plain: Vec<String> = (0..3).map(|i| format!("node-{i}")).collect();
    bed.create_nodes(&plain, 3).await?;
    bed.wait_for_slices(&plain, &[&leader]).await?;
    // The kubelet uses spec.podCIDR, the agent would route the annotation:
    // the controller keeps both slices from other nodes and writes nothing.
    bed.create_node(
        "disputed",
        &["10.244.100.0/24"],
        &[("weft.dev/pod-cidr", "10.244.101.0/24")],
    )
    .await?;

    let status = wait_for_status(&leader, "the disputed node on /status", |status| {
        status
            .untouched
            .iter()
            .any(|entry| entry.node == "disputed")
    })
    .await?;
    println!(
        "GET /status on the leader:\n{}",
        serde_json::to_string_pretty(&status)?
    );
    assert!(status.leading);
    assert!(leader.is(&status.identity), "identity {}", status.identity);
    assert_eq!(status.leader.as_ref(), Some(&status.identity));
    assert_eq!(bed.lease_holder().await?, status.leader);
    assert_eq!(status.build.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.families[0].cluster_cidr, "10.244.0.0/16");
    // Three fresh slices and the disputed node's spec slice are used; its
    // annotation's slice is kept from everyone, so it is not free either.
    assert_eq!(usage(&status), Some((4, 256 - 4 - 1)));
    assert_eq!(status.untouched.len(), 1, "{:?}", status.untouched);
    let reason = &status.untouched[0].reason;
    for part in [
        "AnnotationDisagreesWithSpec: ",
        "10.244.101.0/24",
        "10.244.100.0/24",
        "kubectl annotate node disputed weft.dev/pod-cidr-",
    ] {
        assert!(reason.contains(part), "{part} missing from {reason}");
    }
    let refused = testbed::http_get(leader.metrics_port, "/status?check=kernel")?;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");

    let standby = bed.start_controller("controller-standby", &[CLUSTER])?;
    let seen = wait_for_status(&standby, "the standby to see the leader", |status| {
        status.leader.is_some()
    })
    .await?;
    println!(
        "GET /status on the standby:\n{}",
        serde_json::to_string_pretty(&seen)?
    );
    assert!(!seen.leading);
    assert_eq!(seen.leader, status.leader);
    assert!(seen.families.is_empty() && seen.untouched.is_empty());

    // Deleting the disputed node takes its entry away and lifts the block on
    // its annotation's slice; its spec slice stays held for its name for
    // the default hold time (a re-registration gets it back), so not free.
    bed.delete_node("disputed").await?;
    wait_for_status(&leader, "the disputed node to leave /status", |status| {
        status.untouched.is_empty() && usage(status) == Some((3, 256 - 3 - 1))
    })
    .await?;
    bed.stop().await
}
