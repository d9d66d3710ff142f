//! Weft's shared library: everything the three thin binaries (`weft`,
//! `weft-controller`, `weft-agent`) have in common.
//!
//! - The CNI plugin's side: [`cni`] (spec types, config, results, errors),
//!   [`ipam`] (the on-disk address store), [`nodefile`] (the file the agent
//!   writes and the plugin reads) and [`plugin`] (the verbs).
//! - The kernel: [`netlink`] (links, addresses, routes, vxlan, neighbours,
//!   FDB; one connection per namespace) and [`netns`].
//! - The cluster: [`cidr`] (slicing the cluster CIDR and the allocator),
//!   [`annotations`] (the `weft.dev/*` formats), [`agent`] (desired state,
//!   diff, data plane, masquerade) and, behind the `kube` feature, the
//!   controller's and agent's API loops with [`serve`] and [`daemon`].

pub mod agent;
pub mod annotations;
pub mod cidr;
pub mod cni;
#[cfg(feature = "kube")]
pub mod controller;
#[cfg(feature = "kube")]
pub mod daemon;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod nodefile;
pub mod plugin;
#[cfg(feature = "kube")]
pub mod serve;
