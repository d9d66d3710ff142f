use proptest::prelude::*;

use super::*;
use crate::model::{NamedPort, Protocol};
use crate::selector::{Requirement, Selector};

pub(crate) fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A pod labelled `app`, with the named port `http` (TCP 8080).
pub(crate) fn pod(namespace: &str, name: &str, node: &str, ips: &[&str], app: &str) -> PodRecord {
    PodRecord {
        namespace: namespace.into(),
        name: name.into(),
        labels: labels(&[("app", app)]),
        ips: ips.iter().map(|text| ip(text)).collect(),
        withheld: Vec::new(),
        node: node.into(),
        named_ports: vec![NamedPort {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
    }
}

pub(crate) fn app(value: &str) -> Selector {
    Selector::of(vec![Requirement::In("app".into(), vec![value.into()])])
}

/// What the compiled plan lets through, evaluated as the data plane does:
/// one lookup for the allow set, one for an entry.
pub(crate) fn passes(
    plan: &DirectionPlan,
    local: IpAddr,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> bool {
    match plan.isolated.get(&local) {
        None => true,
        Some(set) => plan.allow_sets[set].iter().any(|allow| {
            allow.peer.contains(peer)
                && (allow.protocols.0..=allow.protocols.1).contains(&protocol)
                && (allow.ports.0..=allow.ports.1).contains(&port)
        }),
    }
}

#[test]
fn blocks_leave_out_their_holes() {
    let ranges = block_ranges(
        &"10.0.0.0/8".parse().unwrap(),
        &[
            "10.1.0.0/16".parse().unwrap(),
            "10.0.0.0/24".parse().unwrap(),
            "10.1.2.0/24".parse().unwrap(),
        ],
    );
    let shown: Vec<_> = ranges
        .iter()
        .map(|r| format!("{}-{}", r.first, r.last))
        .collect();
    assert_eq!(
        shown,
        vec!["10.0.1.0-10.0.255.255", "10.2.0.0-10.255.255.255"]
    );
    assert!(block_ranges(
        &"10.0.0.0/8".parse().unwrap(),
        &["10.0.0.0/8".parse().unwrap()]
    )
    .is_empty());
    let whole = block_ranges(&"fd00::/8".parse().unwrap(), &[]);
    assert_eq!(
        whole,
        vec![AddressRange {
            first: ip("fd00::"),
            last: ip("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        }]
    );
}

#[test]
fn a_pod_no_policy_selects_is_not_isolated() {
    let pods = [pod("x", "a", "node-0", &["10.244.0.2"], "a")];
    let policies = [PolicyRecord {
        namespace: "x".into(),
        name: "db-only".into(),
        pod_selector: app("db"),
        ingress: Some(vec![]),
        egress: None,
    }];
    let plan = compile("node-0", &pods, &[], &policies);
    assert_eq!(plan, PolicyPlan::default());
}

#[test]
fn pods_with_the_same_policies_share_one_allow_set() {
    let pods = [
        pod("x", "a", "node-0", &["10.244.0.2", "fd00:10:244::2"], "web"),
        pod("x", "b", "node-0", &["10.244.0.3"], "web"),
        pod("x", "c", "node-1", &["10.244.1.2"], "client"),
        pod("y", "d", "node-0", &["10.244.0.4"], "web"),
    ];
    // As the API server would hand it over.
    let policy: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "x", "name": "web"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                    "ports": [{"port": "http"}],
                }],
            },
        }))
        .unwrap();
    let policies = [PolicyRecord::of(&policy).unwrap()];
    let plan = compile("node-0", &pods, &[], &policies);
    assert_eq!(plan.ingress.allow_sets.len(), 1);
    assert_eq!(plan.ingress.isolated.len(), 3, "{:?}", plan.ingress);
    assert!(!plan.ingress.isolated.contains_key(&ip("10.244.0.4")));
    let entries: Vec<_> = plan
        .ingress
        .allow_sets
        .values()
        .flatten()
        .copied()
        .collect();
    assert_eq!(
        entries,
        vec![Allow {
            peer: AddressRange::single(ip("10.244.1.2")),
            protocols: (6, 6),
            ports: (8080, 8080),
        }]
    );
    assert!(plan.egress.isolated.is_empty());
}

