//! Network-namespace integration tests of the agent's data plane, without an
//! API server: two or three "nodes" (namespaces joined by veths to a fabric
//! bridge namespace) programmed through the same `Dataplane` the agent uses,
//! verified by `ip`/`bridge` dumps and by pings through the tunnel.
//!
//! Needs root (see `weft_testing::root_available`). Every namespace is
//! removed on success and on failure (drop guards).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ipnet::IpNet;
use serde_json::Value;
use weft_agent::config::{AgentConfig, AgentSettings, Backend};
use weft_agent::dataplane::{
    ApplyReport, Dataplane, DataplaneError, ForeignRoute, OwnSliceChange, OwnSlices, RouteConflict,
    RoutePlan, Vtep, VXLAN_DEVICE,
};
use weft_agent::install::{
    install_conflist, install_plugin, render_conflist, CONFLIST_NAME, PLUGIN_NAME,
};
use weft_agent::masquerade::{MasqueradeTable, TableChange};
use weft_agent::node::OwnNode;
use weft_agent::offload::{set_tx_checksum, tx_checksum};
use weft_agent::overlay::{
    desired_state, DesiredState, EntryOwners, FdbEntry, Neighbour, NextHop, Operation, OverlayRoute,
};
use weft_agent::peer::{LocalNode, Peer};
use weft_agent::uninstall::{tear_down, TeardownReport};
use weft_core::netlink::{Netlink, RouteProtocol, RouteType, VxlanChange};
use weft_core::netns::Netns;
use weft_core::DEFAULT_BRIDGE;
use weft_testing::{require_root, wait_for, TestNetns};

#[path = "testbed/fabric.rs"]
mod fabric;

use fabric::{
    local, mac, namespace, peer, return_path, routed_pod, slice, underlay_ip, vtep, vtep_dataplane,
    Fabric,
};

fn desired(backend: Backend, node: usize, peers: &[usize]) -> DesiredState {
    let peers: Vec<Peer> = peers.iter().map(|&p| peer(p)).collect();
    desired_state(backend, &local(node), &peers)
}

/// `proto 87` IPv4 peer routes (not the own slices' unreachable ones) as
/// "dst via gateway dev" lines, sorted.
fn weft_routes(namespace: &TestNetns) -> Result<Vec<String>> {
    let mut routes: Vec<String> = namespace
        .json(&[
            "ip", "-j", "route", "show", "proto", "87", "type", "unicast",
        ])?
        .iter()
        .map(|r| {
            format!(
                "{} via {} dev {}{}",
                r["dst"].as_str().unwrap_or("?"),
                r["gateway"].as_str().unwrap_or("-"),
                r["dev"].as_str().unwrap_or("?"),
                if r["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "onlink"))
                {
                    " onlink"
                } else {
                    ""
                }
            )
        })
        .collect();
    routes.sort();
    Ok(routes)
}

fn weft_neighbours(namespace: &TestNetns) -> Result<Vec<String>> {
    let mut found: Vec<String> = namespace
        .json(&[
            "ip",
            "-j",
            "neigh",
            "show",
            "dev",
            VXLAN_DEVICE,
            "nud",
            "permanent",
        ])?
        .iter()
        .map(|n| {
            format!(
                "{} {}",
                n["dst"].as_str().unwrap_or("?"),
                n["lladdr"].as_str().unwrap_or("?")
            )
        })
        .collect();
    found.sort();
    Ok(found)
}

fn weft_fdb(namespace: &TestNetns) -> Result<Vec<String>> {
    let mut found: Vec<String> = namespace
        .json(&["bridge", "-j", "fdb", "show", "dev", VXLAN_DEVICE])?
        .iter()
        .filter(|f| f.get("dst").is_some())
        .map(|f| {
            format!(
                "{} {}",
                f["mac"].as_str().unwrap_or("?"),
                f["dst"].as_str().unwrap_or("?")
            )
        })
        .collect();
    found.sort();
    Ok(found)
}

fn ping(namespace: &TestNetns, target: &str) -> bool {
    namespace
        .run(&["ping", "-c", "1", "-W", "2", target])
        .is_ok()
}

#[tokio::test]
async fn vxlan_peers_are_programmed_in_order_and_carry_traffic() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("vx", 3)?;
    let mut planes = Vec::new();
    for (i, node) in fabric.nodes.iter().enumerate() {
        let (plane, change) = vtep_dataplane(node, i, 1).await?;
        ensure!(change == VxlanChange::Created, "node {i}: {change:?}");
        planes.push(plane);
    }
    for (i, plane) in planes.iter().enumerate() {
        let others: Vec<usize> = (0..3).filter(|&p| p != i).collect();
        let report = plane
            .reconcile(&desired(Backend::Vxlan, i, &others))
            .await?;
        ensure!(report.failed.is_empty(), "{:?}", report.failed);
        ensure!(
            report.applied.len() == 8,
            "2 peers x (neighbour, fdb, route, return route): {:?}",
            report.applied
        );
    }

    let node0 = &fabric.nodes[0];
    assert_eq!(
        weft_routes(node0)?,
        vec![
            "10.244.1.0/24 via 10.244.1.0 dev weft.1 onlink",
            "10.244.2.0/24 via 10.244.2.0 dev weft.1 onlink"
        ]
    );
    assert_eq!(
        weft_neighbours(node0)?,
        vec![
            "10.244.1.0 0a:58:00:00:00:02",
            "10.244.2.0 0a:58:00:00:00:03"
        ]
    );
    assert_eq!(
        weft_fdb(node0)?,
        vec![
            "0a:58:00:00:00:02 172.31.0.11",
            "0a:58:00:00:00:03 172.31.0.12"
        ]
    );
    let link = &node0.json(&["ip", "-j", "-d", "link", "show", VXLAN_DEVICE])?[0];
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(info["id"], 1);
    assert_eq!(info["port"], 8472);
    assert_eq!(info["local"], "172.31.0.10");
    assert_eq!(info["learning"], false);
    assert_eq!(link["mtu"], 1450);
    assert_eq!(link["address"], "0a:58:00:00:00:01");

    // Through the tunnel: node 0 to the VTEP addresses of nodes 1 and 2.
    assert!(
        ping(node0, "10.244.1.0"),
        "node 0 cannot reach node 1 over vxlan"
    );
    assert!(
        ping(node0, "10.244.2.0"),
        "node 0 cannot reach node 2 over vxlan"
    );
    Ok(())
}

