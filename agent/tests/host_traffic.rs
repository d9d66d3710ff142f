//! Network-namespace tests of the node's own traffic into the tunnel
//! (docs/host-traffic.md), without an API server: two vxlan "nodes" built
//! from the agent's own pieces (the VTEP, a reconcile of the peer with its
//! return route and rule, `src_valid_mark`, the `inet weft` table with its
//! host-traffic chains, the guard) and a routed pod on each. TCP
//! connections show which source each server saw: node A to pod B, node A
//! through a kube-proxy-like NodePort to pod B, node A to B's VTEP
//! address, and pod B to node A, each with strict and loose reverse-path
//! filtering on every interface of both nodes.
//!
//! Needs root (see `weft_testing::root_available`). Every namespace is
//! removed on success and on failure.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ipnet::IpNet;
use weft_agent::config::Backend;
use weft_agent::dataplane::Dataplane;
use weft_agent::guard::{GuardState, GuardTable};
use weft_agent::masquerade::{HostTraffic, MasqueradeTable};
use weft_agent::overlay::{desired_state, DesiredState};
use weft_core::ip::IpFamily;
use weft_core::netns::Netns;
use weft_testing::{require_root, wait_for, TestNetns};

#[path = "testbed/fabric.rs"]
mod fabric;

use fabric::{local, peer, return_path, routed_pod, underlay_ip, vtep_dataplane, Fabric};

/// How long a connection or an accept may take before it counts as failed.
const PATIENCE: Duration = Duration::from_secs(5);
/// The VXLAN port.
const VXLAN_PORT: u16 = 8472;
/// The port every test server listens on.
const SERVER_PORT: u16 = 8080;
/// Node A's kube-proxy-like NodePort.
const NODE_PORT: u16 = 30080;

/// Node `i` of a two-node fabric with `i`'s view of the other as its
/// desired state.
fn desired(i: usize) -> DesiredState {
    desired_state(Backend::Vxlan, &local(i), &[peer(1 - i)])
}

/// Sets node `i` up as its agent would on vxlan: the VTEP with
/// `src_valid_mark`, the peer's entries with the return route and rule,
/// the masquerade table with `snat` for the node's own traffic, and the
/// guard taking the peer's VXLAN.
async fn agent_node(node: &TestNetns, i: usize, snat: Option<IpAddr>) -> Result<Dataplane> {
    let (plane, _) = vtep_dataplane(node, i, 1).await?;
    let report = plane.reconcile(&desired(i)).await?;
    ensure!(report.failed.is_empty(), "node {i}: {:?}", report.failed);
    let host = HostTraffic {
        family: IpFamily::V4,
        snat,
    };
    let cluster: IpNet = "10.244.0.0/16".parse()?;
    Netns::open(node.path())?.run_in(|| -> Result<()> {
        MasqueradeTable::new(&[cluster], &[], Some(&host)).ensure()?;
        GuardTable::default().ensure(&GuardState::of(Some(VXLAN_PORT), [&peer(1 - i)]))?;
        Ok(())
    })??;
    Ok(plane)
}

/// Sets `rp_filter` to `mode` on every interface of `node`, `all` and
/// `default` included (the kernel applies the larger of `all` and the
/// interface's).
fn set_rp_filter(node: &TestNetns, mode: u8) -> Result<()> {
    Netns::open(node.path())?.run_in(|| -> Result<()> {
        for entry in std::fs::read_dir("/proc/sys/net/ipv4/conf")? {
            std::fs::write(entry?.path().join("rp_filter"), mode.to_string())?;
        }
        Ok(())
    })?
}

/// The source address a server listening at `server` in `at` sees on a
/// connection that `from` opens to `dial` (the server's address, or one
/// that is translated to it on the way).
fn seen_source(from: &Netns, dial: SocketAddr, at: &Netns, server: SocketAddr) -> Result<IpAddr> {
    let listener = at.run_in(|| TcpListener::bind(server))??;
    listener.set_nonblocking(true)?;
    let _client = from
        .run_in(|| TcpStream::connect_timeout(&dial, PATIENCE))?
        .with_context(|| format!("connecting to {dial} (server {server})"))?;
    // Connected: the handshake is done, the server's accept follows.
    wait_for(
        PATIENCE,
        &format!("{server} to accept"),
        || match listener.accept() {
            Ok((_, peer)) => Ok(Some(peer.ip())),
            Err(error) if error.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(error.into()),
        },
    )
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A kube-proxy model on node A (as kube-proxy's nftables mode writes
/// it): its NodePort DNATed to pod B and marked for masquerade, and the
/// masquerade at `srcnat` on that mark.
fn kube_proxy_on_a(node: &TestNetns) -> Result<()> {
    let ruleset = format!(
        "table ip kube-proxy-model {{
            chain output {{
                type nat hook output priority -100; policy accept;
                ip daddr {a} tcp dport {NODE_PORT} meta mark set meta mark | 0x4000 dnat to 10.244.1.5:{SERVER_PORT}
            }}
            chain postrouting {{
                type nat hook postrouting priority srcnat; policy accept;
                meta mark & 0x4000 == 0x4000 masquerade fully-random
            }}
        }}",
        a = underlay_ip(0),
    );
    node.run(&["nft", &ruleset])?;
    Ok(())
}