#[test]
fn an_address_two_pods_claim_selects_nothing_and_stays_isolated_denying_all() {
    // b and d both claim 10.244.0.3; screening withheld it from both.
    let mut b = pod("x", "b", "node-0", &[], "db");
    b.withheld = vec![ip("10.244.0.3")];
    let mut d = pod("x", "d", "node-0", &[], "web");
    d.withheld = vec![ip("10.244.0.3")];
    let pods = [
        pod("x", "a", "node-0", &["10.244.0.2"], "db"),
        b,
        d,
        pod("x", "c", "node-1", &["10.244.1.2"], "web"),
    ];
    let policies = [PolicyRecord {
        namespace: "x".into(),
        name: "db-from-web".into(),
        pod_selector: app("db"),
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespaces: NamespaceScope::Own,
                pods: app("web"),
            }],
            ports: vec![],
        }]),
        egress: None,
    }];
    let plan = compile("node-0", &pods, &[], &policies);
    let ingress = &plan.ingress;
    // d (web) lets nothing in through the withheld address, and the
    // address is isolated because b (db) is: nothing reaches it.
    assert!(passes(ingress, ip("10.244.0.2"), ip("10.244.1.2"), 6, 80));
    assert!(!passes(ingress, ip("10.244.0.2"), ip("10.244.0.3"), 6, 80));
    assert!(!passes(ingress, ip("10.244.0.3"), ip("10.244.1.2"), 6, 80));
    assert_eq!(ingress.allow_sets.len(), 2);
    // Not isolated by any policy: withheld addresses stay out of the map.
    let mut e = pod("x", "e", "node-0", &[], "other");
    e.withheld = vec![ip("10.244.0.9")];
    let plan = compile("node-0", &[e], &[], &policies);
    assert_eq!(plan, PolicyPlan::default());
}

#[test]
fn named_port_sets_are_named_alike_whatever_the_policy_order() {
    // Two policies selecting one pod, each with a named port: the set's
    // name keeps each policy's resolution with that policy when the names
    // are sorted (found by the order property test).
    let pods = [pod("x", "web", "node-0", &["10.244.0.2"], "web")];
    let policy = |name: &str, port: &str| PolicyRecord {
        namespace: "x".into(),
        name: name.into(),
        pod_selector: Selector::default(),
        ingress: Some(vec![Rule {
            peers: vec![],
            ports: vec![PortRule {
                protocol: Protocol::Tcp,
                port: PortMatch::Named(port.into()),
            }],
        }]),
        egress: None,
    };
    let forward = [policy("p0", "missing"), policy("p1", "http")];
    let reversed = [forward[1].clone(), forward[0].clone()];
    assert_eq!(
        compile("node-0", &pods, &[], &forward),
        compile("node-0", &pods, &[], &reversed)
    );
}

#[test]
fn named_ports_of_different_rules_that_resolve_alike_do_not_share_a_set() {
    // x resolves "http" to 8080, y resolves "web" to 8080: the same
    // numbers, through different rules with different peers.
    let mut x = pod("x", "x", "node-0", &["10.244.0.2"], "web");
    let mut y = pod("x", "y", "node-0", &["10.244.0.3"], "web");
    y.named_ports[0].name = "web".into();
    x.named_ports[0].port = 8080;
    let pods = [
        x,
        y,
        pod("x", "a", "node-1", &["10.244.1.2"], "a"),
        pod("x", "b", "node-1", &["10.244.1.3"], "b"),
    ];
    let rule = |from: &str, port: &str| Rule {
        peers: vec![Peer::Pods {
            namespaces: NamespaceScope::Own,
            pods: app(from),
        }],
        ports: vec![PortRule {
            protocol: Protocol::Tcp,
            port: PortMatch::Named(port.into()),
        }],
    };
    let policies = [PolicyRecord {
        namespace: "x".into(),
        name: "web".into(),
        pod_selector: app("web"),
        ingress: Some(vec![rule("a", "http"), rule("b", "web")]),
        egress: None,
    }];
    let plan = compile("node-0", &pods, &[], &policies);
    let ingress = &plan.ingress;
    assert!(passes(ingress, ip("10.244.0.2"), ip("10.244.1.2"), 6, 8080));
    assert!(!passes(
        ingress,
        ip("10.244.0.2"),
        ip("10.244.1.3"),
        6,
        8080
    ));
    assert!(passes(ingress, ip("10.244.0.3"), ip("10.244.1.3"), 6, 8080));
    assert!(!passes(
        ingress,
        ip("10.244.0.3"),
        ip("10.244.1.2"),
        6,
        8080
    ));
}

