//! Network-namespace tests of the NetworkPolicy data plane, without an API
//! server: one node namespace, three pods routed to it as the plugin wires
//! them (a veth each, /32 and /128 host routes, no shared link) and a
//! "remote" namespace routed through the node (a pod on another node, or the
//! outside). Plans compiled from pod and policy records are applied through
//! the agent's `PolicyDataplane`, and TCP connections between the
//! namespaces show what passes. The table watch runs as the agent runs it,
//! on a thread started in the node namespace. Needs root (see
//! `weft_testing::root_available`); every namespace is removed on success
//! and on failure.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use weft_agent::metrics::AgentMetrics;
use weft_agent::nft_watch::TableWatch;
use weft_agent::policy::compile::{compile, PolicyPlan};
use weft_agent::policy::model::{
    screen_pod_addresses, AddressRejection, NamespaceRecord, NamespaceScope, NodeSlices, Peer,
    PodRecord, PolicyRecord, PortMatch, PortRule, Protocol, Rule,
};
use weft_agent::policy::nft::{Applied, PolicyDataplane, TABLE};
use weft_agent::policy::selector::{Requirement, Selector};
use weft_core::netns::Netns;
use weft_testing::{require_root, wait_for, TestNetns};

/// A command line written as one string, split into its words for
/// [`TestNetns::run`].
fn words(command: &str) -> Vec<&str> {
    command.split_whitespace().collect()
}

/// The node with pods `a`, `b`, `c` at 10.244.0.2, .3, .4 (and
/// fd00:10:244::2, ::3, ::4), each routed on its own veth with the gateways
/// 169.254.1.1 and fe80::1 as the plugin sets them, and a remote namespace
/// at 172.31.0.2 routed through the node.
struct Testbed {
    node: TestNetns,
    pods: Vec<(&'static str, TestNetns)>,
    remote: TestNetns,
}

const PODS: [&str; 3] = ["a", "b", "c"];
const PORTS: [u16; 2] = [8080, 9090];

impl Testbed {
    /// The testbed of the test called `test`, a short tag that keeps the
    /// names of concurrent tests apart.
    fn start(test: &str) -> Result<Self> {
        let node = TestNetns::create(&format!("{test}-node"));
        let remote = TestNetns::create(&format!("{test}-remote"));
        let pods: Vec<_> = PODS
            .iter()
            .map(|name| (*name, TestNetns::create(&format!("{test}-{name}"))))
            .collect();
        for command in [
            "sysctl -qw net.ipv4.ip_forward=1",
            "sysctl -qw net.ipv6.conf.all.forwarding=1",
        ] {
            node.run(&words(command))?;
        }
        for (i, (name, pod)) in pods.iter().enumerate() {
            let host = format!("veth-{name}");
            let host_mac = format!("0a:58:00:00:00:{:02x}", i + 2);
            let pod_mac = format!("0a:58:00:00:01:{:02x}", i + 2);
            let link = format!(
                "ip link add {host} address {host_mac} type veth peer name eth0 address {pod_mac} netns {}",
                pod.name()
            );
            node.run(&words(&link))?;
            node.run(&words(&format!("ip link set {host} up")))?;
            for command in [
                format!("ip addr add 10.244.0.{}/32 dev eth0", i + 2),
                format!("ip addr add fd00:10:244::{}/128 dev eth0 nodad", i + 2),
                "ip link set eth0 up".into(),
                "ip link set lo up".into(),
                "ip route add 169.254.1.1 dev eth0 scope link".into(),
                "ip route add default via 169.254.1.1 dev eth0".into(),
                format!("ip neigh add 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"),
                "ip -6 route add default via fe80::1 dev eth0".into(),
                format!("ip -6 neigh add fe80::1 lladdr {host_mac} dev eth0 nud permanent"),
            ] {
                pod.run(&words(&command))?;
            }
            // Permanent neighbours both ways, as the plugin makes them: no
            // ARP or ND (the veths' link-local addresses may still be
            // tentative) stands between a test and its first packet.
            for command in [
                format!("ip route add 10.244.0.{}/32 dev {host}", i + 2),
                format!("ip -6 route add fd00:10:244::{}/128 dev {host}", i + 2),
                format!(
                    "ip neigh add 10.244.0.{} lladdr {pod_mac} dev {host} nud permanent",
                    i + 2
                ),
                format!(
                    "ip -6 neigh add fd00:10:244::{} lladdr {pod_mac} dev {host} nud permanent",
                    i + 2
                ),
            ] {
                node.run(&words(&command))?;
            }
        }
        let uplink = format!(
            "ip link add uplink type veth peer name eth0 netns {}",
            remote.name()
        );
        node.run(&words(&uplink))?;
        node.run(&words("ip addr add 172.31.0.1/24 dev uplink"))?;
        node.run(&words("ip link set uplink up"))?;
        remote.run(&words("ip addr add 172.31.0.2/24 dev eth0"))?;
        remote.run(&words("ip link set eth0 up"))?;
        remote.run(&words("ip route add 10.244.0.0/24 via 172.31.0.1"))?;
        let testbed = Self { node, pods, remote };
        for (_, pod) in &testbed.pods {
            serve(pod)?;
        }
        serve(&testbed.remote)?;
        Ok(testbed)
    }

