//! Reading Node objects into the few fields the agent keeps, the checks
//! this node's own slices must pass before anything is programmed from
//! them, and the patches the agent writes to its own Node.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};

use super::config::{AgentConfig, Backend};
use super::peer::{MalformedField, Peer};
use weft_core::annotations::VtepMac;
use weft_core::annotations::{self, BackendData};
use weft_core::ip::IpFamily;
use weft_core::slice::{cluster_cidr_key, slice_size_key, Placement, SlicePlan};

/// The Node condition the agent sets once the node is programmed.
pub const CONDITION_TYPE: &str = "NetworkUnavailable";
/// Its reason.
pub const CONDITION_REASON: &str = "WeftIsUp";

/// What the agent reads of its own Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnNode {
    /// The slices the controller assigned (IPv4 first); empty when an
    /// annotation does not parse.
    pub pod_cidrs: Vec<IpNet>,
    /// A slice annotation that does not parse, which [`check_own_slices`]
    /// refuses.
    pub malformed_pod_cidr: Option<MalformedField>,
    /// The first InternalIP in status.addresses.
    pub internal_ip: Option<IpAddr>,
    /// `weft.dev/public-ip-overwrite`.
    pub public_ip_overwrite: Option<IpAddr>,
    /// The published annotations as they stand, to skip no-op patches.
    pub published: Published,
    /// Whether NetworkUnavailable=False with reason WeftIsUp is set.
    pub network_up: bool,
}

/// The agent's annotations on its Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// `weft.dev/backend-type`.
    pub backend_type: Option<String>,
    /// `weft.dev/backend-data`, parsed.
    pub backend_data: Option<BackendData>,
    /// `weft.dev/public-ip`.
    pub public_ip: Option<String>,
}

impl Published {
    /// What the agent publishes for this backend, public IP and MAC.
    pub fn wanted(backend: Backend, public_ip: IpAddr, vtep_mac: Option<VtepMac>) -> Self {
        Published {
            backend_type: Some(backend.as_str().to_string()),
            backend_data: Some(BackendData { vtep_mac }),
            public_ip: Some(public_ip.to_string()),
        }
    }

    /// The merge patch that writes these annotations.
    pub fn patch(&self) -> Value {
        let backend_data = self
            .backend_data
            .as_ref()
            .map(|data| serde_json::to_string(data).expect("BackendData always serializes"));
        json!({
            "metadata": {
                "annotations": {
                    annotations::BACKEND_TYPE: self.backend_type,
                    annotations::BACKEND_DATA: backend_data,
                    annotations::PUBLIC_IP: self.public_ip,
                }
            }
        })
    }
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The node's slices, as the controller assigned them: its
/// `weft.dev/pod-cidr` and `weft.dev/pod-cidr-v6` annotations, each holding
/// a CIDR of its family. `spec.podCIDR(s)` is not read: the controller writes
/// the annotations for every slice it assigns or adopts, and only it may
/// (see docs/security.md), while a node may set its own spec once.
/// A value that does not parse as a CIDR of the key's family is returned as
/// the error, naming the key.
pub fn pod_cidrs(node: &Node) -> Result<Vec<IpNet>, MalformedField> {
    let mut slices = Vec::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let key = annotations::pod_cidr_key(family);
        let Some(text) = annotation(node, key) else {
            continue;
        };
        match text.parse::<IpNet>() {
            Ok(slice) if IpFamily::of(&slice) == family => slices.push(slice),
            _ => return Err(malformed(key, text)),
        }
    }
    Ok(slices)
}

fn malformed(field: &'static str, value: &str) -> MalformedField {
    MalformedField {
        field,
        // Bounded, so a huge annotation is not copied into every log line.
        value: value.chars().take(64).collect(),
    }
}

fn published(node: &Node) -> Published {
    Published {
        backend_type: annotation(node, annotations::BACKEND_TYPE).map(str::to_string),
        backend_data: annotation(node, annotations::BACKEND_DATA)
            .and_then(|text| serde_json::from_str(text).ok()),
        public_ip: annotation(node, annotations::PUBLIC_IP).map(str::to_string),
    }
}

