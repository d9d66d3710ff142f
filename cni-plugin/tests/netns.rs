//! The `weft` binary run as a container runtime runs it, inside a node
//! namespace, against pod namespaces made with `ip netns add`. Needs root
//! (see `weft_testing::root_available`). The root namespace is never
//! touched.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddrV6, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::net::if_::if_nametoindex;
use serde_json::json;

use support::{ping, pod_addresses, Invocation, Node, Reply, NODE_V4, NODE_V6};
use weft_core::netns::Netns;
use weft_testing::{require_root, wait_for, TestNetns};

/// The address of an `address/len` as ADD reports it.
fn host(cidr: &str) -> &str {
    cidr.split('/').next().unwrap_or_default()
}

#[test]
fn two_pods_reach_each_other_the_node_and_the_outside_on_both_families() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("ping")?;
    let outside = node.uplink()?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    let reply_a = node.add("pod-a", &a)?.ok()?;
    let reply_b = node.add("pod-b", &b)?.ok()?;
    let (addrs_a, addrs_b) = (reply_a.addresses(), reply_b.addresses());
    ensure!(
        addrs_a.len() == 2 && addrs_b.len() == 2,
        "{addrs_a:?} {addrs_b:?}"
    );
    ensure!(
        pod_addresses(&a, "eth0")? == addrs_a,
        "pod a has what ADD reported"
    );

    for (from, to) in [(&a, &addrs_b), (&b, &addrs_a)] {
        for address in to {
            ensure!(ping(from, host(address))?, "ping {address} failed");
        }
    }
    for address in [NODE_V4, NODE_V6] {
        ensure!(ping(&a, address)?, "pod → node {address} failed");
    }
    for address in &addrs_a {
        ensure!(
            ping(&node.netns, host(address))?,
            "node → pod {address} failed"
        );
        ensure!(
            ping(&outside, host(address))?,
            "outside → pod {address} failed"
        );
    }
    let forwarding = node.netns.run(&["cat", "/proc/sys/net/ipv4/ip_forward"])?;
    ensure!(
        forwarding.trim() == "1",
        "forwarding on in the node namespace"
    );
    Ok(())
}

/// `ip -j` objects of `args` run in `netns`, as text (for messages and
/// simple matching).
fn listing(netns: &TestNetns, args: &[&str]) -> Result<Vec<String>> {
    Ok(netns
        .json(args)?
        .iter()
        .map(|object| object.to_string())
        .collect())
}