#[tokio::test]
async fn stale_entries_and_foreign_routes_are_handled() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("st", 1)?;
    let node = &fabric.nodes[0];
    let (plane, _) = vtep_dataplane(node, 0, 1).await?;
    plane
        .reconcile(&desired(Backend::Vxlan, 0, &[1, 2, 3]))
        .await?;
    // Left by an earlier run (our protocol) and by someone else (boot).
    node.run(&[
        "ip",
        "route",
        "add",
        "10.244.9.0/24",
        "via",
        "172.31.0.99",
        "proto",
        "87",
    ])?;
    node.run(&["ip", "route", "add", "10.99.0.0/24", "via", "172.31.0.98"])?;

    let report = plane.reconcile(&desired(Backend::Vxlan, 0, &[1])).await?;
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        weft_routes(node)?,
        vec!["10.244.1.0/24 via 10.244.1.0 dev weft.1 onlink"]
    );
    assert_eq!(weft_neighbours(node)?, vec!["10.244.1.0 0a:58:00:00:00:02"]);
    assert_eq!(weft_fdb(node)?, vec!["0a:58:00:00:00:02 172.31.0.11"]);
    ensure!(
        node.run(&["ip", "route", "show", "10.99.0.0/24"])?
            .contains("172.31.0.98"),
        "a route Weft does not own was touched"
    );
    Ok(())
}

/// A route goes in only after its VTEP's neighbour and FDB entry: when the
/// kernel refuses one of those, the route through that VTEP is held back
/// (it would lead nowhere) and every other peer is programmed in full.
#[tokio::test]
async fn routes_through_a_refused_vtep_are_held_back() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("hb", 1)?;
    let node = &fabric.nodes[0];
    let (plane, _) = vtep_dataplane(node, 0, 1).await?;
    let vtep_ip = |peer: usize| slice(peer).network();
    let route = |peer: usize| {
        Operation::SetRoute(OverlayRoute {
            destination: slice(peer),
            next_hop: NextHop::Vtep(vtep_ip(peer)),
        })
    };
    // An IPv4 VTEP cannot send to an IPv6 remote: the kernel answers
    // EAFNOSUPPORT to peer 2's FDB entry.
    let refused = FdbEntry {
        mac: mac(2),
        remote: "fd00:31::12".parse()?,
    };
    let operations: Vec<Operation> = [1, 2]
        .map(|peer| {
            Operation::SetNeighbour(Neighbour {
                ip: vtep_ip(peer),
                mac: mac(peer),
            })
        })
        .into_iter()
        .chain([
            Operation::SetFdb(FdbEntry {
                mac: mac(1),
                remote: underlay_ip(1),
            }),
            Operation::SetFdb(refused),
            route(1),
            route(2),
        ])
        .collect();

    let report = plane
        .apply(&RoutePlan {
            operations,
            ..RoutePlan::default()
        })
        .await?;
    let failed: Vec<Operation> = report.failed.iter().map(|(op, _)| *op).collect();
    assert_eq!(failed, vec![Operation::SetFdb(refused)]);
    assert_eq!(report.held_back, vec![route(2)]);
    assert_eq!(report.applied.len(), 4, "{:?}", report.applied);
    assert_eq!(
        weft_routes(node)?,
        vec!["10.244.1.0/24 via 10.244.1.0 dev weft.1 onlink"]
    );
    assert_eq!(weft_fdb(node)?, vec!["0a:58:00:00:00:02 172.31.0.11"]);
    Ok(())
}

#[tokio::test]
async fn drift_is_repaired_and_a_second_run_changes_nothing() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("dr", 1)?;
    let node = &fabric.nodes[0];
    let wanted = desired(Backend::Vxlan, 0, &[1, 2]);
    let (plane, _) = vtep_dataplane(node, 0, 1).await?;
    plane.reconcile(&wanted).await?;
    let before = (weft_routes(node)?, weft_neighbours(node)?, weft_fdb(node)?);
    let index_before =
        node.json(&["ip", "-j", "link", "show", VXLAN_DEVICE])?[0]["ifindex"].clone();

    node.run(&["ip", "route", "del", "10.244.2.0/24"])?;
    node.run(&["ip", "neigh", "del", "10.244.1.0", "dev", VXLAN_DEVICE])?;
    let report = plane.reconcile(&wanted).await?;
    ensure!(report.applied.len() == 2, "repairs: {:?}", report.applied);
    assert_eq!(
        (weft_routes(node)?, weft_neighbours(node)?, weft_fdb(node)?),
        before
    );

    // A restarted agent: a fresh socket, same settings.
    let (restarted, change) = vtep_dataplane(node, 0, 1).await?;
    assert_eq!(change, VxlanChange::Reused);
    let report = restarted.reconcile(&wanted).await?;
    ensure!(
        report.applied.is_empty(),
        "an idempotent run changed {:?}",
        report.applied
    );
    let index_after = node.json(&["ip", "-j", "link", "show", VXLAN_DEVICE])?[0]["ifindex"].clone();
    assert_eq!(index_before, index_after, "the device was recreated");
    assert_eq!(
        (weft_routes(node)?, weft_neighbours(node)?, weft_fdb(node)?),
        before
    );
    Ok(())
}

