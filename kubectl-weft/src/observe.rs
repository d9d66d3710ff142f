//! Reading the cluster: the Nodes, Weft's workloads and their Pods from the
//! API, and each daemon's `/status` through the API server's pod proxy, so
//! the plugin needs no network path to the nodes. Everything read lands in
//! one [`Observation`], which [`mod@crate::assess`] judges without I/O.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use futures::{stream, StreamExt};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use weft_core::status::{AgentStatus, ControllerStatus};

use crate::error::{Error, Result};

/// The agent's DaemonSet, as the chart names it.
pub const AGENT_DAEMON_SET: &str = "weft-agent";
/// The controller's Deployment, as the chart names it.
pub const CONTROLLER_DEPLOYMENT: &str = "weft-controller";
/// The ValidatingAdmissionPolicy (and its binding) that limits what each
/// component may write on a Node (charts/weft/templates/node-write-policy.yaml).
pub const WRITE_POLICY: &str = "weft-node-writers";
/// The namespace the plain manifests install into.
pub const DEFAULT_NAMESPACE: &str = "kube-system";
/// The container port both daemons serve `/status` on.
const METRICS_PORT_NAME: &str = "metrics";

/// How to read the cluster.
#[derive(Debug, Clone)]
pub struct StatusOptions {
    /// The namespace Weft is installed in.
    pub namespace: String,
    /// Limit on each daemon's `/status` answer (and on each API read), so
    /// one dead node does not stall the report.
    pub request_timeout: Duration,
    /// How many `/status` requests run at once.
    pub concurrency: usize,
}

impl Default for StatusOptions {
    fn default() -> Self {
        StatusOptions {
            namespace: DEFAULT_NAMESPACE.to_string(),
            request_timeout: Duration::from_secs(5),
            concurrency: 16,
        }
    }
}

/// Whether an object exists, as far as the plugin could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// It exists.
    Present,
    /// The API server says it does not.
    Absent,
    /// It could not be read (forbidden, or the API server lacks the kind).
    Unknown(String),
}

/// The node write policy's two objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePolicy {
    /// The ValidatingAdmissionPolicy.
    pub policy: Presence,
    /// Its ValidatingAdmissionPolicyBinding.
    pub binding: Presence,
}

/// What one agent's `/status?check=kernel` gave.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentReading {
    /// The document, or why there is none (the proxy's or the agent's error).
    pub status: Result<AgentStatus, String>,
    /// Why the agent refused the kernel check, when it answered plain
    /// `/status` only.
    pub kernel_refused: Option<String>,
}

/// Everything `status` judges, read at one moment.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The namespace Weft is installed in (for the fixes the report names).
    pub namespace: String,
    /// When it was read, for ages.
    pub now: Timestamp,
    /// Every Node.
    pub nodes: Vec<Node>,
    /// Whether the agent DaemonSet exists.
    pub agent_daemon_set: Presence,
    /// The agent's Pods.
    pub agent_pods: Vec<Pod>,
    /// The agents' readings, by pod name (only running pods are asked).
    pub agents: HashMap<String, AgentReading>,
    /// Whether the controller Deployment exists.
    pub controller_deployment: Presence,
    /// The controller's Pods.
    pub controller_pods: Vec<Pod>,
    /// The controllers' `/status`, by pod name (only running pods are asked).
    pub controllers: HashMap<String, Result<ControllerStatus, String>>,
    /// The node write policy.
    pub write_policy: WritePolicy,
}

