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
/// Both are write-once, and only ever added: `spec.podCIDR`/`spec.podCIDRs`
/// are written only while empty (the API server refuses to change them once
/// set), and each annotation only while absent or empty (the node-write
/// policy refuses to change or remove a set one). The allocator hands out
/// slices only to nodes whose set annotations agree with them, so a node
/// that carries its slices needs no write. The patch carries the node's
/// resourceVersion, which makes it conditional: if the node changed since
/// it was read the server answers 409 and the reconcile is retried on the
/// fresh object.
pub(crate) fn slice_patch(node: &Node, slices: &NodeSlices) -> Option<Value> {
    let existing = node.annotations();
    let mut annotations = Map::new();
    for (key, slice) in [(POD_CIDR, Some(slices.v4)), (POD_CIDR_V6, slices.v6)] {
        let Some(slice) = slice else { continue };
        if existing.get(key).is_none_or(String::is_empty) {
            annotations.insert(key.to_owned(), Value::String(slice.to_string()));
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
    use std::time::{Duration, Instant};

    use super::*;
    use crate::allocator::{Assignment, PodCidrAllocator};
    use k8s_openapi::api::core::v1::NodeSpec;
    use kube::api::ObjectMeta;
    use weft_core::slice::SlicePlan;

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

    #[test]
    fn only_absent_or_empty_annotations_are_written() {
        let wanted = slices("10.244.3.0/24", Some("fd00:0:0:3::/64"));
        // (existing IPv4 annotation, whether the patch may write it)
        for (existing, writes) in [
            (None, true),
            (Some(""), true),
            (Some("10.244.3.0/24"), false),
            (Some("10.244.99.0/24"), false),
            (Some(" 10.244.3.0/24"), false),
            (Some(" "), false),
            (Some("banana"), false),
        ] {
            let annotations: Vec<(&str, &str)> = existing
                .into_iter()
                .map(|value| (POD_CIDR, value))
                .collect();
            let patch = slice_patch(&node(None, &annotations), &wanted).unwrap();
            let written = &patch["metadata"]["annotations"];
            assert_eq!(
                written.get(POD_CIDR).is_some(),
                writes,
                "{existing:?}: {patch}"
            );
            assert_eq!(written[POD_CIDR_V6], "fd00:0:0:3::/64", "{patch}");
        }
    }

    /// A Node as `patch` (a merge patch from [`slice_patch`]) leaves it.
    fn apply(node: &mut Node, patch: &Value) {
        if let Some(written) = patch["metadata"]["annotations"].as_object() {
            let annotations = node.metadata.annotations.get_or_insert_default();
            for (key, value) in written {
                annotations.insert(key.clone(), value.as_str().unwrap().to_owned());
            }
        }
        if let Some(cidrs) = patch["spec"]["podCIDRs"].as_array() {
            let spec = node.spec.get_or_insert_default();
            let cidrs: Vec<String> = cidrs.iter().map(|c| c.as_str().unwrap().into()).collect();
            spec.pod_cidr = Some(cidrs[0].clone());
            spec.pod_cidrs = Some(cidrs);
        }
    }

    const SPECS: &[&[&str]] = &[
        &[],
        &["10.244.1.0/24"],
        &["10.244.2.0/24"],
        &["10.244.1.0/24", "fd00:10::/64"],
        &["192.168.0.0/24"],
        &["10.244.0.0/23"],
        &["not-a-cidr"],
    ];
    const V4_ANNOTATIONS: &[Option<&str>] = &[
        None,
        Some(""),
        Some(" "),
        Some("banana"),
        Some("10.244.1.0/24"),
        Some(" 10.244.1.0/24"),
        Some("10.244.2.0/24"),
        Some("10.244.0.0/20"),
        Some("fd00:10::/64"),
    ];
    const V6_ANNOTATIONS: &[Option<&str>] = &[
        None,
        Some(""),
        Some("fd00:10::/64"),
        Some("fd00:10:0:0::/64"),
        Some("fd00:10:0:1::/64"),
        Some("10.244.1.0/24"),
    ];

    fn node_state(spec: usize, v4: usize, v6: usize) -> Node {
        let annotations: Vec<(&str, &str)> = [
            V4_ANNOTATIONS[v4].map(|value| (POD_CIDR, value)),
            V6_ANNOTATIONS[v6].map(|value| (POD_CIDR_V6, value)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let spec = SPECS[spec];
        node((!spec.is_empty()).then(|| spec.to_vec()), &annotations)
    }

    proptest::proptest! {
        /// Whatever nodes carry and in whatever order they are seen, no
        /// patch changes or removes a set annotation or a set spec; and a
        /// node that was patched carries its slices (annotations included),
        /// so looking at it again writes nothing.
        #[test]
        fn no_patch_changes_or_removes_a_set_annotation(
            nodes in proptest::collection::vec(
                (0..4usize, 0..SPECS.len(), 0..V4_ANNOTATIONS.len(), 0..V6_ANNOTATIONS.len()),
                1..24,
            )
        ) {
            let mut allocator = PodCidrAllocator::new(
                SlicePlan::new("10.244.0.0/16".parse().unwrap(), 24).unwrap(),
                Some(SlicePlan::new("fd00:10::/48".parse().unwrap(), 64).unwrap()),
                Duration::ZERO,
            );
            let now = Instant::now();
            for (name, spec, v4, v6) in nodes {
                let name = format!("n{name}");
                let mut node = node_state(spec, v4, v6);
                node.metadata.name = Some(name.clone());
                let Assignment::Allocated(slices) = allocator.assign(&name, &claims_of(&node), now) else {
                    continue;
                };
                let Some(patch) = slice_patch(&node, &slices) else {
                    continue;
                };
                let before = claims_of(&node);
                if let Some(written) = patch["metadata"]["annotations"].as_object() {
                    for (key, value) in written {
                        let existing = node.annotations().get(key);
                        proptest::prop_assert!(
                            existing.is_none_or(String::is_empty),
                            "{key}={existing:?} rewritten by {patch}"
                        );
                        proptest::prop_assert!(value.is_string(), "{key} removed by {patch}");
                    }
                }
                proptest::prop_assert!(
                    before.spec.is_empty() || patch.get("spec").is_none(),
                    "spec {:?} rewritten by {patch}", before.spec
                );
                apply(&mut node, &patch);
                let after = claims_of(&node);
                // The agents read the annotations: they name the node's slices.
                let parsed = |value: &Option<String>| value.as_deref().and_then(|v| v.trim().parse().ok());
                let carried = (parsed(&after.annotation_v4), parsed(&after.annotation_v6));
                proptest::prop_assert_eq!(carried, (Some(slices.v4), slices.v6));
                proptest::prop_assert_eq!(
                    allocator.assign(&name, &after, now),
                    Assignment::Allocated(slices)
                );
                proptest::prop_assert_eq!(slice_patch(&node, &slices), None);
            }
        }
    }
}