#[test]
fn add_wires_a_routed_veth_with_permanent_neighbours_and_no_bridge() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("wire")?;
    let a = node.pod("a");
    let added = node.add("wire-a", &a)?.ok()?;
    let result = &added.json;
    ensure!(
        added.addresses().len() == 2
            && added.addresses()[0].ends_with("/32")
            && added.addresses()[1].ends_with("/128"),
        "{result}"
    );
    ensure!(
        result["ips"][0]["gateway"] == "169.254.1.1" && result["ips"][1]["gateway"] == "fe80::1",
        "{result}"
    );
    ensure!(result["ips"][0]["interface"] == 1, "{result}");
    let interfaces = result["interfaces"].as_array().context("interfaces")?;
    ensure!(interfaces.len() == 2, "host veth and pod: {result}");
    let host_veth = interfaces[0]["name"].as_str().context("host veth")?;
    let host_mac = interfaces[0]["mac"].as_str().context("host MAC")?;
    let pod_mac = interfaces[1]["mac"].as_str().context("pod MAC")?;
    let addresses = added.addresses();
    let (v4, v6) = (host(&addresses[0]), host(&addresses[1]));

    // The node: no bridge, a host veth in none, up, with our alias.
    ensure!(
        !node.links()?.contains("weft0"),
        "no bridge: {:?}",
        node.links()?
    );
    let link = node
        .netns
        .json(&["ip", "-j", "-d", "link", "show", host_veth])?;
    let link = link.first().context("host veth listed")?;
    ensure!(
        link.get("master").is_none() && link["mtu"] == 1450,
        "{link}"
    );
    ensure!(
        link["ifalias"] == "weft:weftnet:wire-a:eth0"
            && link["flags"].to_string().contains("\"UP\""),
        "{link}"
    );
    // Routes to the pod's addresses alone into its veth, resolved by
    // permanent neighbours to the pod's MAC.
    let routes = listing(
        &node.netns,
        &["ip", "-j", "route", "show", "dev", host_veth],
    )?;
    ensure!(
        routes
            .iter()
            .any(|r| r.contains(&format!("\"dst\":\"{v4}\"")) && r.contains("\"scope\":\"link\"")),
        "{routes:?}"
    );
    let routes = listing(
        &node.netns,
        &["ip", "-j", "-6", "route", "show", "dev", host_veth],
    )?;
    ensure!(
        routes
            .iter()
            .any(|r| r.contains(&format!("\"dst\":\"{v6}\""))),
        "{routes:?}"
    );
    let neighbours = listing(
        &node.netns,
        &[
            "ip",
            "-j",
            "neigh",
            "show",
            "dev",
            host_veth,
            "nud",
            "permanent",
        ],
    )?;
    for ip in [v4, v6] {
        ensure!(
            neighbours
                .iter()
                .any(|n| n.contains(&format!("\"dst\":\"{ip}\""))
                    && n.contains(&format!("\"lladdr\":\"{pod_mac}\""))),
            "{ip} → {pod_mac}: {neighbours:?}"
        );
    }

    // The pod: its gateways on the link, resolved to the host veth's MAC.
    let routes = a.run(&["ip", "route", "show"])?;
    for line in [
        "default via 169.254.1.1 dev eth0",
        "169.254.1.1 dev eth0 scope link",
    ] {
        ensure!(routes.contains(line), "{line} in {routes}");
    }
    let routes = a.run(&["ip", "-6", "route", "show"])?;
    ensure!(routes.contains("default via fe80::1 dev eth0"), "{routes}");
    let neighbours = listing(
        &a,
        &[
            "ip",
            "-j",
            "neigh",
            "show",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    for gateway in ["169.254.1.1", "fe80::1"] {
        ensure!(
            neighbours
                .iter()
                .any(|n| n.contains(&format!("\"dst\":\"{gateway}\""))
                    && n.contains(&format!("\"lladdr\":\"{host_mac}\""))),
            "{gateway} → {host_mac}: {neighbours:?}"
        );
    }
    ensure!(
        a.run(&["ip", "link", "show", "lo"])?.contains("UP"),
        "lo is up"
    );
    ensure!(
        a.run(&["ip", "link", "show", "eth0"])?.contains("mtu 1450"),
        "pod MTU from the node file"
    );
    Ok(())
}

/// Waits up to five seconds on `socket` and returns every datagram that
/// arrived before `marker` (which ends the wait), or an error when the
/// marker never came.
fn received_before(socket: &UdpSocket, marker: &[u8]) -> Result<Vec<String>> {
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut before = Vec::new();
    let mut buffer = [0u8; 64];
    loop {
        let (length, from) = socket
            .recv_from(&mut buffer)
            .context("the unicast marker never arrived")?;
        if &buffer[..length] == marker {
            return Ok(before);
        }
        before.push(format!(
            "{:?} from {from}",
            String::from_utf8_lossy(&buffer[..length])
        ));
    }
}

#[test]
fn pods_share_no_link_broadcasts_and_link_local_stay_in_the_pod() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("l2")?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    node.add("l2-a", &a)?.ok()?;
    let b_addresses = node.add("l2-b", &b)?.ok()?.addresses();
    let (b_v4, b_v6) = (host(&b_addresses[0]), host(&b_addresses[1]));
    // Settled (not tentative), so it would answer if anything reached it.
    let b_link_local = wait_for(
        Duration::from_secs(10),
        "pod b's link-local address",
        || {
            Ok(b.json(&[
                "ip",
                "-j",
                "-6",
                "addr",
                "show",
                "dev",
                "eth0",
                "scope",
                "link",
                "-tentative",
            ])?
            .iter()
            .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
            .find_map(|address| address["local"].as_str().map(str::to_owned)))
        },
    )?;

    let in_netns = |netns: &TestNetns, bind: &str| -> Result<UdpSocket> {
        Ok(Netns::open(netns.path())?.run_here(|| UdpSocket::bind(bind))??)
    };
    let listen_v4 = in_netns(&b, "0.0.0.0:7001")?;
    let listen_v6 = in_netns(&b, "[::]:7002")?;
    let send_v4 = in_netns(&a, "0.0.0.0:0")?;
    send_v4.set_broadcast(true)?;
    let send_v6 = in_netns(&a, "[::]:0")?;
    let a_eth0 = Netns::open(a.path())?.run_here(|| if_nametoindex("eth0"))??;

    // IPv4: the limited and the slice's broadcast, then a unicast marker.
    for target in ["255.255.255.255:7001", "10.123.4.255:7001"] {
        // Refused locally or dropped on the way: either way it must not
        // arrive.
        let _ = send_v4.send_to(b"broadcast", target);
    }
    send_v4.send_to(b"marker", format!("{b_v4}:7001"))?;
    let leaked = received_before(&listen_v4, b"marker")?;
    ensure!(leaked.is_empty(), "pod b received {leaked:?}");

    // IPv6: b's link-local address and all nodes on a's link, then the
    // marker to b's routed address.
    let link_local = |address: &str| -> Result<SocketAddrV6> {
        Ok(SocketAddrV6::new(address.parse()?, 7002, 0, a_eth0))
    };
    for target in [link_local(&b_link_local)?, link_local("ff02::1")?] {
        let _ = send_v6.send_to(b"link-local", target);
    }
    send_v6.send_to(b"marker", format!("[{b_v6}]:7002"))?;
    let leaked = received_before(&listen_v6, b"marker")?;
    ensure!(leaked.is_empty(), "pod b received {leaked:?}");

    Ok(())
}

