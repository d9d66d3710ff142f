//! Both install paths against a real kube-apiserver (the e2e harness's):
//! every render passes server-side validation, and `helm install` creates
//! RBAC that grants each component what it uses and nothing more. Needs root
//! (the harness) and kubectl on PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;
use weft_e2e::Cluster;
use weft_packaging::{
    chart_dir, helm, helm_command, plain_manifests, render_into, rendered_files, repo_root, run,
    Rendered,
};

/// kubectl against one cluster, with its discovery cache in a temporary
/// directory rather than the user's home.
struct Kubectl {
    kubeconfig: PathBuf,
    cache: TempDir,
}

impl Kubectl {
    fn new(cluster: &Cluster) -> Result<Kubectl> {
        Ok(Kubectl {
            kubeconfig: cluster.kubeconfig().to_path_buf(),
            cache: tempfile::tempdir()?,
        })
    }

    fn command(&self) -> Command {
        let mut command = Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.cache.path());
        command
    }

    /// `kubectl apply --dry-run=server --validate=strict -f path`: the API
    /// server runs defaulting, validation and admission, and stores nothing.
    fn apply_dry_run(&self, path: &Path) -> Result<String> {
        run(self
            .command()
            .args(["apply", "--dry-run=server", "--validate=strict", "-f"])
            .arg(path))
        .with_context(|| format!("server-side dry run of {}", path.display()))
    }

    fn ensure_namespace(&self, namespace: &str) -> Result<()> {
        let exists = self
            .command()
            .args(["get", "namespace", namespace])
            .output()?
            .status
            .success();
        if !exists {
            run(self.command().args(["create", "namespace", namespace]))?;
        }
        Ok(())
    }

    /// Whether ServiceAccount `kube-system/<account>` may do `request`
    /// (`kubectl auth can-i` arguments).
    fn can(&self, account: &str, request: &[&str]) -> Result<bool> {
        let output = self
            .command()
            .args(["auth", "can-i"])
            .args(request)
            .arg(format!("--as=system:serviceaccount:kube-system:{account}"))
            .output()?;
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        match (output.status.code(), answer.as_str()) {
            (Some(0), "yes") => Ok(true),
            (Some(1), "no") => Ok(false),
            _ => bail!(
                "kubectl auth can-i {request:?} as {account}: {answer} {}",
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_render_passes_server_side_validation() -> Result<()> {
    let helm = helm()?;
    let out = tempfile::tempdir()?;
    render_into(&helm, out.path())?;
    let cluster = Cluster::start_control_plane_only().await?;
    let kubectl = Kubectl::new(&cluster)?;

    // What a user runs, from the repository.
    kubectl.apply_dry_run(&repo_root().join("manifests"))?;
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
    let helm = helm()?;
    let home = tempfile::tempdir()?;
    let cluster = Cluster::start_control_plane_only().await?;
    let kubectl = Kubectl::new(&cluster)?;
    let helm_in_cluster = || {
        let mut command = helm_command(&helm, home.path());
        command.arg("--kubeconfig").arg(cluster.kubeconfig());
        command
    };

    let installed = run(helm_in_cluster()
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
        ("weft-agent", &["list", "pods", "--all-namespaces"], false),
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
            kubectl.can(account, request)? == *allowed,
            "{account} {} be allowed to {}",
            if *allowed { "should" } else { "should not" },
            request.join(" ")
        );
    }

    run(helm_in_cluster().args(["uninstall", "weft", "--namespace", "kube-system"]))?;
    let left = run(kubectl.command().args([
        "get",
        "daemonsets,deployments,configmaps,serviceaccounts,roles,rolebindings",
        "--all-namespaces",
        "--selector=app.kubernetes.io/part-of=weft",
        "--output=name",
    ]))?;
    let cluster_wide = run(kubectl.command().args([
        "get",
        "clusterroles,clusterrolebindings",
        "--selector=app.kubernetes.io/part-of=weft",
        "--output=name",
    ]))?;
    ensure!(
        left.trim().is_empty() && cluster_wide.trim().is_empty(),
        "helm uninstall left {left}{cluster_wide}"
    );
    cluster.stop().await
}
