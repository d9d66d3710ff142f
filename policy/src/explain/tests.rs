use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::Index;

use super::*;
use crate::compile::tests::{any_namespaces, any_pods, any_policies, app, ip, labels, passes, pod};
use crate::compile::{compile, PolicyPlan};
use crate::model::{
    screen_pod_addresses, NamespaceScope, NodeSlices, Peer, PortMatch, PortRule, Rule,
};
use crate::selector::{Requirement, Selector};

fn policy(
    name: &str,
    selects: &str,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
) -> PolicyRecord {
    PolicyRecord {
        namespace: "x".into(),
        name: name.into(),
        pod_selector: app(selects),
        ingress,
        egress,
    }
}

fn pods_peer(namespaces: NamespaceScope, pods: Selector) -> Peer {
    Peer::Pods { namespaces, pods }
}

fn block(cidr: &str, except: &[&str]) -> Peer {
    Peer::Block {
        cidr: cidr.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

fn port(protocol: Protocol, port: PortMatch) -> PortRule {
    PortRule { protocol, port }
}

/// TCP to `port` from one pod to another, each by its first address.
fn tcp<'a>(from: &'a PodRecord, to: &'a PodRecord, port: u16) -> Query<'a> {
    let address = |pod: &PodRecord| pod.ips.iter().chain(&pod.withheld).copied().next();
    Query {
        source_pod: Some(from),
        source_ip: address(from).unwrap(),
        destination_pod: Some(to),
        destination_ip: address(to).unwrap(),
        protocol: Protocol::Tcp,
        port,
    }
}

fn admission(policy: &str, rule: usize, peer: Option<usize>, port: Option<usize>) -> Admission {
    Admission {
        policy: PolicyRef {
            namespace: "x".into(),
            name: policy.into(),
        },
        rule,
        peer,
        port,
    }
}

/// A web pod on node-0 and a client pod on node-1, both in x.
fn web_and_client() -> [PodRecord; 2] {
    [
        pod("x", "web", "node-0", &["10.244.0.2"], "web"),
        pod("x", "client", "node-1", &["10.244.1.2"], "client"),
    ]
}

#[test]
fn without_policies_everything_passes_and_nothing_isolates() {
    let pods = web_and_client();
    let verdict = explain(&pods, &[], &[], &tcp(&pods[1], &pods[0], 80));
    assert!(verdict.allowed());
    let open = |direction| SideVerdict {
        direction,
        isolating: vec![],
        admitted_by: vec![],
        withheld: false,
    };
    assert_eq!(verdict.egress, Some(open(Direction::Egress)));
    assert_eq!(verdict.ingress, Some(open(Direction::Ingress)));
}

#[test]
fn a_policy_without_rules_isolates_and_admits_nothing() {
    let pods = web_and_client();
    let policies = [policy("deny", "web", Some(vec![]), None)];
    let verdict = explain(&pods, &[], &policies, &tcp(&pods[1], &pods[0], 80));
    assert!(!verdict.allowed());
    let ingress = verdict.ingress.unwrap();
    assert_eq!(ingress.isolating[0].to_string(), "x/deny");
    assert!(ingress.admitted_by.is_empty() && !ingress.allows());
    // It says nothing of egress, which it does not isolate.
    assert!(verdict.egress.unwrap().allows());
}

#[test]
fn a_direction_a_policy_leaves_out_stays_open() {
    let pods = web_and_client();
    // Isolates web for egress only: ingress to web is open.
    let policies = [policy("out", "web", None, Some(vec![]))];
    let to_web = explain(&pods, &[], &policies, &tcp(&pods[1], &pods[0], 80));
    assert!(to_web.allowed());
    assert!(to_web.ingress.unwrap().isolating.is_empty());
    let from_web = explain(&pods, &[], &policies, &tcp(&pods[0], &pods[1], 80));
    assert!(!from_web.allowed());
    assert_eq!(from_web.egress.unwrap().isolating.len(), 1);
}

#[test]
fn namespace_selectors_take_in_pods_of_matching_namespaces() {
    let pods = [
        pod("x", "web", "node-0", &["10.244.0.2"], "web"),
        pod("y", "red", "node-1", &["10.244.1.2"], "client"),
        pod("z", "blue", "node-1", &["10.244.1.3"], "client"),
    ];
    let namespaces = [("y", "red"), ("z", "blue")].map(|(name, team)| NamespaceRecord {
        name: name.into(),
        labels: labels(&[("team", team)]),
    });
    let red_team = Selector::of(vec![Requirement::In("team".into(), vec!["red".into()])]);
    let policies = [policy(
        "red-in",
        "web",
        Some(vec![Rule {
            peers: vec![
                pods_peer(NamespaceScope::Own, app("client")),
                pods_peer(NamespaceScope::Matching(red_team), Selector::everything()),
            ],
            ports: vec![],
        }]),
        None,
    )];
    let from =
        |client: &PodRecord| explain(&pods, &namespaces, &policies, &tcp(client, &pods[0], 80));
    assert_eq!(
        from(&pods[1]).ingress.unwrap().admitted_by,
        [admission("red-in", 0, Some(1), None)]
    );
    assert!(!from(&pods[2]).allowed());
}

#[test]
fn ip_blocks_leave_out_their_exceptions() {
    let pods = web_and_client();
    let policies = [policy(
        "out",
        "web",
        None,
        Some(vec![Rule {
            peers: vec![block("10.0.0.0/8", &["10.1.0.0/16"])],
            ports: vec![],
        }]),
    )];
    let to = |address| {
        let query = Query {
            destination_pod: None,
            destination_ip: ip(address),
            ..tcp(&pods[0], &pods[0], 443)
        };
        explain(&pods, &[], &policies, &query)
    };
    let inside = to("10.2.3.4");
    assert!(inside.allowed() && inside.ingress.is_none());
    assert_eq!(
        inside.egress.unwrap().admitted_by,
        [admission("out", 0, Some(0), None)]
    );
    assert!(!to("10.1.2.3").allowed());
    assert!(!to("192.0.2.1").allowed());
}

#[test]
fn named_ports_resolve_on_the_pod_the_traffic_goes_to() {
    let [web, client] = web_and_client();
    let mut other = pod("x", "other", "node-1", &["10.244.1.3"], "client");
    other.named_ports[0].port = 9090;
    let pods = [web, client, other];
    let http = |peer| Rule {
        peers: vec![peer],
        ports: vec![port(Protocol::Tcp, PortMatch::Named("http".into()))],
    };
    let policies = [
        policy(
            "in",
            "web",
            Some(vec![http(pods_peer(NamespaceScope::Own, app("client")))]),
            None,
        ),
        policy(
            "out",
            "web",
            None,
            Some(vec![http(block("10.244.0.0/16", &[]))]),
        ),
    ];
    let judge = |from, to, port| explain(&pods, &[], &policies, &tcp(&pods[from], &pods[to], port));
    // Ingress: web's own "http", 8080, whoever sends.
    assert_eq!(
        judge(1, 0, 8080).ingress.unwrap().admitted_by,
        [admission("in", 0, Some(0), Some(0))]
    );
    assert!(!judge(2, 0, 9090).allowed());
    // Egress: the target's "http", 8080 on client, 9090 on other.
    assert!(judge(0, 1, 8080).egress.unwrap().allows());
    assert!(!judge(0, 1, 9090).egress.unwrap().allows());
    assert_eq!(
        judge(0, 2, 9090).egress.unwrap().admitted_by,
        [admission("out", 0, Some(0), Some(0))]
    );
    // An address no pod claims has no named ports.
    let outside = Query {
        destination_pod: None,
        destination_ip: ip("10.244.9.9"),
        ..tcp(&pods[0], &pods[1], 8080)
    };
    assert!(!explain(&pods, &[], &policies, &outside).allowed());
}

#[test]
fn port_ranges_end_at_end_port_and_keep_their_protocol() {
    let pods = web_and_client();
    let policies = [policy(
        "range",
        "web",
        Some(vec![
            Rule {
                peers: vec![],
                ports: vec![
                    port(Protocol::Udp, PortMatch::Range(8000, 8080)),
                    port(Protocol::Tcp, PortMatch::Range(8000, 8080)),
                ],
            },
            Rule {
                peers: vec![block("10.244.1.0/24", &[])],
                ports: vec![port(Protocol::Tcp, PortMatch::Any)],
            },
        ]),
        None,
    )];
    let on = |protocol, port| {
        let query = Query {
            protocol,
            ..tcp(&pods[1], &pods[0], port)
        };
        explain(&pods, &[], &policies, &query).ingress.unwrap()
    };
    assert_eq!(
        on(Protocol::Tcp, 8080).admitted_by,
        [
            admission("range", 0, None, Some(1)),
            admission("range", 1, Some(0), Some(0))
        ]
    );
    assert_eq!(
        on(Protocol::Udp, 8000).admitted_by,
        [admission("range", 0, None, Some(0))]
    );
    assert!(!on(Protocol::Udp, 8081).allows());
    assert!(!on(Protocol::Sctp, 8000).allows());
}

#[test]
fn an_address_claimed_twice_is_isolated_with_nothing_allowed() {
    let mut db = pod("x", "db", "node-0", &[], "db");
    db.withheld = vec![ip("10.244.0.3")];
    let mut web = pod("x", "web", "node-0", &[], "web");
    web.withheld = db.withheld.clone();
    let client = pod("x", "client", "node-1", &["10.244.1.2"], "client");
    let pods = [db, web, client];
    let everything = Some(vec![Rule::default()]);
    let policies = [policy("db", "db", everything.clone(), everything)];
    // db's policy isolates the address, so asking as web, whom no policy
    // selects, gives the same answer: the node keys on the address.
    for claimant in &pods[..2] {
        let ingress = explain(&pods, &[], &policies, &tcp(&pods[2], claimant, 80))
            .ingress
            .unwrap();
        assert!(ingress.withheld && !ingress.allows(), "{ingress:?}");
        assert!(ingress.admitted_by.is_empty());
        assert_eq!(ingress.isolating[0].to_string(), "x/db");
    }
    let from_web = explain(&pods, &[], &policies, &tcp(&pods[1], &pods[2], 80));
    assert!(from_web.egress.unwrap().withheld);
}

// The property: explain agrees with the compiled plans, and every
// admission it names admits on its own.

/// Pods as the agent sees them: screened, with some addresses claimed
/// twice and so withheld.
fn any_screened_pods() -> impl Strategy<Value = Vec<PodRecord>> {
    let copies = prop::collection::vec((any::<Index>(), any::<Index>()), 0..3);
    (any_pods(), copies).prop_map(|(mut pods, copies)| {
        if !pods.is_empty() {
            for (from, to) in copies {
                let claimed = pods[from.index(pods.len())].ips[0];
                let len = pods.len();
                pods[to.index(len)].ips.push(claimed);
            }
        }
        let slices: NodeSlices = (0..2)
            .map(|node| {
                let slices = [
                    format!("10.244.{node}.0/24"),
                    format!("fd00:10:244:{node}::/64"),
                ];
                (
                    format!("node-{node}"),
                    slices.iter().map(|s| s.parse().unwrap()).collect(),
                )
            })
            .collect();
        screen_pod_addresses(pods, &slices).pods
    })
}

const TRAFFIC: [(Protocol, u16); 8] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 8080),
    (Protocol::Tcp, 81),
    (Protocol::Udp, 53),
    (Protocol::Udp, 8080),
    (Protocol::Tcp, 53),
    (Protocol::Sctp, 81),
    (Protocol::Tcp, 443),
];

