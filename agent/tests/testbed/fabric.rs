//! Namespace "nodes" for the data-plane tests without an API server: node
//! namespaces joined by veths to a fabric bridge namespace, node `i` at
//! `172.31.0.(10+i)/24` on `eth0` with slice `10.244.i.0/24`, its VTEP
//! programmed through the agent's own `Dataplane`, and pods wired as the
//! plugin wires them. Every namespace is removed when dropped.

#![allow(dead_code)] // each test binary uses a different part

use std::net::IpAddr;

use anyhow::{Context, Result};
use ipnet::IpNet;
use weft_agent::dataplane::{Dataplane, Vtep};
use weft_agent::peer::{LocalNode, Peer};
use weft_core::annotations::VtepMac;
use weft_core::netlink::{Netlink, VxlanChange};
use weft_core::netns::Netns;
use weft_testing::TestNetns;

/// A namespace for `role` with its loopback up.
pub fn namespace(role: &str) -> Result<TestNetns> {
    let namespace = TestNetns::create(role);
    namespace.run(&["ip", "link", "set", "lo", "up"])?;
    Ok(namespace)
}

/// An underlay: a fabric namespace with a bridge, and node namespaces with
/// `eth0` on it at 172.31.0.(10+i)/24.
pub struct Fabric {
    /// The node namespaces, `eth0` at [`underlay_ip`] each.
    pub nodes: Vec<TestNetns>,
    // Dropped last: the veths' fabric ends vanish with the node namespaces.
    _fabric: TestNetns,
}

impl Fabric {
    /// `nodes` node namespaces named after `test`, on one bridge.
    pub fn new(test: &str, nodes: usize) -> Result<Self> {
        let fabric = namespace(&format!("{test}-f"))?;
        fabric.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
        fabric.run(&["ip", "link", "set", "br0", "up"])?;
        let mut namespaces = Vec::new();
        for i in 0..nodes {
            let node = namespace(&format!("{test}-{i}"))?;
            let port = format!("p{i}");
            fabric.run(&[
                "ip",
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                node.name(),
            ])?;
            fabric.run(&["ip", "link", "set", &port, "master", "br0", "up"])?;
            node.run(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", underlay_ip(i)),
                "dev",
                "eth0",
            ])?;
            node.run(&["ip", "link", "set", "eth0", "up"])?;
            namespaces.push(node);
        }
        Ok(Fabric {
            nodes: namespaces,
            _fabric: fabric,
        })
    }
}

/// Node `node`'s underlay (public) address.
pub fn underlay_ip(node: usize) -> IpAddr {
    format!("172.31.0.{}", 10 + node).parse().unwrap()
}

/// Node `node`'s IPv4 slice.
pub fn slice(node: usize) -> IpNet {
    format!("10.244.{node}.0/24").parse().unwrap()
}

/// Node `node`'s VTEP MAC.
pub fn mac(node: usize) -> VtepMac {
    VtepMac::new([0x0a, 0x58, 0, 0, 0, node as u8 + 1])
}

/// Node `node` as its peers see it.
pub fn peer(node: usize) -> Peer {
    Peer {
        node_name: format!("node-{node}"),
        pod_cidrs: vec![slice(node)],
        public_ip: underlay_ip(node),
        vtep_mac: Some(mac(node)),
        created: 0,
        malformed: None,
    }
}

/// Node `node` as its own agent plans for it.
pub fn local(node: usize) -> LocalNode {
    LocalNode {
        name: format!("node-{node}"),
        pod_cidrs: vec![slice(node)],
        underlay: IpNet::new(underlay_ip(node), 24).unwrap(),
    }
}

/// Node `node`'s VTEP settings with VNI `vni` (underlay index unset).
pub fn vtep(node: usize, vni: u32) -> Vtep {
    Vtep {
        vni,
        port: 8472,
        local: underlay_ip(node),
        underlay_index: 0,
        mac: mac(node),
        mtu: 1450,
        addresses: vec![IpNet::new(slice(node).network(), 32).unwrap()],
    }
}

/// Opens the node's data plane and sets up its VTEP on `eth0`.
pub async fn vtep_dataplane(
    namespace: &TestNetns,
    node: usize,
    vni: u32,
) -> Result<(Dataplane, VxlanChange)> {
    let netlink = Netlink::in_netns(&Netns::open(namespace.path())?)?;
    let eth0 = netlink
        .link_by_name("eth0")
        .await?
        .context("eth0 missing")?;
    let mut dataplane = Dataplane::new(netlink);
    let change = dataplane
        .ensure_vtep(&Vtep {
            underlay_index: eth0.index,
            ..vtep(node, vni)
        })
        .await?;
    Ok((dataplane, change))
}

/// A pod at `address` on `node`, attached as the plugin attaches pods: a
/// veth pair not enslaved to anything, the pod's /32 routed to the host
/// end, permanent neighbours both ways and the pod's gateway 169.254.1.1.
pub fn routed_pod(node: &TestNetns, role: &str, address: &str) -> Result<TestNetns> {
    let pod = namespace(role)?;
    let (host_mac, pod_mac) = ("0a:58:0a:00:00:01", "0a:58:0a:00:00:02");
    node.run(&[
        "ip",
        "link",
        "add",
        "vethpod",
        "address",
        host_mac,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "address",
        pod_mac,
        "netns",
        pod.name(),
    ])?;
    node.run(&["ip", "link", "set", "vethpod", "up"])?;
    node.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    node.run(&[
        "ip",
        "route",
        "add",
        &format!("{address}/32"),
        "dev",
        "vethpod",
    ])?;
    node.run(&[
        "ip",
        "neigh",
        "add",
        address,
        "lladdr",
        pod_mac,
        "dev",
        "vethpod",
        "nud",
        "permanent",
    ])?;
    pod.run(&["ip", "addr", "add", &format!("{address}/32"), "dev", "eth0"])?;
    pod.run(&["ip", "link", "set", "eth0", "up"])?;
    pod.run(&[
        "ip",
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    pod.run(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    pod.run(&[
        "ip",
        "neigh",
        "add",
        "169.254.1.1",
        "lladdr",
        host_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    Ok(pod)
}

/// Weft's return path on `node`: the routes of the return table (8787)
/// and the rules of protocol 87, one line each (IPv4).
pub fn return_path(node: &TestNetns) -> Result<Vec<String>> {
    let routes = node.run(&["ip", "route", "show", "table", "8787"])?;
    let rules = node.run(&["ip", "rule", "show"])?;
    Ok(routes
        .lines()
        .chain(rules.lines().filter(|rule| rule.contains("proto 87")))
        .map(str::to_owned)
        .collect())
}
