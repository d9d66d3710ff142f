//! Per-node pod CIDR slices: how a cluster CIDR is cut into equal slices
//! ([`SlicePlan`]) and who holds which slice ([`PodCidrAllocator`]).
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use weft::ip::{addr_bits, IpFamily};

/// Slices may be at most this many bits longer than the cluster CIDR, so the
/// slice count always fits the `i64` a Prometheus gauge carries.
const MAX_SLICE_BITS: u8 = 62;

/// A slice must leave room for the node's bridge gateway and at least one pod.
const MIN_HOST_BITS: u8 = 2;

/// Why a cluster CIDR and slice size do not make a usable plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    /// The slice prefix is shorter than the cluster prefix.
    #[error("slice size /{slice} is larger than the cluster CIDR {cluster}: set the slice size to a prefix length of at least {}", cluster.prefix_len())]
    SliceLargerThanCluster {
        /// The cluster CIDR.
        cluster: IpNet,
        /// The requested slice prefix length.
        slice: u8,
    },
    /// The slice leaves no room for a gateway and a pod.
    #[error("slice size /{slice} leaves no room for pods in {family}: use a prefix length of at most {max}")]
    SliceTooSmall {
        /// The family being sliced.
        family: IpFamily,
        /// The requested slice prefix length.
        slice: u8,
        /// The longest usable prefix length.
        max: u8,
    },
    /// More slices than the allocator is willing to count.
    #[error("cluster CIDR {cluster} cut into /{slice} slices gives 2^{bits} slices: use a cluster CIDR of at least /{} or a shorter slice size", slice - MAX_SLICE_BITS)]
    TooManySlices {
        /// The cluster CIDR.
        cluster: IpNet,
        /// The requested slice prefix length.
        slice: u8,
        /// log2 of the slice count.
        bits: u8,
    },
    /// The cluster CIDR has host bits set, which usually means a typo.
    #[error("cluster CIDR {cluster} has host bits set: did you mean {}?", cluster.trunc())]
    HostBitsSet {
        /// The cluster CIDR as given.
        cluster: IpNet,
    },
    /// The CIDR given for one family belongs to the other.
    #[error("{cluster} is not an {expected} CIDR")]
    WrongFamily {
        /// The CIDR as given.
        cluster: IpNet,
        /// The family the setting is for.
        expected: IpFamily,
    },
}

/// How one family's cluster CIDR is cut into equal per-node slices, numbered
/// from 0 at the lowest address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlicePlan {
    cluster: IpNet,
    slice_prefix: u8,
}

/// Where a CIDR falls relative to a [`SlicePlan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Exactly the slice with this index.
    Slice(u64),
    /// Inside (or around) the cluster CIDR but not one aligned slice: a
    /// different size, or host bits set. Covers these slice indexes.
    Misfit(RangeInclusive<u64>),
    /// No address in common with the cluster CIDR.
    Outside,
    /// The other IP family.
    WrongFamily,
}

impl SlicePlan {
    /// Cuts `cluster` into slices of prefix length `slice_prefix`.
    pub fn new(cluster: IpNet, slice_prefix: u8) -> Result<Self, CidrError> {
        let family = IpFamily::of(&cluster);
        if cluster != cluster.trunc() {
            return Err(CidrError::HostBitsSet { cluster });
        }
        if slice_prefix < cluster.prefix_len() {
            return Err(CidrError::SliceLargerThanCluster {
                cluster,
                slice: slice_prefix,
            });
        }
        let max = family.max_prefix_len() - MIN_HOST_BITS;
        if slice_prefix > max {
            return Err(CidrError::SliceTooSmall {
                family,
                slice: slice_prefix,
                max,
            });
        }
        let bits = slice_prefix - cluster.prefix_len();
        if bits > MAX_SLICE_BITS {
            return Err(CidrError::TooManySlices {
                cluster,
                slice: slice_prefix,
                bits,
            });
        }
        Ok(Self {
            cluster,
            slice_prefix,
        })
    }

