//! Weft's shared core: what two or more of the components (`weft-cni`,
//! `weft-agent`, `weft-controller`) use, and nothing component-specific.
//!
//! - The kernel: [`netlink`] (links, addresses, routes, vxlan devices,
//!   neighbours and FDB entries; one connection per namespace; the route
//!   protocol that marks the routes Weft owns) and
//!   [`netns`].
//! - The files and formats components hand each other: [`nodefile`] (the
//!   agent writes it, the plugin reads it), [`ipam_store`] (the plugin
//!   writes it, the agent reads it), [`annotations`] (the
//!   `weft.dev/*` keys and values on Node objects) and [`fields`] (JSON
//!   read field by field, so errors name the field).
//! - [`slice`]: the plan that cuts each family's cluster CIDR into per-node
//!   slices, and the one validation of a cluster CIDR and slice size.
//! - [`ip`]: IP families, address arithmetic and the forwarding switch;
//!   [`protocol`]: the transport protocols ports name.
//! - [`status`]: the documents the daemons serve at `/status` and
//!   `kubectl weft` reads, and the version and commit of the build.
//! - [`nft`]: running `nft` transactions, nft's words for each IP family,
//!   and the name of the plugin's hostPort table (which the agent's
//!   uninstall removes too).
//!
//! The daemons' process plumbing (logging, signals, the HTTP endpoint) is in
//! `weft-daemon`, so the plugin builds without an HTTP stack.

pub mod annotations;
pub mod fields;
pub mod ip;
pub mod ipam_store;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod nodefile;
pub mod protocol;
pub mod slice;
pub mod status;

/// The bridge pods were attached to before pods got routed veths. Nothing
/// creates it any more; on a node upgraded from that design it carries the
/// pods not yet re-created, and the agent's uninstall removes it.
pub const DEFAULT_BRIDGE: &str = "weft0";
