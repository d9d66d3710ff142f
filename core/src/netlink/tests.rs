//! Netlink tests against real namespaces made with `ip netns add`; they
//! need root (see `weft_testing::root_available`).

use ipnet::IpNet;
use netlink_packet_route::link::{AfSpecInet, AfSpecUnspec, InetDevConf, LinkAttribute};
use weft_testing::TestNetns;

use super::*;
use crate::ip::IpFamily;

/// Opens a test namespace's handle.
fn open(ns: &TestNetns) -> Netns {
    Netns::open(ns.path()).unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn veth_addresses_neighbours_routes_in_namespaces() {
    if !weft_testing::root_available("netlink tests create network namespaces") {
        return;
    }
    let node = TestNetns::create("nl-node");
    let pod = TestNetns::create("nl-pod");
    let (node_ns, pod_ns) = (open(&node), open(&pod));
    let on_node = Netlink::in_netns(&node_ns).unwrap();
    let in_pod = Netlink::in_netns(&pod_ns).unwrap();

    // Veth: peer created inside the pod namespace under its final name.
    let pair = VethPair {
        name: "wtveth0",
        peer_name: "eth0",
        peer_netns: &pod_ns,
        mac: Some(&[0x02, 0x58, 10, 77, 0, 2]),
        peer_mac: Some(&[0x0a, 0x58, 10, 77, 0, 2]),
        mtu: 1450,
    };
    assert_eq!(on_node.create_veth(&pair).await.unwrap(), Outcome::Created);
    assert_eq!(
        on_node.create_veth(&pair).await.unwrap(),
        Outcome::AlreadyPresent
    );
    let host = on_node.link_by_name("wtveth0").await.unwrap().unwrap();
    assert_eq!((host.controller, host.mtu, host.up), (None, 1450, true));
    on_node.set_alias(host.index, "weft test").await.unwrap();
    let host = on_node.link_by_index(host.index).await.unwrap().unwrap();
    assert_eq!(host.alias.as_deref(), Some("weft test"));
    // src_valid_mark alone changes, and twice is no error.
    let before = inet_conf(&on_node, host.index).await;
    assert!(!on_node.src_valid_mark(host.index).await.unwrap());
    for _ in 0..2 {
        on_node.set_src_valid_mark(host.index).await.unwrap();
    }
    assert!(on_node.src_valid_mark(host.index).await.unwrap());
    let mut expected = before;
    expected.src_vmark = 1;
    assert_eq!(inet_conf(&on_node, host.index).await, expected);
    let eth0 = in_pod.link_by_name("eth0").await.unwrap().unwrap();
    assert!(!eth0.up);
    in_pod.set_up(eth0.index).await.unwrap();
    let eth0 = in_pod.link_by_index(eth0.index).await.unwrap().unwrap();
    assert_eq!(
        (eth0.mtu, eth0.up, eth0.kind.as_deref()),
        (1450, true, Some("veth"))
    );
    assert_eq!(eth0.mac_text(), "0a:58:0a:4d:00:02");
    assert_eq!(host.mac_text(), "02:58:0a:4d:00:02");
    // Each end names the other, across the namespace boundary.
    assert_eq!(
        (eth0.peer_index, host.peer_index),
        (Some(host.index), Some(eth0.index))
    );
    assert!(on_node.link_by_name("eth0").await.unwrap().is_none());

    // Addresses are idempotent; IPv6 is usable at once (nodad).
    let v4: IpNet = "10.77.0.2/32".parse().unwrap();
    let v6: IpNet = "fd77::2/128".parse().unwrap();
    for address in [v4, v6] {
        assert_eq!(
            in_pod.ensure_address(eth0.index, address).await.unwrap(),
            Outcome::Created
        );
        assert_eq!(
            in_pod.ensure_address(eth0.index, address).await.unwrap(),
            Outcome::AlreadyPresent
        );
    }
    let found = in_pod.addresses(Some(eth0.index)).await.unwrap();
    assert!(found.iter().any(|a| a.address == v4), "{found:?}");
    assert!(found.iter().any(|a| a.address == v6), "{found:?}");

    // Permanent neighbours: replaced in place, dumped, deleted twice.
    let gateway = PermanentNeighbour {
        link_index: eth0.index,
        ip: "169.254.1.1".parse().unwrap(),
        mac: [0x02, 0x58, 10, 77, 0, 9],
    };
    in_pod.replace_neighbour(&gateway).await.unwrap();
    let gateway = PermanentNeighbour {
        mac: [0x02, 0x58, 10, 77, 0, 2],
        ..gateway
    };
    in_pod.replace_neighbour(&gateway).await.unwrap();
    assert_eq!(
        in_pod.permanent_neighbours(eth0.index).await.unwrap(),
        vec![gateway]
    );

    // Routes in the pod: the gateway on the link, default via it, dumped
    // back, removed twice.
    let on_link = Route {
        output_interface: Some(eth0.index),
        scope: RouteScope::Link,
        ..Route::new("169.254.1.1/32".parse().unwrap())
    };
    assert_eq!(in_pod.add_route(&on_link).await.unwrap(), Outcome::Created);
    let default = Route::default_via("169.254.1.1".parse().unwrap());
    assert_eq!(in_pod.add_route(&default).await.unwrap(), Outcome::Created);
    assert_eq!(
        in_pod.add_route(&default).await.unwrap(),
        Outcome::AlreadyPresent
    );
    let routes = in_pod
        .routes(IpFamily::V4, Route::MAIN_TABLE)
        .await
        .unwrap();
    assert!(routes.contains(&on_link), "{routes:?}");
    let dumped = routes
        .iter()
        .find(|r| r.destination.prefix_len() == 0)
        .expect("default route dumped");
    assert_eq!(dumped.gateway, default.gateway);
    assert_eq!(dumped.output_interface, Some(eth0.index));
    assert_eq!(
        in_pod.delete_route(&default).await.unwrap(),
        Removal::Removed
    );
    assert_eq!(
        in_pod.delete_route(&default).await.unwrap(),
        Removal::AlreadyGone
    );
    assert_eq!(
        in_pod.delete_neighbour(&gateway).await.unwrap(),
        Removal::Removed
    );
    assert_eq!(
        in_pod.delete_neighbour(&gateway).await.unwrap(),
        Removal::AlreadyGone
    );

    // An on-link route in its own table with our own protocol number.
    let overlay = Route {
        gateway: Some("10.99.0.0".parse().unwrap()),
        output_interface: Some(eth0.index),
        table: 1234,
        protocol: RouteProtocol::Other(99),
        onlink: true,
        ..Route::new("10.99.0.0/24".parse().unwrap())
    };
    in_pod.replace_route(&overlay).await.unwrap();
    in_pod.replace_route(&overlay).await.unwrap();
    let routes = in_pod.routes(IpFamily::V4, 1234).await.unwrap();
    assert_eq!(routes, vec![overlay.clone()]);
    assert_eq!(
        in_pod.delete_route(&overlay).await.unwrap(),
        Removal::Removed
    );

    // Links go away once; the second removal reports it.
    assert_eq!(
        on_node.delete_link_by_name("wtveth0").await.unwrap(),
        Removal::Removed
    );
    assert_eq!(
        on_node.delete_link_by_name("wtveth0").await.unwrap(),
        Removal::AlreadyGone
    );
    assert_eq!(
        on_node.delete_link(host.index).await.unwrap(),
        Removal::AlreadyGone
    );
    assert!(in_pod.link_by_name("eth0").await.unwrap().is_none());
}

/// A link's IPv4 settings as the kernel dumps them.
async fn inet_conf(netlink: &Netlink, index: u32) -> InetDevConf {
    use futures::TryStreamExt;
    let message = netlink
        .handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .unwrap()
        .unwrap();
    message
        .attributes
        .into_iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::AfSpecUnspec(specs) => specs.into_iter().find_map(|spec| match spec {
                AfSpecUnspec::Inet(inet) => inet.into_iter().find_map(|conf| match conf {
                    AfSpecInet::DevConf(conf) => Some(conf),
                    _ => None,
                }),
                _ => None,
            }),
            _ => None,
        })
        .expect("an IPv4 device configuration in the dump")
}

