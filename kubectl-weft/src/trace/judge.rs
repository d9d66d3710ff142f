//! The answer, without I/O: which pods and nodes the two ends are, the
//! policy verdict of each end as its node's agent compiles it, and the
//! kernel entries on the path.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod};
use weft_core::annotations::pod_cidr_key;
use weft_core::ip::IpFamily;
use weft_core::protocol::Protocol;
use weft_core::status::AgentStatus;
use weft_policy::compile::{compile, Direction};
use weft_policy::explain::{explain, Query, SideVerdict};
use weft_policy::model::{
    pod_addresses, screen_pod_addresses, NamespaceRecord, NodeSlices, PodRecord, PolicyRecord,
    RejectedAddress,
};

use super::read::{NodeAgent, Readings};
use super::words::admission_text;
use super::{
    Admission, End, Hop, Path, PodRef, PolicySide, PolicyVerdict, Target, Trace, TraceRequest,
};
use crate::error::{Error, Result};

/// The two ends, resolved against the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ends {
    /// The source pod.
    pub source: PodRef,
    /// The source address traced (of the destination's family).
    pub source_ip: IpAddr,
    /// The source pod's node.
    pub source_node: String,
    /// The destination pod, when it is one.
    pub destination: Option<PodRef>,
    /// The destination address traced.
    pub destination_ip: IpAddr,
    /// The destination pod's node, or the node whose slice holds the
    /// address; none outside every slice.
    pub destination_node: Option<String>,
    /// The address lies in some node's pod slice.
    pub in_pod_network: bool,
    /// The protocol.
    pub protocol: Protocol,
    /// The destination port.
    pub port: u16,
    /// What resolving found worth a warning.
    pub notes: Vec<String>,
}

/// Finds the ends of `request` in `readings`: the pods, their addresses
/// and nodes, and the port.
pub fn resolve(readings: &Readings, request: &TraceRequest) -> Result<Ends> {
    let source = find_pod(&readings.pods, &request.source)?;
    let source_node = node_of(source, &request.source)?;
    let slices = node_slices(&readings.nodes, &[]);
    let mut notes = Vec::new();
    let (destination, destination_ip) = match &request.destination {
        Target::Pod(name) => {
            let pod = find_pod(&readings.pods, name)?;
            let ips = pod_addresses(pod);
            let source_ips = pod_addresses(source);
            let ip = ips
                .iter()
                .find(|ip| source_ips.iter().any(|s| s.is_ipv4() == ip.is_ipv4()))
                .or(ips.first())
                .copied()
                .ok_or_else(|| no_address(name))?;
            (Some((name.clone(), pod)), ip)
        }
        Target::Ip(ip) => {
            let claimants: Vec<&Pod> = readings
                .pods
                .iter()
                .filter(|pod| PodRecord::of(pod).is_some() && pod_addresses(pod).contains(ip))
                .collect();
            let pod = match claimants.as_slice() {
                [pod] => Some((pod_ref(pod), *pod)),
                [] => None,
                several => {
                    let mut names: Vec<String> =
                        several.iter().map(|p| pod_ref(p).to_string()).collect();
                    names.sort();
                    notes.push(format!(
                        "pods {} all claim {ip}: it is traced as an address, and policy withholds it from all of them until only one claims it (`kubectl get pods -A -o wide` shows which are stale)",
                        names.join(", ")
                    ));
                    None
                }
            };
            (pod, *ip)
        }
    };
    let source_ip = pod_addresses(source)
        .into_iter()
        .find(|ip| ip.is_ipv4() == destination_ip.is_ipv4())
        .ok_or_else(|| {
            Error::Trace(format!(
                "pod {} has no {} address (status.podIPs) to reach {destination_ip} from; trace an address of the family it has",
                request.source,
                IpFamily::of_addr(destination_ip)
            ))
        })?;
    let slice_node = slices
        .iter()
        .find(|(_, nets)| nets.iter().any(|net| net.contains(&destination_ip)))
        .map(|(node, _)| node.clone());
    let destination_node = match &destination {
        Some((name, pod)) => Some(node_of(pod, name)?),
        None => slice_node.clone(),
    };
    let (protocol, port) = match (request.port, &destination) {
        (Some(given), _) => (given.protocol, given.port),
        (None, Some((name, pod))) => only_port(pod, name)?,
        (None, None) => {
            return Err(Error::Trace(format!(
                "{destination_ip} is no pod's address, so it declares no port: give one with --port, e.g. --port 443 or --port 53/udp"
            )))
        }
    };
    Ok(Ends {
        source: request.source.clone(),
        source_ip,
        source_node,
        destination: destination.map(|(name, _)| name),
        destination_ip,
        destination_node,
        in_pod_network: slice_node.is_some(),
        protocol,
        port,
        notes,
    })
}

