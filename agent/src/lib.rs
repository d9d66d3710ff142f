//! `weft-agent`: the node agent. It programs the overlay to every peer
//! and enforces NetworkPolicy for the pods on its node.
//!
//! - What the node knows: [`config`], [`peer`] (peers as routing needs
//!   them) and [`node`] (reading Node objects into those fields, and the
//!   patches written to this node). The node cache (module `cache`) keeps
//!   those fields for every Node, fed by a watch (module `watch`, which
//!   feeds the [`policy`] records too).
//! - Trust: [`screen`] checks every peer's slices, public IP and VTEP MAC
//!   against the cluster settings, this node and the other peers, before
//!   the overlay plans anything for it.
//! - [`guard`]: the `inet weft-guard` table, always on: pods send only
//!   from their own addresses, VXLAN is taken only from accepted peers.
//! - Desired state, plan, apply: [`overlay`] computes the entries the node
//!   wants and the plan that reaches them from a kernel dump; [`dataplane`]
//!   dumps and applies; a peer whose entries the kernel refuses is retried
//!   on its own backoff (module `retry`) without holding up the others.
//! - [`policy`]: NetworkPolicy, from the API's records to the
//!   `inet weft-policy` table, in a task of its own beside the overlay's.
//! - [`nft_watch`]: restores Weft's nftables tables moments after a change
//!   made behind the agent's back.
//! - Node set-up (module `setup`): [`underlay`], the VTEP device,
//!   [`offload`], forwarding, the node file, [`install`], [`masquerade`].
//! - Node writes (module `publish`): this node's annotations and its
//!   NetworkUnavailable=False condition.
//! - [`uninstall`]: removing Weft from the node when its DaemonSet is gone.
//! - What `/status` reports beyond the loop's own state: [`kernel_check`]
//!   (what the kernel lacks or holds in excess, planned without applying)
//!   and [`ipam_audit`] (the plugin's address store against this node's
//!   Pods).
//! - [`run()`]: the loop that ties them together; [`AgentError`] is what
//!   stops it or fails one pass, [`metrics`] what it counts.

mod cache;
pub mod config;
pub mod dataplane;
pub mod dump;
mod error;
pub mod guard;
pub mod install;
pub mod ipam_audit;
pub mod kernel_check;
pub mod masquerade;
pub mod metrics;
pub mod nft_watch;
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
mod status;
pub mod underlay;
pub mod uninstall;
mod watch;

pub use error::AgentError;
pub use publish::FIELD_MANAGER;
pub use run::run;
pub use weft_core::netlink::ROUTE_PROTOCOL;
