//! containerd on a kubelet node: Debian's containerd 1.6 with runc, run
//! inside the node's own namespaces (see [`crate::machine`]) at its standard
//! paths, which the node's mount namespace makes its own.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::exec::tail;
use crate::images::PAUSE_IMAGE;
use crate::machine::NodeMachine;
use crate::node::ClusterNode;
use crate::process::ProcessHandle;
use crate::run::RunGuard;

/// The socket, as seen inside the node.
pub(crate) const SOCKET: &str = "/run/containerd/containerd.sock";

/// The containerd namespace the CRI plugin (and so the kubelet) uses.
const CRI_NAMESPACE: &str = "k8s.io";

/// How long containerd may take to answer on its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The configuration. Root lacks CAP_SYS_RESOURCE here, so the negative
/// `oom_score_adj` the kubelet asks for pod sandboxes would fail:
/// `restrict_oom_score_adj` clamps it to containerd's own. The sandbox image
/// is the locally built pause image; no registry is reachable.
fn config() -> String {
    format!(
        r#"# Written by weft-e2e for a kubelet node (e2e/harness/src/containerd.rs).
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#
    )
}

/// Starts containerd on the node (`<node>-containerd`) and waits until it
/// answers.
pub(crate) async fn start(
    run: &RunGuard,
    node: &ClusterNode,
    machine: &NodeMachine,
) -> Result<ProcessHandle> {
    let file = node.state_dir.join("containerd.toml");
    std::fs::write(&file, config()).with_context(|| format!("writing {}", file.display()))?;
    let mut command = machine.command("containerd");
    command.arg("--config").arg(&file);
    let containerd = run.spawn(
        Some(&node.name),
        &format!("{}-containerd", node.name),
        command,
    )?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if !containerd.is_running() {
            bail!(
                "containerd on {} exited ({:?}); the end of {} (is it installed? apt-get install containerd runc):\n{}",
                node.name,
                containerd.exit_status(),
                containerd.log_path().display(),
                tail(&containerd.log(), 30)
            );
        }
        let answered = machine
            .command("ctr")
            .args(["--address", SOCKET, "version"])
            .output()
            .is_ok_and(|output| output.status.success());
        if answered {
            return Ok(containerd);
        }
        if Instant::now() > deadline {
            bail!(
                "containerd on {} did not answer within {READY_TIMEOUT:?}; see {}",
                node.name,
                containerd.log_path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Imports an image archive (OCI or docker) into the node's containerd,
/// where the kubelet finds it.
pub(crate) fn import(machine: &NodeMachine, archive: &Path) -> Result<()> {
    // Relative paths would resolve against the node's working directory.
    let archive = std::path::absolute(archive)
        .with_context(|| format!("resolving image archive {}", archive.display()))?;
    // ctr mounts snapshots to unpack them, so it runs inside the node too.
    weft_testing::run(
        machine
            .command("ctr")
            .args(["--address", SOCKET, "--namespace", CRI_NAMESPACE])
            .args(["images", "import"])
            .arg(&archive),
    )
    .with_context(|| format!("importing image archive {}", archive.display()))?;
    Ok(())
}