fn find_pod<'a>(pods: &'a [Pod], name: &PodRef) -> Result<&'a Pod> {
    pods.iter()
        .find(|pod| {
            pod.metadata.namespace.as_deref() == Some(name.namespace.as_str())
                && pod.metadata.name.as_deref() == Some(name.name.as_str())
        })
        .ok_or_else(|| {
            Error::Trace(format!(
                "pod {name} not found (check with `kubectl get pods -n {}`; give another namespace as NAMESPACE/POD)",
                name.namespace
            ))
        })
}

fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
    }
}

fn no_address(name: &PodRef) -> Error {
    Error::Trace(format!(
        "pod {name} has no address yet (status.podIP is empty): trace it once it runs"
    ))
}

fn node_of(pod: &Pod, name: &PodRef) -> Result<String> {
    if pod_addresses(pod).is_empty() {
        return Err(no_address(name));
    }
    pod.spec
        .as_ref()
        .and_then(|spec| spec.node_name.clone())
        .ok_or_else(|| {
            Error::Trace(format!(
                "pod {name} is not bound to a node (spec.nodeName): trace it once it is scheduled"
            ))
        })
}

/// The destination pod's one declared container port, when `--port` is
/// not given.
fn only_port(pod: &Pod, name: &PodRef) -> Result<(Protocol, u16)> {
    let ports: Vec<(Protocol, u16)> = pod
        .spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .flat_map(|container| container.ports.iter().flatten())
        .filter_map(|port| {
            Some((
                Protocol::from_kubernetes(port.protocol.as_deref())?,
                u16::try_from(port.container_port).ok()?,
            ))
        })
        .collect();
    match ports.as_slice() {
        [only] => Ok(*only),
        [] => Err(Error::Trace(format!(
            "pod {name} declares no container port: give one with --port, e.g. --port 80 or --port 53/udp"
        ))),
        several => {
            let listed: Vec<String> = several
                .iter()
                .map(|(protocol, port)| format!("{port}/{protocol}"))
                .collect();
            Err(Error::Trace(format!(
                "pod {name} declares several ports ({}): pick one with --port",
                listed.join(", ")
            )))
        }
    }
}

/// Every node's slices from its annotations, leaving out `excluded` (the
/// peers an agent rejected: it does not take their slices either). An
/// annotation that does not parse as a CIDR of its family is left out, as
/// the agents leave out such a node.
fn node_slices(nodes: &[Node], excluded: &[&str]) -> NodeSlices {
    let mut slices = NodeSlices::new();
    for node in nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        if excluded.contains(&name) {
            continue;
        }
        let annotations = node.metadata.annotations.as_ref();
        let mut nets = Vec::new();
        let mut valid = true;
        for family in [IpFamily::V4, IpFamily::V6] {
            let Some(text) = annotations.and_then(|a| a.get(pod_cidr_key(family))) else {
                continue;
            };
            match text.parse() {
                Ok(net) if IpFamily::of(&net) == family => nets.push(net),
                _ => valid = false,
            }
        }
        if valid {
            slices.insert(name.to_string(), nets);
        }
    }
    slices
}

/// What the cluster's policy objects come to, as every agent reads them.
struct PolicyInputs {
    pods: Vec<PodRecord>,
    namespaces: Vec<NamespaceRecord>,
    policies: Vec<PolicyRecord>,
}

