//! Why one packet may or may not pass: the verdict [`compile`] would give
//! at each end, with the policies and rules behind it, for
//! `kubectl weft trace`.
//!
//! Egress is judged at the source pod, on its node; ingress at the
//! destination pod, on its node. A packet passes when both ends let it.
//! The rules are read through the same code as the compiler
//! (`Cluster::admitting` in `compile`), so a verdict cannot drift from what a node
//! enforces.
//!
//! [`compile`]: crate::compile::compile

use std::fmt;
use std::net::IpAddr;

use crate::compile::{Cluster, Direction, Packet};
use crate::model::{NamespaceRecord, PodRecord, PolicyRecord, Protocol};

/// The packet to judge, and the pods at its ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<'a> {
    /// The pod that sends; `None` when the source is not a pod Weft knows
    /// (an address outside the pod network, or a node).
    pub source_pod: Option<&'a PodRecord>,
    /// The source address: one of `source_pod`'s addresses (its `ips` or
    /// `withheld`) when there is one.
    pub source_ip: IpAddr,
    /// The pod that receives; `None` when the destination is not a pod.
    pub destination_pod: Option<&'a PodRecord>,
    /// The destination address: one of `destination_pod`'s when there is
    /// one.
    pub destination_ip: IpAddr,
    /// The protocol.
    pub protocol: Protocol,
    /// The destination port.
    pub port: u16,
}

/// A NetworkPolicy by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl PolicyRef {
    /// The name of `policy`.
    pub fn of(policy: &PolicyRecord) -> Self {
        Self {
            namespace: policy.namespace.clone(),
            name: policy.name.clone(),
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One part of a policy that lets the packet through, by its indices in
/// the API object's spec.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Admission {
    /// The policy.
    pub policy: PolicyRef,
    /// The rule's index in `spec.ingress` or `spec.egress`.
    pub rule: usize,
    /// The peer's index in the rule's `from` or `to`; `None` when the rule
    /// has no peers (it takes in every address).
    pub peer: Option<usize>,
    /// The port's index in the rule's `ports`; `None` when the rule has no
    /// ports (it takes in every protocol and port).
    pub port: Option<usize>,
}

/// The verdict at one end of the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideVerdict {
    /// Which end: egress at the source pod, ingress at the destination.
    pub direction: Direction,
    /// The policies that isolate the pod for this direction, sorted; none
    /// means the pod is open in this direction.
    pub isolating: Vec<PolicyRef>,
    /// Every (policy, rule, peer, port) that lets the packet through,
    /// sorted.
    pub admitted_by: Vec<Admission>,
    /// The pod's address is claimed by another pod too, and a policy
    /// isolates a claimant: it stays isolated with nothing allowed.
    pub withheld: bool,
}

impl SideVerdict {
    /// Whether this end lets the packet through.
    pub fn allows(&self) -> bool {
        !self.withheld && (self.isolating.is_empty() || !self.admitted_by.is_empty())
    }
}

/// The verdict at both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// At the source pod; `None` when the source is not a pod.
    pub egress: Option<SideVerdict>,
    /// At the destination pod; `None` when the destination is not a pod.
    pub ingress: Option<SideVerdict>,
}

impl Verdict {
    /// Whether the packet passes both ends.
    pub fn allowed(&self) -> bool {
        [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .all(SideVerdict::allows)
    }
}

/// Judges `query` against every pod, namespace and policy in the cluster,
/// as the nodes of its two ends enforce them.
pub fn explain(
    pods: &[PodRecord],
    namespaces: &[NamespaceRecord],
    policies: &[PolicyRecord],
    query: &Query<'_>,
) -> Verdict {
    let judge = Judge {
        cluster: Cluster::new(pods, namespaces),
        pods,
        policies,
    };
    let packet = |peer: IpAddr| Packet {
        peer,
        claimants: judge.cluster.claimants(peer),
        protocol: query.protocol,
        port: query.port,
    };
    Verdict {
        egress: query.source_pod.map(|pod| {
            let packet = packet(query.destination_ip);
            judge.side(Direction::Egress, pod, query.source_ip, &packet)
        }),
        ingress: query.destination_pod.map(|pod| {
            let packet = packet(query.source_ip);
            judge.side(Direction::Ingress, pod, query.destination_ip, &packet)
        }),
    }
}

/// What a verdict is judged against.
struct Judge<'a> {
    cluster: Cluster<'a>,
    pods: &'a [PodRecord],
    policies: &'a [PolicyRecord],
}

impl Judge<'_> {
    /// The verdict at `local`, whose address is `local_ip`, for `packet`.
    fn side(
        &self,
        direction: Direction,
        local: &PodRecord,
        local_ip: IpAddr,
        packet: &Packet<'_>,
    ) -> SideVerdict {
        let mut isolating = Vec::new();
        let mut admitted_by = Vec::new();
        let withheld = local.withheld.contains(&local_ip);
        if withheld {
            // The node keys on the address, not the pod: it is isolated if
            // a policy isolates any pod of the node that claims it.
            let claimants = self
                .pods
                .iter()
                .chain([local])
                .filter(|pod| pod.node == local.node && pod.withheld.contains(&local_ip));
            for pod in claimants {
                isolating.extend(self.selecting(direction, pod).map(PolicyRef::of));
            }
        } else {
            for policy in self.selecting(direction, local) {
                isolating.push(PolicyRef::of(policy));
                let rules = direction.rules(policy).into_iter().flatten();
                for (rule, spec) in rules.enumerate() {
                    let admitting =
                        self.cluster
                            .admitting(spec, &policy.namespace, direction, local, packet);
                    admitted_by.extend(admitting.into_iter().map(|(peer, port)| Admission {
                        policy: PolicyRef::of(policy),
                        rule,
                        peer,
                        port,
                    }));
                }
            }
        }
        isolating.sort_unstable();
        isolating.dedup();
        admitted_by.sort_unstable();
        admitted_by.dedup();
        SideVerdict {
            direction,
            withheld: withheld && !isolating.is_empty(),
            isolating,
            admitted_by,
        }
    }

    /// The policies that isolate `pod` for `direction`.
    fn selecting<'p>(
        &'p self,
        direction: Direction,
        pod: &'p PodRecord,
    ) -> impl Iterator<Item = &'p PolicyRecord> + 'p {
        self.policies
            .iter()
            .filter(move |policy| direction.selects(policy, pod))
    }
}

#[cfg(test)]
mod tests;