/// A plan with one isolated address per direction, its allow set named
/// `ingress_set` and `egress_set`.
fn small_plan(ingress_set: u64, egress_set: u64) -> PolicyPlan {
    let entry = |peer: &str, protocol: u8, port: u16| Allow {
        peer: AddressRange::single(ip(peer)),
        protocols: (protocol, protocol),
        ports: (port, port),
    };
    let direction = |id: u64, address: &str, entries: Vec<Allow>| DirectionPlan {
        isolated: [(ip(address), AllowSetId(id))].into(),
        allow_sets: [(AllowSetId(id), entries.into_iter().collect())].into(),
    };
    PolicyPlan {
        ingress: direction(
            ingress_set,
            "10.244.0.2",
            vec![entry("10.244.1.2", 6, 80), entry("fd00::2", 17, 53)],
        ),
        egress: direction(egress_set, "10.244.0.3", vec![entry("10.244.1.3", 6, 443)]),
    }
}

#[test]
fn fingerprints_do_not_depend_on_allow_set_names() {
    assert_eq!(
        small_plan(1, 2).fingerprint(),
        small_plan(7, 7).fingerprint()
    );
    // Two addresses sharing a set are the same as each with a copy of it.
    let mut shared = small_plan(1, 2);
    shared
        .ingress
        .isolated
        .insert(ip("10.244.0.9"), AllowSetId(1));
    let mut copied = shared.clone();
    let set = copied.ingress.allow_sets[&AllowSetId(1)].clone();
    copied.ingress.allow_sets.insert(AllowSetId(3), set);
    copied
        .ingress
        .isolated
        .insert(ip("10.244.0.9"), AllowSetId(3));
    assert_eq!(shared.fingerprint(), copied.fingerprint());
}

#[test]
fn fingerprints_change_with_whatever_the_plan_enforces() {
    fn ingress_set(p: &mut PolicyPlan) -> &mut BTreeSet<Allow> {
        p.ingress.allow_sets.get_mut(&AllowSetId(1)).unwrap()
    }
    let plan = small_plan(1, 2);
    let edited = |edit: &dyn Fn(&mut PolicyPlan)| {
        let mut other = plan.clone();
        edit(&mut other);
        other.fingerprint()
    };
    let entry_edited = |edit: &dyn Fn(&mut Allow)| {
        edited(&|p| {
            let mut entry = ingress_set(p).pop_first().unwrap();
            edit(&mut entry);
            ingress_set(p).insert(entry);
        })
    };
    let fingerprints = [
        plan.fingerprint(),
        PolicyPlan::default().fingerprint(),
        entry_edited(&|entry| entry.peer.last = ip("10.244.1.3")),
        entry_edited(&|entry| entry.protocols = (17, 17)),
        entry_edited(&|entry| entry.ports = (80, 81)),
        edited(&|p| {
            ingress_set(p).pop_first();
        }),
        edited(&|p| p.ingress.isolated = [(ip("10.244.0.4"), AllowSetId(1))].into()),
        edited(&|p| {
            p.ingress.isolated.insert(ip("10.244.0.4"), AllowSetId(1));
        }),
        edited(&|p| p.ingress.isolated.clear()),
        // The same address with the other direction's set.
        edited(&|p| *ingress_set(p) = p.egress.allow_sets[&AllowSetId(2)].clone()),
        // The same isolation in the other direction is another plan.
        edited(&|p| std::mem::swap(&mut p.ingress, &mut p.egress)),
        edited(&|p| p.egress = DirectionPlan::default()),
    ];
    let distinct: BTreeSet<&String> = fingerprints.iter().collect();
    assert_eq!(distinct.len(), fingerprints.len(), "{fingerprints:?}");
}

