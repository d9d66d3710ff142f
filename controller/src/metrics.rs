//! The controller's Prometheus metrics.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::allocator::PoolUsage;
use weft_core::ip::IpFamily;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are spelled as they appear in queries
enum FamilyValue {
    ipv4,
    ipv6,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    family: FamilyValue,
}

impl From<IpFamily> for FamilyLabel {
    fn from(family: IpFamily) -> Self {
        Self {
            family: match family {
                IpFamily::V4 => FamilyValue::ipv4,
                IpFamily::V6 => FamilyValue::ipv6,
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    error: &'static str,
}

/// Everything the controller counts, registered under `weft_controller_`.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    slices_allocated: Family<FamilyLabel, Gauge>,
    slices_free: Family<FamilyLabel, Gauge>,
    reconcile_errors: Family<ErrorLabel, Counter>,
    reconcile_duration: Histogram,
    claim_problems: Family<ReasonLabel, Counter>,
    exhaustions: Family<FamilyLabel, Counter>,
    write_conflicts: Counter,
    leader: Gauge,
}

impl ControllerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            slices_allocated: Family::default(),
            slices_free: Family::default(),
            reconcile_errors: Family::default(),
            // 100 µs .. ~3 s: in-memory decisions up to slow API writes.
            reconcile_duration: Histogram::new(exponential_buckets(0.0001, 3.0, 10)),
            claim_problems: Family::default(),
            exhaustions: Family::default(),
            write_conflicts: Counter::default(),
            leader: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("weft_controller");
        registry.register(
            "slices_allocated",
            "Pod CIDR slices held by nodes",
            metrics.slices_allocated.clone(),
        );
        registry.register(
            "slices_free",
            "Pod CIDR slices free to hand out",
            metrics.slices_free.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Node reconciles that failed, by error",
            metrics.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to reconcile one node",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "claim_problems",
            "Invalid, duplicate, overlapping or outside pod CIDRs found on nodes, by reason",
            metrics.claim_problems.clone(),
        );
        registry.register(
            "exhaustions",
            "Nodes found with no free slice for them",
            metrics.exhaustions.clone(),
        );
        registry.register(
            "write_conflicts",
            "Node writes refused because the node changed since it was read",
            metrics.write_conflicts.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            metrics.leader.clone(),
        );
        metrics
    }

    pub(crate) fn record_usage(&self, usage: &[PoolUsage]) {
        for pool in usage {
            let label = FamilyLabel::from(pool.family);
            let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.slices_allocated
                .get_or_create(&label)
                .set(count(pool.allocated));
            self.slices_free.get_or_create(&label).set(count(pool.free));
        }
    }

    pub(crate) fn record_reconcile(&self, seconds: f64) {
        self.reconcile_duration.observe(seconds);
    }

    pub(crate) fn record_error(&self, error: &'static str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabel { error })
            .inc();
    }

    pub(crate) fn record_claim_problem(&self, reason: &'static str) {
        self.claim_problems
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub(crate) fn record_exhaustion(&self, family: IpFamily) {
        self.exhaustions.get_or_create(&family.into()).inc();
    }

    pub(crate) fn record_write_conflict(&self) {
        self.write_conflicts.inc();
    }

    pub(crate) fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}
