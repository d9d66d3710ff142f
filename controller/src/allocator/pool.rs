//! One family's slices: which are taken by a node, blocked by a node's
//! misfit claim or disputed annotation, held for a deleted node's name, or free. A node's claim is
//! checked against them here (duplicate, overlap, misfit, outside), and new
//! slices come from the lowest-free search over them.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::time::Instant;

use ipnet::IpNet;
use weft_core::ip::IpFamily;
use weft_core::slice::{Placement, SlicePlan};

use super::claims::{Claim, ClaimProblem};

/// Slice counts for one family, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// The family.
    pub family: IpFamily,
    /// Slices held by nodes.
    pub allocated: u64,
    /// Slices nobody holds, blocks or keeps for a re-registering node.
    pub free: u64,
}

/// A deleted node's slice, kept for it until `until`.
#[derive(Clone, Debug)]
struct Hold {
    node: String,
    until: Instant,
}

/// One family's slices.
#[derive(Clone, Debug)]
pub(super) struct SlicePool {
    plan: SlicePlan,
    owners: BTreeMap<u64, String>,
    slice_of: HashMap<String, u64>,
    /// Address space kept from everyone while the node exists: its misfit
    /// claim, and the space its disputed annotation names.
    blocks: HashMap<String, Vec<RangeInclusive<u64>>>,
    holds: BTreeMap<u64, Hold>,
    hold_of: HashMap<String, u64>,
    /// Every index below this is owned, blocked or held, so the lowest-free
    /// search starts here instead of at 0.
    search_from: u64,
}

/// What checking a node's claim for one family came to.
pub(super) enum FamilyOutcome {
    Adopted,
    Problem(ClaimProblem),
    Unclaimed,
}

impl SlicePool {
    pub(super) fn new(plan: SlicePlan) -> Self {
        Self {
            plan,
            owners: BTreeMap::new(),
            slice_of: HashMap::new(),
            blocks: HashMap::new(),
            holds: BTreeMap::new(),
            hold_of: HashMap::new(),
            search_from: 0,
        }
    }

    /// The family of this pool's plan.
    pub(super) fn family(&self) -> IpFamily {
        self.plan.family()
    }

    /// The slice `node` owns in this family, if any.
    pub(super) fn owned_slice(&self, node: &str) -> Option<IpNet> {
        self.slice_of
            .get(node)
            .and_then(|index| self.plan.slice(*index))
    }

    /// Whether `node` keeps address space from everyone (beyond its slice).
    pub(super) fn has_block(&self, node: &str) -> bool {
        self.blocks.contains_key(node)
    }

    /// Every node that owns a slice or blocks address space here.
    pub(super) fn nodes(&self) -> impl Iterator<Item = &String> {
        self.slice_of.keys().chain(self.blocks.keys())
    }

    fn blocker_of(&self, index: u64) -> Option<&str> {
        self.blocks
            .iter()
            .find(|(_, ranges)| ranges.iter().any(|range| range.contains(&index)))
            .map(|(node, _)| node.as_str())
    }

    fn drop_hold(&mut self, index: u64) {
        if let Some(hold) = self.holds.remove(&index) {
            self.hold_of.remove(&hold.node);
            self.search_from = self.search_from.min(index);
        }
    }

    fn expire_holds(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .holds
            .iter()
            .filter(|(_, hold)| hold.until <= now)
            .map(|(index, _)| *index)
            .collect();
        for index in expired {
            self.drop_hold(index);
        }
    }

    fn take(&mut self, node: &str, index: u64) -> IpNet {
        self.drop_hold(index);
        if let Some(previous) = self.slice_of.insert(node.to_owned(), index) {
            if previous != index {
                self.owners.remove(&previous);
                self.search_from = self.search_from.min(previous);
            }
        }
        self.owners.insert(index, node.to_owned());
        self.plan.slice(index).expect("indexes come from the plan")
    }

    fn unblock(&mut self, node: &str) {
        let lowest = self.blocks.remove(node).into_iter().flatten();
        if let Some(start) = lowest.map(|range| *range.start()).min() {
            self.search_from = self.search_from.min(start);
        }
    }

    /// Frees the node's slice and block; returns the freed slice index.
    pub(super) fn release(&mut self, node: &str) -> Option<u64> {
        self.unblock(node);
        let index = self.slice_of.remove(node)?;
        self.owners.remove(&index);
        self.search_from = self.search_from.min(index);
        Some(index)
    }

