//! The report `status` prints: a row per node, the controller, and the
//! warnings, as a table for people or JSON (`-o json`) for scripts.

use std::fmt::Write as _;

use serde::Serialize;
use weft_core::status::FamilyUsage;

/// What `kubectl weft status` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// True when there is no warning.
    pub healthy: bool,
    /// One row per Node, by name.
    pub nodes: Vec<NodeRow>,
    /// The controller's replicas and what the leader reports.
    pub controller: ControllerSummary,
    /// Everything that needs an operator, each with its fix.
    pub warnings: Vec<Warning>,
}

/// One Node as its annotations and its agent describe it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    /// The Node's name.
    pub name: String,
    /// Its slices (`weft.dev/pod-cidr`, `weft.dev/pod-cidr-v6`).
    pub slices: Vec<String>,
    /// The backend, as the agent reports it or else as annotated.
    pub backend: Option<String>,
    /// `weft.dev/public-ip`.
    pub public_ip: Option<String>,
    /// The node's agent.
    pub agent: AgentCell,
    /// What the agent made of its peers; none without a status document.
    pub peers: Option<PeerCounts>,
    /// The kernel check; none when it did not run.
    pub kernel: Option<KernelDrift>,
    /// NetworkPolicy: none without a status document.
    pub policy: Option<PolicyCell>,
    /// Addresses in the plugin's store that no pod on the node has.
    pub leak_suspects: Option<usize>,
    /// The MTU the agent gives pods.
    pub mtu: Option<u32>,
}

/// The agent of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCell {
    /// Its pod; none when no agent pod is bound to the node.
    pub pod: Option<String>,
    /// `Running`, or why not (`Pending`, `CrashLoopBackOff`, ...).
    pub state: Option<String>,
    /// Ready: by its `/status` when it answered, else by the pod's Ready condition.
    pub ready: bool,
    /// The agent's version, from its `/status`.
    pub version: Option<String>,
    /// Why its `/status` could not be read.
    pub status_error: Option<String>,
}

/// Peer counts of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerCounts {
    /// Peers whose entries the agent programs.
    pub accepted: usize,
    /// Nodes with a slice, other than this one.
    pub expected: usize,
    /// Peers the agent's screen rejected.
    pub rejected: usize,
    /// Peers whose entries are held back.
    pub held: usize,
}

/// How far the kernel is from what the agent wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelDrift {
    /// Entries the kernel lacks.
    pub missing: usize,
    /// Entries the kernel holds in excess.
    pub excess: usize,
    /// Weft nft tables changed behind the agent's back.
    pub tables_changed: usize,
}

/// NetworkPolicy on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCell {
    /// Whether the agent enforces NetworkPolicy.
    pub enabled: bool,
    /// Seconds since the last sync of the policy table; none before the first.
    pub sync_age_seconds: Option<u64>,
}

/// The controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerSummary {
    /// The replica that leads, as the replicas report it.
    pub leader: Option<String>,
    /// Each replica.
    pub replicas: Vec<ControllerReplica>,
    /// Slice use per family, as the leader (or else any replica) reports it.
    pub families: Vec<FamilyUsage>,
}

/// One controller replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerReplica {
    /// Its pod.
    pub pod: String,
    /// The node it runs on.
    pub node: Option<String>,
    /// `Running`, or why not.
    pub state: String,
    /// By the pod's Ready condition.
    pub ready: bool,
    /// Its version, from its `/status`.
    pub version: Option<String>,
    /// Whether it leads, from its `/status`.
    pub leading: bool,
    /// Why its `/status` could not be read.
    pub status_error: Option<String>,
}

/// What is wrong, with which nodes, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Warning {
    /// A stable name for scripts.
    pub kind: WarningKind,
    /// The Nodes it concerns; empty for the controller or the cluster.
    pub nodes: Vec<String>,
    /// What is wrong.
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