#[test]
fn fingerprints_are_fixed_across_builds() {
    // Pins the encoding (the values were worked out apart from this code):
    // a change here changes every node's fingerprint,
    // and nodes of two versions would no longer agree.
    assert_eq!(PolicyPlan::default().fingerprint(), "1a46ea5e601610d5");
    assert_eq!(small_plan(1, 2).fingerprint(), "a2b91237134ed982");
    let fingerprint = small_plan(1, 2).fingerprint();
    assert_eq!(fingerprint.len(), 16);
    assert!(fingerprint
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
}

// Property tests: the compiled plan against a straightforward reading of
// the API's semantics, over random pods, namespaces and policies. The
// generators serve `explain`'s tests too.

const NAMESPACES: [&str; 3] = ["x", "y", "z"];

fn any_selector() -> impl Strategy<Value = Selector> {
    let requirement = prop_oneof![
        prop::sample::select(vec!["a", "b", "c"])
            .prop_map(|v| Requirement::In("app".into(), vec![v.into()])),
        prop::sample::select(vec!["a", "b"])
            .prop_map(|v| Requirement::NotIn("app".into(), vec![v.into()])),
        Just(Requirement::Exists("tier".into())),
        Just(Requirement::DoesNotExist("tier".into())),
        prop::sample::select(vec!["x", "y", "z"])
            .prop_map(|v| Requirement::In("ns".into(), vec![v.into()])),
        Just(Requirement::In(
            "team".into(),
            vec!["red".into(), "blue".into()]
        )),
    ];
    prop::collection::vec(requirement, 0..3).prop_map(Selector::of)
}

fn any_peer() -> impl Strategy<Value = Peer> {
    let cidr = prop::sample::select(vec![
        ("10.244.0.0/16", vec![]),
        ("10.244.0.0/16", vec!["10.244.0.0/24", "10.244.1.3/32"]),
        ("10.244.1.0/24", vec!["10.244.1.0/25"]),
        ("0.0.0.0/0", vec!["10.244.0.0/16"]),
        ("8.8.8.0/24", vec![]),
        ("fd00:10:244::/48", vec!["fd00:10:244:1::/64"]),
        ("::/0", vec![]),
    ]);
    prop_oneof![
        (any_selector(), any_selector(), any::<bool>()).prop_map(|(ns, pods, own)| Peer::Pods {
            namespaces: if own {
                NamespaceScope::Own
            } else {
                NamespaceScope::Matching(ns)
            },
            pods,
        }),
        cidr.prop_map(|(cidr, except)| Peer::Block {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        }),
    ]
}

fn any_port_rule() -> impl Strategy<Value = PortRule> {
    let protocol = prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]);
    let port = prop_oneof![
        Just(PortMatch::Any),
        Just(PortMatch::Range(80, 80)),
        Just(PortMatch::Range(80, 8080)),
        Just(PortMatch::Range(53, 53)),
        Just(PortMatch::Named("http".into())),
        Just(PortMatch::Named("dns".into())),
        Just(PortMatch::Named("serve".into())),
        Just(PortMatch::Named("missing".into())),
    ];
    (protocol, port).prop_map(|(protocol, port)| PortRule { protocol, port })
}

fn any_rules() -> impl Strategy<Value = Option<Vec<Rule>>> {
    let rule = (
        prop::collection::vec(any_peer(), 0..3),
        prop::collection::vec(any_port_rule(), 0..3),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports });
    prop::option::of(prop::collection::vec(rule, 0..3))
}

fn any_policy() -> impl Strategy<Value = PolicyRecord> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        any_selector(),
        any_rules(),
        any_rules(),
    )
        .prop_map(|(namespace, pod_selector, ingress, egress)| PolicyRecord {
            namespace: namespace.into(),
            name: "p".into(),
            pod_selector,
            ingress,
            egress,
        })
}

