//! The kernel check in a network namespace: a node programmed by the
//! agent's own reconcile, then changed by hand, is checked by dumping and
//! planning without applying, as `/status?check=kernel` does; one peer's
//! entries are listed with what the kernel holds of each, as
//! `&peer=<node>` does; and `/status?check=dump` reads the node as it is.
//!
//! Needs root (see `weft_testing::root_available`). The namespace is
//! removed on success and on failure (drop guard).

use anyhow::{ensure, Context, Result};
use ipnet::IpNet;
use weft_agent::config::{AgentSettings, Backend};
use weft_agent::dataplane::{Dataplane, OwnSlices, RouteConflict, Vtep, VXLAN_DEVICE};
use weft_agent::dump::read_kernel_dump;
use weft_agent::kernel_check::{check_kernel, peer_entries};
use weft_agent::node::OwnNode;
use weft_agent::overlay::{desired_state, DesiredState, EntryOwners, Operation};
use weft_agent::peer::{LocalNode, Peer};
use weft_core::annotations::VtepMac;
use weft_core::netlink::Netlink;
use weft_core::netns::Netns;
use weft_core::status::{EntryCheck, KernelCheck};
use weft_testing::{require_root, TestNetns};

fn mac(node: u8) -> VtepMac {
    VtepMac::new([0x0a, 0x58, 0, 0, 0, node + 1])
}

/// Node `n`: slice 10.244.n.0/24, underlay address 172.31.0.(10+n).
fn peer(node: u8) -> Peer {
    Peer {
        node_name: format!("node-{node}"),
        pod_cidrs: vec![format!("10.244.{node}.0/24").parse().unwrap()],
        public_ip: format!("172.31.0.{}", 10 + node).parse().unwrap(),
        vtep_mac: Some(mac(node)),
        created: 0,
        malformed: None,
    }
}

/// A namespace for node-0 with `eth0` (one end of a veth pair) on
/// 172.31.0.10/24 and `weft.1` over it, and node-0's slice checked as the
/// agent checks it.
async fn node_zero(namespace: &TestNetns) -> Result<(Dataplane, OwnSlices)> {
    for command in [
        &["ip", "link", "set", "lo", "up"][..],
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-p",
        ],
        &["ip", "addr", "add", "172.31.0.10/24", "dev", "eth0"],
        &["ip", "link", "set", "eth0", "up"],
        &["ip", "link", "set", "eth0-p", "up"],
    ] {
        namespace.run(command)?;
    }
    let netlink = Netlink::in_netns(&Netns::open(namespace.path())?)?;
    let eth0 = netlink
        .link_by_name("eth0")
        .await?
        .context("eth0 missing")?;
    let slice: IpNet = "10.244.0.0/24".parse()?;
    let mut plane = Dataplane::new(netlink);
    plane
        .ensure_vtep(&Vtep {
            vni: 1,
            port: 8472,
            local: "172.31.0.10".parse()?,
            underlay_index: eth0.index,
            mac: mac(0),
            mtu: 1450,
            addresses: vec![IpNet::new(slice.network(), 32)?],
        })
        .await?;
    let config = AgentSettings {
        slices: weft_daemon::slices::SliceSettings {
            cluster_cidr: Some("10.244.0.0/16".parse()?),
            ..Default::default()
        },
        ..AgentSettings::default()
    }
    .resolve(std::path::Path::new("/weft-agent"))?;
    let own = OwnNode {
        pod_cidrs: vec![slice],
        ..OwnNode::default()
    };
    let own = plane.check_own_slices(&config, "node-0", &own).await?;
    Ok((plane, own))
}

fn desired(peers: &[Peer]) -> DesiredState {
    let local = LocalNode {
        name: "node-0".into(),
        pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
        underlay: "172.31.0.10/24".parse().unwrap(),
    };
    desired_state(Backend::Vxlan, &local, peers)
}

/// Checks with nothing held.
async fn check(plane: &Dataplane, wanted: &DesiredState, own: &OwnSlices) -> Result<KernelCheck> {
    Ok(check_kernel(plane, wanted, own, |_| |_: &Operation| false, None).await?)
}