/// The kinds of warning, as `-o json` spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WarningKind {
    /// A Node lacks a slice.
    NoSlice,
    /// Something besides Weft (kube-controller-manager) sets pod CIDRs.
    PodCidrConflict,
    /// The agent DaemonSet is missing, or a node has no agent pod.
    NoAgent,
    /// An agent pod is not running.
    AgentNotRunning,
    /// An agent is not ready.
    AgentNotReady,
    /// An agent's `/status` did not answer.
    AgentUnreachable,
    /// Components run different versions.
    VersionSkew,
    /// An agent rejected a peer.
    PeerRejected,
    /// An agent holds a peer's entries back.
    PeerHeld,
    /// Agents give pods different MTUs.
    MtuDiffers,
    /// The kernel differs from what an agent wants.
    KernelDrift,
    /// An agent's last reconcile failed.
    ReconcileFailed,
    /// An agent's last NetworkPolicy sync failed.
    PolicySyncFailed,
    /// An agent refused a NetworkPolicy.
    PolicyRefused,
    /// Addresses in a node's plugin store belong to no pod.
    LeakSuspects,
    /// The controller Deployment or its pods are missing.
    NoController,
    /// A controller replica is not running or not ready.
    ControllerNotReady,
    /// A controller's `/status` did not answer.
    ControllerUnreachable,
    /// No controller replica leads.
    NoLeader,
    /// The controller leaves a Node alone.
    NodeUntouched,
    /// A cluster CIDR is nearly out of slices.
    CidrExhausted,
    /// The node write policy or its binding is missing.
    WritePolicyMissing,
}

/// How many node names a warning's table line shows before "and N more".
const NAMES_SHOWN: usize = 8;

impl Report {
    /// The exit status: 0 healthy, 1 with warnings.
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.healthy)
    }

    /// The report as kubectl prints a table: the nodes, the controller,
    /// then the warnings with their fixes.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let header = [
            "NODE",
            "SLICES",
            "BACKEND",
            "PUBLIC-IP",
            "AGENT",
            "PEERS",
            "REJECTED",
            "HELD",
            "KERNEL",
            "POLICY-SYNC",
            "LEAKS",
        ];
        let rows: Vec<Vec<String>> = self.nodes.iter().map(NodeRow::cells).collect();
        write_table(&mut out, &header, &rows);

        out.push('\n');
        let leader = self.controller.leader.as_deref().unwrap_or("none");
        let _ = writeln!(out, "Controller leader: {leader}");
        for replica in &self.controller.replicas {
            let _ = writeln!(out, "  {}", replica.describe());
        }
        for family in &self.controller.families {
            let _ = writeln!(
                out,
                "  {}: {} slices used, {} free",
                family.cluster_cidr, family.used, family.free
            );
        }

        out.push('\n');
        if self.warnings.is_empty() {
            out.push_str("No warnings.\n");
        } else {
            let _ = writeln!(out, "Warnings ({}):", self.warnings.len());
            for warning in &self.warnings {
                let _ = writeln!(out, "- {}", warning.headline());
                let _ = writeln!(out, "  fix: {}", warning.fix);
            }
        }
        out
    }
}

impl NodeRow {
    fn cells(&self) -> Vec<String> {
        let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_string());
        let slices = if self.slices.is_empty() {
            "none".to_string()
        } else {
            self.slices.join(",")
        };
        vec![
            self.name.clone(),
            slices,
            or_dash(self.backend.clone()),
            or_dash(self.public_ip.clone()),
            self.agent.describe(),
            or_dash(self.peers.map(|p| format!("{}/{}", p.accepted, p.expected))),
            or_dash(self.peers.map(|p| p.rejected.to_string())),
            or_dash(self.peers.map(|p| p.held.to_string())),
            or_dash(self.kernel.map(|k| k.describe())),
            or_dash(self.policy.map(|p| p.describe())),
            or_dash(self.leak_suspects.map(|n| n.to_string())),
        ]
    }
}

impl AgentCell {
    /// The table's AGENT cell.
    pub(crate) fn describe(&self) -> String {
        match (&self.pod, self.state.as_deref()) {
            (None, _) => "no pod".to_string(),
            (Some(_), Some(state)) if state != "Running" => state.to_string(),
            _ => {
                let ready = if self.ready { "ready" } else { "not-ready" };
                match (&self.version, &self.status_error) {
                    (Some(version), _) => format!("{ready} {version}"),
                    (None, Some(_)) => format!("{ready} ?"),
                    (None, None) => ready.to_string(),
                }
            }
        }
    }
}

