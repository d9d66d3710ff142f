//! What the agent keeps of Pods, Namespaces and NetworkPolicies: compact
//! records with only the fields policy needs, read from the API objects.
//!
//! Every object is input from a client that may be compromised. A
//! NetworkPolicy the API server would not have accepted (a bad selector
//! operator, an unparsable `ipBlock`, `endPort` below `port`) is refused
//! as a whole with an error naming the field, rather than half-applied.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::selector::{Labels, Selector, SelectorError};

// The records carry it, so their readers find it beside them.
pub use weft_core::protocol::Protocol;

/// A named container port, which a policy may refer to by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    /// The port's name.
    pub name: String,
    /// Its number.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// A pod as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
    /// Its addresses (one per family).
    pub ips: Vec<IpAddr>,
    /// The node it is bound to.
    pub node: String,
    /// Its containers' named ports.
    pub named_ports: Vec<NamedPort>,
}

impl PodRecord {
    /// The record of a pod on the pod network; `None` for a pod that has
    /// no address yet, is not bound to a node, has finished (its address
    /// may already be another pod's), or uses the host's network (its
    /// traffic is the node's).
    pub fn of(pod: &Pod) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        let status = pod.status.as_ref()?;
        if spec.host_network == Some(true)
            || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
        {
            return None;
        }
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .pod_ip
                    .as_deref()
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        if ips.is_empty() {
            return None;
        }
        let named_ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|port| {
                Some(NamedPort {
                    name: port.name.clone()?,
                    port: u16::try_from(port.container_port).ok()?,
                    protocol: Protocol::from_kubernetes(port.protocol.as_deref())?,
                })
            })
            .collect();
        Some(Self {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            node: spec.node_name.clone()?,
            named_ports,
        })
    }

    /// The number of the container port named `name` with `protocol`.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// A namespace as policy sees it: its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRecord {
    /// Its name.
    pub name: String,
    /// Its labels (the API server adds `kubernetes.io/metadata.name`).
    pub labels: Labels,
}

impl NamespaceRecord {
    /// The record of `namespace`.
    pub fn of(namespace: &Namespace) -> Option<Self> {
        Some(Self {
            name: namespace.metadata.name.clone()?,
            labels: namespace.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

/// Which pods a pod peer names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceScope {
    /// Pods in the policy's own namespace.
    Own,
    /// Pods in every namespace whose labels match.
    Matching(Selector),
}

/// One entry of a rule's `from` or `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces of `namespaces`.
    Pods {
        /// Which namespaces.
        namespaces: NamespaceScope,
        /// Which pods in them.
        pods: Selector,
    },
    /// Addresses in `cidr` but in none of `except`.
    Block {
        /// The block.
        cidr: IpNet,
        /// Holes in it.
        except: Vec<IpNet>,
    },
}

/// A port a rule allows: by number (a range with `endPort`), by the name
/// of a container port, or every port of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortMatch {
    /// Every port.
    Any,
    /// `first..=last`.
    Range(u16, u16),
    /// A container port's name, resolved on the pod the traffic goes to.
    Named(String),
}

/// One entry of a rule's `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    /// The protocol.
    pub protocol: Protocol,
    /// The port(s).
    pub port: PortMatch,
}

/// One ingress or egress rule: traffic to or from any of `peers` (every
/// address when empty) on any of `ports` (every protocol and port when
/// empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// `from` (ingress) or `to` (egress).
    pub peers: Vec<Peer>,
    /// `ports`.
    pub ports: Vec<PortRule>,
}

/// A NetworkPolicy as the compiler reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    /// Its namespace; it selects pods only there.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `spec.podSelector`.
    pub pod_selector: Selector,
    /// The ingress rules, when the policy isolates selected pods for
    /// ingress (`policyTypes`); `Some(vec![])` allows nothing in.
    pub ingress: Option<Vec<Rule>>,
    /// The egress rules, when it isolates them for egress.
    pub egress: Option<Vec<Rule>>,
}

