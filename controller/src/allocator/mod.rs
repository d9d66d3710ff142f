//! Per-node pod CIDR slices: who holds which slice ([`PodCidrAllocator`])
//! of the cut that a [`SlicePlan`] makes of each family's cluster CIDR.
//!
//! Everything here is pure: no Kubernetes types, no clock reads (callers pass
//! `now`), so the controller's decisions can be tested exhaustively in memory.
//!
//! # Re-registration
//! A deleted node's slice is freed at once, but it is *softly held* under the
//! node's name for the configured hold time: if a node with the same name
//! registers again before the hold expires it gets its old slice back (its
//! agent's bridge address and the pods' host-local IPAM files stay valid).
//! Other nodes are handed held slices only when no unheld slice is free, so a
//! hold never causes exhaustion. Holds live in memory only: a controller
//! restart or fail-over forgets them and the slice becomes plain free.
//!
//! # Parts
//! - [`NodeClaims`] (`claims`): what a node already carries, and the
//!   [`ClaimProblem`]s for which a node is left alone and reported.
//! - `pool`: one family's taken, blocked, held and free slices.
//! - [`PodCidrAllocator`] (here): one pool per family, and the decision for
//!   a node across them.

mod claims;
mod pool;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use weft_core::ip::IpFamily;
use weft_core::slice::SlicePlan;

pub use claims::{ClaimProblem, ClaimSource, NodeClaims};
pub use pool::PoolUsage;
use pool::{FamilyOutcome, SlicePool};

/// The slices a node ends up with, one per configured family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeSlices {
    /// The IPv4 slice.
    pub v4: IpNet,
    /// The IPv6 slice, when the cluster is dual-stack.
    pub v6: Option<IpNet>,
}

impl NodeSlices {
    /// The slices in `spec.podCIDRs` order (IPv4 first).
    pub fn to_vec(&self) -> Vec<IpNet> {
        std::iter::once(self.v4).chain(self.v6).collect()
    }
}

/// The allocator's decision for one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assignment {
    /// Every configured family has a slice for the node (kept, adopted or new).
    Allocated(NodeSlices),
    /// Some existing values are wrong; the node is to be left as it is.
    Conflicted(Vec<ClaimProblem>),
    /// These families have no free slice; the node waits for one to free.
    Exhausted(Vec<IpFamily>),
}

/// Who holds which pod CIDR slice, for one cluster (single- or dual-stack).
///
/// The controller feeds every node through [`PodCidrAllocator::assign`] — at
/// start-up in creation order, so the older of two nodes claiming the same
/// slice keeps it — and on every change; a slice is never handed out twice.
#[derive(Clone, Debug)]
pub struct PodCidrAllocator {
    v4: SlicePool,
    v6: Option<SlicePool>,
    hold: Duration,
    waiting: BTreeSet<String>,
}

impl PodCidrAllocator {
    /// An empty allocator. `v4` must be an IPv4 plan and `v6` an IPv6 one;
    /// `hold` is how long a deleted node's slice is kept for its name.
    pub fn new(v4: SlicePlan, v6: Option<SlicePlan>, hold: Duration) -> Self {
        Self {
            v4: SlicePool::new(v4),
            v6: v6.map(SlicePool::new),
            hold,
            waiting: BTreeSet::new(),
        }
    }

    fn pools_mut(&mut self) -> impl Iterator<Item = &mut SlicePool> {
        std::iter::once(&mut self.v4).chain(self.v6.as_mut())
    }

    fn pools(&self) -> impl Iterator<Item = &SlicePool> {
        std::iter::once(&self.v4).chain(self.v6.as_ref())
    }