impl KernelDrift {
    fn describe(&self) -> String {
        if self.missing + self.excess + self.tables_changed == 0 {
            return "ok".to_string();
        }
        let mut parts = Vec::new();
        if self.missing > 0 {
            parts.push(format!("{} missing", self.missing));
        }
        if self.excess > 0 {
            parts.push(format!("{} excess", self.excess));
        }
        if self.tables_changed > 0 {
            parts.push(format!("{} table", self.tables_changed));
        }
        parts.join(",")
    }
}

impl PolicyCell {
    fn describe(&self) -> String {
        match (self.enabled, self.sync_age_seconds) {
            (false, _) => "off".to_string(),
            (true, None) => "never".to_string(),
            (true, Some(seconds)) => age(seconds),
        }
    }
}

impl ControllerReplica {
    fn describe(&self) -> String {
        let role = if self.leading { "leads" } else { "standby" };
        let on = self
            .node
            .as_deref()
            .map(|node| format!(" on {node}"))
            .unwrap_or_default();
        let version = self.version.as_deref().unwrap_or("?");
        if self.state != "Running" {
            format!("{}{on}: {}", self.pod, self.state)
        } else if let Some(error) = &self.status_error {
            format!("{}{on}: /status unreadable: {error}", self.pod)
        } else {
            let ready = if self.ready { "ready" } else { "not ready" };
            format!("{}{on}: {ready}, {role}, {version}", self.pod)
        }
    }
}

impl Warning {
    /// The warning's first line: the nodes it concerns and the problem.
    pub fn headline(&self) -> String {
        if self.nodes.is_empty() {
            return self.problem.clone();
        }
        let noun = if self.nodes.len() == 1 {
            "node"
        } else {
            "nodes"
        };
        format!(
            "{noun} {}: {}",
            names(&self.nodes, NAMES_SHOWN),
            self.problem
        )
    }
}

/// Up to `shown` names, then how many more.
pub(crate) fn names(all: &[String], shown: usize) -> String {
    let mut text = all
        .iter()
        .take(shown)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > shown {
        let _ = write!(text, " and {} more", all.len() - shown);
    }
    text
}

/// An age as kubectl prints one: `45s`, `12m`, `3h`, `5d`.
fn age(seconds: u64) -> String {
    match seconds {
        0..=119 => format!("{seconds}s"),
        120..=7199 => format!("{}m", seconds / 60),
        7200..=172_799 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// Left-aligned columns three spaces apart, as `kubectl get` prints them.
fn write_table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}   ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(3 * 3600), "3h");
        assert_eq!(age(3 * 86_400), "3d");
    }

    #[test]
    fn long_node_lists_are_cut_with_a_count() {
        let all: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        assert_eq!(names(&all[..2], 8), "n0, n1");
        assert_eq!(names(&all, 3), "n0, n1, n2 and 7 more");
    }

    #[test]
    fn columns_line_up() {
        let mut out = String::new();
        write_table(
            &mut out,
            &["A", "B", "C"],
            &[vec!["long-name".into(), "x".into(), "y".into()]],
        );
        assert_eq!(out, "A           B   C\nlong-name   x   y\n");
    }

    #[test]
    fn the_agent_cell_says_what_matters_most() {
        let mut cell = AgentCell {
            pod: None,
            state: None,
            ready: false,
            version: None,
            status_error: None,
        };
        assert_eq!(cell.describe(), "no pod");
        cell.pod = Some("weft-agent-x".into());
        cell.state = Some("CrashLoopBackOff".into());
        assert_eq!(cell.describe(), "CrashLoopBackOff");
        cell.state = Some("Running".into());
        cell.status_error = Some("no answer".into());
        assert_eq!(cell.describe(), "not-ready ?");
        cell.ready = true;
        cell.version = Some("0.1.0".into());
        assert_eq!(cell.describe(), "ready 0.1.0");
    }

    #[test]
    fn kernel_drift_reads_as_counts() {
        let clean = KernelDrift {
            missing: 0,
            excess: 0,
            tables_changed: 0,
        };
        assert_eq!(clean.describe(), "ok");
        let drift = KernelDrift {
            missing: 2,
            excess: 1,
            tables_changed: 0,
        };
        assert_eq!(drift.describe(), "2 missing,1 excess");
    }
}