#[tokio::test]
async fn changed_settings_recreate_the_device_with_the_same_mac() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("re", 1)?;
    let node = &fabric.nodes[0];
    vtep_dataplane(node, 0, 1).await?;
    let (_, change) = vtep_dataplane(node, 0, 7).await?;
    assert_eq!(change, VxlanChange::Recreated);
    let link = &node.json(&["ip", "-j", "-d", "link", "show", VXLAN_DEVICE])?[0];
    assert_eq!(link["linkinfo"]["info_data"]["id"], 7);
    assert_eq!(link["address"], "0a:58:00:00:00:01");
    let addresses = node.json(&["ip", "-j", "-4", "addr", "show", "dev", VXLAN_DEVICE])?;
    assert_eq!(addresses[0]["addr_info"][0]["local"], "10.244.0.0");
    Ok(())
}

#[tokio::test]
async fn host_gw_routes_via_the_peer_address_and_carry_traffic() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("hg", 2)?;
    for (i, node) in fabric.nodes.iter().enumerate() {
        // Stands in for a pod on the node.
        node.run(&[
            "ip",
            "addr",
            "add",
            &format!("10.244.{i}.5/32"),
            "dev",
            "lo",
        ])?;
        let plane = Dataplane::new(Netlink::in_netns(&Netns::open(node.path())?)?);
        let report = plane
            .reconcile(&desired(Backend::HostGw, i, &[1 - i]))
            .await?;
        ensure!(report.failed.is_empty(), "{:?}", report.failed);
    }
    let node0 = &fabric.nodes[0];
    assert_eq!(
        weft_routes(node0)?,
        vec!["10.244.1.0/24 via 172.31.0.11 dev eth0"]
    );
    assert!(
        node0.run(&["ip", "link", "show", VXLAN_DEVICE]).is_err(),
        "host-gw made a vxlan device"
    );
    assert!(
        ping(node0, "10.244.1.5"),
        "node 0 cannot reach node 1's slice via host-gw"
    );
    Ok(())
}

#[tokio::test]
async fn masquerade_table_is_applied_kept_and_restored() -> Result<()> {
    require_root!("creating network namespaces");
    let node = namespace("nft")?;
    let netns = Netns::open(node.path())?;
    let cluster: Vec<IpNet> = vec!["10.244.0.0/16".parse()?, "fd00:10:244::/56".parse()?];
    let exempt: Vec<IpNet> = vec!["192.168.0.0/16".parse()?];
    let mut table = MasqueradeTable::new(&cluster, &exempt, None);

    assert_eq!(netns.run_in(|| table.ensure())??, TableChange::Replaced);
    assert_eq!(netns.run_in(|| table.ensure())??, TableChange::Unchanged);

    let listing = node.run(&["nft", "-j", "list", "table", "inet", "weft"])?;
    let parsed: Value = serde_json::from_str(&listing)?;
    let items = parsed["nftables"].as_array().context("nftables array")?;
    let chain = items
        .iter()
        .find_map(|i| i.get("chain"))
        .context("no chain in the table")?;
    assert_eq!(chain["hook"], "postrouting");
    assert_eq!(chain["type"], "nat");
    let rules: Vec<&Value> = items.iter().filter_map(|i| i.get("rule")).collect();
    assert_eq!(
        rules.len(),
        3,
        "kube-proxy exemption + one masquerade rule per family"
    );
    let text = listing.to_string();
    assert!(text.contains("\"masquerade\""), "{text}");
    assert!(text.contains("fully-random"), "{text}");
    let sets: Vec<&Value> = items.iter().filter_map(|i| i.get("set")).collect();
    assert_eq!(sets.len(), 2);

    // Removed (or edited) by someone: the next ensure puts it back.
    node.run(&["nft", "delete", "table", "inet", "weft"])?;
    assert_eq!(netns.run_in(|| table.ensure())??, TableChange::Replaced);
    node.run(&["nft", "flush", "chain", "inet", "weft", "postrouting"])?;
    assert_eq!(netns.run_in(|| table.ensure())??, TableChange::Replaced);
    assert!(node
        .run(&["nft", "list", "table", "inet", "weft"])?
        .contains("masquerade"));
    Ok(())
}

#[tokio::test]
async fn tx_checksum_offload_can_be_turned_off_on_the_vtep() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("cs", 1)?;
    let node = &fabric.nodes[0];
    vtep_dataplane(node, 0, 1).await?;
    let netns = Netns::open(node.path())?;
    netns.run_in(|| set_tx_checksum(VXLAN_DEVICE, false))??;
    assert!(!netns.run_in(|| tx_checksum(VXLAN_DEVICE))??);
    let features = node.run(&["ip", "-d", "link", "show", VXLAN_DEVICE])?;
    ensure!(features.contains("vxlan"), "{features}");
    netns.run_in(|| set_tx_checksum(VXLAN_DEVICE, true))??;
    assert!(netns.run_in(|| tx_checksum(VXLAN_DEVICE))??);
    Ok(())
}