    /// Decides `node`'s slices from what it already carries: keeps or adopts
    /// valid claims, reports bad ones, and gives unclaimed families the lowest
    /// free slice. Idempotent: the same claims give the same answer.
    pub fn assign(&mut self, node: &str, claims: &NodeClaims, now: Instant) -> Assignment {
        let mut problems = Vec::new();
        if let Some(value) = claims.unparseable_spec() {
            problems.push(ClaimProblem::Unparseable {
                source: ClaimSource::Spec,
                value: value.to_owned(),
            });
        }
        let unclaimed = self.adopt_claims(node, claims, &mut problems);
        if !problems.is_empty() {
            self.waiting.insert(node.to_owned());
            return Assignment::Conflicted(problems);
        }
        let mut exhausted = Vec::new();
        for pool in self.pools_mut() {
            let family = pool.family();
            if unclaimed.contains(&family) && pool.allocate(node, now).is_none() {
                exhausted.push(family);
            }
        }
        if !exhausted.is_empty() {
            self.waiting.insert(node.to_owned());
            return Assignment::Exhausted(exhausted);
        }
        self.waiting.remove(node);
        let slice = |pool: &SlicePool| {
            pool.owned_slice(node)
                .expect("every family was adopted or allocated")
        };
        Assignment::Allocated(NodeSlices {
            v4: slice(&self.v4),
            v6: self.v6.as_ref().map(slice),
        })
    }

    /// Records `node`'s valid existing claims without allocating anything.
    /// Rebuilding feeds every node through this before any [`assign`]: a
    /// fresh allocation can then never take a slice a node already carries,
    /// and the first claimant (oldest node) keeps a contested slice.
    ///
    /// [`assign`]: PodCidrAllocator::assign
    pub fn adopt_existing(&mut self, node: &str, claims: &NodeClaims) {
        self.adopt_claims(node, claims, &mut Vec::new());
    }

    /// Checks `node`'s claim in every family, records the valid ones and
    /// the address space a disputed annotation names, and adds what is wrong
    /// to `problems`. Returns the families the node claims nothing in.
    ///
    /// A set annotation that disagrees with `spec.podCIDRs` is never
    /// changed, so the node stays conflicted until an administrator removes
    /// it; meanwhile neither its spec slice nor the annotation's is handed to
    /// another node, since the kubelet uses one and the node's agent may
    /// route the other.
    fn adopt_claims(
        &mut self,
        node: &str,
        claims: &NodeClaims,
        problems: &mut Vec<ClaimProblem>,
    ) -> Vec<IpFamily> {
        let mut unclaimed = Vec::new();
        for pool in self.pools_mut() {
            let family = pool.family();
            match pool.adopt(node, claims.claim(family)) {
                FamilyOutcome::Adopted => {}
                FamilyOutcome::Problem(problem) => problems.push(problem),
                FamilyOutcome::Unclaimed => unclaimed.push(family),
            }
            if let Some(dispute) = claims.annotation_dispute(family) {
                if let Some(cidr) = &dispute.cidr {
                    pool.keep_from_others(node, cidr);
                }
                problems.push(ClaimProblem::AnnotationDisagreesWithSpec {
                    node: node.to_owned(),
                    family,
                    annotation: dispute.value,
                    spec: dispute.spec,
                });
            }
        }
        unclaimed
    }

    /// Forgets a deleted node: its slices are freed (and held for its name),
    /// its blocks lifted. Returns whether any address space became free.
    pub fn release(&mut self, node: &str, now: Instant) -> bool {
        self.waiting.remove(node);
        let until = now + self.hold;
        let keep = !self.hold.is_zero();
        let mut freed = false;
        for pool in self.pools_mut() {
            freed |= pool.has_block(node);
            if let Some(index) = pool.release(node) {
                freed = true;
                if keep {
                    pool.hold(node, index, until);
                }
            }
        }
        freed
    }

    /// Releases every node `exists` says is gone (deletions a watch missed).
    /// Returns whether any address space became free.
    pub fn retain_nodes(&mut self, exists: impl Fn(&str) -> bool, now: Instant) -> bool {
        let known: BTreeSet<String> = self
            .pools()
            .flat_map(SlicePool::nodes)
            .chain(self.waiting.iter())
            .cloned()
            .collect();
        let mut freed = false;
        for node in known.iter().filter(|node| !exists(node)) {
            freed |= self.release(node, now);
        }
        freed
    }

