//! From the cluster's pods, namespaces and policies to what one node
//! enforces for the pods on it.
//!
//! Per direction, a pod that some policy selects is isolated: it maps to
//! an allow set, and traffic to it (ingress) or from it (egress) passes only
//! if the (peer address, protocol, port) triple lies in one of the set's
//! entries. Pods with the same policies (and, for ingress, the same named
//! ports) share one allow set, so the data plane needs one lookup to find
//! the set and one to test it, whatever the number of policies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::model::{
    NamespaceRecord, NamespaceScope, Peer, PodRecord, PolicyRecord, PortMatch, PortRule, Protocol,
    Rule,
};
use crate::selector::{Labels, Selector};

/// An inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddressRange {
    /// The first address.
    pub first: IpAddr,
    /// The last address.
    pub last: IpAddr,
}

impl AddressRange {
    fn single(ip: IpAddr) -> Self {
        Self {
            first: ip,
            last: ip,
        }
    }

    /// Whether `ip` lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.first <= ip && ip <= self.last && self.first.is_ipv4() == ip.is_ipv4()
    }
}

/// Traffic an allow set lets through: from or to any address of `peer`,
/// with an IP protocol number in `protocols` and a port in `ports` (both
/// inclusive; the whole of both when a rule names no ports, which takes in
/// protocols without ports, such as ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Allow {
    /// The other end: the source of ingress, the destination of egress.
    pub peer: AddressRange,
    /// First and last IP protocol number.
    pub protocols: (u8, u8),
    /// First and last destination port.
    pub ports: (u16, u16),
}

/// Names an allow set by what it is made of (the policies that select its
/// pods and, for ingress, their named ports), so the same set keeps its
/// name from one compile to the next and the data plane can change its
/// entries in place as pods come and go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowSetId(pub u64);

/// What a node enforces in one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct DirectionPlan {
    /// Each isolated local pod address and its allow set.
    pub isolated: BTreeMap<IpAddr, AllowSetId>,
    /// The distinct allow sets.
    pub allow_sets: BTreeMap<AllowSetId, BTreeSet<Allow>>,
}

/// What a node enforces for the pods on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PolicyPlan {
    /// Traffic to local pods.
    pub ingress: DirectionPlan,
    /// Traffic from local pods.
    pub egress: DirectionPlan,
}

/// First and last IP protocol number, first and last port: what an
/// [`Allow`] takes in besides its peer.
type Traffic = ((u8, u8), (u16, u16));

/// Whether `traffic` takes in `protocol` to `port`.
fn takes_in(((first, last), ports): Traffic, protocol: Protocol, port: u16) -> bool {
    (first..=last).contains(&protocol.number()) && (ports.0..=ports.1).contains(&port)
}

/// Every protocol and every port.
const ANY_TRAFFIC: Traffic = ((0, u8::MAX), (0, u16::MAX));

/// Both families' whole address space.
fn everywhere() -> [AddressRange; 2] {
    [
        AddressRange {
            first: Ipv4Addr::UNSPECIFIED.into(),
            last: Ipv4Addr::BROADCAST.into(),
        },
        AddressRange {
            first: Ipv6Addr::UNSPECIFIED.into(),
            last: Ipv6Addr::from(u128::MAX).into(),
        },
    ]
}

/// `cidr` without `except`, as ranges.
fn block_ranges(cidr: &IpNet, except: &[IpNet]) -> Vec<AddressRange> {
    let as_number = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let as_address = |n: u128| match cidr {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    };
    let mut holes: Vec<(u128, u128)> = except
        .iter()
        .map(|hole| (as_number(hole.network()), as_number(hole.broadcast())))
        .collect();
    holes.sort_unstable();
    let (mut next, last) = (as_number(cidr.network()), as_number(cidr.broadcast()));
    let mut ranges = Vec::new();
    for (start, end) in holes {
        if start > next {
            ranges.push((next, start - 1));
        }
        if end >= last {
            return to_ranges(ranges, as_address);
        }
        next = next.max(end + 1);
    }
    ranges.push((next, last));
    to_ranges(ranges, as_address)
}

fn to_ranges(ranges: Vec<(u128, u128)>, as_address: impl Fn(u128) -> IpAddr) -> Vec<AddressRange> {
    ranges
        .into_iter()
        .map(|(first, last)| AddressRange {
            first: as_address(first),
            last: as_address(last),
        })
        .collect()
}

