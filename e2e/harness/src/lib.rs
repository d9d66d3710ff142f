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
//! network plugin runs. [`ClusterSpec::dual_stack`] makes a cluster
//! dual-stack, IPv4 first, as kubeadm makes one.
//!
//! [`Kubectl`] and [`helm_command`] run kubectl and helm against a cluster
//! as an operator would ([`build_helm`] builds helm); [`build_weft_image`]
//! and [`install_from_manifests`] install Weft the way `manifests/` says;
//! [`conformance`] runs Kubernetes' own network e2e tests against it.
//! Running programs, waiting on conditions and the root check come from
//! `weft-testing`, below this crate.
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
//!
//! # Modules
//!
//! - `cluster`: [`Cluster`] and [`ClusterSpec`], what a run brings up and
//!   tears down.
//! - `control_plane`: etcd, kube-apiserver (and for kubelet nodes
//!   kube-controller-manager and kube-scheduler), their certificates and
//!   kubeconfigs, and the Kubernetes binaries `e2e/k8s/build.sh` builds.
//! - `underlay`: the namespaces, bridges and router of the underlay network.
//! - `node`, `pod`: [`ClusterNode`], [`Outside`] and [`Pod`], wired as a
//!   container runtime would through a CNI plugin.
//! - `machine`, `cgroup`, `containerd`, `kubelet`, `kube_proxy`, `dns`,
//!   `images`: kubelet nodes ([`NodeMachine`], [`ProxyMode`]), the cluster
//!   DNS and the images they run.
//! - `forwarder`: the apiserver reached from inside node namespaces.
//! - `process`, `run`: the processes a run starts ([`ProcessHandle`]), its
//!   directory and state, teardown and [`cleanup_leftovers`].
//! - `exec`: programs run inside a network namespace by name, one-shot
//!   pings, log tails, the architecture name.
//! - `kubectl`: [`Kubectl`], [`helm_command`], [`build_helm`].
//! - `install`: [`build_weft_image`], [`install_from_manifests`],
//!   [`weft_manifests`], [`pod_is_ready`], [`node_is_ready`].
//! - [`conformance`]: the upstream network e2e suite, its images and report.
//!
//! No module imports one that imports it back: shared items live in the
//! module that owns them (kube-proxy's mode in `kube_proxy`), and the
//! repository's root comes from `weft-testing`.

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
mod kubectl;
mod kubelet;
mod machine;
mod node;
mod phases;
mod pod;
mod process;
mod run;
mod underlay;

pub use cluster::{Cluster, ClusterSpec, NodeKind};
pub use control_plane::SERVICE_CLUSTER_IP_RANGE_V6;
pub use dns::{nslookup_addresses, wait_until_dns_ready};
pub use exec::command_exists;
pub use images::{BUSYBOX_IMAGE, PAUSE_IMAGE};
pub use install::{
    build_weft_image, install_from_manifests, node_is_ready, pod_is_ready, weft_manifests,
};
pub use kube_proxy::{ProxyMode, CLUSTER_CIDR_V6};
pub use kubectl::{build_helm, helm_command, Kubectl};
pub use machine::NodeMachine;
pub use node::{ClusterNode, Outside, Segment};
pub use phases::Phases;
pub use pod::{Pod, POD_INTERFACE};
pub use process::ProcessHandle;
pub use run::{cleanup_leftovers, stop_held_clusters};
