//! Kubelet nodes as machines of their own: beside its network namespace, each
//! node gets mount, PID and UTS namespaces, the way kind runs a node as a
//! container, and runs containerd and a kubelet inside them.
//!
//! Namespace nodes share the host's filesystem, so without a mount namespace
//! every node's kubelet, containerd and pods would see the same
//! `/opt/cni/bin`, `/etc/cni/net.d`, `/run/weft` and `/var/lib/cni`: one node
//! file and one IPAM store for all nodes. Inside its mount namespace a node has
//! - `/run`: an empty tmpfs of its own, as after boot;
//! - `/etc`, `/opt`, `/var`: overlays on the host's, writing into the node's
//!   state directory, so hostPath volumes and installers never touch the host;
//! - `/var/lib/containerd`, `/var/lib/kubelet`: plain directories of the state
//!   directory (containerd's overlayfs snapshots cannot sit on an overlay);
//! - `/etc/cni/net.d`: a plain, empty directory of the state directory, so
//!   the node has no CNI config until Weft installs one;
//! - `/opt/cni/bin/loopback` from Debian's reference plugins: containerd 1.6
//!   takes a single CNI bin directory and brings up every pod's `lo` with it;
//! - the kernel tunables the kubelet insists on (`vm.overcommit_memory`,
//!   `kernel.panic`, …) shown at the values it wants by read-only bind mounts
//!   over their `/proc/sys` files: the kubelet finds nothing to change, so the
//!   host's values, which are global, never change.
//!
//! Mounts are private from the start and never propagate to the host. PID 1
//! of the node is the pause binary; when it exits, the kernel kills
//! everything else in the node (containerd's shims and the containers they
//! run), and the mount namespace with all its mounts goes with the last
//! process. Cgroups are shared by all nodes, so each kubelet gets a cgroup
//! root of its own, named after the node's network namespace (see
//! [`crate::cgroup`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cgroup::create_cgroup_root;
use crate::exec::{netns_path, tail};
use crate::process::ProcessHandle;
use crate::run::RunGuard;

/// Debian's `containernetworking-plugins` installs the reference plugins here.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The kernel tunables the kubelet sets at start unless they already hold
/// these values (its `setupKernelTunables`), as paths under /proc/sys.
const KUBELET_TUNABLES: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// Host directories overlaid per node; writes land in the node's state directory.
const OVERLAID: [&str; 3] = ["etc", "opt", "var"];

/// Directories bound to plain per-node directories on top of the overlays.
/// The CNI config directory is one so that it starts empty: through the
/// `/etc` overlay a host's own CNI configs (podman's bridge, say) would make
/// the kubelet report the node Ready before Weft is installed.
const PLAIN: [&str; 3] = ["var/lib/containerd", "var/lib/kubelet", "etc/cni/net.d"];

/// How long a node's init may take to set up its mounts.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The namespaces of a kubelet node beyond its network namespace.
#[derive(Clone, Debug)]
pub struct NodeMachine {
    /// The host's pid of the node's PID 1 (its init); `nsenter --target`
    /// enters the node through it.
    pub init_pid: u32,
    /// The node's own files: overlay upper directories (what the node wrote
    /// to `/etc`, `/opt`, `/var`), containerd's and the kubelet's directories.
    pub root: PathBuf,
    /// The kubelet's cgroup root, the same in every cgroup hierarchy.
    pub cgroup_root: String,
}

impl NodeMachine {
    /// A command that runs `program` inside the node: its network, mount,
    /// PID and UTS namespaces, as a process on that machine would run
    /// (`ctr`, `crictl`, `cat /run/weft/node.json`, …).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--target={}", self.init_pid))
            .args(["--mount", "--uts", "--pid", "--net"])
            .arg(program);
        command
    }

    /// Where a file the node wrote under `/etc`, `/opt` or `/var` is on the
    /// host (in its overlay's upper directory, or in the node's own
    /// containerd and kubelet directories); `None` for other paths, such as
    /// those on the node's `/run` tmpfs.
    pub fn host_path(&self, path_in_node: &Path) -> Option<PathBuf> {
        let relative = path_in_node.strip_prefix("/").ok()?;
        if PLAIN.iter().any(|dir| relative.starts_with(dir)) {
            return Some(self.root.join(relative));
        }
        let top = relative.components().next()?.as_os_str().to_str()?;
        OVERLAID
            .contains(&top)
            .then(|| self.root.join("upper").join(relative))
    }
}

/// Starts the init of node `name` in new mount, PID and UTS namespaces inside
/// its network namespace `netns`, sets up its filesystem from its directory
/// `state_dir`, and returns once the init runs (`<name>-init` in the run's
/// processes).
pub(crate) async fn start(
    run: &RunGuard,
    name: &str,
    netns: &str,
    state_dir: &Path,
    pause_binary: &Path,
) -> Result<NodeMachine> {
    let loopback = Path::new(REFERENCE_PLUGINS).join("loopback");
    if !loopback.is_file() {
        bail!(
            "{} is missing; kubelet nodes need the reference CNI plugins: apt-get install containernetworking-plugins",
            loopback.display()
        );
    }
    let root = state_dir.join("root");
    for top in OVERLAID {
        for layer in ["upper", "work"] {
            create_dir(&root.join(layer).join(top))?;
        }
    }
    for dir in PLAIN {
        create_dir(&root.join(dir))?;
    }
    let tunables = root.join("tunables");
    create_dir(&tunables)?;
    for (key, value) in KUBELET_TUNABLES {
        let file = tunables.join(key.replace('/', "."));
        std::fs::write(&file, format!("{value}\n"))
            .with_context(|| format!("writing {}", file.display()))?;
    }
    let script = state_dir.join("init.sh");
    std::fs::write(&script, init_script(&root, name, &loopback, pause_binary))
        .with_context(|| format!("writing {}", script.display()))?;

    let cgroup_root = format!("/{netns}");
    create_cgroup_root(&cgroup_root)?;

    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns_path(netns).display()))
        .arg("unshare")
        .args(["--mount", "--uts", "--pid", "--fork", "--mount-proc"])
        // The init dies with unshare, which dies with the test process
        // (parent-death signal): nothing of the node outlives a killed test.
        .arg("--kill-child=SIGKILL")
        .arg("--propagation=private")
        .arg("sh")
        .arg(&script);
    let init = run.spawn(Some(name), &format!("{name}-init"), command)?;
    let init_pid = wait_for_init(&init, pause_binary).await?;
    Ok(NodeMachine {
        init_pid,
        root,
        cgroup_root,
    })
}