/// Reads the cluster: the API objects first (concurrently), then every
/// running daemon's `/status`, at most `options.concurrency` at a time and
/// each within `options.request_timeout`.
pub async fn observe(client: &Client, options: &StatusOptions) -> Result<Observation> {
    let namespace = options.namespace.as_str();
    let limit = options.request_timeout;
    let nodes: Api<Node> = Api::all(client.clone());
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());

    // A Node list of thousands takes longer than one status: no short limit.
    let all = ListParams::default();
    let (nodes, daemon_set, deployment, policy, binding) = tokio::join!(
        nodes.list(&all),
        within(
            limit,
            "get the agent DaemonSet",
            daemon_sets.get_opt(AGENT_DAEMON_SET)
        ),
        within(
            limit,
            "get the controller Deployment",
            deployments.get_opt(CONTROLLER_DEPLOYMENT)
        ),
        within(
            limit,
            "get the node write policy",
            policies.get_opt(WRITE_POLICY)
        ),
        within(
            limit,
            "get the node write policy binding",
            bindings.get_opt(WRITE_POLICY)
        ),
    );
    let nodes = nodes
        .map_err(|source| Error::Read {
            what: "list nodes".into(),
            source,
        })?
        .items;
    let daemon_set = daemon_set?;
    let deployment = deployment?;

    let agent_selector = selector(
        daemon_set
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .map(|s| &s.selector),
        "agent",
    );
    let controller_selector = selector(
        deployment
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .map(|s| &s.selector),
        "controller",
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let agent_list = ListParams::default().labels(&agent_selector);
    let controller_list = ListParams::default().labels(&controller_selector);
    let (agent_pods, controller_pods) = tokio::join!(
        within(limit, "list the agent pods", pods.list(&agent_list)),
        within(
            limit,
            "list the controller pods",
            pods.list(&controller_list)
        ),
    );
    let agent_pods = agent_pods?.items;
    let controller_pods = controller_pods?.items;

    let (agents, controllers) = tokio::join!(
        read_agents(client, namespace, &agent_pods, options),
        read_controllers(client, namespace, &controller_pods, options),
    );
    Ok(Observation {
        namespace: namespace.to_string(),
        now: Timestamp::now(),
        nodes,
        agent_daemon_set: presence_of(&daemon_set),
        agent_pods,
        agents,
        controller_deployment: presence_of(&deployment),
        controller_pods,
        controllers,
        write_policy: WritePolicy {
            policy: presence(policy),
            binding: presence(binding),
        },
    })
}

/// Runs one API read within `limit`, naming it in the error.
pub(crate) async fn within<T>(
    limit: Duration,
    what: &str,
    read: impl Future<Output = kube::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(Error::Read {
            what: what.to_string(),
            source,
        }),
        Err(_) => Err(Error::Timeout {
            what: what.to_string(),
            seconds: limit.as_secs(),
        }),
    }
}

fn presence_of<T>(object: &Option<T>) -> Presence {
    match object {
        Some(_) => Presence::Present,
        None => Presence::Absent,
    }
}

/// A read that may fail without stopping the report: a cluster without
/// ValidatingAdmissionPolicy, or an operator not allowed to read it, still
/// gets the rest.
fn presence<T>(read: Result<Option<T>>) -> Presence {
    match read {
        Ok(object) => presence_of(&object),
        Err(error) => Presence::Unknown(error.to_string()),
    }
}

/// The label selector of a workload's pods: its own `matchLabels`, or the
/// chart's labels when the workload is missing (its pods may outlive it).
pub(crate) fn selector(selector: Option<&LabelSelector>, component: &str) -> String {
    let chart: BTreeMap<String, String> = [
        ("app.kubernetes.io/name", "weft"),
        ("app.kubernetes.io/component", component),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let labels = selector
        .and_then(|s| s.match_labels.clone())
        .filter(|labels| !labels.is_empty())
        .unwrap_or(chart);
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a pod is worth asking: running, with an address to proxy to.
pub(crate) fn askable(pod: &Pod) -> Option<(String, u16)> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") || status.pod_ip.is_none() {
        return None;
    }
    let name = pod.metadata.name.clone()?;
    Some((name, metrics_port(pod)?))
}

/// The port named `metrics` in the pod spec (both daemons serve `/status`
/// there), or the first port the pod declares.
pub fn metrics_port(pod: &Pod) -> Option<u16> {
    let ports: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .flat_map(|container| container.ports.iter().flatten())
        .collect();
    ports
        .iter()
        .find(|port| port.name.as_deref() == Some(METRICS_PORT_NAME))
        .or_else(|| ports.first())
        .and_then(|port| u16::try_from(port.container_port).ok())
}

