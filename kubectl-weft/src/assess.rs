//! Judging an [`Observation`]: a row per node and every warning, each naming
//! the nodes and the fix. Pure: no I/O, no clock (the observation carries
//! its own time), so every warning has a unit test.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use weft_core::annotations::{BACKEND_TYPE, POD_CIDR, POD_CIDR_V6, PUBLIC_IP};
use weft_core::status::{AgentStatus, ControllerStatus, FamilyUsage, PolicyStatus};

use crate::observe::{
    Observation, Presence, AGENT_DAEMON_SET, CONTROLLER_DEPLOYMENT, WRITE_POLICY,
};
use crate::report::{
    names, AgentCell, ControllerReplica, ControllerSummary, KernelDrift, NodeRow, PeerCounts,
    PolicyCell, Report, Warning, WarningKind,
};

/// Where the plugin's address store keeps one file per address (the CNI
/// plugin's default `dataDir` and network name).
const PLUGIN_STORE: &str = "/var/lib/cni/networks/weft";
/// How many kernel entries a drift warning quotes.
const ENTRIES_SHOWN: usize = 3;
/// How many names a skew warning lists per version.
const HOLDERS_SHOWN: usize = 5;

/// The report on `observation`.
pub fn assess(observation: &Observation) -> Report {
    let mut judge = Judge {
        namespace: &observation.namespace,
        warnings: Vec::new(),
    };
    let controller = judge.controller(observation);
    let leader_document = leader_document(observation);
    let untouched: HashMap<&str, &str> = leader_document
        .iter()
        .flat_map(|doc| &doc.untouched)
        .map(|u| (u.node.as_str(), u.reason.as_str()))
        .collect();
    let dual_stack = controller
        .families
        .iter()
        .any(|family| family.cluster_cidr.contains(':'));

    let with_slice = observation
        .nodes
        .iter()
        .filter(|node| !node_slices(node).is_empty())
        .count();
    let agent_pods = agent_pod_per_node(&observation.agent_pods);
    let mut nodes: Vec<&Node> = observation.nodes.iter().collect();
    nodes.sort_by_key(|node| node.name_any());

    let mut versions: Vec<(String, Holder)> = Vec::new();
    let mut mtus: Vec<(u32, Holder)> = Vec::new();
    let mut rejections: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
    let mut rows = Vec::with_capacity(nodes.len());
    for node in nodes {
        let name = node.name_any();
        let slices = node_slices(node);
        judge.slices(
            node,
            &name,
            dual_stack,
            untouched.get(name.as_str()).copied(),
        );
        judge.pod_cidrs(node, &name);
        let expected = with_slice - usize::from(!slices.is_empty());
        let mut row = NodeRow {
            name: name.clone(),
            slices,
            backend: annotation(node, BACKEND_TYPE).map(str::to_string),
            public_ip: annotation(node, PUBLIC_IP).map(str::to_string),
            agent: AgentCell {
                pod: None,
                state: None,
                ready: false,
                version: None,
                status_error: None,
            },
            peers: None,
            kernel: None,
            policy: None,
            leak_suspects: None,
            mtu: None,
        };
        let Some(pod) = agent_pods.get(name.as_str()) else {
            judge.no_agent_pod(&name, &observation.agent_daemon_set);
            rows.push(row);
            continue;
        };
        let pod_name = pod.name_any();
        let health = pod_health(pod);
        row.agent.pod = Some(pod_name.clone());
        row.agent.state = Some(health.state.clone());
        row.agent.ready = health.ready;
        if health.state != "Running" {
            judge.agent_not_running(&name, &pod_name, &health);
            rows.push(row);
            continue;
        }
        let reading = observation.agents.get(&pod_name);
        let document = match reading.map(|r| &r.status) {
            Some(Ok(document)) => document,
            failed => {
                let error = match failed {
                    Some(Err(error)) => error.clone(),
                    _ => "the pod declares no port to read it from".to_string(),
                };
                if !health.ready {
                    judge.agent_not_ready(&name, &pod_name, health.detail.as_deref());
                }
                judge.agent_unreachable(&name, &pod_name, &error);
                row.agent.status_error = Some(error);
                rows.push(row);
                continue;
            }
        };
        row.agent.ready = document.readiness.ready;
        row.agent.version = Some(document.build.version.clone());
        row.backend = Some(document.backend.clone());
        row.mtu = document.mtu;
        row.peers = Some(PeerCounts {
            accepted: document.peers.accepted.len(),
            expected,
            rejected: document.peers.rejected.len(),
            held: document.peers.held.len(),
        });
        row.kernel = document.kernel.as_ref().map(|kernel| KernelDrift {
            missing: kernel.missing.len(),
            excess: kernel.excess.len(),
            tables_changed: kernel.tables_changed.len(),
        });
        row.policy = document
            .policy
            .as_ref()
            .map(|policy| policy_cell(policy, observation.now));
        row.leak_suspects = document.ipam.as_ref().map(|ipam| ipam.leak_suspects.len());

        versions.push((document.build.version.clone(), Holder::node(&name)));
        if let Some(mtu) = document.mtu {
            mtus.push((mtu, Holder::node(&name)));
        }
        for rejected in &document.peers.rejected {
            rejections
                .entry((
                    rejected.node.clone(),
                    rejected.field.clone(),
                    rejected.reason.clone(),
                ))
                .or_default()
                .push(name.clone());
        }
        judge.agent_document(&name, &pod_name, document);
        rows.push(row);
    }

    if observation.agent_daemon_set == Presence::Absent {
        judge.warn(
            WarningKind::NoAgent,
            Vec::new(),
            format!(
                "no DaemonSet {AGENT_DAEMON_SET} in namespace {}",
                observation.namespace
            ),
            judge.install_fix(),
        );
    }
    judge.peer_rejections(rejections);
    for replica in &controller.replicas {
        if let Some(version) = &replica.version {
            versions.push((version.clone(), Holder::controller(&replica.pod)));
        }
    }
    judge.version_skew(&versions);
    judge.mtu_differs(&mtus);
    judge.exhaustion(&controller.families);
    judge.write_policy(observation);

    let warnings = group(judge.warnings);
    Report {
        healthy: warnings.is_empty(),
        nodes: rows,
        controller,
        warnings,
    }
}

/// The leader's `/status`, or any replica's when none leads.
fn leader_document(observation: &Observation) -> Option<&ControllerStatus> {
    let mut pods: Vec<&String> = observation.controllers.keys().collect();
    pods.sort();
    let documents: Vec<&ControllerStatus> = pods
        .into_iter()
        .filter_map(|pod| observation.controllers[pod].as_ref().ok())
        .collect();
    documents
        .iter()
        .find(|doc| doc.leading)
        .or_else(|| documents.first())
        .copied()
}

