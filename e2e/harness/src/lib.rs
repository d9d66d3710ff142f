//! Test support for Weft: a real control plane and network-namespace nodes.
//!
//! [`Cluster::start`] brings up a real kube-apiserver and etcd on loopback
//! (TLS, RBAC, ServiceAccount tokens) and a set of nodes, each a network
//! namespace on a bridged "underlay" network, registered as Node objects the
//! way a kubelet would. Processes run on a node with
//! [`Cluster::spawn_on_node`]; pods are wired with the `weft` CNI plugin through
//! [`ClusterNode::add_pod`], as a container runtime would. Dropping the
//! [`Cluster`] (or [`Cluster::stop`]) tears everything down; a crashed run is
//! cleaned up by [`cleanup_leftovers`] (called by every start).
//!
//! With [`NodeKind::Kubelet`] (see [`ClusterSpec::kubelet_nodes`]) every node
//! also runs containerd and a kubelet in mount, PID and UTS namespaces of its
//! own ([`NodeMachine`]), the control plane gains kube-controller-manager and
//! kube-scheduler, and pods are scheduled and run for real, from images
//! imported without a registry ([`BUSYBOX_IMAGE`], [`PAUSE_IMAGE`] and those
//! in [`ClusterSpec::images`]), with CoreDNS as the cluster DNS once a
//! network plugin runs.
//!
//! Needs root. The root network namespace is never changed: every link,
//! address, route and sysctl lives in namespaces named `we2e-<run>-…`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use weft_e2e::{Cluster, ClusterSpec};
//! let cluster = Cluster::start(ClusterSpec::default()).await?;
//! let client = cluster.client().await?;
//! // ... drive the controller / agents, assert on the API and the data path ...
//! cluster.stop().await?;
//! # Ok(()) }
//! ```

mod cgroup;
mod cluster;
pub mod conformance;
mod containerd;
mod control_plane;
mod dns;
mod exec;
mod forwarder;
mod images;
mod install;
mod kube_proxy;
mod kubelet;
mod machine;
mod node;
mod pod;
mod process;
mod run;
mod underlay;

pub use cluster::{Cluster, ClusterSpec, NodeKind, ProxyMode};
pub use images::{BUSYBOX_IMAGE, PAUSE_IMAGE};
pub use install::{build_weft_image, install_from_manifests, run_repository_script};
pub use machine::NodeMachine;
pub use node::{ClusterNode, Outside, Segment};
pub use pod::{Pod, POD_INTERFACE};
pub use process::ProcessHandle;
pub use run::{cleanup_leftovers, stop_held_clusters};
