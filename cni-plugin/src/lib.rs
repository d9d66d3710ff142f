//! The `weft` CNI plugin as a library; `main.rs` only reads stdin, calls
//! [`plugin::run`] and writes its reply.
//!
//! - [`cni`]: the spec's types: the network config, the `CNI_*`
//!   environment, results in every supported version, error JSON.
//! - [`ipam`]: the crash-safe on-disk address store of one network.
//! - [`plugin`]: the verbs (ADD, DEL, CHECK, GC, STATUS, VERSION) over the
//!   pod's routed veth pair and its network namespace, and the
//!   hostPort mappings.

pub mod cni;
pub mod ipam;
pub mod plugin;
