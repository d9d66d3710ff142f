//! Holding a peer's entries: per-peer backoff for entries the kernel
//! refuses, and route conflicts with other owners' routes.
//!
//! A peer whose neighbour, FDB entry or route the kernel refuses must not
//! hold up anyone else: the rest of the reconcile goes on, and the peer is
//! retried on its own schedule, from 1 s doubling up to 30 s. While it
//! waits, its entries are left as the kernel has them (the reconcile holds
//! back every operation on them), so a refusal neither repeats on every
//! change nor removes what still works.
//!
//! A peer whose slice another owner's route holds
//! ([`RouteConflict`]) is held the same way, but with no backoff: every
//! reconcile dumps the routes again, and the first that finds the other
//! route gone programs the peer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::dataplane::RouteConflict;
use super::overlay::EntryOwners;
use super::peer::Peer;

/// First retry of a refused peer, or of a failed reconcile
/// ([`super::run()`]), doubled after each failure up to [`RETRY_CAP`].
pub(crate) const RETRY_START: Duration = Duration::from_secs(1);
/// The longest wait before a retry.
pub(crate) const RETRY_CAP: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Retry {
    refusals: u32,
    due: Instant,
    /// The kernel's last refusal, as `/status` shows it.
    refusal: String,
}

/// The peers the kernel refused, and when each is retried.
#[derive(Debug, Default)]
pub(crate) struct PeerRetries {
    failing: BTreeMap<String, Retry>,
}

impl PeerRetries {
    /// The peers still waiting at `now`: their entries are held back.
    pub(crate) fn waiting(&self, now: Instant) -> impl Iterator<Item = &str> {
        self.failing
            .iter()
            .filter(move |(_, retry)| retry.due > now)
            .map(|(name, _)| name.as_str())
    }

    /// Records a reconcile at `now`: the peers in `refused` were refused
    /// (again), each with the kernel's refusal; every other peer that was
    /// not waiting went through, and peers no longer `present` are
    /// forgotten. Returns each refused peer with the delay until its retry.
    pub(crate) fn record<'a>(
        &mut self,
        now: Instant,
        refused: impl IntoIterator<Item = (&'a str, String)>,
        present: impl Fn(&str) -> bool,
    ) -> Vec<(String, Duration)> {
        let refused: Vec<(String, u32, String)> = refused
            .into_iter()
            .map(|(name, refusal)| {
                let before = self.failing.get(name).map_or(0, |r| r.refusals);
                (name.to_string(), before + 1, refusal)
            })
            .collect();
        self.failing
            .retain(|name, retry| retry.due > now && present(name));
        let mut delays = Vec::new();
        for (name, refusals, refusal) in refused {
            let delay = RETRY_START
                .saturating_mul(1 << refusals.min(16).saturating_sub(1))
                .min(RETRY_CAP);
            let due = now + delay;
            let retry = Retry {
                refusals,
                due,
                refusal,
            };
            self.failing.insert(name.clone(), retry);
            delays.push((name, delay));
        }
        delays
    }

    /// When the next waiting peer is due, if any.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.failing.values().map(|retry| retry.due).min()
    }

    /// How many peers are waiting.
    pub(crate) fn len(&self) -> usize {
        self.failing.len()
    }

    /// Each peer on its backoff, when it is retried next, and the
    /// kernel's last refusal.
    pub(crate) fn due(&self) -> impl Iterator<Item = (&str, Instant, &str)> {
        self.failing
            .iter()
            .map(|(name, retry)| (name.as_str(), retry.due, retry.refusal.as_str()))
    }
}

/// The entries to hold this reconcile: those of the `accepted` peers that
/// are `waiting` for their retry or have a slice in `conflicts`.
pub(crate) fn held_peers<'p>(
    accepted: &[&'p Peer],
    waiting: &BTreeSet<&str>,
    conflicts: &[RouteConflict],
) -> EntryOwners<'p> {
    if waiting.is_empty() && conflicts.is_empty() {
        // The usual case: no owner map over every peer.
        return EntryOwners::default();
    }
    EntryOwners::of(accepted.iter().copied().filter(|peer| {
        waiting.contains(peer.node_name.as_str())
            || conflicts.iter().any(|conflict| conflict.concerns(peer))
    }))
}

/// The route conflicts last logged, so that a standing conflict is logged
/// once and each change (a new one, one resolved) again.
#[derive(Debug, Default)]
pub(crate) struct ConflictLog {
    logged: Vec<RouteConflict>,
}

