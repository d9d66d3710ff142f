//! A policy rule's peer and port in words, read from the NetworkPolicy
//! object itself, so the trace quotes what its author wrote.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_policy::compile::Direction;
use weft_policy::explain::Admission;

/// `ingress rule 0: from pods with app=web in namespace prod, on TCP port 80`.
pub fn admission_text(
    policies: &[NetworkPolicy],
    direction: Direction,
    admission: &Admission,
) -> String {
    let (namespace, name) = (&admission.policy.namespace, &admission.policy.name);
    let spec = policies
        .iter()
        .find(|p| {
            p.metadata.namespace.as_deref() == Some(namespace.as_str())
                && p.metadata.name.as_deref() == Some(name.as_str())
        })
        .and_then(|p| p.spec.as_ref());
    let (preposition, anyone) = match direction {
        Direction::Ingress => ("from", "from anywhere"),
        Direction::Egress => ("to", "to anywhere"),
    };
    let (peers, ports) = rule_parts(spec, direction, admission.rule);
    let peer = match admission.peer {
        None => anyone.to_string(),
        Some(index) => match peers.and_then(|peers| peers.get(index)) {
            Some(peer) => format!("{preposition} {}", peer_words(peer, namespace)),
            None => format!("{preposition} peer {index}"),
        },
    };
    let port = match admission.port {
        None => "on every port".to_string(),
        Some(index) => match ports.and_then(|ports| ports.get(index)) {
            Some(port) => format!("on {}", port_words(port)),
            None => format!("on port entry {index}"),
        },
    };
    format!(
        "{} rule {}: {peer}, {port}",
        direction.name(),
        admission.rule
    )
}

/// The `from`/`to` and `ports` of rule `index`, as the object has them.
fn rule_parts(
    spec: Option<&NetworkPolicySpec>,
    direction: Direction,
    index: usize,
) -> (
    Option<&Vec<NetworkPolicyPeer>>,
    Option<&Vec<NetworkPolicyPort>>,
) {
    let Some(spec) = spec else {
        return (None, None);
    };
    match direction {
        Direction::Ingress => spec
            .ingress
            .as_ref()
            .and_then(|rules| rules.get(index))
            .map_or((None, None), |r| (r.from.as_ref(), r.ports.as_ref())),
        Direction::Egress => spec
            .egress
            .as_ref()
            .and_then(|rules| rules.get(index))
            .map_or((None, None), |r| (r.to.as_ref(), r.ports.as_ref())),
    }
}

/// `pods with app=web in namespace prod`, `addresses in 10.0.0.0/8 except
/// 10.1.0.0/16`, ...; a pod selector without a namespace selector means
/// the policy's own namespace.
fn peer_words(peer: &NetworkPolicyPeer, own_namespace: &str) -> String {
    if let Some(block) = &peer.ip_block {
        let except = block.except.as_deref().unwrap_or_default();
        return if except.is_empty() {
            format!("addresses in {}", block.cidr)
        } else {
            format!("addresses in {} except {}", block.cidr, except.join(", "))
        };
    }
    let pods = match peer.pod_selector.as_ref().and_then(selector_words) {
        Some(labels) => format!("pods with {labels}"),
        None => "every pod".to_string(),
    };
    let namespaces = match &peer.namespace_selector {
        None => format!("in namespace {own_namespace}"),
        Some(selector) => match selector_words(selector) {
            Some(labels) => format!("in namespaces with {labels}"),
            None => "in every namespace".to_string(),
        },
    };
    format!("{pods} {namespaces}")
}

/// `app=web, tier in (a, b), !legacy`; none for the empty selector.
fn selector_words(selector: &LabelSelector) -> Option<String> {
    let mut terms: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let key = &expression.key;
        let values = expression.values.as_deref().unwrap_or_default().join(", ");
        terms.push(match expression.operator.as_str() {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} not in ({values})"),
            "Exists" => key.clone(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other} ({values})"),
        });
    }
    (!terms.is_empty()).then(|| terms.join(", "))
}

/// `TCP port 80`, `TCP ports 8000-8080`, `TCP port "http"`, `every UDP port`.
fn port_words(port: &NetworkPolicyPort) -> String {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match (&port.port, port.end_port) {
        (None, _) => format!("every {protocol} port"),
        (Some(IntOrString::Int(first)), Some(last)) => {
            format!("{protocol} ports {first}-{last}")
        }
        (Some(IntOrString::Int(number)), None) => format!("{protocol} port {number}"),
        (Some(IntOrString::String(name)), _) => format!("{protocol} port {name:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicyIngressRule};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, ObjectMeta};
    use weft_policy::explain::PolicyRef;

    fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..LabelSelector::default()
        }
    }

    fn policy(rule: NetworkPolicyIngressRule) -> NetworkPolicy {
        NetworkPolicy {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some("allow-web".into()),
                ..ObjectMeta::default()
            },
            spec: Some(NetworkPolicySpec {
                ingress: Some(vec![NetworkPolicyIngressRule::default(), rule]),
                ..NetworkPolicySpec::default()
            }),
        }
    }

    fn admission(peer: Option<usize>, port: Option<usize>) -> Admission {
        Admission {
            policy: PolicyRef {
                namespace: "shop".into(),
                name: "allow-web".into(),
            },
            rule: 1,
            peer,
            port,
        }
    }

    #[test]
    fn peers_and_ports_read_as_written() {
        let rule = NetworkPolicyIngressRule {
            from: Some(vec![
                NetworkPolicyPeer {
                    pod_selector: Some(labels(&[("app", "web")])),
                    ..NetworkPolicyPeer::default()
                },
                NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_expressions: Some(vec![LabelSelectorRequirement {
                            key: "team".into(),
                            operator: "In".into(),
                            values: Some(vec!["a".into(), "b".into()]),
                        }]),
                        ..LabelSelector::default()
                    }),
                    ..NetworkPolicyPeer::default()
                },
                NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: "10.0.0.0/8".into(),
                        except: Some(vec!["10.1.0.0/16".into()]),
                    }),
                    ..NetworkPolicyPeer::default()
                },
            ]),
            ports: Some(vec![
                NetworkPolicyPort {
                    port: Some(IntOrString::Int(80)),
                    ..NetworkPolicyPort::default()
                },
                NetworkPolicyPort {
                    protocol: Some("UDP".into()),
                    port: Some(IntOrString::Int(5000)),
                    end_port: Some(5010),
                },
                NetworkPolicyPort {
                    port: Some(IntOrString::String("http".into())),
                    ..NetworkPolicyPort::default()
                },
            ]),
        };
        let policies = [policy(rule)];
        let text =
            |peer, port| admission_text(&policies, Direction::Ingress, &admission(peer, port));
        assert_eq!(
            text(Some(0), Some(0)),
            "ingress rule 1: from pods with app=web in namespace shop, on TCP port 80"
        );
        assert_eq!(
            text(Some(1), Some(1)),
            "ingress rule 1: from every pod in namespaces with team in (a, b), on UDP ports 5000-5010"
        );
        assert_eq!(
            text(Some(2), Some(2)),
            "ingress rule 1: from addresses in 10.0.0.0/8 except 10.1.0.0/16, on TCP port \"http\""
        );
        assert_eq!(
            text(None, None),
            "ingress rule 1: from anywhere, on every port"
        );
        assert_eq!(
            admission_text(&policies, Direction::Egress, &admission(None, None)),
            "egress rule 1: to anywhere, on every port"
        );
    }
}