/// Another node as a peer; `None` until its agent has published a public
/// IP. A peer with an annotation that does not parse is returned with it
/// recorded in [`Peer::malformed`], to be rejected with that reason rather
/// than ignored without a word.
pub fn peer_of(node: &Node) -> Option<Peer> {
    let name = node.metadata.name.clone()?;
    let public_ip_text = annotation(node, annotations::PUBLIC_IP)?;
    let mut problem = None;
    let public_ip = public_ip_text.parse().unwrap_or_else(|_| {
        problem = Some(malformed(annotations::PUBLIC_IP, public_ip_text));
        IpAddr::from([0, 0, 0, 0])
    });
    let vtep_mac = match annotation(node, annotations::BACKEND_DATA) {
        None => None,
        Some(text) => match serde_json::from_str::<BackendData>(text) {
            Ok(data) => data.vtep_mac,
            Err(_) => {
                problem.get_or_insert_with(|| malformed(annotations::BACKEND_DATA, text));
                None
            }
        },
    };
    let pod_cidrs = pod_cidrs(node).unwrap_or_else(|field| {
        problem.get_or_insert(field);
        Vec::new()
    });
    Some(Peer {
        node_name: name,
        pod_cidrs,
        public_ip,
        vtep_mac,
        created: node
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(i64::MAX, |time| time.0.as_second()),
        malformed: problem.map(Box::new),
    })
}

/// The agent's own node.
pub fn own_node(node: &Node) -> OwnNode {
    let published = published(node);
    let status = node.status.as_ref();
    let internal_ip = status
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok());
    let network_up = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.type_ == CONDITION_TYPE
                && c.status == "False"
                && c.reason.as_deref() == Some(CONDITION_REASON)
        });
    let (pod_cidrs, malformed_pod_cidr) = match pod_cidrs(node) {
        Ok(slices) => (slices, None),
        Err(malformed) => (Vec::new(), Some(malformed)),
    };
    OwnNode {
        pod_cidrs,
        malformed_pod_cidr,
        internal_ip,
        public_ip_overwrite: annotation(node, annotations::PUBLIC_IP_OVERWRITE)
            .and_then(|text| text.parse().ok()),
        published,
        network_up,
    }
}

/// An address on one of this node's links, as [`check_own_slices`] reads
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    /// The link's name.
    pub link: String,
    /// The address with the prefix of its subnet.
    pub address: IpNet,
}

/// What is wrong with one of this node's slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnSliceProblem {
    /// The annotation does not parse as a CIDR of its family.
    Malformed,
    /// The agent has no cluster CIDR of the slice's family.
    NoClusterCidr,
    /// The slice lies outside the cluster CIDR of its family.
    OutsideClusterCidr {
        /// The cluster CIDR of that family.
        cluster: IpNet,
    },
    /// The slice lies inside the cluster CIDR but is not one aligned slice
    /// of the configured size.
    NotASlice {
        /// The configured prefix length.
        size: u8,
    },
    /// The slice overlaps the subnet of one of this node's addresses (its
    /// underlay's, or another link's): pod routes would take over that
    /// subnet's traffic.
    OverlapsNodeAddress(NodeAddress),
}

/// This node's slice annotation is refused: nothing is programmed from it,
/// and the agent stays not ready and checks again on every retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct OwnSliceError {
    /// This node's name.
    pub node: String,
    /// The annotation key.
    pub field: &'static str,
    /// The family the annotation is for.
    pub family: IpFamily,
    /// Its value (at most 64 characters of it).
    pub value: String,
    /// What is wrong with it.
    pub problem: OwnSliceProblem,
}

impl fmt::Display for OwnSliceProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OwnSliceProblem::Malformed => {
                f.write_str("it is not a CIDR of the annotation's family")
            }
            OwnSliceProblem::NoClusterCidr => {
                f.write_str("the agent has no cluster CIDR of its family")
            }
            OwnSliceProblem::OutsideClusterCidr { cluster } => {
                write!(f, "it lies outside the cluster CIDR {cluster}")
            }
            OwnSliceProblem::NotASlice { size } => {
                write!(f, "it is not an aligned /{size} network, the slice size")
            }
            OwnSliceProblem::OverlapsNodeAddress(NodeAddress { link, address }) => {
                write!(
                    f,
                    "it overlaps {address} on {link}, an address of this node"
                )
            }
        }
    }
}

