//! Network-namespace tests of the guard table `inet weft-guard`, without an
//! API server. A node namespace holds two routed pods wired as the plugin
//! wires them (host ends `veth…`, /32 and /128 host routes, permanent
//! neighbours both ways, gateways 169.254.1.1 and fe80::1) and an underlay
//! link to a namespace holding an accepted peer's public IPs and a
//! stranger's. Pods that forge a source (an address added to their
//! interface, as a pod with NET_RAW could send from) and datagrams forged
//! for the VXLAN port (inner sources outside the sender's slices, another
//! node's IP) are sent at the node; the table's counters show each
//! was dropped there, and the legitimate traffic sent after it arrives
//! alone. Needs root (see `weft_testing::root_available`); every namespace
//! is removed on success and on failure.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use weft_agent::guard::{dropped_packets, DropReason, GuardChange, GuardState, GuardTable};
use weft_agent::nft_watch::{fingerprint, TableCheck};
use weft_agent::peer::Peer;
use weft_core::netns::Netns;
use weft_testing::{require_root, wait_for, TestNetns};

/// How long to wait for the kernel to count or deliver what was sent.
const PATIENCE: Duration = Duration::from_secs(10);

/// The node's VXLAN port.
const VXLAN_PORT: u16 = 8472;

/// A command line written as one string, split into its words.
fn words(command: &str) -> Vec<&str> {
    command.split_whitespace().collect()
}

/// A pod of the testbed: its host veth and its addresses.
struct Pod {
    host_veth: &'static str,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    netns: TestNetns,
}

/// The node (slice 10.244.1.0/24, fd00:10:244:1::/64; underlay
/// 192.168.50.1/24, fd50::1/64), pods `a` (.2) and `b` (.3), and the
/// underlay namespace: peer `p4` at 192.168.50.2 owning 10.244.2.0/24 and
/// fd00:10:244:2::/64, peer `p6` at fd50::2 owning 10.244.3.0/24 and
/// fd00:10:244:3::/64, a stranger at 192.168.50.3 and fd50::3.
struct Testbed {
    node: TestNetns,
    pods: [Pod; 2],
    underlay: TestNetns,
}

fn accepted_peers() -> Vec<Peer> {
    let peer = |name: &str, public_ip: &str, slices: [&str; 2]| Peer {
        node_name: name.into(),
        pod_cidrs: slices.iter().map(|s| s.parse().unwrap()).collect(),
        public_ip: public_ip.parse().unwrap(),
        vtep_mac: None,
        created: 0,
        malformed: None,
    };
    vec![
        peer(
            "p4",
            "192.168.50.2",
            ["10.244.2.0/24", "fd00:10:244:2::/64"],
        ),
        peer("p6", "fd50::2", ["10.244.3.0/24", "fd00:10:244:3::/64"]),
    ]
}