/// Why a NetworkPolicy is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NetworkPolicy {namespace}/{name}: {field}: {problem}")]
pub struct PolicyError {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy's name.
    pub name: String,
    /// The field at fault, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

impl PolicyRecord {
    /// Reads `policy`, applying the API's defaults: without `policyTypes`
    /// a policy isolates for ingress always and for egress when it has
    /// egress rules.
    pub fn of(policy: &NetworkPolicy) -> Result<Self, PolicyError> {
        let namespace = policy.metadata.namespace.clone().unwrap_or_default();
        let name = policy.metadata.name.clone().unwrap_or_default();
        let fail = |field: String, problem: String| PolicyError {
            namespace: namespace.clone(),
            name: name.clone(),
            field,
            problem,
        };
        let spec = policy.spec.clone().unwrap_or_default();
        let selector = |field: &str, s| {
            Selector::parse(s).map_err(|e: SelectorError| fail(field.into(), e.to_string()))
        };
        // Absent, as empty, selects every pod in the namespace.
        let pod_selector = selector(
            "spec.podSelector",
            spec.pod_selector.as_ref().unwrap_or(&Default::default()),
        )?;
        let (isolates_ingress, isolates_egress) = isolation(&spec).map_err(|t| {
            fail(
                "spec.policyTypes".into(),
                format!("{t:?} is not a policy type; use Ingress or Egress"),
            )
        })?;
        let rules = |direction: &str,
                     rules: Vec<(Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>)>|
         -> Result<Vec<Rule>, PolicyError> {
            rules
                .into_iter()
                .enumerate()
                .map(|(index, (peers, ports))| {
                    let at = format!("spec.{direction}[{index}]");
                    let peer_key = if direction == "ingress" { "from" } else { "to" };
                    Ok(Rule {
                        peers: peers
                            .iter()
                            .enumerate()
                            .map(|(i, peer)| {
                                parse_peer(peer)
                                    .map_err(|(f, p)| fail(format!("{at}.{peer_key}[{i}]{f}"), p))
                            })
                            .collect::<Result<_, _>>()?,
                        ports: ports
                            .iter()
                            .enumerate()
                            .map(|(i, port)| {
                                parse_port(port)
                                    .map_err(|(f, p)| fail(format!("{at}.ports[{i}]{f}"), p))
                            })
                            .collect::<Result<_, _>>()?,
                    })
                })
                .collect()
        };
        let ingress = spec
            .ingress
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.from.unwrap_or_default(), r.ports.unwrap_or_default()))
            .collect();
        let egress = spec
            .egress
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.to.unwrap_or_default(), r.ports.unwrap_or_default()))
            .collect();
        Ok(Self {
            pod_selector,
            ingress: if isolates_ingress {
                Some(rules("ingress", ingress)?)
            } else {
                None
            },
            egress: if isolates_egress {
                Some(rules("egress", egress)?)
            } else {
                None
            },
            namespace,
            name,
        })
    }
}

/// Whether the policy isolates for (ingress, egress); an unknown policy
/// type is returned as the error.
fn isolation(spec: &NetworkPolicySpec) -> Result<(bool, bool), String> {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            let mut isolates = (false, false);
            for t in types {
                match t.as_str() {
                    "Ingress" => isolates.0 = true,
                    "Egress" => isolates.1 = true,
                    other => return Err(other.to_owned()),
                }
            }
            Ok(isolates)
        }
        _ => Ok((true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))),
    }
}

