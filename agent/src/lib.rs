//! `weft-agent`: programs the overlay on the node it runs on.
//!
//! - What the node knows: [`config`], [`peer`] (peers as routing needs
//!   them) and [`node`] (reading Node objects into those fields, and the
//!   patches written to this node). The node cache (module `cache`) keeps
//!   those fields for every Node, fed by a kube-runtime watcher.
//! - Trust: [`screen`] checks every peer's slices, public IP and VTEP MAC
//!   against the cluster settings, this node and the other peers, before
//!   the overlay plans anything for it.
//! - Desired state, plan, apply: [`overlay`] computes the entries the node
//!   wants and the plan that reaches them from a kernel dump; [`dataplane`]
//!   dumps and applies.
//! - Node set-up (module `setup`): [`underlay`], the VTEP device,
//!   [`offload`], forwarding, the node file, [`install`], [`masquerade`].
//! - Node writes (module `publish`): this node's annotations and its
//!   NetworkUnavailable=False condition.
//! - [`uninstall`]: removing Weft from the node when its DaemonSet is gone.
//! - [`run()`]: the loop that ties them together; [`AgentError`] is what
//!   stops it or fails one pass, [`metrics`] what it counts.

mod cache;
pub mod config;
pub mod dataplane;
mod error;
pub mod install;
pub mod masquerade;
pub mod metrics;
pub mod node;
pub mod offload;
pub mod overlay;
pub mod peer;
pub mod policy;
mod publish;
mod retry;
mod run;
pub mod screen;
mod setup;
pub mod underlay;
pub mod uninstall;

pub use error::AgentError;
pub use publish::FIELD_MANAGER;
pub use run::run;

/// The routing protocol number on every route Weft installs (`proto 87` in
/// `ip route`; 87 is ASCII `W`). It is how the agent tells its routes from
/// everyone else's: a dump filtered on it is exactly what Weft owns, so
/// stale routes of an earlier run are found and foreign routes are never
/// touched. Not assigned in iproute2's `rt_protos` list.
pub const ROUTE_PROTOCOL: u8 = 87;
