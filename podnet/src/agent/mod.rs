//! The agent: programs the overlay on its node.
//!
//! The pure parts (configuration, peer data, desired state and the plan
//! that reaches it, the masquerade ruleset) build without the `kube`
//! feature; the loop that watches Nodes and publishes this node's
//! annotations needs it.

pub mod config;
pub mod dataplane;
pub mod install;
pub mod masquerade;
#[cfg(feature = "kube")]
pub mod metrics;
#[cfg(feature = "kube")]
pub mod node;
pub mod offload;
pub mod overlay;
pub mod peer;
#[cfg(feature = "kube")]
mod run;
pub mod underlay;
pub mod uninstall;

#[cfg(feature = "kube")]
pub use run::{run, AgentError, FIELD_MANAGER};

/// The routing protocol number on every route Weft installs (`proto 87` in
/// `ip route`; 87 is ASCII `W`). It is how the agent tells its routes from
/// everyone else's: a dump filtered on it is exactly what Weft owns, so
/// stale routes of an earlier run are found and foreign routes are never
/// touched. Not assigned in iproute2's `rt_protos` list.
pub const ROUTE_PROTOCOL: u8 = 87;