/// A child process killed and reaped on drop.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on 127.0.0.1:9465 inside the namespace; `None` while nothing
/// listens.
fn http_get(netns: &Netns, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let request = format!("GET {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n");
    netns
        .run_in(move || -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect("127.0.0.1:9465")?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .ok()?
        .ok()
}

#[tokio::test]
async fn agent_without_an_api_server_leaves_the_data_plane_alone() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("api", 1)?;
    let node = &fabric.nodes[0];
    // What an earlier agent run programmed.
    let (plane, _) = vtep_dataplane(node, 0, 1).await?;
    plane
        .reconcile(&desired(Backend::Vxlan, 0, &[1, 2]))
        .await?;
    let before = (weft_routes(node)?, weft_neighbours(node)?, weft_fdb(node)?);

    // Nothing listens on port 1 of the node's loopback.
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster:\n    server: https://127.0.0.1:1\n    insecure-skip-tls-verify: true\ncontexts:\n- name: gone\n  context:\n    cluster: gone\n    user: nobody\ncurrent-context: gone\nusers:\n- name: nobody\n  user:\n    token: none\n",
    )?;
    let log = dir.path().join("agent.log");
    let agent = node
        .command(env!("CARGO_BIN_EXE_weft-agent"))
        .args(["--node-name", "node-0", "--cluster-cidr", "10.244.0.0/16"])
        .arg("--metrics-address=127.0.0.1:9465")
        .arg("--cni-bin-dir")
        .arg(dir.path().join("bin"))
        .arg("--cni-conf-dir")
        .arg(dir.path().join("net.d"))
        .arg("--node-file")
        .arg(dir.path().join("node.json"))
        .env("KUBECONFIG", &kubeconfig)
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let _agent = Running(agent);

    let netns = Netns::open(node.path())?;
    wait_for(
        Duration::from_secs(60),
        "the agent to try the API server",
        || {
            Ok(std::fs::read_to_string(&log)?
                .contains("watching nodes failed")
                .then_some(()))
        },
    )
    .with_context(|| {
        format!(
            "the agent never tried the API server: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    let healthz = http_get(&netns, "/healthz").context("no /healthz")?;
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    let readyz = http_get(&netns, "/readyz").context("no /readyz")?;
    assert!(
        readyz.starts_with("HTTP/1.1 503"),
        "ready without ever programming: {readyz}"
    );
    assert_eq!(
        (weft_routes(node)?, weft_neighbours(node)?, weft_fdb(node)?),
        before
    );
    Ok(())
}

#[tokio::test]
async fn dual_stack_slices_share_one_tunnel() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("ds", 2)?;
    let slice_v6 = |node: usize| -> IpNet { format!("fd00:10:244:{node}::/64").parse().unwrap() };
    for (i, node) in fabric.nodes.iter().enumerate() {
        let netlink = Netlink::in_netns(&Netns::open(node.path())?)?;
        let eth0 = netlink.link_by_name("eth0").await?.context("eth0")?;
        let mut plane = Dataplane::new(netlink);
        plane
            .ensure_vtep(&Vtep {
                underlay_index: eth0.index,
                addresses: vec![
                    IpNet::new(slice(i).network(), 32)?,
                    IpNet::new(slice_v6(i).network(), 128)?,
                ],
                ..vtep(i, 1)
            })
            .await?;
        let local = LocalNode {
            pod_cidrs: vec![slice(i), slice_v6(i)],
            ..local(i)
        };
        let other = Peer {
            pod_cidrs: vec![slice(1 - i), slice_v6(1 - i)],
            ..peer(1 - i)
        };
        let report = plane
            .reconcile(&desired_state(Backend::Vxlan, &local, &[other]))
            .await?;
        ensure!(report.failed.is_empty(), "{:?}", report.failed);
    }
    let node0 = &fabric.nodes[0];
    let routes = node0.run(&["ip", "-6", "route", "show", "proto", "87"])?;
    ensure!(
        routes.contains("fd00:10:244:1::/64 via fd00:10:244:1:: dev weft.1"),
        "{routes}"
    );
    assert_eq!(
        weft_neighbours(node0)?,
        vec![
            "10.244.1.0 0a:58:00:00:00:02",
            "fd00:10:244:1:: 0a:58:00:00:00:02"
        ]
    );
    // One FDB entry carries both families.
    assert_eq!(weft_fdb(node0)?, vec!["0a:58:00:00:00:02 172.31.0.11"]);
    assert!(ping(node0, "fd00:10:244:1::"), "no IPv6 through the tunnel");
    assert!(ping(node0, "10.244.1.0"), "no IPv4 through the tunnel");
    Ok(())
}

/// Runs the uninstall teardown inside `namespace` (netlink and `nft` both
/// act on the calling thread's namespace, so it gets a thread of its own).
fn tear_down_in(namespace: &TestNetns, config: &AgentConfig) -> Result<TeardownReport> {
    let netns = Netns::open(namespace.path())?;
    netns.run_in(|| -> Result<TeardownReport> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let netlink = Netlink::current()?;
            Ok(tear_down(&netlink, config).await)
        })
    })?
}

fn link_names(namespace: &TestNetns) -> Result<Vec<String>> {
    Ok(namespace
        .json(&["ip", "-j", "link", "show"])?
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect())
}