/// The MAC address of `device` in `netns`.
fn mac(netns: &TestNetns, device: &str) -> Result<String> {
    let links = netns.json(&["ip", "-j", "link", "show", "dev", device])?;
    links[0]["address"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{device} has no MAC"))
}

impl Testbed {
    /// The testbed of the test called `test`, a short tag that keeps the
    /// names of concurrent tests apart.
    fn start(test: &str) -> Result<Self> {
        let node = TestNetns::create(&format!("{test}-node"));
        let underlay = TestNetns::create(&format!("{test}-ul"));
        let pods = [("a", "veth0123456789a", 2), ("b", "veth0123456789b", 3)].map(
            |(name, host_veth, host)| Pod {
                host_veth,
                v4: Ipv4Addr::new(10, 244, 1, host),
                v6: format!("fd00:10:244:1::{host}").parse().unwrap(),
                netns: TestNetns::create(&format!("{test}-{name}")),
            },
        );
        // Link-local addresses usable at once: no DAD on new links.
        for netns in [&node, &underlay]
            .into_iter()
            .chain(pods.iter().map(|p| &p.netns))
        {
            netns.run(&words("sysctl -qw net.ipv6.conf.default.accept_dad=0"))?;
            netns.run(&words("ip link set lo up"))?;
        }
        for command in [
            "sysctl -qw net.ipv4.ip_forward=1",
            "sysctl -qw net.ipv6.conf.all.forwarding=1",
        ] {
            node.run(&words(command))?;
        }
        for pod in &pods {
            let (host, netns) = (pod.host_veth, &pod.netns);
            node.run(&words(&format!(
                "ip link add {host} type veth peer name eth0 netns {}",
                netns.name()
            )))?;
            let (host_mac, pod_mac) = (mac(&node, host)?, mac(netns, "eth0")?);
            for command in [
                format!("ip addr add fe80::1/64 dev {host} nodad"),
                format!("ip link set {host} up"),
                format!("ip route add {}/32 dev {host} scope link", pod.v4),
                format!("ip -6 route add {}/128 dev {host}", pod.v6),
                format!(
                    "ip neigh add {} lladdr {pod_mac} dev {host} nud permanent",
                    pod.v4
                ),
                format!(
                    "ip -6 neigh add {} lladdr {pod_mac} dev {host} nud permanent",
                    pod.v6
                ),
            ] {
                node.run(&words(&command))?;
            }
            for command in [
                format!("ip addr add {}/32 dev eth0", pod.v4),
                format!("ip addr add {}/128 dev eth0 nodad", pod.v6),
                "ip link set eth0 up".into(),
                "ip route add 169.254.1.1 dev eth0 scope link".into(),
                "ip route add default via 169.254.1.1 dev eth0".into(),
                format!("ip neigh add 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"),
                "ip -6 route add default via fe80::1 dev eth0".into(),
                format!("ip -6 neigh add fe80::1 lladdr {host_mac} dev eth0 nud permanent"),
            ] {
                netns.run(&words(&command))?;
            }
        }
        node.run(&words(&format!(
            "ip link add uplink type veth peer name eth0 netns {}",
            underlay.name()
        )))?;
        for command in [
            "ip addr add 192.168.50.1/24 dev uplink",
            "ip addr add fd50::1/64 dev uplink nodad",
            "ip link set uplink up",
        ] {
            node.run(&words(command))?;
        }
        for command in [
            "ip addr add 192.168.50.2/24 dev eth0",
            "ip addr add 192.168.50.3/24 dev eth0",
            "ip addr add fd50::2/64 dev eth0 nodad",
            "ip addr add fd50::3/64 dev eth0 nodad",
            "ip link set eth0 up",
        ] {
            underlay.run(&words(command))?;
        }
        Ok(Testbed {
            node,
            pods,
            underlay,
        })
    }

    fn pod(&self, name: &str) -> &Pod {
        match name {
            "a" => &self.pods[0],
            _ => &self.pods[1],
        }
    }

    fn in_node<T>(&self, work: impl FnOnce() -> T) -> Result<T> {
        Ok(Netns::open(self.node.path())?.run_here(work)?)
    }

    /// Writes the guard for the accepted peers and VXLAN in the node.
    fn guard(&self) -> Result<GuardTable> {
        let mut table = GuardTable::default();
        let state = GuardState::of(Some(VXLAN_PORT), &accepted_peers());
        self.in_node(|| table.ensure(&state))??;
        Ok(table)
    }

    /// The guard's counter for `reason`, as it stands.
    fn dropped(&self, reason: DropReason) -> Result<u64> {
        let drops = self.in_node(dropped_packets)??.context("no guard table")?;
        Ok(drops.of(reason))
    }

    /// Waits until the counter for `reason` reaches `count`: everything
    /// sent has been seen and dropped by the guard.
    fn wait_dropped(&self, reason: DropReason, count: u64) -> Result<u64> {
        wait_for(PATIENCE, &format!("{count} {reason:?} drops"), || {
            let now = self.dropped(reason)?;
            Ok((now >= count).then_some(now))
        })
    }
}

/// A UDP socket bound to `address` (port 0: any) in `netns`.
fn udp(netns: &TestNetns, address: SocketAddr) -> Result<UdpSocket> {
    let socket = Netns::open(netns.path())?.run_here(|| UdpSocket::bind(address))??;
    socket.set_read_timeout(Some(PATIENCE))?;
    Ok(socket)
}

/// Sends `payload` from `from` (an address of `netns`) to `to`.
fn send(netns: &TestNetns, from: IpAddr, to: SocketAddr, payload: &[u8]) -> Result<()> {
    udp(netns, SocketAddr::new(from, 0))?
        .send_to(payload, to)
        .with_context(|| format!("sending from {from} to {to}"))?;
    Ok(())
}

/// The next `n` datagrams on `socket`: their sources and payloads.
fn receive(socket: &UdpSocket, n: usize) -> Result<Vec<(IpAddr, Vec<u8>)>> {
    let mut got = Vec::new();
    let mut buffer = [0u8; 2048];
    for _ in 0..n {
        let (len, from) = socket
            .recv_from(&mut buffer)
            .with_context(|| format!("receiving datagram {} of {n}, got {got:?}", got.len() + 1))?;
        let source = match from.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        got.push((source, buffer[..len].to_vec()));
    }
    Ok(got)
}

/// Whether anything more waits on `socket`.
fn nothing_queued(socket: &UdpSocket) -> Result<bool> {
    socket.set_nonblocking(true)?;
    let mut buffer = [0u8; 2048];
    let empty =
        matches!(socket.recv_from(&mut buffer), Err(e) if e.kind() == ErrorKind::WouldBlock);
    socket.set_nonblocking(false)?;
    Ok(empty)
}

#[test]
fn pods_send_only_from_their_own_addresses() -> Result<()> {
    require_root!("network namespaces and nftables");
    let testbed = Testbed::start("gspoof")?;
    let mut table = testbed.guard()?;
    let (a, b) = (testbed.pod("a"), testbed.pod("b"));
    let at_b = udp(&b.netns, "[::]:7000".parse()?)?;
    let at_node = udp(&testbed.node, "[::]:7000".parse()?)?;
    let to_b4 = SocketAddr::new(b.v4.into(), 7000);
    let to_b6 = SocketAddr::new(b.v6.into(), 7000);
    let to_node = "192.168.50.1:7000".parse()?;

    // Pod a forges: a free address of its own node's slice, a pod address
    // of another node, and a free IPv6 address.
    let forged: [IpAddr; 3] = [
        "10.244.1.99".parse()?,
        "10.244.2.7".parse()?,
        "fd00:10:244:1::99".parse()?,
    ];
    a.netns.run(&words("ip addr add 10.244.1.99/32 dev eth0"))?;
    a.netns.run(&words("ip addr add 10.244.2.7/32 dev eth0"))?;
    a.netns
        .run(&words("ip addr add fd00:10:244:1::99/128 dev eth0 nodad"))?;
    send(&a.netns, forged[0], to_b4, b"forged")?;
    send(&a.netns, forged[1], to_b4, b"forged")?;
    send(&a.netns, forged[2], to_b6, b"forged")?;
    send(&a.netns, forged[0], to_node, b"forged")?;
    testbed.wait_dropped(DropReason::Spoofed, 4)?;

    // Sent after the forged ones, the pod's own traffic arrives alone.
    send(&a.netns, a.v4.into(), to_b4, b"own-v4")?;
    send(&a.netns, a.v6.into(), to_b6, b"own-v6")?;
    send(&a.netns, a.v4.into(), to_node, b"own-v4")?;
    let mut at_b_got = receive(&at_b, 2)?;
    at_b_got.sort();
    assert_eq!(
        at_b_got,
        [
            (IpAddr::V4(a.v4), b"own-v4".to_vec()),
            (IpAddr::V6(a.v6), b"own-v6".to_vec())
        ]
    );
    assert_eq!(
        receive(&at_node, 1)?,
        [(IpAddr::V4(a.v4), b"own-v4".to_vec())]
    );
    assert!(nothing_queued(&at_b)? && nothing_queued(&at_node)?);
    assert_eq!(testbed.dropped(DropReason::Spoofed)?, 4);

    // The agent's reading counts them once, across a rewrite of the table.
    let counted = testbed.in_node(|| table.newly_dropped())??;
    assert_eq!(counted.of(DropReason::Spoofed), 4);
    let host_gw = GuardState::of(None, &accepted_peers());
    assert_eq!(
        testbed.in_node(|| table.ensure(&host_gw))??,
        GuardChange::Written
    );
    send(&a.netns, forged[0], to_b4, b"forged")?;
    testbed.wait_dropped(DropReason::Spoofed, 1)?;
    let counted = testbed.in_node(|| table.newly_dropped())??;
    assert_eq!(counted.of(DropReason::Spoofed), 1);
    Ok(())
}

/// The link-local address (other than the gateway's fe80::1) of `device`.
fn own_link_local(netns: &TestNetns, device: &str) -> Result<Ipv6Addr> {
    let links = netns.json(&[
        "ip", "-j", "-6", "addr", "show", "dev", device, "scope", "link",
    ])?;
    links[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|info| info["local"].as_str()?.parse::<Ipv6Addr>().ok())
        .find(|addr| *addr != "fe80::1".parse::<Ipv6Addr>().unwrap())
        .with_context(|| format!("{device} has no link-local address of its own"))
}

/// A TCP connection from `netns` to `address`%eth0 that the guard drops:
/// waits until the link-local counter shows the SYN went past `before`.
fn link_local_connect(
    testbed: &Testbed,
    netns: &TestNetns,
    address: Ipv6Addr,
    port: u16,
    before: u64,
) -> Result<u64> {
    let links = netns.json(&["ip", "-j", "link", "show", "dev", "eth0"])?;
    let scope = links[0]["ifindex"]
        .as_u64()
        .and_then(|index| u32::try_from(index).ok())
        .context("eth0 has no index")?;
    let target = SocketAddr::V6(std::net::SocketAddrV6::new(address, port, 0, scope));
    let netns = Netns::open(netns.path())?;
    let connected =
        netns.run_here(|| TcpStream::connect_timeout(&target, Duration::from_secs(1)))?;
    ensure!(
        connected.is_err(),
        "a link-local connection to {target} was made"
    );
    testbed.wait_dropped(DropReason::LinkLocal, before + 1)
}

#[test]
fn pod_link_local_traffic_stops_at_the_node_but_neighbour_discovery_passes() -> Result<()> {
    require_root!("network namespaces and nftables");
    let testbed = Testbed::start("glink")?;
    let _table = testbed.guard()?;
    let (a, b) = (testbed.pod("a"), testbed.pod("b"));
    let listener = testbed.in_node(|| TcpListener::bind("[::]:7100"))??;
    listener.set_nonblocking(true)?;
    let at_b = Netns::open(b.netns.path())?.run_here(|| TcpListener::bind("[::]:7100"))??;
    at_b.set_nonblocking(true)?;

    // To the node's gateway address.
    let counted = link_local_connect(&testbed, &a.netns, "fe80::1".parse()?, 7100, 0)?;
    // To pod b's link-local address, with the frame sent to the node.
    let b_link_local = own_link_local(&b.netns, "eth0")?;
    let host_mac = mac(&testbed.node, a.host_veth)?;
    a.netns.run(&words(&format!(
        "ip -6 neigh add {b_link_local} lladdr {host_mac} dev eth0 nud permanent"
    )))?;
    link_local_connect(&testbed, &a.netns, b_link_local, 7100, counted)?;
    for listener in [&listener, &at_b] {
        assert!(
            matches!(listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "a link-local connection got through"
        );
    }

    // Neighbour discovery passes: pod a resolves the node veth's own
    // link-local address (its echo request after that is dropped).
    let node_link_local = own_link_local(&testbed.node, a.host_veth)?;
    let ping = format!("ping -6 -c 1 -W 1 {node_link_local}%eth0");
    let _ = a.netns.output(&words(&ping))?;
    let resolved = wait_for(
        PATIENCE,
        "pod a to resolve the node's link-local address",
        || {
            let neighbours = a
                .netns
                .json(&["ip", "-j", "-6", "neigh", "show", "dev", "eth0"])?;
            Ok(neighbours
                .iter()
                .find(|n| n["dst"].as_str() == Some(&node_link_local.to_string()))
                .and_then(|n| n["lladdr"].as_str().map(str::to_owned)))
        },
    )?;
    assert_eq!(resolved, host_mac);
    Ok(())
}

/// The Ethernet frame a peer's VTEP would tunnel: an IPv4 or IPv6 UDP
/// datagram from `source` carrying `tag`, under ethertype `ethertype`
/// (that of `source`'s family unless forged).
fn inner_frame(source: IpAddr, ethertype: Option<u16>, tag: u8) -> Vec<u8> {
    let udp = [0x1f, 0x90, 0x1f, 0x90, 0, 9, 0, 0, tag];
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    match source {
        IpAddr::V4(source) => {
            frame.extend(ethertype.unwrap_or(0x0800).to_be_bytes());
            let total = (20 + udp.len()) as u16;
            frame.extend([0x45, 0]);
            frame.extend(total.to_be_bytes());
            frame.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
            frame.extend(source.octets());
            frame.extend([10, 244, 1, 0]);
        }
        IpAddr::V6(source) => {
            frame.extend(ethertype.unwrap_or(0x86dd).to_be_bytes());
            frame.extend([0x60, 0, 0, 0]);
            frame.extend((udp.len() as u16).to_be_bytes());
            frame.extend([17, 64]);
            frame.extend(source.octets());
            frame.extend("fd00:10:244:1::".parse::<Ipv6Addr>().unwrap().octets());
        }
    }
    frame.extend(udp);
    frame
}

/// A VXLAN datagram's payload: the header (I flag, VNI 1), then `frame`.
fn vxlan(frame: Vec<u8>) -> Vec<u8> {
    let mut datagram = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    datagram.extend(frame);
    datagram
}

/// Sends each VXLAN datagram `(outer source, to, inner frame)` from the
/// underlay namespace and checks that exactly these reach the node's port
/// at `at_port`.
fn delivered_alone(
    testbed: &Testbed,
    at_port: &UdpSocket,
    datagrams: &[(&str, SocketAddr, Vec<u8>)],
) -> Result<()> {
    let ip = |text: &str| text.parse::<IpAddr>();
    let mut sent = Vec::new();
    for (from, to, frame) in datagrams {
        let datagram = vxlan(frame.clone());
        send(&testbed.underlay, ip(from)?, *to, &datagram)?;
        sent.push((ip(from)?, datagram));
    }
    let mut got = receive(at_port, datagrams.len())?;
    got.sort();
    sent.sort();
    ensure!(got == sent, "received {got:?}, expected {sent:?}");
    ensure!(nothing_queued(at_port)?, "more arrived than was accepted");
    Ok(())
}

#[test]
fn vxlan_is_taken_only_from_accepted_peers_for_their_own_slices() -> Result<()> {
    require_root!("network namespaces and nftables");
    let testbed = Testbed::start("gvxlan")?;
    let mut table = testbed.guard()?;
    // The node's VXLAN port, bound by a plain socket to see what passes.
    let at_port = udp(
        &testbed.node,
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), VXLAN_PORT),
    )?;
    let to_v4: SocketAddr = "192.168.50.1:8472".parse()?;
    let to_v6: SocketAddr = "[fd50::1]:8472".parse()?;
    let ip = |text: &str| text.parse::<IpAddr>().unwrap();

    let rejected = [
        // A stranger, with a source of p4's slice.
        (
            "192.168.50.3",
            to_v4,
            inner_frame(ip("10.244.2.5"), None, 1),
        ),
        (
            "fd50::3",
            to_v6,
            inner_frame(ip("fd00:10:244:3::5"), None, 2),
        ),
        // p4, with sources outside its slices.
        (
            "192.168.50.2",
            to_v4,
            inner_frame(ip("10.244.9.5"), None, 3),
        ),
        (
            "192.168.50.2",
            to_v4,
            inner_frame(ip("10.244.3.5"), None, 4),
        ),
        (
            "192.168.50.2",
            to_v4,
            inner_frame(ip("fd00:10:244:3::5"), None, 5),
        ),
        // p4, with its own source under an ethertype other than IP.
        (
            "192.168.50.2",
            to_v4,
            inner_frame(ip("10.244.2.5"), Some(0x0806), 6),
        ),
        // p6, with p4's slice.
        ("fd50::2", to_v6, inner_frame(ip("10.244.2.5"), None, 7)),
    ];
    for (from, to, frame) in &rejected {
        send(&testbed.underlay, ip(from), *to, &vxlan(frame.clone()))?;
    }
    // Too short to hold an inner source.
    send(
        &testbed.underlay,
        ip("192.168.50.2"),
        to_v4,
        &[0x08, 0, 0, 0],
    )?;
    let strangers = rejected.len() as u64 + 1;
    testbed.wait_dropped(DropReason::VxlanStranger, strangers)?;

    let accepted = [
        (
            "192.168.50.2",
            to_v4,
            inner_frame(ip("10.244.2.5"), None, 10),
        ),
        (
            "192.168.50.2",
            to_v4,
            inner_frame(ip("fd00:10:244:2::5"), None, 11),
        ),
        ("fd50::2", to_v6, inner_frame(ip("10.244.3.5"), None, 12)),
        (
            "fd50::2",
            to_v6,
            inner_frame(ip("fd00:10:244:3::5"), None, 13),
        ),
    ];
    delivered_alone(&testbed, &at_port, &accepted)?;
    assert_eq!(testbed.dropped(DropReason::VxlanStranger)?, strangers);

    // p6 leaves: its senders are deleted in place, and it is a stranger.
    let p4_only = GuardState::of(Some(VXLAN_PORT), &accepted_peers()[..1]);
    assert_eq!(
        testbed.in_node(|| table.ensure(&p4_only))??,
        GuardChange::Updated
    );
    let (from, to, frame) = &accepted[3];
    send(&testbed.underlay, ip(from), *to, &vxlan(frame.clone()))?;
    testbed.wait_dropped(DropReason::VxlanStranger, strangers + 1)?;
    let (from, to, frame) = &accepted[0];
    send(&testbed.underlay, ip(from), *to, &vxlan(frame.clone()))?;
    assert_eq!(receive(&at_port, 1)?, [(ip(from), vxlan(frame.clone()))]);
    Ok(())
}