/// Up to four policies, each with a name of its own.
pub(crate) fn any_policies() -> impl Strategy<Value = Vec<PolicyRecord>> {
    prop::collection::vec(any_policy(), 0..5).prop_map(|mut policies| {
        for (i, policy) in policies.iter_mut().enumerate() {
            policy.name = format!("p{i}");
        }
        policies
    })
}

/// Up to eight pods on node-0 and node-1, each with its own addresses in
/// its node's slices (10.244.<node>.0/24, fd00:10:244:<node>::/64).
pub(crate) fn any_pods() -> impl Strategy<Value = Vec<PodRecord>> {
    let ports = prop::sample::subsequence(
        vec![
            ("http", 80, Protocol::Tcp),
            ("http", 8080, Protocol::Udp),
            ("dns", 53, Protocol::Udp),
            ("dns", 53, Protocol::Tcp),
            ("serve", 81, Protocol::Sctp),
            ("serve", 80, Protocol::Tcp),
        ],
        0..3,
    );
    let one = (
        prop::sample::select(NAMESPACES.to_vec()),
        prop::sample::select(vec!["a", "b", "c"]),
        prop::option::of(Just("edge")),
        0usize..2,
        any::<bool>(),
        ports,
    );
    prop::collection::vec(one, 0..8).prop_map(|pods| {
        pods.into_iter()
            .enumerate()
            .map(|(i, (namespace, app, tier, node, dual, ports))| {
                let mut labels = labels(&[("app", app)]);
                labels.extend(tier.map(|t| ("tier".to_string(), t.to_string())));
                let mut ips = vec![IpAddr::from([10, 244, node as u8, 2 + i as u8])];
                if dual {
                    ips.push(format!("fd00:10:244:{node}::{}", 2 + i).parse().unwrap());
                }
                PodRecord {
                    namespace: namespace.into(),
                    name: format!("pod-{i}"),
                    labels,
                    ips,
                    withheld: Vec::new(),
                    node: format!("node-{node}"),
                    named_ports: ports
                        .into_iter()
                        .map(|(name, port, protocol)| NamedPort {
                            name: name.into(),
                            port,
                            protocol,
                        })
                        .collect(),
                }
            })
            .collect()
    })
}

pub(crate) fn any_namespaces() -> impl Strategy<Value = Vec<NamespaceRecord>> {
    prop::collection::vec(
        prop::option::of(prop::sample::select(vec!["red", "blue"])),
        3,
    )
    .prop_map(|teams| {
        NAMESPACES
            .iter()
            .zip(teams)
            .map(|(name, team)| {
                let mut labels = labels(&[("ns", name)]);
                labels.extend(team.map(|t| ("team".to_string(), t.to_string())));
                NamespaceRecord {
                    name: name.to_string(),
                    labels,
                }
            })
            .collect()
    })
}