#[tokio::test]
async fn uninstall_teardown_removes_only_what_weft_owns() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("un", 2)?;
    let node = &fabric.nodes[0];
    let files = tempfile::tempdir()?;
    let source = files.path().join("weft-build");
    std::fs::write(&source, b"\x7fELF weft plugin")?;
    let config = AgentSettings {
        slices: weft_daemon::slices::SliceSettings {
            cluster_cidr: Some("10.244.0.0/16".parse()?),
            cluster_cidr_v6: Some("fd00:10:244::/56".parse()?),
            ..Default::default()
        },
        cni_bin_dir: Some(files.path().join("bin")),
        cni_conf_dir: Some(files.path().join("net.d")),
        cni_plugin_source: Some(source.clone()),
        node_file: Some(files.path().join("run/node.json")),
        ..AgentSettings::default()
    }
    .resolve(&files.path().join("weft-agent"))?;

    // A programmed node: weft.1 with a peer (neighbour, FDB, route), an IPv6
    // proto-87 route, weft0, the nft table and the node's files.
    let (dataplane, _) = vtep_dataplane(node, 0, 1).await?;
    let report = dataplane
        .reconcile(&desired(Backend::Vxlan, 0, &[1]))
        .await?;
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    node.run(&[
        "ip",
        "addr",
        "add",
        "fd00:31::10/64",
        "dev",
        "eth0",
        "nodad",
    ])?;
    node.run(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd00:10:244:1::/64",
        "via",
        "fd00:31::11",
        "dev",
        "eth0",
        "proto",
        "87",
    ])?;
    node.run(&["ip", "link", "add", DEFAULT_BRIDGE, "type", "bridge"])?;
    let mut table = MasqueradeTable::new(&config.cluster_cidrs, &[], None);
    Netns::open(node.path())?.run_in(|| table.ensure())??;
    install_plugin(&config.cni_plugin_source, &config.cni_bin_dir)?;
    install_conflist(&config.cni_conf_dir, &render_conflist(&config.node_file))?;
    std::fs::create_dir_all(files.path().join("run"))?;
    std::fs::write(&config.node_file, "{}")?;
    // What is not Weft's: a link, a route, an nft table and a conflist.
    node.run(&["ip", "link", "add", "other0", "type", "bridge"])?;
    node.run(&[
        "ip",
        "route",
        "add",
        "192.0.2.0/24",
        "via",
        "172.31.0.11",
        "proto",
        "static",
    ])?;
    node.run(&["nft", "add", "table", "inet", "other"])?;
    let other_conflist = config.cni_conf_dir.join("20-other.conflist");
    std::fs::write(&other_conflist, "{}")?;
    ensure!(!weft_routes(node)?.is_empty() && !weft_fdb(node)?.is_empty());
    ensure!(return_path(node)?.len() == 2, "{:?}", return_path(node)?);

    let report = tear_down_in(node, &config)?;
    ensure!(report.errors.is_empty(), "{:?}", report.errors);
    ensure!(report.kept.is_empty(), "{:?}", report.kept);
    let links = link_names(node)?;
    ensure!(
        !links
            .iter()
            .any(|l| l == VXLAN_DEVICE || l == DEFAULT_BRIDGE),
        "Weft links left: {links:?}"
    );
    ensure!(
        node.run(&["ip", "-4", "route", "show", "proto", "87"])?
            .trim()
            .is_empty()
            && node
                .run(&["ip", "-6", "route", "show", "proto", "87"])?
                .trim()
                .is_empty(),
        "proto 87 routes left"
    );
    // The peer's return route and the own slice's rule went with them.
    let left = return_path(node)?;
    ensure!(left.is_empty(), "return path left: {left:?}");
    let tables = node.run(&["nft", "list", "tables"])?;
    ensure!(!tables.contains("inet weft"), "nft table left: {tables}");
    for path in [
        config.cni_conf_dir.join(CONFLIST_NAME),
        config.cni_bin_dir.join(PLUGIN_NAME),
        config.node_file.clone(),
    ] {
        ensure!(!path.exists(), "{} left", path.display());
    }
    // Untouched.
    ensure!(links.iter().any(|l| l == "other0") && links.iter().any(|l| l == "eth0"));
    ensure!(node
        .run(&["ip", "route", "show", "192.0.2.0/24"])?
        .contains("via 172.31.0.11"));
    ensure!(tables.contains("inet other"), "{tables}");
    ensure!(other_conflist.exists() && source.exists());

    // Again: nothing left to do. A `weft` binary that is not the agent's
    // copy stays.
    std::fs::write(config.cni_bin_dir.join(PLUGIN_NAME), b"someone else's weft")?;
    let again = tear_down_in(node, &config)?;
    ensure!(
        again.removed.is_empty() && again.errors.is_empty(),
        "second teardown did something: {again:?}"
    );
    ensure!(again.kept.len() == 1, "{:?}", again.kept);
    ensure!(config.cni_bin_dir.join(PLUGIN_NAME).exists());
    Ok(())
}

fn slice_v6(node: usize) -> IpNet {
    format!("fd00:10:244:{node}::/64").parse().unwrap()
}

/// The agent's settings for these tests: `cluster` cut into /24s, and
/// fd00:10:244::/56 into /64s.
fn agent_config(cluster: &str) -> Result<AgentConfig> {
    Ok(AgentSettings {
        slices: weft_daemon::slices::SliceSettings {
            cluster_cidr: Some(cluster.parse()?),
            cluster_cidr_v6: Some("fd00:10:244::/56".parse()?),
            ..Default::default()
        },
        ..AgentSettings::default()
    }
    .resolve(std::path::Path::new("/weft-agent"))?)
}

/// `slices` as node-0's own, checked as the agent checks them against the
/// addresses in `plane`'s namespace.
async fn own_slices(plane: &Dataplane, slices: &[IpNet]) -> Result<OwnSlices> {
    let own = OwnNode {
        pod_cidrs: slices.to_vec(),
        ..OwnNode::default()
    };
    Ok(plane
        .check_own_slices(&agent_config("10.244.0.0/16")?, "node-0", &own)
        .await?)
}

