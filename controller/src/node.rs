//! Reading a Node's existing pod CIDRs and the patch that writes its slices.

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use serde_json::{json, Map, Value};

use crate::allocator::{NodeClaims, NodeSlices};
use weft_core::annotations::{POD_CIDR, POD_CIDR_V6};

/// What the node already carries: `spec.podCIDRs` (or the singular field when
/// only that is set) and Weft's annotations.
pub(crate) fn claims_of(node: &Node) -> NodeClaims {
    let spec = node.spec.as_ref();
    let mut cidrs = spec
        .and_then(|spec| spec.pod_cidrs.clone())
        .unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(
            spec.and_then(|spec| spec.pod_cidr.clone())
                .filter(|cidr| !cidr.is_empty()),
        );
    }
    let annotations = node.annotations();
    NodeClaims {
        spec: cidrs,
        annotation_v4: annotations.get(POD_CIDR).cloned(),
        annotation_v6: annotations.get(POD_CIDR_V6).cloned(),
    }
}

/// The JSON merge patch that makes `node` carry `slices`, or `None` when it
/// already does (so unchanged nodes cost no write).
///
/// `spec.podCIDR`/`spec.podCIDRs` are written only while empty: the API
/// server refuses to change them once set. The annotations are always kept
/// in step. The patch carries the node's resourceVersion, which makes it
/// conditional: if the node changed since it was read the server answers 409
/// and the reconcile is retried on the fresh object.
pub(crate) fn slice_patch(node: &Node, slices: &NodeSlices) -> Option<Value> {
    let existing = node.annotations();
    let mut annotations = Map::new();
    for (key, slice) in [(POD_CIDR, Some(slices.v4)), (POD_CIDR_V6, slices.v6)] {
        let Some(slice) = slice else { continue };
        let text = slice.to_string();
        if existing.get(key) != Some(&text) {
            annotations.insert(key.to_owned(), Value::String(text));
        }
    }
    let write_spec = claims_of(node).spec.is_empty();
    if annotations.is_empty() && !write_spec {
        return None;
    }
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), json!(node.resource_version()));
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), Value::Object(annotations));
    }
    let mut patch = Map::new();
    patch.insert("metadata".into(), Value::Object(metadata));
    if write_spec {
        let cidrs: Vec<String> = slices.to_vec().iter().map(ToString::to_string).collect();
        patch.insert(
            "spec".into(),
            json!({ "podCIDR": cidrs[0], "podCIDRs": cidrs }),
        );
    }
    Some(Value::Object(patch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;
    use kube::api::ObjectMeta;

    fn node(spec: Option<Vec<&str>>, annotations: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                resource_version: Some("42".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: spec.as_ref().map(|cidrs| cidrs[0].to_string()),
                pod_cidrs: spec.map(|cidrs| cidrs.iter().map(|c| c.to_string()).collect()),
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    fn slices(v4: &str, v6: Option<&str>) -> NodeSlices {
        NodeSlices {
            v4: v4.parse().unwrap(),
            v6: v6.map(|v6| v6.parse().unwrap()),
        }
    }

    #[test]
    fn reads_spec_and_annotations() {
        let claims = claims_of(&node(
            Some(vec!["10.244.1.0/24", "fd00::/64"]),
            &[(POD_CIDR, "10.244.1.0/24")],
        ));
        assert_eq!(claims.spec, vec!["10.244.1.0/24", "fd00::/64"]);
        assert_eq!(claims.annotation_v4.as_deref(), Some("10.244.1.0/24"));
        assert_eq!(claims.annotation_v6, None);
        let mut singular = node(None, &[]);
        singular.spec.as_mut().unwrap().pod_cidr = Some("10.244.2.0/24".into());
        assert_eq!(claims_of(&singular).spec, vec!["10.244.2.0/24"]);
    }

    #[test]
    fn empty_node_gets_spec_and_annotations_with_a_precondition() {
        let patch = slice_patch(
            &node(None, &[]),
            &slices("10.244.3.0/24", Some("fd00:0:0:3::/64")),
        )
        .unwrap();
        assert_eq!(
            patch,
            json!({
                "metadata": {
                    "resourceVersion": "42",
                    "annotations": {
                        "weft.dev/pod-cidr": "10.244.3.0/24",
                        "weft.dev/pod-cidr-v6": "fd00:0:0:3::/64",
                    },
                },
                "spec": {
                    "podCIDR": "10.244.3.0/24",
                    "podCIDRs": ["10.244.3.0/24", "fd00:0:0:3::/64"],
                },
            })
        );
    }

    #[test]
    fn set_spec_is_never_rewritten() {
        // Adopted from kube-controller-manager: only the annotation is added.
        let patch = slice_patch(
            &node(Some(vec!["10.244.3.0/24"]), &[]),
            &slices("10.244.3.0/24", None),
        )
        .unwrap();
        assert!(patch.get("spec").is_none(), "{patch}");
        assert_eq!(patch["metadata"]["annotations"][POD_CIDR], "10.244.3.0/24");
        // A single-stack spec in a dual-stack cluster: IPv6 goes to the annotation only.
        let patch = slice_patch(
            &node(Some(vec!["10.244.3.0/24"]), &[(POD_CIDR, "10.244.3.0/24")]),
            &slices("10.244.3.0/24", Some("fd00::/64")),
        )
        .unwrap();
        assert!(patch.get("spec").is_none(), "{patch}");
        assert_eq!(
            patch["metadata"]["annotations"],
            json!({ POD_CIDR_V6: "fd00::/64" })
        );
    }

    #[test]
    fn a_node_that_carries_its_slices_needs_no_write() {
        let done = node(Some(vec!["10.244.3.0/24"]), &[(POD_CIDR, "10.244.3.0/24")]);
        assert_eq!(slice_patch(&done, &slices("10.244.3.0/24", None)), None);
    }
}