#[test]
fn fifty_concurrent_adds_get_fifty_distinct_addresses() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("conc")?;
    let pods: Vec<TestNetns> = (0..50).map(|i| node.pod(&format!("p{i}"))).collect();
    let config = node.config("1.1.0", json!({}));
    let containers: Vec<String> = (0..50).map(|i| format!("conc-{i}")).collect();
    let children = pods
        .iter()
        .zip(&containers)
        .map(|(pod, container)| {
            node.spawn(
                &Invocation::attach("ADD", container, Some(pod.path())),
                &config,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut addresses = BTreeSet::new();
    for child in children {
        let output = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        ensure!(output.status.success(), "ADD failed: {stdout}");
        let result: serde_json::Value = serde_json::from_str(&stdout)?;
        for ip in result["ips"].as_array().context("ips")? {
            addresses.insert(ip["address"].as_str().context("address")?.to_owned());
        }
    }
    ensure!(
        addresses.len() == 100,
        "50 IPv4 + 50 IPv6 distinct: {}",
        addresses.len()
    );
    ensure!(node.allocations()?.len() == 100, "100 allocations on disk");
    ensure!(node.host_veths()?.len() == 50, "50 host veths");
    Ok(())
}

#[test]
fn del_frees_the_address_and_the_veth_and_twice_is_fine() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("del")?;
    // A /30 has exactly one pod address, so reuse is observable.
    node.write_node_file(&["10.123.4.0/30"], 1450)?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    ensure!(node.add("del-a", &a)?.ok()?.addresses() == ["10.123.4.2/32"]);
    ensure!(node.host_veths()?.len() == 1);

    node.del("del-a", Some(a.path()))?.ok()?;
    ensure!(node.host_veths()?.is_empty(), "host veth removed");
    ensure!(node.allocations()?.is_empty(), "address released");
    ensure!(
        pod_addresses(&a, "eth0")?.is_empty(),
        "pod end gone with the pair"
    );
    node.del("del-a", Some(a.path()))?.ok()?;

    ensure!(
        node.add("del-b", &b)?.ok()?.addresses() == ["10.123.4.2/32"],
        "freed address reusable"
    );
    // A runtime may hand DEL a cached result it damaged; DEL does not need
    // it and still cleans up.
    node.invoke(
        &Invocation::attach("DEL", "del-b", Some(b.path())),
        &node.config(
            "1.1.0",
            json!({ "prevResult": { "ips": [{ "address": "x" }] } }),
        ),
    )?
    .ok()?;
    ensure!(
        node.host_veths()?.is_empty() && node.allocations()?.is_empty(),
        "DEL with a damaged prevResult cleaned up"
    );
    Ok(())
}

#[test]
fn del_succeeds_after_the_netns_is_gone_and_for_unknown_containers() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("gone")?;
    let a = node.pod("a");
    let path = a.path();
    node.add("gone-a", &a)?.ok()?;
    drop(a);
    node.del("gone-a", Some(path.clone()))?.ok()?;
    ensure!(
        node.host_veths()?.is_empty(),
        "host veth removed without the netns"
    );
    ensure!(
        node.allocations()?.is_empty(),
        "address released without the netns"
    );
    node.del("never-added", Some(path))?.ok()?;
    node.del("never-added", None)?.ok()?;

    let fresh = Node::without_node_file("gone2")?;
    fresh.del("never-added", None)?.ok()?;
    Ok(())
}

