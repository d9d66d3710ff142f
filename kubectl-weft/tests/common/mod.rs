//! What the plugin's tests against a real kube-apiserver share: Nodes,
//! Weft's workloads as objects only, and Weft's daemons stood in for by
//! pods whose status the test sets and whose `/status` a small HTTP server
//! in the harness's outside namespace serves, so the plugin's reads go
//! through the API server's real pod proxy.
//!
//! Each test binary uses a part of this module; what one leaves unused is
//! not dead in the other.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Node, NodeSpec, Pod, PodSpec, PodTemplateSpec, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::{json, Value};
use weft_core::annotations::{POD_CIDR, PUBLIC_IP};
use weft_e2e::Cluster;

/// The namespace Weft is installed in (the plugin's default).
pub const NAMESPACE: &str = "kube-system";
/// Bound for the fake daemons' servers to come up; a deadline, not a measure.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A Node with its Weft slice annotation and `spec.podCIDR`, when given.
pub fn node(name: &str, slice: Option<&str>, spec_pod_cidr: Option<&str>) -> Node {
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

/// Creates `nodes`, a few dozen at a time.
pub async fn create_nodes(client: &Client, nodes: Vec<Node>) -> Result<()> {
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
pub fn plugin(kubeconfig: &Path, args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_kubectl-weft"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .context("running kubectl-weft")
}

/// The plugin's standard output as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Labels of a component's pods, as the chart sets them.
pub fn labels(component: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "weft"),
        ("app.kubernetes.io/component", component),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The pod template of a component's workload, as the chart labels it.
pub fn pod_template(component: &str) -> PodTemplateSpec {
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
pub async fn create_workloads(client: &Client) -> Result<()> {
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
pub async fn fake_daemon(
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
    pods.patch_status(
        pod_name,
        &PatchParams::default(),
        &Patch::Merge(&running_at(&ip)),
    )
    .await?;
    if let Some(document) = document {
        let dir = serve_document(cluster, pod_name, &document)?;
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

/// Writes the `/status` document the fake daemon `pod_name` serves (from
/// the next request on) and returns the directory it is served from.
pub fn serve_document(cluster: &Cluster, pod_name: &str, document: &Value) -> Result<PathBuf> {
    let dir = cluster.run_dir().join(pod_name);
    std::fs::create_dir_all(&dir)?;
    // Written aside and renamed, so a request never reads half a document.
    let partial = dir.join("status.partial");
    std::fs::write(&partial, serde_json::to_vec(document)?)?;
    std::fs::rename(&partial, dir.join("status"))?;
    Ok(dir)
}

/// A healthy agent's `/status` on `node` that accepted the `accepted` peers.
pub fn agent_document(node: &str, accepted: &[&str]) -> Value {
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
pub async fn fake_cluster(extra_nodes: usize, dead_agent: bool) -> Result<Cluster> {
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
pub async fn settled_report(client: &Client, agents: usize) -> Result<kubectl_weft::Report> {
    weft_testing::eventually(PATIENCE, "the fake daemons' /status to answer", || async {
        let report = kubectl_weft::status(client, &kubectl_weft::StatusOptions::default()).await?;
        let answered = report
            .nodes
            .iter()
            .filter(|n| n.agent.version.is_some())
            .count();
        Ok((answered == agents && report.controller.leader.is_some()).then_some(report))
    })
    .await
}

/// A kubeconfig of the service account `account` in [`NAMESPACE`], bound
/// to the chart's `weft-operator` ClusterRole (which [`create_workloads`]
/// creates): what an operator running `kubectl weft` has.
pub async fn operator_kubeconfig(
    cluster: &Cluster,
    client: &Client,
    account: &str,
) -> Result<PathBuf> {
    use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
    let kubeconfig = cluster
        .service_account_kubeconfig(NAMESPACE, account)
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(format!("weft-operator-{account}")),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_string(),
                    kind: "ClusterRole".to_string(),
                    name: "weft-operator".to_string(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_string(),
                    name: account.to_string(),
                    namespace: Some(NAMESPACE.to_string()),
                    ..Subject::default()
                }]),
            },
        )
        .await?;
    Ok(kubeconfig)
}

/// The status a kubelet reports for a pod Running and Ready at `ip`: the
/// tests stand in for the kubelet, which this control plane lacks.
pub fn running_at(ip: &str) -> serde_json::Value {
    json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }})
}
