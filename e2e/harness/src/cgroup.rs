//! Cgroup roots of kubelet nodes. Cgroups are shared by all nodes, so each
//! node's kubelet gets a top-level cgroup of its own, named after the node's
//! network namespace and made in every hierarchy. Removing a node, tearing a
//! run down and cleaning up after crashed runs remove them by that name,
//! waiting for the processes in them to exit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where cgroup v1 hierarchies are mounted.
const CGROUP_MOUNTS: &str = "/sys/fs/cgroup";

/// How long removing a cgroup waits for the processes in it to be gone.
const CGROUP_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// The cgroup hierarchies: /sys/fs/cgroup itself on a cgroup2-only host,
/// else one directory per mounted v1 controller set (and the v2 one).
fn hierarchies() -> Result<Vec<PathBuf>> {
    if Path::new(CGROUP_MOUNTS).join("cgroup.procs").is_file() {
        return Ok(vec![PathBuf::from(CGROUP_MOUNTS)]);
    }
    let entries = match std::fs::read_dir(CGROUP_MOUNTS) {
        Ok(entries) => entries,
        // No cgroups: nothing to remove (and creating a root then fails clearly).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {CGROUP_MOUNTS}")),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {CGROUP_MOUNTS}"))?
            .path();
        if path.join("cgroup.procs").is_file() {
            found.push(path);
        }
    }
    Ok(found)
}

/// Creates `root` (e.g. `/we2e-1-0-node-0`) in every hierarchy: the kubelet
/// refuses a cgroup root that is missing anywhere.
pub(crate) fn create_cgroup_root(root: &str) -> Result<()> {
    let hierarchies = hierarchies()?;
    if hierarchies.is_empty() {
        bail!(
            "no cgroup hierarchy under {CGROUP_MOUNTS}; kubelet nodes need cgroups mounted there"
        );
    }
    for hierarchy in hierarchies {
        let dir = hierarchy.join(root.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A new cpuset cgroup starts with no CPUs and no memory nodes, and
        // nothing can join it until it has both; take the parent's.
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = hierarchy.join(file);
            if parent.is_file() {
                let value = std::fs::read_to_string(&parent)
                    .with_context(|| format!("reading {}", parent.display()))?;
                std::fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}", dir.join(file).display()))?;
            }
        }
    }
    Ok(())
}

/// Removes every cgroup root (top-level cgroup directory) whose name
/// `select` accepts, children first, in every hierarchy. Waits for the
/// processes of a node that was just stopped to be gone.
pub(crate) fn remove_cgroup_roots(select: impl Fn(&str) -> bool) -> Result<()> {
    let mut errors = Vec::new();
    for hierarchy in hierarchies()? {
        let Ok(entries) = std::fs::read_dir(&hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if select(&name) && path.is_dir() && path.join("cgroup.procs").is_file() {
                if let Err(e) = remove_cgroup_tree(&path) {
                    errors.push(e);
                }
            }
        }
    }
    match errors.len() {
        0 => Ok(()),
        _ => bail!(
            "{}",
            errors
                .iter()
                .map(|e| format!("{e:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// Removes a cgroup and its descendants, deepest first, retrying while the
/// processes in it are still exiting (rmdir answers EBUSY until then).
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    let mut dirs = Vec::new();
    collect_cgroups(dir, &mut dirs);
    let deadline = Instant::now() + CGROUP_DRAIN_TIMEOUT;
    for cgroup in dirs.iter().rev() {
        loop {
            match std::fs::remove_dir(cgroup) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(cgroup = %cgroup.display(), "waiting to remove: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "removing cgroup {} (processes still in it: {})",
                            cgroup.display(),
                            std::fs::read_to_string(cgroup.join("cgroup.procs"))
                                .unwrap_or_default()
                                .trim()
                        )
                    })
                }
            }
        }
    }
    Ok(())
}

/// `dir` and every cgroup below it, parents before children.
fn collect_cgroups(dir: &Path, into: &mut Vec<PathBuf>) {
    into.push(dir.to_owned());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_cgroups(&entry.path(), into);
        }
    }
}
