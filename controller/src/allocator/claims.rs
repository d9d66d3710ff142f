//! What a node already carries (`spec.podCIDRs`, Weft's annotations) and
//! what is wrong with it. A problem names where the value was read and what
//! an operator can do about it, since the controller never rewrites it.

use std::fmt;

use ipnet::IpNet;
use weft_core::ip::IpFamily;

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
                write!(
                    f,
                    "annotation {}",
                    weft_core::annotations::pod_cidr_key(*family)
                )
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
pub(super) enum Claim {
    None,
    Unparseable(ClaimSource, String),
    Cidr(ClaimSource, IpNet),
}

/// A family's annotation that is set but says something else than
/// `spec.podCIDRs`: the controller may not change it, so it is reported and
/// both values are kept from other nodes.
pub(super) struct AnnotationDispute {
    /// The family's CIDR in `spec.podCIDRs`.
    pub(super) spec: IpNet,
    /// The annotation as found.
    pub(super) value: String,
    /// The annotation's CIDR when it is one of the right family: the node's
    /// agent may be using it.
    pub(super) cidr: Option<IpNet>,
}

impl NodeClaims {
    /// The first `spec` value that is not a CIDR at all.
    pub(super) fn unparseable_spec(&self) -> Option<&str> {
        self.spec
            .iter()
            .find(|value| value.parse::<IpNet>().is_err())
            .map(String::as_str)
    }

    /// Whether the IPv4 annotation (which only the controller writes)
    /// records the node's spec: the slice was assigned by this controller.
    pub fn assigned(&self) -> bool {
        self.annotation_v4.is_some() && self.spec.first() == self.annotation_v4.as_ref()
    }

    fn spec_cidr(&self, family: IpFamily) -> Option<IpNet> {
        self.spec
            .iter()
            .filter_map(|value| value.parse::<IpNet>().ok())
            .find(|net| IpFamily::of(net) == family)
    }

    /// The family's annotation when it is set. Only an absent or empty
    /// annotation is unset: the node-write policy lets the controller write
    /// exactly those, so anything else (blanks too) is a value it must keep.
    fn annotation(&self, family: IpFamily) -> Option<&str> {
        let annotation = match family {
            IpFamily::V4 => &self.annotation_v4,
            IpFamily::V6 => &self.annotation_v6,
        };
        annotation.as_deref().filter(|value| !value.is_empty())
    }

    /// The node's claim for `family`.
    pub(super) fn claim(&self, family: IpFamily) -> Claim {
        if let Some(net) = self.spec_cidr(family) {
            return Claim::Cidr(ClaimSource::Spec, net);
        }
        let Some(value) = self.annotation(family) else {
            return Claim::None;
        };
        let source = ClaimSource::Annotation(family);
        match parse_of_family(value, family) {
            Some(net) => Claim::Cidr(source, net),
            None => Claim::Unparseable(source, value.to_owned()),
        }
    }

    /// The family's annotation when `spec.podCIDRs` carries the family and
    /// the annotation is set to another value.
    pub(super) fn annotation_dispute(&self, family: IpFamily) -> Option<AnnotationDispute> {
        let spec = self.spec_cidr(family)?;
        let value = self.annotation(family)?;
        let cidr = parse_of_family(value, family);
        (cidr != Some(spec)).then(|| AnnotationDispute {
            spec,
            value: value.to_owned(),
            cidr,
        })
    }
}

/// `value` as a CIDR of `family`, surrounding blanks ignored.
fn parse_of_family(value: &str, family: IpFamily) -> Option<IpNet> {
    value
        .trim()
        .parse::<IpNet>()
        .ok()
        .filter(|net| IpFamily::of(net) == family)
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
    /// Not inside the cluster CIDR (disjoint from it, or wider).
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
    /// The annotation is set, but to something else than `spec.podCIDRs`.
    /// The controller never changes a set annotation: the node keeps its
    /// spec slice, the annotation's address space is kept from other nodes
    /// too (the node's agent may route it), and nothing is written.
    AnnotationDisagreesWithSpec {
        /// The node, for the fix's command line.
        node: String,
        /// The annotation's family.
        family: IpFamily,
        /// The annotation as found.
        annotation: String,
        /// The family's CIDR in `spec.podCIDRs`.
        spec: IpNet,
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
            ClaimProblem::AnnotationDisagreesWithSpec { .. } => "AnnotationDisagreesWithSpec",
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
                "{source} holds {cidr}, which is not inside the cluster CIDR {cluster}; {}",
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
            ClaimProblem::AnnotationDisagreesWithSpec {
                node,
                family,
                annotation,
                spec,
            } => {
                let key = weft_core::annotations::pod_cidr_key(*family);
                write!(
                    f,
                    "node {node}: annotation {key} holds {annotation:?} but spec.podCIDRs holds {spec}; weft-controller never changes a set annotation, so it leaves the node as it is and keeps both from other nodes; the kubelet uses spec.podCIDRs: an administrator removes the annotation with `kubectl annotate node {node} {key}-` and weft-controller writes {spec} into it"
                )
            }
        }
    }
}