/// One reconcile as the agent makes it: a peer with a slice that another
/// owner's route holds is held whole (see `retry::held_peers`).
async fn reconcile_as_agent(
    plane: &Dataplane,
    local: &LocalNode,
    peers: &[Peer],
    own: &OwnSlices,
) -> Result<ApplyReport> {
    let desired = desired_state(Backend::Vxlan, local, peers);
    Ok(plane
        .reconcile_holding(&desired, own, |conflicts| {
            let held = EntryOwners::of(
                peers
                    .iter()
                    .filter(|peer| conflicts.iter().any(|conflict| conflict.concerns(peer))),
            );
            move |operation: &Operation| held.owner(operation).is_some()
        })
        .await?)
}

/// Weft's `unreachable` routes of both families, sorted.
fn unreachable_routes(namespace: &TestNetns) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for family in ["-4", "-6"] {
        found.extend(
            namespace
                .json(&[
                    "ip",
                    "-j",
                    family,
                    "route",
                    "show",
                    "proto",
                    "87",
                    "type",
                    "unreachable",
                ])?
                .iter()
                .filter_map(|r| r["dst"].as_str().map(str::to_string)),
        );
    }
    found.sort();
    Ok(found)
}

fn foreign(protocol: RouteProtocol, kind: RouteType) -> Option<ForeignRoute> {
    Some(ForeignRoute { protocol, kind })
}

/// Another owner's route to a peer's slice (an operator's blackhole, a
/// static route at another metric) survives the reconcile, which reports
/// it and programs nothing of that peer; once the route is gone, the next
/// reconcile programs the peer.
#[tokio::test]
async fn another_owners_route_to_a_peer_slice_stays_and_holds_the_peer() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("fo", 1)?;
    let node = &fabric.nodes[0];
    let (plane, _) = vtep_dataplane(node, 0, 1).await?;
    node.run(&[
        "ip",
        "route",
        "add",
        "blackhole",
        "10.244.1.0/24",
        "proto",
        "static",
    ])?;
    node.run(&[
        "ip",
        "route",
        "add",
        "10.244.3.0/24",
        "via",
        "172.31.0.99",
        "metric",
        "100",
    ])?;
    let peers = [1, 2, 3].map(peer);
    let own = OwnSlices::default();

    let report = reconcile_as_agent(&plane, &local(0), &peers, &own).await?;
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        report.conflicts,
        vec![
            RouteConflict {
                destination: slice(1),
                foreign: foreign(RouteProtocol::Static, RouteType::BlackHole),
            },
            RouteConflict {
                destination: slice(3),
                foreign: foreign(RouteProtocol::Boot, RouteType::Unicast),
            },
        ]
    );
    ensure!(node
        .run(&["ip", "route", "show", "10.244.1.0/24"])?
        .contains("blackhole"));
    ensure!(node
        .run(&["ip", "route", "show", "10.244.3.0/24"])?
        .contains("via 172.31.0.99"));
    // Peers 1 and 3 are held whole: no neighbour or FDB entry of theirs.
    assert_eq!(
        weft_routes(node)?,
        vec!["10.244.2.0/24 via 10.244.2.0 dev weft.1 onlink"]
    );
    assert_eq!(weft_neighbours(node)?, vec!["10.244.2.0 0a:58:00:00:00:03"]);
    assert_eq!(weft_fdb(node)?, vec!["0a:58:00:00:00:03 172.31.0.12"]);
    let again = reconcile_as_agent(&plane, &local(0), &peers, &own).await?;
    ensure!(
        again.applied.is_empty() && again.conflicts == report.conflicts,
        "{again:?}"
    );

    node.run(&["ip", "route", "del", "blackhole", "10.244.1.0/24"])?;
    node.run(&["ip", "route", "del", "10.244.3.0/24", "metric", "100"])?;
    let report = reconcile_as_agent(&plane, &local(0), &peers, &own).await?;
    ensure!(
        report.failed.is_empty() && report.conflicts.is_empty(),
        "{report:?}"
    );
    assert_eq!(
        weft_routes(node)?,
        vec![
            "10.244.1.0/24 via 10.244.1.0 dev weft.1 onlink",
            "10.244.2.0/24 via 10.244.2.0 dev weft.1 onlink",
            "10.244.3.0/24 via 10.244.3.0 dev weft.1 onlink",
        ]
    );
    assert_eq!(weft_fdb(node)?.len(), 3);
    Ok(())
}

/// A node upgraded from the bridge design still routes its slice through
/// `weft0` (a kernel route, in both families): that route stays and is
/// reported, the bridge's addresses do not get the slice refused, and the
/// unreachable routes come once the bridge is gone.
#[tokio::test]
async fn a_kernel_route_for_the_own_slice_is_not_replaced() -> Result<()> {
    require_root!("creating network namespaces");
    let node = namespace("kr")?;
    node.run(&["ip", "link", "add", DEFAULT_BRIDGE, "type", "bridge"])?;
    node.run(&["ip", "addr", "add", "10.244.0.1/24", "dev", DEFAULT_BRIDGE])?;
    node.run(&[
        "ip",
        "addr",
        "add",
        "fd00:10:244::1/64",
        "dev",
        DEFAULT_BRIDGE,
        "nodad",
    ])?;
    node.run(&["ip", "link", "set", DEFAULT_BRIDGE, "up"])?;
    let plane = Dataplane::new(Netlink::in_netns(&Netns::open(node.path())?)?);
    let own = own_slices(&plane, &[slice(0), slice_v6(0)]).await?;

    let report = plane
        .reconcile_holding(&DesiredState::default(), &own, |_| |_: &Operation| false)
        .await?;
    let kernel = foreign(RouteProtocol::Kernel, RouteType::Unicast);
    assert_eq!(
        report.conflicts,
        vec![
            RouteConflict {
                destination: slice(0),
                foreign: kernel,
            },
            RouteConflict {
                destination: slice_v6(0),
                foreign: kernel,
            },
        ]
    );
    assert_eq!(unreachable_routes(&node)?, Vec::<String>::new());
    ensure!(node
        .run(&["ip", "route", "show", "10.244.0.0/24"])?
        .contains("dev weft0 proto kernel"));
    ensure!(node
        .run(&["ip", "-6", "route", "show", "fd00:10:244::/64"])?
        .contains("dev weft0 proto kernel"));

    // Its pods restarted onto routed veths, the bridge is removed.
    node.run(&["ip", "link", "del", DEFAULT_BRIDGE])?;
    let report = plane
        .reconcile_holding(&DesiredState::default(), &own, |_| |_: &Operation| false)
        .await?;
    ensure!(report.conflicts.is_empty(), "{:?}", report.conflicts);
    assert_eq!(
        unreachable_routes(&node)?,
        vec!["10.244.0.0/24", "fd00:10:244::/64"]
    );
    Ok(())
}

