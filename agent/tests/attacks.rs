//! A hostile pod against NetworkPolicy, on the harness (a real apiserver,
//! the controller, an agent per node, pods from the real plugin). Pods have
//! the default container capabilities, so NET_RAW: they can write any frame.
//! Two nodes on one segment, once over vxlan and once over host-gw; on
//! node 0 an isolated `victim` (ingress only from app=allowed), `allowed`,
//! an `attacker`, and `jailed` (no egress at all); on node 1
//! `far-attacker`, `far-allowed` and `far-open` (no policy).
//!
//! Every attack forges its frames with `weft_testing::forge`, then sends a
//! marker on a path that is allowed and waits for it to arrive: whatever was
//! forged before it has had its chance, no sleep needed. What arrives is
//! counted twice, by sockets in the target (UDP and TCP, both families) and
//! by a packet capture on its interface; an attack succeeds if either sees
//! one of its packets. Where the guard table (`inet weft-guard`) is the
//! layer that stops an attack, its drop counter must rise too, as the agent
//! exports it. Every attack runs and the test fails at the end naming each
//! one that got through; allowed traffic must keep working throughout.
//! Two attacks go through the API and the node rather than the wire: Pod
//! objects whose status claims the attacker's address, and the policy
//! table deleted by hand.
//!
//! The cluster is IPv4 only, so IPv6 is exercised where every pod has it:
//! link-local addresses; forged global IPv6 sources and IPv6 inside VXLAN
//! are attacked in `guard.rs`, on dual-stack namespace nodes. Needs root.

use std::collections::BTreeMap;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use etherparse::{SlicedPacket, TransportSlice};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Pod as PodObject;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, PostParams};
use kube::Api;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn, SockaddrIn6,
};
use serde_json::{json, Value};
use weft_core::netns::Netns;
use weft_e2e::{ClusterNode, Pod};
use weft_testing::forge::{
    icmpv6_echo, parse_mac, tcp, udp, vxlan, Ethernet, Mac, PacketSocket, ACK, BROADCAST, SYN,
};
use weft_testing::{require_root, run, wait_for};

mod testbed;

use testbed::{
    agent_get, ensure_default_service_account, pod_object, publish_pod, report_running, Overlay,
    OverlaySpec,
};

/// Where every watched namespace listens for UDP and TCP, both families.
const UDP_PORT: u16 = 7000;
const TCP_PORT: u16 = 7001;
/// How long a connection attempt that should fail is given.
const CONNECT_WAIT: Duration = Duration::from_secs(2);
/// Frames of each forged kind an attack sends.
const BURST: usize = 10;
/// A MAC no interface of the cluster has, for inner frames' sources.
const STRANGER_MAC: Mac = [0x0a, 0x58, 0xde, 0xad, 0xbe, 0xef];

/// A network namespace the test sends from or watches: a pod, a node or
/// the outside; its one interface towards the cluster is `eth0`.
#[derive(Clone, Debug)]
struct Host {
    label: String,
    netns: String,
}

impl Host {
    fn of_pod(pod: &Pod) -> Self {
        Host {
            label: pod.name.clone(),
            netns: pod.netns.clone(),
        }
    }

    fn of_node(node: &ClusterNode) -> Self {
        Host {
            label: node.name.clone(),
            netns: node.netns.clone(),
        }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.netns))
    }

    /// `ip -j <args>` inside the namespace, parsed.
    fn ip(&self, args: &[&str]) -> Result<Vec<Value>> {
        let text = run(std::process::Command::new("ip")
            .args(["-n", &self.netns, "-j"])
            .args(args))?;
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_str(&text).with_context(|| format!("parsing ip {args:?}: {text}"))
    }

    /// The MAC address of `eth0`.
    fn mac(&self) -> Result<Mac> {
        let links = self.ip(&["link", "show", "eth0"])?;
        let address = links
            .first()
            .and_then(|link| link["address"].as_str())
            .with_context(|| format!("{} has no eth0", self.label))?;
        parse_mac(address)
    }

    /// The MAC this namespace's kernel sends packets for `destination` to:
    /// its route's gateway's or the destination's own, resolved the way
    /// the kernel does it (a ping makes it ask, whether the ping passes or
    /// not).
    fn next_hop_mac(&self, destination: Ipv4Addr) -> Result<Mac> {
        let target = destination.to_string();
        let routes = self.ip(&["route", "get", &target])?;
        let route = routes
            .first()
            .with_context(|| format!("{} has no route to {target}", self.label))?;
        let hop = route["gateway"].as_str().unwrap_or(&target).to_owned();
        let device = route["dev"].as_str().unwrap_or("eth0").to_owned();
        wait_for(
            testbed::PATIENCE,
            &format!("{} to resolve {hop}", self.label),
            || {
                let neighbours = self.ip(&["neigh", "show", &hop, "dev", &device])?;
                if let Some(mac) = neighbours.first().and_then(|n| n["lladdr"].as_str()) {
                    return Ok(Some(parse_mac(mac)?));
                }
                let _ = std::process::Command::new("ip")
                    .args(["netns", "exec", &self.netns, "ping", "-c1", "-W1", &target])
                    .output();
                Ok(None)
            },
        )
    }

    /// The Ethernet header of an ordinary frame from here to
    /// `destination`.
    fn towards(&self, destination: Ipv4Addr) -> Result<Ethernet> {
        Ok(Ethernet {
            destination: self.next_hop_mac(destination)?,
            source: self.mac()?,
            vlan: None,
        })
    }

    /// A raw socket on `eth0` to forge frames with.
    fn forger(&self) -> Result<PacketSocket> {
        PacketSocket::open(self.path(), "eth0")
    }

    /// The index of `eth0`, the scope of a link-local address.
    fn eth0_index(&self) -> Result<u32> {
        let links = self.ip(&["link", "show", "eth0"])?;
        links
            .first()
            .and_then(|link| link["ifindex"].as_u64())
            .and_then(|index| u32::try_from(index).ok())
            .with_context(|| format!("{} has no eth0", self.label))
    }

    /// Its IPv6 link-local address on `eth0` once duplicate address
    /// detection is done; `None` when IPv6 is off in the namespace.
    fn link_local(&self) -> Result<Option<Ipv6Addr>> {
        let off = run(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &self.netns,
            "cat",
            "/proc/sys/net/ipv6/conf/eth0/disable_ipv6",
        ]))?;
        if off.trim() == "1" {
            return Ok(None);
        }
        wait_for(
            testbed::PATIENCE,
            &format!("{}'s link-local address", self.label),
            || {
                let links = self.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "link"])?;
                let address = links
                    .iter()
                    .flat_map(|link| link["addr_info"].as_array().into_iter().flatten())
                    .find(|info| info["tentative"].is_null())
                    .and_then(|info| info["local"].as_str()?.parse().ok());
                Ok(address)
            },
        )
        .map(Some)
    }

    /// Sends one UDP datagram from here to `to`.
    fn send_udp(&self, to: SocketAddr, payload: &[u8]) -> Result<()> {
        let from: SocketAddr = match to {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        Netns::open(self.path())?.run_in(|| -> Result<()> {
            UdpSocket::bind(from)?.send_to(payload, to)?;
            Ok(())
        })?
    }

    /// Whether a TCP connection from here to `to` is made within
    /// [`CONNECT_WAIT`].
    fn connects(&self, to: SocketAddr) -> Result<bool> {
        Ok(Netns::open(self.path())?
            .run_in(|| TcpStream::connect_timeout(&to, CONNECT_WAIT).is_ok())?)
    }
}