#[test]
fn check_passes_then_names_what_was_removed_by_hand() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("check")?;
    let a = node.pod("a");
    let added = node.add("check-a", &a)?.ok()?;
    let config = node.config("1.1.0", json!({ "prevResult": added.json }));
    let check = Invocation::attach("CHECK", "check-a", Some(a.path()));
    let ok = node.invoke(&check, &config)?.ok()?;
    ensure!(ok.stdout.is_empty(), "CHECK prints nothing on success");
    let host_veth = added.json["interfaces"][0]["name"]
        .as_str()
        .context("host veth")?
        .to_owned();
    let v4 = added.addresses()[0].clone();

    let fails_naming = |what: &str| -> Result<()> {
        let failed = node.invoke(&check, &config)?;
        ensure!(failed.error_code() == Some(102), "{failed:?}");
        ensure!(failed.error_msg().contains(what), "{}", failed.error_msg());
        Ok(())
    };
    // In the pod, then repaired by hand.
    a.run(&["ip", "route", "del", "default"])?;
    fails_naming("route 0.0.0.0/0 via 169.254.1.1 is missing from CNI_NETNS")?;
    a.run(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    node.invoke(&check, &config)?.ok()?;
    // On the node.
    node.netns
        .run(&["ip", "route", "del", &v4, "dev", &host_veth])?;
    fails_naming(&format!(
        "route {v4} dev {host_veth} is missing from the node"
    ))?;
    node.netns.run(&[
        "ip", "route", "add", &v4, "dev", &host_veth, "scope", "link",
    ])?;
    node.invoke(&check, &config)?.ok()?;
    a.run(&["ip", "neigh", "del", "fe80::1", "dev", "eth0"])?;
    fails_naming("permanent neighbour fe80::1 lladdr")?;
    Ok(())
}

#[test]
fn gc_frees_everything_not_in_valid_attachments() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("gc")?;
    let pods: Vec<TestNetns> = ["a", "b", "c"].iter().map(|p| node.pod(p)).collect();
    let mut kept = Vec::new();
    let mut kept_result = serde_json::Value::Null;
    for (pod, container) in pods.iter().zip(["gc-a", "gc-b", "gc-c"]) {
        let reply = node.add(container, pod)?.ok()?;
        if container == "gc-a" {
            kept = reply.addresses();
            kept_result = reply.json;
        }
    }
    let valid = json!({
        "cni.dev/valid-attachments": [{ "containerID": "gc-a", "ifname": "eth0" }],
    });
    node.invoke(&Invocation::verb("GC"), &node.config("1.1.0", valid))?
        .ok()?;
    let left: Vec<String> = node
        .allocations()?
        .into_iter()
        .map(|(ip, owner)| {
            ensure!(owner.starts_with("gc-a\n"), "{ip} still owned by {owner:?}");
            Ok(ip)
        })
        .collect::<Result<_>>()?;
    ensure!(
        left.len() == 2,
        "only gc-a's two addresses remain: {left:?}"
    );
    ensure!(node.host_veths()?.len() == 1, "only gc-a's veth remains");
    ensure!(pod_addresses(&pods[0], "eth0")? == kept, "gc-a untouched");
    let check = node.config("1.1.0", json!({ "prevResult": kept_result }));
    node.invoke(
        &Invocation::attach("CHECK", "gc-a", Some(pods[0].path())),
        &check,
    )?
    .ok()
    .context("gc-a is still wired as ADD left it")?;
    Ok(())
}