impl fmt::Display for OwnSliceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let OwnSliceError {
            node,
            field,
            family,
            value,
            problem,
        } = self;
        write!(
            f,
            "node {node}: annotation {field}={value:?} is refused, nothing is programmed from it: {problem}. \
             The controller assigns it: give the agent the controller's {} and {}, \
             or remove the annotation (kubectl annotate node {node} {field}-) so the controller assigns a slice that fits",
            cluster_cidr_key(*family),
            slice_size_key(*family),
        )
    }
}

/// Checks this node's slices as a peer's are checked
/// ([`crate::screen`]): each must be exactly one aligned slice of the
/// configured size inside the cluster CIDR of its family, and clear of the
/// subnets of `addresses`, this node's addresses (Weft's own devices left
/// out). Returns the slices when all pass.
pub fn check_own_slices(
    node: &str,
    own: &OwnNode,
    config: &AgentConfig,
    addresses: &[NodeAddress],
) -> Result<Vec<IpNet>, OwnSliceError> {
    let refuse = |family, value: String, problem| OwnSliceError {
        node: node.to_string(),
        field: annotations::pod_cidr_key(family),
        family,
        value,
        problem,
    };
    if let Some(malformed) = &own.malformed_pod_cidr {
        let family = [IpFamily::V4, IpFamily::V6]
            .into_iter()
            .find(|&family| annotations::pod_cidr_key(family) == malformed.field)
            .unwrap_or(IpFamily::V4);
        return Err(refuse(
            family,
            malformed.value.clone(),
            OwnSliceProblem::Malformed,
        ));
    }
    for slice in &own.pod_cidrs {
        check_own_slice(config, addresses, slice)
            .map_err(|problem| refuse(IpFamily::of(slice), slice.to_string(), problem))?;
    }
    Ok(own.pod_cidrs.clone())
}

fn check_own_slice(
    config: &AgentConfig,
    addresses: &[NodeAddress],
    slice: &IpNet,
) -> Result<(), OwnSliceProblem> {
    let family = IpFamily::of(slice);
    let size = config.slice_size(family);
    let clusters: Vec<IpNet> = config
        .cluster_cidrs
        .iter()
        .copied()
        .filter(|cluster| IpFamily::of(cluster) == family)
        .collect();
    let Some(&first) = clusters.first() else {
        return Err(OwnSliceProblem::NoClusterCidr);
    };
    // The configuration passed the same plans when it was resolved. Cluster
    // CIDRs do not overlap: the first that holds the slice decides.
    let placement = clusters
        .iter()
        .filter_map(|cluster| SlicePlan::for_family(family, *cluster, size).ok())
        .map(|plan| plan.locate(slice))
        .find(|placement| !matches!(placement, Placement::Outside | Placement::WrongFamily));
    match placement {
        Some(Placement::Slice(_)) => {}
        Some(_) => return Err(OwnSliceProblem::NotASlice { size }),
        None => return Err(OwnSliceProblem::OutsideClusterCidr { cluster: first }),
    }
    match addresses.iter().find(|node_address| {
        let subnet = node_address.address.trunc();
        subnet.contains(&slice.network()) || slice.contains(&subnet.network())
    }) {
        Some(node_address) => Err(OwnSliceProblem::OverlapsNodeAddress(node_address.clone())),
        None => Ok(()),
    }
}