    /// Nodes that are conflicted or waiting for a free slice: worth another
    /// look whenever address space frees.
    pub fn waiting(&self) -> impl Iterator<Item = &str> {
        self.waiting.iter().map(String::as_str)
    }

    /// Allocated and free slice counts per family.
    pub fn usage(&self) -> Vec<PoolUsage> {
        self.pools().map(SlicePool::usage).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn plan(cluster: &str, slice: u8) -> SlicePlan {
        SlicePlan::new(net(cluster), slice).unwrap()
    }

    fn v4_only(cluster: &str, slice: u8) -> PodCidrAllocator {
        PodCidrAllocator::new(plan(cluster, slice), None, Duration::ZERO)
    }

    fn dual() -> PodCidrAllocator {
        PodCidrAllocator::new(
            plan("10.244.0.0/16", 24),
            Some(plan("fd00:10::/48", 64)),
            Duration::ZERO,
        )
    }

    fn spec(values: &[&str]) -> NodeClaims {
        NodeClaims {
            spec: values.iter().map(|v| v.to_string()).collect(),
            ..NodeClaims::default()
        }
    }

    fn annotated(v4: &str) -> NodeClaims {
        NodeClaims {
            annotation_v4: Some(v4.to_owned()),
            ..NodeClaims::default()
        }
    }

    fn allocated(a: Assignment) -> NodeSlices {
        match a {
            Assignment::Allocated(slices) => slices,
            other => panic!("expected an allocation, got {other:?}"),
        }
    }

    fn problems(a: Assignment) -> Vec<ClaimProblem> {
        match a {
            Assignment::Conflicted(problems) => problems,
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn hands_out_lowest_free_slice_ipv4() {
        let mut a = v4_only("10.244.0.0/16", 24);
        let now = Instant::now();
        let first = allocated(a.assign("n0", &NodeClaims::default(), now));
        let second = allocated(a.assign("n1", &NodeClaims::default(), now));
        assert_eq!(first.v4, net("10.244.0.0/24"));
        assert_eq!(second.v4, net("10.244.1.0/24"));
        assert_eq!(first.v6, None);
        // Idempotent: asking again gives the same slice.
        assert_eq!(
            allocated(a.assign("n0", &NodeClaims::default(), now)),
            first
        );
        a.release("n0", now);
        assert_eq!(
            allocated(a.assign("n2", &NodeClaims::default(), now)).v4,
            net("10.244.0.0/24")
        );
    }

    #[test]
    fn dual_stack_gives_one_slice_per_family() {
        let mut a = dual();
        let now = Instant::now();
        let s = allocated(a.assign("n0", &NodeClaims::default(), now));
        assert_eq!(s.v4, net("10.244.0.0/24"));
        assert_eq!(s.v6, Some(net("fd00:10::/64")));
        assert_eq!(s.to_vec(), vec![net("10.244.0.0/24"), net("fd00:10::/64")]);
        let s = allocated(a.assign("n1", &NodeClaims::default(), now));
        assert_eq!(s.v6, Some(net("fd00:10:0:1::/64")));
    }

    #[test]
    fn dual_stack_adopts_v4_spec_and_allocates_v6() {
        let mut a = dual();
        let now = Instant::now();
        let s = allocated(a.assign("n0", &spec(&["10.244.9.0/24"]), now));
        assert_eq!(s.v4, net("10.244.9.0/24"));
        assert_eq!(s.v6, Some(net("fd00:10::/64")));
        let claims = NodeClaims {
            spec: vec!["10.244.3.0/24".into(), "fd00:10:0:7::/64".into()],
            ..NodeClaims::default()
        };
        let s = allocated(a.assign("n1", &claims, now));
        assert_eq!(s.v6, Some(net("fd00:10:0:7::/64")));
    }

    #[test]
    fn ipv6_lowest_free_and_exhaustion() {
        let mut a = PodCidrAllocator::new(
            plan("10.0.0.0/8", 24),
            Some(plan("fd00::/63", 64)),
            Duration::ZERO,
        );
        let now = Instant::now();
        allocated(a.assign("n0", &NodeClaims::default(), now));
        allocated(a.assign("n1", &NodeClaims::default(), now));
        assert_eq!(
            a.assign("n2", &NodeClaims::default(), now),
            Assignment::Exhausted(vec![IpFamily::V6])
        );
        assert_eq!(a.waiting().collect::<Vec<_>>(), vec!["n2"]);
        assert!(a.release("n0", now));
        let s = allocated(a.assign("n2", &NodeClaims::default(), now));
        assert_eq!(s.v6, Some(net("fd00::/64")));
        assert_eq!(a.waiting().count(), 0);
    }

    #[test]
    fn exhaustion_then_recovery_after_release() {
        let mut a = v4_only("10.244.0.0/23", 24);
        let now = Instant::now();
        allocated(a.assign("a", &NodeClaims::default(), now));
        allocated(a.assign("b", &NodeClaims::default(), now));
        assert_eq!(
            a.assign("c", &NodeClaims::default(), now),
            Assignment::Exhausted(vec![IpFamily::V4])
        );
        assert_eq!(a.usage()[0].free, 0);
        a.release("b", now);
        assert_eq!(
            allocated(a.assign("c", &NodeClaims::default(), now)).v4,
            net("10.244.1.0/24")
        );
    }

    #[test]
    fn adopts_valid_spec_and_annotation() {
        let mut a = v4_only("10.244.0.0/16", 24);
        let now = Instant::now();
        assert_eq!(
            allocated(a.assign("kcm", &spec(&["10.244.0.0/24"]), now)).v4,
            net("10.244.0.0/24")
        );
        assert_eq!(
            allocated(a.assign("ann", &annotated("10.244.2.0/24"), now)).v4,
            net("10.244.2.0/24")
        );
        // Lowest free skips adopted slices.
        assert_eq!(
            allocated(a.assign("new", &NodeClaims::default(), now)).v4,
            net("10.244.1.0/24")
        );
        assert_eq!(
            allocated(a.assign("new2", &NodeClaims::default(), now)).v4,
            net("10.244.3.0/24")
        );
    }

    #[test]
    fn an_annotation_disagreeing_with_spec_is_reported_and_both_slices_kept() {
        // Four slices: 0 and 1 are the node's spec and annotation.
        let mut a = v4_only("10.244.0.0/22", 24);
        let now = Instant::now();
        let disputed = NodeClaims {
            spec: vec!["10.244.0.0/24".into()],
            annotation_v4: Some("10.244.1.0/24".into()),
            ..NodeClaims::default()
        };
        let p = problems(a.assign("n", &disputed, now));
        assert_eq!(
            p,
            vec![ClaimProblem::AnnotationDisagreesWithSpec {
                node: "n".into(),
                family: IpFamily::V4,
                annotation: "10.244.1.0/24".into(),
                spec: net("10.244.0.0/24"),
            }]
        );
        assert_eq!(p[0].reason(), "AnnotationDisagreesWithSpec");
        let note = p[0].to_string();
        for part in [
            "node n",
            "\"10.244.1.0/24\"",
            "10.244.0.0/24",
            "kubectl annotate node n weft.dev/pod-cidr-",
        ] {
            assert!(note.contains(part), "{part} missing: {note}");
        }
        // Neither slice goes to anyone else, by allocation or by claim.
        assert_eq!(
            allocated(a.assign("fresh", &NodeClaims::default(), now)).v4,
            net("10.244.2.0/24")
        );
        for slice in ["10.244.0.0/24", "10.244.1.0/24"] {
            assert!(problems(a.assign("claimant", &spec(&[slice]), now)).len() == 1);
        }
        assert_eq!(
            a.usage()[0],
            PoolUsage {
                family: IpFamily::V4,
                allocated: 2,
                free: 1
            }
        );
        // The rebuild after a restart keeps both too.
        let mut rebuilt = v4_only("10.244.0.0/22", 24);
        rebuilt.adopt_existing("n", &disputed);
        assert_eq!(
            allocated(rebuilt.assign("fresh", &NodeClaims::default(), now)).v4,
            net("10.244.2.0/24")
        );
        // An administrator removes the annotation: the spec slice is the
        // node's, and the annotation's is free again.
        assert_eq!(
            allocated(a.assign("n", &spec(&["10.244.0.0/24"]), now)).v4,
            net("10.244.0.0/24")
        );
        assert_eq!(
            allocated(a.assign("claimant", &spec(&["10.244.1.0/24"]), now)).v4,
            net("10.244.1.0/24")
        );
        assert_eq!(a.waiting().count(), 0);
    }

    #[test]
    fn any_set_annotation_that_is_not_the_spec_slice_is_disputed() {
        let mut a = dual();
        let now = Instant::now();
        for (annotation_v4, annotation_v6) in [
            ("banana", None),
            (" ", None),
            ("10.244.0.0/20", None),
            ("192.168.0.0/24", None),
            ("10.244.5.0/24", Some("fd00:10:0:9::/64")),
        ] {
            let claims = NodeClaims {
                spec: vec!["10.244.5.0/24".into(), "fd00:10:0:5::/64".into()],
                annotation_v4: Some(annotation_v4.into()),
                annotation_v6: annotation_v6.map(Into::into),
            };
            let p = problems(a.assign("n", &claims, now));
            assert_eq!(p.len(), 1, "{annotation_v4} {annotation_v6:?}: {p:?}");
            assert_eq!(p[0].reason(), "AnnotationDisagreesWithSpec");
        }
        // The same slice in other words, or no value at all, is agreement.
        for annotation_v4 in [" 10.244.5.0/24", ""] {
            let claims = NodeClaims {
                spec: vec!["10.244.5.0/24".into(), "fd00:10:0:5::/64".into()],
                annotation_v4: Some(annotation_v4.into()),
                annotation_v6: Some("fd00:10:0:5:0::/64".into()),
            };
            allocated(a.assign("n", &claims, now));
        }
    }

    #[test]
    fn adoption_replaces_an_in_flight_allocation() {
        // The controller picked a slice but someone else set spec.podCIDR first.
        let mut a = v4_only("10.244.0.0/16", 24);
        let now = Instant::now();
        allocated(a.assign("n", &NodeClaims::default(), now));
        let s = allocated(a.assign("n", &spec(&["10.244.8.0/24"]), now));
        assert_eq!(s.v4, net("10.244.8.0/24"));
        assert_eq!(a.usage()[0].allocated, 1);
        assert_eq!(
            allocated(a.assign("m", &NodeClaims::default(), now)).v4,
            net("10.244.0.0/24")
        );
    }

    #[test]
    fn duplicate_claim_is_reported_and_the_first_keeps_it() {
        let mut a = v4_only("10.244.0.0/16", 24);
        let now = Instant::now();
        allocated(a.assign("old", &spec(&["10.244.4.0/24"]), now));
        let p = problems(a.assign("young", &spec(&["10.244.4.0/24"]), now));
        assert_eq!(
            p,
            vec![ClaimProblem::Duplicate {
                source: ClaimSource::Spec,
                cidr: net("10.244.4.0/24"),
                owner: "old".into(),
            }]
        );
        assert_eq!(p[0].reason(), "PodCidrDuplicate");
        assert!(p[0].to_string().contains("delete the Node"), "{}", p[0]);
        // Never handed out twice, and the loser gets it once the owner leaves.
        assert_eq!(a.waiting().collect::<Vec<_>>(), vec!["young"]);
        a.release("old", now);
        assert_eq!(
            allocated(a.assign("young", &spec(&["10.244.4.0/24"]), now)).v4,
            net("10.244.4.0/24")
        );
    }

    #[test]
    fn misfit_claims_block_their_address_space() {
        let mut a = v4_only("10.244.0.0/22", 24);
        let now = Instant::now();
        let p = problems(a.assign("wide", &spec(&["10.244.0.0/23"]), now));
        assert!(matches!(
            p[0],
            ClaimProblem::Misfit {
                slice_prefix: 24,
                ..
            }
        ));
        assert_eq!(p[0].reason(), "PodCidrMisaligned");
        // Slices 0 and 1 are covered by the /23, so nobody else gets them.
        assert_eq!(
            allocated(a.assign("n", &NodeClaims::default(), now)).v4,
            net("10.244.2.0/24")
        );
        let p = problems(a.assign("inside", &spec(&["10.244.1.0/24"]), now));
        assert!(matches!(&p[0], ClaimProblem::Overlap { owner, .. } if owner == "wide"));
        assert_eq!(a.usage()[0].free, 1);
        // Once the wide node is gone its space frees and the inside claim is adopted.
        assert!(a.release("wide", now));
        assert_eq!(
            allocated(a.assign("inside", &spec(&["10.244.1.0/24"]), now)).v4,
            net("10.244.1.0/24")
        );
        assert_eq!(
            allocated(a.assign("m", &NodeClaims::default(), now)).v4,
            net("10.244.0.0/24")
        );
    }

    #[test]
    fn later_bad_claims_never_take_a_held_slice_or_block_the_cluster() {
        let mut a = v4_only("10.244.0.0/16", 24);
        let now = Instant::now();
        let held = allocated(a.assign("held", &NodeClaims::default(), now)).v4;
        let p = problems(a.assign("everything", &spec(&["0.0.0.0/0"]), now));
        assert!(matches!(p[0], ClaimProblem::OutsideCluster { .. }), "{p:?}");
        let p = problems(a.assign("wide", &annotated("10.244.0.0/20"), now));
        assert!(matches!(p[0], ClaimProblem::Misfit { .. }), "{p:?}");
        // Its annotation tampered with, the holder is reported and keeps
        // its slice; the tampered value is kept from others as well.
        let tampered = NodeClaims {
            spec: vec![held.to_string()],
            annotation_v4: Some("10.244.16.0/24".into()),
            ..NodeClaims::default()
        };
        let p = problems(a.assign("held", &tampered, now));
        assert_eq!(p[0].reason(), "AnnotationDisagreesWithSpec");
        // The /0 keeps nothing from anyone; the /20 only what was free, the
        // tampered annotation only its slice.
        assert_eq!(
            allocated(a.assign("fresh", &NodeClaims::default(), now)).v4,
            net("10.244.17.0/24")
        );
        assert_eq!(
            allocated(a.assign("held", &spec(&[&held.to_string()]), now)).v4,
            held
        );
    }

    #[test]
    fn invalid_existing_values_are_reported_untouched() {
        let mut a = dual();
        let now = Instant::now();
        let p = problems(a.assign("outside", &spec(&["192.168.0.0/24"]), now));
        assert!(matches!(p[0], ClaimProblem::OutsideCluster { .. }));
        assert!(p[0].to_string().contains("10.244.0.0/16"), "{}", p[0]);
        let p = problems(a.assign("garbage", &spec(&["not-a-cidr"]), now));
        assert!(matches!(&p[0], ClaimProblem::Unparseable { value, .. } if value == "not-a-cidr"));
        let p = problems(a.assign("bad-annotation", &annotated("fd00::/64"), now));
        assert_eq!(p[0].reason(), "PodCidrInvalid");
        assert!(p[0].to_string().contains("weft.dev/pod-cidr"), "{}", p[0]);
        let v6_outside = NodeClaims {
            annotation_v6: Some("fd99::/64".into()),
            ..NodeClaims::default()
        };
        let p = problems(a.assign("v6-outside", &v6_outside, now));
        assert!(matches!(p[0], ClaimProblem::OutsideCluster { .. }));
        // Conflicted nodes get nothing in the unclaimed family either.
        assert_eq!(a.usage()[0].allocated, 0);
        assert_eq!(a.usage()[1].allocated, 0);
        assert_eq!(a.waiting().count(), 4);
    }

    #[test]
    fn re_registration_gets_the_held_slice_back() {
        let mut a =
            PodCidrAllocator::new(plan("10.244.0.0/16", 24), None, Duration::from_secs(300));
        let now = Instant::now();
        allocated(a.assign("a", &NodeClaims::default(), now));
        allocated(a.assign("b", &NodeClaims::default(), now));
        a.release("a", now);
        // Others skip the held slice while unheld ones are free.
        assert_eq!(
            allocated(a.assign("c", &NodeClaims::default(), now)).v4,
            net("10.244.2.0/24")
        );
        assert_eq!(
            allocated(a.assign("a", &NodeClaims::default(), now)).v4,
            net("10.244.0.0/24")
        );
        // After the hold expires the slice is plain free again.
        a.release("a", now);
        let later = now + Duration::from_secs(301);
        assert_eq!(
            allocated(a.assign("d", &NodeClaims::default(), later)).v4,
            net("10.244.0.0/24")
        );
    }

    #[test]
    fn held_slices_go_to_others_rather_than_exhausting() {
        let mut a = PodCidrAllocator::new(plan("10.0.0.0/23", 24), None, Duration::from_secs(300));
        let now = Instant::now();
        allocated(a.assign("a", &NodeClaims::default(), now));
        allocated(a.assign("b", &NodeClaims::default(), now));
        a.release("a", now);
        assert_eq!(
            allocated(a.assign("c", &NodeClaims::default(), now)).v4,
            net("10.0.0.0/24")
        );
        // "a" comes back too late: its slice went to "c".
        assert_eq!(
            a.assign("a", &NodeClaims::default(), now),
            Assignment::Exhausted(vec![IpFamily::V4])
        );
    }

    #[test]
    fn retain_nodes_frees_missed_deletions() {
        let mut a = v4_only("10.244.0.0/16", 24);
        let now = Instant::now();
        for name in ["a", "b", "c"] {
            allocated(a.assign(name, &NodeClaims::default(), now));
        }
        assert!(a.retain_nodes(|name| name != "b", now));
        assert!(!a.retain_nodes(|name| name != "b", now));
        assert_eq!(a.usage()[0].allocated, 2);
        assert_eq!(
            allocated(a.assign("d", &NodeClaims::default(), now)).v4,
            net("10.244.1.0/24")
        );
    }

    #[test]
    fn fills_a_large_cluster_without_repeats() {
        let mut a = v4_only("10.0.0.0/8", 24);
        let now = Instant::now();
        let mut seen = BTreeSet::new();
        for i in 0..5000 {
            let s = allocated(a.assign(&format!("n{i}"), &NodeClaims::default(), now));
            assert!(seen.insert(s.v4), "slice {} handed out twice", s.v4);
        }
        let usage = a.usage()[0];
        assert_eq!(usage.allocated, 5000);
        assert_eq!(usage.free, 65536 - 5000);
    }

    proptest::proptest! {
        /// Whatever the order of assigns and releases, no two live nodes share
        /// a slice and every slice lies inside the cluster CIDR.
        #[test]
        fn never_hands_a_slice_out_twice(ops in proptest::collection::vec((0u8..12, proptest::bool::ANY, proptest::option::of(0u8..20)), 1..200)) {
            let cluster = net("10.1.0.0/20");
            let mut a = PodCidrAllocator::new(SlicePlan::new(cluster, 24).unwrap(), None, Duration::from_secs(60));
            let mut now = Instant::now();
            let mut live: HashMap<String, IpNet> = HashMap::new();
            for (node, delete, claim) in ops {
                now += Duration::from_secs(7);
                let name = format!("n{node}");
                if delete {
                    a.release(&name, now);
                    live.remove(&name);
                    continue;
                }
                let claims = match claim {
                    Some(c) => annotated(&format!("10.1.{c}.0/24")),
                    None => NodeClaims::default(),
                };
                live.remove(&name);
                if let Assignment::Allocated(s) = a.assign(&name, &claims, now) {
                    proptest::prop_assert!(cluster.contains(&s.v4));
                    proptest::prop_assert!(!live.values().any(|v| *v == s.v4), "{} twice", s.v4);
                    live.insert(name, s.v4);
                }
            }
        }
    }
}