/// A node's VXLAN device, as a forger must address it.
struct Vtep {
    mac: Mac,
    vni: u32,
    port: u16,
}

fn vtep(node: &Host) -> Result<Vtep> {
    let links = node.ip(&["-d", "link", "show", "weft.1"])?;
    let link = links.first().context("no weft.1")?;
    let data = &link["linkinfo"]["info_data"];
    Ok(Vtep {
        mac: parse_mac(link["address"].as_str().context("weft.1 has no MAC")?)?,
        vni: data["id"].as_u64().context("weft.1 has no VNI")? as u32,
        port: data["port"].as_u64().context("weft.1 has no port")? as u16,
    })
}

/// What arrived in a watched namespace.
#[derive(Default)]
struct Seen {
    /// UDP payloads, with their sources.
    datagrams: Vec<(SocketAddr, Vec<u8>)>,
    /// Sources of accepted TCP connections.
    accepted: Vec<SocketAddr>,
    /// Frames `eth0` received.
    incoming: Vec<Vec<u8>>,
    /// Frames `eth0` sent.
    outgoing: Vec<Vec<u8>>,
}

/// UDP and TCP sockets on [`UDP_PORT`] and [`TCP_PORT`] (one of each per
/// family, so IPv4 broadcast and multicast reach the IPv4 one) and a
/// capture on `eth0` in one namespace, read by a thread of its own until
/// the watch is dropped.
struct Watch {
    host: Host,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

/// A bound socket of `kind` on `port` of every address of `family`; an
/// IPv6 one takes IPv6 only.
fn bound(family: AddressFamily, kind: SockType, port: u16) -> Result<OwnedFd> {
    let fd = socket(family, kind, SockFlag::SOCK_CLOEXEC, None)?;
    if family == AddressFamily::Inet6 {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
        let any = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
        bind(fd.as_raw_fd(), &SockaddrIn6::from(any))?;
    } else {
        bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        )?;
    }
    if kind == SockType::Stream {
        listen(&fd, Backlog::new(64)?)?;
    }
    Ok(fd)
}

