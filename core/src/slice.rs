//! Per IP family a [`SlicePlan`]: the cut of the cluster CIDR into equal
//! per-node slices, and where any CIDR falls among them.
//!
//! The controller hands out the slices and the agent routes them, so both
//! validate their settings through [`SlicePlan::for_family`]: a cluster CIDR
//! and slice size that cannot make a plan are refused with the same error,
//! naming the keys ([`cluster_cidr_key`], [`slice_size_key`]) and the fix.
//! The settings themselves are declared once, in `weft-daemon`.

use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::ip::{addr_bits, IpFamily};
use ipnet::IpNet;

/// Slices may be at most this many bits longer than the cluster CIDR, so the
/// slice count always fits the `i64` a Prometheus gauge carries.
const MAX_SLICE_BITS: u8 = 62;

/// A slice must leave room for the node's bridge gateway and at least one pod.
const MIN_HOST_BITS: u8 = 2;

/// The config key of `family`'s cluster CIDR.
pub fn cluster_cidr_key(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "clusterCidr",
        IpFamily::V6 => "clusterCidrV6",
    }
}

/// The config key of `family`'s slice size.
pub fn slice_size_key(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "sliceSizeV4",
        IpFamily::V6 => "sliceSizeV6",
    }
}

/// Why a cluster CIDR and slice size do not make a usable plan.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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
    #[error(
        "{cluster} is not an {expected} CIDR: an {} cluster CIDR goes in {}",
        IpFamily::of(cluster),
        cluster_cidr_key(IpFamily::of(cluster))
    )]
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
    /// Inside the cluster CIDR but not one aligned slice: a different size,
    /// or host bits set. Covers these slice indexes.
    Misfit(RangeInclusive<u64>),
    /// Not inside the cluster CIDR: disjoint from it, or wider than it
    /// (`0.0.0.0/0`). Such a claim keeps no slice from anyone, or one node
    /// could starve the whole cluster.
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
        if net.prefix_len() < self.cluster.prefix_len() || !self.cluster.contains(&net.network()) {
            return Placement::Outside;
        }
        let first = self.index_of(net.network());
        if net.prefix_len() == self.slice_prefix && net.addr() == net.network() {
            return Placement::Slice(first);
        }
        Placement::Misfit(first..=self.index_of(net.broadcast()))
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
        assert_eq!(p.locate(&net("10.0.0.0/8")), Placement::Outside);
        assert_eq!(p.locate(&net("0.0.0.0/0")), Placement::Outside);
        assert_eq!(p.locate(&net("10.244.0.0/16")), Placement::Misfit(0..=255));
        assert_eq!(p.locate(&net("10.245.0.0/24")), Placement::Outside);
        assert_eq!(p.locate(&net("11.0.0.0/8")), Placement::Outside);
        assert_eq!(p.locate(&net("fd00::/64")), Placement::WrongFamily);
    }
}