/// A peer, or the field under it at fault and why.
fn parse_peer(peer: &NetworkPolicyPeer) -> Result<Peer, (String, String)> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err((
                String::new(),
                "ipBlock goes alone; put selectors in a peer of their own".into(),
            ));
        }
        let cidr: IpNet = block.cidr.parse().map_err(|_| {
            (
                ".ipBlock.cidr".to_owned(),
                format!("{:?} is not a CIDR such as 10.0.0.0/8", block.cidr),
            )
        })?;
        let except = block
            .except
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, text)| match text.parse::<IpNet>() {
                Ok(hole) if cidr.contains(&hole) => Ok(hole),
                _ => Err((
                    format!(".ipBlock.except[{i}]"),
                    format!("{text:?} is not a CIDR inside {cidr}"),
                )),
            })
            .collect::<Result<_, _>>()?;
        return Ok(Peer::Block { cidr, except });
    }
    let selector =
        |field: &str, s| Selector::parse(s).map_err(|e| (field.to_owned(), e.to_string()));
    let namespaces = match &peer.namespace_selector {
        Some(s) => NamespaceScope::Matching(selector(".namespaceSelector", s)?),
        None => NamespaceScope::Own,
    };
    let pods = match &peer.pod_selector {
        Some(s) => selector(".podSelector", s)?,
        None if matches!(namespaces, NamespaceScope::Matching(_)) => Selector::everything(),
        None => {
            return Err((
                String::new(),
                "a peer needs podSelector, namespaceSelector or ipBlock".into(),
            ))
        }
    };
    Ok(Peer::Pods { namespaces, pods })
}