/// Each peer may send into the tunnel as its own node IP (host traffic the
/// peer SNATs to it), never as another node's: not as a third peer's, not
/// as the receiving node's, and a stranger not even as itself. A pod cannot
/// borrow its node's IP to pass as it either.
#[test]
fn a_peer_may_send_as_its_own_node_ip_never_as_another() -> Result<()> {
    require_root!("network namespaces and nftables");
    let testbed = Testbed::start("gself")?;
    // A third peer p4 could pretend to be.
    let mut peers = accepted_peers();
    peers.push(Peer {
        node_name: "q".into(),
        pod_cidrs: vec!["10.244.4.0/24".parse()?],
        public_ip: "192.168.50.4".parse()?,
        vtep_mac: None,
        created: 0,
        malformed: None,
    });
    let mut table = GuardTable::default();
    let state = GuardState::of(Some(VXLAN_PORT), &peers);
    testbed.in_node(|| table.ensure(&state))??;
    let at_port = udp(
        &testbed.node,
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), VXLAN_PORT),
    )?;
    let to_v4: SocketAddr = "192.168.50.1:8472".parse()?;
    let to_v6: SocketAddr = "[fd50::1]:8472".parse()?;
    let ip = |text: &str| text.parse::<IpAddr>().unwrap();

    let rejected = [
        // p4 as the third peer q, as p6, as the receiving node.
        ("192.168.50.2", to_v4, "192.168.50.4"),
        ("192.168.50.2", to_v4, "fd50::2"),
        ("192.168.50.2", to_v4, "192.168.50.1"),
        ("192.168.50.2", to_v4, "fd50::1"),
        // p6 as p4 and as the receiving node.
        ("fd50::2", to_v6, "192.168.50.2"),
        ("fd50::2", to_v6, "fd50::1"),
        // A stranger as itself and as p4.
        ("192.168.50.3", to_v4, "192.168.50.3"),
        ("192.168.50.3", to_v4, "192.168.50.2"),
    ];
    for (tag, (from, to, inner)) in (1..).zip(rejected) {
        let frame = inner_frame(ip(inner), None, tag);
        send(&testbed.underlay, ip(from), to, &vxlan(frame))?;
    }
    let strangers = rejected.len() as u64;
    testbed.wait_dropped(DropReason::VxlanStranger, strangers)?;

    // Sent after the forged ones, each peer as itself arrives alone.
    let accepted = [
        (
            "192.168.50.2",
            to_v4,
            inner_frame(ip("192.168.50.2"), None, 20),
        ),
        ("fd50::2", to_v6, inner_frame(ip("fd50::2"), None, 21)),
    ];
    delivered_alone(&testbed, &at_port, &accepted)?;
    assert_eq!(testbed.dropped(DropReason::VxlanStranger)?, strangers);

    // Peers trust this node's IP from this node alone, so a pod must not
    // send as it: towards a pod beside it and towards a peer's pod.
    let (a, b) = (testbed.pod("a"), testbed.pod("b"));
    let at_b = udp(&b.netns, "[::]:7000".parse()?)?;
    a.netns
        .run(&words("ip addr add 192.168.50.1/32 dev eth0"))?;
    let node_ip = ip("192.168.50.1");
    send(
        &a.netns,
        node_ip,
        SocketAddr::new(b.v4.into(), 7000),
        b"forged",
    )?;
    send(&a.netns, node_ip, "10.244.2.5:7000".parse()?, b"forged")?;
    testbed.wait_dropped(DropReason::Spoofed, 2)?;
    send(
        &a.netns,
        a.v4.into(),
        SocketAddr::new(b.v4.into(), 7000),
        b"own",
    )?;
    assert_eq!(receive(&at_b, 1)?, [(IpAddr::V4(a.v4), b"own".to_vec())]);
    assert!(nothing_queued(&at_b)?);
    assert_eq!(testbed.dropped(DropReason::Spoofed)?, 2);
    Ok(())
}

