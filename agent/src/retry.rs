//! Per-peer backoff for entries the kernel refuses.
//!
//! A peer whose neighbour, FDB entry or route the kernel refuses must not
//! hold up anyone else: the rest of the reconcile goes on, and the peer is
//! retried on its own schedule, from 1 s doubling up to 30 s. While it
//! waits, its entries are left as the kernel has them (the reconcile holds
//! back every operation on them), so a refusal neither repeats on every
//! change nor removes what still works.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// First retry of a refused peer, or of a failed reconcile
/// ([`super::run()`]), doubled after each failure up to [`RETRY_CAP`].
pub(crate) const RETRY_START: Duration = Duration::from_secs(1);
/// The longest wait before a retry.
pub(crate) const RETRY_CAP: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Retry {
    refusals: u32,
    due: Instant,
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
    /// (again); every other peer that was not waiting went through, and
    /// peers no longer `present` are forgotten. Returns each refused peer
    /// with the delay until its retry.
    pub(crate) fn record<'a>(
        &mut self,
        now: Instant,
        refused: impl IntoIterator<Item = &'a str>,
        present: impl Fn(&str) -> bool,
    ) -> Vec<(String, Duration)> {
        let refused: Vec<(String, u32)> = refused
            .into_iter()
            .map(|name| {
                let before = self.failing.get(name).map_or(0, |r| r.refusals);
                (name.to_string(), before + 1)
            })
            .collect();
        self.failing
            .retain(|name, retry| retry.due > now && present(name));
        let mut delays = Vec::new();
        for (name, refusals) in refused {
            let delay = RETRY_START
                .saturating_mul(1 << refusals.min(16).saturating_sub(1))
                .min(RETRY_CAP);
            let due = now + delay;
            self.failing.insert(name.clone(), Retry { refusals, due });
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_back_off_and_success_forgets() {
        let mut retries = PeerRetries::default();
        let start = Instant::now();
        let delays = retries.record(start, ["node-b"], |_| true);
        assert_eq!(delays, vec![("node-b".to_string(), RETRY_START)]);
        assert_eq!(retries.waiting(start).collect::<Vec<_>>(), vec!["node-b"]);
        assert_eq!(retries.next_due(), Some(start + RETRY_START));

        // Due: it is retried, refused again, and waits twice as long.
        let later = start + RETRY_START;
        assert_eq!(retries.waiting(later).count(), 0);
        let delays = retries.record(later, ["node-b"], |_| true);
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
        retries.record(start, ["node-b", "node-c"], |_| true);
        retries.record(start, [], |name| name != "node-c");
        assert_eq!(retries.waiting(start).collect::<Vec<_>>(), vec!["node-b"]);
    }

    #[test]
    fn the_delay_is_capped() {
        let mut retries = PeerRetries::default();
        let mut now = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..40 {
            last = retries.record(now, ["node-b"], |_| true)[0].1;
            now += last;
        }
        assert_eq!(last, RETRY_CAP);
    }
}
