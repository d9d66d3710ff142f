//! The plugin's one error type: what stops it from producing a report at
//! all (no kubeconfig, no API server, a read the API refused). A node or
//! daemon in trouble is not an error: it is a warning in the report.

/// Why `kubectl weft` could not report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read or has no usable context.
    #[error(
        "kubeconfig: {0} (pass --kubeconfig or set KUBECONFIG, and --context to pick a context)"
    )]
    Kubeconfig(String),

    /// The client could not be built from the kubeconfig.
    #[error("building the API client: {0}")]
    Client(#[source] kube::Error),

    /// A read from the API server failed.
    #[error("reading {what}: {source} (check the API server is reachable and that you may {what}, e.g. with the weft-operator ClusterRole)")]
    Read {
        /// What was read, e.g. `list nodes`.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },

    /// A read from the API server did not answer in time.
    #[error("reading {what}: no answer within {seconds} s (check the API server is reachable; --request-timeout sets the limit)")]
    Timeout {
        /// What was read.
        what: String,
        /// The limit, in seconds.
        seconds: u64,
    },

    /// The bundle file exists and `--force` was not given.
    #[error("{} exists already (pass --force to replace it, or -f to name another file)", path.display())]
    Exists {
        /// The file.
        path: std::path::PathBuf,
    },

    /// The bundle file could not be written.
    #[error("writing {}: {source} (check the directory exists and is writable, or name another file with -f)", path.display())]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// `trace` cannot work out its two ends or the port from the cluster.
    #[error("{0}")]
    Trace(String),

    /// A change `connectivity test` makes was refused or not answered.
    #[error("{what}: {source} (check that you may {what}: docs/connectivity.md lists the permissions the test needs)")]
    Change {
        /// What was changed, e.g. `create pods`.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },

    /// `connectivity test` (or its probe) could not run.
    #[error("{0}")]
    Connectivity(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