/// The destinations of Weft's unicast routes in the namespace, as `ip`
/// lists them (sorted by destination).
fn weft_routes(namespace: &TestNetns) -> Result<Vec<String>> {
    let listing = namespace.run(&["ip", "route", "show", "proto", "87", "type", "unicast"])?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect())
}

#[tokio::test]
async fn the_check_reports_drift_made_by_hand_and_changes_nothing() -> Result<()> {
    require_root!("creating network namespaces");
    let node = TestNetns::create("kc");
    let (plane, own) = node_zero(&node).await?;
    let peers = [peer(1), peer(2)];
    let wanted = desired(&peers);
    let report = plane
        .reconcile_holding(&wanted, &own, |_| |_: &Operation| false)
        .await?;
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    let found = check(&plane, &wanted, &own).await?;
    ensure!(found.is_clean(), "right after a reconcile: {found:?}");

    node.run(&["ip", "route", "del", "10.244.1.0/24"])?;
    node.run(&[
        "ip",
        "route",
        "add",
        "10.244.9.0/24",
        "via",
        "10.244.9.0",
        "dev",
        VXLAN_DEVICE,
        "onlink",
        "proto",
        "87",
    ])?;
    node.run(&[
        "bridge",
        "fdb",
        "append",
        "0a:58:00:00:00:0a",
        "dst",
        "172.31.0.19",
        "dev",
        VXLAN_DEVICE,
    ])?;
    let found = check(&plane, &wanted, &own).await?;
    assert_eq!(
        found.missing,
        vec![format!(
            "route 10.244.1.0/24 via 10.244.1.0 dev {VXLAN_DEVICE} onlink"
        )]
    );
    assert_eq!(
        found.excess,
        vec![
            format!("fdb 0a:58:00:00:00:0a dst 172.31.0.19 dev {VXLAN_DEVICE}"),
            format!("route 10.244.9.0/24 via 10.244.9.0 dev {VXLAN_DEVICE} onlink"),
        ]
    );
    assert!(found.tables_changed.is_empty());
    // Checking applied nothing: the drift is still there.
    assert_eq!(weft_routes(&node)?, vec!["10.244.2.0/24", "10.244.9.0/24"]);
    assert_eq!(check(&plane, &wanted, &own).await?, found);

    // The own slice's unreachable route is checked too.
    node.run(&["ip", "route", "del", "unreachable", "10.244.0.0/24"])?;
    let found = check(&plane, &wanted, &own).await?;
    assert!(
        found
            .missing
            .contains(&"route unreachable 10.244.0.0/24".to_string()),
        "{found:?}"
    );

    // A reconcile repairs exactly what the check reported.
    plane
        .reconcile_holding(&wanted, &own, |_| |_: &Operation| false)
        .await?;
    let found = check(&plane, &wanted, &own).await?;
    ensure!(found.is_clean(), "after the repair: {found:?}");
    Ok(())
}

