//! `kubectl weft status` against a real kube-apiserver (the e2e harness's
//! control plane, no kubelets): Node objects the test creates, and Weft's
//! daemons stood in for by pods whose status the test sets and whose
//! `/status` a small HTTP server in the harness's outside namespace serves,
//! so the plugin's reads go through the API server's real pod proxy.
//!
//! The kubelet-cluster checks (a healthy install exits 0, injected faults)
//! call [`kubectl_weft::status`] the same way.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Node, NodeSpec, Pod, PodSpec, PodTemplateSpec, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::{json, Value};
use weft_core::annotations::{POD_CIDR, PUBLIC_IP};
use weft_e2e::Cluster;
use weft_testing::{eventually, require_root};

use kubectl_weft::report::{Report, WarningKind};
use kubectl_weft::StatusOptions;

const NAMESPACE: &str = "kube-system";
/// Bound for the fake daemons' servers to come up; a deadline, not a measure.
const PATIENCE: Duration = Duration::from_secs(60);

fn node(name: &str, slice: Option<&str>, spec_pod_cidr: Option<&str>) -> Node {
    let mut annotations = BTreeMap::new();
    if let Some(slice) = slice {
        annotations.insert(POD_CIDR.to_string(), slice.to_string());
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: spec_pod_cidr.map(|cidr| NodeSpec {
            pod_cidr: Some(cidr.to_string()),
            pod_cidrs: Some(vec![cidr.to_string()]),
            ..NodeSpec::default()
        }),
        ..Node::default()
    }
}

async fn create_nodes(client: &Client, nodes: Vec<Node>) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    stream::iter(nodes)
        .map(|node| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &node).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .context("creating Nodes")?;
    Ok(())
}