    fn pod(&self, name: &str) -> &TestNetns {
        &self
            .pods
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a pod of the testbed")
            .1
    }

    /// Applies `plan` in the node namespace.
    fn apply(&self, dataplane: &mut PolicyDataplane, plan: PolicyPlan) -> Result<Applied> {
        Ok(Netns::open(self.node.path())?.run_here(|| dataplane.apply(plan))??)
    }

    fn denied(&self, dataplane: &PolicyDataplane) -> Result<(u64, u64)> {
        Ok(Netns::open(self.node.path())?.run_here(|| dataplane.denied_packets())??)
    }
}

/// Echo servers on every port of `PORTS`, on all addresses of `namespace`.
fn serve(namespace: &TestNetns) -> Result<()> {
    let netns = Netns::open(namespace.path())?;
    for port in PORTS {
        let listener = netns.run_here(|| TcpListener::bind(("::", port)))??;
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buffer = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buffer) {
                        if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    Ok(())
}

/// Opens a connection from `namespace` to `address:port`; `None` when no
/// connection is made within the time (a dropped SYN).
fn connect(namespace: &TestNetns, address: &str, port: u16) -> Result<Option<TcpStream>> {
    let target = SocketAddr::new(address.parse::<IpAddr>()?, port);
    let stream = Netns::open(namespace.path())?
        .run_here(|| TcpStream::connect_timeout(&target, Duration::from_secs(2)))?;
    Ok(stream.ok())
}

/// Whether an echo round trip over `stream` works.
fn echoes(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_ok()
        && stream.write_all(b"ping").is_ok()
        && {
            let mut answer = [0u8; 4];
            stream.read_exact(&mut answer).is_ok() && &answer == b"ping"
        }
}

fn reaches(namespace: &TestNetns, address: &str, port: u16) -> Result<bool> {
    Ok(connect(namespace, address, port)?.is_some_and(|mut s| echoes(&mut s)))
}

/// Pod `name` of the testbed, labelled app=`app`, as its Pod object reads
/// once the kubelet has reported its addresses.
fn pod_record(name: &str, app: &str) -> PodRecord {
    let index = PODS.iter().position(|p| *p == name).expect("a pod") + 2;
    let ips = [format!("10.244.0.{index}"), format!("fd00:10:244::{index}")];
    claimed(name, app, "node-0", &ips)
}

/// The record of pod `name` (app=`app`) bound to `node`, whose status
/// claims `ips`.
fn claimed(name: &str, app: &str, node: &str, ips: &[String]) -> PodRecord {
    let ips: Vec<_> = ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [
            {"name": "server", "ports": [{"name": "http", "containerPort": 8080}]},
        ]},
        "status": {"phase": "Running", "podIPs": ips},
    }))
    .expect("a valid Pod");
    PodRecord::of(&pod).expect("a pod on the pod network")
}

fn app(value: &str) -> Selector {
    Selector::of(vec![Requirement::In("app".into(), vec![value.into()])])
}