impl Watch {
    fn open(host: &Host) -> Result<Self> {
        let (udp4, udp6, tcp4, tcp6) = Netns::open(host.path())?.run_in(|| -> Result<_> {
            let udp = |family| bound(family, SockType::Datagram, UDP_PORT).map(UdpSocket::from);
            let tcp = |family| bound(family, SockType::Stream, TCP_PORT).map(TcpListener::from);
            Ok((
                udp(AddressFamily::Inet)?,
                udp(AddressFamily::Inet6)?,
                tcp(AddressFamily::Inet)?,
                tcp(AddressFamily::Inet6)?,
            ))
        })??;
        let capture = host.forger()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut fds = [
                        PollFd::new(udp4.as_fd(), PollFlags::POLLIN),
                        PollFd::new(udp6.as_fd(), PollFlags::POLLIN),
                        PollFd::new(tcp4.as_fd(), PollFlags::POLLIN),
                        PollFd::new(tcp6.as_fd(), PollFlags::POLLIN),
                        PollFd::new(capture.as_fd(), PollFlags::POLLIN),
                    ];
                    if poll(&mut fds, PollTimeout::from(200u16)).unwrap_or(0) <= 0 {
                        continue;
                    }
                    let ready: Vec<bool> = fds.iter().map(|fd| fd.any().unwrap_or(false)).collect();
                    let mut seen = seen.lock().expect("the watch's log");
                    let mut buffer = [0u8; 2048];
                    for (socket, _) in [&udp4, &udp6].into_iter().zip(&ready).filter(|(_, r)| **r) {
                        if let Ok((length, from)) = socket.recv_from(&mut buffer) {
                            seen.datagrams.push((from, buffer[..length].to_vec()));
                        }
                    }
                    for (listener, _) in [&tcp4, &tcp6]
                        .into_iter()
                        .zip(&ready[2..])
                        .filter(|(_, r)| **r)
                    {
                        if let Ok((_, from)) = listener.accept() {
                            seen.accepted.push(from);
                        }
                    }
                    if ready[4] {
                        if let Ok(Some(received)) = capture.receive(Duration::ZERO) {
                            if received.outgoing {
                                seen.outgoing.push(received.frame);
                            } else {
                                seen.incoming.push(received.frame);
                            }
                        }
                    }
                }
            })
        };
        Ok(Watch {
            host: host.clone(),
            seen,
            stop,
            reader: Some(reader),
        })
    }

    /// Sends marker datagrams for `case` from `from` to `to` (an address
    /// of this namespace) until one has arrived at the UDP socket and in
    /// the capture: whatever was sent before it has had its chance.
    fn settle(&self, from: &Host, to: IpAddr, case: &str) -> Result<()> {
        let marker = format!("marker:{case}");
        wait_for(
            testbed::PATIENCE,
            &format!(
                "{case}: a marker from {} to {}",
                from.label, self.host.label
            ),
            || {
                from.send_udp(SocketAddr::new(to, UDP_PORT), marker.as_bytes())?;
                let seen = self.seen.lock().expect("the watch's log");
                let received = seen.datagrams.iter().any(|(_, d)| d == marker.as_bytes());
                let captured = seen.incoming.iter().any(|f| carries(f, marker.as_bytes()));
                Ok((received && captured).then_some(()))
            },
        )
    }

    /// The sources of the datagrams forged for `case`, and how many frames
    /// forged for it were captured coming in.
    fn tagged(&self, case: &str) -> (Vec<SocketAddr>, usize) {
        let seen = self.seen.lock().expect("the watch's log");
        let tag = forged(case);
        let tag = tag.as_bytes();
        let sources = seen
            .datagrams
            .iter()
            .filter(|(_, d)| carries(d, tag))
            .map(|(from, _)| *from)
            .collect();
        (
            sources,
            seen.incoming.iter().filter(|f| carries(f, tag)).count(),
        )
    }

    /// How many frames `eth0` received (`incoming`) or sent that `wanted`
    /// picks out.
    fn frames(&self, incoming: bool, wanted: impl Fn(&[u8]) -> bool) -> usize {
        let seen = self.seen.lock().expect("the watch's log");
        let frames = if incoming {
            &seen.incoming
        } else {
            &seen.outgoing
        };
        frames.iter().filter(|frame| wanted(frame)).count()
    }

    /// Connections accepted from `source`.
    fn accepted_from(&self, source: IpAddr) -> usize {
        let seen = self.seen.lock().expect("the watch's log");
        seen.accepted
            .iter()
            .filter(|from| from.ip() == source)
            .count()
    }

    /// Fails when anything tagged with `case` arrived.
    fn nothing_tagged(&self, case: &str) -> Result<()> {
        let (sources, frames) = self.tagged(case);
        ensure!(
            sources.is_empty() && frames == 0,
            "{} received {} forged datagrams (from {sources:?}) and captured {frames} forged frames",
            self.host.label,
            sources.len(),
        );
        Ok(())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The payload of the packets forged for `case`; markers never contain it.
fn forged(case: &str) -> String {
    format!("forged:{case}")
}

fn carries(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Source port, destination port and flags of a TCP frame.
fn tcp_segment(frame: &[u8]) -> Option<(u16, u16, bool, bool)> {
    let packet = SlicedPacket::from_ethernet(frame).ok()?;
    match packet.transport? {
        TransportSlice::Tcp(tcp) => Some((
            tcp.source_port(),
            tcp.destination_port(),
            tcp.syn(),
            tcp.ack(),
        )),
        _ => None,
    }
}

/// The EtherType right after the MAC addresses (0x8100 for a tagged
/// frame).
fn ethertype(frame: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]))
}