/// The API's semantics, read directly: whether traffic between `local`
/// and the peer at `peer_ip` (the pod `peer`, if it is one) with
/// `protocol` and destination `port` is allowed in `direction` at `local`.
#[allow(clippy::too_many_arguments)]
fn reference(
    namespaces: &[NamespaceRecord],
    policies: &[PolicyRecord],
    direction: Direction,
    local: &PodRecord,
    peer_ip: IpAddr,
    peer: Option<&PodRecord>,
    protocol: u8,
    port: u16,
) -> bool {
    let namespace_labels = |name: &str| {
        namespaces
            .iter()
            .find(|ns| ns.name == name)
            .map(|ns| ns.labels.clone())
            .unwrap_or_default()
    };
    let selecting: Vec<&PolicyRecord> = policies
        .iter()
        .filter(|p| {
            p.namespace == local.namespace
                && direction.rules(p).is_some()
                && p.pod_selector.matches(&local.labels)
        })
        .collect();
    if selecting.is_empty() {
        return true;
    }
    // Named ports are the destination's: the local pod for ingress.
    let destination = match direction {
        Direction::Ingress => Some(local),
        Direction::Egress => peer,
    };
    selecting.iter().any(|policy| {
        direction.rules(policy).unwrap().iter().any(|rule| {
            let peer_fits = rule.peers.is_empty()
                || rule.peers.iter().any(|candidate| match candidate {
                    Peer::Pods { namespaces, pods } => peer.is_some_and(|q| {
                        let namespace_fits = match namespaces {
                            NamespaceScope::Own => q.namespace == policy.namespace,
                            NamespaceScope::Matching(s) => {
                                s.matches(&namespace_labels(&q.namespace))
                            }
                        };
                        namespace_fits && pods.matches(&q.labels)
                    }),
                    Peer::Block { cidr, except } => {
                        cidr.contains(&peer_ip) && !except.iter().any(|e| e.contains(&peer_ip))
                    }
                });
            let port_fits = rule.ports.is_empty()
                || rule.ports.iter().any(|rule_port| {
                    rule_port.protocol.number() == protocol
                        && match &rule_port.port {
                            PortMatch::Any => true,
                            PortMatch::Range(first, last) => (*first..=*last).contains(&port),
                            PortMatch::Named(name) => {
                                destination.and_then(|d| d.named_port(name, rule_port.protocol))
                                    == Some(port)
                            }
                        }
                });
            peer_fits && port_fits
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// For every local pod, every peer (each pod's addresses and some
    /// outside ones) and a spread of protocols and ports, in both
    /// directions, the compiled plan lets through exactly what the API's
    /// semantics allow.
    #[test]
    fn the_plan_allows_exactly_what_the_api_semantics_allow(
        pods in any_pods(),
        namespaces in any_namespaces(),
        policies in any_policies(),
    ) {
        let plan = compile("node-0", &pods, &namespaces, &policies);
        for set in plan.ingress.allow_sets.values().chain(plan.egress.allow_sets.values()) {
            for (i, a) in set.iter().enumerate() {
                for b in set.iter().skip(i + 1) {
                    let apart = a.peer.last < b.peer.first || b.peer.last < a.peer.first
                        || a.peer.first.is_ipv4() != b.peer.first.is_ipv4()
                        || a.protocols.1 < b.protocols.0 || b.protocols.1 < a.protocols.0
                        || a.ports.1 < b.ports.0 || b.ports.1 < a.ports.0;
                    prop_assert!(apart, "{:?} overlaps {:?}", a, b);
                }
            }
        }
        let outside = ["8.8.8.8", "10.244.9.9", "10.244.1.200", "fd00:10:244:1::99", "2001:db8::1"];
        let mut peers: Vec<(IpAddr, Option<&PodRecord>)> = pods
            .iter()
            .flat_map(|pod| pod.ips.iter().map(move |ip| (*ip, Some(pod))))
            .collect();
        peers.extend(outside.iter().map(|text| (ip(text), None)));
        let traffic = [(6, 80), (6, 8080), (6, 81), (17, 53), (17, 8080), (6, 53), (132, 81), (1, 0)];
        for local in pods.iter().filter(|pod| pod.node == "node-0") {
            for &local_ip in &local.ips {
                for &(peer_ip, peer) in &peers {
                    if peer_ip.is_ipv4() != local_ip.is_ipv4() || peer_ip == local_ip {
                        continue;
                    }
                    for &(protocol, port) in &traffic {
                        for (direction, side) in [(Direction::Ingress, &plan.ingress), (Direction::Egress, &plan.egress)] {
                            let expected = reference(&namespaces, &policies, direction, local, peer_ip, peer, protocol, port);
                            let compiled = passes(side, local_ip, peer_ip, protocol, port);
                            prop_assert_eq!(
                                compiled, expected,
                                "{} {} {}/{} {}:{}", if direction == Direction::Ingress { "ingress to" } else { "egress from" },
                                local_ip, peer_ip, protocol, port, peer.map_or("outside", |p| p.name.as_str())
                            );
                        }
                    }
                }
            }
        }
    }

    /// Allow sets are named by the policies that make them, so the plan
    /// does not depend on the order the policies come in.
    #[test]
    fn the_plan_does_not_depend_on_policy_order(
        pods in any_pods(),
        namespaces in any_namespaces(),
        mut policies in any_policies(),
    ) {
        let plan = compile("node-0", &pods, &namespaces, &policies);
        policies.reverse();
        prop_assert_eq!(compile("node-0", &pods, &namespaces, &policies), plan);
    }
}
