//! hostPort (`runtimeConfig.portMappings`) with the real `weft` binary and
//! nftables, inside a node namespace with pods and an "outside" namespace
//! wired to the node. Needs root and `nft`; the root namespace is never
//! touched.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use support::{Invocation, Node, Reply, NODE_V4, NODE_V6};
use weft_core::netns::Netns;
use weft_testing::{require_root, TestNetns};

/// How long a connection that should work may take; failures wait this long.
const PATIENCE: Duration = Duration::from_secs(5);

/// Runs `work` with a socket made in `netns`.
fn in_netns<T>(netns: &TestNetns, work: impl FnOnce() -> T) -> Result<T> {
    Ok(Netns::open(netns.path())?.run_here(work)?)
}

/// A TCP server in `netns` on `port` (every address) that answers each
/// connection with the peer's address, and a UDP one that echoes the peer.
fn serve(netns: &TestNetns, port: u16) -> Result<()> {
    let (tcp, udp) = in_netns(netns, || -> std::io::Result<_> {
        Ok((
            TcpListener::bind(("::", port))?,
            UdpSocket::bind(("::", port))?,
        ))
    })??;
    std::thread::spawn(move || {
        for mut stream in tcp.incoming().flatten() {
            if let Ok(peer) = stream.peer_addr() {
                let _ = stream.write_all(unmapped(peer).as_bytes());
            }
        }
    });
    std::thread::spawn(move || {
        let mut buffer = [0u8; 64];
        while let Ok((_, peer)) = udp.recv_from(&mut buffer) {
            let _ = udp.send_to(unmapped(peer).as_bytes(), peer);
        }
    });
    Ok(())
}

/// The peer's address as text, IPv4 without the `::ffff:` of a dual socket.
fn unmapped(peer: SocketAddr) -> String {
    match peer {
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map_or_else(|| v6.ip().to_string(), |v4| v4.to_string()),
        SocketAddr::V4(v4) => v4.ip().to_string(),
    }
}

/// Connects from `netns` to `address:port` over TCP and returns what the
/// server said (the source address it saw), or `None` if nothing answered.
fn tcp_from(netns: &TestNetns, address: &str, port: u16) -> Result<Option<String>> {
    let target = SocketAddr::new(address.parse()?, port);
    let Ok(mut stream) = in_netns(netns, || TcpStream::connect_timeout(&target, PATIENCE))? else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(PATIENCE))?;
    let mut seen = String::new();
    Ok(stream.read_to_string(&mut seen).ok().map(|_| seen))
}

/// Sends one UDP datagram from `netns` and returns the reply, if any.
fn udp_from(netns: &TestNetns, address: &str, port: u16) -> Result<Option<String>> {
    let target = SocketAddr::new(address.parse()?, port);
    let local = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = in_netns(netns, || UdpSocket::bind(local))??;
    socket.set_read_timeout(Some(PATIENCE))?;
    socket.send_to(b"hello", target)?;
    let mut buffer = [0u8; 64];
    Ok(socket
        .recv(&mut buffer)
        .ok()
        .map(|n| String::from_utf8_lossy(&buffer[..n]).into_owned()))
}

fn mappings(entries: Value) -> Value {
    json!({ "runtimeConfig": { "portMappings": entries } })
}

fn add(node: &Node, container: &str, pod: &TestNetns, extra: &Value) -> Result<Reply> {
    node.invoke(
        &Invocation::attach("ADD", container, Some(pod.path())),
        &node.config("1.1.0", extra.clone()),
    )
}

/// The elements of the four maps, one `map: key : value` line each (empty
/// when there is no table).
fn elements(node: &Node) -> Result<String> {
    let listing = node
        .netns
        .output(&["nft", "-j", "list", "table", "inet", "weft-hostport"])?;
    if !listing.status.success() {
        return Ok(String::new());
    }
    let listing: Value = serde_json::from_slice(&listing.stdout)?;
    let mut lines = Vec::new();
    for map in listing["nftables"]
        .as_array()
        .context("nft -j output")?
        .iter()
        .filter_map(|object| object.get("map"))
    {
        for pair in map["elem"].as_array().into_iter().flatten() {
            lines.push(format!("{}: {} : {}", map["name"], pair[0], pair[1]));
        }
    }
    Ok(lines.join("\n"))
}