/// The value of the sample of `metric` whose labels include `label` on
/// `node`'s agent.
fn agent_metric(node: &ClusterNode, metric: &str, label: &str) -> Result<u64> {
    let metrics = agent_get(node, "/metrics")?;
    metrics
        .lines()
        .find(|line| {
            line.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .with_context(|| format!("{}'s agent exports no {metric}{{{label}}}", node.name))
}

/// `weft_agent_guard_dropped_packets_total{reason}` on `node`'s agent.
fn guard_dropped(node: &ClusterNode, reason: &str) -> Result<u64> {
    agent_metric(
        node,
        "weft_agent_guard_dropped_packets_total",
        &format!("reason=\"{reason}\""),
    )
}

/// `weft_agent_policy_rejected_pod_ips{reason}` on `node`'s agent; 0
/// before any address was rejected for that reason.
fn rejected_pod_ips(node: &ClusterNode, reason: &str) -> Result<u64> {
    let metric = "weft_agent_policy_rejected_pod_ips";
    let label = format!("reason=\"{reason}\"");
    match agent_metric(node, metric, &label) {
        Ok(value) => Ok(value),
        Err(_) if agent_get(node, "/metrics")?.contains(metric) => Ok(0),
        Err(error) => Err(error),
    }
}

/// A guard counter read before an attack, to see it rise after.
struct GuardCount {
    node: ClusterNode,
    reason: &'static str,
    before: Result<u64>,
}

impl GuardCount {
    fn read(node: &ClusterNode, reason: &'static str) -> Self {
        GuardCount {
            node: node.clone(),
            reason,
            before: guard_dropped(node, reason),
        }
    }

    /// Waits for the counter to pass its earlier reading (the agent reads
    /// the table every resync).
    fn rose(self) -> Result<()> {
        let before = self.before?;
        wait_for(
            testbed::PATIENCE,
            &format!("{}'s guard to count {} drops", self.node.name, self.reason),
            || Ok((guard_dropped(&self.node, self.reason)? > before).then_some(())),
        )
    }
}

/// Each attack's outcome, reported together at the end.
#[derive(Default)]
struct Verdicts(Vec<(String, Result<()>)>);

impl Verdicts {
    fn record(&mut self, case: &str, outcome: Result<()>) {
        match &outcome {
            Ok(()) => eprintln!("held: {case}"),
            Err(error) => eprintln!("BROKEN: {case}: {error:#}"),
        }
        self.0.push((case.to_owned(), outcome));
    }

    fn finish(self) -> Result<()> {
        let broken: Vec<String> = self
            .0
            .iter()
            .filter_map(|(case, outcome)| {
                outcome
                    .as_ref()
                    .err()
                    .map(|error| format!("{case}: {error:#}"))
            })
            .collect();
        if broken.is_empty() {
            return Ok(());
        }
        bail!(
            "{} of {} checks failed:\n{}",
            broken.len(),
            self.0.len(),
            broken.join("\n")
        )
    }
}

/// The two-node cluster with its pods, watches and policies.
struct Scene {
    overlay: Overlay,
    near: ClusterNode,
    far: ClusterNode,
    near_slice: Ipv4Net,
    victim: Host,
    allowed: Host,
    attacker: Host,
    jailed: Host,
    far_attacker: Host,
    far_allowed: Host,
    far_open: Host,
    outside: Host,
    ips: BTreeMap<String, Ipv4Addr>,
}

impl Scene {
    /// The pod network's IPv4 address of `host`.
    fn ip(&self, host: &Host) -> Ipv4Addr {
        self.ips[&host.label]
    }

    fn socket(&self, host: &Host, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(host).into(), port)
    }
}

fn v4(address: IpAddr) -> Result<Ipv4Addr> {
    match address {
        IpAddr::V4(address) => Ok(address),
        IpAddr::V6(address) => bail!("{address}: the test cluster is IPv4"),
    }
}

/// A pod named `name` on `node`, published with app=`app`.
async fn pod(overlay: &Overlay, node: &ClusterNode, name: &str, app: &str) -> Result<Pod> {
    let pod = overlay.add_pod_with(node, name, serde_json::Map::new())?;
    publish_pod(&overlay.admin, &pod, name, node, &json!({"app": app})).await?;
    Ok(pod)
}

async fn create_policy(overlay: &Overlay, policy: Value) -> Result<()> {
    let policies: Api<NetworkPolicy> = Api::namespaced(overlay.admin.clone(), "default");
    policies
        .create(&PostParams::default(), &serde_json::from_value(policy)?)
        .await?;
    Ok(())
}

/// Starts the cluster on `backend`, makes the pods and policies and waits
/// until the policies hold.
async fn scene(backend: &'static str) -> Result<Scene> {
    let mut overlay = Overlay::start(OverlaySpec {
        backend,
        nodes: 2,
        routed_nodes: 0,
        ..OverlaySpec::default()
    })
    .await?;
    overlay.start_agents()?;
    overlay.wait_programmed(1).await?;
    ensure_default_service_account(&overlay.admin, "default").await?;
    let (near, far) = (overlay.node(0), overlay.node(1));
    let mut pods = Vec::new();
    for (node, name, app) in [
        (&near, "victim", "victim"),
        (&near, "allowed", "allowed"),
        (&near, "attacker", "attacker"),
        (&near, "jailed", "jailed"),
        (&far, "far-attacker", "attacker"),
        (&far, "far-allowed", "allowed"),
        (&far, "far-open", "open"),
    ] {
        pods.push(pod(&overlay, node, name, app).await?);
    }
    let mut ips = pods
        .iter()
        .map(|pod| {
            Ok((
                pod.name.clone(),
                v4(pod.ip().context("pod without address")?)?,
            ))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let hosts: Vec<Host> = pods.iter().map(Host::of_pod).collect();
    let near_slice: Ipv4Net = overlay.slices().await?[&near.name]
        .parse()
        .context("node 0's slice")?;
    let outside = overlay.cluster.outside();
    let outside = Host {
        label: "outside".into(),
        netns: outside.netns.clone(),
    };
    ips.insert("outside".into(), overlay.cluster.outside().ip());
    let [victim, allowed, attacker, jailed, far_attacker, far_allowed, far_open] =
        <[Host; 7]>::try_from(hosts).expect("seven pods");
    Ok(Scene {
        overlay,
        near,
        far,
        near_slice,
        victim,
        allowed,
        attacker,
        jailed,
        far_attacker,
        far_allowed,
        far_open,
        outside,
        ips,
    })
}

/// The victim takes traffic only from app=allowed; jailed sends nothing.
/// Waits until both hold for real sockets, having first seen that they did
/// not before (so the waits prove something).
async fn apply_policies(scene: &Scene) -> Result<()> {
    let to_victim = scene.socket(&scene.victim, TCP_PORT);
    let to_far_open = scene.socket(&scene.far_open, TCP_PORT);
    ensure!(
        scene.attacker.connects(to_victim)? && scene.jailed.connects(to_far_open)?,
        "before any policy, attacker reaches victim and jailed reaches far-open"
    );
    create_policy(
        &scene.overlay,
        json!({
            "metadata": {"name": "victim-from-allowed"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "victim"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "allowed"}}}]}],
            },
        }),
    )
    .await?;
    create_policy(
        &scene.overlay,
        json!({
            "metadata": {"name": "jailed-sends-nothing"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "jailed"}},
                "policyTypes": ["Egress"],
            },
        }),
    )
    .await?;
    for (from, to) in [(&scene.attacker, to_victim), (&scene.jailed, to_far_open)] {
        wait_for(
            testbed::PATIENCE,
            &format!("{} shut out of {to}", from.label),
            || Ok((!from.connects(to)?).then_some(())),
        )
        .with_context(|| scene.overlay.logs())?;
    }
    Ok(())
}

