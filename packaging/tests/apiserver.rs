//! Both install paths against a real kube-apiserver (the e2e harness's):
//! every render passes server-side validation, `helm install` creates RBAC
//! that grants each component what it uses and nothing more, and the node
//! write policy holds each component (and each kubelet) to its own part of
//! the Node objects, a set slice in place and the controller to its own
//! Lease, with NodeRestriction keeping each kubelet to its own pods' tokens.
//! Needs root (the harness, through
//! `weft_testing::require_root!`: under `CI=true` none skips) and kubectl on
//! PATH.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, ServiceAccount};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::{json, Value};
use weft_agent::node::network_up_patch;
use weft_e2e::{build_helm, Cluster, Kubectl};
use weft_packaging::{chart_dir, plain_manifests, render_into, rendered_files, Rendered};
use weft_testing::{eventually, require_root, run};

/// How long the API server may take to enforce a newly created policy.
const POLICY_PATIENCE: Duration = Duration::from_secs(120);

/// The user kubectl impersonates for ServiceAccount `kube-system/<account>`.
fn service_account(account: &str) -> String {
    format!("system:serviceaccount:kube-system:{account}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_render_passes_server_side_validation() -> Result<()> {
    require_root!("the e2e harness's cluster");
    let helm = build_helm()?;
    let out = tempfile::tempdir()?;
    render_into(&helm, out.path())?;
    let cluster = Cluster::start_control_plane_only().await?;
    let kubectl = Kubectl::new(cluster.kubeconfig());

    // What a user runs, from the repository.
    kubectl.apply_dry_run(&weft_testing::repository().join("manifests"))?;
    // And fresh `helm template` output for every values file; namespaced
    // objects need their namespace to exist, even in a dry run.
    for file in rendered_files()? {
        let path = out.path().join(&file);
        let mut namespaces: Vec<String> = Rendered::load(&path)?
            .identities()
            .into_iter()
            .filter_map(|(_, namespace, _)| namespace)
            .collect();
        namespaces.sort();
        namespaces.dedup();
        for namespace in &namespaces {
            kubectl.ensure_namespace(namespace)?;
        }
        let applied = kubectl.apply_dry_run(&path)?;
        ensure!(
            applied.contains("daemonset.apps/weft-agent created (server dry run)"),
            "{}: {applied}",
            file.display()
        );
    }

    // The check has teeth: a misspelt field and a bad value are refused.
    let manifests = std::fs::read_to_string(plain_manifests())?;
    for (from, to, why) in [
        (
            "terminationGracePeriodSeconds:",
            "terminationGracePeriod:",
            "unknown field",
        ),
        (
            "dnsPolicy: Default",
            "dnsPolicy: HostFirst",
            "Unsupported value",
        ),
    ] {
        ensure!(
            manifests.contains(from),
            "manifests/weft.yaml has no {from}"
        );
        let broken = out.path().join("broken.yaml");
        std::fs::write(&broken, manifests.replacen(from, to, 1))?;
        let error = match kubectl.apply_dry_run(&broken) {
            Ok(applied) => bail!("the API server accepted {to} ({why}): {applied}"),
            Err(error) => format!("{error:#}"),
        };
        ensure!(
            error.contains(why),
            "expected {why:?} for {to}, got: {error}"
        );
    }
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_grants_least_privilege_and_uninstalls_cleanly() -> Result<()> {
    require_root!("the e2e harness's cluster");
    let helm = build_helm()?;
    let cluster = Cluster::start_control_plane_only().await?;
    let kubectl = Kubectl::new(cluster.kubeconfig());

    let installed = run(kubectl
        .helm(&helm)
        .args(["install", "weft"])
        .arg(chart_dir())
        .args(["--namespace", "kube-system"]))?;
    ensure!(
        installed.contains(
            r"kubectl get nodes -o custom-columns=NAME:.metadata.name,CIDR:.metadata.annotations.weft\.dev/pod-cidr"
        ),
        "the install notes do not show each node's slice: {installed}"
    );
    run(kubectl.command().args([
        "get",
        "--namespace=kube-system",
        "daemonset/weft-agent",
        "deployment/weft-controller",
        "configmap/weft-config",
        "serviceaccount/weft-agent",
        "serviceaccount/weft-controller",
    ]))?;

    // What each component's code does, and a sample of what it must not.
    let expectations: &[(&str, &[&str], bool)] = &[
        ("weft-agent", &["list", "nodes"], true),
        ("weft-agent", &["watch", "nodes"], true),
        ("weft-agent", &["get", "nodes"], true),
        ("weft-agent", &["patch", "nodes"], true),
        (
            "weft-agent",
            &["patch", "nodes", "--subresource=status"],
            true,
        ),
        ("weft-agent", &["update", "nodes"], false),
        ("weft-agent", &["delete", "nodes"], false),
        (
            "weft-agent",
            &["update", "nodes", "--subresource=status"],
            false,
        ),
        // NetworkPolicy reads pods, namespaces and policies, never writes.
        ("weft-agent", &["list", "pods", "--all-namespaces"], true),
        ("weft-agent", &["watch", "namespaces"], true),
        (
            "weft-agent",
            &[
                "watch",
                "networkpolicies.networking.k8s.io",
                "--all-namespaces",
            ],
            true,
        ),
        ("weft-agent", &["get", "pods", "-n", "kube-system"], false),
        ("weft-agent", &["patch", "pods", "-n", "default"], false),
        (
            "weft-agent",
            &[
                "create",
                "networkpolicies.networking.k8s.io",
                "-n",
                "default",
            ],
            false,
        ),
        (
            "weft-agent",
            &["get", "secrets", "-n", "kube-system"],
            false,
        ),
        (
            "weft-agent",
            &["create", "leases.coordination.k8s.io", "-n", "kube-system"],
            false,
        ),
        ("weft-controller", &["list", "nodes"], true),
        ("weft-controller", &["watch", "nodes"], true),
        ("weft-controller", &["get", "nodes"], true),
        ("weft-controller", &["patch", "nodes"], true),
        (
            "weft-controller",
            &["create", "leases.coordination.k8s.io", "-n", "kube-system"],
            true,
        ),
        (
            "weft-controller",
            &[
                "get",
                "leases.coordination.k8s.io/weft-controller",
                "-n",
                "kube-system",
            ],
            true,
        ),
        (
            "weft-controller",
            &[
                "update",
                "leases.coordination.k8s.io/weft-controller",
                "-n",
                "kube-system",
            ],
            true,
        ),
        (
            "weft-controller",
            &["create", "events", "-n", "default"],
            true,
        ),
        (
            "weft-controller",
            &["patch", "events", "-n", "default"],
            true,
        ),
        (
            "weft-controller",
            &[
                "update",
                "leases.coordination.k8s.io/kube-scheduler",
                "-n",
                "kube-system",
            ],
            false,
        ),
        (
            "weft-controller",
            &[
                "delete",
                "leases.coordination.k8s.io/weft-controller",
                "-n",
                "kube-system",
            ],
            false,
        ),
        (
            "weft-controller",
            &["create", "leases.coordination.k8s.io", "-n", "default"],
            false,
        ),
        (
            "weft-controller",
            &["create", "events", "-n", "kube-system"],
            false,
        ),
        (
            "weft-controller",
            &["patch", "nodes", "--subresource=status"],
            false,
        ),
        ("weft-controller", &["delete", "nodes"], false),
        (
            "weft-controller",
            &["get", "secrets", "-n", "kube-system"],
            false,
        ),
    ];
    for (account, request, allowed) in expectations {
        ensure!(
            kubectl.can(&service_account(account), request)? == *allowed,
            "{account} {} be allowed to {}",
            if *allowed { "should" } else { "should not" },
            request.join(" ")
        );
    }

    // The weft-operator ClusterRole, bound as its comment shows: what
    // `kubectl weft` reads, and nothing it does not.
    let operator = "weft-operator-probe";
    run(kubectl.command().args([
        "create",
        "clusterrolebinding",
        operator,
        "--clusterrole=weft-operator",
        &format!("--user={operator}"),
    ]))?;
    let operator_expectations: &[(&[&str], bool)] = &[
        (&["list", "nodes"], true),
        (&["list", "pods", "--all-namespaces"], true),
        (
            &["get", "pods", "--subresource=proxy", "-n", "kube-system"],
            true,
        ),
        (
            &["get", "pods", "--subresource=log", "-n", "kube-system"],
            true,
        ),
        (
            &["get", "daemonsets.apps/weft-agent", "-n", "kube-system"],
            true,
        ),
        (
            &[
                "get",
                "deployments.apps/weft-controller",
                "-n",
                "kube-system",
            ],
            true,
        ),
        (
            &[
                "list",
                "networkpolicies.networking.k8s.io",
                "--all-namespaces",
            ],
            true,
        ),
        (
            &[
                "get",
                "validatingadmissionpolicies.admissionregistration.k8s.io/weft-node-writers",
            ],
            true,
        ),
        (
            &[
                "get",
                "validatingadmissionpolicybindings.admissionregistration.k8s.io/weft-node-writers",
            ],
            true,
        ),
        (&["list", "namespaces"], true),
        (
            &["get", "configmaps/weft-config", "-n", "kube-system"],
            true,
        ),
        (&["get", "configmaps/other", "-n", "kube-system"], false),
        (&["list", "configmaps", "-n", "kube-system"], false),
        (&["get", "secrets", "-n", "kube-system"], false),
        (&["patch", "nodes"], false),
        (&["delete", "pods", "-n", "kube-system"], false),
        (
            &["create", "pods", "--subresource=exec", "-n", "kube-system"],
            false,
        ),
        (
            &["create", "pods", "--subresource=proxy", "-n", "kube-system"],
            false,
        ),
    ];
    for (request, allowed) in operator_expectations {
        ensure!(
            kubectl.can(operator, request)? == *allowed,
            "weft-operator {} allow {}",
            if *allowed { "should" } else { "should not" },
            request.join(" ")
        );
    }

    run(kubectl
        .helm(&helm)
        .args(["uninstall", "weft", "--namespace", "kube-system"]))?;
    let left = run(kubectl.command().args([
        "get",
        "daemonsets,deployments,configmaps,serviceaccounts,roles,rolebindings",
        "--all-namespaces",
        "--selector=app.kubernetes.io/part-of=weft",
        "--output=name",
    ]))?;
    let cluster_wide = run(kubectl.command().args([
        "get",
        "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings",
        "--selector=app.kubernetes.io/part-of=weft",
        "--output=name",
    ]))?;
    ensure!(
        left.trim().is_empty() && cluster_wide.trim().is_empty(),
        "helm uninstall left {left}{cluster_wide}"
    );
    cluster.stop().await
}

/// One writer of Node objects, as the API server sees it.
struct Writer {
    who: &'static str,
    nodes: Api<Node>,
}

impl Writer {
    fn new(who: &'static str, client: Client) -> Self {
        Self {
            who,
            nodes: Api::all(client),
        }
    }

    /// Applies a merge patch to `node` (or its status); `Ok(None)` when the
    /// API server allowed it, `Ok(Some(message))` when the policy denied it.
    async fn patch(&self, node: &str, status: bool, patch: Value) -> Result<Option<String>> {
        self.send(node, status, &Patch::Merge(patch)).await
    }

    /// Applies `patch`, of any type, as [`Writer::patch`] does.
    async fn send(&self, node: &str, status: bool, patch: &Patch<Value>) -> Result<Option<String>> {
        let params = PatchParams::default();
        let result = if status {
            self.nodes.patch_status(node, &params, patch).await
        } else {
            self.nodes.patch(node, &params, patch).await
        };
        policy_denial(result, "weft-node-writers")
            .with_context(|| format!("{} patching {node}", self.who))
    }

    /// Sets label `key` on `node`.
    async fn label(&self, node: &str, key: &str) -> Result<Option<String>> {
        self.patch(
            node,
            false,
            json!({ "metadata": { "labels": { key: "y" } } }),
        )
        .await
    }

    /// Sets `field` of `node`'s spec.
    async fn spec(&self, node: &str, field: &str, value: Value) -> Result<Option<String>> {
        self.patch(node, false, json!({ "spec": { field: value } }))
            .await
    }

    async fn annotate(&self, node: &str, key: &str, value: &str) -> Result<Option<String>> {
        self.patch(
            node,
            false,
            json!({ "metadata": { "annotations": { key: value } } }),
        )
        .await
    }

    async fn expect(&self, allowed: bool, what: &str, outcome: Option<String>) -> Result<()> {
        match (allowed, outcome) {
            (true, None) | (false, Some(_)) => Ok(()),
            (true, Some(denial)) => bail!("{} should be allowed to {what}: {denial}", self.who),
            (false, None) => bail!("{} should not be allowed to {what}", self.who),
        }
    }
}

/// `Ok(None)` when the API server allowed a request, `Ok(Some(message))`
/// when `policy` denied it; any other failure is an error.
fn policy_denial<T>(result: kube::Result<T>, policy: &str) -> Result<Option<String>> {
    match result {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains(policy) => {
            Ok(Some(status.message))
        }
        Err(error) => Err(error.into()),
    }
}

/// A pod of `account` on `node`, as the DaemonSet would make it; it never
/// runs (there is no kubelet), it only anchors a bound token.
async fn pod_on(admin: &Client, account: &str, node: &str) -> Result<Pod> {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(format!("{account}-{node}")),
            namespace: Some("kube-system".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            service_account_name: Some(account.to_owned()),
            containers: vec![Container {
                name: "agent".to_owned(),
                image: Some("localhost/weft:never-pulled".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "kube-system");
    Ok(pods.create(&PostParams::default(), &pod).await?)
}

/// An admin client that acts as the kubelet of `node`.
async fn kubelet_client(cluster: &Cluster, node: &str) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(cluster.kubeconfig())?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.auth_info.impersonate = Some(format!("system:node:{node}"));
    config.auth_info.impersonate_groups = Some(vec!["system:nodes".to_owned()]);
    Ok(Client::try_from(config)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_component_writes_only_its_own_part_of_a_node() -> Result<()> {
    require_root!("the e2e harness's cluster");
    let cluster = Cluster::start_control_plane_only().await?;
    let kubectl = Kubectl::new(cluster.kubeconfig());
    let admin = cluster.client().await?;
    // What a user runs: the plain manifests, policy included.
    kubectl.apply(&weft_testing::repository().join("manifests"))?;
    let nodes: Api<Node> = Api::all(admin.clone());
    for name in ["node-0", "node-1"] {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        nodes.create(&PostParams::default(), &node).await?;
    }
    let agent_pod = pod_on(&admin, "weft-agent", "node-0").await?;
    let agent = Writer::new(
        "node-0's agent",
        cluster.pod_token_client(&agent_pod).await?,
    );
    let unbound = Writer::new(
        "an agent token bound to no pod",
        cluster
            .service_account_client("kube-system", "weft-agent")
            .await?,
    );
    let controller_client = cluster
        .service_account_client("kube-system", "weft-controller")
        .await?;
    let controller = Writer::new("the controller", controller_client.clone());
    let kubelet = Writer::new(
        "node-0's kubelet",
        kubelet_client(&cluster, "node-0").await?,
    );
    let administrator = Writer::new("an administrator", admin.clone());

    // The API server picks the policy up a moment after it is created;
    // until then the write goes through and is undone.
    eventually(
        POLICY_PATIENCE,
        "the node write policy to take effect",
        || async {
            let outcome = agent
                .annotate("node-1", "weft.dev/public-ip", "192.0.2.1")
                .await?;
            if outcome.is_none() {
                administrator
                    .patch(
                        "node-1",
                        false,
                        json!({ "metadata": { "annotations": { "weft.dev/public-ip": null } } }),
                    )
                    .await?;
            }
            Ok(outcome.map(drop))
        },
    )
    .await?;

    // node-0's status as its kubelet reports it; the agent's own condition
    // patch must leave it as it is.
    let reported = json!({ "status": {
        "addresses": [{ "type": "InternalIP", "address": "192.0.2.10" }],
        "conditions": [{
            "type": "Ready", "status": "True",
            "reason": "KubeletReady", "message": "kubelet is posting ready status",
        }],
    } });
    administrator.patch("node-0", true, reported).await?;

    let backend = r#"{"vtepMAC":"0a:58:0a:f4:00:01"}"#;
    let unavailable = json!({ "status": { "conditions": [{
        "type": "NetworkUnavailable", "status": "False",
        "reason": "WeftIsUp", "message": "weft-agent is running",
    }] } });
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let taint = |effect: &str| json!([{ "key": "example.com/x", "effect": effect }]);
    let cases: Vec<(&Writer, bool, &str, Option<String>)> = vec![
        (
            &agent,
            true,
            "publish node-0's public IP",
            agent
                .annotate("node-0", "weft.dev/public-ip", "192.0.2.10")
                .await?,
        ),
        (
            &agent,
            true,
            "publish node-0's backend data",
            agent
                .annotate("node-0", "weft.dev/backend-data", backend)
                .await?,
        ),
        (
            &agent,
            true,
            "publish node-0's backend type",
            agent
                .annotate("node-0", "weft.dev/backend-type", "vxlan")
                .await?,
        ),
        (
            &agent,
            true,
            "set node-0's NetworkUnavailable condition",
            agent
                .send("node-0", true, &Patch::Strategic(network_up_patch(&now)))
                .await?,
        ),
        (
            &agent,
            false,
            "redirect node-1's traffic",
            agent
                .annotate("node-1", "weft.dev/backend-data", backend)
                .await?,
        ),
        (
            &agent,
            false,
            "set node-1's condition",
            agent.patch("node-1", true, unavailable.clone()).await?,
        ),
        (
            &agent,
            false,
            "label node-1",
            agent
                .patch(
                    "node-1",
                    false,
                    json!({ "metadata": { "labels": { "x": "y" } } }),
                )
                .await?,
        ),
        (
            &agent,
            false,
            "choose node-0's pod CIDR",
            agent
                .annotate("node-0", "weft.dev/pod-cidr", "10.244.9.0/24")
                .await?,
        ),
        (
            &agent,
            false,
            "overwrite node-0's public IP",
            agent
                .annotate("node-0", "weft.dev/public-ip-overwrite", "192.0.2.99")
                .await?,
        ),
        (
            &unbound,
            false,
            "write node-0",
            unbound
                .annotate("node-0", "weft.dev/public-ip", "192.0.2.11")
                .await?,
        ),
        (
            &controller,
            true,
            "assign node-1's pod CIDR",
            controller
                .patch(
                    "node-1",
                    false,
                    json!({
                        "metadata": { "annotations": { "weft.dev/pod-cidr": "10.244.1.0/24" } },
                        "spec": { "podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"] },
                    }),
                )
                .await?,
        ),
        (
            &controller,
            false,
            "publish node-1's backend data",
            controller
                .annotate("node-1", "weft.dev/backend-data", backend)
                .await?,
        ),
        (
            &kubelet,
            true,
            "label node-0",
            kubelet
                .patch(
                    "node-0",
                    false,
                    json!({ "metadata": { "labels": { "x": "y" } } }),
                )
                .await?,
        ),
        (
            &kubelet,
            false,
            "choose node-0's pod CIDR",
            kubelet
                .annotate("node-0", "weft.dev/pod-cidr", "10.244.1.0/24")
                .await?,
        ),
        (
            &kubelet,
            false,
            "publish node-0's public IP",
            kubelet
                .annotate("node-0", "weft.dev/public-ip", "192.0.2.12")
                .await?,
        ),
        (
            &administrator,
            true,
            "overwrite node-0's public IP",
            administrator
                .annotate("node-0", "weft.dev/public-ip-overwrite", "192.0.2.99")
                .await?,
        ),
        (
            &administrator,
            true,
            "change node-0's pod CIDR annotation",
            administrator
                .annotate("node-0", "weft.dev/pod-cidr", "10.244.0.0/24")
                .await?,
        ),
        // The agent writes nothing else on its own node.
        (
            &agent,
            false,
            "label node-0",
            agent.label("node-0", "example.com/x").await?,
        ),
        (
            &agent,
            false,
            "give node-0 a NodeRestriction label",
            agent
                .label("node-0", "node-restriction.kubernetes.io/x")
                .await?,
        ),
        (
            &agent,
            false,
            "taint node-0 NoExecute",
            agent.spec("node-0", "taints", taint("NoExecute")).await?,
        ),
        (
            &agent,
            false,
            "cordon node-0",
            agent.spec("node-0", "unschedulable", json!(true)).await?,
        ),
        (
            &agent,
            false,
            "change node-0's addresses",
            agent
                .patch(
                    "node-0",
                    true,
                    json!({ "status": { "addresses": [{ "type": "InternalIP", "address": "192.0.2.66" }] } }),
                )
                .await?,
        ),
        (
            &agent,
            false,
            "set node-0's Ready condition",
            agent
                .send(
                    "node-0",
                    true,
                    &Patch::Strategic(json!({ "status": { "conditions": [{
                        "type": "Ready", "status": "False", "reason": "Weft", "message": "down",
                    }] } })),
                )
                .await?,
        ),
        (
            &agent,
            false,
            "annotate node-0 outside Weft's keys",
            agent.annotate("node-0", "example.com/x", "y").await?,
        ),
        (
            &agent,
            false,
            "put a finalizer on node-0",
            agent
                .patch(
                    "node-0",
                    false,
                    json!({ "metadata": { "finalizers": ["example.com/x"] } }),
                )
                .await?,
        ),
        // The controller sets each slice once and nothing else.
        (
            &controller,
            false,
            "move node-1's slice",
            controller
                .annotate("node-1", "weft.dev/pod-cidr", "10.244.2.0/24")
                .await?,
        ),
        (
            &controller,
            false,
            "remove node-1's slice",
            controller
                .patch(
                    "node-1",
                    false,
                    json!({ "metadata": { "annotations": { "weft.dev/pod-cidr": null } } }),
                )
                .await?,
        ),
        (
            &controller,
            false,
            "move node-0's slice, set by an administrator",
            controller
                .annotate("node-0", "weft.dev/pod-cidr", "10.244.3.0/24")
                .await?,
        ),
        (
            &controller,
            true,
            "assign node-1's IPv6 slice",
            controller
                .annotate("node-1", "weft.dev/pod-cidr-v6", "fd00:10:244:1::/64")
                .await?,
        ),
        (
            &controller,
            false,
            "label node-1",
            controller.label("node-1", "example.com/x").await?,
        ),
        (
            &controller,
            false,
            "taint node-1",
            controller.spec("node-1", "taints", taint("NoSchedule")).await?,
        ),
        (
            &controller,
            false,
            "cordon node-1",
            controller
                .spec("node-1", "unschedulable", json!(true))
                .await?,
        ),
        (
            &controller,
            false,
            "annotate node-1 outside Weft's keys",
            controller.annotate("node-1", "example.com/x", "y").await?,
        ),
    ];
    for (writer, allowed, what, outcome) in cases {
        writer.expect(allowed, what, outcome).await?;
    }
    // A slice denial names the node and the way out.
    let denial = controller
        .annotate("node-1", "weft.dev/pod-cidr", "10.244.2.0/24")
        .await?
        .context("the controller moved node-1's slice")?;
    ensure!(
        denial.contains("Node node-1 keeps its slice until it is deleted"),
        "{denial}"
    );
    // The agent's condition joined the kubelet's, which stayed.
    let mut conditions: Vec<String> = nodes
        .get_status("node-0")
        .await?
        .status
        .and_then(|status| status.conditions)
        .unwrap_or_default()
        .into_iter()
        .map(|condition| format!("{}={}", condition.type_, condition.status))
        .collect();
    conditions.sort();
    ensure!(
        conditions == ["NetworkUnavailable=False", "Ready=True"],
        "node-0's conditions: {conditions:?}"
    );
    // The denial says why, naming the node.
    let denial = agent
        .annotate("node-1", "weft.dev/public-ip", "192.0.2.1")
        .await?
        .context("node-0's agent wrote node-1")?;
    ensure!(
        denial.contains("on node node-0 may not write Node node-1"),
        "{denial}"
    );
    // A kubelet registering a Node with a pod CIDR of its choosing is refused.
    let registered = Node {
        metadata: ObjectMeta {
            name: Some("node-2".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some("10.244.1.0/24".to_owned()),
            pod_cidrs: Some(vec!["10.244.1.0/24".to_owned()]),
            ..Default::default()
        }),
        ..Node::default()
    };
    let kubelet2: Api<Node> = Api::all(kubelet_client(&cluster, "node-2").await?);
    match kubelet2.create(&PostParams::default(), &registered).await {
        Err(kube::Error::Api(status)) if status.message.contains("spec.podCIDR") => {}
        other => bail!("a kubelet registered a node with its own pod CIDR: {other:?}"),
    }

    // NodeRestriction: node-1's kubelet, which runs an agent of its own,
    // gets a token for that agent, never one bound to node-0's.
    let node_1_agent = pod_on(&admin, "weft-agent", "node-1").await?;
    let kubelet_1: Api<ServiceAccount> =
        Api::namespaced(kubelet_client(&cluster, "node-1").await?, "kube-system");
    kubelet_1
        .create_token_request(
            "weft-agent",
            &PostParams::default(),
            &bound_to(&node_1_agent),
        )
        .await
        .context("node-1's kubelet asking for its own agent's token")?;
    match kubelet_1
        .create_token_request("weft-agent", &PostParams::default(), &bound_to(&agent_pod))
        .await
    {
        Err(kube::Error::Api(status))
            if status.code == 403 && status.message.contains("on a different node") => {}
        other => bail!("node-1's kubelet got a token bound to node-0's agent: {other:?}"),
    }

    // The controller's Lease rights reach its own Lease only.
    let leases: Api<Lease> = Api::namespaced(controller_client, "kube-system");
    let lease = |name: &str| Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("weft-controller-0".to_owned()),
            lease_duration_seconds: Some(3600),
            ..LeaseSpec::default()
        }),
    };
    for (name, allowed) in [("kube-scheduler", false), ("weft-controller", true)] {
        let outcome = policy_denial(
            leases.create(&PostParams::default(), &lease(name)).await,
            "weft-controller-lease",
        )
        .with_context(|| format!("the controller creating Lease {name}"))?;
        controller
            .expect(
                allowed,
                &format!("create Lease kube-system/{name}"),
                outcome,
            )
            .await?;
    }
    cluster.stop().await
}

/// A TokenRequest for a token bound to `pod`, as a kubelet makes for the
/// pod's ServiceAccount token volume.
fn bound_to(pod: &Pod) -> TokenRequest {
    TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: None,
        },
        ..TokenRequest::default()
    }
}