#[test]
fn a_host_port_is_reached_from_outside_the_node_and_other_pods() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("hp")?;
    let outside = node.uplink()?;
    // A second node address, where the hostIP-bound mapping is not.
    let other_v4 = "192.0.2.3";
    node.netns
        .run(&["ip", "addr", "add", "192.0.2.3/24", "dev", "up0"])?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    serve(&a, 80)?;
    let ports = mappings(json!([
        { "hostPort": 8080, "containerPort": 80, "protocol": "tcp" },
        { "hostPort": 5353, "containerPort": 80, "protocol": "udp" },
        { "hostPort": 9090, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_V4 },
        { "hostPort": 3868, "containerPort": 3868, "protocol": "sctp" },
    ]));
    let added = add(&node, "hp-a", &a, &ports)?.ok()?;
    add(&node, "hp-b", &b, &json!({}))?.ok()?;
    let mapped = elements(&node)?;
    ensure!(mapped.contains(r#"{"concat":["sctp",3868]}"#), "{mapped}");

    // From outside the node, on both families: the pod sees the client.
    ensure!(tcp_from(&outside, NODE_V4, 8080)?.as_deref() == Some("192.0.2.2"));
    ensure!(tcp_from(&outside, NODE_V6, 8080)?.as_deref() == Some("2001:db8:7::2"));
    ensure!(udp_from(&outside, NODE_V4, 5353)?.as_deref() == Some("192.0.2.2"));
    // From the node itself.
    ensure!(
        tcp_from(&node.netns, NODE_V4, 8080)?.is_some(),
        "node → own hostPort"
    );
    // From another pod of the node, and from the pod itself (hairpin), on
    // both families: masqueraded to a node address, or the replies would
    // bypass the NAT.
    for (to, seen) in [(NODE_V4, NODE_V4), (other_v4, NODE_V4), (NODE_V6, NODE_V6)] {
        for (pod, what) in [(&b, "another pod"), (&a, "the pod itself")] {
            let answer = tcp_from(pod, to, 8080)?;
            ensure!(
                answer.as_deref() == Some(seen),
                "{what} → {to}:8080 was seen from {answer:?}, not {seen}"
            );
        }
    }
    // hostIP is honoured: 9090 only on 192.0.2.1.
    ensure!(tcp_from(&outside, NODE_V4, 9090)?.is_some());
    ensure!(
        tcp_from(&outside, other_v4, 9090)?.is_none(),
        "9090 is not on {other_v4}"
    );
    ensure!(
        tcp_from(&outside, NODE_V4, 8081)?.is_none(),
        "an unmapped port"
    );

    // CHECK sees the mappings, and a removed one.
    let check = Invocation::attach("CHECK", "hp-a", Some(a.path()));
    let mut with_prev = ports.clone();
    with_prev["prevResult"] = added.json.clone();
    let check_config = node.config("1.1.0", with_prev);
    node.invoke(&check, &check_config)?.ok()?;
    node.netns.run(&[
        "nft",
        "delete",
        "element",
        "inet",
        "weft-hostport",
        "any-v4",
        "{ udp . 5353 }",
    ])?;
    let failed = node.invoke(&check, &check_config)?;
    ensure!(failed.error_code() == Some(102), "{}", failed.error_msg());
    ensure!(
        failed.error_msg().contains("hostPort 5353/udp"),
        "{}",
        failed.error_msg()
    );

    // DEL removes exactly this pod's mappings.
    let del = node.invoke(
        &Invocation::attach("DEL", "hp-a", Some(a.path())),
        &node.config("1.1.0", ports.clone()),
    )?;
    del.ok()?;
    ensure!(elements(&node)?.is_empty(), "left: {}", elements(&node)?);
    ensure!(tcp_from(&outside, NODE_V4, 8080)?.is_none());
    Ok(())
}

#[test]
fn a_taken_host_port_is_refused_and_freed_by_del_or_gc() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("hpc")?;
    let (a, b, c) = (node.pod("a"), node.pod("b"), node.pod("c"));
    let port = mappings(json!([{ "hostPort": 8080, "containerPort": 80 }]));
    add(&node, "hpc-a", &a, &port)?.ok()?;
    let before = (node.snapshot()?, elements(&node)?);

    let refused = add(&node, "hpc-b", &b, &port)?;
    ensure!(refused.error_code() == Some(103), "{}", refused.error_msg());
    ensure!(
        refused.error_msg().contains("hostPort 8080/tcp"),
        "{}",
        refused.error_msg()
    );
    ensure!(
        (node.snapshot()?, elements(&node)?) == before,
        "the refused ADD changed something"
    );

    // Bad input is refused before any change, naming the entry and field.
    let bad = mappings(json!([{ "hostPort": 8080, "containerPort": 80, "protocol": "icmp" }]));
    let refused = add(&node, "hpc-b", &b, &bad)?;
    ensure!(refused.error_code() == Some(7), "{}", refused.error_msg());
    ensure!(
        refused.error_msg().contains("portMappings[0].protocol"),
        "{}",
        refused.error_msg()
    );

    node.del("hpc-a", Some(a.path()))?.ok()?;
    // The runtime passed no portMappings with that DEL, so the mapping stays
    // until GC; ADD already treats it as stale, its address being free.
    add(&node, "hpc-b", &b, &port)?.ok()?;
    add(
        &node,
        "hpc-c",
        &c,
        &mappings(json!([{ "hostPort": 9000, "containerPort": 80 }])),
    )?
    .ok()?;
    ensure!(elements(&node)?.contains("9000"), "{}", elements(&node)?);

    // GC keeps b's mapping and drops c's.
    let gc = json!({ "cni.dev/valid-attachments": [{ "containerID": "hpc-b", "ifname": "eth0" }] });
    node.invoke(&Invocation::verb("GC"), &node.config("1.1.0", gc))?
        .ok()
        .context("GC")?;
    let left = elements(&node)?;
    ensure!(left.contains("8080") && !left.contains("9000"), "{left}");
    Ok(())
}

