//! Weft's shared core: what two or more of the components (`weft-cni`,
//! `weft-agent`, `weft-controller`) use, and nothing component-specific.
//!
//! - The kernel: [`netlink`] (links, addresses, routes, vxlan devices,
//!   neighbours and FDB entries; one connection per namespace) and
//!   [`netns`].
//! - The files and formats components hand each other: [`nodefile`] (the
//!   agent writes it, the plugin reads it), [`annotations`] (the
//!   `weft.dev/*` keys and values on Node objects) and [`fields`] (JSON
//!   read field by field, so errors name the field).
//! - [`ip`]: IP families, address arithmetic and the forwarding switch.
//! - [`nft`]: running `nft` transactions, and the tables' names.
//!
//! The daemons' process plumbing (logging, signals, the HTTP endpoint) is in
//! `weft-daemon`, so the plugin builds without an HTTP stack.

pub mod annotations;
pub mod fields;
pub mod ip;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod nodefile;

/// The bridge pods attach to unless the network config names another. The
/// plugin creates it; the agent's uninstall removes it.
pub const DEFAULT_BRIDGE: &str = "weft0";
