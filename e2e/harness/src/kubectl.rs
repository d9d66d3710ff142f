//! kubectl and helm against a cluster, as an operator runs them: each with
//! its caches and settings in the cluster's run directory (beside its
//! kubeconfig) rather than the user's home, so runs share nothing and
//! leave nothing. It depends on no other module of the crate.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use weft_testing::run;

/// kubectl with one cluster's admin kubeconfig
/// ([`crate::Cluster::kubeconfig`], or the path `weft-e2e up` prints).
#[derive(Clone, Debug)]
pub struct Kubectl {
    kubeconfig: PathBuf,
}

impl Kubectl {
    /// kubectl against the cluster `kubeconfig` names; its discovery cache
    /// goes to `kubectl-cache` beside the kubeconfig.
    pub fn new(kubeconfig: &Path) -> Self {
        Self {
            kubeconfig: kubeconfig.to_owned(),
        }
    }

    /// A kubectl command with the kubeconfig and cache set, for arguments
    /// of the caller's.
    pub fn command(&self) -> Command {
        let mut command = Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.kubeconfig.with_file_name("kubectl-cache"));
        command
    }

    /// Runs kubectl with `args` and returns its stdout; fails with its
    /// stderr when it exits non-zero.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run(self.command().args(args))
    }

    /// `kubectl apply -f path` (a file or a directory).
    pub fn apply(&self, path: &Path) -> Result<String> {
        run(self.command().arg("apply").arg("-f").arg(path))
            .with_context(|| format!("applying {}", path.display()))
    }

    /// `kubectl apply --dry-run=server --validate=strict -f path`: the API
    /// server runs defaulting, validation and admission, and stores nothing.
    pub fn apply_dry_run(&self, path: &Path) -> Result<String> {
        run(self
            .command()
            .args(["apply", "--dry-run=server", "--validate=strict", "-f"])
            .arg(path))
        .with_context(|| format!("server-side dry run of {}", path.display()))
    }

    /// Applies `manifest` (JSON or YAML text) through a file beside the
    /// kubeconfig, removed afterwards.
    pub fn apply_manifest(&self, manifest: &str) -> Result<String> {
        let dir = self
            .kubeconfig
            .parent()
            .context("the kubeconfig has no directory")?;
        let file = tempfile::Builder::new()
            .prefix("manifest.")
            .tempfile_in(dir)
            .with_context(|| format!("creating a manifest file in {}", dir.display()))?;
        std::fs::write(file.path(), manifest)
            .with_context(|| format!("writing {}", file.path().display()))?;
        self.apply(file.path())
    }

    /// Creates `namespace` unless it exists.
    pub fn ensure_namespace(&self, namespace: &str) -> Result<()> {
        let exists = self
            .command()
            .args(["get", "namespace", namespace])
            .output()
            .context("running kubectl get namespace")?
            .status
            .success();
        if !exists {
            self.run(&["create", "namespace", namespace])?;
        }
        Ok(())
    }

    /// Whether `user` (e.g. `system:serviceaccount:<namespace>:<name>`)
    /// may do `request` (`kubectl auth can-i` arguments).
    pub fn can(&self, user: &str, request: &[&str]) -> Result<bool> {
        let output = self
            .command()
            .args(["auth", "can-i"])
            .args(request)
            .arg(format!("--as={user}"))
            .output()
            .context("running kubectl auth can-i")?;
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        match (output.status.code(), answer.as_str()) {
            (Some(0), "yes") => Ok(true),
            (Some(1), "no") => Ok(false),
            _ => bail!(
                "kubectl auth can-i {request:?} as {user}: {answer} {}",
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }

    /// A command running `helm` (see [`build_helm`]) against the same
    /// cluster, its caches and settings in `helm` beside the kubeconfig.
    pub fn helm(&self, helm: &Path) -> Command {
        let mut command = helm_command(helm, &self.kubeconfig.with_file_name("helm"));
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }
}

/// A command running `helm` with its caches, settings and data under
/// `home` rather than the user's home directory; for commands that need no
/// cluster (`template`, `lint`).
pub fn helm_command(helm: &Path, home: &Path) -> Command {
    let mut command = Command::new(helm);
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    command
}

/// The helm binary, built by `packaging/build-helm.sh` from its Go module
/// on first use (minutes) and cached outside the repository after.
pub fn build_helm() -> Result<PathBuf> {
    let script = weft_testing::repository().join("packaging/build-helm.sh");
    weft_testing::printed_path(&mut Command::new(script))
}