#[test]
fn a_restart_keeps_the_table_and_host_gw_has_no_vxlan_chain() -> Result<()> {
    require_root!("network namespaces and nftables");
    let testbed = Testbed::start("gtable")?;
    let list = || testbed.node.run(&words("nft list table inet weft-guard"));
    let mut first = GuardTable::default();
    assert_eq!(testbed.in_node(|| first.start())??, GuardChange::Written);
    let listing = list()?;
    assert!(listing.contains("jump pod-source"), "{listing}");
    assert!(
        !listing.contains("vxlan-source") && !listing.contains("udp"),
        "pods only before peers are known: {listing}"
    );
    assert_eq!(testbed.in_node(|| first.start())??, GuardChange::Unchanged);

    let state = GuardState::of(Some(VXLAN_PORT), &accepted_peers());
    assert_eq!(
        testbed.in_node(|| first.ensure(&state))??,
        GuardChange::Written
    );
    assert_eq!(
        testbed.in_node(|| first.ensure(&state))??,
        GuardChange::Unchanged
    );
    let written = list()?;
    assert!(
        written.contains("192.168.50.2 . 0xaf40200-0xaf402ff"),
        "{written}"
    );

    // A restarted agent leaves the last run's table, peers included.
    let mut second = GuardTable::default();
    assert_eq!(testbed.in_node(|| second.start())??, GuardChange::Unchanged);
    assert_eq!(list()?, written);

    let host_gw = GuardState::of(None, &accepted_peers());
    assert_eq!(
        testbed.in_node(|| second.ensure(&host_gw))??,
        GuardChange::Written
    );
    let listing = list()?;
    assert!(
        !listing.contains("vxlan-source") && !listing.contains("udp"),
        "{listing}"
    );

    // A rule deleted behind the agent's back is restored at the watch's
    // check; the agent's own writes leave the table intact.
    assert_eq!(
        testbed.in_node(|| second.restore_if_changed())??,
        TableCheck::Intact
    );
    testbed
        .node
        .run(&words("nft flush chain inet weft-guard pod-source"))?;
    assert_eq!(
        testbed.in_node(|| second.restore_if_changed())??,
        TableCheck::Restored
    );
    assert_eq!(list()?, listing);

    // A table deleted behind the agent's back is written again after the
    // next counter reading (every resync), watch or not.
    testbed
        .node
        .run(&words("nft delete table inet weft-guard"))?;
    testbed.in_node(|| second.newly_dropped())??;
    assert_eq!(
        testbed.in_node(|| second.ensure(&host_gw))??,
        GuardChange::Written
    );
    assert_eq!(list()?, listing);
    Ok(())
}