/// The strategic-merge status patch that sets NetworkUnavailable=False
/// (conditions merge by type, so the kubelet's conditions stay).
pub fn network_up_patch(now: &str) -> Value {
    json!({
        "status": {
            "conditions": [{
                "type": CONDITION_TYPE,
                "status": "False",
                "reason": CONDITION_REASON,
                "message": "Weft agent has programmed this node's pod network",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::dual_stack_config as config;
    fn node(value: Value) -> Node {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn peer_needs_a_public_ip_and_reads_slices_and_mac() {
        let bare = node(json!({"metadata": {"name": "b"}, "spec": {"podCIDR": "10.244.1.0/24"}}));
        assert_eq!(peer_of(&bare), None);
        let ready = node(json!({
            "metadata": {"name": "b", "creationTimestamp": "2026-01-02T03:04:05Z", "annotations": {
                "weft.dev/pod-cidr": "10.244.1.0/24",
                "weft.dev/pod-cidr-v6": "fd00:10:244:1::/64",
                "weft.dev/public-ip": "172.31.0.11",
                "weft.dev/backend-data": "{\"vtepMAC\":\"0a:58:00:00:00:01\"}",
            }},
            "spec": {"podCIDR": "10.9.9.0/24"},
        }));
        let peer = peer_of(&ready).unwrap();
        assert_eq!(peer.node_name, "b");
        assert_eq!(peer.pod_cidrs.len(), 2);
        assert_eq!(peer.pod_cidrs[0].to_string(), "10.244.1.0/24");
        assert_eq!(peer.public_ip.to_string(), "172.31.0.11");
        assert_eq!(peer.vtep_mac.unwrap().to_string(), "0a:58:00:00:00:01");
        assert_eq!(peer.created, 1_767_323_045);
        assert_eq!(peer.malformed, None);
    }

    #[test]
    fn slices_come_only_from_the_controller_annotations() {
        let n = node(
            json!({"metadata": {"name": "b"}, "spec": {"podCIDRs": ["10.244.1.0/24", "fd00::/64"]}}),
        );
        assert_eq!(pod_cidrs(&n), Ok(Vec::new()));
    }

    #[test]
    fn malformed_annotations_are_recorded_with_their_key() {
        let with = |annotations: Value| {
            let mut all = json!({"weft.dev/public-ip": "172.31.0.11"});
            all.as_object_mut()
                .unwrap()
                .extend(annotations.as_object().unwrap().clone());
            peer_of(&node(
                json!({"metadata": {"name": "b", "annotations": all}}),
            ))
            .unwrap()
            .malformed
            .map(|m| m.field)
        };
        assert_eq!(with(json!({})), None);
        assert_eq!(
            with(json!({"weft.dev/pod-cidr": "2000::/3"})),
            Some("weft.dev/pod-cidr")
        );
        assert_eq!(
            with(json!({"weft.dev/pod-cidr-v6": "10.0.0.0/8"})),
            Some("weft.dev/pod-cidr-v6")
        );
        assert_eq!(
            with(json!({"weft.dev/public-ip": "nowhere"})),
            Some("weft.dev/public-ip")
        );
        assert_eq!(
            with(json!({"weft.dev/backend-data": "{\"vtepMAC\":\"00:00:00:00:00:00\"}"})),
            Some("weft.dev/backend-data")
        );
    }

    #[test]
    fn own_node_reads_addresses_overwrite_and_condition() {
        let n = node(json!({
            "metadata": {"name": "a", "annotations": {"weft.dev/public-ip-overwrite": "203.0.113.9"}},
            "status": {
                "addresses": [{"type": "Hostname", "address": "a"}, {"type": "InternalIP", "address": "172.31.0.10"}],
                "conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "WeftIsUp"}],
            },
        }));
        let own = own_node(&n);
        assert_eq!(own.internal_ip.unwrap().to_string(), "172.31.0.10");
        assert_eq!(own.public_ip_overwrite.unwrap().to_string(), "203.0.113.9");
        assert!(own.network_up);
        assert_eq!(own.published, Published::default());
    }

    #[test]
    fn published_round_trips_through_the_patch() {
        let wanted = Published::wanted(
            Backend::Vxlan,
            "172.31.0.10".parse().unwrap(),
            Some("0a:58:00:00:00:02".parse().unwrap()),
        );
        let mut n = node(json!({"metadata": {"name": "a"}}));
        let patch = wanted.patch();
        let annotations = patch["metadata"]["annotations"].as_object().unwrap();
        n.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
        );
        assert_eq!(own_node(&n).published, wanted);
        assert_eq!(
            annotations["weft.dev/backend-data"],
            "{\"vtepMAC\":\"0a:58:00:00:00:02\"}"
        );
    }

    fn addresses() -> Vec<NodeAddress> {
        [
            ("lo", "127.0.0.1/8"),
            ("eth0", "172.31.0.10/24"),
            ("eth0", "fe80::1/64"),
        ]
        .into_iter()
        .map(|(link, address)| NodeAddress {
            link: link.into(),
            address: address.parse().unwrap(),
        })
        .collect()
    }

    fn check(config: &AgentConfig, slices: &[&str]) -> Result<Vec<IpNet>, OwnSliceError> {
        let own = OwnNode {
            pod_cidrs: slices.iter().map(|s| s.parse().unwrap()).collect(),
            ..OwnNode::default()
        };
        check_own_slices("node-a", &own, config, &addresses())
    }

    fn problem(config: &AgentConfig, slice: &str) -> OwnSliceProblem {
        check(config, &[slice]).unwrap_err().problem
    }

    #[test]
    fn own_slices_of_the_cluster_and_size_pass() {
        let slices = ["10.244.3.0/24", "fd00:10:244:7::/64"];
        assert_eq!(
            check(&config(), &slices),
            Ok(slices.iter().map(|s| s.parse().unwrap()).collect())
        );
    }

    #[test]
    fn own_slices_outside_misfit_or_on_a_node_subnet_are_refused() {
        let config = config();
        let outside = |cluster: &str| OwnSliceProblem::OutsideClusterCidr {
            cluster: cluster.parse().unwrap(),
        };
        for (slice, expected) in [
            ("0.0.0.0/0", outside("10.244.0.0/16")),
            ("10.0.0.0/8", outside("10.244.0.0/16")),
            ("10.245.0.0/24", outside("10.244.0.0/16")),
            ("::/0", outside("fd00:10:244::/56")),
            ("10.244.0.0/16", OwnSliceProblem::NotASlice { size: 24 }),
            ("10.244.3.0/25", OwnSliceProblem::NotASlice { size: 24 }),
            ("10.244.3.7/24", OwnSliceProblem::NotASlice { size: 24 }),
            (
                "fd00:10:244:7::/80",
                OwnSliceProblem::NotASlice { size: 64 },
            ),
        ] {
            assert_eq!(problem(&config, slice), expected, "{slice}");
        }
        // A cluster CIDR that holds the underlay: its subnet is refused.
        let mut wide = config.clone();
        wide.cluster_cidrs[0] = "172.16.0.0/12".parse().unwrap();
        assert_eq!(
            problem(&wide, "172.31.0.0/24"),
            OwnSliceProblem::OverlapsNodeAddress(addresses()[1].clone())
        );
        assert_eq!(check(&wide, &["172.31.1.0/24"]).map(|s| s.len()), Ok(1));
        let mut v4_only = config;
        v4_only.cluster_cidrs.truncate(1);
        assert_eq!(
            problem(&v4_only, "fd00:10:244:7::/64"),
            OwnSliceProblem::NoClusterCidr
        );
    }

    #[test]
    fn a_refusal_names_the_annotation_and_the_fix() {
        let error = check(&config(), &["10.244.3.0/24", "fd00:99::/64"]).unwrap_err();
        assert_eq!(error.field, "weft.dev/pod-cidr-v6");
        let message = error.to_string();
        for part in [
            "node node-a",
            "weft.dev/pod-cidr-v6=\"fd00:99::/64\"",
            "outside the cluster CIDR fd00:10:244::/56",
            "clusterCidrV6",
            "sliceSizeV6",
            "kubectl annotate node node-a weft.dev/pod-cidr-v6-",
        ] {
            assert!(message.contains(part), "{part} missing: {message}");
        }
    }

    #[test]
    fn a_malformed_own_annotation_is_refused_not_waited_for() {
        let n = node(json!({"metadata": {"name": "a", "annotations": {
            "weft.dev/pod-cidr": "10.244.3.0/24",
            "weft.dev/pod-cidr-v6": "10.244.9.0/24",
        }}}));
        let own = own_node(&n);
        assert!(own.pod_cidrs.is_empty());
        let error = check_own_slices("a", &own, &config(), &[]).unwrap_err();
        assert_eq!(
            (error.field, error.family, error.problem),
            (
                "weft.dev/pod-cidr-v6",
                IpFamily::V6,
                OwnSliceProblem::Malformed
            )
        );
    }
}