/// Every pod address (kept or withheld) with its pod, and some addresses
/// no pod claims.
fn endpoints(pods: &[PodRecord]) -> Vec<(Option<&PodRecord>, IpAddr)> {
    let outside = [
        "8.8.8.8",
        "10.244.9.9",
        "10.244.1.200",
        "fd00:10:244:1::99",
        "2001:db8::1",
    ];
    pods.iter()
        .flat_map(|pod| {
            pod.ips
                .iter()
                .chain(&pod.withheld)
                .map(move |ip| (Some(pod), *ip))
        })
        .chain(outside.iter().map(|text| (None, ip(text))))
        .collect()
}

/// The side's local pod and address, and the peer address, of `query`.
fn ends<'q>(query: &Query<'q>, direction: Direction) -> Option<(&'q PodRecord, IpAddr, IpAddr)> {
    match direction {
        Direction::Egress => query
            .source_pod
            .map(|pod| (pod, query.source_ip, query.destination_ip)),
        Direction::Ingress => query
            .destination_pod
            .map(|pod| (pod, query.destination_ip, query.source_ip)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For every pair of endpoints and a spread of traffic, each end's
    /// verdict is what the plan compiled for that end's node enforces.
    #[test]
    fn explain_agrees_with_the_compiled_plans(
        pods in any_screened_pods(),
        namespaces in any_namespaces(),
        policies in any_policies(),
    ) {
        let plans: BTreeMap<&str, PolicyPlan> = ["node-0", "node-1"]
            .into_iter()
            .map(|node| (node, compile(node, &pods, &namespaces, &policies)))
            .collect();
        let endpoints = endpoints(&pods);
        for &(source_pod, source_ip) in &endpoints {
            for &(destination_pod, destination_ip) in &endpoints {
                if source_ip.is_ipv4() != destination_ip.is_ipv4() || source_ip == destination_ip {
                    continue;
                }
                for (protocol, port) in TRAFFIC {
                    let query = Query { source_pod, source_ip, destination_pod, destination_ip, protocol, port };
                    let verdict = explain(&pods, &namespaces, &policies, &query);
                    for (direction, side) in [(Direction::Egress, &verdict.egress), (Direction::Ingress, &verdict.ingress)] {
                        let Some((local, local_ip, peer_ip)) = ends(&query, direction) else {
                            prop_assert!(side.is_none());
                            continue;
                        };
                        let side = side.as_ref().unwrap();
                        let plan = direction.of(&plans[local.node.as_str()]);
                        prop_assert_eq!(
                            side.allows(),
                            passes(plan, local_ip, peer_ip, protocol.number(), port),
                            "{:?} {:?}", query, side
                        );
                        prop_assert_eq!(side.isolating.is_empty(), !plan.isolated.contains_key(&local_ip));
                        prop_assert_eq!(side.direction, direction);
                        prop_assert!(!side.withheld || side.admitted_by.is_empty());
                    }
                }
            }
        }
    }

    /// Each (policy, rule, peer, port) explain names admits the packet on
    /// its own, compiled as a policy of that one rule with that one peer
    /// and port; and each it leaves out does not.
    #[test]
    fn explain_names_every_admission_and_only_those(
        pods in any_screened_pods(),
        namespaces in any_namespaces(),
        policies in any_policies(),
        picks in prop::collection::vec((any::<Index>(), any::<Index>(), any::<Index>()), 4),
    ) {
        let endpoints = endpoints(&pods);
        for (source, destination, traffic) in picks {
            let (source_pod, source_ip) = *source.get(&endpoints);
            let (destination_pod, destination_ip) = *destination.get(&endpoints);
            let (protocol, port) = *traffic.get(&TRAFFIC);
            let query = Query { source_pod, source_ip, destination_pod, destination_ip, protocol, port };
            let verdict = explain(&pods, &namespaces, &policies, &query);
            for (direction, side) in [(Direction::Egress, &verdict.egress), (Direction::Ingress, &verdict.ingress)] {
                let (Some(side), Some((local, local_ip, peer_ip))) = (side, ends(&query, direction)) else {
                    continue;
                };
                if side.withheld {
                    continue;
                }
                for policy in policies.iter().filter(|p| side.isolating.contains(&PolicyRef::of(p))) {
                    for (r, rule) in direction.rules(policy).unwrap().iter().enumerate() {
                        let indices = |len: usize| -> Vec<Option<usize>> {
                            if len == 0 { vec![None] } else { (0..len).map(Some).collect() }
                        };
                        for peer in indices(rule.peers.len()) {
                            for port_index in indices(rule.ports.len()) {
                                let alone = Rule {
                                    peers: peer.map(|k| vec![rule.peers[k].clone()]).unwrap_or_default(),
                                    ports: port_index.map(|j| vec![rule.ports[j].clone()]).unwrap_or_default(),
                                };
                                let mut only = policy.clone();
                                (only.ingress, only.egress) = match direction {
                                    Direction::Ingress => (Some(vec![alone]), None),
                                    Direction::Egress => (None, Some(vec![alone])),
                                };
                                let plan = compile(&local.node, &pods, &namespaces, &[only]);
                                let admits = passes(direction.of(&plan), local_ip, peer_ip, protocol.number(), port);
                                let named = side.admitted_by.contains(&Admission {
                                    policy: PolicyRef::of(policy),
                                    rule: r,
                                    peer,
                                    port: port_index,
                                });
                                prop_assert_eq!(named, admits, "{:?} rule {} peer {:?} port {:?}: {:?}", query, r, peer, port_index, side);
                            }
                        }
                    }
                }
            }
        }
    }
}
