//! A run: its id, its directory (logs, certificates, kubeconfigs, etcd data),
//! the state file that lets a later `cleanup` undo a crashed run, the guard
//! that owns what the run started and tears it down, and that cleanup.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cgroup;
use crate::forwarder::ApiserverForwarder;
use crate::process::{
    is_alive, process_start_time, signal_group, Launcher, ProcessHandle, ProcessRecord,
};
use crate::underlay;

/// Every network namespace of every run starts with this.
pub(crate) const NETNS_PREFIX: &str = "we2e-";

const STATE_FILE: &str = "state.json";

/// A run directory younger than this without a state file is being created
/// by another process right now; older, it is debris.
const STATE_WRITE_GRACE: Duration = Duration::from_secs(60);

/// Where run directories live: `$WEFT_E2E_RUNS`, default `/tmp/weft-e2e`.
pub(crate) fn runs_root() -> PathBuf {
    std::env::var_os("WEFT_E2E_RUNS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/weft-e2e"))
}

/// What a run created, as written to `<run dir>/state.json`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RunState {
    /// The process that owns the run; while it lives, the run is not debris.
    pub(crate) owner: ProcessRecord,
    /// Set by the CLI's `up`, so `down` knows which owners to signal.
    pub(crate) from_cli: bool,
    /// Processes started for the run (each the leader of its process group).
    pub(crate) processes: Vec<ProcessRecord>,
    /// Torn down with its logs kept; only `weft-e2e cleanup` removes it.
    #[serde(default)]
    pub(crate) finished: bool,
}

/// One run's identity, directory and state file.
pub(crate) struct Run {
    id: String,
    dir: PathBuf,
    state: RunState,
}

