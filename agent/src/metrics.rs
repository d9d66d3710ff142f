//! The agent's Prometheus metrics, registered under `weft_agent_`.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::dataplane::ApplyReport;
use super::overlay::Operation;
use super::screen::Rejection;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    error: &'static str,
}

/// Everything the agent counts.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    peers: Gauge,
    routes: Gauge,
    skipped: Gauge,
    rejected: Family<ReasonLabel, Gauge>,
    refused: Gauge,
    route_conflicts: Gauge,
    reconcile_duration: Histogram,
    netlink_operations: Family<OperationLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    policy_rules: Family<DirectionLabel, Gauge>,
    policy_isolated_pods: Family<DirectionLabel, Gauge>,
    policy_refused: Gauge,
    policy_sync_duration: Histogram,
    policy_denied_packets: Family<DirectionLabel, Counter>,
    guard_dropped_packets: Family<ReasonLabel, Counter>,
    policy_rejected_pod_ips: Family<ReasonLabel, Gauge>,
    table_restored: Family<TableLabel, Counter>,
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = AgentMetrics {
            peers: Gauge::default(),
            routes: Gauge::default(),
            skipped: Gauge::default(),
            rejected: Family::default(),
            refused: Gauge::default(),
            route_conflicts: Gauge::default(),
            // 100 µs .. ~6 s: a no-op diff up to programming thousands of peers.
            reconcile_duration: Histogram::new(exponential_buckets(0.0001, 3.0, 11)),
            netlink_operations: Family::default(),
            errors: Family::default(),
            policy_rules: Family::default(),
            policy_isolated_pods: Family::default(),
            policy_refused: Gauge::default(),
            // 100 µs .. ~6 s: an unchanged plan up to writing the tables whole.
            policy_sync_duration: Histogram::new(exponential_buckets(0.0001, 3.0, 11)),
            policy_denied_packets: Family::default(),
            guard_dropped_packets: Family::default(),
            policy_rejected_pod_ips: Family::default(),
            table_restored: Family::default(),
        };
        let registry = registry.sub_registry_with_prefix("weft_agent");
        registry.register(
            "peers",
            "Other nodes known with a public IP",
            metrics.peers.clone(),
        );
        registry.register(
            "routes",
            "Peer slice routes in the desired state",
            metrics.routes.clone(),
        );
        registry.register(
            "skipped_peer_slices",
            "Peer slices not programmed (no VTEP MAC yet, unreachable for host-gw, conflicts)",
            metrics.skipped.clone(),
        );
        registry.register(
            "rejected_peers",
            "Peers given no kernel entries because what they publish fails a check, by reason",
            metrics.rejected.clone(),
        );
        registry.register(
            "refused_peers",
            "Peers whose entries the kernel refused, waiting for their retry",
            metrics.refused.clone(),
        );
        registry.register(
            "route_conflicts",
            "Routes Weft wants (peer slices, this node's slices) whose destination another owner's route holds: left alone, the entries that need them held",
            metrics.route_conflicts.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile: dump, diff and apply",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "netlink_operations",
            "Neighbour, FDB and route changes sent to the kernel, by operation and result",
            metrics.netlink_operations.clone(),
        );
        registry.register("errors", "Failures, by kind", metrics.errors.clone());
        registry.register(
            "policy_rules",
            "NetworkPolicy allow-set entries enforced on this node, by direction",
            metrics.policy_rules.clone(),
        );
        registry.register(
            "policy_isolated_pods",
            "Pod addresses on this node that some NetworkPolicy isolates, by direction",
            metrics.policy_isolated_pods.clone(),
        );
        registry.register(
            "policy_refused",
            "NetworkPolicies not enforced because a field is invalid",
            metrics.policy_refused.clone(),
        );
        registry.register(
            "policy_sync_duration_seconds",
            "Time from a policy input change to the tables enforcing it: compile and nft",
            metrics.policy_sync_duration.clone(),
        );
        registry.register(
            "policy_denied_packets",
            "Packets dropped by NetworkPolicy on this node, by direction (read from the table every 10 s)",
            metrics.policy_denied_packets.clone(),
        );
        registry.register(
            "guard_dropped_packets",
            "Packets the guard table dropped, by reason: spoofed (a pod's source not its own), link_local (a pod's IPv6 link-local traffic other than neighbour discovery), vxlan_stranger (VXLAN from no accepted peer, or for pods not the sender's); read from the table every resync",
            metrics.guard_dropped_packets.clone(),
        );
        registry.register(
            "policy_rejected_pod_ips",
            "Pod addresses claimed in Pod status that select nothing in NetworkPolicy, by reason",
            metrics.policy_rejected_pod_ips.clone(),
        );
        registry.register(
            "policy_table_restored",
            "Weft nftables tables restored after a change made behind the agent's back, by table",
            metrics.table_restored.clone(),
        );
        metrics
    }

    /// Records the size of the desired state.
    pub fn record_state(&self, peers: usize, routes: usize, skipped: usize) {
        self.peers.set(count(peers));
        self.routes.set(count(routes));
        self.skipped.set(count(skipped));
    }

    /// Records the peers rejected now, by reason label, and how many peers
    /// wait for a retry after the kernel refused them.
    pub fn record_rejections(
        &self,
        reasons: impl IntoIterator<Item = &'static str>,
        refused: usize,
    ) {
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for reason in reasons {
            *counts.entry(reason).or_default() += 1;
        }
        // Every reason is set, zero included, so a resolved rejection shows
        // as 0 rather than as its last count.
        for &reason in Rejection::LABELS {
            let n = counts.get(reason).copied().unwrap_or(0);
            self.rejected
                .get_or_create(&ReasonLabel { reason })
                .set(count(n));
        }
        self.refused.set(count(refused));
    }

    /// Records how many wanted routes another owner's route holds now.
    pub fn record_route_conflicts(&self, conflicts: usize) {
        self.route_conflicts.set(count(conflicts));
    }

    /// Records one reconcile's duration and kernel operations.
    pub fn record_apply(&self, seconds: f64, report: &ApplyReport) {
        self.reconcile_duration.observe(seconds);
        let count = |operation: &Operation, result: &'static str| {
            self.netlink_operations
                .get_or_create(&OperationLabel {
                    operation: operation_name(operation),
                    result,
                })
                .inc();
        };
        report.applied.iter().for_each(|op| count(op, "ok"));
        report.failed.iter().for_each(|(op, _)| count(op, "error"));
        report
            .held_back
            .iter()
            .for_each(|op| count(op, "held_back"));
        if !report.failed.is_empty() {
            self.record_error("netlink");
        }
    }

    /// Records what the policy table enforces in one `direction`
    /// (`ingress` or `egress`): its allow-set entries and isolated pods.
    pub fn record_policy_enforced(&self, direction: &'static str, rules: usize, isolated: usize) {
        let label = DirectionLabel { direction };
        self.policy_rules.get_or_create(&label).set(count(rules));
        self.policy_isolated_pods
            .get_or_create(&label)
            .set(count(isolated));
    }

    /// Records how many policies were refused as a whole.
    pub fn record_policy_refused(&self, refused: usize) {
        self.policy_refused.set(count(refused));
    }

    /// Records one policy sync's duration.
    pub fn record_policy_synced(&self, seconds: f64) {
        self.policy_sync_duration.observe(seconds);
    }

    /// Counts `packets` the policy table newly dropped in `direction`.
    pub fn record_policy_denied(&self, direction: &'static str, packets: u64) {
        self.policy_denied_packets
            .get_or_create(&DirectionLabel { direction })
            .inc_by(packets);
    }

    /// Records the pod addresses NetworkPolicy rejects now, one reason
    /// label per address; every label in `labels` is set, zero included.
    pub fn record_policy_rejected_pod_ips(
        &self,
        labels: &[&'static str],
        reasons: impl IntoIterator<Item = &'static str>,
    ) {
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for reason in reasons {
            *counts.entry(reason).or_default() += 1;
        }
        for &reason in labels {
            let n = counts.get(reason).copied().unwrap_or(0);
            self.policy_rejected_pod_ips
                .get_or_create(&ReasonLabel { reason })
                .set(count(n));
        }
    }

    /// Counts one restoration of nftables table `table` (family and name).
    pub fn record_table_restored(&self, table: &'static str) {
        self.table_restored
            .get_or_create(&TableLabel { table })
            .inc();
    }

    /// Counts `packets` the guard table newly dropped for `reason` (a
    /// `DropReason` label); zero still shows the reason.
    pub fn record_guard_dropped(&self, reason: &'static str, packets: u64) {
        self.guard_dropped_packets
            .get_or_create(&ReasonLabel { reason })
            .inc_by(packets);
    }

    /// Counts one failure of kind `error`.
    pub fn record_error(&self, error: &'static str) {
        self.errors.get_or_create(&ErrorLabel { error }).inc();
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn operation_name(operation: &Operation) -> &'static str {
    match operation {
        Operation::SetNeighbour(_) => "set_neighbour",
        Operation::SetFdb(_) => "set_fdb",
        Operation::SetRoute(_) => "set_route",
        Operation::SetReturnRoute(_) => "set_return_route",
        Operation::DeleteReturnRoute(_) => "delete_return_route",
        Operation::DeleteRoute(_) => "delete_route",
        Operation::DeleteFdb(_) => "delete_fdb",
        Operation::DeleteNeighbour(_) => "delete_neighbour",
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn denied_packets_are_a_counter_that_adds_up_what_each_read_found() {
        let mut registry = Registry::default();
        let metrics = AgentMetrics::register(&mut registry);
        for (egress, ingress) in [(0, 5), (2, 0), (1, 3)] {
            metrics.record_policy_denied("egress", egress);
            metrics.record_policy_denied("ingress", ingress);
        }
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("# TYPE weft_agent_policy_denied_packets counter"),
            "{text}"
        );
        assert!(
            text.contains("weft_agent_policy_denied_packets_total{direction=\"egress\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("weft_agent_policy_denied_packets_total{direction=\"ingress\"} 8\n"),
            "{text}"
        );
    }

    #[test]
    fn guard_drops_are_a_counter_by_reason() {
        let mut registry = Registry::default();
        let metrics = AgentMetrics::register(&mut registry);
        for (spoofed, stranger) in [(2, 0), (3, 1)] {
            metrics.record_guard_dropped("spoofed", spoofed);
            metrics.record_guard_dropped("vxlan_stranger", stranger);
        }
        metrics.record_guard_dropped("link_local", 0);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("# TYPE weft_agent_guard_dropped_packets counter"),
            "{text}"
        );
        for line in [
            "weft_agent_guard_dropped_packets_total{reason=\"spoofed\"} 5\n",
            "weft_agent_guard_dropped_packets_total{reason=\"vxlan_stranger\"} 1\n",
            "weft_agent_guard_dropped_packets_total{reason=\"link_local\"} 0\n",
        ] {
            assert!(text.contains(line), "{line}{text}");
        }
    }
}