/// Allowed traffic still flows: both allowed pods connect to the victim
/// (TCP) and their datagrams arrive; the victim's node reaches it and it
/// reaches far-open; the victim's neighbour entries resolve (ARP or permanent) and
/// its IPv6 neighbour discovery towards its host still works.
fn legitimate_traffic_flows(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    for from in [&scene.allowed, &scene.far_allowed] {
        ensure!(
            from.connects(scene.socket(&scene.victim, TCP_PORT))?,
            "{} cannot connect to the victim",
            from.label
        );
        victim.settle(
            from,
            scene.ip(&scene.victim).into(),
            &format!("{case}-{}", from.label),
        )?;
    }
    let near = Host::of_node(&scene.near);
    let victim_ip = scene.ip(&scene.victim);
    ensure!(
        scene.near.ping(victim_ip.into()),
        "node 0 cannot ping the victim"
    );
    ensure!(
        scene
            .victim
            .connects(scene.socket(&scene.far_open, TCP_PORT))?,
        "the victim cannot connect to far-open"
    );
    ensure!(
        scene.victim.next_hop_mac(scene.ip(&scene.allowed)).is_ok(),
        "the victim has no neighbour entry for its way to allowed"
    );
    // ND: the victim asks for its host veth's link-local address (the echo
    // after it may be dropped; the answer to the solicitation may not).
    let Some(_) = scene.victim.link_local()? else {
        return Ok(());
    };
    let peer = scene.victim.ip(&["link", "show", "eth0"])?[0]["link_index"]
        .as_u64()
        .context("the victim's eth0 has no peer")?;
    let host_links = near.ip(&["-6", "addr", "show"])?;
    let host_veth = host_links
        .iter()
        .find(|link| link["ifindex"].as_u64() == Some(peer))
        .context("the victim's host veth")?;
    let Some(host_ll) = host_veth["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|info| info["scope"] == "link")
        .and_then(|info| info["local"].as_str().map(str::to_owned))
    else {
        eprintln!("{case}: the victim's host veth has no link-local address; no ND to check");
        return Ok(());
    };
    wait_for(
        testbed::PATIENCE,
        "the victim to resolve its host veth by ND",
        || {
            let entries = scene
                .victim
                .ip(&["-6", "neigh", "show", &host_ll, "dev", "eth0"])?;
            if entries.first().is_some_and(|e| e["lladdr"].is_string()) {
                return Ok(Some(()));
            }
            let _ = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &scene.victim.netns,
                    "ping",
                    "-6",
                    "-c1",
                    "-W1",
                ])
                .arg(format!("{host_ll}%eth0"))
                .output();
            Ok(None)
        },
    )
}

/// Sends `frames` from `from` [`BURST`] times each.
fn burst(from: &Host, frames: &[Vec<u8>]) -> Result<()> {
    let forger = from.forger()?;
    for _ in 0..BURST {
        for frame in frames {
            forger.send(frame)?;
        }
    }
    Ok(())
}

/// a. UDP with the allowed pods' addresses, from beside the victim and
/// from the other node.
fn spoofed_udp(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    let payload = forged(case);
    let to = scene.socket(&scene.victim, UDP_PORT);
    let guards = [
        GuardCount::read(&scene.near, "spoofed"),
        GuardCount::read(&scene.far, "spoofed"),
    ];
    for (attacker, spoofed) in [
        (&scene.attacker, [&scene.allowed, &scene.far_allowed]),
        (&scene.far_attacker, [&scene.far_allowed, &scene.allowed]),
    ] {
        let link = attacker.towards(scene.ip(&scene.victim))?;
        let frames: Vec<Vec<u8>> = spoofed
            .iter()
            .map(|source| link.ip(&udp(scene.socket(source, 5000), to, payload.as_bytes())))
            .collect();
        burst(attacker, &frames)?;
    }
    victim.settle(&scene.allowed, to.ip(), case)?;
    victim.settle(&scene.far_allowed, to.ip(), case)?;
    victim.nothing_tagged(case)?;
    guards.into_iter().try_for_each(GuardCount::rose)
}

/// a. A TCP SYN with an allowed pod's address: the victim must not see it,
/// so it answers nobody.
fn spoofed_syn(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    let to = scene.socket(&scene.victim, TCP_PORT);
    let guards = [
        GuardCount::read(&scene.near, "spoofed"),
        GuardCount::read(&scene.far, "spoofed"),
    ];
    // A source port below the ephemeral range, so no real connection has it.
    let port = 1234;
    for (attacker, spoofed) in [
        (&scene.attacker, &scene.allowed),
        (&scene.far_attacker, &scene.far_allowed),
    ] {
        let link = attacker.towards(scene.ip(&scene.victim))?;
        let syn = tcp(scene.socket(spoofed, port), to, SYN, 1000, 0, b"");
        burst(attacker, &[link.ip(&syn)])?;
    }
    victim.settle(&scene.allowed, to.ip(), case)?;
    victim.settle(&scene.far_allowed, to.ip(), case)?;
    let syns = victim.frames(true, |f| {
        tcp_segment(f).is_some_and(|(from, _, syn, _)| from == port && syn)
    });
    let answers = victim.frames(false, |f| {
        tcp_segment(f).is_some_and(|(_, dst, syn, ack)| dst == port && syn && ack)
    });
    ensure!(
        syns == 0 && answers == 0,
        "the victim received {syns} forged SYNs and sent {answers} SYN-ACKs"
    );
    guards.into_iter().try_for_each(GuardCount::rose)
}

