//! Child processes of a cluster: parented by one long-lived thread, each in its
//! own process group, and killed with their group at teardown.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// How long a process gets to exit after SIGTERM before its group is killed.
const TERMINATION_GRACE: Duration = Duration::from_secs(5);

/// A process started by the cluster (apiserver, etcd, or one of yours through
/// [`crate::Cluster::spawn_on_node`] / [`crate::Cluster::spawn_host`]).
///
/// Clones refer to the same process. Its stdout and stderr go to
/// [`ProcessHandle::log_path`]. The cluster kills it (and its process group)
/// at teardown whether or not you did.
#[derive(Clone)]
pub struct ProcessHandle {
    inner: Arc<Tracked>,
}

struct Tracked {
    name: String,
    record: ProcessRecord,
    log: PathBuf,
    child: Mutex<Child>,
}

/// What a run's state file keeps about a process, so that `cleanup` can kill
/// it after a crash without killing an unrelated process that reused the pid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ProcessRecord {
    pub(crate) pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/<pid>/stat).
    pub(crate) start_time: u64,
}

impl std::fmt::Debug for ProcessHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessHandle")
            .field("name", &self.inner.name)
            .field("pid", &self.inner.record.pid)
            .field("log", &self.inner.log)
            .finish()
    }
}

impl ProcessHandle {
    /// The name it was started with (also the log file's stem).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.inner.record.pid
    }

    /// The file that receives its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.inner.log
    }

    /// The log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.inner.log).unwrap_or_default()
    }

    /// Whether it has not exited yet.
    pub fn is_running(&self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    /// Its exit status, once it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child().try_wait().ok().flatten()
    }

    /// Stops it: SIGTERM to its process group, SIGKILL after a grace period,
    /// then reaps it. Harmless if it already exited.
    pub fn kill(&self) -> Result<()> {
        let mut child = self.child();
        let group = Pid::from_raw(self.inner.record.pid as i32);
        if child.try_wait()?.is_none() {
            signal_group(group, Signal::SIGTERM)?;
            let deadline = Instant::now() + TERMINATION_GRACE;
            while child.try_wait()?.is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if child.try_wait()?.is_none() {
                signal_group(group, Signal::SIGKILL)?;
                child
                    .wait()
                    .with_context(|| format!("reaping {}", self.inner.name))?;
            }
        }
        // Children it left behind in its group go too.
        signal_group(group, Signal::SIGKILL)
    }

    pub(crate) fn record(&self) -> ProcessRecord {
        self.inner.record.clone()
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        // A panic while holding the lock leaves the Child intact.
        self.inner
            .child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Sends `signal` to a process group; a group that no longer exists is fine.
pub(crate) fn signal_group(group: Pid, signal: Signal) -> Result<()> {
    match killpg(group, signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(anyhow!("sending {signal} to process group {group}: {e}")),
    }
}

/// The start time of a live process, `None` if there is no such process.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after its closing parenthesis are plain. Start time is field 22.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process a record describes is still the one alive at that pid.
pub(crate) fn is_alive(record: &ProcessRecord) -> bool {
    process_start_time(record.pid) == Some(record.start_time)
}

type LaunchRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The thread that forks every child of a cluster.
///
/// Children get `PR_SET_PDEATHSIG = SIGKILL` so that a test process killed
/// outright (timeout, SIGKILL) takes its apiserver, etcd and node processes
/// with it. The kernel sends that signal when the *thread* that forked the
/// child exits, not the process, so forking from whatever tokio worker or
/// blocking-pool thread happens to call would kill children at random. One
/// thread that lives exactly as long as the cluster forks them all.
pub(crate) struct Launcher {
    requests: Option<mpsc::Sender<LaunchRequest>>,
    thread: Option<JoinHandle<()>>,
}

impl Launcher {
    pub(crate) fn start() -> Result<Self> {
        let (requests, incoming) = mpsc::channel::<LaunchRequest>();
        let thread = thread::Builder::new()
            .name("weft-e2e-launcher".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    // The caller waiting for the reply may have gone; nothing to do then.
                    let _ = reply.send(command.spawn());
                }
            })
            .context("starting the process launcher thread")?;
        Ok(Self {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Starts `command` as `name`, stdout and stderr appended to `log`.
    // pre_exec (prctl in the child before exec) is unsafe by signature.
    #[allow(unsafe_code)]
    pub(crate) fn spawn(
        &self,
        name: &str,
        mut command: Command,
        log: &Path,
    ) -> Result<ProcessHandle> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log file {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let (reply, response) = mpsc::channel();
        self.requests
            .as_ref()
            .context("the process launcher is stopped")?
            .send((command, reply))
            .map_err(|_| anyhow!("the process launcher thread is gone"))?;
        let child = response
            .recv()
            .context("the process launcher thread is gone")?
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        // The child cannot have been reaped yet (only we wait on it), so its
        // /proc entry exists even if it already exited.
        let start_time = process_start_time(pid)
            .with_context(|| format!("reading the start time of {name} (pid {pid})"))?;
        Ok(ProcessHandle {
            inner: Arc::new(Tracked {
                name: name.to_owned(),
                record: ProcessRecord { pid, start_time },
                log: log.to_owned(),
                child: Mutex::new(child),
            }),
        })
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_stable_and_of_missing_pid_is_none() {
        let me = std::process::id();
        let first = process_start_time(me).expect("own /proc entry");
        assert_eq!(process_start_time(me), Some(first));
        // pid_max is at most 2^22, so this pid cannot exist.
        assert_eq!(process_start_time(u32::MAX / 2), None);
    }

    #[test]
    fn spawned_process_logs_and_is_killed() {
        let dir = std::env::temp_dir().join(format!("weft-e2e-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let launcher = Launcher::start().unwrap();
        let mut command = Command::new("sh");
        command.args(["-c", "echo started; sleep 300 & wait"]);
        let handle = launcher
            .spawn("sleeper", command, &dir.join("sleeper.log"))
            .unwrap();
        assert!(handle.is_running());
        while !handle.log().contains("started") {
            thread::sleep(Duration::from_millis(10));
        }
        handle.kill().unwrap();
        assert!(!handle.is_running());
        assert!(!is_alive(&handle.record()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
