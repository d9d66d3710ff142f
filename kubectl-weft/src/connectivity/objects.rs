//! The objects `connectivity test` makes, all in one namespace of its own
//! (so deleting the namespace removes everything): on every node a client
//! pod, a server pod (which also holds a hostPort) and a hostNetwork pod
//! that is both the node's server and its client; a NodePort Service in
//! front of the servers (it has a ClusterIP too); and the two
//! NetworkPolicies of the policy checks. Every pod runs
//! `kubectl-weft probe serve` from Weft's own image.

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

/// The label that marks the test's namespaces: the next run removes a
/// killed run's leftovers by it.
pub const TEST_LABEL: &str = "weft.dev/connectivity-test";
/// What a test namespace's name starts with (the API server adds a suffix).
pub const NAMESPACE_PREFIX: &str = "weft-connectivity-";
/// The label with a pod's [`Role`].
pub const ROLE_LABEL: &str = "weft.dev/connectivity-role";
/// The label with the index of a pod's node in the test.
pub const NODE_LABEL: &str = "weft.dev/connectivity-node";
/// The Service in front of the server pods.
pub const SERVICE: &str = "echo";
/// The Service's port.
pub const SERVICE_PORT: u16 = 80;
/// The hostPort each server pod holds on its node, to its echo port.
pub const HOST_PORT: u16 = 4244;
/// The default-deny policy of the policy checks.
pub const DENY_POLICY: &str = "deny-all";
/// The policy that lets one named client in.
pub const ALLOW_POLICY: &str = "allow-one-client";
/// The only container of every pod.
const CONTAINER: &str = "probe";
/// Where Weft's image carries the plugin.
const PLUGIN: &str = "/usr/local/bin/kubectl-weft";

/// What a test pod is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Connects on the test's request (its probe's control port).
    Client,
    /// Is connected to: the Service's backends and the policies' target.
    Server,
    /// On the host network: the node as a server (pod to node) and as a
    /// client (node to pod).
    Host,
}

impl Role {
    /// Every role, in the order the pods are made.
    pub const ALL: [Role; 3] = [Role::Client, Role::Server, Role::Host];

    /// The [`ROLE_LABEL`] value and the pod name's prefix.
    pub fn word(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::Host => "host",
        }
    }

    /// Reads a [`ROLE_LABEL`] value.
    pub fn from_word(word: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.word() == word)
    }

    /// The port that answers with the client's address (TCP and UDP).
    /// Host pods share the node's ports, so theirs are apart from the
    /// pods' to keep clear of the hostPort.
    pub fn echo_port(self) -> u16 {
        match self {
            Role::Host => 4243,
            Role::Client | Role::Server => 4241,
        }
    }

    /// The probe's control port, which the test asks through the pod proxy.
    pub fn control_port(self) -> u16 {
        match self {
            Role::Host => 4242,
            Role::Client | Role::Server => 4240,
        }
    }
}

/// The name of the pod of `role` on the node with `index`.
pub fn pod_name(role: Role, index: usize) -> String {
    format!("{}-{index}", role.word())
}

/// The test's namespace: named by the API server from
/// [`NAMESPACE_PREFIX`], marked with [`TEST_LABEL`], and allowed the host
/// network and host ports that the node checks need under Pod Security
/// admission.
pub fn namespace() -> Namespace {
    serde_json::from_value(json!({
        "metadata": {
            "generateName": NAMESPACE_PREFIX,
            "labels": {
                TEST_LABEL: "true",
                "pod-security.kubernetes.io/enforce": "privileged",
            },
        },
    }))
    .expect("the namespace is a valid Namespace")
}