#[test]
fn status_is_50_until_the_node_file_exists() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::without_node_file("status")?;
    let config = node.config("1.1.0", json!({}));
    let not_ready = node.invoke(&Invocation::verb("STATUS"), &config)?;
    ensure!(
        not_ready.status == 50 && not_ready.error_code() == Some(50),
        "{not_ready:?}"
    );
    ensure!(
        not_ready.error_msg().contains("weft-agent"),
        "{}",
        not_ready.error_msg()
    );

    node.write_node_file(&["10.123.4.0/24"], 1450)?;
    let ready = node.invoke(&Invocation::verb("STATUS"), &config)?.ok()?;
    ensure!(ready.stdout.is_empty());
    Ok(())
}

/// Runs `invocation` and checks it fails with `code`, prints only spec error
/// JSON, and changes nothing on the node.
fn fails_without_change(
    node: &Node,
    invocation: &Invocation,
    stdin: &str,
    code: u64,
    mentions: &str,
) -> Result<Reply> {
    let before = node.snapshot()?;
    let reply = node.invoke(invocation, stdin)?;
    ensure!(reply.status != 0, "must exit non-zero: {reply:?}");
    ensure!(
        reply.error_code() == Some(code),
        "want code {code}: {reply:?}"
    );
    ensure!(
        reply.json["cniVersion"].is_string(),
        "error JSON has cniVersion"
    );
    ensure!(
        reply.error_msg().contains(mentions),
        "msg should name {mentions}: {}",
        reply.error_msg()
    );
    ensure!(
        node.snapshot()? == before,
        "host changed by a failed {invocation:?}"
    );
    Ok(reply)
}

#[test]
fn bad_input_gets_spec_errors_and_changes_nothing() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("bad")?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    node.add("bad-a", &a)?.ok()?;
    let config = node.config("1.1.0", json!({}));
    let add_b = Invocation::attach("ADD", "bad-b", Some(b.path()));

    fails_without_change(&node, &add_b, "{not json", 6, "JSON")?;
    fails_without_change(
        &node,
        &Invocation {
            command: None,
            ..add_b.clone()
        },
        &config,
        4,
        "CNI_COMMAND",
    )?;
    fails_without_change(
        &node,
        &Invocation {
            ifname: None,
            ..add_b.clone()
        },
        &config,
        4,
        "CNI_IFNAME",
    )?;
    let future = node.config("9.9.9", json!({}));
    fails_without_change(&node, &add_b, &future, 1, "cniVersion")?;
    let missing = Invocation::attach(
        "ADD",
        "bad-b",
        Some("/var/run/netns/wt-no-such-netns".into()),
    );
    fails_without_change(&node, &missing, &config, 4, "CNI_NETNS")?;
    let outside = node.config("1.1.0", json!({ "subnet": "10.200.0.0/24" }));
    fails_without_change(&node, &add_b, &outside, 7, "subnet")?;
    let taken = Invocation::attach("ADD", "bad-other", Some(a.path()));
    fails_without_change(&node, &taken, &config, 4, "CNI_IFNAME")?;
    let unknown_arg = Invocation {
        args: Some("FOO=bar"),
        ..add_b.clone()
    };
    fails_without_change(&node, &unknown_arg, &config, 4, "IgnoreUnknown")?;

    let waiting = Node::without_node_file("bad2")?;
    let c = waiting.pod("c");
    let add_c = Invocation::attach("ADD", "bad-c", Some(c.path()));
    fails_without_change(
        &waiting,
        &add_c,
        &waiting.config("1.1.0", json!({})),
        11,
        "weft-agent",
    )?;
    Ok(())
}