    /// Checks the node's claim for this family and records a valid one.
    pub(super) fn adopt(&mut self, node: &str, claim: Claim) -> FamilyOutcome {
        // A node has one claim per family, so an older misfit is superseded.
        self.unblock(node);
        let (source, net) = match claim {
            Claim::None => return FamilyOutcome::Unclaimed,
            Claim::Unparseable(source, value) => {
                return FamilyOutcome::Problem(ClaimProblem::Unparseable { source, value })
            }
            Claim::Cidr(source, net) => (source, net),
        };
        let mut block = None;
        let problem = match self.plan.locate(&net) {
            Placement::Slice(index) => {
                // A slice stays with the node that holds it, even when a later
                // misfit claim covers it: nobody else's claim can take it away.
                if self.owners.get(&index).is_some_and(|owner| owner == node) {
                    return FamilyOutcome::Adopted;
                }
                if let Some(owner) = self.owners.get(&index) {
                    ClaimProblem::Duplicate {
                        source,
                        cidr: net,
                        owner: owner.clone(),
                    }
                } else if let Some(owner) = self.blocker_of(index) {
                    ClaimProblem::Overlap {
                        source,
                        cidr: net,
                        owner: owner.to_owned(),
                    }
                } else {
                    self.take(node, index);
                    return FamilyOutcome::Adopted;
                }
            }
            Placement::Misfit(range) => {
                block = Some(range);
                ClaimProblem::Misfit {
                    source,
                    cidr: net,
                    slice_prefix: self.plan.slice_prefix(),
                }
            }
            Placement::Outside | Placement::WrongFamily => ClaimProblem::OutsideCluster {
                source,
                cidr: net,
                cluster: self.plan.cluster(),
            },
        };
        // While the bad claim stands the node cannot use another slice in this
        // family, so whatever it held goes back to the pool.
        self.release(node);
        if let Some(range) = block {
            self.blocks.insert(node.to_owned(), vec![range]);
        }
        FamilyOutcome::Problem(problem)
    }

    /// Keeps the slices `net` covers from everyone else while `node`
    /// exists (or until its next [`adopt`](Self::adopt)); slices other
    /// nodes hold stay theirs. A CIDR outside the cluster CIDR keeps nothing.
    pub(super) fn keep_from_others(&mut self, node: &str, net: &IpNet) {
        let range = match self.plan.locate(net) {
            Placement::Slice(index) => index..=index,
            Placement::Misfit(range) => range,
            Placement::Outside | Placement::WrongFamily => return,
        };
        self.blocks.entry(node.to_owned()).or_default().push(range);
    }

    /// The node's current slice, its held slice, the lowest free one, or
    /// (only when nothing else is free) the lowest slice held for another.
    pub(super) fn allocate(&mut self, node: &str, now: Instant) -> Option<IpNet> {
        if let Some(&index) = self.slice_of.get(node) {
            return self.plan.slice(index);
        }
        self.expire_holds(now);
        if let Some(&index) = self.hold_of.get(node) {
            return Some(self.take(node, index));
        }
        let index = match self.lowest_free() {
            Some(index) => index,
            None => *self.holds.keys().next()?,
        };
        Some(self.take(node, index))
    }

    fn lowest_free(&mut self) -> Option<u64> {
        let count = self.plan.slice_count();
        let mut candidate = self.search_from;
        while candidate < count {
            if let Some(range) = self
                .blocks
                .values()
                .flatten()
                .find(|range| range.contains(&candidate))
            {
                candidate = range.end().saturating_add(1);
            } else if self.owners.contains_key(&candidate) || self.holds.contains_key(&candidate) {
                candidate += 1;
            } else {
                self.search_from = candidate;
                return Some(candidate);
            }
        }
        self.search_from = count;
        None
    }

    /// Keeps `index` for `node` until `until`, for a re-registration.
    pub(super) fn hold(&mut self, node: &str, index: u64, until: Instant) {
        self.holds.insert(
            index,
            Hold {
                node: node.to_owned(),
                until,
            },
        );
        self.hold_of.insert(node.to_owned(), index);
    }

    /// Allocated and free slice counts.
    pub(super) fn usage(&self) -> PoolUsage {
        // Blocks may overlap (one node's two, or two nodes' misfits): count
        // each index once.
        let mut ranges: Vec<&RangeInclusive<u64>> = self.blocks.values().flatten().collect();
        ranges.sort_by_key(|range| *range.start());
        let mut blocked_unowned = 0;
        let mut counted_to = 0;
        for range in ranges {
            let start = (*range.start()).max(counted_to);
            if start > *range.end() {
                continue;
            }
            let size = range.end() - start + 1;
            blocked_unowned += size - self.owners.range(start..=*range.end()).count() as u64;
            counted_to = range.end().saturating_add(1);
        }
        let allocated = self.owners.len() as u64;
        PoolUsage {
            family: self.plan.family(),
            allocated,
            free: self
                .plan
                .slice_count()
                .saturating_sub(allocated + self.holds.len() as u64 + blocked_unowned),
        }
    }
}
