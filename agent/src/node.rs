//! Reading Node objects into the few fields the agent keeps, and the
//! patches it writes to its own Node.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};

use super::config::Backend;
use super::peer::{MalformedField, Peer};
use weft_core::annotations::VtepMac;
use weft_core::annotations::{self, BackendData};
use weft_core::ip::IpFamily;

/// The Node condition the agent sets once the node is programmed.
pub const CONDITION_TYPE: &str = "NetworkUnavailable";
/// Its reason.
pub const CONDITION_REASON: &str = "WeftIsUp";

/// What the agent reads of its own Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnNode {
    /// The slices the controller assigned (IPv4 first).
    pub pod_cidrs: Vec<IpNet>,
    /// The first InternalIP in status.addresses.
    pub internal_ip: Option<IpAddr>,
    /// `weft.dev/public-ip-overwrite`.
    pub public_ip_overwrite: Option<IpAddr>,
    /// The VTEP MAC published earlier, restored on device re-creation.
    pub published_vtep_mac: Option<VtepMac>,
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
    OwnNode {
        // A malformed slice is the controller's to repair; until then the
        // agent waits as for a node without one.
        pod_cidrs: pod_cidrs(node).unwrap_or_default(),
        internal_ip,
        public_ip_overwrite: annotation(node, annotations::PUBLIC_IP_OVERWRITE)
            .and_then(|text| text.parse().ok()),
        published_vtep_mac: published
            .backend_data
            .as_ref()
            .and_then(|data| data.vtep_mac),
        published,
        network_up,
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
}