/// The shell script that sets up a node's filesystem and becomes its init.
fn init_script(root: &Path, hostname: &str, loopback: &Path, pause_binary: &Path) -> String {
    let root = quote(root);
    let mut script = format!(
        "# A kubelet node's filesystem, set up inside its own mount namespace\n\
         # (written by weft-e2e; see e2e/harness/src/machine.rs).\n\
         set -eu\n\
         hostname {hostname}\n\
         # The host's /run/netns names the namespaces of every run; let go of them.\n\
         umount --recursive --lazy /run/netns 2>/dev/null || true\n\
         mount -t tmpfs -o mode=0755 run /run\n",
        hostname = quote(Path::new(hostname)),
    );
    for top in OVERLAID {
        script.push_str(&format!(
            "mount -t overlay overlay -o lowerdir=/{top},upperdir={root}/upper/{top},workdir={root}/work/{top} /{top}\n"
        ));
    }
    for dir in PLAIN {
        script.push_str(&format!(
            "mkdir -p /{dir}\nmount --bind {root}/{dir} /{dir}\n"
        ));
    }
    script.push_str(&format!(
        "mkdir -p /opt/cni/bin /etc/cni/net.d\ncp {} /opt/cni/bin/loopback\n",
        quote(loopback)
    ));
    for (key, _) in KUBELET_TUNABLES {
        script.push_str(&format!(
            "mount --bind -o ro {root}/tunables/{} /proc/sys/{key}\n",
            key.replace('/', ".")
        ));
    }
    // Shared inside the node, as on a systemd machine: the kubelet's mount
    // propagation for volumes expects it.
    script.push_str(&format!(
        "mount --make-rshared /\nexec {}\n",
        quote(pause_binary)
    ));
    script
}

/// Single-quotes a path for the init script.
fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Waits until unshare's child has exec'd the pause binary (its mounts are
/// done) and returns its pid.
async fn wait_for_init(init: &ProcessHandle, pause_binary: &Path) -> Result<u32> {
    let deadline = Instant::now() + INIT_TIMEOUT;
    loop {
        if !init.is_running() {
            bail!(
                "{} exited ({:?}) while setting up the node; the end of {}:\n{}",
                init.name(),
                init.exit_status(),
                init.log_path().display(),
                tail(&init.log(), 30)
            );
        }
        for child in children(init.pid())? {
            let exe = std::fs::read_link(format!("/proc/{child}/exe")).ok();
            if exe.as_deref() == Some(pause_binary) {
                return Ok(child);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not finish setting up the node within {INIT_TIMEOUT:?}; see {}",
                init.name(),
                init.log_path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pids whose parent is `parent` (this kernel has no /proc/*/children).
fn children(parent: u32) -> Result<Vec<u32>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Some(pid) = entry
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4, after the parenthesised command name (which may hold spaces).
        let parent_of = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().nth(1))
            .and_then(|field| field.parse::<u32>().ok());
        if parent_of == Some(parent) {
            found.push(pid);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_map_into_the_overlays_and_plain_directories() {
        let machine = NodeMachine {
            init_pid: 1,
            root: PathBuf::from("/runs/1-0/nodes/node-0/root"),
            cgroup_root: "/we2e-1-0-node-0".into(),
        };
        assert_eq!(
            machine.host_path(Path::new("/etc/cni/net.d/10-weft.conflist")),
            Some(PathBuf::from(
                "/runs/1-0/nodes/node-0/root/etc/cni/net.d/10-weft.conflist"
            ))
        );
        assert_eq!(
            machine.host_path(Path::new("/etc/containerd/config.toml")),
            Some(PathBuf::from(
                "/runs/1-0/nodes/node-0/root/upper/etc/containerd/config.toml"
            ))
        );
        assert_eq!(
            machine.host_path(Path::new("/var/lib/kubelet/config.json")),
            Some(PathBuf::from(
                "/runs/1-0/nodes/node-0/root/var/lib/kubelet/config.json"
            ))
        );
        assert_eq!(machine.host_path(Path::new("/run/weft/node.json")), None);
        assert_eq!(machine.host_path(Path::new("relative")), None);
    }

    #[test]
    fn init_script_mounts_before_it_becomes_the_pause_process() {
        let script = init_script(
            Path::new("/r/root"),
            "node-0",
            Path::new("/usr/lib/cni/loopback"),
            Path::new("/r/pause"),
        );
        let overlay = script.find("mount -t overlay").unwrap();
        let exec = script.find("exec '/r/pause'").unwrap();
        assert!(overlay < exec, "{script}");
        assert!(script.contains("mount --bind -o ro '/r/root'/tunables/vm.overcommit_memory /proc/sys/vm/overcommit_memory"), "{script}");
        assert!(script.trim_end().ends_with("exec '/r/pause'"), "{script}");
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote(Path::new("/a'b")), r"'/a'\''b'");
    }
}