    /// Like [`SlicePlan::new`], but also checks the CIDR is of `family`.
    pub fn for_family(
        family: IpFamily,
        cluster: IpNet,
        slice_prefix: u8,
    ) -> Result<Self, CidrError> {
        if IpFamily::of(&cluster) != family {
            return Err(CidrError::WrongFamily {
                cluster,
                expected: family,
            });
        }
        Self::new(cluster, slice_prefix)
    }

    /// The family being sliced.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.cluster)
    }

    /// The whole cluster CIDR.
    pub fn cluster(&self) -> IpNet {
        self.cluster
    }

    /// The prefix length of every slice.
    pub fn slice_prefix(&self) -> u8 {
        self.slice_prefix
    }

    /// How many slices the cluster CIDR holds.
    pub fn slice_count(&self) -> u64 {
        1u64 << (self.slice_prefix - self.cluster.prefix_len())
    }

    fn host_bits(&self) -> u8 {
        self.family().max_prefix_len() - self.slice_prefix
    }

    fn index_of(&self, addr: IpAddr) -> u64 {
        let offset = addr_bits(addr) - addr_bits(self.cluster.network());
        // The offset is below 2^(host bits + MAX_SLICE_BITS), so the quotient fits.
        (offset >> self.host_bits()) as u64
    }

    /// The slice with this index, if the cluster has that many.
    pub fn slice(&self, index: u64) -> Option<IpNet> {
        if index >= self.slice_count() {
            return None;
        }
        let bits = addr_bits(self.cluster.network()) + (u128::from(index) << self.host_bits());
        IpNet::new(self.family().addr_from_bits(bits), self.slice_prefix).ok()
    }

    /// Where `net` falls in this plan.
    pub fn locate(&self, net: &IpNet) -> Placement {
        if IpFamily::of(net) != self.family() {
            return Placement::WrongFamily;
        }
        // Two CIDRs either nest or are disjoint.
        if net.prefix_len() < self.cluster.prefix_len() {
            return if net.contains(&self.cluster.network()) {
                Placement::Misfit(0..=self.slice_count() - 1)
            } else {
                Placement::Outside
            };
        }
        if !self.cluster.contains(&net.network()) {
            return Placement::Outside;
        }
        let first = self.index_of(net.network());
        if net.prefix_len() == self.slice_prefix && net.addr() == net.network() {
            return Placement::Slice(first);
        }
        Placement::Misfit(first..=self.index_of(net.broadcast()))
    }
}

/// Where a node's existing pod CIDR was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimSource {
    /// `spec.podCIDRs` (or `spec.podCIDR`), immutable once set.
    Spec,
    /// Weft's own annotation for the family.
    Annotation(IpFamily),
}

impl fmt::Display for ClaimSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimSource::Spec => f.write_str("spec.podCIDRs"),
            ClaimSource::Annotation(family) => {
                write!(f, "annotation {}", weft::annotations::pod_cidr_key(*family))
            }
        }
    }
}

impl ClaimSource {
    /// What an operator can do about a bad value from this source.
    fn fix(&self) -> &'static str {
        match self {
            ClaimSource::Spec => {
                "spec.podCIDRs is immutable once set: delete the Node and let it re-register, or change the cluster CIDR/slice size to match"
            }
            ClaimSource::Annotation(_) => {
                "remove the annotation and weft-controller allocates a slice"
            }
        }
    }
}

/// The pod CIDRs a node already carries, as strings from the Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeClaims {
    /// `spec.podCIDRs`, or `[spec.podCIDR]` when only the singular is set.
    pub spec: Vec<String>,
    /// The `weft.dev/pod-cidr` annotation.
    pub annotation_v4: Option<String>,
    /// The `weft.dev/pod-cidr-v6` annotation.
    pub annotation_v6: Option<String>,
}

/// One family's claim: `spec` wins over the annotation, as the kubelet reads spec.
enum Claim {
    None,
    Unparseable(ClaimSource, String),
    Cidr(ClaimSource, IpNet),
}