/// Answers `request` from `readings`.
pub fn judge(readings: &Readings, request: &TraceRequest) -> Result<Trace> {
    let ends = resolve(readings, request)?;
    let mut warnings = ends.notes.clone();
    let mut policies = Vec::new();
    for policy in &readings.policies {
        match PolicyRecord::of(policy) {
            Ok(record) => policies.push(record),
            Err(refused) => warnings.push(format!(
                "{refused}; neither this trace nor the agents enforce it: fix the field and apply it again"
            )),
        }
    }
    let inputs = PolicyInputs {
        pods: readings.pods.iter().filter_map(PodRecord::of).collect(),
        namespaces: readings
            .namespaces
            .iter()
            .filter_map(NamespaceRecord::of)
            .collect(),
        policies,
    };
    let egress = side(
        readings,
        &inputs,
        &ends,
        Direction::Egress,
        &ends.source_node,
        &mut warnings,
    );
    let ingress = match (&ends.destination, &ends.destination_node) {
        (Some(_), Some(node)) => side(
            readings,
            &inputs,
            &ends,
            Direction::Ingress,
            node,
            &mut warnings,
        ),
        _ => None,
    };
    let path = path(readings, &ends, &mut warnings);
    let allowed = [&egress, &ingress]
        .into_iter()
        .flatten()
        .all(|side| side.allows);
    Ok(Trace {
        source: End {
            pod: Some(ends.source.to_string()),
            ip: ends.source_ip,
            node: Some(ends.source_node.clone()),
        },
        destination: End {
            pod: ends.destination.as_ref().map(PodRef::to_string),
            ip: ends.destination_ip,
            node: ends.destination_node.clone(),
        },
        protocol: ends.protocol.as_str().to_ascii_uppercase(),
        port: ends.port,
        allowed,
        policy: PolicyVerdict { egress, ingress },
        path,
        warnings,
    })
}

/// The status document of `node`'s agent, when it answered.
fn status_of<'a>(readings: &'a Readings, node: &str) -> Option<&'a AgentStatus> {
    readings.agents.get(node)?.reading.status.as_ref().ok()
}

/// One end's verdict as `node`'s agent would reach it: the pods screened
/// with the slices that agent takes, explained, and the plan compiled for
/// the node. None when the end is no pod policy sees on that node.
fn side(
    readings: &Readings,
    inputs: &PolicyInputs,
    ends: &Ends,
    direction: Direction,
    node: &str,
    warnings: &mut Vec<String>,
) -> Option<PolicySide> {
    let status = status_of(readings, node);
    let rejected: Vec<&str> = status
        .iter()
        .flat_map(|s| &s.peers.rejected)
        .map(|peer| peer.node.as_str())
        .collect();
    let screened = screen_pod_addresses(
        inputs.pods.clone(),
        &node_slices(&readings.nodes, &rejected),
    );
    // An address this agent sets aside changes its verdict, whichever end
    // it is.
    let ends_traced = [
        Some((&ends.source, ends.source_ip)),
        ends.destination
            .as_ref()
            .map(|name| (name, ends.destination_ip)),
    ];
    for refusal in screened
        .rejected
        .iter()
        .filter(|r| ends_traced.iter().flatten().any(|end| concerns(r, *end)))
    {
        let warning = format!("{refusal}; to the agent on {node} it is no pod's address");
        if !warnings.contains(&warning) {
            warnings.push(warning);
        }
    }
    let record = |(name, ip): (&PodRef, IpAddr)| {
        screened.pods.iter().find(|pod| {
            pod.namespace == name.namespace
                && pod.name == name.name
                && (pod.ips.contains(&ip) || pod.withheld.contains(&ip))
        })
    };
    let query = Query {
        source_pod: record((&ends.source, ends.source_ip)),
        source_ip: ends.source_ip,
        destination_pod: ends
            .destination
            .as_ref()
            .and_then(|name| record((name, ends.destination_ip))),
        destination_ip: ends.destination_ip,
        protocol: ends.protocol,
        port: ends.port,
    };
    let verdict = explain(&screened.pods, &inputs.namespaces, &inputs.policies, &query);
    let side = match direction {
        Direction::Egress => verdict.egress,
        Direction::Ingress => verdict.ingress,
    }?;
    let expected =
        compile(node, &screened.pods, &inputs.namespaces, &inputs.policies).fingerprint();
    let enforced = enforced_fingerprint(readings, node, warnings);
    if let Some(enforced) = enforced.as_deref().filter(|e| *e != expected) {
        let synced = status
            .and_then(|s| s.policy.as_ref()?.last_sync.as_ref())
            .map_or("it has not synced yet".to_string(), |last| {
                format!(
                    "it has not synced since {} (that sync: {})",
                    last.at, last.result
                )
            });
        let warning = format!(
            "agent on {node} enforces an older policy plan (fingerprint {enforced}, expected {expected}): {synced}; see its logs{}",
            logs_hint(readings, node)
        );
        // Both ends on one node: one plan, one warning.
        if !warnings.contains(&warning) {
            warnings.push(warning);
        }
    }
    Some(policy_side(
        readings, node, direction, side, enforced, expected,
    ))
}