#[tokio::test]
async fn entries_the_reconcile_holds_are_not_reported() -> Result<()> {
    require_root!("creating network namespaces");
    let node = TestNetns::create("kh");
    let (plane, own) = node_zero(&node).await?;
    let waiting = [peer(2)];
    let held = EntryOwners::of(&waiting);
    let hold = |_: &[RouteConflict]| |operation: &Operation| held.owner(operation).is_some();
    // node-2 waits for its retry: the reconcile left its entries out.
    let wanted = desired(&[peer(1), peer(2)]);
    plane.reconcile_holding(&wanted, &own, hold).await?;
    ensure!(weft_routes(&node)? == vec!["10.244.1.0/24"]);
    let found = check_kernel(&plane, &wanted, &own, hold, None).await?;
    ensure!(found.is_clean(), "held entries reported: {found:?}");
    // Without the hold, the same kernel lacks node-2's four entries.
    let found = check(&plane, &wanted, &own).await?;
    assert_eq!(
        found.missing,
        vec![
            format!("fdb 0a:58:00:00:00:03 dst 172.31.0.12 dev {VXLAN_DEVICE}"),
            format!("neighbour 10.244.2.0 lladdr 0a:58:00:00:00:03 dev {VXLAN_DEVICE}"),
            format!("route 10.244.2.0/24 via 10.244.2.0 dev {VXLAN_DEVICE} onlink"),
            format!("route 172.31.0.12 via 10.244.2.0 dev {VXLAN_DEVICE} onlink table 8787"),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_peers_entries_show_what_the_kernel_holds_of_each() -> Result<()> {
    require_root!("creating network namespaces");
    let node = TestNetns::create("kp");
    let (plane, own) = node_zero(&node).await?;
    let peers = [peer(1), peer(2)];
    let wanted = desired(&peers);
    plane
        .reconcile_holding(&wanted, &own, |_| |_: &Operation| false)
        .await?;
    let entry = |entry: String, held: bool| EntryCheck { entry, held };
    let route = format!("route 10.244.1.0/24 via 10.244.1.0 dev {VXLAN_DEVICE} onlink");
    let expected = |route_held: bool| {
        vec![
            entry(
                format!("neighbour 10.244.1.0 lladdr 0a:58:00:00:00:02 dev {VXLAN_DEVICE}"),
                true,
            ),
            entry(
                format!("fdb 0a:58:00:00:00:02 dst 172.31.0.11 dev {VXLAN_DEVICE}"),
                true,
            ),
            entry(route.clone(), route_held),
            entry(
                format!("route 172.31.0.11 via 10.244.1.0 dev {VXLAN_DEVICE} onlink table 8787"),
                true,
            ),
        ]
    };
    let dump = plane.dump().await?;
    assert_eq!(peer_entries(&peers[0], &wanted, &dump), expected(true));

    node.run(&["ip", "route", "del", "10.244.1.0/24"])?;
    let dump = plane.dump().await?;
    assert_eq!(peer_entries(&peers[0], &wanted, &dump), expected(false));
    // In the same words as the check's list of what is missing.
    assert_eq!(check(&plane, &wanted, &own).await?.missing, vec![route]);
    // node-2's entries are untouched.
    let other = peer_entries(&peers[1], &wanted, &dump);
    assert!(
        other.len() == 4 && other.iter().all(|e| e.held),
        "{other:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_dump_reads_weft_s_links_routes_neighbours_fdb_and_tables() -> Result<()> {
    require_root!("creating network namespaces");
    let node = TestNetns::create("kd");
    let (plane, own) = node_zero(&node).await?;
    let wanted = desired(&[peer(1)]);
    plane
        .reconcile_holding(&wanted, &own, |_| |_: &Operation| false)
        .await?;
    node.run(&["nft", "add", "table", "inet", "weft"])?;
    let dump = Netns::open(node.path())?.run_in(read_kernel_dump)?;
    ensure!(dump.errors.is_empty(), "{:?}", dump.errors);
    assert_eq!(dump.links.len(), 1, "{:?}", dump.links);
    let overlay = &dump.links[0];
    assert!(
        overlay.starts_with(&format!(
            "{VXLAN_DEVICE} vxlan mtu 1450 up lladdr 0a:58:00:00:00:01 inet 10.244.0.0/32 "
        )),
        "{overlay}"
    );
    assert!(
        overlay.ends_with(" vxlan id 1 local 172.31.0.10 dstport 8472 nolearning"),
        "{overlay}"
    );
    for route in [
        "10.244.1.0/24 via 10.244.1.0 dev weft.1 proto 87 onlink",
        "unreachable 10.244.0.0/24 proto 87",
        "172.31.0.0/24 dev eth0 proto kernel scope link",
        "172.31.0.11/32 via 10.244.1.0 dev weft.1 table 8787 proto 87 onlink",
    ] {
        assert!(
            dump.routes.iter().any(|r| r.starts_with(route)),
            "{route}: {:?}",
            dump.routes
        );
    }
    assert_eq!(
        dump.rules,
        vec!["from 10.244.0.0/24 fwmark 0x10000000/0x10000000 lookup 8787 pref 87 proto 87"]
    );
    assert_eq!(
        dump.neighbours,
        vec!["10.244.1.0 dev weft.1 lladdr 0a:58:00:00:00:02 permanent"]
    );
    assert_eq!(
        dump.fdb,
        vec!["0a:58:00:00:00:02 dev weft.1 dst 172.31.0.11 self permanent"]
    );
    // Only the table that is there; the others are left out.
    assert_eq!(dump.tables.keys().collect::<Vec<_>>(), vec!["inet weft"]);
    assert!(dump.tables["inet weft"].contains("table inet weft"));
    Ok(())
}
