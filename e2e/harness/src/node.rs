//! Nodes (network namespaces on the underlay, registered as Node objects) and
//! the "outside the cluster" namespace.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::exec::{command_in, go_arch, netns_path, ping_from};
use crate::machine::NodeMachine;
use crate::pod::Pod;
use crate::underlay::SegmentAddressing;

/// Which underlay subnet a node sits on.
///
/// Nodes on different segments are joined by a router namespace, so they are
/// not on one L2 network: host-gw routes cannot cross, vxlan must.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// 172.31.1.0/24 (and fd00:172:31:1::/64 in a dual-stack cluster),
    /// where most nodes and the outside namespace sit.
    Main,
    /// 172.31.2.0/24 (and fd00:172:31:2::/64), behind the router.
    Routed,
}

impl Segment {
    /// The segment's subnet.
    pub fn subnet(self) -> Ipv4Net {
        self.addressing().subnet
    }

    /// The router's address on this segment (every member's default gateway).
    pub fn gateway(self) -> Ipv4Addr {
        self.addressing().gateway()
    }

    /// The segment's IPv6 subnet (in use in dual-stack clusters only).
    pub fn subnet_v6(self) -> Ipv6Net {
        self.addressing().subnet_v6
    }

    pub(crate) fn addressing(self) -> SegmentAddressing {
        match self {
            Segment::Main => SegmentAddressing {
                subnet: "172.31.1.0/24".parse().expect("valid subnet"),
                subnet_v6: "fd00:172:31:1::/64".parse().expect("valid subnet"),
                bridge: "seg-main",
                router_link: "main",
            },
            Segment::Routed => SegmentAddressing {
                subnet: "172.31.2.0/24".parse().expect("valid subnet"),
                subnet_v6: "fd00:172:31:2::/64".parse().expect("valid subnet"),
                bridge: "seg-routed",
                router_link: "routed",
            },
        }
    }

    pub(crate) const ALL: [Segment; 2] = [Segment::Main, Segment::Routed];
}

/// One node of the cluster: a network namespace with one underlay interface,
/// `eth0`, and a default route via its segment's router. IPv4 forwarding is on,
/// as on a prepared Kubernetes node.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    /// The Node object's name (and the node's hostname in the domain sense).
    pub name: String,
    /// The network namespace's name (`ip netns`), see [`ClusterNode::netns_path`].
    pub netns: String,
    /// The node's underlay address with its prefix, e.g. 172.31.1.10/24;
    /// the Node object's InternalIP.
    pub underlay_address: Ipv4Net,
    /// In a dual-stack cluster, the node's IPv6 underlay address with its
    /// prefix, e.g. fd00:172:31:1::a/64; its second InternalIP.
    pub underlay_address_v6: Option<Ipv6Net>,
    /// The underlay segment it sits on.
    pub segment: Segment,
    /// The underlay interface inside the namespace.
    pub underlay_link: String,
    /// A kubeconfig that works inside the node namespace (the apiserver is
    /// forwarded to the same loopback address there).
    pub kubeconfig: PathBuf,
    /// A directory of this node's own, under the run directory, for files a
    /// node would keep on its disk (CNI configuration, plugin state, …).
    pub state_dir: PathBuf,
    /// For a kubelet node ([`crate::NodeKind::Kubelet`]), its own mount, PID
    /// and UTS namespaces, where containerd, the kubelet and pods run.
    pub machine: Option<NodeMachine>,
}