/// Whether `refusal` is about the address traced at `end`.
fn concerns(refusal: &RejectedAddress, (name, ip): (&PodRef, IpAddr)) -> bool {
    refusal.namespace == name.namespace && refusal.name == name.name && refusal.ip == ip
}

/// The fingerprint `node`'s agent reports enforcing, with a warning when
/// there is none.
fn enforced_fingerprint(
    readings: &Readings,
    node: &str,
    warnings: &mut Vec<String>,
) -> Option<String> {
    let agent = readings.agents.get(node);
    let status = match agent.map(|a| &a.reading.status) {
        Some(Ok(status)) => status,
        Some(Err(error)) => {
            warnings.push(format!(
                "could not read the agent on {node}{}: {error}; what it enforces is unknown (`kubectl weft status` shows why)",
                agent_name(agent)
            ));
            return None;
        }
        None => return None,
    };
    let policy = status.policy.as_ref().filter(|p| p.enabled);
    match policy {
        None => warnings.push(format!(
            "agent on {node} does not enforce NetworkPolicy: traffic there passes whatever the policies say; enable policy in the agent's settings"
        )),
        Some(policy) if policy.fingerprint.is_none() => warnings.push(format!(
            "agent on {node} reports no policy fingerprint (no sync yet, or an agent older than this plugin); see its logs{}",
            logs_hint(readings, node)
        )),
        Some(_) => {}
    }
    policy.and_then(|p| p.fingerprint.clone())
}

fn agent_name(agent: Option<&NodeAgent>) -> String {
    agent
        .and_then(|a| a.pod.as_deref())
        .map(|pod| format!(" ({pod})"))
        .unwrap_or_default()
}

/// `: kubectl logs -n NS POD` for `node`'s agent, when its pod is known.
fn logs_hint(readings: &Readings, node: &str) -> String {
    readings
        .agents
        .get(node)
        .and_then(|a| a.pod.as_deref())
        .map(|pod| format!(": kubectl logs -n {} {pod}", readings.namespace))
        .unwrap_or_default()
}

fn policy_side(
    readings: &Readings,
    node: &str,
    direction: Direction,
    side: SideVerdict,
    enforced: Option<String>,
    expected: String,
) -> PolicySide {
    let admitted_by = side
        .admitted_by
        .iter()
        .map(|admission| Admission {
            policy: admission.policy.to_string(),
            rule: admission.rule,
            peer: admission.peer,
            port: admission.port,
            text: admission_text(&readings.policies, direction, admission),
        })
        .collect();
    PolicySide {
        node: node.to_string(),
        allows: side.allows(),
        isolating: side.isolating.iter().map(ToString::to_string).collect(),
        admitted_by,
        withheld: side.withheld,
        fingerprint_matches: enforced.as_deref() == Some(expected.as_str()),
        enforced_fingerprint: enforced,
        expected_fingerprint: expected,
    }
}

/// The path: nothing to hold on one node or out of the pod network;
/// otherwise what each node holds toward the other.
fn path(readings: &Readings, ends: &Ends, warnings: &mut Vec<String>) -> Path {
    let backend = [Some(&ends.source_node), ends.destination_node.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|node| status_of(readings, node))
        .map(|status| status.backend.clone());
    let same_node = ends.destination_node.as_deref() == Some(ends.source_node.as_str());
    let leaves_cluster = !ends.in_pod_network;
    let hops = match &ends.destination_node {
        Some(destination) if !same_node && !leaves_cluster => vec![
            hop(readings, &ends.source_node, destination, warnings),
            hop(readings, destination, &ends.source_node, warnings),
        ],
        _ => Vec::new(),
    };
    let complete = hops
        .iter()
        .all(|hop| hop.state == "accepted" && hop.entries.iter().all(|e| e.held));
    Path {
        same_node,
        backend,
        complete,
        leaves_cluster,
        hops,
    }
}