/// Peer `i` of a large cluster: dual-stack, at 172.16.0.0 + i.
fn large_cluster_peer(i: u32) -> Peer {
    Peer {
        node_name: format!("node-{i}"),
        pod_cidrs: vec![
            ipnet::IpNet::new(Ipv4Addr::from(0x0a80_0000 + (i << 8)).into(), 24).unwrap(),
            ipnet::IpNet::new(
                Ipv6Addr::from(0xfd00_0010_0244_0000_0000_0000_0000_0000 + (u128::from(i) << 64))
                    .into(),
                64,
            )
            .unwrap(),
        ],
        public_ip: Ipv4Addr::from(0xac10_0001 + i).into(),
        vtep_mac: None,
        created: 0,
        malformed: None,
    }
}

#[test]
fn five_thousand_peers_are_written_in_one_transaction() -> Result<()> {
    require_root!("network namespaces and nftables");
    let node = TestNetns::create("gscale");
    let netns = Netns::open(node.path())?;
    let mut peers: Vec<Peer> = (0..5000).map(large_cluster_peer).collect();
    let mut table = GuardTable::default();
    let mut write = |peers: &[Peer]| -> Result<Duration> {
        let state = GuardState::of(Some(VXLAN_PORT), peers);
        let started = Instant::now();
        let change = netns.run_here(|| table.ensure(&state))??;
        ensure!(change != GuardChange::Unchanged, "nothing written");
        Ok(started.elapsed())
    };
    let first = write(&peers)?;
    peers[17] = large_cluster_peer(9000);
    let changed = write(&peers)?;
    let started = Instant::now();
    netns.run_here(|| fingerprint("inet weft-guard"))??;
    let read_back = started.elapsed();
    eprintln!(
        "5,000 dual-stack peers: whole write {first:?}, one peer changed in place {changed:?}, \
         each including a read-back for the table watch of {read_back:?}"
    );
    let listing = node.run(&words("nft -j list set inet weft-guard vxlan-v4-v6"))?;
    let set: serde_json::Value = serde_json::from_str(&listing)?;
    let elements = set["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|item| item["set"]["elem"].as_array())
        .map_or(0, Vec::len);
    assert_eq!(elements, 5000);
    Ok(())
}