#[test]
fn two_adds_racing_for_one_host_port_give_one_mapping_and_one_refusal() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("hpr")?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    let port = mappings(json!([{ "hostPort": 8080, "containerPort": 80 }]));
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| add(&node, "hpr-a", &a, &port));
        let second = scope.spawn(|| add(&node, "hpr-b", &b, &port));
        (first.join(), second.join())
    });
    let replies = [
        first.expect("ADD thread panicked")?,
        second.expect("ADD thread panicked")?,
    ];
    let codes: Vec<Option<u64>> = replies.iter().map(Reply::error_code).collect();
    ensure!(
        codes.contains(&None) && codes.contains(&Some(103)),
        "want one success and one refusal with code 103, got {codes:?}: {:?}",
        replies.iter().map(Reply::error_msg).collect::<Vec<_>>()
    );
    // The mappings point at the winner alone.
    let winner = &replies[codes.iter().position(Option::is_none).unwrap_or_default()];
    let winner_ips: Vec<String> = winner
        .addresses()
        .iter()
        .filter_map(|address| address.split('/').next().map(str::to_owned))
        .collect();
    let listed = elements(&node)?;
    ensure!(
        !listed.is_empty()
            && listed
                .lines()
                .all(|line| winner_ips.iter().any(|ip| line.contains(ip.as_str()))),
        "mappings {listed} should all point at {winner_ips:?}"
    );
    Ok(())
}
