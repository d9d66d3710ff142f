//! End to end on the e2e harness: a real kube-apiserver, the real
//! `weft-controller`, a real `weft-agent` per node (ServiceAccount bound to
//! `agent/rbac.yaml`), and pods made with the real `weft` plugin from the
//! conflist the agent installed. Three nodes: two on the main underlay
//! segment, one behind the router.
//!
//! Needs root and the harness's control-plane binaries (built on first use).
//! Waits poll with generous deadlines; the only deadline that is part of
//! an assertion is the "routes of a deleted node go within 5 s".

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, PostParams};
use kube::Api;
use nix::libc;
use weft_core::netns::Netns;
use weft_e2e::Pod;
use weft_testing::{require_root, run, wait_for};

mod testbed;

use testbed::{
    ping_all, vxlan_ifindex, vxlan_overlay_with_pods, weft_routes, Overlay, OverlaySpec,
};

/// The bound for a deleted node's routes to disappear everywhere.
const NODE_DELETION_BOUND: Duration = Duration::from_secs(5);
const VXLAN_PORT: u16 = 8472;

/// A raw packet socket opened inside a namespace, on one interface.
struct Capture {
    socket: OwnedFd,
}

// A raw packet socket has no safe wrapper in nix.
#[allow(unsafe_code)]
impl Capture {
    fn open(netns_path: &Path, interface: &str) -> Result<Self> {
        let netns = Netns::open(netns_path)?;
        let interface = interface.to_string();
        netns.run_in(move || -> Result<Self> {
            let index = nix::net::if_::if_nametoindex(interface.as_str())
                .with_context(|| format!("no {interface}"))?;
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the descriptor is owned right away.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(protocol),
                )
            };
            ensure!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `raw` is a fresh descriptor nobody else owns.
            let socket = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_protocol = protocol;
            address.sll_ifindex = index as i32;
            // SAFETY: the address is a valid sockaddr_ll of the given size.
            let bound = unsafe {
                libc::bind(
                    socket.as_raw_fd(),
                    (&address as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            ensure!(
                bound == 0,
                "binding to {interface}: {}",
                std::io::Error::last_os_error()
            );
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: SO_RCVTIMEO takes a timeval of this size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            Ok(Capture { socket })
        })?
    }

    /// Reads frames until `wanted` accepts one or `deadline` passes.
    fn find<T>(&self, deadline: Duration, mut wanted: impl FnMut(&[u8]) -> Option<T>) -> Option<T> {
        let start = Instant::now();
        let mut buffer = vec![0u8; 65536];
        while start.elapsed() < deadline {
            // SAFETY: the buffer is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if n > 0 {
                if let Some(found) = wanted(&buffer[..n as usize]) {
                    return Some(found);
                }
            }
        }
        None
    }
}

fn ipv4_pair(packet: &SlicedPacket<'_>) -> Option<(Ipv4Addr, Ipv4Addr)> {
    match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            Some((ip.header().source_addr(), ip.header().destination_addr()))
        }
        _ => None,
    }
}

/// The outer and inner IPv4 addresses of a VXLAN frame.
fn vxlan_frame(frame: &[u8]) -> Option<((Ipv4Addr, Ipv4Addr), (Ipv4Addr, Ipv4Addr))> {
    let outer = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(TransportSlice::Udp(udp)) = &outer.transport else {
        return None;
    };
    let payload = udp.payload();
    // The VXLAN header is 8 bytes; its I flag says a VNI is present.
    if udp.destination_port() != VXLAN_PORT || payload.len() < 8 || payload[0] & 0x08 == 0 {
        return None;
    }
    let inner = SlicedPacket::from_ethernet(&payload[8..]).ok()?;
    Some((ipv4_pair(&outer)?, ipv4_pair(&inner)?))
}