#[test]
fn exhausted_range_is_an_error_that_changes_nothing() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("full")?;
    node.write_node_file(&["10.123.4.0/30"], 1450)?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    node.add("full-a", &a)?.ok()?;
    let add_b = Invocation::attach("ADD", "full-b", Some(b.path()));
    fails_without_change(
        &node,
        &add_b,
        &node.config("1.1.0", json!({})),
        100,
        "no free address",
    )?;
    ensure!(
        b.output(&["ip", "link", "show", "eth0"])?.status.code() != Some(0),
        "no eth0 in pod b"
    );
    Ok(())
}

#[test]
fn result_is_rendered_in_the_config_version_and_chained() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("ver")?;
    let version = node.invoke(&Invocation::verb("VERSION"), "")?.ok()?;
    ensure!(
        version.json["supportedVersions"] == json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
        "{}",
        version.stdout
    );

    let cases = [
        ("0.3.1", true, false),
        ("1.0.0", false, false),
        ("1.1.0", false, true),
    ];
    for (i, (cni_version, ips_have_version, has_mtu)) in cases.into_iter().enumerate() {
        let pod = node.pod(&format!("v{i}"));
        let container = format!("ver-{i}");
        let reply = node
            .invoke(
                &Invocation::attach("ADD", &container, Some(pod.path())),
                &node.config(cni_version, json!({})),
            )?
            .ok()?;
        let result = &reply.json;
        ensure!(result["cniVersion"] == cni_version, "{result}");
        ensure!(
            result["ips"][0].get("version").is_some() == ips_have_version,
            "{result}"
        );
        ensure!(
            result["interfaces"][1].get("mtu").is_some() == has_mtu,
            "{result}"
        );
        ensure!(
            result["interfaces"][1]["sandbox"] == pod.path().as_str(),
            "{result}"
        );
        ensure!(result["ips"][0]["interface"] == 1, "{result}");
    }

    // In a conflist after another plugin, with runtime extras and CNI_ARGS.
    let pod = node.pod("chain");
    let prev = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{ "name": "earlier0" }],
        "ips": [{ "address": "192.0.2.7/24", "interface": 0 }],
    });
    let config = node.config(
        "1.1.0",
        json!({ "prevResult": prev, "runtimeConfig": { "mac": "0a:58:00:00:00:42" } }),
    );
    let invocation = Invocation {
        args: Some("IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=default;FOO=bar"),
        ..Invocation::attach("ADD", "ver-chain", Some(pod.path()))
    };
    let chained = node.invoke(&invocation, &config)?.ok()?.json;
    ensure!(chained["interfaces"][0]["name"] == "earlier0", "{chained}");
    ensure!(
        chained["interfaces"][2]["mac"] == "0a:58:00:00:00:42",
        "{chained}"
    );
    ensure!(chained["ips"][0]["address"] == "192.0.2.7/24", "{chained}");
    ensure!(chained["ips"][1]["interface"] == 2, "{chained}");
    // The node resolves the pod by the MAC the runtime asked for.
    let host_veth = chained["interfaces"][1]["name"]
        .as_str()
        .context("host veth")?;
    let neighbours = node.netns.run(&["ip", "neigh", "show", "dev", host_veth])?;
    ensure!(
        neighbours.contains("lladdr 0a:58:00:00:00:42 PERMANENT"),
        "{neighbours}"
    );
    Ok(())
}