/// The pod of `role` bound to `node` (the node's index `index`), running
/// the probe from `image`. Bound by `nodeName` and tolerating every taint:
/// the test wants every node, whatever the scheduler would say.
pub fn pod(role: Role, index: usize, node: &str, image: &str) -> Pod {
    let (echo, control) = (role.echo_port(), role.control_port());
    let mut echo_tcp = json!({"name": "echo", "containerPort": echo, "protocol": "TCP"});
    if role == Role::Server {
        echo_tcp["hostPort"] = json!(HOST_PORT);
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": pod_name(role, index),
            "labels": {
                TEST_LABEL: "true",
                ROLE_LABEL: role.word(),
                NODE_LABEL: index.to_string(),
            },
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": role == Role::Host,
            "tolerations": [{"operator": "Exists"}],
            // The probe holds no state: nothing to wait for on deletion.
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534},
            "containers": [{
                "name": CONTAINER,
                "image": image,
                // The image is on every node already (the agents run it):
                // the test works without a registry.
                "imagePullPolicy": "IfNotPresent",
                "command": [PLUGIN, "probe", "serve",
                    "--port", echo.to_string(), "--control", control.to_string()],
                "ports": [
                    echo_tcp,
                    {"name": "echo-udp", "containerPort": echo, "protocol": "UDP"},
                    {"name": "control", "containerPort": control, "protocol": "TCP"},
                ],
                "readinessProbe": {"tcpSocket": {"port": control}, "periodSeconds": 1},
                "resources": {"requests": {"cpu": "5m", "memory": "8Mi"}},
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    }))
    .expect("the probe pod is a valid Pod")
}

/// The NodePort Service in front of every server pod, dual-stack where the
/// cluster is.
pub fn service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": SERVICE, "labels": {TEST_LABEL: "true"}},
        "spec": {
            "type": "NodePort",
            "ipFamilyPolicy": "PreferDualStack",
            "selector": {ROLE_LABEL: Role::Server.word()},
            "ports": [{
                "name": "echo",
                "port": SERVICE_PORT,
                "targetPort": Role::Server.echo_port(),
                "protocol": "TCP",
            }],
        },
    }))
    .expect("the Service is a valid Service")
}

/// The labels of the pod of `role` on node `index`, as a selector.
fn selecting(role: Role, index: usize) -> serde_json::Value {
    json!({"matchLabels": {ROLE_LABEL: role.word(), NODE_LABEL: index.to_string()}})
}

/// Isolates the server on node `server` for ingress with nothing allowed.
pub fn deny_policy(server: usize) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": DENY_POLICY},
        "spec": {"podSelector": selecting(Role::Server, server), "policyTypes": ["Ingress"]},
    }))
    .expect("the deny policy is a valid NetworkPolicy")
}

/// Lets exactly the client on node `client` reach the echo port of the
/// server on node `server`.
pub fn allow_policy(server: usize, client: usize) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": ALLOW_POLICY},
        "spec": {
            "podSelector": selecting(Role::Server, server),
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": selecting(Role::Client, client)}],
                "ports": [{"protocol": "TCP", "port": Role::Server.echo_port()}],
            }],
        },
    }))
    .expect("the allow policy is a valid NetworkPolicy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_bound_to_their_node_and_run_the_probe() {
        let server = pod(Role::Server, 2, "node-c", "localhost/weft:1");
        let spec = server.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-c"));
        assert_eq!(spec.host_network, Some(false));
        let container = &spec.containers[0];
        assert_eq!(container.image.as_deref(), Some("localhost/weft:1"));
        assert_eq!(
            container.command.as_ref().unwrap()[..3],
            [PLUGIN, "probe", "serve"]
        );
        let ports = container.ports.as_ref().unwrap();
        assert_eq!(ports[0].host_port, Some(i32::from(HOST_PORT)));
        assert_eq!(server.metadata.name.as_deref(), Some("server-2"));
        assert_eq!(server.metadata.labels.unwrap()[NODE_LABEL], "2");

        let host = pod(Role::Host, 0, "node-a", "img").spec.unwrap();
        assert_eq!(host.host_network, Some(true));
        let ports = host.containers[0].ports.clone().unwrap();
        assert!(ports.iter().all(|p| p.host_port.is_none()));
        assert!(ports.iter().all(|p| p.container_port != 4241));
    }

    #[test]
    fn the_policies_select_one_server_and_admit_one_client() {
        let deny = deny_policy(1).spec.unwrap();
        assert!(deny.ingress.is_none());
        let allow = allow_policy(1, 0).spec.unwrap();
        let from = allow.ingress.unwrap()[0].from.clone().unwrap();
        let labels = from[0].pod_selector.clone().unwrap().match_labels.unwrap();
        assert_eq!(labels[ROLE_LABEL], "client");
        assert_eq!(labels[NODE_LABEL], "0");
        assert_eq!(allow.pod_selector, deny.pod_selector);
    }
}