/// Sets up node `i`'s VTEP on `eth0` with its slices' network addresses,
/// as node set-up does, also when the slices change.
async fn set_vtep(plane: &mut Dataplane, i: usize, slices: &[IpNet]) -> Result<()> {
    let eth0 = plane
        .netlink()
        .link_by_name("eth0")
        .await?
        .context("eth0 missing")?;
    plane
        .ensure_vtep(&Vtep {
            underlay_index: eth0.index,
            addresses: slices
                .iter()
                .map(|s| IpNet::new(s.network(), s.max_prefix_len()))
                .collect::<Result<_, _>>()?,
            ..vtep(i, 1)
        })
        .await?;
    Ok(())
}

/// This node's slices get an `unreachable` route: an unallocated pod
/// address stops at the node instead of following the default route, a
/// pod's host route is more specific. When the slices become a peer's, the
/// routes turn into the peer's routes in place, and back; with no slices
/// (uninstall) they go.
#[tokio::test]
async fn own_slices_get_unreachable_routes_that_follow_the_slices() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("ur", 1)?;
    let node = &fabric.nodes[0];
    node.run(&[
        "ip",
        "addr",
        "add",
        "fd00:31::10/64",
        "dev",
        "eth0",
        "nodad",
    ])?;
    node.run(&["ip", "route", "add", "default", "via", "172.31.0.1"])?;
    node.run(&["ip", "-6", "route", "add", "default", "via", "fd00:31::1"])?;
    // What the plugin adds for a pod of the slice.
    node.run(&["ip", "route", "add", "10.244.0.5/32", "via", "172.31.0.50"])?;
    let mut plane = Dataplane::new(Netlink::in_netns(&Netns::open(node.path())?)?);
    let both = [slice(0), slice_v6(0)];
    set_vtep(&mut plane, 0, &both).await?;
    let own = own_slices(&plane, &both).await?;
    let no_hold = |_: &[RouteConflict]| |_: &Operation| false;

    let report = plane
        .reconcile_holding(&DesiredState::default(), &own, no_hold)
        .await?;
    assert_eq!(
        report.own_slices,
        vec![
            OwnSliceChange::Set(slice(0)),
            OwnSliceChange::Set(slice_v6(0))
        ]
    );
    assert_eq!(
        unreachable_routes(node)?,
        vec!["10.244.0.0/24", "fd00:10:244::/64"]
    );
    let unallocated = node.run(&["ip", "route", "get", "10.244.0.77"]);
    ensure!(
        unallocated.is_err(),
        "an unallocated pod address is routed: {unallocated:?}"
    );
    let unallocated = node.run(&["ip", "-6", "route", "get", "fd00:10:244::77"]);
    ensure!(
        unallocated.is_err(),
        "an unallocated pod address is routed: {unallocated:?}"
    );
    ensure!(node
        .run(&["ip", "route", "get", "10.244.0.5"])?
        .contains("via 172.31.0.50"));
    let again = plane
        .reconcile_holding(&DesiredState::default(), &own, no_hold)
        .await?;
    ensure!(
        again.own_slices.is_empty() && again.applied.is_empty(),
        "{again:?}"
    );

    // The node gets 10.244.7.0/24; its former slices go to peer 1.
    set_vtep(&mut plane, 0, &[slice(7)]).await?;
    let moved = own_slices(&plane, &[slice(7)]).await?;
    let taker = Peer {
        pod_cidrs: both.to_vec(),
        ..peer(1)
    };
    let here = LocalNode {
        pod_cidrs: vec![slice(7)],
        ..local(0)
    };
    let report = reconcile_as_agent(&plane, &here, &[taker], &moved).await?;
    ensure!(
        report.failed.is_empty() && report.conflicts.is_empty(),
        "{report:?}"
    );
    assert_eq!(unreachable_routes(node)?, vec!["10.244.7.0/24"]);
    ensure!(node
        .run(&["ip", "route", "show", "10.244.0.0/24"])?
        .contains("via 10.244.0.0 dev weft.1"));
    ensure!(node
        .run(&["ip", "-6", "route", "show", "fd00:10:244::/64"])?
        .contains("via fd00:10:244:: dev weft.1"));

    // Back to this node.
    set_vtep(&mut plane, 0, &both).await?;
    let report = plane
        .reconcile_holding(&DesiredState::default(), &own, no_hold)
        .await?;
    ensure!(
        report.failed.is_empty() && report.conflicts.is_empty(),
        "{report:?}"
    );
    assert_eq!(
        unreachable_routes(node)?,
        vec!["10.244.0.0/24", "fd00:10:244::/64"]
    );
    ensure!(
        !node
            .run(&["ip", "-6", "route", "show", "proto", "87"])?
            .contains("via"),
        "a peer route is left"
    );
    ensure!(weft_neighbours(node)?.is_empty() && weft_fdb(node)?.is_empty());

    // No slices of this node's, as uninstall reconciles: the routes go.
    plane.reconcile(&DesiredState::default()).await?;
    assert_eq!(unreachable_routes(node)?, Vec::<String>::new());
    Ok(())
}