/// Node A's own connections into the tunnel carry A's node IP, through
/// kube-proxy's masquerade too, and come back through the tunnel; pod B's
/// connection to node A still leaves as B's node IP; all with strict and
/// loose reverse-path filtering.
#[tokio::test]
async fn the_node_s_own_traffic_into_the_tunnel_carries_its_node_ip() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("ht", 2)?;
    let (node_a, node_b) = (&fabric.nodes[0], &fabric.nodes[1]);
    agent_node(node_a, 0, Some(underlay_ip(0))).await?;
    agent_node(node_b, 1, Some(underlay_ip(1))).await?;
    let _pod_a = routed_pod(node_a, "ht-pa", "10.244.0.5")?;
    let pod_b = routed_pod(node_b, "ht-pb", "10.244.1.5")?;
    kube_proxy_on_a(node_a)?;

    // What the reconcile left: B's node IP through the tunnel in the
    // return table, looked up for A's marked replies from A's slice.
    let table = node_a.run(&["ip", "route", "show", "table", "8787"])?;
    ensure!(
        table.contains("172.31.0.11 via 10.244.1.0 dev weft.1 proto 87 onlink"),
        "{table}"
    );
    let rules = node_a.run(&["ip", "rule", "show"])?;
    ensure!(
        rules.contains("87:\tfrom 10.244.0.0/24 fwmark 0x10000000/0x10000000 lookup 8787 proto 87"),
        "{rules}"
    );
    let (a, b, pod) = (
        Netns::open(node_a.path())?,
        Netns::open(node_b.path())?,
        Netns::open(pod_b.path())?,
    );
    let node_ip_a = underlay_ip(0);
    for mode in [1, 2] {
        set_rp_filter(node_a, mode)?;
        set_rp_filter(node_b, mode)?;
        let pod_server = at("10.244.1.5", SERVER_PORT);
        let seen = seen_source(&a, pod_server, &pod, pod_server)?;
        ensure!(
            seen == node_ip_a,
            "rp_filter {mode}: host to pod saw {seen}"
        );
        let node_port = SocketAddr::new(node_ip_a, NODE_PORT);
        let seen = seen_source(&a, node_port, &pod, pod_server)?;
        ensure!(seen == node_ip_a, "rp_filter {mode}: NodePort saw {seen}");
        // B's own reply, routed on output, returns through the tunnel too.
        let vtep_server = at("10.244.1.0", SERVER_PORT);
        let seen = seen_source(&a, vtep_server, &b, vtep_server)?;
        ensure!(
            seen == node_ip_a,
            "rp_filter {mode}: host to VTEP saw {seen}"
        );
        let node_server = SocketAddr::new(node_ip_a, SERVER_PORT);
        let seen = seen_source(&pod, node_server, &a, node_server)?;
        ensure!(
            seen == underlay_ip(1),
            "rp_filter {mode}: pod to node saw {seen}"
        );
    }
    Ok(())
}

/// A node whose published address is not its underlay address (a
/// public-IP overwrite) keeps today's source, the tunnel device's address,
/// while its peer's return path stays in place.
#[tokio::test]
async fn without_snat_the_node_s_traffic_keeps_the_tunnel_address() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("hn", 2)?;
    let (node_a, node_b) = (&fabric.nodes[0], &fabric.nodes[1]);
    agent_node(node_a, 0, None).await?;
    agent_node(node_b, 1, Some(underlay_ip(1))).await?;
    let pod_b = routed_pod(node_b, "hn-pb", "10.244.1.5")?;
    let pod_server = at("10.244.1.5", SERVER_PORT);
    let seen = seen_source(
        &Netns::open(node_a.path())?,
        pod_server,
        &Netns::open(pod_b.path())?,
        pod_server,
    )?;
    ensure!(seen == "10.244.0.0".parse::<IpAddr>()?, "saw {seen}");
    Ok(())
}

/// An empty reconcile, as uninstall makes, leaves no rule and no return
/// route.
#[tokio::test]
async fn an_empty_reconcile_removes_the_rule_and_the_return_routes() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("hu", 2)?;
    let node = &fabric.nodes[0];
    let plane = agent_node(node, 0, Some(underlay_ip(0))).await?;
    // The peer's return route and the own slice's rule.
    ensure!(return_path(node)?.len() == 2, "{:?}", return_path(node)?);
    let report = plane.reconcile(&DesiredState::default()).await?;
    ensure!(report.rules.len() == 1, "{:?}", report.rules);
    let left = return_path(node)?;
    ensure!(left.is_empty(), "return path left: {left:?}");
    // Again: nothing to do.
    let again = plane.reconcile(&DesiredState::default()).await?;
    ensure!(again.rules.is_empty() && again.applied.is_empty());
    Ok(())
}