impl NodeClaims {
    fn unparseable_spec(&self) -> Option<&str> {
        self.spec
            .iter()
            .find(|value| value.parse::<IpNet>().is_err())
            .map(String::as_str)
    }

    fn claim(&self, family: IpFamily) -> Claim {
        let from_spec = self
            .spec
            .iter()
            .filter_map(|value| value.parse::<IpNet>().ok())
            .find(|net| IpFamily::of(net) == family);
        if let Some(net) = from_spec {
            return Claim::Cidr(ClaimSource::Spec, net);
        }
        let annotation = match family {
            IpFamily::V4 => &self.annotation_v4,
            IpFamily::V6 => &self.annotation_v6,
        };
        let source = ClaimSource::Annotation(family);
        match annotation.as_deref().map(str::trim) {
            None | Some("") => Claim::None,
            Some(value) => match value.parse::<IpNet>() {
                Ok(net) if IpFamily::of(&net) == family => Claim::Cidr(source, net),
                _ => Claim::Unparseable(source, value.to_owned()),
            },
        }
    }
}

/// Why a node's existing pod CIDR is left alone and reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimProblem {
    /// Not a CIDR (or the wrong family for its annotation).
    Unparseable {
        /// Where the value was read.
        source: ClaimSource,
        /// The value as found.
        value: String,
    },
    /// No address in common with the cluster CIDR.
    OutsideCluster {
        /// Where the value was read.
        source: ClaimSource,
        /// The claimed CIDR.
        cidr: IpNet,
        /// The cluster CIDR of its family.
        cluster: IpNet,
    },
    /// Inside the cluster CIDR but not one aligned slice. The slices it covers
    /// are not handed to anyone else while the node exists.
    Misfit {
        /// Where the value was read.
        source: ClaimSource,
        /// The claimed CIDR.
        cidr: IpNet,
        /// The slice prefix length of its family.
        slice_prefix: u8,
    },
    /// Exactly a slice, but another node already holds it.
    Duplicate {
        /// Where the value was read.
        source: ClaimSource,
        /// The claimed slice.
        cidr: IpNet,
        /// The node that holds it.
        owner: String,
    },
    /// Exactly a slice, but inside another node's misfit claim.
    Overlap {
        /// Where the value was read.
        source: ClaimSource,
        /// The claimed slice.
        cidr: IpNet,
        /// The node whose claim covers it.
        owner: String,
    },
}

impl ClaimProblem {
    /// A PascalCase reason for Events and a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ClaimProblem::Unparseable { .. } => "PodCidrInvalid",
            ClaimProblem::OutsideCluster { .. } => "PodCidrOutsideClusterCidr",
            ClaimProblem::Misfit { .. } => "PodCidrMisaligned",
            ClaimProblem::Duplicate { .. } => "PodCidrDuplicate",
            ClaimProblem::Overlap { .. } => "PodCidrOverlap",
        }
    }
}

impl fmt::Display for ClaimProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimProblem::Unparseable { source, value } => write!(
                f,
                "{source} holds {value:?}, which is not a CIDR of the right family; {}",
                source.fix()
            ),
            ClaimProblem::OutsideCluster {
                source,
                cidr,
                cluster,
            } => write!(
                f,
                "{source} holds {cidr}, outside the cluster CIDR {cluster}; {}",
                source.fix()
            ),
            ClaimProblem::Misfit {
                source,
                cidr,
                slice_prefix,
            } => write!(
                f,
                "{source} holds {cidr}, which is not an aligned /{slice_prefix} slice of the cluster CIDR; its addresses are kept from other nodes; {}",
                source.fix()
            ),
            ClaimProblem::Duplicate {
                source,
                cidr,
                owner,
            } => write!(
                f,
                "{source} holds {cidr}, which is already node {owner}'s slice; {}",
                source.fix()
            ),
            ClaimProblem::Overlap {
                source,
                cidr,
                owner,
            } => write!(
                f,
                "{source} holds {cidr}, which lies inside node {owner}'s pod CIDR; {}",
                source.fix()
            ),
        }
    }
}

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
struct SlicePool {
    plan: SlicePlan,
    owners: BTreeMap<u64, String>,
    slice_of: HashMap<String, u64>,
    /// Misfit claims: address space kept from everyone while the node exists.
    blocks: HashMap<String, RangeInclusive<u64>>,
    holds: BTreeMap<u64, Hold>,
    hold_of: HashMap<String, u64>,
    /// Every index below this is owned, blocked or held, so the lowest-free
    /// search starts here instead of at 0.
    search_from: u64,
}