/// a. The egress-denied pod sends from an unused address of its node's
/// slice, to a pod on the other node and to the outside.
fn jailed_from_an_unused_address(
    scene: &Scene,
    far_open: &Watch,
    outside: &Watch,
    case: &str,
) -> Result<()> {
    let payload = forged(case);
    let guard = GuardCount::read(&scene.near, "spoofed");
    let unused = scene
        .near_slice
        .hosts()
        .nth(249)
        .context("node 0's slice is too small")?;
    ensure!(
        !scene.ips.values().any(|ip| *ip == unused),
        "{unused} is a pod's address"
    );
    for target in [&scene.far_open, &scene.outside] {
        let link = scene.jailed.towards(scene.ip(target))?;
        let frame = link.ip(&udp(
            (unused, 5000).into(),
            scene.socket(target, UDP_PORT),
            payload.as_bytes(),
        ));
        burst(&scene.jailed, &[frame])?;
    }
    far_open.settle(&scene.allowed, scene.ip(&scene.far_open).into(), case)?;
    outside.settle(&scene.allowed, scene.ip(&scene.outside).into(), case)?;
    far_open.nothing_tagged(case)?;
    outside.nothing_tagged(case)?;
    guard.rose()
}

/// b. TCP and UDP to the victim's link-local address from beside it, with
/// real sockets and forged frames (to the victim's MAC and to the
/// attacker's next hop).
fn link_local(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    let payload = forged(case);
    let (Some(victim_ll), Some(attacker_ll)) =
        (scene.victim.link_local()?, scene.attacker.link_local()?)
    else {
        eprintln!("skipped {case}: IPv6 is off in the pods, so they have no link-local address");
        return Ok(());
    };
    let guard = GuardCount::read(&scene.near, "link_local");
    let scope = scene.attacker.eth0_index()?;
    let tcp_to = SocketAddr::V6(SocketAddrV6::new(victim_ll, TCP_PORT, 0, scope));
    let udp_to = SocketAddr::V6(SocketAddrV6::new(victim_ll, UDP_PORT, 0, scope));
    let connected = scene.attacker.connects(tcp_to)?;
    scene.attacker.send_udp(udp_to, payload.as_bytes())?;
    let source = scene.attacker.mac()?;
    let hop = scene.attacker.next_hop_mac(scene.ip(&scene.victim))?;
    let from = SocketAddr::V6(SocketAddrV6::new(attacker_ll, 5000, 0, 0));
    let to = SocketAddr::V6(SocketAddrV6::new(victim_ll, UDP_PORT, 0, 0));
    let frames: Vec<Vec<u8>> = [scene.victim.mac()?, hop]
        .into_iter()
        .flat_map(|destination| {
            let link = Ethernet {
                destination,
                source,
                vlan: None,
            };
            [
                link.ip(&udp(from, to, payload.as_bytes())),
                link.ip(&icmpv6_echo(
                    attacker_ll,
                    victim_ll,
                    7,
                    1,
                    payload.as_bytes(),
                )),
            ]
        })
        .collect();
    burst(&scene.attacker, &frames)?;
    victim.settle(&scene.allowed, scene.ip(&scene.victim).into(), case)?;
    ensure!(!connected, "the attacker connected to {tcp_to}");
    ensure!(
        victim.accepted_from(attacker_ll.into()) == 0,
        "the victim accepted a connection from {attacker_ll}"
    );
    victim.nothing_tagged(case)?;
    guard.rose()
}

/// c. Broadcast to the slice's broadcast address and 255.255.255.255, and
/// multicast to 224.0.0.1, from beside the victim; the slice's broadcast
/// address from the other node too.
fn broadcast_and_multicast(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    let payload = forged(case);
    let source = scene.attacker.mac()?;
    let hop = scene.attacker.next_hop_mac(scene.ip(&scene.victim))?;
    let slice_broadcast = scene.near_slice.broadcast();
    let all_hosts = Ipv4Addr::new(224, 0, 0, 1);
    let from = scene.socket(&scene.attacker, 5000);
    let datagram = |to: Ipv4Addr| udp(from, (to, UDP_PORT).into(), payload.as_bytes());
    let framed = |destination, packet: &[u8]| {
        Ethernet {
            destination,
            source,
            vlan: None,
        }
        .ip(packet)
    };
    let frames = [
        framed(BROADCAST, &datagram(slice_broadcast)),
        framed(hop, &datagram(slice_broadcast)),
        framed(BROADCAST, &datagram(Ipv4Addr::BROADCAST)),
        framed([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01], &datagram(all_hosts)),
    ];
    burst(&scene.attacker, &frames)?;
    let far_link = scene.far_attacker.towards(slice_broadcast)?;
    let far = far_link.ip(&udp(
        scene.socket(&scene.far_attacker, 5000),
        (slice_broadcast, UDP_PORT).into(),
        payload.as_bytes(),
    ));
    burst(&scene.far_attacker, &[far])?;
    victim.settle(&scene.allowed, scene.ip(&scene.victim).into(), case)?;
    victim.settle(&scene.far_allowed, scene.ip(&scene.victim).into(), case)?;
    victim.nothing_tagged(case)
}

/// d. A VLAN-0 tagged frame carrying UDP to the victim, and frames of
/// another EtherType (0x88b5) to the victim's MAC and to broadcast.
fn vlan_and_other_ethertypes(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    let payload = forged(case);
    let source = scene.attacker.mac()?;
    let hop = scene.attacker.next_hop_mac(scene.ip(&scene.victim))?;
    let victim_mac = scene.victim.mac()?;
    let datagram = udp(
        scene.socket(&scene.attacker, 5000),
        scene.socket(&scene.victim, UDP_PORT),
        payload.as_bytes(),
    );
    let link = |destination, vlan| Ethernet {
        destination,
        source,
        vlan,
    };
    let frames = [
        link(hop, Some(0)).ip(&datagram),
        link(victim_mac, Some(0)).ip(&datagram),
        link(victim_mac, None).frame(0x88b5, payload.as_bytes()),
        link(BROADCAST, None).frame(0x88b5, payload.as_bytes()),
    ];
    burst(&scene.attacker, &frames)?;
    victim.settle(&scene.allowed, scene.ip(&scene.victim).into(), case)?;
    let odd = victim.frames(true, |f| matches!(ethertype(f), Some(0x8100 | 0x88b5)));
    ensure!(
        odd == 0,
        "the victim received {odd} tagged or 0x88b5 frames"
    );
    victim.nothing_tagged(case)
}