/// What `node` holds toward `peer`, with a warning for each gap.
fn hop(readings: &Readings, node: &str, peer: &str, warnings: &mut Vec<String>) -> Hop {
    let agent = readings.agents.get(node);
    let listed = match agent.map(|a| (&a.reading.status, &a.reading.kernel_refused)) {
        Some((Ok(status), None)) => status
            .kernel
            .as_ref()
            .and_then(|k| k.peer.clone())
            .ok_or_else(|| "it did not list them (an agent older than this plugin?)".to_string()),
        Some((Ok(_), Some(refusal))) => Err(format!("it refused the kernel check: {refusal}")),
        Some((Err(error), _)) => Err(format!("its /status could not be read: {error}")),
        None => Err("it was not asked".to_string()),
    };
    let entries = match listed {
        Ok(entries) => entries,
        Err(why) => {
            warnings.push(format!(
                "entries on {node} toward {peer} are unknown: {why}; `kubectl weft status` shows the agent's state"
            ));
            return Hop {
                node: node.to_string(),
                toward: peer.to_string(),
                state: "unknown".to_string(),
                reason: Some(why),
                entries: Vec::new(),
            };
        }
    };
    if entries.state != "accepted" {
        let reason = entries.reason.as_deref().unwrap_or("no reason given");
        warnings.push(format!(
            "agent on {node} has not accepted {peer} as a peer ({}: {reason}): it programs no entries toward it; `kubectl weft status` names the fix",
            entries.state
        ));
    }
    for entry in entries.entries.iter().filter(|e| !e.held) {
        let kind = entry.entry.split_whitespace().next().unwrap_or("entry");
        warnings.push(format!(
            "{kind} missing on {node}: {}: the agent will repair it at the next resync; `kubectl weft status` shows drift",
            entry.entry
        ));
    }
    Hop {
        node: node.to_string(),
        toward: peer.to_string(),
        state: entries.state,
        reason: entries.reason,
        entries: entries.entries,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::PortSpec;
    use super::*;
    use crate::observe::AgentReading;

    fn pod(name: &str, app: &str, node: &str, ip: &str, ports: &[u16]) -> Pod {
        let ports: Vec<Value> = ports.iter().map(|p| json!({"containerPort": p})).collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": app, "ports": ports}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    fn node(name: &str, slice: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"weft.dev/pod-cidr": slice}}
        }))
        .unwrap()
    }

    /// An agent on `node` that rejected `rejected` and enforces `fingerprint`.
    fn agent(node: &str, rejected: &[&str], fingerprint: &str) -> NodeAgent {
        let rejected: Vec<Value> = rejected
            .iter()
            .map(|n| json!({"node": n, "field": "weft.dev/pod-cidr", "reason": "overlaps"}))
            .collect();
        let status = serde_json::from_value(json!({
            "build": {"version": "0.1.0", "commit": "test"},
            "node": node, "backend": "host-gw", "readiness": {"ready": true},
            "peers": {"rejected": rejected},
            "policy": {"enabled": true, "fingerprint": fingerprint},
        }))
        .unwrap();
        NodeAgent {
            pod: Some(format!("weft-agent-{node}")),
            reading: AgentReading {
                status: Ok(status),
                kernel_refused: None,
            },
        }
    }

    fn readings(pods: Vec<Pod>) -> Readings {
        Readings {
            namespace: "kube-system".into(),
            pods,
            nodes: vec![node("a", "10.244.1.0/24"), node("c", "10.244.3.0/24")],
            ..Readings::default()
        }
    }

    fn request(destination: &str, port: Option<u16>) -> TraceRequest {
        TraceRequest {
            source: PodRef::parse("shop/client", "default"),
            destination: Target::parse(destination, "shop"),
            port: port.map(|port| PortSpec {
                port,
                protocol: Protocol::Tcp,
            }),
        }
    }

    fn message(error: Error) -> String {
        error.to_string()
    }

    #[test]
    fn the_port_is_the_destinations_only_one_or_must_be_given() {
        let readings = readings(vec![
            pod("client", "client", "a", "10.244.1.5", &[]),
            pod("web", "web", "c", "10.244.3.7", &[80]),
            pod("multi", "multi", "c", "10.244.3.8", &[80, 443]),
        ]);
        let ends = resolve(&readings, &request("web", None)).unwrap();
        assert_eq!((ends.protocol, ends.port), (Protocol::Tcp, 80));
        assert_eq!(ends.destination_node.as_deref(), Some("c"));
        let several = message(resolve(&readings, &request("multi", None)).unwrap_err());
        assert!(
            several.contains("several ports (80/tcp, 443/tcp): pick one with --port"),
            "{several}"
        );
        let none = message(resolve(&readings, &request("client", None)).unwrap_err());
        assert!(none.contains("declares no container port"), "{none}");
        let address = message(resolve(&readings, &request("192.0.2.1", None)).unwrap_err());
        assert!(address.contains("--port"), "{address}");
        let missing = message(resolve(&readings, &request("nobody", Some(80))).unwrap_err());
        assert!(missing.contains("pod shop/nobody not found"), "{missing}");
    }

    #[test]
    fn an_address_two_pods_claim_is_traced_as_an_address() {
        let readings = readings(vec![
            pod("client", "client", "a", "10.244.1.5", &[]),
            pod("web", "web", "c", "10.244.3.7", &[80]),
            pod("liar", "liar", "c", "10.244.3.7", &[80]),
        ]);
        let ends = resolve(&readings, &request("10.244.3.7", Some(80))).unwrap();
        assert_eq!(ends.destination, None);
        assert_eq!(ends.destination_node.as_deref(), Some("c"));
        assert!(ends.notes[0].starts_with("pods shop/liar, shop/web all claim 10.244.3.7"));
    }

    #[test]
    fn a_host_network_destination_has_no_ingress_and_no_overlay_path() {
        let mut host = pod("host", "host", "c", "192.168.0.3", &[9100]);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let readings = Readings {
            agents: [("a".to_string(), agent("a", &[], "x"))].into(),
            ..readings(vec![pod("client", "client", "a", "10.244.1.5", &[]), host])
        };
        let trace = judge(&readings, &request("host", None)).unwrap();
        assert_eq!(trace.destination.pod.as_deref(), Some("shop/host"));
        assert_eq!(trace.destination.node.as_deref(), Some("c"));
        assert_eq!(trace.port, 9100);
        assert!(trace.policy.ingress.is_none());
        assert!(trace.path.leaves_cluster && trace.path.hops.is_empty());
        assert_eq!(trace.path.backend.as_deref(), Some("host-gw"));
    }

    #[test]
    fn a_peer_the_agent_rejected_gives_no_pod_addresses_to_its_policy() {
        // node-a's agent rejected c: to it, web's address is no pod's, so
        // the egress rule naming app=web does not admit it.
        let policy: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_json::from_value(json!({
                "metadata": {"namespace": "shop", "name": "to-web"},
                "spec": {"podSelector": {"matchLabels": {"app": "client"}},
                         "policyTypes": ["Egress"],
                         "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}
            }))
            .unwrap();
        let pods = vec![
            pod("client", "client", "a", "10.244.1.5", &[]),
            pod("web", "web", "c", "10.244.3.7", &[80]),
        ];
        let trusting = Readings {
            policies: vec![policy],
            agents: [("a".to_string(), agent("a", &[], "x"))].into(),
            ..readings(pods)
        };
        let egress = |readings: &Readings| {
            judge(readings, &request("web", None))
                .unwrap()
                .policy
                .egress
                .unwrap()
        };
        let admitted = egress(&trusting);
        assert!(admitted.allows);
        assert_eq!(admitted.admitted_by[0].peer, Some(0));
        assert!(!admitted.fingerprint_matches);

        let wary = Readings {
            agents: [("a".to_string(), agent("a", &["c"], "x"))].into(),
            ..trusting.clone()
        };
        let refused = egress(&wary);
        assert!(!refused.allows && refused.admitted_by.is_empty());
        assert_ne!(refused.expected_fingerprint, admitted.expected_fingerprint);
        let trace = judge(&wary, &request("web", None)).unwrap();
        assert!(
            trace.warnings.iter().any(|w| w.contains(
                "pod shop/web claims 10.244.3.7 in status.podIPs, but its node c has no pod slice known"
            )),
            "{:#?}",
            trace.warnings
        );
    }
}
