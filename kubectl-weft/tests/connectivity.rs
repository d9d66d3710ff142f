//! `kubectl weft connectivity test` against a real kube-apiserver (the e2e
//! harness's control plane, no kubelets). The test stands in for the
//! controller-manager (the namespace's ServiceAccount) and the kubelet
//! (each pod's status: Running and Ready at the harness's outside
//! address), and the probes the pods would run are the built plugin's own
//! `probe serve`, in the outside namespace. So the plugin's objects pass
//! the API server's validation, its checks go through the real pod proxy
//! to real probes, and what no kube-proxy or agent serves here (Services,
//! hostPort, policy) fails the way a broken cluster would: named, traced,
//! exit 1.
//!
//! Also: a run without Weft's image exits 2 saying so; a SIGTERM mid-run
//! removes the run's namespace; a killed run's namespace goes at the next.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use weft_e2e::Cluster;
use weft_testing::{eventually, require_root};

use kubectl_weft::connectivity::objects::{Role, TEST_LABEL};

use common::{create_workloads, plugin, running_at, PATIENCE};

/// The one node, as a kubelet would have registered it.
const NODE: &str = "node-a";
/// A killed run's namespace.
const LEFTOVER: &str = "weft-connectivity-killed";

/// The plugin's `connectivity test` with `args`, started, its output piped.
fn start_run(kubeconfig: &std::path::Path, args: &[&str]) -> Result<std::process::Child> {
    Command::new(env!("CARGO_BIN_EXE_kubectl-weft"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["connectivity", "test"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kubectl-weft connectivity test")
}

/// The namespace a run made (labelled, not named like `LEFTOVER`, not
/// deleted yet).
async fn run_namespace(client: &Client) -> Result<String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let labelled = ListParams::default().labels(&format!("{TEST_LABEL}=true"));
    eventually(PATIENCE, "the run's namespace", || async {
        let list = namespaces.list(&labelled).await?;
        Ok(list.items.into_iter().find_map(|namespace| {
            let name = namespace.metadata.name?;
            (!name.starts_with(LEFTOVER) && namespace.metadata.deletion_timestamp.is_none())
                .then_some(name)
        }))
    })
    .await
}

/// Whether `name` is gone or going (no namespace controller runs here to
/// finish the deletion).
async fn deleted(client: &Client, name: &str) -> Result<bool> {
    let namespace = Api::<Namespace>::all(client.clone()).get_opt(name).await?;
    Ok(namespace.is_none_or(|n| n.metadata.deletion_timestamp.is_some()))
}

/// What the controller-manager and the kubelets would do for a run in
/// `namespace`: its default ServiceAccount, then each of its pods Running
/// and Ready at `ip`. Returns the pods as the plugin made them.
async fn stand_in_for_the_cluster(client: &Client, namespace: &str, ip: &str) -> Result<Vec<Pod>> {
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "default"}}))?,
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let made = eventually(PATIENCE, "the run's three pods", || async {
        let list = pods.list(&ListParams::default()).await?;
        Ok((list.items.len() == Role::ALL.len()).then_some(list.items))
    })
    .await?;
    let status = running_at(ip);
    for pod in &made {
        let name = pod
            .metadata
            .name
            .as_deref()
            .context("a pod without a name")?;
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    Ok(made)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_check_through_the_pod_proxy_name_failures_and_leave_nothing() -> Result<()> {
    require_root!("the e2e harness's control plane");
    let cluster = Cluster::start_control_plane_only().await?;
    let client = cluster.client().await?;
    let kubeconfig = cluster.kubeconfig();

    // Without Weft's DaemonSet there is no image to run: exit 2, saying so.
    let nowhere = plugin(kubeconfig, &["-n", "nowhere", "connectivity", "test"])?;
    let stderr = String::from_utf8_lossy(&nowhere.stderr);
    ensure!(
        nowhere.status.code() == Some(2) && stderr.contains("--image"),
        "without a DaemonSet: exit {:?}, {stderr}",
        nowhere.status.code()
    );

    create_workloads(&client).await?;
    let ip = cluster.outside().ip().to_string();
    let node: Node = serde_json::from_value(json!({"metadata": {"name": NODE}}))?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &node).await?;
    let node_status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "addresses": [{"type": "InternalIP", "address": ip}],
    }});
    nodes
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&node_status))
        .await?;
    let mut leftover: Namespace = serde_json::from_value(json!({"metadata": {
        "name": LEFTOVER,
        "labels": {TEST_LABEL: "true"},
    }}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &leftover)
        .await?;

    // A run stopped by SIGTERM while it waits for its pods removes its
    // namespace; it removed the killed run's first.
    let interrupted = start_run(kubeconfig, &[])?;
    let namespace = run_namespace(&client).await?;
    ensure!(
        deleted(&client, LEFTOVER).await?,
        "the leftover {LEFTOVER} stayed"
    );
    weft_testing::run(Command::new("kill").args(["-TERM", &interrupted.id().to_string()]))?;
    let output = tokio::task::spawn_blocking(move || interrupted.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(2) && stderr.contains("interrupted by SIGTERM"),
        "after SIGTERM: exit {:?}, {stderr}",
        output.status.code()
    );
    ensure!(
        deleted(&client, &namespace).await?,
        "{namespace} stayed after SIGTERM"
    );

    // The probes the pods stand for: one for the pods' ports, one for the
    // host pod's.
    for role in [Role::Client, Role::Host] {
        let mut probe = Command::new(env!("CARGO_BIN_EXE_kubectl-weft"));
        probe.args([
            "probe",
            "serve",
            "--port",
            &role.echo_port().to_string(),
            "--control",
            &role.control_port().to_string(),
        ]);
        cluster.spawn_outside(&format!("probe-{}", role.word()), probe)?;
    }

    // A killed run's namespace, again, for the full run to remove.
    leftover.metadata.name = Some(format!("{LEFTOVER}-2"));
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &leftover)
        .await?;
    let external = format!("{ip}:{}", Role::Client.echo_port());
    let run = start_run(
        kubeconfig,
        &[
            "-o",
            "json",
            "--check-timeout",
            "3s",
            "--external",
            &external,
        ],
    )?;
    let namespace = run_namespace(&client).await?;
    let pods = match stand_in_for_the_cluster(&client, &namespace, &ip).await {
        Ok(pods) => pods,
        Err(error) => {
            // The run's own words say why its pods did not come.
            let mut run = run;
            let _ = run.kill();
            let output = run.wait_with_output()?;
            return Err(error.context(String::from_utf8_lossy(&output.stderr).into_owned()));
        }
    };
    for pod in &pods {
        let container = &pod
            .spec
            .as_ref()
            .context("a pod without a spec")?
            .containers[0];
        ensure!(
            container.image.as_deref() == Some("localhost/weft:test"),
            "{:?} runs {:?}, not the agent DaemonSet's image",
            pod.metadata.name,
            container.image
        );
    }
    let output = tokio::task::spawn_blocking(move || run.wait_with_output()).await??;
    let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "no report (exit {:?}): {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let results: BTreeMap<String, Vec<&Value>> = report["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .fold(BTreeMap::new(), |mut by, row| {
            let key = format!(
                "{} {}",
                row["check"].as_str().unwrap_or(""),
                row["protocol"].as_str().unwrap_or("")
            );
            by.entry(key).or_default().push(row);
            by
        });
    for (check, rows) in &results {
        for row in rows {
            println!(
                "{check}: {} {} -> {} {}: {}",
                row["result"], row["from"], row["to"], row["address"], row["detail"]
            );
        }
    }
    let result = |check: &str| -> Vec<String> {
        results
            .get(check)
            .into_iter()
            .flatten()
            .map(|row| row["result"].as_str().unwrap_or("").to_string())
            .collect()
    };
    // The probes answer: pod to pod seen unrewritten, node and back, and
    // the outside address (the probe says what it saw: the node's).
    for check in [
        "pod-to-pod TCP",
        "pod-to-pod UDP",
        "pod-to-node TCP",
        "node-to-pod TCP",
        "pod-to-external TCP",
        "policy-allow TCP",
        "policy-removed TCP",
    ] {
        ensure!(result(check) == ["pass"], "{check}: {:?}", result(check));
    }
    let pod_to_pod = &results["pod-to-pod TCP"][0];
    ensure!(
        pod_to_pod["detail"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("seen as {ip}")),
        "pod to pod: {pod_to_pod}"
    );
    // Nothing serves the Service, the NodePort or the hostPort here, and
    // nothing enforces policy: failures, each traced.
    for check in [
        "pod-to-service TCP",
        "pod-to-nodeport TCP",
        "pod-to-hostport TCP",
        "policy-deny TCP",
    ] {
        ensure!(result(check) == ["fail"], "{check}: {:?}", result(check));
        let row = results[check][0];
        ensure!(
            row["traceSummary"].is_string(),
            "{check} failed without a trace: {row}"
        );
    }
    ensure!(
        result("pod-to-service-dns TCP") == ["skip"],
        "no kube-dns here"
    );
    ensure!(
        result("policy-allow-others-denied TCP") == ["skip"],
        "one node: no second client"
    );
    ensure!(
        output.status.code() == Some(1) && report["failed"] == 4,
        "exit {:?} with {} failed",
        output.status.code(),
        report["failed"]
    );
    ensure!(
        report["removedLeftovers"] == json!([format!("{LEFTOVER}-2")]),
        "removed {}",
        report["removedLeftovers"]
    );
    ensure!(
        deleted(&client, &namespace).await?,
        "{namespace} stayed after the run"
    );
    println!(
        "connectivity test: {} checks in {:.1} s, pods ready after {:.1} s",
        report["rows"].as_array().map_or(0, Vec::len),
        report["seconds"].as_f64().unwrap_or(0.0),
        report["setupSeconds"].as_f64().unwrap_or(0.0)
    );
    cluster.stop().await
}