/// e. The attacker forges the victim's half of a conversation (a UDP
/// datagram and a SYN from the victim's ports to its own), so that what it
/// sends the victim next would look like replies; then sends it.
fn conntrack_seeding(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    let payload = forged(case);
    let guard = GuardCount::read(&scene.near, "spoofed");
    let link = scene.attacker.towards(scene.ip(&scene.victim))?;
    let (udp_port, tcp_port) = (6000, 6001);
    let victim_udp = scene.socket(&scene.victim, UDP_PORT);
    let victim_tcp = scene.socket(&scene.victim, TCP_PORT);
    let attacker_udp = scene.socket(&scene.attacker, udp_port);
    let attacker_tcp = scene.socket(&scene.attacker, tcp_port);
    let seeds = [
        link.ip(&udp(victim_udp, attacker_udp, b"seed")),
        link.ip(&tcp(victim_tcp, attacker_tcp, SYN, 5000, 0, b"")),
    ];
    let replies = [
        link.ip(&udp(attacker_udp, victim_udp, payload.as_bytes())),
        link.ip(&tcp(attacker_tcp, victim_tcp, SYN | ACK, 9000, 5001, b"")),
        link.ip(&tcp(
            attacker_tcp,
            victim_tcp,
            ACK,
            9001,
            5001,
            payload.as_bytes(),
        )),
    ];
    let forger = scene.attacker.forger()?;
    for _ in 0..BURST {
        for frame in seeds.iter().chain(&replies) {
            forger.send(frame)?;
        }
    }
    victim.settle(&scene.allowed, victim_udp.ip(), case)?;
    let segments = victim.frames(true, |f| {
        tcp_segment(f).is_some_and(|(from, _, _, _)| from == tcp_port)
    });
    ensure!(
        segments == 0,
        "the victim received {segments} of the attacker's 'replies'"
    );
    victim.nothing_tagged(case)?;
    guard.rose()
}

/// f. VXLAN forged to a node's VXLAN port, carrying a frame from an
/// allowed pod's address to the victim: from pods to their own node and to
/// the other node, and from outside the cluster.
fn forged_vxlan(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    let near = Host::of_node(&scene.near);
    let far = Host::of_node(&scene.far);
    let (near_vtep, far_vtep) = (vtep(&near)?, vtep(&far)?);
    let guards = [
        GuardCount::read(&scene.near, "vxlan_stranger"),
        GuardCount::read(&scene.far, "vxlan_stranger"),
    ];
    let to_victim = scene.socket(&scene.victim, UDP_PORT);
    let (near_ip, far_ip) = (scene.near.underlay_ip(), scene.far.underlay_ip());
    let senders: [(&Host, &Host, Ipv4Addr, &Vtep); 4] = [
        (&scene.attacker, &near, near_ip, &near_vtep),
        (&scene.far_attacker, &far, far_ip, &far_vtep),
        (&scene.far_attacker, &near, near_ip, &near_vtep),
        (&scene.outside, &near, near_ip, &near_vtep),
    ];
    // Each sender, node and inner source forges with a variant of its own,
    // so a failure names the ones that got through.
    let mut variants = Vec::new();
    for (sender, node, node_ip, vtep) in senders {
        let link = sender.towards(node_ip)?;
        let mut frames = Vec::new();
        for source in [&scene.allowed, &scene.far_allowed] {
            let variant = format!(
                "{case} from {} to {}'s port as {}",
                sender.label, node.label, source.label
            );
            let inner = Ethernet {
                destination: vtep.mac,
                source: STRANGER_MAC,
                vlan: None,
            }
            .ip(&udp(
                scene.socket(source, 5000),
                to_victim,
                forged(&variant).as_bytes(),
            ));
            frames.push(link.ip(&udp(
                scene.socket(sender, 5000),
                (node_ip, vtep.port).into(),
                &vxlan(vtep.vni, &inner),
            )));
            variants.push(variant);
        }
        burst(sender, &frames)?;
    }
    victim.settle(&scene.allowed, to_victim.ip(), case)?;
    victim.settle(&scene.far_allowed, to_victim.ip(), case)?;
    let through: Vec<String> = variants
        .iter()
        .filter_map(|variant| {
            let error = victim.nothing_tagged(variant).err()?;
            Some(format!("{variant}: {error:#}"))
        })
        .collect();
    ensure!(
        through.is_empty(),
        "forged VXLAN reached the victim: {}",
        through.join("; ")
    );
    guards.into_iter().try_for_each(GuardCount::rose)
}