/// The cluster as the compiler reads it.
pub(crate) struct Cluster<'a> {
    pods: &'a [PodRecord],
    namespaces: HashMap<&'a str, &'a Labels>,
    /// The pods of each namespace that has any: a peer's namespace is
    /// decided once for all its pods.
    pods_by_namespace: HashMap<&'a str, Vec<&'a PodRecord>>,
}

impl<'a> Cluster<'a> {
    pub(crate) fn new(pods: &'a [PodRecord], namespaces: &'a [NamespaceRecord]) -> Self {
        let mut pods_by_namespace: HashMap<&str, Vec<&PodRecord>> = HashMap::new();
        for pod in pods {
            pods_by_namespace
                .entry(pod.namespace.as_str())
                .or_default()
                .push(pod);
        }
        Cluster {
            pods,
            namespaces: namespaces
                .iter()
                .map(|ns| (ns.name.as_str(), &ns.labels))
                .collect(),
            pods_by_namespace,
        }
    }

    /// The pods that a pod peer (`namespaces`, `pods`) in a policy of
    /// `namespace` names.
    fn named_pods<'p>(
        &'p self,
        namespaces: &'p NamespaceScope,
        pods: &'p Selector,
        namespace: &'p str,
    ) -> impl Iterator<Item = &'a PodRecord> + 'p {
        self.pods_by_namespace
            .iter()
            .filter(move |(name, _)| match namespaces {
                NamespaceScope::Own => **name == namespace,
                NamespaceScope::Matching(selector) => selector.matches(self.namespace_labels(name)),
            })
            .flat_map(|(_, in_namespace)| in_namespace.iter().copied())
            .filter(move |pod| pods.matches(&pod.labels))
    }

    /// A namespace's labels; none for one not (yet) seen.
    fn namespace_labels(&self, name: &str) -> &Labels {
        static NONE: Labels = Labels::new();
        self.namespaces.get(name).copied().unwrap_or(&NONE)
    }

    /// The pods that claim `ip` as their own (one, once screened): the
    /// pods a pod peer can name it through.
    pub(crate) fn claimants(&self, ip: IpAddr) -> Vec<&'a PodRecord> {
        self.pods
            .iter()
            .filter(|pod| pod.ips.contains(&ip))
            .collect()
    }

    /// Whether `peer`, in a policy of `namespace`, takes in `ip`, which
    /// `pod` claims (`None`: no pod does): an `ipBlock` by the address, a
    /// pod peer by the pod.
    fn names_address(
        &self,
        peer: &Peer,
        namespace: &str,
        ip: IpAddr,
        pod: Option<&PodRecord>,
    ) -> bool {
        match peer {
            Peer::Block { cidr, except } => {
                cidr.contains(&ip) && !except.iter().any(|hole| hole.contains(&ip))
            }
            Peer::Pods { namespaces, pods } => pod.is_some_and(|pod| {
                let namespace_fits = match namespaces {
                    NamespaceScope::Own => pod.namespace == namespace,
                    NamespaceScope::Matching(selector) => {
                        selector.matches(self.namespace_labels(&pod.namespace))
                    }
                };
                namespace_fits && pods.matches(&pod.labels)
            }),
        }
    }

    /// The addresses `rule`'s peers stand for, in a policy of `namespace`.
    fn peer_ranges(&self, rule: &Rule, namespace: &str) -> Vec<AddressRange> {
        if rule.peers.is_empty() {
            return everywhere().to_vec();
        }
        let mut ranges = Vec::new();
        for peer in &rule.peers {
            match peer {
                Peer::Block { cidr, except } => ranges.extend(block_ranges(cidr, except)),
                Peer::Pods { namespaces, pods } => ranges.extend(
                    self.named_pods(namespaces, pods, namespace)
                        .flat_map(|pod| pod.ips.iter().copied().map(AddressRange::single)),
                ),
            }
        }
        ranges
    }

    /// The (pod, address) pairs `rule`'s peers take in: where an egress
    /// rule's named ports are looked up.
    fn peer_pod_addresses<'p>(
        &'p self,
        rule: &'p Rule,
        namespace: &'p str,
    ) -> impl Iterator<Item = (&'p PodRecord, IpAddr)> + 'p {
        self.pods.iter().flat_map(move |pod| {
            pod.ips.iter().copied().filter_map(move |ip| {
                let named = rule.peers.is_empty()
                    || rule
                        .peers
                        .iter()
                        .any(|peer| self.names_address(peer, namespace, ip, Some(pod)));
                named.then_some((pod, ip))
            })
        })
    }
}