#[test]
fn killed_adds_leak_nothing_and_double_assign_nothing() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("kill")?;
    let config = node.config("1.1.0", json!({}));
    // Warm up (forwarding on, binary in the page cache) so the kills land
    // in the per-pod work.
    let warm = node.pod("warm");
    node.add("kill-warm", &warm)?.ok()?;

    let rounds = 20;
    let pods: Vec<TestNetns> = (0..rounds).map(|i| node.pod(&format!("k{i}"))).collect();
    let containers: Vec<String> = (0..rounds).map(|i| format!("kill-{i}")).collect();
    for (i, (pod, container)) in pods.iter().zip(&containers).enumerate() {
        let mut child = node.spawn(
            &Invocation::attach("ADD", container, Some(pod.path())),
            &config,
        )?;
        // Spread the kills over the invocation's life, from before it
        // starts reading stdin to after it is done.
        std::thread::sleep(Duration::from_micros(600 * i as u64));
        let _ = child.kill();
        child.wait()?;
    }

    // No address has two owners, and an address configured in a pod is the
    // one IPAM records for that pod.
    let owners: BTreeMap<String, String> = node.allocations()?.into_iter().collect();
    for (pod, container) in pods.iter().zip(&containers) {
        for address in pod_addresses(pod, "eth0")? {
            let ip = address.split('/').next().unwrap_or_default();
            let owner = owners
                .get(ip)
                .with_context(|| format!("{ip} in {} is unrecorded", pod.name()))?;
            ensure!(
                owner.starts_with(&format!("{container}\n")),
                "{ip} in {container} belongs to {owner:?}"
            );
        }
    }

    // A retried ADD works and returns the address already recorded.
    let mut seen = BTreeSet::new();
    for (pod, container) in pods.iter().zip(&containers) {
        let recorded: Vec<String> = owners
            .iter()
            .filter(|(_, owner)| owner.starts_with(&format!("{container}\n")))
            .map(|(ip, _)| ip.clone())
            .collect();
        let reply = node.add(container, pod)?.ok()?;
        for address in reply.addresses() {
            let ip = address.split('/').next().unwrap_or_default().to_owned();
            // A kill between the two families' claims records only the
            // first, so compare per family.
            let same_family: Vec<&String> = recorded
                .iter()
                .filter(|r| r.contains(':') == ip.contains(':'))
                .collect();
            ensure!(
                same_family.is_empty() || same_family.contains(&&ip),
                "{container} got {ip}, had {recorded:?}"
            );
            ensure!(seen.insert(ip.clone()), "{ip} handed out twice");
        }
    }

    // DEL of everything, then GC, leave nothing behind.
    for (pod, container) in pods.iter().zip(&containers) {
        node.del(container, Some(pod.path()))?.ok()?;
    }
    node.del("kill-warm", Some(warm.path()))?.ok()?;
    let none_valid = node.config("1.1.0", json!({ "cni.dev/valid-attachments": [] }));
    node.invoke(&Invocation::verb("GC"), &none_valid)?.ok()?;
    ensure!(
        node.host_veths()?.is_empty(),
        "veths left: {:?}",
        node.host_veths()?
    );
    ensure!(
        node.allocations()?.is_empty(),
        "addresses left: {:?}",
        node.allocations()?
    );
    let leftovers: Vec<String> = std::fs::read_dir(node.ipam_dir())?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".tmp"))
        .collect();
    ensure!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    Ok(())
}

#[test]
fn an_endless_node_file_is_refused_quickly() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("zero")?;
    let a = node.pod("a");
    let config = node.config("1.1.0", json!({ "nodeFile": "/dev/zero" }));
    let started = std::time::Instant::now();
    let add = Invocation::attach("ADD", "zero-a", Some(a.path()));
    let refused = fails_without_change(&node, &add, &config, 7, "/dev/zero")?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    ensure!(
        refused.error_msg().contains("larger than 65536 bytes")
            && refused.error_msg().contains("point nodeFile at"),
        "{}",
        refused.error_msg()
    );
    let status = node.invoke(&Invocation::verb("STATUS"), &config)?;
    ensure!(
        status.error_code() == Some(50) && status.error_msg().contains("/dev/zero"),
        "{status:?}"
    );
    Ok(())
}

#[test]
fn the_plugins_own_netns_is_refused_and_nothing_changes() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("own")?;
    let a = node.pod("a");
    let added = node.add("own-a", &a)?.ok()?;
    let config = node.config("1.1.0", json!({}));
    // The node's namespace by its bind mount and by the plugin's /proc
    // entry: either way the pod would be wired on the node.
    for own in [node.netns.path(), "/proc/self/ns/net".to_owned()] {
        let add = Invocation::attach("ADD", "own-b", Some(own.clone()));
        let refused = fails_without_change(&node, &add, &config, 4, "CNI_NETNS")?;
        ensure!(
            refused
                .error_msg()
                .contains(&format!("{own} is the network namespace weft runs in")),
            "{}",
            refused.error_msg()
        );
    }
    let with_prev = node.config("1.1.0", json!({ "prevResult": added.json }));
    let check = Invocation::attach("CHECK", "own-a", Some(node.netns.path()));
    fails_without_change(&node, &check, &with_prev, 4, "CNI_NETNS")?;
    Ok(())
}