async fn read_agents(
    client: &Client,
    namespace: &str,
    pods: &[Pod],
    options: &StatusOptions,
) -> HashMap<String, AgentReading> {
    stream::iter(pods.iter().filter_map(askable))
        .map(|(pod, port)| async move {
            let limit = options.request_timeout;
            let reading = read_agent(client, namespace, &pod, port, "?check=kernel", limit).await;
            (pod, reading)
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await
}

/// Asks one agent for `/status{query}` (e.g. `?check=kernel`); an agent
/// that refuses the check (HTTP 400, e.g. before its first reconcile) is
/// asked for plain `/status`, so the rest of its document still shows.
pub(crate) async fn read_agent(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    query: &str,
    limit: Duration,
) -> AgentReading {
    match proxy_get(client, namespace, pod, port, query, limit).await {
        Err(ProxyError::Refused(refusal)) => AgentReading {
            status: proxy_get(client, namespace, pod, port, "", limit)
                .await
                .map_err(|e| e.to_string()),
            kernel_refused: Some(refusal),
        },
        status => AgentReading {
            status: status.map_err(|e| e.to_string()),
            kernel_refused: None,
        },
    }
}

async fn read_controllers(
    client: &Client,
    namespace: &str,
    pods: &[Pod],
    options: &StatusOptions,
) -> HashMap<String, Result<ControllerStatus, String>> {
    stream::iter(pods.iter().filter_map(askable))
        .map(|(pod, port)| async move {
            let status = proxy_get(client, namespace, &pod, port, "", options.request_timeout)
                .await
                .map_err(|e| e.to_string());
            (pod, status)
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await
}

/// Why a `/status` read through the pod proxy failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The daemon answered 400: it refused the query.
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// `GET /status{query}` of `pod`'s `port` through the API server's pod proxy.
pub(crate) async fn proxy_get<T: DeserializeOwned>(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    query: &str,
    limit: Duration,
) -> Result<T, ProxyError> {
    let uri = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/status{query}");
    let request = http::Request::get(&uri)
        .body(Vec::new())
        .map_err(|e| ProxyError::Failed(format!("building GET {uri}: {e}")))?;
    let text = match tokio::time::timeout(limit, client.request_text(request)).await {
        Err(_) => {
            return Err(ProxyError::Failed(format!(
                "no answer within {} s",
                limit.as_secs_f64()
            )))
        }
        Ok(Err(kube::Error::Api(status))) if status.code == 400 => {
            return Err(ProxyError::Refused(status.message.trim().to_string()))
        }
        Ok(Err(kube::Error::Api(status))) => {
            return Err(ProxyError::Failed(format!(
                "HTTP {}: {}",
                status.code,
                status.message.trim()
            )))
        }
        Ok(Err(error)) => return Err(ProxyError::Failed(error.to_string())),
        Ok(Ok(text)) => text,
    };
    serde_json::from_str(&text)
        .map_err(|e| ProxyError::Failed(format!("its /status is not a Weft status document: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};

    fn pod_with_ports(ports: &[(Option<&str>, i32)]) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "agent".into(),
                    ports: Some(
                        ports
                            .iter()
                            .map(|(name, port)| ContainerPort {
                                name: name.map(str::to_string),
                                container_port: *port,
                                ..ContainerPort::default()
                            })
                            .collect(),
                    ),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn the_metrics_port_is_found_by_name_before_position() {
        let pod = pod_with_ports(&[(Some("other"), 80), (Some("metrics"), 9465)]);
        assert_eq!(metrics_port(&pod), Some(9465));
        let unnamed = pod_with_ports(&[(None, 9464)]);
        assert_eq!(metrics_port(&unnamed), Some(9464));
        assert_eq!(metrics_port(&Pod::default()), None);
    }

    #[test]
    fn pods_are_selected_by_the_workloads_labels_or_the_charts() {
        assert_eq!(
            selector(None, "agent"),
            "app.kubernetes.io/component=agent,app.kubernetes.io/name=weft"
        );
        let own = LabelSelector {
            match_labels: Some([("app".to_string(), "mine".to_string())].into()),
            ..LabelSelector::default()
        };
        assert_eq!(selector(Some(&own), "agent"), "app=mine");
    }
}