/// g. Pod objects whose status lies: one on the other node claiming the
/// attacker's address (outside that node's slice), one beside the victim
/// claiming it too (a duplicate), both labelled app=allowed. The agents
/// must reject both claims (counted), and the attacker, sending from its
/// own address, stays shut out of the victim.
async fn lying_pod_status(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    let pods: Api<PodObject> = Api::namespaced(scene.overlay.admin.clone(), "default");
    let claimed = IpAddr::V4(scene.ip(&scene.attacker));
    let accepted_before = victim.accepted_from(claimed);
    let before = (
        rejected_pod_ips(&scene.near, "outside_node_slices")?,
        rejected_pod_ips(&scene.near, "duplicate")?,
    );
    let liars = [("liar-far", &scene.far), ("liar-near", &scene.near)];
    for (name, node) in liars {
        pods.create(
            &PostParams::default(),
            &pod_object(name, &node.name, &json!({"app": "allowed"}))?,
        )
        .await?;
        report_running(&pods, name, claimed, IpAddr::V4(node.underlay_ip())).await?;
    }
    let outcome = async {
        wait_for(
            testbed::PATIENCE,
            "node 0's agent to reject both lying claims",
            || {
                let outside = rejected_pod_ips(&scene.near, "outside_node_slices")?;
                let duplicate = rejected_pod_ips(&scene.near, "duplicate")?;
                Ok((outside > before.0 && duplicate > before.1).then_some(()))
            },
        )?;
        let to = scene.socket(&scene.victim, TCP_PORT);
        ensure!(
            !scene.attacker.connects(to)?,
            "the attacker connected to the victim as a lying app=allowed Pod"
        );
        scene.attacker.send_udp(
            scene.socket(&scene.victim, UDP_PORT),
            forged(case).as_bytes(),
        )?;
        victim.settle(&scene.allowed, to.ip(), case)?;
        let accepted = victim.accepted_from(claimed) - accepted_before;
        ensure!(
            accepted == 0,
            "the victim accepted {accepted} connections from {claimed}"
        );
        victim.nothing_tagged(case)
    }
    .await;
    for (name, _) in liars {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    outcome
}

/// h. The policy table deleted by hand on the victim's node: the agent
/// must put it back by itself (counted), after which the attacker is shut
/// out again. How long the table was missing is printed, not asserted.
async fn deleted_policy_table(scene: &Scene, victim: &Watch, case: &str) -> Result<()> {
    let restored = |node: &ClusterNode| {
        agent_metric(
            node,
            "weft_agent_policy_table_restored_total",
            "table=\"inet weft-policy\"",
        )
        .or_else(|_| Ok::<_, anyhow::Error>(0))
    };
    let before = restored(&scene.near)?;
    let attacker_ip = IpAddr::V4(scene.ip(&scene.attacker));
    let accepted_before = victim.accepted_from(attacker_ip);
    let node = Host::of_node(&scene.near);
    let deleted = std::time::Instant::now();
    run(std::process::Command::new("ip").args([
        "netns",
        "exec",
        &node.netns,
        "nft",
        "delete",
        "table",
        "inet",
        "weft-policy",
    ]))?;
    wait_for(
        testbed::PATIENCE,
        "node 0's agent to restore its policy table",
        || {
            let listed = std::process::Command::new("ip")
                .args(["netns", "exec", &node.netns])
                .args(["nft", "list", "table", "inet", "weft-policy"])
                .output()?;
            Ok(listed.status.success().then_some(()))
        },
    )?;
    eprintln!(
        "{case}: the policy table was back {} ms after it was deleted",
        deleted.elapsed().as_millis()
    );
    wait_for(testbed::PATIENCE, "the restore to be counted", || {
        Ok((restored(&scene.near)? > before).then_some(()))
    })?;
    let to = scene.socket(&scene.victim, TCP_PORT);
    ensure!(
        !scene.attacker.connects(to)?,
        "the attacker connected to the victim after the table came back"
    );
    victim.settle(&scene.allowed, to.ip(), case)?;
    let accepted = victim.accepted_from(attacker_ip) - accepted_before;
    ensure!(
        accepted == 0,
        "the victim accepted {accepted} connections from the attacker"
    );
    Ok(())
}

/// Every attack against a scene on `backend`: forged VXLAN only where
/// there is VXLAN.
async fn attack_over(backend: &'static str) -> Result<()> {
    let scene = scene(backend).await?;
    let victim = Watch::open(&scene.victim)?;
    let far_open = Watch::open(&scene.far_open)?;
    let outside = Watch::open(&scene.outside)?;
    apply_policies(&scene).await?;

    let mut verdicts = Verdicts::default();
    verdicts.record(
        "legitimate traffic before",
        legitimate_traffic_flows(&scene, &victim, "before"),
    );
    verdicts.record(
        "a: spoofed UDP",
        spoofed_udp(&scene, &victim, "spoofed-udp"),
    );
    verdicts.record(
        "a: spoofed SYN",
        spoofed_syn(&scene, &victim, "spoofed-syn"),
    );
    verdicts.record(
        "a: egress-denied pod from an unused address",
        jailed_from_an_unused_address(&scene, &far_open, &outside, "jailed-unused"),
    );
    verdicts.record(
        "b: IPv6 link-local",
        link_local(&scene, &victim, "link-local"),
    );
    verdicts.record(
        "c: broadcast and multicast",
        broadcast_and_multicast(&scene, &victim, "broadcast"),
    );
    verdicts.record(
        "d: VLAN 0 and other EtherTypes",
        vlan_and_other_ethertypes(&scene, &victim, "ethertypes"),
    );
    verdicts.record(
        "e: conntrack seeding",
        conntrack_seeding(&scene, &victim, "conntrack-seed"),
    );
    if backend == "vxlan" {
        verdicts.record(
            "f: forged VXLAN",
            forged_vxlan(&scene, &victim, "forged-vxlan"),
        );
    }
    verdicts.record(
        "g: a lying Pod status",
        lying_pod_status(&scene, &victim, "lying-status").await,
    );
    verdicts.record(
        "h: a deleted policy table",
        deleted_policy_table(&scene, &victim, "deleted-table").await,
    );
    verdicts.record(
        "legitimate traffic after",
        legitimate_traffic_flows(&scene, &victim, "after"),
    );
    drop((victim, far_open, outside));
    let outcome = verdicts.finish().with_context(|| scene.overlay.logs());
    scene.overlay.cluster.stop().await?;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_pod_gets_nothing_past_network_policy_over_vxlan() -> Result<()> {
    require_root!("the e2e harness");
    attack_over("vxlan").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_pod_gets_nothing_past_network_policy_over_host_gw() -> Result<()> {
    require_root!("the e2e harness");
    attack_over("host-gw").await
}