#[test]
fn after_a_slice_change_new_pods_get_it_and_old_ones_keep_working() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("slice")?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    let old = node.add("slice-a", &a)?.ok()?.addresses();
    node.write_node_file(&["10.123.5.0/24", "fd12:3:4:6::/64"], 1450)?;
    let new = node.add("slice-b", &b)?.ok()?.addresses();
    ensure!(
        new.iter()
            .all(|a| a.starts_with("10.123.5.") || a.starts_with("fd12:3:4:6:")),
        "{new:?}"
    );
    for (from, to) in [(&a, &new), (&b, &old)] {
        for address in to {
            ensure!(ping(from, host(address))?, "ping {address} failed");
        }
    }
    Ok(())
}

#[test]
fn a_node_file_with_an_unusable_slice_is_refused_and_changes_nothing() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("refuse")?;
    let _outside = node.uplink()?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    node.add("refuse-a", &a)?.ok()?;
    let add_b = Invocation::attach("ADD", "refuse-b", Some(b.path()));
    let config = node.config("1.1.0", json!({}));
    for (slices, problem) in [
        (["0.0.0.0/0", "fd12:3:4:5::/64"], "is /0"),
        (["10.123.4.0/24", "::/0"], "is /0"),
        (["127.0.0.0/24", "fd12:3:4:5::/64"], "loopback"),
        (["169.254.0.0/24", "fd12:3:4:5::/64"], "link-local"),
        (["10.123.4.0/24", "fe80::/64"], "link-local"),
        (["224.1.0.0/24", "fd12:3:4:5::/64"], "multicast"),
        (["10.123.4.0/24", "ff05::/64"], "multicast"),
        (["0.0.0.0/24", "fd12:3:4:5::/64"], "unspecified"),
        // The node's own network on its uplink.
        (["192.0.2.0/26", "fd12:3:4:5::/64"], "192.0.2.1/24 on up0"),
        (
            ["10.123.4.0/24", "2001:db8:7::/64"],
            "2001:db8:7::1/64 on up0",
        ),
    ] {
        // In cluster CIDRs of their own, which the node file requires.
        node.write_node_file_in(&slices, &slices, 1450)?;
        let refused = fails_without_change(&node, &add_b, &config, 7, problem)?;
        ensure!(
            refused.error_msg().contains("field \"podCidrs\"")
                && refused.error_msg().contains("--cluster-cidr"),
            "{}",
            refused.error_msg()
        );
        ensure!(
            b.output(&["ip", "link", "show", "eth0"])?.status.code() != Some(0),
            "no eth0 in pod b"
        );
        let status = node.invoke(&Invocation::verb("STATUS"), &config)?;
        ensure!(
            status.error_code() == Some(50) && status.error_msg().contains(problem),
            "{status:?}"
        );
    }
    Ok(())
}

#[test]
fn wefts_own_devices_are_not_the_underlay() -> Result<()> {
    require_root!("creating network namespaces");
    let node = Node::new("own-dev")?;
    // The VXLAN device with the slice's network address as its VTEP, and
    // the bridge of nodes attached by the bridge design with the first host.
    node.netns.run(&[
        "ip", "link", "add", "weft.1", "type", "vxlan", "id", "1", "dstport", "8472",
    ])?;
    node.netns
        .run(&["ip", "addr", "add", "10.123.4.0/32", "dev", "weft.1"])?;
    node.netns
        .run(&["ip", "link", "add", "weft0", "type", "bridge"])?;
    node.netns
        .run(&["ip", "addr", "add", "10.123.4.1/24", "dev", "weft0"])?;
    let (a, b) = (node.pod("a"), node.pod("b"));
    node.add("own-dev-a", &a)?.ok()?;
    let b_addresses = node.add("own-dev-b", &b)?.ok()?.addresses();
    ensure!(ping(&a, host(&b_addresses[0]))?, "pods reach each other");
    node.invoke(
        &Invocation::verb("STATUS"),
        &node.config("1.1.0", json!({})),
    )?
    .ok()?;
    Ok(())
}