impl ConflictLog {
    /// Logs `conflicts` unless they are the ones logged last, naming whose
    /// entries each holds: the peer among `peers` with that slice, or this
    /// node.
    pub(crate) fn record(&mut self, conflicts: &[RouteConflict], peers: &[&Peer]) {
        if conflicts == self.logged.as_slice() {
            return;
        }
        for conflict in conflicts {
            let peer = peers.iter().find(|peer| conflict.concerns(peer));
            let owner = conflict
                .foreign
                .map(|foreign| u8::from(foreign.protocol).to_string());
            let held = peer.map_or_else(
                || "this node's unreachable slice route".to_string(),
                |peer| format!("the entries of peer {}", peer.node_name),
            );
            tracing::warn!(
                destination = %conflict.destination,
                owner_protocol = owner.as_deref().unwrap_or("unknown"),
                "route conflict: {conflict}; Weft leaves that route alone and holds {held} until it is removed"
            );
        }
        if conflicts.is_empty() {
            tracing::info!("route conflicts resolved: every wanted route is Weft's to set");
        }
        self.logged = conflicts.to_vec();
    }
}

#[cfg(test)]
mod tests {
    use ipnet::IpNet;
    use weft_core::annotations::VtepMac;
    use weft_core::netlink::{RouteProtocol, RouteType};

    use super::*;
    use crate::dataplane::ForeignRoute;
    use crate::overlay::{NextHop, Operation, OverlayRoute};

    /// `name` refused by the kernel, as the reconcile reports it.
    fn refused(name: &str) -> (&str, String) {
        (name, "File exists (os error 17)".to_string())
    }

    #[test]
    fn refusals_back_off_and_success_forgets() {
        let mut retries = PeerRetries::default();
        let start = Instant::now();
        let delays = retries.record(start, [refused("node-b")], |_| true);
        assert_eq!(delays, vec![("node-b".to_string(), RETRY_START)]);
        assert_eq!(retries.waiting(start).collect::<Vec<_>>(), vec!["node-b"]);
        assert_eq!(retries.next_due(), Some(start + RETRY_START));

        // Due: it is retried, refused again, and waits twice as long.
        let later = start + RETRY_START;
        assert_eq!(retries.waiting(later).count(), 0);
        let delays = retries.record(later, [refused("node-b")], |_| true);
        assert_eq!(delays[0].1, RETRY_START * 2);

        // Due and not refused: forgotten.
        let much_later = later + RETRY_CAP;
        retries.record(much_later, [], |_| true);
        assert_eq!(retries.len(), 0);
        assert_eq!(retries.next_due(), None);
    }

    #[test]
    fn a_waiting_peer_stays_until_due_unless_it_is_gone() {
        let mut retries = PeerRetries::default();
        let start = Instant::now();
        retries.record(start, [refused("node-b"), refused("node-c")], |_| true);
        retries.record(start, [], |name| name != "node-c");
        assert_eq!(retries.waiting(start).collect::<Vec<_>>(), vec!["node-b"]);
    }

    #[test]
    fn the_delay_is_capped() {
        let mut retries = PeerRetries::default();
        let mut now = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..40 {
            last = retries.record(now, [refused("node-b")], |_| true)[0].1;
            now += last;
        }
        assert_eq!(last, RETRY_CAP);
    }

    #[test]
    fn waiting_and_conflicting_peers_are_held_whole() {
        let peer = |name: &str, slice: &str| Peer {
            node_name: name.into(),
            pod_cidrs: vec![slice.parse().unwrap()],
            public_ip: "172.31.0.11".parse().unwrap(),
            vtep_mac: Some(VtepMac::new([0x0a, 0x58, 0, 0, 0, name.len() as u8])),
            created: 0,
            malformed: None,
        };
        let peers = [
            peer("b", "10.244.1.0/24"),
            peer("cc", "10.244.2.0/24"),
            peer("ddd", "10.244.3.0/24"),
        ];
        let accepted: Vec<&Peer> = peers.iter().collect();
        let route = |slice: &str| {
            let destination: IpNet = slice.parse().unwrap();
            Operation::SetRoute(OverlayRoute {
                destination,
                next_hop: NextHop::Vtep(destination.network()),
            })
        };
        let conflict = RouteConflict {
            destination: "10.244.2.0/24".parse().unwrap(),
            foreign: Some(ForeignRoute {
                protocol: RouteProtocol::Static,
                kind: RouteType::BlackHole,
            }),
        };
        let waiting = BTreeSet::from(["b"]);
        let held = held_peers(&accepted, &waiting, &[conflict]);
        assert_eq!(held.owner(&route("10.244.1.0/24")), Some("b"));
        assert_eq!(held.owner(&route("10.244.2.0/24")), Some("cc"));
        assert_eq!(held.owner(&route("10.244.3.0/24")), None);
        assert_eq!(
            held_peers(&accepted, &BTreeSet::new(), &[]).owner(&route("10.244.1.0/24")),
            None
        );
    }
}