/// The (protocols, ports) one port rule takes in, a named port as
/// `destination` resolves it: nothing when there is no destination pod
/// or it has no such port.
fn port_traffic(
    PortRule { protocol, port }: &PortRule,
    destination: Option<&PodRecord>,
) -> Option<Traffic> {
    let number = protocol.number();
    let ports = match port {
        PortMatch::Any => (0, u16::MAX),
        PortMatch::Range(first, last) => (*first, *last),
        PortMatch::Named(name) => {
            let port = destination?.named_port(name, *protocol)?;
            (port, port)
        }
    };
    Some(((number, number), ports))
}

/// The (protocols, ports) of `rule`'s port rules with numbers or no port;
/// named ports are left to [`named_traffic`].
fn numbered_traffic(rule: &Rule) -> Vec<Traffic> {
    if rule.ports.is_empty() {
        return vec![ANY_TRAFFIC];
    }
    rule.ports
        .iter()
        .filter_map(|port| port_traffic(port, None))
        .collect()
}

/// Each named port rule of `rule`, in order, as `pod` resolves it (`None`
/// where it does not).
fn named_resolutions<'r>(
    rule: &'r Rule,
    pod: &'r PodRecord,
) -> impl Iterator<Item = Option<Traffic>> + 'r {
    rule.ports
        .iter()
        .filter(|p| matches!(p.port, PortMatch::Named(_)))
        .map(move |port| port_traffic(port, Some(pod)))
}

/// The (protocols, ports) of `rule`'s named ports as `pod` resolves them.
fn named_traffic<'r>(rule: &'r Rule, pod: &'r PodRecord) -> impl Iterator<Item = Traffic> + 'r {
    named_resolutions(rule, pod).flatten()
}

fn has_named_ports(rule: &Rule) -> bool {
    rule.ports
        .iter()
        .any(|p| matches!(p.port, PortMatch::Named(_)))
}

/// Every peer range with every (protocols, ports).
fn entries<'a>(
    ranges: &'a [AddressRange],
    traffic: &'a [Traffic],
) -> impl Iterator<Item = Allow> + 'a {
    ranges.iter().flat_map(|peer| {
        traffic.iter().map(|&(protocols, ports)| Allow {
            peer: *peer,
            protocols,
            ports,
        })
    })
}

/// Ingress or egress: which end of the traffic a local pod is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Traffic to a local pod.
    Ingress,
    /// Traffic from a local pod.
    Egress,
}

impl Direction {
    /// Both, egress first: a packet leaves its sender before it reaches
    /// its receiver.
    pub const BOTH: [Direction; 2] = [Direction::Egress, Direction::Ingress];

    /// `ingress` or `egress`, as tables and metric labels name it.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The part of `plan` for this direction.
    pub fn of(self, plan: &PolicyPlan) -> &DirectionPlan {
        match self {
            Direction::Ingress => &plan.ingress,
            Direction::Egress => &plan.egress,
        }
    }

    /// `policy`'s rules for this direction; `None` when it does not
    /// isolate for it.
    pub(crate) fn rules(self, policy: &PolicyRecord) -> Option<&[Rule]> {
        match self {
            Direction::Ingress => policy.ingress.as_deref(),
            Direction::Egress => policy.egress.as_deref(),
        }
    }

    /// Whether `policy` isolates `pod` for this direction.
    pub(crate) fn selects(self, policy: &PolicyRecord, pod: &PodRecord) -> bool {
        policy.namespace == pod.namespace
            && self.rules(policy).is_some()
            && policy.pod_selector.matches(&pod.labels)
    }
}

/// One packet as a rule of a local pod sees it.
pub(crate) struct Packet<'a> {
    /// The other end: the source of ingress, the destination of egress.
    pub(crate) peer: IpAddr,
    /// The pods that claim `peer` ([`Cluster::claimants`]).
    pub(crate) claimants: Vec<&'a PodRecord>,
    /// Its protocol.
    pub(crate) protocol: Protocol,
    /// Its destination port.
    pub(crate) port: u16,
}