/// A port rule, or the field under it at fault and why.
fn parse_port(port: &NetworkPolicyPort) -> Result<PortRule, (String, String)> {
    let protocol = Protocol::from_kubernetes(port.protocol.as_deref()).ok_or_else(|| {
        (
            ".protocol".to_owned(),
            format!(
                "{:?} is not TCP, UDP or SCTP",
                port.protocol.as_deref().unwrap_or("")
            ),
        )
    })?;
    let number = |n: i32, field: &str| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| (field.to_owned(), format!("{n} is not a port (1-65535)")))
    };
    let port = match (&port.port, port.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => return Err((".endPort".into(), "endPort needs port".into())),
        (Some(IntOrString::String(name)), None) => PortMatch::Named(name.clone()),
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err((".endPort".into(), "endPort needs a numeric port".into()))
        }
        (Some(IntOrString::Int(first)), end) => {
            let first = number(*first, ".port")?;
            let last = match end {
                Some(end) => number(end, ".endPort")?,
                None => first,
            };
            if last < first {
                return Err((".endPort".into(), format!("{last} is below port {first}")));
            }
            PortMatch::Range(first, last)
        }
    };
    Ok(PortRule { protocol, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: serde_json::Value) -> Result<PolicyRecord, PolicyError> {
        PolicyRecord::of(
            &serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "x", "name": "p"},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn policy_types_default_as_the_api_documents() {
        let ingress_only = policy(serde_json::json!({"podSelector": {}})).unwrap();
        assert_eq!(ingress_only.ingress, Some(vec![]));
        assert_eq!(ingress_only.egress, None);
        let with_egress = policy(serde_json::json!({
            "podSelector": {}, "egress": [{}],
        }))
        .unwrap();
        assert_eq!(with_egress.ingress, Some(vec![]));
        assert_eq!(with_egress.egress, Some(vec![Rule::default()]));
        let egress_only = policy(serde_json::json!({
            "podSelector": {}, "policyTypes": ["Egress"],
        }))
        .unwrap();
        assert_eq!(egress_only.ingress, None);
        assert_eq!(egress_only.egress, Some(vec![]));
    }

    #[test]
    fn peers_and_ports_are_read() {
        let record = policy(serde_json::json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": "web"}}},
                    {"namespaceSelector": {"matchLabels": {"team": "a"}}},
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                ],
                "ports": [
                    {"port": 5432},
                    {"protocol": "UDP", "port": 8000, "endPort": 8080},
                    {"port": "metrics"},
                    {"protocol": "SCTP"},
                ],
            }],
        }))
        .unwrap();
        let rule = &record.ingress.unwrap()[0];
        assert!(matches!(
            &rule.peers[0],
            Peer::Pods {
                namespaces: NamespaceScope::Own,
                ..
            }
        ));
        assert!(matches!(
            &rule.peers[1],
            Peer::Pods { namespaces: NamespaceScope::Matching(_), pods } if *pods == Selector::everything()
        ));
        assert_eq!(
            rule.peers[2],
            Peer::Block {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec!["10.1.0.0/16".parse().unwrap()],
            }
        );
        let ports: Vec<_> = rule
            .ports
            .iter()
            .map(|p| (p.protocol, p.port.clone()))
            .collect();
        assert_eq!(
            ports,
            vec![
                (Protocol::Tcp, PortMatch::Range(5432, 5432)),
                (Protocol::Udp, PortMatch::Range(8000, 8080)),
                (Protocol::Tcp, PortMatch::Named("metrics".into())),
                (Protocol::Sctp, PortMatch::Any),
            ]
        );
    }

    #[test]
    fn bad_policies_name_the_field_and_the_fix() {
        for (spec, field, says) in [
            (
                serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0"}}]}]}),
                "spec.ingress[0].from[0].ipBlock.cidr",
                "not a CIDR",
            ),
            (
                serde_json::json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}}]}]}),
                "spec.egress[0].to[0].ipBlock.except[0]",
                "inside 10.0.0.0/8",
            ),
            (
                serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "below port 90",
            ),
            (
                serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
                "spec.ingress[0].ports[0].protocol",
                "not TCP, UDP or SCTP",
            ),
            (
                serde_json::json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}}),
                "spec.podSelector",
                "use In, NotIn",
            ),
            (
                serde_json::json!({"podSelector": {}, "policyTypes": ["Both"]}),
                "spec.policyTypes",
                "use Ingress or Egress",
            ),
        ] {
            let error = policy(spec).unwrap_err();
            assert_eq!(error.field, field);
            assert!(error.to_string().contains(says), "{error}");
            assert!(
                error.to_string().starts_with("NetworkPolicy x/p: "),
                "{error}"
            );
        }
    }

    #[test]
    fn only_pods_on_the_pod_network_with_addresses_are_kept() {
        let pod = |extra: serde_json::Value| -> Option<PodRecord> {
            let mut value = serde_json::json!({
                "metadata": {"namespace": "x", "name": "a", "labels": {"app": "web"}},
                "spec": {"nodeName": "node-0", "containers": [{"name": "c", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"containerPort": 9000},
                ]}]},
                "status": {"phase": "Running", "podIP": "10.244.0.5",
                           "podIPs": [{"ip": "10.244.0.5"}, {"ip": "fd00:10:244::5"}]},
            });
            json_patch(&mut value, extra);
            PodRecord::of(&serde_json::from_value(value).unwrap())
        };
        let record = pod(serde_json::json!({})).unwrap();
        assert_eq!(record.ips.len(), 2);
        assert_eq!(record.named_port("http", Protocol::Tcp), Some(8080));
        assert_eq!(record.named_port("dns", Protocol::Udp), Some(53));
        assert_eq!(record.named_port("dns", Protocol::Tcp), None);
        assert_eq!(record.named_ports.len(), 2);
        assert!(pod(serde_json::json!({"spec": {"hostNetwork": true}})).is_none());
        assert!(pod(serde_json::json!({"status": {"phase": "Succeeded"}})).is_none());
        assert!(pod(serde_json::json!({"status": {"podIP": null, "podIPs": null}})).is_none());
        assert!(pod(serde_json::json!({"spec": {"nodeName": null}})).is_none());
    }

    /// Merges `patch` into `value` (objects key by key, anything else
    /// replaced).
    fn json_patch(value: &mut serde_json::Value, patch: serde_json::Value) {
        match (value, patch) {
            (serde_json::Value::Object(value), serde_json::Value::Object(patch)) => {
                for (key, item) in patch {
                    json_patch(value.entry(key).or_insert(serde_json::Value::Null), item);
                }
            }
            (value, patch) => *value = patch,
        }
    }
}
