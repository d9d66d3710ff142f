//! Network namespaces: open one by path, check that it exists, and run code
//! inside it.
//!
//! Entering a namespace changes the calling *thread*. Doing that on a thread
//! that also runs other work (a tokio worker, the plugin's main thread) would
//! leak the namespace into that work, so [`Netns::run_in`] uses a dedicated,
//! short-lived thread, and [`Netns::run_here`], for a single system call,
//! steps in and back out before anything else can run on the thread.

use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC, PROC_SUPER_MAGIC};

/// The calling thread's own network namespace: setns(2) moves a thread, so
/// the process-wide `/proc/self/ns/net` could name another one.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Why a network namespace could not be opened or entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Nothing exists at the path (the runtime removed the namespace, or the
    /// path is wrong).
    #[error("network namespace {path} does not exist")]
    Missing {
        /// The path that was opened.
        path: PathBuf,
    },
    /// The path exists but is not a network-namespace file.
    #[error("{path} is not a network namespace file (expected an nsfs bind mount such as /var/run/netns/NAME or /proc/PID/ns/net)")]
    NotNetns {
        /// The path that was opened.
        path: PathBuf,
    },
    /// The path could not be opened for another reason (permissions, …).
    #[error("opening network namespace {path}: {source}")]
    Open {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `setns(2)` refused to enter the namespace.
    #[error("entering network namespace {path}: {errno}")]
    Enter {
        /// The namespace being entered.
        path: PathBuf,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The dedicated thread could not be started.
    #[error("starting a thread to enter network namespace {path}: {source}")]
    Thread {
        /// The namespace being entered.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// An open handle on a network namespace. Holding the file keeps the
/// namespace alive even if its bind mount is removed meanwhile.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    /// Opens the network namespace at `path` (for example
    /// `/var/run/netns/NAME` or `/proc/PID/ns/net`) and checks that it is one.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => NetnsError::Missing { path: path.clone() },
            _ => NetnsError::Open {
                path: path.clone(),
                source,
            },
        })?;
        // A bind-mounted namespace reports nsfs; very old kernels report
        // procfs for /proc/PID/ns/* files. Anything else is a plain file or
        // directory that happens to sit at that path.
        let magic = fstatfs(&file)
            .map_err(|errno| NetnsError::Open {
                path: path.clone(),
                source: errno.into(),
            })?
            .filesystem_type();
        if magic != NSFS_MAGIC && magic != PROC_SUPER_MAGIC {
            return Err(NetnsError::NotNetns { path });
        }
        Ok(Self { path, file })
    }

    /// Whether a network namespace can be opened at `path`.
    pub fn exists(path: impl AsRef<Path>) -> bool {
        Self::open(path).is_ok()
    }

    /// Whether this is the namespace the calling thread is in, however
    /// either path is spelled (a bind mount under `/var/run/netns`,
    /// `/proc/PID/ns/net`): a namespace is its inode on the nsfs device.
    pub fn is_current(&self) -> Result<bool, NetnsError> {
        let stat_err = |path: &Path| {
            let path = path.to_owned();
            move |source| NetnsError::Open { path, source }
        };
        let current = fs::metadata(THREAD_NETNS).map_err(stat_err(Path::new(THREAD_NETNS)))?;
        let this = self.file.metadata().map_err(stat_err(&self.path))?;
        Ok((this.dev(), this.ino()) == (current.dev(), current.ino()))
    }

    /// The path this namespace was opened from (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the calling thread moved into this namespace, and
    /// moves the thread back before returning, panics included. For short,
    /// synchronous work such as opening a socket, where [`Netns::run_in`]'s
    /// thread would cost more than the work: `work` must not hand control to
    /// anything that expects the thread's own namespace (no `.await`).
    ///
    /// A thread that cannot return would go on in the wrong namespace, so
    /// that aborts the process.
    pub fn run_here<T>(&self, work: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = File::open(THREAD_NETNS).map_err(|source| NetnsError::Open {
            path: THREAD_NETNS.into(),
            source,
        })?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
            path: self.path.clone(),
            errno,
        })?;
        let _return = ReturnTo { home };
        Ok(work())
    }

    /// Runs `work` on a new thread that has entered this namespace and
    /// returns its result. The calling thread never changes namespace.
    ///
    /// A panic in `work` is propagated to the caller.
    pub fn run_in<T, F>(&self, work: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(scope, || {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| {
                        NetnsError::Enter {
                            path: self.path.clone(),
                            errno,
                        }
                    })?;
                    Ok(work())
                })
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// The calling thread's own namespace, re-entered on drop.
struct ReturnTo {
    home: File,
}

impl Drop for ReturnTo {
    fn drop(&mut self) {
        if let Err(errno) = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Anything this thread did next would happen in the wrong
            // namespace, on the wrong host interfaces.
            eprintln!("cannot return to the thread's own network namespace: {errno}; aborting");
            std::process::abort();
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_path_is_reported_as_missing() {
        let err = Netns::open("/nonexistent/weft-netns").unwrap_err();
        assert!(matches!(err, NetnsError::Missing { .. }), "{err}");
        assert!(!Netns::exists("/nonexistent/weft-netns"));
    }

    #[test]
    fn regular_file_is_not_a_netns() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = Netns::open(file.path()).unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
    }

    #[test]
    fn own_namespace_opens_and_runs_work() {
        if !weft_testing::root_available("entering a network namespace") {
            return;
        }
        let netns = Netns::open("/proc/self/ns/net").unwrap();
        assert_eq!(netns.run_in(|| 40 + 2).unwrap(), 42);
        assert_eq!(netns.run_here(|| 40 + 2).unwrap(), 42);
    }

    #[test]
    fn only_the_threads_own_namespace_is_current() {
        let own = Netns::open("/proc/self/ns/net").unwrap();
        assert!(own.is_current().unwrap());
        if !weft_testing::root_available("creating a network namespace") {
            return;
        }
        let made = weft_testing::TestNetns::create("netns-current");
        let other = Netns::open(made.path()).unwrap();
        assert!(!other.is_current().unwrap());
        assert!(other.run_here(|| other.is_current()).unwrap().unwrap());
    }

    #[test]
    fn run_here_returns_the_thread_to_its_namespace() {
        if !weft_testing::root_available("entering a network namespace") {
            return;
        }
        let own = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let home = own();
        let made = weft_testing::TestNetns::create("netns-here");
        let inside = Netns::open(made.path()).unwrap().run_here(own).unwrap();
        let after = own();
        assert_ne!(inside, home, "work ran in the target namespace");
        assert_eq!(after, home, "the thread came back");
    }
}
