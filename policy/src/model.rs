//! What the agent keeps of Pods, Namespaces and NetworkPolicies: compact
//! records with only the fields policy needs, read from the API objects.
//!
//! Every object is input from a client that may be compromised. A
//! NetworkPolicy the API server would not have accepted (a bad selector
//! operator, an unparsable `ipBlock`, `endPort` below `port`) is refused
//! as a whole with an error naming the field, rather than half-applied.
//! Pod addresses are screened like a peer's data ([`screen_pod_addresses`]):
//! the kubelet of any node may write the status of the pods bound to it, so
//! a Pod may claim an address that is not its own.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::selector::{Labels, Selector, SelectorError};

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
    /// Addresses it claims that another pod claims too, set aside by
    /// [`screen_pod_addresses`]: they select nothing as peers, and a pod
    /// of this node that a policy isolates keeps them isolated with
    /// nothing allowed, rather than open.
    pub withheld: Vec<IpAddr>,
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
        let ips = pod_addresses(pod);
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
            withheld: Vec::new(),
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

/// A pod's addresses as its status gives them: `status.podIPs`, else
/// `status.podIP`; unparsable entries are skipped.
pub fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
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
    ips
}

/// Every node's pod slices by node name (`weft.dev/pod-cidr` and
/// `weft.dev/pod-cidr-v6`, which only the controller writes).
pub type NodeSlices = BTreeMap<String, Vec<IpNet>>;

/// Why an address a Pod's status claims selects nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressRejection {
    /// It lies outside every slice of the pod's node: it is another
    /// node's to give, whatever this Pod's node writes in its status.
    OutsideNodeSlices,
    /// The pod's node has no slice known (not assigned yet, or the node's
    /// agent has not published it yet), so nothing vouches for it.
    NodeWithoutSlices,
    /// Another pod claims it too: it cannot stand for either of them.
    Duplicate,
}

impl AddressRejection {
    /// Every metric label, so a resolved rejection shows as 0.
    pub const LABELS: &'static [&'static str] =
        &["outside_node_slices", "node_without_slices", "duplicate"];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            AddressRejection::OutsideNodeSlices => "outside_node_slices",
            AddressRejection::NodeWithoutSlices => "node_without_slices",
            AddressRejection::Duplicate => "duplicate",
        }
    }
}

/// A pod address that selects nothing, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RejectedAddress {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The address its status claims.
    pub ip: IpAddr,
    /// Why it selects nothing.
    pub reason: AddressRejection,
    /// The pod's node.
    pub node: String,
}

impl fmt::Display for RejectedAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (namespace, name, ip, node) = (&self.namespace, &self.name, self.ip, &self.node);
        write!(f, "pod {namespace}/{name} claims {ip} in status.podIPs, ")?;
        match self.reason {
            AddressRejection::OutsideNodeSlices => write!(f, "outside the pod slices of its node {node}; it selects nothing (the kubelet of {node} or the pod's status is wrong)"),
            AddressRejection::NodeWithoutSlices => write!(f, "but its node {node} has no pod slice known yet; it selects nothing until the node's slice is published"),
            AddressRejection::Duplicate => write!(f, "which another pod claims too; it selects nothing for either until one of them lets it go"),
        }
    }
}

/// Pods with only the addresses policy trusts, and the addresses set aside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScreenedPods {
    /// The pods; each keeps the addresses that lie in its node's slices
    /// and no other pod claims.
    pub pods: Vec<PodRecord>,
    /// Every address set aside, in order of namespace, name and address.
    pub rejected: Vec<RejectedAddress>,
}