/// `b` (app=db) takes connections only from app=web pods, on its port
/// named http.
fn db_from_web() -> PolicyRecord {
    PolicyRecord {
        namespace: "x".into(),
        name: "db".into(),
        pod_selector: app("db"),
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespaces: NamespaceScope::Own,
                pods: app("web"),
            }],
            ports: vec![PortRule {
                protocol: Protocol::Tcp,
                port: PortMatch::Named("http".into()),
            }],
        }]),
        egress: None,
    }
}

fn plan(pods: &[PodRecord], policies: &[PolicyRecord]) -> PolicyPlan {
    let namespaces = [NamespaceRecord {
        name: "x".into(),
        labels: Default::default(),
    }];
    compile("node-0", pods, &namespaces, policies)
}

/// Whether each (from, to address, port) connects as expected; `from` is a
/// pod's name or `remote`.
fn expect(testbed: &Testbed, cases: &[(&str, &str, u16, bool)]) -> Result<()> {
    for &(from, to, port, allowed) in cases {
        let namespace = match from {
            "remote" => &testbed.remote,
            pod => testbed.pod(pod),
        };
        let verb = if allowed { "should" } else { "should not" };
        ensure!(
            reaches(namespace, to, port)? == allowed,
            "{from} {verb} reach {to}:{port}"
        );
    }
    Ok(())
}

const ALLOWED: bool = true;
const DENIED: bool = false;

#[test]
fn ingress_policy_admits_only_its_peers_on_its_ports_and_keeps_open_connections() -> Result<()> {
    require_root!("creating network namespaces");
    let testbed = Testbed::start("pin")?;
    let mut dataplane = PolicyDataplane::default();
    let pods = [
        pod_record("a", "web"),
        pod_record("b", "db"),
        pod_record("c", "other"),
    ];
    let applied = testbed.apply(&mut dataplane, plan(&pods, &[]))?;
    ensure!(applied == Applied::Replaced, "{applied:?}");
    expect(
        &testbed,
        &[
            ("a", "10.244.0.3", 9090, ALLOWED),
            ("c", "10.244.0.3", 9090, ALLOWED),
        ],
    )?;
    // A connection c opens before the policy stays open after it.
    let mut open = connect(testbed.pod("c"), "10.244.0.3", 9090)?.context("c to b")?;
    ensure!(echoes(&mut open));

    testbed.apply(&mut dataplane, plan(&pods, &[db_from_web()]))?;
    expect(
        &testbed,
        &[
            // web to db on http, both families; nothing else into db.
            ("a", "10.244.0.3", 8080, ALLOWED),
            ("a", "fd00:10:244::3", 8080, ALLOWED),
            ("a", "10.244.0.3", 9090, DENIED),
            ("c", "10.244.0.3", 8080, DENIED),
            ("remote", "10.244.0.3", 8080, DENIED),
            // db is isolated for ingress only: what it opens, and the
            // replies, pass; pods no policy selects are open.
            ("b", "10.244.0.4", 9090, ALLOWED),
            ("b", "172.31.0.2", 9090, ALLOWED),
            ("remote", "10.244.0.4", 9090, ALLOWED),
        ],
    )?;
    ensure!(echoes(&mut open), "the connection opened before the policy");
    let (_, ingress_denied) = testbed.denied(&dataplane)?;
    ensure!(ingress_denied > 0, "no drop counted");

    // c turns into a web pod: its entry joins the set in place.
    let pods = [
        pod_record("a", "web"),
        pod_record("b", "db"),
        pod_record("c", "web"),
    ];
    let applied = testbed.apply(&mut dataplane, plan(&pods, &[db_from_web()]))?;
    ensure!(applied == Applied::Updated, "{applied:?}");
    expect(&testbed, &[("c", "10.244.0.3", 8080, ALLOWED)])?;
    // The policy goes: everything passes again.
    let applied = testbed.apply(&mut dataplane, plan(&pods, &[]))?;
    ensure!(applied == Applied::Updated, "{applied:?}");
    expect(&testbed, &[("remote", "10.244.0.3", 9090, ALLOWED)])
}