enum FamilyOutcome {
    Adopted,
    Problem(ClaimProblem),
    Unclaimed,
}

impl SlicePool {
    fn new(plan: SlicePlan) -> Self {
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

    fn blocker_of(&self, index: u64) -> Option<&str> {
        self.blocks
            .iter()
            .find(|(_, range)| range.contains(&index))
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
        if let Some(range) = self.blocks.remove(node) {
            self.search_from = self.search_from.min(*range.start());
        }
    }

    /// Frees the node's slice and block; returns the freed slice index.
    fn release(&mut self, node: &str) -> Option<u64> {
        self.unblock(node);
        let index = self.slice_of.remove(node)?;
        self.owners.remove(&index);
        self.search_from = self.search_from.min(index);
        Some(index)
    }

    /// Checks the node's claim for this family and records a valid one.
    fn adopt(&mut self, node: &str, claim: Claim) -> FamilyOutcome {
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
                if let Some(owner) = self.owners.get(&index).filter(|owner| *owner != node) {
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
            self.blocks.insert(node.to_owned(), range);
        }
        FamilyOutcome::Problem(problem)
    }

    /// The node's current slice, its held slice, the lowest free one, or
    /// (only when nothing else is free) the lowest slice held for another.
    fn allocate(&mut self, node: &str, now: Instant) -> Option<IpNet> {
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

    fn hold(&mut self, node: &str, index: u64, until: Instant) {
        self.holds.insert(
            index,
            Hold {
                node: node.to_owned(),
                until,
            },
        );
        self.hold_of.insert(node.to_owned(), index);
    }

    fn usage(&self) -> PoolUsage {
        let blocked_unowned: u64 = self
            .blocks
            .values()
            .map(|range| {
                let size = range.end() - range.start() + 1;
                size - self.owners.range(range.clone()).count() as u64
            })
            .sum();
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
        let mut unclaimed = Vec::new();
        for pool in self.pools_mut() {
            match pool.adopt(node, claims.claim(pool.plan.family())) {
                FamilyOutcome::Adopted => {}
                FamilyOutcome::Problem(problem) => problems.push(problem),
                FamilyOutcome::Unclaimed => unclaimed.push(pool.plan.family()),
            }
        }
        if !problems.is_empty() {
            self.waiting.insert(node.to_owned());
            return Assignment::Conflicted(problems);
        }
        let mut exhausted = Vec::new();
        for pool in self.pools_mut() {
            let family = pool.plan.family();
            if unclaimed.contains(&family) && pool.allocate(node, now).is_none() {
                exhausted.push(family);
            }
        }
        if !exhausted.is_empty() {
            self.waiting.insert(node.to_owned());
            return Assignment::Exhausted(exhausted);
        }
        self.waiting.remove(node);
        let slice = |pool: &SlicePool| pool.slice_of.get(node).and_then(|i| pool.plan.slice(*i));
        Assignment::Allocated(NodeSlices {
            v4: slice(&self.v4).expect("every family was adopted or allocated"),
            v6: self
                .v6
                .as_ref()
                .map(|pool| slice(pool).expect("every family was adopted or allocated")),
        })
    }

    /// Records `node`'s valid existing claims without allocating anything.
    /// Rebuilding feeds every node through this before any [`assign`]: a
    /// fresh allocation can then never take a slice a node already carries,
    /// and the first claimant (oldest node) keeps a contested slice.
    ///
    /// [`assign`]: PodCidrAllocator::assign
    pub fn adopt_existing(&mut self, node: &str, claims: &NodeClaims) {
        for pool in self.pools_mut() {
            pool.adopt(node, claims.claim(pool.plan.family()));
        }
    }

    /// Forgets a deleted node: its slices are freed (and held for its name),
    /// its blocks lifted. Returns whether any address space became free.
    pub fn release(&mut self, node: &str, now: Instant) -> bool {
        self.waiting.remove(node);
        let until = now + self.hold;
        let keep = !self.hold.is_zero();
        let mut freed = false;
        for pool in self.pools_mut() {
            freed |= pool.blocks.contains_key(node);
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
            .flat_map(|pool| pool.slice_of.keys().chain(pool.blocks.keys()))
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
    fn plan_rejects_unusable_settings() {
        let cluster = net("10.244.0.0/16");
        assert!(matches!(
            SlicePlan::new(cluster, 8),
            Err(CidrError::SliceLargerThanCluster { .. })
        ));
        assert!(matches!(
            SlicePlan::new(cluster, 31),
            Err(CidrError::SliceTooSmall { max: 30, .. })
        ));
        assert!(matches!(
            SlicePlan::new(net("10.244.1.0/16"), 24),
            Err(CidrError::HostBitsSet { .. })
        ));
        assert!(matches!(
            SlicePlan::new(net("fd00::/8"), 120),
            Err(CidrError::TooManySlices { bits: 112, .. })
        ));
        assert!(matches!(
            SlicePlan::for_family(IpFamily::V6, cluster, 24),
            Err(CidrError::WrongFamily { .. })
        ));
        let message = SlicePlan::new(cluster, 31).unwrap_err().to_string();
        assert!(message.contains("at most 30"), "{message}");
    }

    #[test]
    fn plan_numbers_slices_from_the_bottom() {
        let p = plan("10.244.0.0/16", 24);
        assert_eq!(p.slice_count(), 256);
        assert_eq!(p.slice(0), Some(net("10.244.0.0/24")));
        assert_eq!(p.slice(255), Some(net("10.244.255.0/24")));
        assert_eq!(p.slice(256), None);
        let p6 = plan("fd00:10::/48", 64);
        assert_eq!(p6.slice_count(), 65536);
        assert_eq!(p6.slice(3), Some(net("fd00:10:0:3::/64")));
        assert_eq!(p6.locate(&net("fd00:10:0:ff::/64")), Placement::Slice(255));
    }

    #[test]
    fn plan_locates_misfits_and_outsiders() {
        let p = plan("10.244.0.0/16", 24);
        assert_eq!(p.locate(&net("10.244.7.0/24")), Placement::Slice(7));
        assert_eq!(p.locate(&net("10.244.6.0/23")), Placement::Misfit(6..=7));
        assert_eq!(p.locate(&net("10.244.7.128/25")), Placement::Misfit(7..=7));
        assert_eq!(p.locate(&net("10.244.7.5/24")), Placement::Misfit(7..=7));
        assert_eq!(p.locate(&net("10.0.0.0/8")), Placement::Misfit(0..=255));
        assert_eq!(p.locate(&net("10.245.0.0/24")), Placement::Outside);
        assert_eq!(p.locate(&net("11.0.0.0/8")), Placement::Outside);
        assert_eq!(p.locate(&net("fd00::/64")), Placement::WrongFamily);
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
    fn spec_wins_over_a_stale_annotation() {
        let mut a = v4_only("10.244.0.0/16", 24);
        let claims = NodeClaims {
            spec: vec!["10.244.5.0/24".into()],
            annotation_v4: Some("10.244.6.0/24".into()),
            ..NodeClaims::default()
        };
        let s = allocated(a.assign("n", &claims, Instant::now()));
        assert_eq!(s.v4, net("10.244.5.0/24"));
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