impl ClusterNode {
    /// The node's underlay IPv4 address.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay_address.addr()
    }

    /// The node's underlay IPv6 address, in a dual-stack cluster.
    pub fn underlay_ip_v6(&self) -> Option<Ipv6Addr> {
        self.underlay_address_v6.map(|address| address.addr())
    }

    /// The node's underlay addresses, IPv4 first: its InternalIPs, in the
    /// order of a kubelet's `--node-ip`.
    pub fn underlay_ips(&self) -> Vec<IpAddr> {
        let mut ips = vec![IpAddr::V4(self.underlay_ip())];
        ips.extend(self.underlay_ip_v6().map(IpAddr::V6));
        ips
    }

    /// The namespace as a path, for `setns` or `nsenter --net=`.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// A command that runs `program` inside the node's network namespace
    /// (`ip netns exec`; note that this remounts /sys and hides cgroups, use
    /// `nsenter --net=<netns_path>` for anything that needs them).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.netns, program)
    }

    /// Whether one ICMP echo to `ip` from the node's namespace is answered
    /// within a second.
    pub fn ping(&self, ip: IpAddr) -> bool {
        ping_from(&self.netns, ip)
    }

    /// Creates a pod on this node as a container runtime would: a new
    /// network namespace, then the CNI plugin's ADD run inside the node's
    /// namespace with `netconf_json` on stdin (see [`Pod`]).
    pub fn add_pod(&self, plugin: &Path, netconf_json: &str, name: &str) -> Result<Pod> {
        let netns = format!("{}{name}", self.pod_netns_prefix());
        Pod::add(&self.netns, netns, plugin, netconf_json, name)
    }

    /// The prefix of the namespace names of this node's pods.
    pub(crate) fn pod_netns_prefix(&self) -> String {
        format!("{}-pod-", self.netns)
    }
}

/// The namespace standing for "outside the cluster" (the internet, for
/// masquerade tests): on the main segment, default route via the router, and
/// no route to any pod network.
#[derive(Clone, Debug)]
pub struct Outside {
    /// The network namespace's name.
    pub netns: String,
    /// Its underlay address with prefix.
    pub address: Ipv4Net,
    /// Its IPv6 underlay address with prefix, in a dual-stack cluster.
    pub address_v6: Option<Ipv6Net>,
}

impl Outside {
    /// Its IPv4 address.
    pub fn ip(&self) -> Ipv4Addr {
        self.address.addr()
    }

    /// Its IPv6 address, in a dual-stack cluster.
    pub fn ip_v6(&self) -> Option<Ipv6Addr> {
        self.address_v6.map(|address| address.addr())
    }

    /// A command that runs `program` inside the outside namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.netns, program)
    }

    /// Whether one ICMP echo to `ip` from outside is answered within a second.
    pub fn ping(&self, ip: IpAddr) -> bool {
        ping_from(&self.netns, ip)
    }
}

/// Creates the Node object and marks it Ready, as a kubelet does when it
/// registers: labels, then addresses and conditions on the status subresource.
pub(crate) async fn register(client: &kube::Client, node: &ClusterNode) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), node.name.clone()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("kubernetes.io/arch".to_owned(), go_arch().to_owned()),
        ("beta.kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("beta.kubernetes.io/arch".to_owned(), go_arch().to_owned()),
    ]);
    let object = Node {
        metadata: ObjectMeta {
            name: Some(node.name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    nodes
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating Node {}", node.name))?;
    // A kubelet reports its own version; ours matches the control plane's.
    let version = client
        .apiserver_version()
        .await
        .context("reading the apiserver version")?
        .git_version;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut addresses: Vec<NodeAddress> = node
        .underlay_ips()
        .iter()
        .map(|ip| NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        })
        .collect();
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: node.name.clone(),
    });
    let status = NodeStatus {
        addresses: Some(addresses),
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: Some("KubeletReady".into()),
            message: Some("weft-e2e node namespace is up".into()),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(now),
        }]),
        node_info: Some(NodeSystemInfo {
            architecture: go_arch().into(),
            operating_system: "linux".into(),
            kernel_version: kernel.trim().into(),
            kubelet_version: version,
            os_image: "weft-e2e network namespace".into(),
            machine_id: node.netns.clone(),
            system_uuid: node.netns.clone(),
            boot_id: node.netns.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    nodes
        .patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .with_context(|| format!("setting the status of Node {}", node.name))?;
    Ok(())
}