#[test]
fn egress_policy_limits_where_a_pod_may_connect() -> Result<()> {
    require_root!("creating network namespaces");
    let testbed = Testbed::start("pout")?;
    let mut dataplane = PolicyDataplane::default();
    let pods = [
        pod_record("a", "web"),
        pod_record("b", "db"),
        pod_record("c", "other"),
    ];
    // web may reach db pods on 8000-8080, and 172.31.0.0/24 but the
    // remote's address on any port.
    let to_db = Rule {
        peers: vec![Peer::Pods {
            namespaces: NamespaceScope::Own,
            pods: app("db"),
        }],
        ports: vec![PortRule {
            protocol: Protocol::Tcp,
            port: PortMatch::Range(8000, 8080),
        }],
    };
    let to_block = Rule {
        peers: vec![Peer::Block {
            cidr: "172.31.0.0/24".parse().unwrap(),
            except: vec!["172.31.0.2/32".parse().unwrap()],
        }],
        ports: vec![],
    };
    let policy = PolicyRecord {
        namespace: "x".into(),
        name: "web-out".into(),
        pod_selector: app("web"),
        ingress: None,
        egress: Some(vec![to_db, to_block]),
    };
    testbed.apply(&mut dataplane, plan(&pods, &[policy]))?;
    expect(
        &testbed,
        &[
            ("a", "10.244.0.3", 8080, ALLOWED),
            ("a", "10.244.0.3", 9090, DENIED),
            ("a", "10.244.0.4", 8080, DENIED),
            ("a", "172.31.0.2", 8080, DENIED),
            // An egress policy leaves web open to others.
            ("c", "10.244.0.2", 8080, ALLOWED),
        ],
    )?;
    let (egress_denied, _) = testbed.denied(&dataplane)?;
    ensure!(egress_denied > 0, "no drop counted");
    Ok(())
}

#[test]
fn a_table_changed_behind_the_agents_back_is_written_whole() -> Result<()> {
    require_root!("creating network namespaces");
    let testbed = Testbed::start("pdrift")?;
    let mut dataplane = PolicyDataplane::default();
    let pods = [
        pod_record("a", "web"),
        pod_record("b", "db"),
        pod_record("c", "other"),
    ];
    testbed.apply(&mut dataplane, plan(&pods, &[db_from_web()]))?;
    testbed
        .node
        .run(&words("nft delete table inet weft-policy"))?;
    // The in-place update meets no table, fails, and the table is written
    // whole instead.
    let pods = [
        pod_record("a", "web"),
        pod_record("b", "db"),
        pod_record("c", "web"),
    ];
    let applied = testbed.apply(&mut dataplane, plan(&pods, &[db_from_web()]))?;
    ensure!(applied == Applied::Replaced, "{applied:?}");
    expect(
        &testbed,
        &[
            ("a", "10.244.0.3", 9090, DENIED),
            ("c", "10.244.0.3", 8080, ALLOWED),
        ],
    )
}

#[test]
fn a_pod_claiming_an_address_of_another_nodes_slice_lets_nobody_in() -> Result<()> {
    require_root!("creating network namespaces");
    let testbed = Testbed::start("pliar")?;
    let mut dataplane = PolicyDataplane::default();
    // node-1's kubelet writes that its web pod has c's address.
    let liar = claimed("liar", "web", "node-1", &["10.244.0.4".into()]);
    let pods = vec![
        pod_record("a", "web"),
        pod_record("b", "db"),
        pod_record("c", "other"),
        liar,
    ];
    // Taken at its word, the lie lets c in as if it were web.
    testbed.apply(&mut dataplane, plan(&pods, &[db_from_web()]))?;
    expect(&testbed, &[("c", "10.244.0.3", 8080, ALLOWED)])?;

    let slice = |text: &str| text.parse().expect("a CIDR");
    let slices = NodeSlices::from([
        (
            "node-0".to_owned(),
            vec![slice("10.244.0.0/24"), slice("fd00:10:244::/64")],
        ),
        (
            "node-1".to_owned(),
            vec![slice("10.244.1.0/24"), slice("fd00:10:244:1::/64")],
        ),
    ]);
    let screened = screen_pod_addresses(pods, &slices);
    let rejected: Vec<_> = screened
        .rejected
        .iter()
        .map(|r| (r.name.as_str(), r.ip.to_string(), r.reason))
        .collect();
    ensure!(
        rejected
            == [(
                "liar",
                "10.244.0.4".into(),
                AddressRejection::OutsideNodeSlices
            )],
        "{rejected:?}"
    );
    testbed.apply(&mut dataplane, plan(&screened.pods, &[db_from_web()]))?;
    expect(
        &testbed,
        &[
            ("c", "10.244.0.3", 8080, DENIED),
            ("a", "10.244.0.3", 8080, ALLOWED),
            // c keeps its own address: the lie does not make it a duplicate.
            ("b", "10.244.0.4", 9090, ALLOWED),
        ],
    )
}