impl Cluster<'_> {
    /// The (peer, port) indices of `rule`, in a policy of `namespace`,
    /// that let `packet` through for `local` in `direction`, `None` for a
    /// rule without peers or ports (it takes in all). It asks of one packet
    /// what [`compile`] puts in the allow set: a peer range holds the
    /// addresses of the pods a peer names, or its block; a named port
    /// resolves on the local pod for ingress and, for egress, on the pod
    /// the peer names at that address.
    pub(crate) fn admitting(
        &self,
        rule: &Rule,
        namespace: &str,
        direction: Direction,
        local: &PodRecord,
        packet: &Packet<'_>,
    ) -> Vec<(Option<usize>, Option<usize>)> {
        let indices = |len: usize| -> Vec<Option<usize>> {
            match len {
                0 => vec![None],
                _ => (0..len).map(Some).collect(),
            }
        };
        // The peer as a bare address, then as each pod that claims it.
        let as_whom = || std::iter::once(None).chain(packet.claimants.iter().copied().map(Some));
        let mut admitting = Vec::new();
        for peer in indices(rule.peers.len()) {
            for port in indices(rule.ports.len()) {
                let admits = as_whom().any(|claimant| {
                    let destination = match direction {
                        Direction::Ingress => Some(local),
                        Direction::Egress => claimant,
                    };
                    peer.is_none_or(|k| {
                        self.names_address(&rule.peers[k], namespace, packet.peer, claimant)
                    }) && port.is_none_or(|j| {
                        port_traffic(&rule.ports[j], destination)
                            .is_some_and(|traffic| takes_in(traffic, packet.protocol, packet.port))
                    })
                });
                if admits {
                    admitting.push((peer, port));
                }
            }
        }
        admitting
    }
}

/// What `node` enforces for its pods, given every pod, namespace and
/// policy in the cluster.
pub fn compile(
    node: &str,
    pods: &[PodRecord],
    namespaces: &[NamespaceRecord],
    policies: &[PolicyRecord],
) -> PolicyPlan {
    let cluster = Cluster::new(pods, namespaces);
    let local: Vec<&PodRecord> = pods.iter().filter(|pod| pod.node == node).collect();
    PolicyPlan {
        ingress: compile_direction(&cluster, &local, policies, Direction::Ingress),
        egress: compile_direction(&cluster, &local, policies, Direction::Egress),
    }
}

