//! `weft-controller`: hands every Node a pod CIDR slice of the cluster CIDR.
//!
//! The binary resolves its settings into a [`ControllerConfig`] and calls
//! [`run`]. The modules, by job:
//! - `reconcile`: the run loop, one leadership term's node watch, and the
//!   per-node reconcile that writes a node's slices where it differs;
//! - [`allocator`]: the pure decision of which node holds which slice;
//! - [`leader`]: the Lease election that lets one replica allocate;
//! - [`config`]: layered settings and their checks;
//! - `node`, `report`, `metrics`: reading and patching a Node, telling
//!   operators about nodes left alone, and the Prometheus metrics.

pub mod allocator;
pub mod config;
pub mod leader;
mod metrics;
mod node;
mod reconcile;
mod report;

pub use config::{ControllerConfig, ControllerSettings};
pub use leader::{LeaderElection, LeaseTimings};
pub use metrics::ControllerMetrics;
pub use reconcile::{run, Error, FIELD_MANAGER};