/// A Node's annotation, when set and not empty.
fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
        .filter(|value| !value.is_empty())
}

/// A Node's slices, IPv4 first.
fn node_slices(node: &Node) -> Vec<String> {
    [POD_CIDR, POD_CIDR_V6]
        .into_iter()
        .filter_map(|key| annotation(node, key))
        .map(str::to_string)
        .collect()
}

/// The node a pod is bound to, or, for a DaemonSet pod not yet scheduled,
/// the node its required affinity names.
fn pod_node(pod: &Pod) -> Option<&str> {
    let spec = pod.spec.as_ref()?;
    if let Some(node) = spec.node_name.as_deref() {
        return Some(node);
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|term| term.match_fields.iter().flatten())
        .find(|field| field.key == "metadata.name" && field.operator == "In")
        .and_then(|field| field.values.as_ref()?.first())
        .map(String::as_str)
}

/// One agent pod per node: during a rolling update a node briefly has two,
/// and the one that is not terminating, running and ready is the one to judge.
fn agent_pod_per_node(pods: &[Pod]) -> HashMap<&str, &Pod> {
    let rank = |pod: &Pod| {
        let health = pod_health(pod);
        (
            pod.metadata.deletion_timestamp.is_none(),
            health.state == "Running",
            health.ready,
        )
    };
    let mut chosen: HashMap<&str, &Pod> = HashMap::new();
    for pod in pods {
        let Some(node) = pod_node(pod) else { continue };
        match chosen.get(node) {
            Some(current) if rank(current) >= rank(pod) => {}
            _ => {
                chosen.insert(node, pod);
            }
        }
    }
    chosen
}

/// What the pod's status says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodHealth {
    /// `Running`, or the first reason it is not: a container's waiting or
    /// terminated reason (`CrashLoopBackOff`), `Terminating`, or the phase.
    state: String,
    /// The Ready condition.
    ready: bool,
    /// A longer why, when the status gives one.
    detail: Option<String>,
}

fn pod_health(pod: &Pod) -> PodHealth {
    let status = pod.status.clone().unwrap_or_default();
    let conditions = status.conditions.unwrap_or_default();
    let condition = |kind: &str| conditions.iter().find(|c| c.type_ == kind);
    let ready = condition("Ready").is_some_and(|c| c.status == "True");
    let containers = status.container_statuses.unwrap_or_default();
    let waiting = containers
        .iter()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find(|w| w.reason.is_some());
    let terminated = containers
        .iter()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .next();
    let phase = status.phase.unwrap_or_else(|| "Unknown".to_string());
    let state = if pod.metadata.deletion_timestamp.is_some() {
        "Terminating".to_string()
    } else if let Some(reason) = waiting.and_then(|w| w.reason.clone()) {
        reason
    } else if let Some(reason) = terminated.and_then(|t| t.reason.clone()) {
        reason
    } else {
        phase
    };
    let unscheduled = condition("PodScheduled")
        .filter(|c| c.status == "False")
        .and_then(|c| c.message.clone());
    let detail = waiting
        .and_then(|w| w.message.clone())
        .or(unscheduled)
        .or_else(|| {
            condition("Ready")
                .filter(|c| c.status != "True")
                .and_then(|c| c.message.clone())
        });
    PodHealth {
        state,
        ready,
        detail,
    }
}

fn policy_cell(policy: &PolicyStatus, now: Timestamp) -> PolicyCell {
    let sync_age_seconds = policy
        .last_sync
        .as_ref()
        .and_then(|sync| sync.at.parse::<Timestamp>().ok())
        .map(|at| u64::try_from(now.duration_since(at).as_secs()).unwrap_or(0));
    PolicyCell {
        enabled: policy.enabled,
        sync_age_seconds,
    }
}

/// Who holds a value (a version, an MTU): a node's agent or a controller.
#[derive(Debug, Clone)]
struct Holder {
    label: String,
    node: Option<String>,
}

impl Holder {
    fn node(name: &str) -> Self {
        Holder {
            label: name.to_string(),
            node: Some(name.to_string()),
        }
    }

    fn controller(pod: &str) -> Self {
        Holder {
            label: format!("controller {pod}"),
            node: None,
        }
    }
}

/// When holders disagree: each value with its holders, most held first, and
/// the nodes that do not hold the most common value.
fn disagreement<V: Ord + Display + Clone>(values: &[(V, Holder)]) -> Option<(String, Vec<String>)> {
    let mut by_value: BTreeMap<V, Vec<&Holder>> = BTreeMap::new();
    for (value, holder) in values {
        by_value.entry(value.clone()).or_default().push(holder);
    }
    if by_value.len() < 2 {
        return None;
    }
    let mut groups: Vec<(V, Vec<&Holder>)> = by_value.into_iter().collect();
    // Most holders first; equal counts by value, so the text is stable.
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
    let text = groups
        .iter()
        .map(|(value, holders)| {
            let labels: Vec<String> = holders.iter().map(|h| h.label.clone()).collect();
            format!("{value} on {}", names(&labels, HOLDERS_SHOWN))
        })
        .collect::<Vec<_>>()
        .join("; ");
    let minority = groups[1..]
        .iter()
        .flat_map(|(_, holders)| holders.iter().filter_map(|h| h.node.clone()))
        .collect();
    Some((text, minority))
}

/// Merges warnings that differ only in their nodes, and orders them by kind.
fn group(warnings: Vec<Warning>) -> Vec<Warning> {
    let mut merged: Vec<Warning> = Vec::new();
    let mut index: HashMap<(WarningKind, String, String), usize> = HashMap::new();
    for warning in warnings {
        let key = (warning.kind, warning.problem.clone(), warning.fix.clone());
        match index.get(&key) {
            Some(&at) => merged[at].nodes.extend(warning.nodes),
            None => {
                index.insert(key, merged.len());
                merged.push(warning);
            }
        }
    }
    merged.sort_by_key(|warning| warning.kind);
    merged
}

/// Collects warnings; knows the namespace the fixes name.
struct Judge<'a> {
    namespace: &'a str,
    warnings: Vec<Warning>,
}

