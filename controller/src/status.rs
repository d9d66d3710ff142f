//! The controller's `/status` document ([`ControllerStatus`]): whether this
//! replica leads and who does, slice use per family, and the nodes it
//! leaves alone.
//!
//! The run loop and the reconciles write what they learn into a
//! [`StatusBoard`] as they go (a few map updates under a lock); a request
//! only copies that snapshot and serialises it, so `/status` costs nothing
//! while nobody asks and never waits on the API server.
//!
//! Only the leader holds an allocation map. A standby reports `leading:
//! false`, the Lease holder it last saw, and no families and no untouched
//! nodes: it has looked at no node. The leader's document is the one to read
//! for slices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::FutureExt;
use ipnet::IpNet;
use weft_core::ip::IpFamily;
use weft_core::status::{Build, ControllerStatus, FamilyUsage, UntouchedNode};
use weft_daemon::serve::{StatusQuery, StatusRefusal, StatusSource};

use crate::allocator::PoolUsage;
use crate::report::Finding;

/// What the controller knows now, as the run loop last recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Snapshot {
    leading: bool,
    leader: Option<String>,
    usage: Vec<PoolUsage>,
    /// Per node, the `(reason, note)` of each finding of its last reconcile.
    untouched: BTreeMap<String, Vec<(&'static str, String)>>,
}

/// The shared snapshot behind `/status`: written by the run loop and the
/// reconciles, read by the endpoint.
#[derive(Debug)]
pub struct StatusBoard {
    identity: String,
    clusters: Vec<IpNet>,
    snapshot: Mutex<Snapshot>,
}

impl StatusBoard {
    /// A board for the replica `identity` (its leader Lease identity)
    /// allocating from `clusters` (one cluster CIDR per family), not leading.
    pub fn new(identity: &str, clusters: Vec<IpNet>) -> Arc<Self> {
        Arc::new(Self {
            identity: identity.to_owned(),
            clusters,
            snapshot: Mutex::default(),
        })
    }

    fn snapshot(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        // Every update leaves the snapshot whole; a panic elsewhere while
        // holding the lock cannot leave it half-written.
        self.snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the Lease holder as last seen (`None`: nobody holds it).
    pub(crate) fn set_leader(&self, holder: Option<&str>) {
        self.snapshot().leader = holder.map(str::to_owned);
    }

    /// Records that this replica starts or stops leading. Either way the
    /// previous term's allocation state is gone: a new term rebuilds it
    /// from the nodes, and a standby has none.
    pub(crate) fn set_leading(&self, leading: bool) {
        let mut snapshot = self.snapshot();
        snapshot.leading = leading;
        if leading {
            snapshot.leader = Some(self.identity.clone());
        }
        snapshot.usage.clear();
        snapshot.untouched.clear();
    }

    /// Records the allocator's slice counts per family.
    pub(crate) fn record_usage(&self, usage: Vec<PoolUsage>) {
        self.snapshot().usage = usage;
    }

    /// Records the findings of `node`'s last reconcile; none means the
    /// controller takes care of the node.
    pub(crate) fn record_findings(&self, node: &str, findings: &[Finding]) {
        let mut snapshot = self.snapshot();
        if findings.is_empty() {
            snapshot.untouched.remove(node);
        } else {
            let described = findings
                .iter()
                .map(|finding| (finding.reason(), finding.note()))
                .collect();
            snapshot.untouched.insert(node.to_owned(), described);
        }
    }

    /// Forgets the nodes `exists` says are gone.
    pub(crate) fn retain_nodes(&self, exists: impl Fn(&str) -> bool) {
        self.snapshot().untouched.retain(|node, _| exists(node));
    }

    /// The document as of now.
    pub fn document(&self) -> ControllerStatus {
        let snapshot = self.snapshot().clone();
        document(&self.identity, &self.clusters, snapshot)
    }
}

/// Builds the document from a snapshot. The cluster CIDR of each family
/// comes from `clusters`; usage of a family without one (impossible: both
/// come from one config) is left out rather than shown without a CIDR.
fn document(identity: &str, clusters: &[IpNet], snapshot: Snapshot) -> ControllerStatus {
    let families = snapshot
        .usage
        .iter()
        .filter_map(|usage| {
            let cluster = clusters
                .iter()
                .find(|cluster| IpFamily::of(cluster) == usage.family)?;
            Some(FamilyUsage {
                cluster_cidr: cluster.to_string(),
                used: usage.allocated,
                free: usage.free,
            })
        })
        .collect();
    let untouched = snapshot
        .untouched
        .into_iter()
        .flat_map(|(node, findings)| {
            findings
                .into_iter()
                .map(move |(reason, note)| UntouchedNode {
                    node: node.clone(),
                    reason: format!("{reason}: {note}"),
                })
        })
        .collect();
    ControllerStatus {
        build: Build::current(),
        identity: identity.to_owned(),
        leading: snapshot.leading,
        leader: snapshot.leader,
        families,
        untouched,
    }
}

impl StatusSource for StatusBoard {
    fn status(
        &self,
        query: StatusQuery,
    ) -> BoxFuture<'static, Result<serde_json::Value, StatusRefusal>> {
        let answer = match query.check {
            Some(check) => Err(StatusRefusal(format!(
                "the controller has no check {check:?}; ask GET /status without ?check (checks such as ?check=kernel are the agent's)"
            ))),
            None => serde_json::to_value(self.document()).map_err(|error| {
                StatusRefusal(format!("the status document did not serialise: {error}"))
            }),
        };
        futures::future::ready(answer).boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use weft_core::slice::SlicePlan;

