//! `weft-controller`: hands every Node a pod CIDR slice of the cluster CIDR.
//!
//! The binary resolves its settings into a [`ControllerConfig`] and calls
//! [`run`]. The modules, by job:
//! - this file: the crate's [`Error`] and field manager;
//! - `reconcile`: the run loop, one leadership term's node watch, and the
//!   per-node reconcile that writes a node's slices where it differs;
//! - [`allocator`]: the pure decision of which node holds which slice;
//! - [`leader`]: the Lease election that lets one replica allocate;
//! - [`config`]: layered settings and their checks;
//! - `node`, `report`, `metrics`: reading and patching a Node, telling
//!   operators about nodes left alone, and the Prometheus metrics;
//! - `status`: the `/status` document, from a snapshot the run loop keeps.

pub mod allocator;
pub mod config;
pub mod leader;
mod metrics;
mod node;
mod reconcile;
mod report;
mod status;

pub use config::{ControllerConfig, ControllerSettings};
pub use leader::{LeaderElection, LeaseTimings};
pub use metrics::ControllerMetrics;
pub use reconcile::run;

use weft_daemon::serve::ServeError;

/// Field manager of the controller's writes and `reportingController` of its Events.
pub const FIELD_MANAGER: &str = "weft-controller";

/// What can go wrong in the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a node's slices failed.
    #[error("writing the pod CIDR of node {node} failed: {source}")]
    WriteNode {
        /// The node.
        node: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The node changed between read and write; the reconcile is retried.
    #[error("node {node} changed since it was read; retrying on the new version")]
    WriteConflict {
        /// The node.
        node: String,
    },
    /// Publishing an Event failed.
    #[error("publishing the {reason} event for node {node} failed: {source}")]
    PublishEvent {
        /// The node.
        node: String,
        /// The Event reason.
        reason: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The health/metrics endpoint failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl Error {
    /// A short label for the `reconcile_errors` metric.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Error::WriteNode { .. } => "write_node",
            Error::WriteConflict { .. } => "write_conflict",
            Error::PublishEvent { .. } => "publish_event",
            Error::Serve(_) => "serve",
        }
    }
}