/// Runs the built plugin against the cluster.
fn plugin(kubeconfig: &Path, args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_kubectl-weft"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .context("running kubectl-weft")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The nodes of the warning of `kind` in a `-o json` report.
fn warned(json: &Value, kind: &str) -> Vec<String> {
    json["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["kind"] == kind)
        .flat_map(|w| w["nodes"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_without_agents_are_each_warned_and_status_exits_non_zero() -> Result<()> {
    require_root!("the e2e harness's control plane");
    let cluster = Cluster::start_control_plane_only().await?;
    let client = cluster.client().await?;
    create_nodes(
        &client,
        vec![
            node("node-a", Some("10.244.1.0/24"), None),
            node("node-b", Some("10.244.2.0/24"), Some("10.244.2.0/24")),
            node("node-bare", None, None),
            // kube-controller-manager allocated this one differently.
            node("node-kcm", Some("10.244.3.0/24"), Some("10.244.9.0/24")),
        ],
    )
    .await?;
    let kubeconfig = cluster.kubeconfig();

    let table = plugin(kubeconfig, &["status"])?;
    println!("$ kubectl weft status\n{}", stdout(&table));
    ensure!(
        table.status.code() == Some(1),
        "status exited {:?}: {}",
        table.status,
        String::from_utf8_lossy(&table.stderr)
    );
    let text = stdout(&table);
    ensure!(
        text.contains("- nodes node-a, node-b, node-bare, node-kcm: no agent pod"),
        "{text}"
    );
    ensure!(text.contains("- node node-bare: no slice"), "{text}");

    let json = plugin(kubeconfig, &["status", "-o", "json"])?;
    ensure!(
        json.status.code() == Some(1),
        "-o json exited {:?}",
        json.status
    );
    let report: Value = serde_json::from_slice(&json.stdout).context("-o json output")?;
    ensure!(report["healthy"] == false, "{report}");
    ensure!(
        warned(&report, "no-agent") == ["node-a", "node-b", "node-bare", "node-kcm"],
        "{report:#}"
    );
    ensure!(warned(&report, "no-slice") == ["node-bare"], "{report:#}");
    ensure!(
        warned(&report, "pod-cidr-conflict") == ["node-kcm"],
        "{report:#}"
    );
    for kind in ["no-controller", "write-policy-missing"] {
        ensure!(
            report["warnings"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["kind"] == kind)),
            "no {kind} warning: {report:#}"
        );
    }

    // The library answers the same.
    let direct = kubectl_weft::status(&client, &StatusOptions::default()).await?;
    ensure!(
        serde_json::to_value(&direct)?["warnings"] == report["warnings"],
        "status() and the binary disagree"
    );

    // --wait gives up after its limit with the last report.
    let waited = plugin(kubeconfig, &["status", "--wait=2s", "-o", "json"])?;
    ensure!(
        waited.status.code() == Some(1),
        "--wait exited {:?}",
        waited.status
    );

    // Usage and connection errors are 2, not "unhealthy".
    let usage = plugin(kubeconfig, &["status", "-o", "yaml"])?;
    ensure!(
        usage.status.code() == Some(2),
        "a bad -o exited {:?}",
        usage.status
    );
    let missing = plugin(Path::new("/nonexistent/kubeconfig"), &["status"])?;
    ensure!(
        missing.status.code() == Some(2)
            && String::from_utf8_lossy(&missing.stderr).contains("--kubeconfig"),
        "a missing kubeconfig exited {:?}: {}",
        missing.status,
        String::from_utf8_lossy(&missing.stderr)
    );
    let context = plugin(kubeconfig, &["status", "--context", "no-such-context"])?;
    ensure!(
        context.status.code() == Some(2),
        "an unknown context exited {:?}",
        context.status
    );
    cluster.stop().await
}

/// Labels of a component's pods, as the chart sets them.
fn labels(component: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "weft"),
        ("app.kubernetes.io/component", component),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn pod_template(component: &str) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(component)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: component.to_string(),
                image: Some("localhost/weft:test".to_string()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
    }
}

/// The DaemonSet, Deployment and node write policy, as objects only: no
/// controller-manager runs to act on them.
async fn create_workloads(client: &Client) -> Result<()> {
    let selector = |component: &str| LabelSelector {
        match_labels: Some(labels(component)),
        ..LabelSelector::default()
    };
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_string()),
        ..ObjectMeta::default()
    };
    let post = PostParams::default();
    // Pods need their namespace's default ServiceAccount, which no
    // controller-manager creates here.
    Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .create(
            &post,
            &ServiceAccount {
                metadata: meta("default"),
                ..ServiceAccount::default()
            },
        )
        .await?;
    Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE)
        .create(
            &post,
            &DaemonSet {
                metadata: meta("weft-agent"),
                spec: Some(DaemonSetSpec {
                    selector: selector("agent"),
                    template: pod_template("agent"),
                    ..DaemonSetSpec::default()
                }),
                ..DaemonSet::default()
            },
        )
        .await?;
    Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .create(
            &post,
            &Deployment {
                metadata: meta("weft-controller"),
                spec: Some(DeploymentSpec {
                    selector: selector("controller"),
                    template: pod_template("controller"),
                    ..DeploymentSpec::default()
                }),
                ..Deployment::default()
            },
        )
        .await?;
    // The node write policy and the operator's role as the plain manifests
    // ship them.
    let manifests =
        std::fs::read_to_string(weft_testing::repository().join("manifests/weft.yaml"))?;
    for document in serde_yaml::Deserializer::from_str(&manifests) {
        let object = serde_yaml::Value::deserialize(document)?;
        match object["kind"].as_str() {
            Some("ValidatingAdmissionPolicy") => {
                let policy: ValidatingAdmissionPolicy = serde_yaml::from_value(object)?;
                Api::<ValidatingAdmissionPolicy>::all(client.clone())
                    .create(&post, &policy)
                    .await?;
            }
            Some("ClusterRole") if object["metadata"]["name"] == "weft-operator" => {
                let role: ClusterRole = serde_yaml::from_value(object)?;
                Api::<ClusterRole>::all(client.clone())
                    .create(&post, &role)
                    .await?;
            }
            Some("ValidatingAdmissionPolicyBinding") => {
                let binding: ValidatingAdmissionPolicyBinding = serde_yaml::from_value(object)?;
                Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
                    .create(&post, &binding)
                    .await?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// A Weft daemon's pod on `node`, marked Running and Ready at `ip`, as a
/// kubelet would report it; its `/status` is served from `document` by a
/// server in the outside namespace on `port`, or by nothing when `None`.
async fn fake_daemon(
    cluster: &Cluster,
    client: &Client,
    component: &str,
    pod_name: &str,
    node: &str,
    port: u16,
    document: Option<Value>,
) -> Result<()> {
    let ip = cluster.outside().ip().to_string();
    let mut spec = pod_template(component).spec.unwrap_or_default();
    spec.node_name = Some(node.to_string());
    spec.containers[0].ports = Some(vec![ContainerPort {
        name: Some("metrics".to_string()),
        container_port: i32::from(port),
        ..ContainerPort::default()
    }]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.create(
        &PostParams::default(),
        &Pod {
            metadata: ObjectMeta {
                name: Some(pod_name.to_string()),
                labels: Some(labels(component)),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            ..Pod::default()
        },
    )
    .await?;
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(pod_name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    if let Some(document) = document {
        let dir = cluster.run_dir().join(pod_name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("status"), serde_json::to_vec(&document)?)?;
        // Serves /status (and /status?check=kernel: the query is ignored).
        let mut server = Command::new("/usr/bin/python3");
        server
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                &ip,
                "--directory",
            ])
            .arg(&dir);
        cluster.spawn_outside(pod_name, server)?;
    }
    Ok(())
}

fn agent_document(node: &str, accepted: &[&str]) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    json!({
        "build": {"version": "0.1.0", "commit": "test"},
        "node": node,
        "backend": "vxlan",
        "mtu": 1450,
        "readiness": {"ready": true},
        "peers": {"accepted": accepted},
        "lastReconcile": {"at": now, "durationMs": 2, "result": "ok"},
        "policy": {"enabled": true, "lastSync": {"at": now, "result": "ok"}},
        "ipam": {"allocated": 3},
        "kernel": {}
    })
}

/// Three nodes with agents (one healthy, one with drift and a rejected
/// peer, and node-c's, whose `/status` nothing serves when `dead_agent`), a
/// hostile Node, `extra_nodes` more Nodes, a leading controller.
async fn fake_cluster(extra_nodes: usize, dead_agent: bool) -> Result<Cluster> {
    let cluster = Cluster::start_control_plane_only().await?;
    let client = cluster.client().await?;
    create_workloads(&client).await?;
    let mut nodes = vec![
        node("node-a", Some("10.244.1.0/24"), None),
        node("node-b", Some("10.244.2.0/24"), None),
        node("node-c", Some("10.244.3.0/24"), None),
        node("node-evil", Some("10.244.1.0/24"), None),
    ];
    nodes[3]
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(PUBLIC_IP.to_string(), "192.168.1.2".to_string());
    nodes.extend((0..extra_nodes).map(|i| {
        let slice = format!("10.{}.{}.0/24", 100 + i / 256, i % 256);
        node(&format!("idle-{i:05}"), Some(&slice), None)
    }));
    create_nodes(&client, nodes).await?;

    let a = agent_document("node-a", &["node-b", "node-c"]);
    let mut b = agent_document("node-b", &["node-a", "node-c"]);
    b["peers"]["rejected"] = json!([{
        "node": "node-evil",
        "field": "weft.dev/pod-cidr",
        "reason": "slice 10.244.1.0/24 overlaps node node-a's"
    }]);
    b["kernel"]["missing"] = json!(["route 10.244.3.0/24 via 10.244.3.0 dev weft.1 onlink"]);
    let controller = json!({
        "build": {"version": "0.1.0", "commit": "test"},
        "identity": "weft-controller-0",
        "leading": true,
        "leader": "weft-controller-0",
        "families": [{"clusterCidr": "10.244.0.0/16", "used": 4, "free": 252}]
    });
    fake_daemon(
        &cluster,
        &client,
        "agent",
        "weft-agent-a",
        "node-a",
        19465,
        Some(a),
    )
    .await?;
    fake_daemon(
        &cluster,
        &client,
        "agent",
        "weft-agent-b",
        "node-b",
        19466,
        Some(b),
    )
    .await?;
    fake_daemon(
        &cluster,
        &client,
        "agent",
        "weft-agent-c",
        "node-c",
        19467,
        (!dead_agent).then(|| agent_document("node-c", &["node-a", "node-b"])),
    )
    .await?;
    fake_daemon(
        &cluster,
        &client,
        "controller",
        "weft-controller-0",
        "node-a",
        19464,
        Some(controller),
    )
    .await?;
    Ok(cluster)
}

/// A report once `agents` fake agents and the controller answer.
async fn settled_report(client: &Client, agents: usize) -> Result<Report> {
    eventually(PATIENCE, "the fake daemons' /status to answer", || async {
        let report = kubectl_weft::status(client, &StatusOptions::default()).await?;
        let answered = report
            .nodes
            .iter()
            .filter(|n| n.agent.version.is_some())
            .count();
        Ok((answered == agents && report.controller.leader.is_some()).then_some(report))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_are_read_through_the_pod_proxy_and_a_dead_one_is_named() -> Result<()> {
    require_root!("the e2e harness's control plane and outside namespace");
    let cluster = fake_cluster(0, true).await?;
    let client = cluster.client().await?;
    let report = settled_report(&client, 2).await?;
    println!("{}", report.table());

    let mut kinds: Vec<(WarningKind, Vec<String>)> = report
        .warnings
        .iter()
        .map(|w| (w.kind, w.nodes.clone()))
        .collect();
    kinds.sort();
    let node = |n: &str| vec![n.to_string()];
    ensure!(
        kinds
            == [
                (WarningKind::NoAgent, node("node-evil")),
                (WarningKind::AgentUnreachable, node("node-c")),
                (WarningKind::PeerRejected, node("node-evil")),
                (WarningKind::KernelDrift, node("node-b")),
            ],
        "{:#?}",
        report.warnings
    );
    let a = &report.nodes[0];
    ensure!(
        a.name == "node-a"
            && a.agent.ready
            && a.peers.is_some_and(|p| p.accepted == 2 && p.expected == 3),
        "{a:?}"
    );
    ensure!(
        report.controller.leader.as_deref() == Some("weft-controller-0"),
        "{:?}",
        report.controller
    );

    // The chart's weft-operator ClusterRole is all the plugin needs: bound
    // to an account, the account sees what an admin sees.
    let operator = cluster
        .service_account_kubeconfig(NAMESPACE, "operator")
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some("weft-operator-test".to_string()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_string(),
                    kind: "ClusterRole".to_string(),
                    name: "weft-operator".to_string(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_string(),
                    name: "operator".to_string(),
                    namespace: Some(NAMESPACE.to_string()),
                    ..Subject::default()
                }]),
            },
        )
        .await?;
    let as_operator = plugin(&operator, &["status", "-o", "json"])?;
    let seen: Value = serde_json::from_slice(&as_operator.stdout).with_context(|| {
        format!(
            "status as the operator: {}",
            String::from_utf8_lossy(&as_operator.stderr)
        )
    })?;
    ensure!(
        as_operator.status.code() == Some(1)
            && seen["warnings"] == serde_json::to_value(&report)?["warnings"],
        "the operator sees otherwise: {seen:#}"
    );
    // Without the role the plugin cannot look, and says what to grant.
    let stranger = cluster
        .service_account_kubeconfig(NAMESPACE, "stranger")
        .await?;
    let refused = plugin(&stranger, &["status"])?;
    let error = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        refused.status.code() == Some(2) && error.contains("weft-operator"),
        "without the role: exit {:?}, {error}",
        refused.status
    );
    cluster.stop().await
}

/// The cost figure of issue 23: 5,000 Nodes, 3 agents. Prints the time of
/// `status` in this test binary and of the plugin binary (`KUBECTL_WEFT`, to
/// time the shipped one from `packaging/build-static.sh kubectl-weft kubectl-weft`; default: this
/// build's); asserts nothing about it. Slow to set up (thousands of Node
/// creations): `cargo test -p kubectl-weft --test status -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "creates 5,000 Nodes; run for the cost figure"]
async fn five_thousand_nodes_and_three_agents() -> Result<()> {
    require_root!("the e2e harness's control plane and outside namespace");
    let cluster = fake_cluster(4996, false).await?;
    let client = cluster.client().await?;
    settled_report(&client, 3).await?;
    for _ in 0..3 {
        let started = Instant::now();
        let report = kubectl_weft::status(&client, &StatusOptions::default()).await?;
        eprintln!(
            "status of {} nodes: {:?} ({} warnings)",
            report.nodes.len(),
            started.elapsed(),
            report.warnings.len()
        );
    }
    let binary = std::env::var_os("KUBECTL_WEFT")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_kubectl-weft").into());
    for _ in 0..3 {
        let started = Instant::now();
        let output = Command::new(&binary)
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig())
            .arg("status")
            .output()?;
        eprintln!(
            "{} status (table of {} lines): {:?}",
            Path::new(&binary).display(),
            stdout(&output).lines().count(),
            started.elapsed()
        );
    }
    cluster.stop().await
}