fn compile_direction(
    cluster: &Cluster<'_>,
    local: &[&PodRecord],
    policies: &[PolicyRecord],
    direction: Direction,
) -> DirectionPlan {
    // Pods selected by the same policies share an allow set, except that
    // ingress named ports resolve on the local pod: those resolutions are
    // part of the key, each in its place (one list per selecting policy),
    // since two rules with different peers may resolve to the same number
    // on different pods.
    type Key = (Vec<usize>, Vec<Vec<Option<Traffic>>>);
    let mut ids: HashMap<Key, AllowSetId> = HashMap::new();
    let mut plan = DirectionPlan::default();
    // Peer addresses per (policy, rule), computed once for all local pods.
    let mut ranges: HashMap<(usize, usize), Vec<AddressRange>> = HashMap::new();
    // The policies of each namespace for this direction, in order.
    let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
    for (index, policy) in policies.iter().enumerate() {
        if direction.rules(policy).is_some() {
            by_namespace
                .entry(policy.namespace.as_str())
                .or_default()
                .push(index);
        }
    }
    for pod in local {
        let selecting: Vec<usize> = by_namespace
            .get(pod.namespace.as_str())
            .into_iter()
            .flatten()
            .copied()
            .filter(|&p| direction.selects(&policies[p], pod))
            .collect();
        if selecting.is_empty() {
            continue;
        }
        let named: Vec<Vec<_>> = selecting
            .iter()
            .map(|&p| match direction {
                Direction::Ingress => direction
                    .rules(&policies[p])
                    .into_iter()
                    .flatten()
                    .flat_map(|rule| named_resolutions(rule, pod))
                    .collect(),
                Direction::Egress => Vec::new(),
            })
            .collect();
        let key = (selecting, named);
        let id = match ids.get(&key) {
            Some(id) => *id,
            None => {
                let mut set = BTreeSet::new();
                for &p in &key.0 {
                    let policy = &policies[p];
                    for (r, rule) in direction.rules(policy).into_iter().flatten().enumerate() {
                        let peers = ranges
                            .entry((p, r))
                            .or_insert_with(|| cluster.peer_ranges(rule, &policy.namespace));
                        let mut traffic = numbered_traffic(rule);
                        match direction {
                            Direction::Ingress => traffic.extend(named_traffic(rule, pod)),
                            Direction::Egress if has_named_ports(rule) => {
                                for (target, ip) in
                                    cluster.peer_pod_addresses(rule, &policy.namespace)
                                {
                                    set.extend(entries(
                                        &[AddressRange::single(ip)],
                                        &named_traffic(rule, target).collect::<Vec<_>>(),
                                    ));
                                }
                            }
                            Direction::Egress => {}
                        }
                        set.extend(entries(peers, &traffic));
                    }
                }
                let id = allow_set_id(&key, policies, &plan.allow_sets);
                plan.allow_sets.insert(id, disjoint(&set));
                ids.insert(key, id);
                id
            }
        };
        for ip in &pod.ips {
            plan.isolated.insert(*ip, id);
        }
        if !pod.withheld.is_empty() {
            // An address two pods claim stays isolated, with nothing
            // allowed, if either is isolated: leaving it out of the map
            // would open it instead.
            let nothing = (Vec::new(), Vec::new());
            let deny = *ids
                .entry(nothing)
                .or_insert_with_key(|key| allow_set_id(key, policies, &plan.allow_sets));
            plan.allow_sets.entry(deny).or_default();
            for ip in &pod.withheld {
                plan.isolated.insert(*ip, deny);
            }
        }
    }
    plan
}

/// The same traffic as `set`, as entries that do not overlap: the
/// kernel's concatenated interval sets refuse overlapping elements, and a
/// canonical form makes two compiles of the same policies comparable entry
/// by entry. Protocols and ports are cut where any entry starts or ends;
/// each resulting cell takes the union of the address ranges of the
/// entries covering it; neighbouring cells with the same addresses join
/// again.
fn disjoint(set: &BTreeSet<Allow>) -> BTreeSet<Allow> {
    let cuts = |bounds: &mut Vec<u32>| {
        bounds.sort_unstable();
        bounds.dedup();
    };
    let mut protocol_cuts: Vec<u32> = set
        .iter()
        .flat_map(|a| [u32::from(a.protocols.0), u32::from(a.protocols.1) + 1])
        .collect();
    cuts(&mut protocol_cuts);
    let mut port_cuts: Vec<u32> = set
        .iter()
        .flat_map(|a| [u32::from(a.ports.0), u32::from(a.ports.1) + 1])
        .collect();
    cuts(&mut port_cuts);
    // Per protocol cell, in order: its port cells and their addresses.
    type Row = Vec<((u16, u16), Vec<AddressRange>)>;
    let mut rows: Vec<((u8, u8), Row)> = Vec::new();
    for protocols in protocol_cuts.windows(2) {
        let protocols = (protocols[0] as u8, (protocols[1] - 1) as u8);
        let mut row: Row = Vec::new();
        for ports in port_cuts.windows(2) {
            let ports = (ports[0] as u16, (ports[1] - 1) as u16);
            let covering = set.iter().filter(|a| {
                a.protocols.0 <= protocols.0
                    && protocols.1 <= a.protocols.1
                    && a.ports.0 <= ports.0
                    && ports.1 <= a.ports.1
            });
            let addresses = merged(covering.map(|a| a.peer).collect());
            match row.last_mut() {
                Some((last, same))
                    if *same == addresses && last.1.checked_add(1) == Some(ports.0) =>
                {
                    last.1 = ports.1;
                }
                _ if addresses.is_empty() => {}
                _ => row.push((ports, addresses)),
            }
        }
        match rows.last_mut() {
            Some((last, same)) if *same == row && last.1.checked_add(1) == Some(protocols.0) => {
                last.1 = protocols.1;
            }
            _ if row.is_empty() => {}
            _ => rows.push((protocols, row)),
        }
    }
    rows.into_iter()
        .flat_map(|(protocols, row)| {
            row.into_iter().flat_map(move |(ports, addresses)| {
                addresses.into_iter().map(move |peer| Allow {
                    peer,
                    protocols,
                    ports,
                })
            })
        })
        .collect()
}