/// The addresses of a plain (not tunnelled) ICMP echo request.
fn icmp_echo_request(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let packet = SlicedPacket::from_ethernet(frame).ok()?;
    match &packet.transport {
        Some(TransportSlice::Icmpv4(icmp)) if icmp.type_u8() == 8 => ipv4_pair(&packet),
        _ => None,
    }
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => panic!("the e2e cluster is IPv4"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_overlay_end_to_end() -> Result<()> {
    require_root!("the e2e harness");
    let (mut overlay, pods) = vxlan_overlay_with_pods().await?;
    let (node0, node1) = (overlay.node(0), overlay.node(1));
    let (pod0, pod1) = (v4(pods[0].ip().unwrap()), v4(pods[1].ip().unwrap()));

    // On the underlay: VXLAN from node 0 to node 1 carrying the pod addresses.
    let capture = Capture::open(&node1.netns_path(), &node1.underlay_link)?;
    let pinger = std::thread::spawn({
        let mut command = pods[0].command("ping");
        command.args(["-c", "5", "-i", "0.2", &pod1.to_string()]);
        move || command.output()
    });
    let tunnelled = capture.find(Duration::from_secs(10), |frame| {
        vxlan_frame(frame).filter(|(_, inner)| *inner == (pod0, pod1))
    });
    pinger.join().expect("ping thread")?;
    let (outer, _) =
        tunnelled.context("no VXLAN frame with the pods' addresses on node 1's underlay")?;
    assert_eq!(outer, (node0.underlay_ip(), node1.underlay_ip()));

    // The receiving pod sees the sender's own address: no NAT between pods.
    let capture = Capture::open(&pods[1].netns_path(), weft_e2e::POD_INTERFACE)?;
    assert!(pods[0].ping(IpAddr::V4(pod1)));
    let seen = capture.find(Duration::from_secs(5), icmp_echo_request);
    assert_eq!(
        seen,
        Some((pod0, pod1)),
        "pod 1 saw the echo from another address"
    );

    // Outside the cluster: masqueraded to the node's address.
    let outside = overlay.cluster.outside().clone();
    let capture = Capture::open(
        &PathBuf::from(format!("/var/run/netns/{}", outside.netns)),
        "eth0",
    )?;
    assert!(
        pods[0].ping(IpAddr::V4(outside.ip())),
        "pod 0 cannot reach the outside"
    );
    let seen = capture.find(Duration::from_secs(5), |frame| {
        icmp_echo_request(frame).filter(|(_, dst)| *dst == outside.ip())
    });
    assert_eq!(
        seen.map(|(src, _)| src),
        Some(node0.underlay_ip()),
        "not masqueraded to node 0's address"
    );

    // Agents restart under continuous ping: nothing lost, nothing recreated.
    let index_before = vxlan_ifindex(&node0)?;
    let mut ping = pods[0].command("ping");
    ping.args(["-c", "150", "-i", "0.05", "-W", "1", &pod1.to_string()]);
    let pinger = std::thread::spawn(move || ping.output());
    std::thread::sleep(Duration::from_secs(1));
    overlay.restart_agent(&node0)?;
    overlay.restart_agent(&node1)?;
    let result = pinger.join().expect("ping thread")?;
    let summary = String::from_utf8_lossy(&result.stdout).into_owned();
    assert!(
        summary.contains("150 packets transmitted, 150 received"),
        "packets lost during restart:\n{summary}"
    );
    overlay.wait_programmed(2).await?;
    assert_eq!(
        vxlan_ifindex(&node0)?,
        index_before,
        "the restart recreated weft.1"
    );
    for agent in overlay.agents.values() {
        assert!(!agent.log().contains("Recreated"), "{}", agent.log());
    }

    // A deleted Node's routes leave every other node within the bound.
    let slices = overlay.slices().await?;
    let gone = slices.get("node-2").context("node-2 has no slice")?.clone();
    let nodes: Api<Node> = Api::all(overlay.admin.clone());
    nodes.delete("node-2", &DeleteParams::default()).await?;
    let deleted_at = Instant::now();
    for node in [&node0, &node1] {
        while weft_routes(node)?.contains_key(&gone) {
            assert!(
                deleted_at.elapsed() < NODE_DELETION_BOUND,
                "{} still routes {gone} {NODE_DELETION_BOUND:?} after the Node was deleted\n{}",
                node.name,
                overlay.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        pods[0].ping(IpAddr::V4(pod1)),
        "pod-to-pod broke after the deletion"
    );
    overlay.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_gw_routes_peers_on_the_segment() -> Result<()> {
    require_root!("the e2e harness");
    let mut overlay = Overlay::start(OverlaySpec {
        backend: "host-gw",
        ..OverlaySpec::default()
    })
    .await?;
    overlay.start_agents()?;
    // node 0 routes to node 1 only: node 2 is behind the router.
    overlay.wait_programmed(1).await?;
    let slices = overlay.slices().await?;
    let routes = weft_routes(&overlay.node(0))?;
    let node1 = overlay.node(1);
    assert_eq!(
        routes.get(&slices["node-1"]),
        Some(&format!("via {} dev eth0", node1.underlay_ip()))
    );
    assert!(!routes.contains_key(&slices["node-2"]));
    let mut link = overlay.node(0).command("ip");
    link.args(["link", "show", "weft.1"]);
    assert!(run(&mut link).is_err(), "host-gw created weft.1");

    let pods = overlay.add_pods()?;
    ping_all(&pods[..2], &overlay)?;
    overlay.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_routing_uses_host_gw_on_the_segment_and_vxlan_beyond() -> Result<()> {
    require_root!("the e2e harness");
    let mut overlay = Overlay::start(OverlaySpec {
        backend: "direct",
        ..OverlaySpec::default()
    })
    .await?;
    overlay.start_agents()?;
    overlay.wait_programmed(2).await?;
    let slices = overlay.slices().await?;
    let routes = weft_routes(&overlay.node(0))?;
    let node1 = overlay.node(1);
    assert_eq!(
        routes.get(&slices["node-1"]),
        Some(&format!("via {} dev eth0", node1.underlay_ip()))
    );
    let node2_vtep = slices["node-2"]
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        routes.get(&slices["node-2"]),
        Some(&format!("via {node2_vtep} dev weft.1"))
    );

    let pods = overlay.add_pods()?;
    ping_all(&pods, &overlay)?;

    // Same segment: the pods' packets cross the underlay unencapsulated.
    let (pod0, pod1) = (v4(pods[0].ip().unwrap()), v4(pods[1].ip().unwrap()));
    let capture = Capture::open(&node1.netns_path(), &node1.underlay_link)?;
    assert!(pods[0].ping(IpAddr::V4(pod1)));
    let seen = capture.find(Duration::from_secs(5), icmp_echo_request);
    assert_eq!(
        seen,
        Some((pod0, pod1)),
        "pod traffic to node 1 was not routed directly"
    );
    overlay.cluster.stop().await
}

/// Serves one answer per TCP connection from inside `pod` on `port`: the
/// address the pod saw the connection come from.
fn serve_peer_address(pod: &Pod, port: u16) -> Result<()> {
    let listener = Netns::open(pod.netns_path())?
        .run_here(|| std::net::TcpListener::bind(("0.0.0.0", port)))??;
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            if let Ok(peer) = stream.peer_addr() {
                let _ = std::io::Write::write_all(&mut stream, peer.ip().to_string().as_bytes());
            }
        }
    });
    Ok(())
}

/// Connects from the namespace at `netns` and returns what the server said.
fn fetch_from(netns: &Path, target: std::net::SocketAddr) -> Result<String> {
    let mut stream = Netns::open(netns)?
        .run_here(|| std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)))?
        .with_context(|| format!("connecting to {target} from {}", netns.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer)?;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_is_reached_from_another_node_its_pods_and_outside() -> Result<()> {
    require_root!("the e2e harness");
    let mut overlay = Overlay::start(OverlaySpec::default()).await?;
    overlay.start_agents()?;
    overlay.wait_programmed(2).await?;
    let (node0, node1) = (overlay.node(0), overlay.node(1));
    let client = overlay.add_pod(&node0)?;
    let ports = serde_json::json!({
        "runtimeConfig": { "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }] }
    });
    let server = overlay.add_pod_with(
        &node1,
        "hostport",
        ports.as_object().cloned().unwrap_or_default(),
    )?;
    serve_peer_address(&server, 80)?;
    let target = std::net::SocketAddr::new(IpAddr::V4(node1.underlay_ip()), 8080);
    let outside = overlay.cluster.outside().clone();

    // A pod on node 0 leaves with node 0's address (the pod network's
    // egress masquerade: node addresses are outside the cluster CIDR).
    assert_eq!(
        fetch_from(&client.netns_path(), target)?,
        node0.underlay_ip().to_string()
    );
    assert_eq!(
        fetch_from(&node0.netns_path(), target)?,
        node0.underlay_ip().to_string()
    );
    // From outside the cluster the pod sees the client itself.
    let outside_path = PathBuf::from(format!("/var/run/netns/{}", outside.netns));
    assert_eq!(fetch_from(&outside_path, target)?, outside.ip().to_string());
    // Node 1 itself and a pod beside the server reach it too.
    assert!(!fetch_from(&node1.netns_path(), target)?.is_empty());
    let neighbour = overlay.add_pod_with(&node1, "neighbour", serde_json::Map::new())?;
    assert!(!fetch_from(&neighbour.netns_path(), target)?.is_empty());

    // DEL with the pod's portMappings takes the mapping away.
    server.delete()?;
    assert!(
        fetch_from(&node0.netns_path(), target).is_err(),
        "the hostPort outlived its pod"
    );
    Ok(())
}

/// A NetworkPolicy created through the API is enforced by the agent of the
/// node its pod runs on, for traffic from pods on the other nodes (one
/// behind the router), and lifted when it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_from_the_api_is_enforced_across_nodes() -> Result<()> {
    require_root!("the e2e harness");
    let (overlay, pods) = vxlan_overlay_with_pods().await?;
    testbed::ensure_default_service_account(&overlay.admin, "default").await?;
    for (index, (pod, app)) in pods.iter().zip(["client", "db", "other"]).enumerate() {
        let node = overlay.node(index);
        let name = format!("{app}-{}", node.name);
        testbed::publish_pod(
            &overlay.admin,
            pod,
            &name,
            &node,
            &serde_json::json!({"app": app}),
        )
        .await?;
    }
    let db = &pods[1];
    serve_peer_address(db, 8080)?;
    serve_peer_address(db, 9090)?;
    let db_ip = db.ip().context("db without address")?;
    let to = |port| std::net::SocketAddr::new(db_ip, port);
    let reaches = |from: &Pod, port| fetch_from(&from.netns_path(), to(port)).is_ok();
    ensure!(
        reaches(&pods[0], 8080) && reaches(&pods[2], 8080),
        "db before any policy"
    );

    let policies: Api<NetworkPolicy> = Api::namespaced(overlay.admin.clone(), "default");
    let policy: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "db-from-client"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                "ports": [{"port": "http"}],
            }],
        },
    }))?;
    policies.create(&PostParams::default(), &policy).await?;
    wait_for(testbed::PATIENCE, "the other pod shut out of db", || {
        Ok((!reaches(&pods[2], 8080)).then_some(()))
    })
    .with_context(|| overlay.logs())?;
    ensure!(reaches(&pods[0], 8080), "the client to db on http");
    ensure!(!reaches(&pods[0], 9090), "the client to db on another port");
    let metrics = testbed::agent_get(&overlay.node(1), "/metrics")?;
    ensure!(
        metrics.contains("weft_agent_policy_isolated_pods{direction=\"ingress\"} 1"),
        "node 1's metrics:\n{metrics}"
    );

    policies
        .delete("db-from-client", &DeleteParams::default())
        .await?;
    wait_for(testbed::PATIENCE, "db open again", || {
        Ok(reaches(&pods[2], 9090).then_some(()))
    })
    .with_context(|| overlay.logs())?;
    overlay.cluster.stop().await
}
