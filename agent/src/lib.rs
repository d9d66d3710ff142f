//! `weft-agent`: programs the overlay on the node it runs on.
//!
//! - What the node knows: [`config`], [`peer`] (peers as routing needs
//!   them) and [`node`] (reading Node objects, writing this node's
//!   annotations).
//! - Desired state, plan, apply: [`overlay`] computes the entries the node
//!   wants and the plan that reaches them from a kernel dump; [`dataplane`]
//!   dumps and applies.
//! - Node set-up: [`underlay`], [`offload`], [`masquerade`], [`install`].
//! - [`uninstall`]: removing Weft from the node when its DaemonSet is gone.
//! - [`run`]: the loop that ties them together.

pub mod config;
pub mod dataplane;
pub mod install;
pub mod masquerade;
pub mod metrics;
pub mod node;
pub mod offload;
pub mod overlay;
pub mod peer;
mod run;
pub mod underlay;
pub mod uninstall;

pub use run::{run, AgentError, FIELD_MANAGER};

/// The routing protocol number on every route Weft installs (`proto 87` in
/// `ip route`; 87 is ASCII `W`). It is how the agent tells its routes from
/// everyone else's: a dump filtered on it is exactly what Weft owns, so
/// stale routes of an earlier run are found and foreign routes are never
/// touched. Not assigned in iproute2's `rt_protos` list.
pub const ROUTE_PROTOCOL: u8 = 87;