/// `ranges` as the fewest ranges covering the same addresses, in order.
fn merged(mut ranges: Vec<AddressRange>) -> Vec<AddressRange> {
    ranges.sort_unstable();
    let mut out: Vec<AddressRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match out.last_mut() {
            Some(last)
                if last.first.is_ipv4() == range.first.is_ipv4()
                    && next(last.last).is_none_or(|n| n >= range.first) =>
            {
                last.last = last.last.max(range.last);
            }
            _ => out.push(range),
        }
    }
    out
}

/// The address after `ip`, if there is one.
fn next(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(v4) => u32::from(v4)
            .checked_add(1)
            .map(|n| Ipv4Addr::from(n).into()),
        IpAddr::V6(v6) => u128::from(v6)
            .checked_add(1)
            .map(|n| Ipv6Addr::from(n).into()),
    }
}

/// A name for the allow set of `key` (selecting policies, each with its
/// named ports' resolutions) that depends on the policies' names, not
/// their order, and is not yet taken in `taken`.
fn allow_set_id(
    (selecting, named): &(Vec<usize>, Vec<Vec<Option<Traffic>>>),
    policies: &[PolicyRecord],
    taken: &BTreeMap<AllowSetId, BTreeSet<Allow>>,
) -> AllowSetId {
    // Each policy keeps its own resolutions when the names are sorted.
    let mut names: Vec<(&str, &str, &[Option<Traffic>])> = selecting
        .iter()
        .zip(named)
        .map(|(&p, named)| {
            let policy = &policies[p];
            (
                policy.namespace.as_str(),
                policy.name.as_str(),
                named.as_slice(),
            )
        })
        .collect();
    names.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut hasher = DefaultHasher::new();
    names.hash(&mut hasher);
    let mut id = hasher.finish();
    // Two keys with one hash: the later takes the next free name.
    while taken.contains_key(&AllowSetId(id)) {
        id = id.wrapping_add(1);
    }
    AllowSetId(id)
}

impl PolicyPlan {
    /// A fingerprint of what the plan enforces: per direction, each
    /// isolated address in order with the entries of its allow set. Plans
    /// that enforce the same give the same 16 hexadecimal digits in any
    /// process of any build, whatever their allow sets are called, so a
    /// node's enforced plan can be compared with one compiled elsewhere.
    pub fn fingerprint(&self) -> String {
        let mut hash = Fnv1a::new();
        for direction in Direction::BOTH {
            let plan = direction.of(self);
            hash.write(direction.name().as_bytes());
            hash.write_u64(plan.isolated.len() as u64);
            // Many addresses share a set: each set's entries are hashed once.
            let mut digests: BTreeMap<AllowSetId, u64> = BTreeMap::new();
            for (ip, id) in &plan.isolated {
                hash.write_ip(*ip);
                let digest = *digests
                    .entry(*id)
                    .or_insert_with(|| allow_set_digest(plan.allow_sets.get(id)));
                hash.write_u64(digest);
            }
        }
        format!("{:016x}", hash.0)
    }
}

/// The entries of an allow set (`None`: a set the plan lacks), hashed.
fn allow_set_digest(set: Option<&BTreeSet<Allow>>) -> u64 {
    let mut hash = Fnv1a::new();
    match set {
        None => hash.write(&[0]),
        Some(set) => {
            hash.write(&[1]);
            hash.write_u64(set.len() as u64);
            for allow in set {
                hash.write_ip(allow.peer.first);
                hash.write_ip(allow.peer.last);
                hash.write(&[allow.protocols.0, allow.protocols.1]);
                hash.write(&allow.ports.0.to_be_bytes());
                hash.write(&allow.ports.1.to_be_bytes());
            }
        }
    }
    hash.0
}

/// 64-bit FNV-1a over bytes written in a fixed encoding: unlike std's
/// hashers, its value is fixed by its definition, not by the build.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.write(&n.to_be_bytes());
    }

    /// The family (4 or 6), then the address's bytes.
    fn write_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.write(&[4]);
                self.write(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.write(&[6]);
                self.write(&v6.octets());
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
