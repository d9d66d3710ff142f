//! What `trace` reads: every Pod, Namespace, NetworkPolicy and Node (the
//! agents compile from all of them), then the `/status` of the agents of
//! the two ends' nodes through the pod proxy, each asked for the kernel
//! entries it holds toward the other node.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::{Api, Client};

use super::judge::{resolve, Ends};
use super::TraceRequest;
use crate::error::{Error, Result};
use crate::observe::{
    askable, read_agent, selector, within, AgentReading, StatusOptions, AGENT_DAEMON_SET,
};

/// Everything `trace` judges, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Readings {
    /// The namespace Weft is installed in (for the fixes warnings name).
    pub namespace: String,
    /// Every Pod.
    pub pods: Vec<Pod>,
    /// Every Namespace.
    pub namespaces: Vec<Namespace>,
    /// Every NetworkPolicy.
    pub policies: Vec<NetworkPolicy>,
    /// Every Node.
    pub nodes: Vec<Node>,
    /// The agents of the two ends' nodes, by node name.
    pub agents: BTreeMap<String, NodeAgent>,
}

/// The agent of one node, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAgent {
    /// Its pod; none when no running agent pod is bound to the node.
    pub pod: Option<String>,
    /// Its `/status`, or why there is none.
    pub reading: AgentReading,
}

/// Reads the cluster for `request`: the API objects (concurrently), then
/// the agents of the nodes the ends are on.
pub async fn read(
    client: &Client,
    options: &StatusOptions,
    request: &TraceRequest,
) -> Result<Readings> {
    let limit = options.request_timeout;
    let all = ListParams::default();
    let pods: Api<Pod> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let policies: Api<NetworkPolicy> = Api::all(client.clone());
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), &options.namespace);
    // Pod and Node lists of thousands take longer than one status: no
    // short limit, as for `status`.
    let (pods, nodes, namespaces, policies, daemon_set) = tokio::join!(
        pods.list(&all),
        nodes.list(&all),
        within(limit, "list namespaces", namespaces.list(&all)),
        within(limit, "list networkpolicies", policies.list(&all)),
        within(
            limit,
            "get the agent DaemonSet",
            daemon_sets.get_opt(AGENT_DAEMON_SET)
        ),
    );
    let read_error = |what: &str| {
        let what = what.to_string();
        move |source| Error::Read { what, source }
    };
    let mut readings = Readings {
        namespace: options.namespace.clone(),
        pods: pods.map_err(read_error("list pods"))?.items,
        nodes: nodes.map_err(read_error("list nodes"))?.items,
        namespaces: namespaces?.items,
        policies: policies?.items,
        agents: BTreeMap::new(),
    };
    let ends = resolve(&readings, request)?;

    let selector = selector(
        daemon_set?
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .map(|s| &s.selector),
        "agent",
    );
    let agent_pods = within(
        limit,
        "list the agent pods",
        Api::<Pod>::namespaced(client.clone(), &options.namespace)
            .list(&ListParams::default().labels(&selector)),
    )
    .await?
    .items;
    let asks = agent_queries(&ends);
    let reads = asks.iter().map(|(node, query)| {
        let agent_pods = &agent_pods;
        async move {
            let agent = match agent_pod(agent_pods, node) {
                Some((pod, port)) => NodeAgent {
                    reading: read_agent(client, &options.namespace, &pod, port, query, limit).await,
                    pod: Some(pod),
                },
                None => NodeAgent {
                    pod: None,
                    reading: AgentReading {
                        status: Err(format!("no running agent pod on node {node}")),
                        kernel_refused: None,
                    },
                },
            };
            (node.clone(), agent)
        }
    });
    readings.agents = futures::future::join_all(reads).await.into_iter().collect();
    Ok(readings)
}

/// The agents to ask and what: for two nodes, each node's entries toward
/// the other; otherwise its plain status (policy and backend).
fn agent_queries(ends: &Ends) -> Vec<(String, String)> {
    let source = ends.source_node.clone();
    match ends.destination_node.as_ref() {
        Some(destination) if *destination != source => vec![
            (source, format!("?check=kernel&peer={destination}")),
            (
                destination.clone(),
                format!("?check=kernel&peer={}", ends.source_node),
            ),
        ],
        _ => vec![(source, String::new())],
    }
}

/// The agent pod to ask on `node` and its status port: a running one,
/// preferring one that is not being deleted (during a rolling update a
/// node briefly has two).
fn agent_pod(pods: &[Pod], node: &str) -> Option<(String, u16)> {
    let on_node = pods
        .iter()
        .filter(|pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node));
    let mut askable: Vec<(bool, (String, u16))> = on_node
        .filter_map(|pod| Some((pod.metadata.deletion_timestamp.is_some(), askable(pod)?)))
        .collect();
    askable.sort();
    askable.into_iter().next().map(|(_, pod)| pod)
}

#[cfg(test)]
mod tests {
    use super::super::PodRef;
    use super::*;

    fn ends(source: &str, destination: Option<&str>) -> Ends {
        Ends {
            source: PodRef::parse("shop/client", "default"),
            source_ip: "10.244.1.5".parse().unwrap(),
            source_node: source.to_string(),
            destination: None,
            destination_ip: "10.244.2.7".parse().unwrap(),
            destination_node: destination.map(str::to_string),
            in_pod_network: destination.is_some(),
            protocol: weft_core::protocol::Protocol::Tcp,
            port: 80,
            notes: Vec::new(),
        }
    }

    #[test]
    fn two_nodes_are_each_asked_about_the_other() {
        assert_eq!(
            agent_queries(&ends("n1", Some("n2"))),
            [
                ("n1".to_string(), "?check=kernel&peer=n2".to_string()),
                ("n2".to_string(), "?check=kernel&peer=n1".to_string()),
            ]
        );
        assert_eq!(
            agent_queries(&ends("n1", Some("n1"))),
            [("n1".to_string(), String::new())]
        );
        assert_eq!(
            agent_queries(&ends("n1", None)),
            [("n1".to_string(), String::new())]
        );
    }
}
