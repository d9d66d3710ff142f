//! Network-namespace tests of the NetworkPolicy data plane, without an API
//! server: one node namespace with the pod bridge, three pods on it and a
//! "remote" namespace routed through the node (a pod on another node, or the
//! outside). Plans compiled from pod and policy records are applied through
//! the agent's `PolicyDataplane`, and TCP connections between the
//! namespaces show what passes. Needs root (see
//! `weft_testing::root_available`); every namespace is removed on success
//! and on failure.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use weft_agent::policy::compile::{compile, PolicyPlan};
use weft_agent::policy::enforce::ensure_bridge_netfilter;
use weft_agent::policy::model::{
    NamespaceRecord, NamespaceScope, Peer, PodRecord, PolicyRecord, PortMatch, PortRule, Protocol,
    Rule,
};
use weft_agent::policy::nft::{Applied, PolicyDataplane};
use weft_agent::policy::selector::{Requirement, Selector};
use weft_core::netns::Netns;
use weft_testing::{require_root, TestNetns};

/// A command line written as one string, split into its words for
/// [`TestNetns::run`].
fn words(command: &str) -> Vec<&str> {
    command.split_whitespace().collect()
}

/// The node with bridge `weft0` (10.244.0.1/24, fd00:10:244::1/64), pods
/// `a`, `b`, `c` at .2, .3, .4 and a remote namespace at 172.31.0.2 routed
/// through the node.
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
            "ip link add weft0 type bridge",
            "ip addr add 10.244.0.1/24 dev weft0",
            "ip addr add fd00:10:244::1/64 dev weft0 nodad",
            "ip link set weft0 up",
            "sysctl -qw net.ipv4.ip_forward=1",
            "sysctl -qw net.ipv6.conf.all.forwarding=1",
        ] {
            node.run(&words(command))?;
        }
        for (i, (name, pod)) in pods.iter().enumerate() {
            let host = format!("veth-{name}");
            let link = format!(
                "ip link add {host} type veth peer name eth0 netns {}",
                pod.name()
            );
            node.run(&words(&link))?;
            node.run(&words(&format!("ip link set {host} master weft0 up")))?;
            for command in [
                format!("ip addr add 10.244.0.{}/24 dev eth0", i + 2),
                format!("ip addr add fd00:10:244::{}/64 dev eth0 nodad", i + 2),
                "ip link set eth0 up".into(),
                "ip link set lo up".into(),
                "ip route add default via 10.244.0.1".into(),
                "ip -6 route add default via fd00:10:244::1".into(),
            ] {
                pod.run(&words(&command))?;
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
        Netns::open(self.node.path())?.run_here(|| {
            ensure_bridge_netfilter()?;
            anyhow::Ok(dataplane.apply(plan)?)
        })?
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
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "x", "name": name, "labels": {"app": app}},
        "spec": {"nodeName": "node-0", "containers": [
            {"name": "server", "ports": [{"name": "http", "containerPort": 8080}]},
        ]},
        "status": {"phase": "Running", "podIPs": [
            {"ip": format!("10.244.0.{index}")},
            {"ip": format!("fd00:10:244::{index}")},
        ]},
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