impl Run {
    /// Creates a fresh run directory with a state file naming this process
    /// as the owner.
    pub(crate) fn create() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let me = std::process::id();
        let owner = ProcessRecord {
            pid: me,
            start_time: process_start_time(me).context("reading this process's start time")?,
        };
        // Short, because it is part of every namespace name.
        let id = format!("{me}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = runs_root().join(&id);
        if dir.exists() {
            // Same pid and counter as a crashed run whose debris survived.
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing stale run directory {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating run directory {}", dir.display()))?;
        let run = Self {
            id,
            dir,
            state: RunState {
                owner,
                from_cli: false,
                processes: Vec::new(),
                finished: false,
            },
        };
        run.save()?;
        Ok(run)
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The namespace name for `role` (e.g. `node-0`) in this run.
    pub(crate) fn netns_name(&self, role: &str) -> String {
        format!("{NETNS_PREFIX}{}-{role}", self.id)
    }

    /// Records a process before anything else can fail, so a crash right
    /// after still leaves a way to kill it.
    pub(crate) fn record_process(&mut self, process: ProcessRecord) -> Result<()> {
        self.state.processes.push(process);
        self.save()
    }

    /// Marks the run as held by `weft-e2e up`.
    pub(crate) fn mark_held_by_cli(&mut self) -> Result<()> {
        self.state.from_cli = true;
        self.save()
    }

    /// The processes recorded so far.
    pub(crate) fn state_processes(&self) -> Vec<ProcessRecord> {
        self.state.processes.clone()
    }

    /// Forgets processes that have been stopped.
    pub(crate) fn forget_process(&mut self, process: &ProcessRecord) -> Result<()> {
        self.state.processes.retain(|p| p != process);
        self.save()
    }

    fn save(&self) -> Result<()> {
        let path = self.dir.join(STATE_FILE);
        let partial = self.dir.join(".state.json.partial");
        let json = serde_json::to_vec_pretty(&self.state).context("encoding run state")?;
        // Written aside and renamed, so a concurrent cleanup never reads half a file.
        std::fs::write(&partial, json)
            .and_then(|()| std::fs::rename(&partial, &path))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Removes the run directory (after teardown). Logs are kept when
    /// `keep_logs`: only the etcd data goes then.
    pub(crate) fn remove_dir(&self, keep_logs: bool) -> Result<()> {
        let target = if keep_logs {
            self.dir.join("etcd")
        } else {
            self.dir.clone()
        };
        match std::fs::remove_dir_all(&target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", target.display())),
        }
    }

    /// Marks the run as torn down with its logs kept.
    pub(crate) fn mark_finished(&mut self) -> Result<()> {
        self.state.finished = true;
        self.save()
    }
}

/// A run found on disk, as `cleanup` and `down` see it.
pub(crate) struct RunOnDisk {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    /// `None` while being created, or if unreadable.
    pub(crate) state: Option<RunState>,
}

impl RunOnDisk {
    /// Whether the run is up (its owner is alive and has not torn it down)
    /// or being set up right now.
    pub(crate) fn is_live(&self) -> bool {
        match &self.state {
            Some(state) => !state.finished && is_alive(&state.owner),
            None => {
                let age = std::fs::metadata(&self.dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|modified| SystemTime::now().duration_since(modified).ok());
                age.is_some_and(|age| age < STATE_WRITE_GRACE)
            }
        }
    }

    /// Torn down with its logs kept on purpose.
    fn is_kept(&self) -> bool {
        self.state.as_ref().is_some_and(|state| state.finished)
    }
}

/// Every run directory under [`runs_root`].
pub(crate) fn runs_on_disk() -> Result<Vec<RunOnDisk>> {
    let root = runs_root();
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", root.display())),
    };
    let mut runs = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", root.display()))?;
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let state = std::fs::read(dir.join(STATE_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        runs.push(RunOnDisk {
            id: entry.file_name().to_string_lossy().into_owned(),
            dir,
            state,
        });
    }
    Ok(runs)
}

/// The pid of the process that owns the run a namespace or cgroup root is
/// named for (`we2e-<pid>-<n>-<role>`; the run id starts with its owner's
/// pid).
fn owner_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let (pid, _counter_and_role) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Whether a namespace or cgroup root named for a run is debris: no
/// process has the pid of the run's owner. That holds whatever runs root
/// the owner used (`WEFT_E2E_RUNS`), since this root's directories say
/// nothing of another's. A reused pid only delays the removal until that
/// process exits; a live run is never touched.
fn is_debris(name: &str) -> bool {
    owner_of(name).is_some_and(|owner| process_start_time(owner).is_none())
}

/// Removes what crashed runs left behind: their processes (by pid, checked
/// against the recorded start time so a reused pid is never hit), their
/// network namespaces with every process still inside, their kubelet nodes'
/// cgroups, and their run directories, including the logs kept by clusters
/// dropped without `stop`.
/// Runs whose owner process is alive are left alone, so this is safe while
/// other clusters run.
pub fn cleanup_leftovers() -> Result<()> {
    cleanup(true)
}

/// [`cleanup_leftovers`], optionally sparing kept logs (as every
/// `Cluster::start` does, so a failed test's logs survive the next test's
/// start).
pub(crate) fn cleanup(remove_kept_logs: bool) -> Result<()> {
    let runs = runs_on_disk()?;
    let mut errors = Vec::new();
    let debris = runs
        .iter()
        .filter(|run| !run.is_live() && (remove_kept_logs || !run.is_kept()));
    for run in debris {
        if let Some(state) = &run.state {
            for process in state.processes.iter().filter(|p| is_alive(p)) {
                let group = Pid::from_raw(process.pid as i32);
                if let Err(e) = signal_group(group, Signal::SIGKILL) {
                    errors.push(e);
                }
            }
        }
        tracing::info!(run = %run.id, "removing leftovers of a crashed or finished run");
        match std::fs::remove_dir_all(&run.dir) {
            // Another cleanup (a test's start, `weft-e2e cleanup`) got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors
                .push(anyhow::Error::new(e).context(format!("removing {}", run.dir.display()))),
            Ok(()) => {}
        }
    }
    for netns in underlay::list_netns()? {
        if !is_debris(&netns) {
            continue;
        }
        tracing::info!(%netns, "removing leftover network namespace");
        if let Err(e) = underlay::delete_netns_with_processes(&netns) {
            errors.push(e);
        }
    }
    // Kubelet nodes' cgroup roots are named like their network namespaces.
    if let Err(e) = cgroup::remove_cgroup_roots(is_debris) {
        errors.push(e);
    }
    match errors.len() {
        0 => Ok(()),
        _ => Err(anyhow::anyhow!(
            "cleanup left something behind:\n{}",
            errors
                .iter()
                .map(|e| format!("  {e:#}"))
                .collect::<Vec<_>>()
                .join("\n")
        )),
    }
}

/// How long `weft-e2e up` gets to tear down after SIGTERM before it is killed
/// (its children die with it) and its leftovers are cleaned up.
const HELD_TEARDOWN_GRACE: Duration = Duration::from_secs(60);

/// Stops every cluster held by a `weft-e2e up` process (SIGTERM to it, then
/// waits until it has torn down and exited). Returns the stopped run ids.
pub fn stop_held_clusters() -> Result<Vec<String>> {
    let held: Vec<RunOnDisk> = runs_on_disk()?
        .into_iter()
        .filter(|run| run.is_live() && run.state.as_ref().is_some_and(|s| s.from_cli))
        .collect();
    for run in &held {
        let owner = &run.state.as_ref().expect("filtered on state").owner;
        nix::sys::signal::kill(Pid::from_raw(owner.pid as i32), Signal::SIGTERM).with_context(
            || {
                format!(
                    "signalling weft-e2e up (pid {}) of run {}",
                    owner.pid, run.id
                )
            },
        )?;
    }
    let deadline = std::time::Instant::now() + HELD_TEARDOWN_GRACE;
    let mut killed = false;
    for run in &held {
        let owner = &run.state.as_ref().expect("filtered on state").owner;
        while is_alive(owner) {
            if std::time::Instant::now() > deadline {
                tracing::warn!(run = %run.id, pid = owner.pid, "weft-e2e up did not finish tearing down; killing it");
                // Gone meanwhile is fine.
                let _ = nix::sys::signal::kill(Pid::from_raw(owner.pid as i32), Signal::SIGKILL);
                killed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if killed {
        cleanup(true)?;
    }
    Ok(held.into_iter().map(|run| run.id).collect())
}

/// Owns the run and everything that teardown undoes, so a failure halfway
/// through `Cluster::start` is undone by the same code as a normal stop.
pub(crate) struct RunGuard {
    state: Mutex<Run>,
    dir: PathBuf,
    netns_prefix: String,
    launcher: Option<Launcher>,
    forwarder: Option<ApiserverForwarder>,
    /// Every process started, with the node it runs on.
    processes: Mutex<Vec<(Option<String>, ProcessHandle)>>,
    torn_down: bool,
}

impl RunGuard {
    /// Takes over `run` and starts the launcher its processes are forked by.
    pub(crate) fn new(run: Run) -> Result<Self> {
        Ok(Self {
            dir: run.dir().to_owned(),
            netns_prefix: run.netns_name(""),
            state: Mutex::new(run),
            launcher: Some(Launcher::start()?),
            forwarder: None,
            processes: Mutex::new(Vec::new()),
            torn_down: false,
        })
    }

    /// The run directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run's identity and state file.
    pub(crate) fn run(&self) -> MutexGuard<'_, Run> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn processes(&self) -> MutexGuard<'_, Vec<(Option<String>, ProcessHandle)>> {
        self.processes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn launcher(&self) -> Result<&Launcher> {
        self.launcher.as_ref().context("the cluster is torn down")
    }

    /// Starts the apiserver forwarder, which teardown stops before it
    /// deletes the namespaces its listeners hold open.
    pub(crate) fn start_forwarder(&mut self, apiserver: SocketAddr) -> Result<()> {
        self.forwarder = Some(ApiserverForwarder::start(apiserver)?);
        Ok(())
    }

    /// The apiserver forwarder, until teardown.
    pub(crate) fn forwarder(&self) -> Result<&ApiserverForwarder> {
        self.forwarder.as_ref().context("the cluster is torn down")
    }

    /// Starts `command` as `name` (also its log file's stem, in the run
    /// directory) and records it, on `node` or in the root namespace.
    pub(crate) fn spawn(
        &self,
        node: Option<&str>,
        name: &str,
        command: Command,
    ) -> Result<ProcessHandle> {
        if name.is_empty() || name.contains('/') {
            bail!("process name `{name}` is not a file name; it names the log file, use letters, digits and dashes");
        }
        let log = self.dir.join(format!("{name}.log"));
        let process = self.launcher()?.spawn(name, command, &log)?;
        self.run().record_process(process.record())?;
        self.processes()
            .push((node.map(str::to_owned), process.clone()));
        Ok(process)
    }

    /// Stops the processes started on `node` and forgets them.
    pub(crate) fn kill_node_processes(&self, node: &str) -> Result<()> {
        let on_node: Vec<ProcessHandle> = {
            let mut processes = self.processes();
            let (on_node, rest) = processes
                .drain(..)
                .partition(|(n, _)| n.as_deref() == Some(node));
            *processes = rest;
            on_node.into_iter().map(|(_, p)| p).collect()
        };
        for process in on_node {
            process.kill()?;
            self.run().forget_process(&process.record())?;
        }
        Ok(())
    }

    /// Undoes everything, collecting errors instead of stopping at the first.
    /// With `keep_logs` the run directory stays, less the etcd data.
    pub(crate) fn teardown(&mut self, keep_logs: bool) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errors: Vec<anyhow::Error> = Vec::new();
        // Yours first, the control plane (started first) last, so components
        // never see the apiserver vanish under them while still running.
        let processes: Vec<ProcessHandle> =
            self.processes().drain(..).rev().map(|(_, p)| p).collect();
        for process in processes {
            if let Err(e) = process.kill() {
                errors.push(e.context(format!("stopping {}", process.name())));
            }
        }
        // Anything recorded but never tracked (a start that failed halfway).
        for record in self.run().state_processes() {
            if is_alive(&record) {
                if let Err(e) = signal_group(Pid::from_raw(record.pid as i32), Signal::SIGKILL) {
                    errors.push(e);
                }
            }
        }
        // Its listeners hold the node namespaces open.
        self.forwarder.take();
        match underlay::list_netns() {
            Ok(all) => {
                for netns in all.iter().filter(|n| n.starts_with(&self.netns_prefix)) {
                    if let Err(e) = underlay::delete_netns_with_processes(netns) {
                        errors.push(e);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        // Kubelet nodes' cgroups, once the processes in them are gone.
        let cgroup_prefix = self.netns_prefix.clone();
        if let Err(e) = cgroup::remove_cgroup_roots(|name| name.starts_with(&cgroup_prefix)) {
            errors.push(e);
        }
        // Last: the launcher's exit would SIGKILL any child still alive.
        self.launcher.take();
        let mut run = self.run();
        if errors.is_empty() {
            let removed = match keep_logs {
                true => run.remove_dir(true).and_then(|()| run.mark_finished()),
                false => run.remove_dir(false),
            };
            if let Err(e) = removed {
                errors.push(e);
            }
        }
        if keep_logs {
            eprintln!("weft-e2e: run directory kept: {}", self.dir.display());
        }
        match errors.len() {
            0 => Ok(()),
            _ => bail!(
                "teardown of {} left something behind (`weft-e2e cleanup` removes it once this process exits):\n{}",
                self.dir.display(),
                errors.iter().map(|e| format!("  {e:#}")).collect::<Vec<_>>().join("\n")
            ),
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        // Dropped without `stop`: an error or a panic; keep the logs.
        if let Err(e) = self.teardown(true) {
            eprintln!("weft-e2e: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names_map_back_to_their_owner() {
        assert_eq!(owner_of("we2e-4242-3-node-0"), Some(4242));
        assert_eq!(owner_of("we2e-4242-3-fabric"), Some(4242));
        assert_eq!(owner_of("other-4242-3-fabric"), None);
        assert_eq!(owner_of("we2e-4242"), None);
        assert_eq!(owner_of("we2e-x-3-fabric"), None);
    }

    #[test]
    fn a_name_whose_owner_lives_is_not_debris() {
        assert!(!is_debris(&format!("we2e-{}-0-node-0", std::process::id())));
        assert!(!is_debris("other-1-0-node-0"));
    }
}