/// One agent pass on node `i` of a vxlan fabric where node `j` holds
/// `slices[j]`: the VTEP addresses follow the node's slice (as set-up sets
/// them), then the peers and the node's own slice.
async fn agent_pass(node: &TestNetns, i: usize, slices: &[IpNet]) -> Result<ApplyReport> {
    let mut plane = Dataplane::new(Netlink::in_netns(&Netns::open(node.path())?)?);
    set_vtep(&mut plane, i, &slices[i..=i]).await?;
    let own = OwnNode {
        pod_cidrs: vec![slices[i]],
        ..OwnNode::default()
    };
    let own = plane
        .check_own_slices(&agent_config("10.244.0.0/16")?, &format!("node-{i}"), &own)
        .await?;
    let peers: Vec<Peer> = (0..slices.len())
        .filter(|&p| p != i)
        .map(|p| Peer {
            pod_cidrs: vec![slices[p]],
            ..peer(p)
        })
        .collect();
    let local = LocalNode {
        pod_cidrs: vec![slices[i]],
        ..local(i)
    };
    let report = reconcile_as_agent(&plane, &local, &peers, &own).await?;
    ensure!(
        report.failed.is_empty() && report.conflicts.is_empty(),
        "node {i}: {report:?}"
    );
    Ok(report)
}

/// A node whose slice moves away and back is reachable again after one
/// reconcile on each node: nothing of the move is left to wait out.
#[tokio::test]
async fn a_slice_that_moves_away_and_back_is_routed_again_after_one_reconcile() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("mv", 2)?;
    let (node0, node1) = (&fabric.nodes[0], &fabric.nodes[1]);
    let _pod = routed_pod(node0, "mv-pod", "10.244.0.5")?;
    let nodes = &fabric.nodes;
    let pass = |slices: [IpNet; 2]| async move {
        for (i, node) in nodes.iter().enumerate() {
            agent_pass(node, i, &slices).await?;
        }
        anyhow::Ok(())
    };
    pass([slice(0), slice(1)]).await?;
    ensure!(
        ping(node1, "10.244.0.5"),
        "node 1 cannot reach node 0's pod"
    );

    pass([slice(7), slice(1)]).await?;
    assert_eq!(
        weft_routes(node1)?,
        vec!["10.244.7.0/24 via 10.244.7.0 dev weft.1 onlink"]
    );
    assert_eq!(unreachable_routes(node0)?, vec!["10.244.7.0/24"]);

    pass([slice(0), slice(1)]).await?;
    assert_eq!(
        weft_routes(node1)?,
        vec!["10.244.0.0/24 via 10.244.0.0 dev weft.1 onlink"]
    );
    assert_eq!(unreachable_routes(node0)?, vec!["10.244.0.0/24"]);
    ensure!(
        ping(node1, "10.244.0.5"),
        "node 0's pod is unreachable after its slice came back"
    );
    Ok(())
}

/// A slice of this node's that fails a peer's checks (not a slice of the
/// cluster CIDR, the wrong size, the underlay's subnet) is refused with an
/// error naming the annotation and the fix, before anything is programmed:
/// the own-slice routes need the checked slices.
#[tokio::test]
async fn a_bad_own_slice_is_refused_and_nothing_is_programmed() -> Result<()> {
    require_root!("creating network namespaces");
    let fabric = Fabric::new("bs", 1)?;
    let node = &fabric.nodes[0];
    let plane = Dataplane::new(Netlink::in_netns(&Netns::open(node.path())?)?);
    // A cluster CIDR that holds the underlay subnet 172.31.0.0/24.
    let config = agent_config("172.16.0.0/12")?;
    for (bad, problem) in [
        ("0.0.0.0/0", "outside the cluster CIDR 172.16.0.0/12"),
        ("172.31.0.0/24", "overlaps 172.31.0.10/24 on eth0"),
        ("172.20.0.0/25", "not an aligned /24 network"),
    ] {
        let own = OwnNode {
            pod_cidrs: vec![bad.parse()?],
            ..OwnNode::default()
        };
        let refused = plane.check_own_slices(&config, "node-0", &own).await;
        let Err(DataplaneError::OwnSlice(error)) = refused else {
            anyhow::bail!("{bad} was not refused: {refused:?}");
        };
        assert_eq!(error.field, "weft.dev/pod-cidr");
        let message = error.to_string();
        for part in [problem, "kubectl annotate node node-0 weft.dev/pod-cidr-"] {
            ensure!(message.contains(part), "{bad}: {part} missing in {message}");
        }
    }
    let fine = OwnNode {
        pod_cidrs: vec!["172.20.0.0/24".parse()?],
        ..OwnNode::default()
    };
    plane.check_own_slices(&config, "node-0", &fine).await?;
    ensure!(
        node.run(&["ip", "route", "show", "proto", "87"])?
            .trim()
            .is_empty()
            && node
                .run(&["ip", "-6", "route", "show", "proto", "87"])?
                .trim()
                .is_empty()
            && node.run(&["ip", "link", "show", VXLAN_DEVICE]).is_err(),
        "something was programmed"
    );
    Ok(())
}
