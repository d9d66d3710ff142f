//! A slice of Kubernetes' own network e2e tests, run through the upstream
//! binary exactly as `make conformance` runs the full selection: pod to pod
//! across nodes on both IP families, pod to Service, cluster DNS, hostPort
//! and NetworkPolicy, on the same kubeadm-like dual-stack cluster (four
//! kubelet nodes, the control-plane one tainted, one behind a router) with
//! Weft installed from `manifests/`.
//! Needs root (through `weft_testing::require_root!`: under `CI=true` it
//! never skips), containerd, runc and kubectl; builds e2e.test and agnhost
//! on a cold cache.

use anyhow::{ensure, Result};
use weft_e2e::conformance::{self, Outcome, Selector, SuiteRun};
use weft_testing::require_root;

/// One test per path Weft carries, named in full so each selects one test.
const SLICE: [(&str, &str); 6] = [
    (
        r"\[sig-network\] Networking Granular Checks: Pods should function for intra-pod communication: http \[",
        "pod to pod, on one node and across nodes",
    ),
    (
        r"\[sig-network\] \[Feature:IPv6DualStack\] should be able to reach pod on ipv4 and ipv6 ip",
        "pod to pod over IPv4 and IPv6",
    ),
    (
        r"\[sig-network\] Networking Granular Checks: Services should function for pod-Service: http$",
        "pod to ClusterIP and NodePort Services",
    ),
    (
        r"\[sig-network\] DNS should provide DNS for services \[Conformance\]",
        "cluster DNS over the pod network",
    ),
    (
        r"\[sig-network\] HostPort validates that there is no conflict",
        "hostPort mappings by the CNI plugin",
    ),
    (
        r"\[sig-network\] Netpol NetworkPolicy between server and client should enforce policy based on PodSelector and NamespaceSelector \[",
        "NetworkPolicy enforced by the agents, selectors across namespaces",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_network_tests_pass_on_weft() -> Result<()> {
    require_root!("kubelet nodes: namespaces, cgroups, containerd");
    let full = SuiteRun::from_selection_files()?;
    let suite = SuiteRun {
        focus: SLICE
            .iter()
            .map(|(pattern, reason)| Selector {
                pattern: (*pattern).to_owned(),
                reason: (*reason).to_owned(),
            })
            .collect(),
        output: full.output.join("slice"),
        ..full
    };
    let results = conformance::run(&suite).await?;
    for test in &results.tests {
        eprintln!("conformance slice: {:?} {}", test.outcome, test.name);
    }
    let not_passed: Vec<_> = results
        .tests
        .iter()
        .filter(|test| test.outcome != Outcome::Passed)
        .map(|test| format!("{} ({:?}): {}", test.name, test.outcome, test.detail))
        .collect();
    ensure!(
        not_passed.is_empty(),
        "upstream tests did not pass (output in {}):\n{}",
        suite.output.display(),
        not_passed.join("\n\n")
    );
    // An upstream rename would otherwise select nothing, and pass.
    ensure!(
        results.tests.len() == SLICE.len(),
        "expected {} tests, ran {}: {:#?}",
        SLICE.len(),
        results.tests.len(),
        results.tests.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    Ok(())
}