/// Screens the addresses `pods` claim against their nodes' `slices`.
///
/// An address outside every slice of the pod's node is dropped: its node
/// cannot have given it, and letting it select traffic would let any node
/// speak for another node's pods. Then an address that two or more pods
/// still claim is withheld from all of them (see [`PodRecord::withheld`]):
/// which claimant is right cannot be told from the API, and neither may
/// select traffic on behalf of the other. Slices come first, so a pod lying
/// about an address in another node's slice cannot make the pod that holds
/// it lose it.
pub fn screen_pod_addresses(mut pods: Vec<PodRecord>, slices: &NodeSlices) -> ScreenedPods {
    let mut rejected = Vec::new();
    let mut reject = |pod: &PodRecord, ip: IpAddr, reason| {
        rejected.push(RejectedAddress {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ip,
            reason,
            node: pod.node.clone(),
        })
    };
    for pod in &mut pods {
        let node_slices = slices.get(&pod.node).map_or(&[][..], Vec::as_slice);
        let mut claimed = std::mem::take(&mut pod.ips);
        claimed.sort_unstable();
        claimed.dedup();
        for ip in claimed {
            if node_slices.iter().any(|slice| slice.contains(&ip)) {
                pod.ips.push(ip);
            } else if node_slices.is_empty() {
                reject(pod, ip, AddressRejection::NodeWithoutSlices);
            } else {
                reject(pod, ip, AddressRejection::OutsideNodeSlices);
            }
        }
    }
    let mut claims: HashMap<IpAddr, usize> = HashMap::new();
    for ip in pods.iter().flat_map(|pod| &pod.ips) {
        *claims.entry(*ip).or_default() += 1;
    }
    for pod in &mut pods {
        let (unique, shared): (Vec<IpAddr>, Vec<IpAddr>) =
            pod.ips.iter().partition(|ip| claims[*ip] == 1);
        pod.ips = unique;
        pod.withheld = shared;
        for &ip in &pod.withheld {
            reject(pod, ip, AddressRejection::Duplicate);
        }
    }
    rejected.sort();
    ScreenedPods { pods, rejected }
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

    fn record(name: &str, node: &str, ips: &[&str]) -> PodRecord {
        PodRecord {
            namespace: "x".into(),
            name: name.into(),
            labels: Labels::new(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            withheld: Vec::new(),
            node: node.into(),
            named_ports: Vec::new(),
        }
    }

    fn slices() -> NodeSlices {
        let slice = |text: &str| text.parse::<IpNet>().unwrap();
        NodeSlices::from([
            (
                "node-0".into(),
                vec![slice("10.244.0.0/24"), slice("fd00:10:244::/64")],
            ),
            ("node-1".into(), vec![slice("10.244.1.0/24")]),
            ("node-2".into(), vec![]),
        ])
    }

    fn rejections(screened: &ScreenedPods) -> Vec<(String, String, &'static str)> {
        screened
            .rejected
            .iter()
            .map(|r| (r.name.clone(), r.ip.to_string(), r.reason.label()))
            .collect()
    }

    #[test]
    fn addresses_outside_the_pods_node_slices_select_nothing() {
        let screened = screen_pod_addresses(
            vec![
                record("honest", "node-0", &["10.244.0.4", "fd00:10:244::4"]),
                // node-1's kubelet claims node-0's address for its pod.
                record("liar", "node-1", &["10.244.0.4", "10.244.1.7"]),
                record("unknown", "node-9", &["10.244.9.2"]),
                record("unassigned", "node-2", &["10.244.2.2"]),
            ],
            &slices(),
        );
        let ips: Vec<Vec<String>> = screened
            .pods
            .iter()
            .map(|pod| pod.ips.iter().map(ToString::to_string).collect())
            .collect();
        // The pod that holds the address keeps it: the lie is dropped
        // before duplicates are counted.
        assert_eq!(
            ips,
            [
                vec!["10.244.0.4", "fd00:10:244::4"],
                vec!["10.244.1.7"],
                vec![],
                vec![]
            ]
        );
        assert!(screened.pods.iter().all(|pod| pod.withheld.is_empty()));
        assert_eq!(
            rejections(&screened),
            [
                ("liar".into(), "10.244.0.4".into(), "outside_node_slices"),
                (
                    "unassigned".into(),
                    "10.244.2.2".into(),
                    "node_without_slices"
                ),
                ("unknown".into(), "10.244.9.2".into(), "node_without_slices"),
            ]
        );
        let message = screened.rejected[0].to_string();
        assert!(
            message.contains("x/liar")
                && message.contains("10.244.0.4")
                && message.contains("node-1"),
            "{message}"
        );
    }

    #[test]
    fn an_address_two_pods_claim_is_withheld_from_both() {
        let pods = vec![
            record("b", "node-0", &["10.244.0.3", "fd00:10:244::3"]),
            record("a", "node-0", &["10.244.0.3"]),
            record("c", "node-0", &["10.244.0.5", "10.244.0.5"]),
        ];
        let screened = screen_pod_addresses(pods.clone(), &slices());
        assert_eq!(screened.pods[0].ips, [pods[0].ips[1]]);
        assert_eq!(screened.pods[0].withheld, [pods[0].ips[0]]);
        assert!(screened.pods[1].ips.is_empty());
        assert_eq!(screened.pods[1].withheld, [pods[0].ips[0]]);
        // A pod naming its own address twice is not a duplicate.
        assert_eq!(screened.pods[2].ips, [pods[2].ips[0]]);
        assert_eq!(
            rejections(&screened),
            [
                ("a".into(), "10.244.0.3".into(), "duplicate"),
                ("b".into(), "10.244.0.3".into(), "duplicate"),
            ]
        );
        // Screening the same pods in another order decides the same.
        let mut reversed = pods;
        reversed.reverse();
        assert_eq!(
            screen_pod_addresses(reversed, &slices()).rejected,
            screened.rejected
        );
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