    use super::*;
    use crate::allocator::{ClaimProblem, NodeClaims, PodCidrAllocator};

    fn plan(cluster: &str, slice: u8) -> SlicePlan {
        SlicePlan::new(cluster.parse().unwrap(), slice).unwrap()
    }

    fn board(plans: &[SlicePlan]) -> Arc<StatusBoard> {
        StatusBoard::new(
            "controller-7",
            plans.iter().map(SlicePlan::cluster).collect(),
        )
    }

    /// The usage of an allocator that gave `nodes` fresh nodes a slice.
    fn usage_after(v4: SlicePlan, v6: Option<SlicePlan>, nodes: usize) -> Vec<PoolUsage> {
        let mut allocator = PodCidrAllocator::new(v4, v6, Duration::ZERO);
        for node in 0..nodes {
            allocator.assign(&format!("n{node}"), &NodeClaims::default(), Instant::now());
        }
        allocator.usage()
    }

    fn disagreement(node: &str) -> Finding {
        Finding::Claim(ClaimProblem::AnnotationDisagreesWithSpec {
            node: node.to_owned(),
            family: IpFamily::V4,
            annotation: "10.244.9.0/24".to_owned(),
            spec: "10.244.1.0/24".parse().unwrap(),
        })
    }

    #[test]
    fn the_leader_reports_slices_per_family_and_nodes_left_alone() {
        let (v4, v6) = (plan("10.244.0.0/16", 24), plan("fd00:10::/48", 64));
        let board = board(&[v4, v6]);
        board.set_leading(true);
        board.record_usage(usage_after(v4, Some(v6), 3));
        board.record_findings("b", &[disagreement("b")]);
        board.record_findings("a", &[Finding::Exhausted(v4), Finding::Exhausted(v6)]);

        let document = board.document();
        assert_eq!(document.build, Build::current());
        assert_eq!(document.identity, "controller-7");
        assert!(document.leading);
        assert_eq!(document.leader.as_deref(), Some("controller-7"));
        assert_eq!(
            document.families,
            vec![
                FamilyUsage {
                    cluster_cidr: "10.244.0.0/16".to_owned(),
                    used: 3,
                    free: 253,
                },
                FamilyUsage {
                    cluster_cidr: "fd00:10::/48".to_owned(),
                    used: 3,
                    free: 65_533,
                },
            ]
        );
        // One entry per node and reason, ordered by node, worded as the Events.
        let untouched: Vec<(&str, &str)> = document
            .untouched
            .iter()
            .map(|entry| (entry.node.as_str(), entry.reason.as_str()))
            .collect();
        assert_eq!(untouched.len(), 3);
        assert_eq!(untouched[0].0, "a");
        assert_eq!(
            untouched[0].1,
            format!("PodCidrExhausted: {}", Finding::Exhausted(v4).note())
        );
        assert!(untouched[0].1.contains("10.244.0.0/16"));
        assert!(untouched[1].1.contains("fd00:10::/48"));
        assert_eq!(untouched[2].0, "b");
        assert_eq!(
            untouched[2].1,
            format!("AnnotationDisagreesWithSpec: {}", disagreement("b").note())
        );
    }