impl Judge<'_> {
    fn warn(&mut self, kind: WarningKind, nodes: Vec<String>, problem: String, fix: String) {
        self.warnings.push(Warning {
            kind,
            nodes,
            problem,
            fix,
        });
    }

    fn warn_node(&mut self, kind: WarningKind, node: &str, problem: String, fix: String) {
        self.warn(kind, vec![node.to_string()], problem, fix);
    }

    fn logs(&self, pod: &str) -> String {
        format!("kubectl -n {} logs {pod}", self.namespace)
    }

    fn install_fix(&self) -> String {
        "install Weft (kubectl apply -f manifests/weft.yaml, or the chart), or pass -n with the namespace it is installed in".to_string()
    }

    fn slices(&mut self, node: &Node, name: &str, dual_stack: bool, untouched: Option<&str>) {
        let mut unset = Vec::new();
        if annotation(node, POD_CIDR).is_none() {
            unset.push(POD_CIDR);
        }
        if dual_stack && annotation(node, POD_CIDR_V6).is_none() {
            unset.push(POD_CIDR_V6);
        }
        let again = format!(
            "correct Node {name} as the reason says; the controller looks again at every change of the Node"
        );
        let (kind, problem, fix) = match (unset.is_empty(), untouched) {
            (true, None) => return,
            (true, Some(reason)) => (
                WarningKind::NodeUntouched,
                format!("the controller leaves the Node alone: {reason}"),
                again,
            ),
            (false, Some(reason)) => (
                WarningKind::NoSlice,
                format!("no slice ({} unset): the controller leaves the Node alone: {reason}", unset.join(", ")),
                again,
            ),
            (false, None) => (
                WarningKind::NoSlice,
                format!("no slice ({} unset): its pods cannot start", unset.join(", ")),
                format!(
                    "the controller hands out slices within seconds of a Node joining: see why not with kubectl -n {} logs deployment/{CONTROLLER_DEPLOYMENT}",
                    self.namespace
                ),
            ),
        };
        self.warn_node(kind, name, problem, fix);
    }

    /// A spec.podCIDR that Weft's annotations do not account for: someone
    /// else allocates pod CIDRs, and pods may get addresses outside the
    /// node's slice.
    fn pod_cidrs(&mut self, node: &Node, name: &str) {
        let Some(spec) = node.spec.as_ref() else {
            return;
        };
        let mut cidrs: Vec<&String> = spec.pod_cidrs.iter().flatten().collect();
        if cidrs.is_empty() {
            cidrs.extend(spec.pod_cidr.as_ref());
        }
        let fix = "run kube-controller-manager with --allocate-node-cidrs=false (kubeadm: controllerManager.extraArgs): Weft allocates pod CIDRs".to_string();
        for cidr in cidrs {
            let key = if cidr.contains(':') {
                POD_CIDR_V6
            } else {
                POD_CIDR
            };
            match annotation(node, key) {
                None => self.warn_node(
                    WarningKind::PodCidrConflict,
                    name,
                    format!("spec.podCIDR is set but {key} is not: something else (kube-controller-manager) allocates pod CIDRs"),
                    fix.clone(),
                ),
                Some(slice) if slice != cidr => self.warn_node(
                    WarningKind::PodCidrConflict,
                    name,
                    format!("spec.podCIDRs holds {cidr} but {key} is {slice}: pods may get addresses outside the node's slice"),
                    format!("{fix}; then delete and re-register Node {name}, whose spec.podCIDR cannot change"),
                ),
                Some(_) => {}
            }
        }
    }

    fn no_agent_pod(&mut self, name: &str, daemon_set: &Presence) {
        let fix = match daemon_set {
            Presence::Absent => self.install_fix(),
            _ => format!(
                "kubectl -n {} describe daemonset {AGENT_DAEMON_SET}: its nodeSelector or tolerations (chart values agent.nodeSelector, agent.tolerations) may keep it off the node",
                self.namespace
            ),
        };
        self.warn_node(WarningKind::NoAgent, name, "no agent pod".to_string(), fix);
    }

    fn agent_not_running(&mut self, name: &str, pod: &str, health: &PodHealth) {
        let detail = health
            .detail
            .as_deref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        self.warn_node(
            WarningKind::AgentNotRunning,
            name,
            format!("agent {pod} is {}{detail}", health.state),
            format!(
                "kubectl -n {} describe pod {pod}; {} --previous",
                self.namespace,
                self.logs(pod)
            ),
        );
    }

    fn agent_not_ready(&mut self, name: &str, pod: &str, reason: Option<&str>) {
        let reason = reason.map(|r| format!(": {r}")).unwrap_or_default();
        self.warn_node(
            WarningKind::AgentNotReady,
            name,
            format!("agent {pod} is not ready{reason}"),
            self.logs(pod),
        );
    }

    fn agent_unreachable(&mut self, name: &str, pod: &str, error: &str) {
        self.warn_node(
            WarningKind::AgentUnreachable,
            name,
            format!("agent {pod} did not answer /status through the API server: {error}"),
            format!(
                "check that the API server reaches the agent's metrics port on the node, and {}",
                self.logs(pod)
            ),
        );
    }

    /// Warnings from one agent's own document.
    fn agent_document(&mut self, name: &str, pod: &str, document: &AgentStatus) {
        if !document.readiness.ready {
            self.agent_not_ready(name, pod, document.readiness.reason.as_deref());
        }
        for held in &document.peers.held {
            let retry = held
                .retry_in_ms
                .map(|ms| format!(" (next try in {} s)", ms.div_ceil(1000)))
                .unwrap_or_default();
            self.warn_node(
                WarningKind::PeerHeld,
                name,
                format!("entries for peer {} are held back: {}{retry}", held.node, held.reason),
                format!("the agent retries by itself; if it persists, remove what holds the route on node {name}, and see {}", self.logs(pod)),
            );
        }
        if let Some(kernel) = document.kernel.as_ref().filter(|k| !k.is_clean()) {
            let mut parts = Vec::new();
            if !kernel.missing.is_empty() {
                parts.push(format!("lacks {}", names(&kernel.missing, ENTRIES_SHOWN)));
            }
            if !kernel.excess.is_empty() {
                parts.push(format!(
                    "holds extra {}",
                    names(&kernel.excess, ENTRIES_SHOWN)
                ));
            }
            if !kernel.tables_changed.is_empty() {
                parts.push(format!(
                    "has changed nft tables {}",
                    kernel.tables_changed.join(", ")
                ));
            }
            self.warn_node(
                WarningKind::KernelDrift,
                name,
                format!("the kernel differs from what the agent wants: it {}", parts.join("; ")),
                format!("the agent repairs drift at its next resync (agent.resyncSeconds); if it returns, find what else edits the node's routes, neighbours, FDB or nft tables, and see {}", self.logs(pod)),
            );
        }
        if let Some(reconcile) = document
            .last_reconcile
            .as_ref()
            .filter(|r| r.result != "ok")
        {
            self.warn_node(
                WarningKind::ReconcileFailed,
                name,
                format!("the last reconcile failed: {}", reconcile.result),
                self.logs(pod),
            );
        }
        if let Some(policy) = document.policy.as_ref().filter(|p| p.enabled) {
            if let Some(sync) = policy.last_sync.as_ref().filter(|s| s.result != "ok") {
                self.warn_node(
                    WarningKind::PolicySyncFailed,
                    name,
                    format!("the last NetworkPolicy sync failed: {}", sync.result),
                    self.logs(pod),
                );
            }
            for refused in &policy.refused {
                self.warn_node(
                    WarningKind::PolicyRefused,
                    name,
                    format!(
                        "NetworkPolicy {} is not enforced: {}: {}",
                        refused.policy, refused.field, refused.reason
                    ),
                    format!(
                        "correct {} of NetworkPolicy {}",
                        refused.field, refused.policy
                    ),
                );
            }
        }
        if let Some(ipam) = document
            .ipam
            .as_ref()
            .filter(|i| !i.leak_suspects.is_empty())
        {
            self.warn_node(
                WarningKind::LeakSuspects,
                name,
                format!(
                    "the plugin's store holds addresses no pod on the node has: {}",
                    names(&ipam.leak_suspects, ENTRIES_SHOWN)
                ),
                format!("if no pod on node {name} uses them, delete their files from {PLUGIN_STORE}/ on the node (kubectl weft status -o json lists all)"),
            );
        }
    }

    fn peer_rejections(&mut self, rejections: BTreeMap<(String, String, String), Vec<String>>) {
        for ((peer, field, reason), reporters) in rejections {
            let by = if reporters.len() == 1 {
                "agent"
            } else {
                "agents"
            };
            self.warn_node(
                WarningKind::PeerRejected,
                &peer,
                format!("{field} rejected by the {by} on {}: {reason}", names(&reporters, HOLDERS_SHOWN)),
                format!("check {field} of Node {peer} (kubectl get node {peer} -o yaml); delete the Node if it is not a member of the cluster"),
            );
        }
    }

    fn version_skew(&mut self, versions: &[(String, Holder)]) {
        if let Some((text, minority)) = disagreement(versions) {
            self.warn(
                WarningKind::VersionSkew,
                minority,
                format!("Weft's components run different versions: {text}"),
                format!(
                    "finish the rollout so all run one version: kubectl -n {} rollout status daemonset/{AGENT_DAEMON_SET} deployment/{CONTROLLER_DEPLOYMENT}",
                    self.namespace
                ),
            );
        }
    }

    fn mtu_differs(&mut self, mtus: &[(u32, Holder)]) {
        if let Some((text, minority)) = disagreement(mtus) {
            self.warn(
                WarningKind::MtuDiffers,
                minority,
                format!("agents give pods different MTUs: {text}; large packets between them are dropped"),
                "give every node's underlay the same MTU, or set one MTU for all (chart value agent.mtu)".to_string(),
            );
        }
    }

    fn exhaustion(&mut self, families: &[FamilyUsage]) {
        for family in families {
            let total = family.used + family.free;
            if total > 0 && family.used * 10 > total * 9 {
                self.warn(
                    WarningKind::CidrExhausted,
                    Vec::new(),
                    format!(
                        "cluster CIDR {} is {}% used ({} of {total} slices): Nodes beyond it get no slice",
                        family.cluster_cidr,
                        family.used * 100 / total,
                        family.used
                    ),
                    "delete the Nodes that are gone to free their slices, or plan a larger cluster CIDR or smaller slices (chart values clusterCidr, controller.sliceSizeV4/V6)".to_string(),
                );
            }
        }
    }

    fn write_policy(&mut self, observation: &Observation) {
        let policy = &observation.write_policy;
        let objects = [
            ("ValidatingAdmissionPolicy", &policy.policy),
            ("ValidatingAdmissionPolicyBinding", &policy.binding),
        ];
        let absent: Vec<String> = objects
            .iter()
            .filter(|(_, presence)| **presence == Presence::Absent)
            .map(|(kind, _)| format!("{kind} {WRITE_POLICY}"))
            .collect();
        if !absent.is_empty() {
            self.warn(
                WarningKind::WritePolicyMissing,
                Vec::new(),
                format!(
                    "the node write policy is incomplete: no {}, so one node's credentials can rewrite other Nodes' slices and addresses",
                    absent.join(" and no ")
                ),
                "re-apply manifests/weft.yaml, or the chart with nodeWritePolicy.enabled=true (Kubernetes 1.30+)".to_string(),
            );
        }
        for (kind, presence) in objects {
            if let Presence::Unknown(error) = presence {
                self.warn(
                    WarningKind::WritePolicyMissing,
                    Vec::new(),
                    format!("cannot tell whether {kind} {WRITE_POLICY} exists: {error}"),
                    "read it with the weft-operator ClusterRole (chart value operatorRole.create)"
                        .to_string(),
                );
            }
        }
    }

    /// The controller's replicas, and warnings about them.
    fn controller(&mut self, observation: &Observation) -> ControllerSummary {
        let namespace = observation.namespace.as_str();
        let mut pods: Vec<&Pod> = observation.controller_pods.iter().collect();
        pods.sort_by_key(|pod| pod.name_any());
        if pods.is_empty() {
            let (problem, fix) = match observation.controller_deployment {
                Presence::Absent => (
                    format!("no Deployment {CONTROLLER_DEPLOYMENT} in namespace {namespace}: no Node gets a slice"),
                    self.install_fix(),
                ),
                _ => (
                    format!("Deployment {CONTROLLER_DEPLOYMENT} has no pods: no Node gets a slice"),
                    format!("kubectl -n {namespace} describe deployment {CONTROLLER_DEPLOYMENT}"),
                ),
            };
            self.warn(WarningKind::NoController, Vec::new(), problem, fix);
        }
        let mut replicas = Vec::new();
        for pod in pods {
            let name = pod.name_any();
            let health = pod_health(pod);
            let document = observation.controllers.get(&name);
            let detail = health
                .detail
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            if health.state != "Running" {
                self.warn(
                    WarningKind::ControllerNotReady,
                    Vec::new(),
                    format!("controller {name} is {}{detail}", health.state),
                    format!(
                        "kubectl -n {namespace} describe pod {name}; {} --previous",
                        self.logs(&name)
                    ),
                );
            } else if !health.ready {
                self.warn(
                    WarningKind::ControllerNotReady,
                    Vec::new(),
                    format!("controller {name} is not ready{detail}"),
                    self.logs(&name),
                );
            }
            if let Some(Err(error)) = document {
                self.warn(
                    WarningKind::ControllerUnreachable,
                    Vec::new(),
                    format!(
                        "controller {name} did not answer /status through the API server: {error}"
                    ),
                    format!(
                        "check that the API server reaches the controller's metrics port, and {}",
                        self.logs(&name)
                    ),
                );
            }
            let status = document.and_then(|d| d.as_ref().ok());
            replicas.push(ControllerReplica {
                node: pod_node(pod).map(str::to_string),
                state: health.state,
                ready: health.ready,
                version: status.map(|s| s.build.version.clone()),
                leading: status.is_some_and(|s| s.leading),
                status_error: document.and_then(|d| d.as_ref().err().cloned()),
                pod: name,
            });
        }
        let documents: Vec<&ControllerStatus> = observation
            .controllers
            .values()
            .filter_map(|d| d.as_ref().ok())
            .collect();
        let leader = documents
            .iter()
            .find(|doc| doc.leading)
            .map(|doc| doc.identity.clone());
        if !documents.is_empty() && leader.is_none() {
            let seen = documents
                .iter()
                .find_map(|doc| doc.leader.clone())
                .map(|holder| format!(" (the Lease names {holder})"))
                .unwrap_or_default();
            self.warn(
                WarningKind::NoLeader,
                Vec::new(),
                format!("no controller replica leads{seen}: new Nodes get no slice"),
                format!("kubectl -n {namespace} logs deployment/{CONTROLLER_DEPLOYMENT}"),
            );
        }
        let families = leader_document(observation)
            .map(|doc| doc.families.clone())
            .unwrap_or_default();
        ControllerSummary {
            leader,
            replicas,
            families,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{AgentReading, WritePolicy};
    use k8s_openapi::api::core::v1::{
        Affinity, ContainerState, ContainerStateWaiting, ContainerStatus, NodeAffinity,
        NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, NodeSpec, PodCondition, PodSpec,
        PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use weft_core::status::{
        Build, HeldPeer, IpamStatus, KernelCheck, LastRun, Peers, Readiness, Reconcile,
        RefusedPolicy, RejectedPeer, UntouchedNode,
    };

    const NOW: &str = "2025-01-01T12:00:00Z";

    fn node(name: &str, slice: Option<&str>) -> Node {
        let mut annotations = BTreeMap::new();
        if let Some(slice) = slice {
            annotations.insert(POD_CIDR.to_string(), slice.to_string());
            annotations.insert(PUBLIC_IP.to_string(), "192.168.0.1".to_string());
            annotations.insert(BACKEND_TYPE.to_string(), "vxlan".to_string());
        }
        Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    fn with_pod_cidr(mut node: Node, cidr: &str) -> Node {
        node.spec = Some(NodeSpec {
            pod_cidr: Some(cidr.to_string()),
            pod_cidrs: Some(vec![cidr.to_string()]),
            ..NodeSpec::default()
        });
        node
    }

    fn pod(name: &str, node: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_string()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".to_string()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_string(),
                    status: if ready { "True" } else { "False" }.to_string(),
                    message: (!ready)
                        .then(|| "containers with unready status: [agent]".to_string()),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn agent_pod_name(node: &str) -> String {
        format!("weft-agent-{node}")
    }

    fn agent_status(node: &str, peers: &[&str]) -> AgentStatus {
        AgentStatus {
            build: Build {
                version: "0.1.0".into(),
                commit: "abc".into(),
            },
            node: node.into(),
            backend: "vxlan".into(),
            slices: vec![],
            mtu: Some(1450),
            underlay: None,
            vtep_mac: None,
            readiness: Readiness {
                ready: true,
                reason: None,
            },
            peers: Peers {
                accepted: peers.iter().map(|p| p.to_string()).collect(),
                ..Peers::default()
            },
            last_reconcile: Some(Reconcile {
                at: NOW.into(),
                duration_ms: 3,
                result: "ok".into(),
                repaired_at_last_resync: 0,
            }),
            policy: Some(PolicyStatus {
                enabled: true,
                last_sync: Some(LastRun {
                    at: "2025-01-01T11:59:30Z".into(),
                    result: "ok".into(),
                }),
                ..PolicyStatus::default()
            }),
            ipam: Some(IpamStatus {
                allocated: 4,
                leak_suspects: vec![],
            }),
            kernel: Some(KernelCheck::default()),
            dump: None,
        }
    }

    fn controller_status(pod: &str, leading: bool) -> ControllerStatus {
        ControllerStatus {
            build: Build {
                version: "0.1.0".into(),
                commit: "abc".into(),
            },
            identity: pod.into(),
            leading,
            leader: Some("weft-controller-a".into()),
            families: vec![FamilyUsage {
                cluster_cidr: "10.244.0.0/16".into(),
                used: 3,
                free: 253,
            }],
            untouched: vec![],
        }
    }

    /// A healthy three-node cluster: every node with a slice and a ready
    /// agent, one leading controller, the write policy in place.
    fn healthy() -> Observation {
        let names = ["a", "b", "c"];
        let nodes = names
            .iter()
            .enumerate()
            .map(|(i, n)| node(n, Some(&format!("10.244.{i}.0/24"))))
            .collect();
        let agent_pods = names
            .iter()
            .map(|n| pod(&agent_pod_name(n), n, true))
            .collect();
        let agents = names
            .iter()
            .map(|n| {
                let peers: Vec<&str> = names.iter().copied().filter(|p| p != n).collect();
                (
                    agent_pod_name(n),
                    AgentReading {
                        status: Ok(agent_status(n, &peers)),
                        kernel_refused: None,
                    },
                )
            })
            .collect();
        Observation {
            namespace: "kube-system".into(),
            now: NOW.parse().unwrap(),
            nodes,
            agent_daemon_set: Presence::Present,
            agent_pods,
            agents,
            controller_deployment: Presence::Present,
            controller_pods: vec![pod("weft-controller-a", "a", true)],
            controllers: [(
                "weft-controller-a".to_string(),
                Ok(controller_status("weft-controller-a", true)),
            )]
            .into(),
            write_policy: WritePolicy {
                policy: Presence::Present,
                binding: Presence::Present,
            },
        }
    }

    fn agent_mut<'a>(observation: &'a mut Observation, node: &str) -> &'a mut AgentStatus {
        observation
            .agents
            .get_mut(&agent_pod_name(node))
            .unwrap()
            .status
            .as_mut()
            .unwrap()
    }

    fn controller_mut(observation: &mut Observation) -> &mut ControllerStatus {
        observation
            .controllers
            .get_mut("weft-controller-a")
            .unwrap()
            .as_mut()
            .unwrap()
    }

    fn warnings_of(report: &Report, kind: WarningKind) -> Vec<&Warning> {
        report.warnings.iter().filter(|w| w.kind == kind).collect()
    }

    /// The one warning of `kind`, and that there is no other kind.
    fn only(report: &Report, kind: WarningKind) -> Warning {
        let kinds: Vec<WarningKind> = report.warnings.iter().map(|w| w.kind).collect();
        assert!(
            kinds.iter().all(|k| *k == kind),
            "unexpected warnings: {:#?}",
            report.warnings
        );
        let found = warnings_of(report, kind);
        assert_eq!(found.len(), 1, "{:#?}", report.warnings);
        found[0].clone()
    }

    #[test]
    fn a_healthy_cluster_has_no_warnings_and_a_full_row_per_node() {
        let report = assess(&healthy());
        assert!(report.healthy, "{:#?}", report.warnings);
        assert_eq!(report.exit_code(), 0);
        assert_eq!(report.nodes.len(), 3);
        let a = &report.nodes[0];
        assert_eq!(a.name, "a");
        assert_eq!(a.slices, ["10.244.0.0/24"]);
        assert_eq!(a.public_ip.as_deref(), Some("192.168.0.1"));
        assert_eq!(a.agent.version.as_deref(), Some("0.1.0"));
        assert!(a.agent.ready);
        assert_eq!(
            a.peers,
            Some(PeerCounts {
                accepted: 2,
                expected: 2,
                rejected: 0,
                held: 0
            })
        );
        assert_eq!(a.kernel.map(|k| k.missing + k.excess), Some(0));
        assert_eq!(
            a.policy,
            Some(PolicyCell {
                enabled: true,
                sync_age_seconds: Some(30)
            })
        );
        assert_eq!(a.leak_suspects, Some(0));
        assert_eq!(
            report.controller.leader.as_deref(),
            Some("weft-controller-a")
        );
        assert!(report.table().contains("No warnings."));
    }

    #[test]
    fn a_node_without_a_slice_is_named_and_not_expected_as_a_peer() {
        let mut observation = healthy();
        observation.nodes.push(node("d", None));
        let report = assess(&observation);
        let warnings = warnings_of(&report, WarningKind::NoSlice);
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].nodes, ["d"]);
        assert!(warnings[0].problem.contains("weft.dev/pod-cidr unset"));
        assert!(warnings[0].fix.contains("logs deployment/weft-controller"));
        assert_eq!(report.nodes[0].peers.unwrap().expected, 2);
        assert_eq!(report.exit_code(), 1);
    }

    #[test]
    fn the_controllers_reason_for_leaving_a_node_alone_is_shown() {
        let mut observation = healthy();
        observation.nodes.push(node("d", None));
        controller_mut(&mut observation).untouched = vec![
            UntouchedNode {
                node: "d".into(),
                reason: "annotation weft.dev/pod-cidr is not a CIDR".into(),
            },
            UntouchedNode {
                node: "a".into(),
                reason: "slice outside the cluster CIDR".into(),
            },
        ];
        let report = assess(&observation);
        let no_slice = &warnings_of(&report, WarningKind::NoSlice)[0];
        assert!(no_slice.problem.contains("is not a CIDR"), "{no_slice:?}");
        let untouched = &warnings_of(&report, WarningKind::NodeUntouched)[0];
        assert_eq!(untouched.nodes, ["a"]);
        assert!(untouched.problem.contains("outside the cluster CIDR"));
    }

    #[test]
    fn a_dual_stack_cluster_wants_an_ipv6_slice_too() {
        let mut observation = healthy();
        controller_mut(&mut observation).families.push(FamilyUsage {
            cluster_cidr: "fd00:10:244::/56".into(),
            used: 2,
            free: 254,
        });
        let mut b = node("b", Some("10.244.1.0/24"));
        b.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(POD_CIDR_V6.into(), "fd00:10:244:1::/64".into());
        observation.nodes[1] = b;
        let report = assess(&observation);
        let warning = &warnings_of(&report, WarningKind::NoSlice)[0];
        assert_eq!(warning.nodes, ["a", "c"]);
        assert!(warning.problem.contains("weft.dev/pod-cidr-v6 unset"));
        assert_eq!(
            report.nodes[1].slices,
            ["10.244.1.0/24", "fd00:10:244:1::/64"]
        );
    }

    #[test]
    fn kube_controller_manager_allocating_pod_cidrs_is_caught() {
        let mut observation = healthy();
        observation.nodes[0] = with_pod_cidr(node("a", Some("10.244.0.0/24")), "10.244.0.0/24");
        observation.nodes[1] = with_pod_cidr(node("b", Some("10.244.1.0/24")), "10.244.9.0/24");
        observation
            .nodes
            .push(with_pod_cidr(node("d", None), "10.244.7.0/24"));
        let report = assess(&observation);
        let conflicts = warnings_of(&report, WarningKind::PodCidrConflict);
        assert_eq!(conflicts.len(), 2, "{conflicts:#?}");
        let differing = conflicts.iter().find(|w| w.nodes == ["b"]).unwrap();
        assert!(
            differing.problem.contains("10.244.9.0/24")
                && differing.problem.contains("10.244.1.0/24")
        );
        let unannotated = conflicts.iter().find(|w| w.nodes == ["d"]).unwrap();
        assert!(unannotated.problem.contains("kube-controller-manager"));
        assert!(unannotated.fix.contains("--allocate-node-cidrs=false"));
    }

    #[test]
    fn nodes_without_an_agent_pod_share_one_warning() {
        let mut observation = healthy();
        observation
            .agent_pods
            .retain(|p| p.name_any() == agent_pod_name("a"));
        let report = assess(&observation);
        let warning = only(&report, WarningKind::NoAgent);
        assert_eq!(warning.nodes, ["b", "c"]);
        assert_eq!(warning.problem, "no agent pod");
        assert!(warning.fix.contains("describe daemonset weft-agent"));
        assert_eq!(report.nodes[1].agent.describe(), "no pod");
    }

    #[test]
    fn a_missing_daemon_set_says_to_install_weft() {
        let mut observation = healthy();
        observation.agent_daemon_set = Presence::Absent;
        observation.agent_pods.clear();
        let report = assess(&observation);
        let warnings = warnings_of(&report, WarningKind::NoAgent);
        assert_eq!(warnings.len(), 2);
        assert!(warnings
            .iter()
            .all(|w| w.fix.contains("kubectl apply -f manifests/weft.yaml")));
        assert!(warnings.iter().any(|w| w.nodes.is_empty()
            && w.problem
                .contains("no DaemonSet weft-agent in namespace kube-system")));
    }

    #[test]
    fn an_agent_that_is_not_running_is_named_with_its_reason() {
        let mut observation = healthy();
        let crashing = &mut observation.agent_pods[1];
        let status = crashing.status.as_mut().unwrap();
        status.container_statuses = Some(vec![ContainerStatus {
            name: "agent".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    message: Some("back-off 5m0s restarting failed container".into()),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        let report = assess(&observation);
        let warning = only(&report, WarningKind::AgentNotRunning);
        assert_eq!(warning.nodes, ["b"]);
        assert!(warning
            .problem
            .contains("weft-agent-b is CrashLoopBackOff: back-off"));
        assert!(warning.fix.contains("logs weft-agent-b --previous"));
        assert_eq!(report.nodes[1].agent.describe(), "CrashLoopBackOff");
    }

    #[test]
    fn an_unscheduled_agent_is_found_by_its_affinity() {
        let mut observation = healthy();
        let pending = &mut observation.agent_pods[2];
        let spec = pending.spec.as_mut().unwrap();
        spec.node_name = None;
        spec.affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_fields: Some(vec![NodeSelectorRequirement {
                            key: "metadata.name".into(),
                            operator: "In".into(),
                            values: Some(vec!["c".into()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
                ..NodeAffinity::default()
            }),
            ..Affinity::default()
        });
        pending.status = Some(PodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                message: Some("0/3 nodes are available: 1 Insufficient memory".into()),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        let report = assess(&observation);
        let warning = only(&report, WarningKind::AgentNotRunning);
        assert_eq!(warning.nodes, ["c"]);
        assert!(
            warning
                .problem
                .contains("is Pending: 0/3 nodes are available"),
            "{warning:?}"
        );
    }

    #[test]
    fn during_a_rolling_update_the_running_pod_is_judged() {
        let mut observation = healthy();
        let mut old = pod("weft-agent-old", "a", false);
        old.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(NOW.parse().unwrap()),
        );
        observation.agent_pods.insert(0, old);
        let report = assess(&observation);
        assert!(report.healthy, "{:#?}", report.warnings);
        assert_eq!(report.nodes[0].agent.pod.as_deref(), Some("weft-agent-a"));
    }

    #[test]
    fn an_agent_not_ready_gives_its_own_reason() {
        let mut observation = healthy();
        agent_mut(&mut observation, "c").readiness = Readiness {
            ready: false,
            reason: Some("waiting for the node's slice".into()),
        };
        let report = assess(&observation);
        let warning = only(&report, WarningKind::AgentNotReady);
        assert_eq!(warning.nodes, ["c"]);
        assert!(warning
            .problem
            .ends_with("not ready: waiting for the node's slice"));
        assert_eq!(warning.fix, "kubectl -n kube-system logs weft-agent-c");
    }

    #[test]
    fn an_unreachable_agent_is_named_and_its_pods_readiness_shown() {
        let mut observation = healthy();
        observation.agent_pods[0] = pod(&agent_pod_name("a"), "a", false);
        observation
            .agents
            .get_mut(&agent_pod_name("a"))
            .unwrap()
            .status = Err("no answer within 5 s".into());
        let report = assess(&observation);
        let unreachable = &warnings_of(&report, WarningKind::AgentUnreachable)[0];
        assert_eq!(unreachable.nodes, ["a"]);
        assert!(unreachable.problem.contains("no answer within 5 s"));
        let not_ready = &warnings_of(&report, WarningKind::AgentNotReady)[0];
        assert!(not_ready.problem.contains("containers with unready status"));
        assert_eq!(report.nodes[0].agent.describe(), "not-ready ?");
        assert!(report.nodes[0].peers.is_none());
    }

    #[test]
    fn version_skew_names_the_nodes_off_the_common_version() {
        let mut observation = healthy();
        agent_mut(&mut observation, "b").build.version = "0.2.0".into();
        let report = assess(&observation);
        let warning = only(&report, WarningKind::VersionSkew);
        assert_eq!(warning.nodes, ["b"]);
        assert!(
            warning
                .problem
                .contains("0.1.0 on a, c, controller weft-controller-a; 0.2.0 on b"),
            "{}",
            warning.problem
        );
        assert!(warning.fix.contains("rollout status"));
    }

    #[test]
    fn a_controller_on_another_version_is_skew_too() {
        let mut observation = healthy();
        controller_mut(&mut observation).build.version = "0.0.9".into();
        let report = assess(&observation);
        let warning = only(&report, WarningKind::VersionSkew);
        assert!(warning.nodes.is_empty());
        assert!(warning
            .problem
            .contains("0.0.9 on controller weft-controller-a"));
    }

    #[test]
    fn a_peer_rejected_by_several_agents_is_one_warning_naming_it() {
        let mut observation = healthy();
        let rejected = RejectedPeer {
            node: "evil".into(),
            field: PUBLIC_IP.into(),
            reason: "public IP 192.168.0.1 is also claimed by node a".into(),
        };
        for n in ["a", "b"] {
            agent_mut(&mut observation, n)
                .peers
                .rejected
                .push(rejected.clone());
        }
        let report = assess(&observation);
        let warning = only(&report, WarningKind::PeerRejected);
        assert_eq!(warning.nodes, ["evil"]);
        assert!(warning
            .problem
            .contains("rejected by the agents on a, b: public IP 192.168.0.1"));
        assert!(warning.fix.contains("kubectl get node evil -o yaml"));
        assert_eq!(report.nodes[0].peers.unwrap().rejected, 1);
    }

    #[test]
    fn a_held_peer_is_named_with_its_retry() {
        let mut observation = healthy();
        agent_mut(&mut observation, "a").peers.held.push(HeldPeer {
            node: "b".into(),
            reason: "route 10.244.1.0/24 is held by protocol static".into(),
            retry_in_ms: Some(1500),
        });
        let report = assess(&observation);
        let warning = only(&report, WarningKind::PeerHeld);
        assert_eq!(warning.nodes, ["a"]);
        assert!(warning.problem.contains("peer b are held back: route 10.244.1.0/24 is held by protocol static (next try in 2 s)"));
    }

    #[test]
    fn differing_mtus_name_the_odd_node() {
        let mut observation = healthy();
        agent_mut(&mut observation, "c").mtu = Some(1400);
        let report = assess(&observation);
        let warning = only(&report, WarningKind::MtuDiffers);
        assert_eq!(warning.nodes, ["c"]);
        assert!(warning.problem.contains("1450 on a, b; 1400 on c"));
    }

    #[test]
    fn kernel_drift_quotes_the_entries() {
        let mut observation = healthy();
        agent_mut(&mut observation, "b").kernel = Some(KernelCheck {
            missing: vec!["route 10.244.2.0/24 via 10.244.2.0 dev weft.1".into()],
            excess: vec![],
            tables_changed: vec!["inet weft-policy".into()],
            ..KernelCheck::default()
        });
        let report = assess(&observation);
        let warning = only(&report, WarningKind::KernelDrift);
        assert_eq!(warning.nodes, ["b"]);
        assert!(warning.problem.contains("lacks route 10.244.2.0/24 via 10.244.2.0 dev weft.1; has changed nft tables inet weft-policy"));
        assert_eq!(report.nodes[1].kernel.unwrap().missing, 1);
    }

    #[test]
    fn a_refused_kernel_check_shows_no_drift_column() {
        let mut observation = healthy();
        let reading = observation.agents.get_mut(&agent_pod_name("a")).unwrap();
        reading.kernel_refused = Some("not set up yet".into());
        reading.status.as_mut().unwrap().kernel = None;
        let report = assess(&observation);
        assert!(report.healthy);
        assert_eq!(report.nodes[0].kernel, None);
    }

    #[test]
    fn failed_reconciles_and_policy_syncs_are_warned() {
        let mut observation = healthy();
        let a = agent_mut(&mut observation, "a");
        a.last_reconcile.as_mut().unwrap().result = "netlink: permission denied".into();
        let policy = a.policy.as_mut().unwrap();
        policy.last_sync.as_mut().unwrap().result = "nft: syntax error".into();
        policy.refused.push(RefusedPolicy {
            policy: "default/deny".into(),
            field: "spec.ingress[0].ports[0].endPort".into(),
            reason: "endPort below port".into(),
        });
        agent_mut(&mut observation, "b")
            .policy
            .as_mut()
            .unwrap()
            .refused = observation.agents[&agent_pod_name("a")]
            .status
            .as_ref()
            .unwrap()
            .policy
            .as_ref()
            .unwrap()
            .refused
            .clone();
        let report = assess(&observation);
        assert_eq!(
            warnings_of(&report, WarningKind::ReconcileFailed)[0].nodes,
            ["a"]
        );
        assert!(warnings_of(&report, WarningKind::PolicySyncFailed)[0]
            .problem
            .contains("nft: syntax error"));
        let refused = &warnings_of(&report, WarningKind::PolicyRefused)[0];
        assert_eq!(refused.nodes, ["a", "b"]);
        assert!(refused
            .fix
            .contains("spec.ingress[0].ports[0].endPort of NetworkPolicy default/deny"));
    }

    #[test]
    fn leak_suspects_name_the_store() {
        let mut observation = healthy();
        agent_mut(&mut observation, "c")
            .ipam
            .as_mut()
            .unwrap()
            .leak_suspects = vec!["10.244.2.9".into()];
        let report = assess(&observation);
        let warning = only(&report, WarningKind::LeakSuspects);
        assert_eq!(warning.nodes, ["c"]);
        assert!(warning.problem.contains("10.244.2.9"));
        assert!(warning.fix.contains("/var/lib/cni/networks/weft/"));
        assert_eq!(report.nodes[2].leak_suspects, Some(1));
    }

    #[test]
    fn a_nearly_exhausted_cluster_cidr_is_warned_above_ninety_percent() {
        let mut observation = healthy();
        controller_mut(&mut observation).families[0] = FamilyUsage {
            cluster_cidr: "10.244.0.0/16".into(),
            used: 90,
            free: 10,
        };
        assert!(assess(&observation).healthy);
        controller_mut(&mut observation).families[0].used = 91;
        controller_mut(&mut observation).families[0].free = 9;
        let report = assess(&observation);
        let warning = only(&report, WarningKind::CidrExhausted);
        assert!(warning
            .problem
            .contains("10.244.0.0/16 is 91% used (91 of 100 slices)"));
    }

    #[test]
    fn a_missing_write_policy_or_binding_is_warned() {
        let mut observation = healthy();
        observation.write_policy.binding = Presence::Absent;
        let warning = only(&assess(&observation), WarningKind::WritePolicyMissing);
        assert!(warning
            .problem
            .contains("no ValidatingAdmissionPolicyBinding weft-node-writers"));
        observation.write_policy.policy = Presence::Absent;
        let warning = only(&assess(&observation), WarningKind::WritePolicyMissing);
        assert!(warning.problem.contains("no ValidatingAdmissionPolicy weft-node-writers and no ValidatingAdmissionPolicyBinding"));
        observation.write_policy.policy = Presence::Unknown("forbidden".into());
        observation.write_policy.binding = Presence::Present;
        let warning = only(&assess(&observation), WarningKind::WritePolicyMissing);
        assert!(warning.problem.contains("cannot tell") && warning.fix.contains("weft-operator"));
    }

    #[test]
    fn a_missing_controller_is_warned() {
        let mut observation = healthy();
        observation.controller_pods.clear();
        observation.controllers.clear();
        let warning = only(&assess(&observation), WarningKind::NoController);
        assert!(warning.fix.contains("describe deployment weft-controller"));
        observation.controller_deployment = Presence::Absent;
        let warning = only(&assess(&observation), WarningKind::NoController);
        assert!(warning
            .problem
            .contains("no Deployment weft-controller in namespace kube-system"));
    }

    #[test]
    fn a_controller_not_ready_or_unreachable_is_warned() {
        let mut observation = healthy();
        observation.controller_pods[0] = pod("weft-controller-a", "a", false);
        observation.controllers.insert(
            "weft-controller-a".into(),
            Err("HTTP 503: connection refused".into()),
        );
        let report = assess(&observation);
        assert_eq!(
            warnings_of(&report, WarningKind::ControllerNotReady).len(),
            1
        );
        let unreachable = &warnings_of(&report, WarningKind::ControllerUnreachable)[0];
        assert!(unreachable.problem.contains("HTTP 503"));
        assert_eq!(
            report.controller.replicas[0].status_error.as_deref(),
            Some("HTTP 503: connection refused")
        );
    }

    #[test]
    fn no_leading_replica_is_warned_with_the_leases_holder() {
        let mut observation = healthy();
        controller_mut(&mut observation).leading = false;
        controller_mut(&mut observation).leader = Some("weft-controller-gone".into());
        let report = assess(&observation);
        let warning = only(&report, WarningKind::NoLeader);
        assert!(warning
            .problem
            .contains("(the Lease names weft-controller-gone)"));
        assert_eq!(report.controller.leader, None);
        // The families still come from a replica.
        assert_eq!(report.controller.families.len(), 1);
    }

    #[test]
    fn the_table_shows_rows_the_leader_and_fixes() {
        let mut observation = healthy();
        observation.nodes.push(node("d", None));
        let table = assess(&observation).table();
        assert!(table.starts_with("NODE   SLICES"), "{table}");
        assert!(table.contains("ready 0.1.0"), "{table}");
        assert!(table.contains("2/2"), "{table}");
        assert!(
            table.contains("Controller leader: weft-controller-a"),
            "{table}"
        );
        assert!(table.contains("- node d: no slice"), "{table}");
        assert!(table.contains("  fix: "), "{table}");
    }

    #[test]
    fn the_json_report_spells_kinds_for_scripts() {
        let mut observation = healthy();
        observation.nodes.push(node("d", None));
        let json = serde_json::to_value(assess(&observation)).unwrap();
        assert_eq!(json["healthy"], false);
        assert_eq!(json["warnings"][0]["kind"], "no-slice");
        assert_eq!(json["warnings"][0]["nodes"][0], "d");
        assert_eq!(json["nodes"][0]["peers"]["expected"], 2);
        assert_eq!(json["nodes"][0]["agent"]["version"], "0.1.0");
    }
}