#[tokio::test(flavor = "current_thread")]
async fn a_missing_link_is_enodev() {
    if !weft_testing::root_available("netlink tests create network namespaces") {
        return;
    }
    let node = TestNetns::create("nl-kind");
    let on_node = Netlink::in_netns(&open(&node)).unwrap();
    let missing = on_node.set_up(4242).await.unwrap_err();
    assert_eq!(missing.errno(), Some(Errno::ENODEV), "{missing}");
    let missing = on_node.set_alias(4242, "weft test").await.unwrap_err();
    assert_eq!(missing.errno(), Some(Errno::ENODEV), "{missing}");
}

#[tokio::test(flavor = "current_thread")]
async fn rules_are_added_dumped_and_deleted_idempotently() {
    if !weft_testing::root_available("netlink tests create network namespaces") {
        return;
    }
    let node = TestNetns::create("nl-rule");
    let on_node = Netlink::in_netns(&open(&node)).unwrap();
    let rule = Rule {
        family: IpFamily::V4,
        priority: 87,
        source: Some("10.99.1.0/24".parse().unwrap()),
        mark: Some(FwMark {
            value: 0x1000_0000,
            mask: 0x1000_0000,
        }),
        table: 8787,
        protocol: RouteProtocol::Other(99),
    };
    let v6 = Rule {
        family: IpFamily::V6,
        source: Some("fd99:1::/64".parse().unwrap()),
        ..rule
    };
    for wanted in [rule, v6] {
        assert_eq!(on_node.add_rule(&wanted).await.unwrap(), Outcome::Created);
        assert_eq!(
            on_node.add_rule(&wanted).await.unwrap(),
            Outcome::AlreadyPresent
        );
    }
    // Each family's dump holds the rule once, beside the kernel's own
    // (local, main, default), which have no protocol of ours.
    let found = on_node.rules(IpFamily::V4).await.unwrap();
    assert_eq!(
        found
            .iter()
            .filter(|r| r.protocol == RouteProtocol::Other(99))
            .collect::<Vec<_>>(),
        vec![&rule],
        "{found:?}"
    );
    assert!(found.iter().any(|r| r.table == Route::MAIN_TABLE));
    let found = on_node.rules(IpFamily::V6).await.unwrap();
    assert!(found.contains(&v6), "{found:?}");
    // A rule that differs only in its mark is another rule.
    let other_mark = Rule {
        mark: Some(FwMark {
            value: 0x2000,
            mask: 0x2000,
        }),
        ..rule
    };
    assert_eq!(
        on_node.delete_rule(&other_mark).await.unwrap(),
        Removal::AlreadyGone
    );
    for wanted in [rule, v6] {
        assert_eq!(
            on_node.delete_rule(&wanted).await.unwrap(),
            Removal::Removed
        );
        assert_eq!(
            on_node.delete_rule(&wanted).await.unwrap(),
            Removal::AlreadyGone
        );
    }
    assert!(!on_node
        .rules(IpFamily::V4)
        .await
        .unwrap()
        .iter()
        .any(|r| r.protocol == RouteProtocol::Other(99)));
}