    #[test]
    fn a_fixed_or_deleted_node_leaves_the_list() {
        let board = board(&[plan("10.244.0.0/16", 24)]);
        board.set_leading(true);
        for node in ["a", "b", "c"] {
            board.record_findings(node, &[disagreement(node)]);
        }
        board.record_findings("a", &[]);
        board.retain_nodes(|node| node != "b");
        let nodes: Vec<String> = board
            .document()
            .untouched
            .into_iter()
            .map(|entry| entry.node)
            .collect();
        assert_eq!(nodes, ["c"]);
    }

    #[test]
    fn a_standby_reports_the_leader_it_sees_and_no_allocation_state() {
        let v4 = plan("10.244.0.0/16", 24);
        let board = board(&[v4]);
        board.set_leader(Some("controller-1"));
        let standby = board.document();
        assert!(!standby.leading);
        assert_eq!(standby.leader.as_deref(), Some("controller-1"));
        assert!(standby.families.is_empty() && standby.untouched.is_empty());

        // A term that ends takes its allocation state with it.
        board.set_leading(true);
        board.record_usage(usage_after(v4, None, 1));
        board.record_findings("b", &[disagreement("b")]);
        board.set_leading(false);
        board.set_leader(Some("controller-2"));
        let deposed = board.document();
        assert!(!deposed.leading);
        assert_eq!(deposed.leader.as_deref(), Some("controller-2"));
        assert!(deposed.families.is_empty() && deposed.untouched.is_empty());
    }

    #[test]
    fn the_widest_plan_counts_its_free_slices_exactly() {
        // The most slices a plan allows (2^62): the counts fit a u64 with
        // room to spare, so nothing needs to saturate.
        let v4 = plan("10.0.0.0/8", 24);
        let v6 = plan("fd00::/64", 126);
        let board = board(&[v4, v6]);
        board.set_leading(true);
        board.record_usage(usage_after(v4, Some(v6), 2));
        let families = board.document().families;
        assert_eq!((families[0].used, families[0].free), (2, (1 << 16) - 2));
        assert_eq!((families[1].used, families[1].free), (2, (1 << 62) - 2));
    }

    #[test]
    fn the_endpoint_serves_camel_case_json_and_refuses_checks() {
        let v4 = plan("10.244.0.0/16", 24);
        let board = board(&[v4]);
        board.set_leading(true);
        board.record_usage(usage_after(v4, None, 1));
        let json = board
            .status(StatusQuery::default())
            .now_or_never()
            .unwrap()
            .unwrap();
        assert_eq!(json["families"][0]["clusterCidr"], "10.244.0.0/16");
        assert_eq!(json["leading"], true);
        let read: ControllerStatus = serde_json::from_value(json).unwrap();
        assert_eq!(read, board.document());

        let refusal = board
            .status(StatusQuery {
                check: Some("kernel".to_owned()),
                peer: None,
            })
            .now_or_never()
            .unwrap()
            .unwrap_err();
        assert!(refusal.0.contains("\"kernel\""), "{refusal}");
    }
}