#[test]
fn a_deleted_or_hand_changed_table_is_restored_at_once() -> Result<()> {
    require_root!("creating network namespaces");
    let testbed = Testbed::start("prestore")?;
    let dataplane = Arc::new(Mutex::new(PolicyDataplane::default()));
    let pods = [
        pod_record("a", "web"),
        pod_record("b", "db"),
        pod_record("c", "other"),
    ];
    let mut registry = Registry::default();
    let metrics = AgentMetrics::register(&mut registry);
    // As the agent runs it: a thread in the node's namespace, with the
    // policy data plane's check registered.
    let watch = Netns::open(testbed.node.path())?.run_here(|| TableWatch::start(metrics))??;
    let _registration = watch.registry().register(TABLE, {
        let dataplane = dataplane.clone();
        move || dataplane.lock().expect("not poisoned").restore_if_changed()
    });
    let apply = |plan| testbed.apply(&mut dataplane.lock().expect("not poisoned"), plan);
    apply(plan(&pods, &[db_from_web()]))?;
    // The agent's own in-place update notifies too, and restores nothing.
    let pods = [
        pod_record("a", "web"),
        pod_record("b", "db"),
        pod_record("c", "web"),
    ];
    ensure!(apply(plan(&pods, &[db_from_web()]))? == Applied::Updated);
    let restored = |count: u32| -> Result<Option<()>> {
        let mut text = String::new();
        encode(&mut text, &registry)?;
        let line = format!("weft_agent_policy_table_restored_total{{table=\"{TABLE}\"}} {count}\n");
        Ok(text.contains(&line).then_some(()))
    };

    let started = Instant::now();
    testbed
        .node
        .run(&words("nft delete table inet weft-policy"))?;
    wait_for(Duration::from_secs(10), "the deleted table back", || {
        let listed = testbed
            .node
            .output(&words("nft list table inet weft-policy"))?;
        Ok(listed.status.success().then_some(()))
    })?;
    println!(
        "a deleted policy table was back after {:?}",
        started.elapsed()
    );
    expect(
        &testbed,
        &[
            ("a", "fd00:10:244::3", 9090, DENIED),
            ("remote", "10.244.0.3", 8080, DENIED),
            ("c", "10.244.0.3", 8080, ALLOWED),
        ],
    )?;
    wait_for(Duration::from_secs(10), "one restore counted", || {
        restored(1)
    })?;

    // Everything accepted before any check.
    let started = Instant::now();
    testbed
        .node
        .run(&words("nft insert rule inet weft-policy forward accept"))?;
    wait_for(Duration::from_secs(10), "the hand-made rule gone", || {
        let chain = testbed
            .node
            .run(&words("nft list chain inet weft-policy forward"))?;
        Ok((!chain.lines().any(|line| line.trim() == "accept")).then_some(()))
    })?;
    println!(
        "a rule added by hand was gone after {:?}",
        started.elapsed()
    );
    expect(&testbed, &[("remote", "10.244.0.3", 8080, DENIED)])?;
    wait_for(Duration::from_secs(10), "two restores counted", || {
        restored(2)
    })?;

    // Each restore's own notifications found the table intact: no third.
    apply(plan(&pods, &[]))?;
    expect(&testbed, &[("remote", "10.244.0.3", 8080, ALLOWED)])?;
    ensure!(
        restored(2)?.is_some(),
        "a restore after the agent's own write"
    );
    Ok(())
}
