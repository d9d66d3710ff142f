//! Telling operators about nodes the controller will not touch: a metric
//! for every occurrence, and one Warning Event per node and reason whose
//! count, last time and note are kept up to date, written at most once a
//! minute per node and reason (as the kubelet's event correlator does), so a
//! node whose claim flaps cannot flood the API server or the logs.
//!
//! The bookkeeping ([`Ledger`]) is pure; [`Reporter`] does the API writes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::allocator::ClaimProblem;
use crate::metrics::ControllerMetrics;
use crate::{Error, FIELD_MANAGER};
use weft_core::ip::IpFamily;
use weft_core::slice::SlicePlan;

/// Events about cluster-scoped objects live in this namespace (as the
/// kubelet's node events do); `kubectl describe node` finds them there.
pub(crate) const EVENT_NAMESPACE: &str = "default";

/// The API limits an Event message to 1 kB.
const MAX_NOTE_BYTES: usize = 1024;

/// The least time between two writes of one node's Event for one reason.
const EVENT_INTERVAL: Duration = Duration::from_secs(60);

/// Something wrong with one node.
pub(crate) enum Finding {
    /// An existing pod CIDR the controller leaves alone.
    Claim(ClaimProblem),
    /// No slice left for the node in this family.
    Exhausted(SlicePlan),
}

impl Finding {
    /// The PascalCase reason of the finding's Event.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Finding::Claim(problem) => problem.reason(),
            Finding::Exhausted(_) => "PodCidrExhausted",
        }
    }

    /// The finding in words, with its fix, as the Event's note says it.
    pub(crate) fn note(&self) -> String {
        let mut note = match self {
            Finding::Claim(problem) => problem.to_string(),
            Finding::Exhausted(plan) => format!(
                "no free /{} slice left in the {} cluster CIDR {}; the node gets one as soon as a slice frees (delete unused nodes, or widen the cluster CIDR)",
                plan.slice_prefix(),
                plan.family(),
                plan.cluster()
            ),
        };
        if note.len() > MAX_NOTE_BYTES {
            let mut end = MAX_NOTE_BYTES;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        note
    }

    fn record(&self, metrics: &ControllerMetrics) {
        match self {
            Finding::Claim(problem) => metrics.record_claim_problem(problem.reason()),
            Finding::Exhausted(plan) => metrics.record_exhaustion(plan.family()),
        }
    }
}

/// The time now, as the rate limit (monotonic) and the Event (wall) see it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Now {
    mono: Instant,
    wall: Timestamp,
}

impl Now {
    fn read() -> Self {
        Self {
            mono: Instant::now(),
            wall: Timestamp::now(),
        }
    }
}

/// One node's Event for one reason, as observed and as last written.
#[derive(Clone, Debug)]
struct Series {
    note: String,
    count: i32,
    first_seen: Timestamp,
    last_seen: Timestamp,
    written: Option<Written>,
}

/// What the API server holds of a series.
#[derive(Clone, Debug)]
struct Written {
    event: String,
    count: i32,
    at: Instant,
}

/// An Event write that is due, with everything it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DueWrite {
    reason: &'static str,
    note: String,
    count: i32,
    first_seen: Timestamp,
    last_seen: Timestamp,
    /// The Event to update; `None` creates one.
    event: Option<String>,
}

/// What has been found and written per node.
#[derive(Debug, Default)]
struct NodeLog {
    /// The findings of the node's last reconcile, so that finding the same
    /// again is not another occurrence.
    current: Vec<(&'static str, String)>,
    /// Every reason found while the node exists, so a problem that comes and
    /// goes stays one Event with a count instead of a new Event each time.
    series: HashMap<&'static str, Series>,
}

/// Per node and reason: how often a problem occurred and what of that the
/// API server has been told. Pure: callers pass the time.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    nodes: HashMap<String, NodeLog>,
}

impl Ledger {
    /// Records `findings` (reason and note) as the node's current ones and
    /// returns the indexes of those that are new occurrences: not found at
    /// the node's previous reconcile.
    fn observe(&mut self, node: &str, findings: &[(&'static str, String)], now: Now) -> Vec<usize> {
        // A fine node that never had a problem needs no entry: most nodes.
        if findings.is_empty() && !self.nodes.contains_key(node) {
            return Vec::new();
        }
        let log = self.nodes.entry(node.to_owned()).or_default();
        let fresh: Vec<usize> = (0..findings.len())
            .filter(|&index| !log.current.contains(&findings[index]))
            .collect();
        for &index in &fresh {
            let (reason, note) = &findings[index];
            let series = log.series.entry(reason).or_insert_with(|| Series {
                note: String::new(),
                count: 0,
                first_seen: now.wall,
                written: None,
                last_seen: now.wall,
            });
            series.note.clone_from(note);
            series.count = series.count.saturating_add(1);
            series.last_seen = now.wall;
        }
        log.current = findings.to_vec();
        fresh
    }

    /// The node's Event writes due now, and how long until the next one
    /// that is held back by the interval.
    fn due(&self, node: &str, now: Now) -> (Vec<DueWrite>, Option<Duration>) {
        let mut writes = Vec::new();
        let mut next: Option<Duration> = None;
        let Some(log) = self.nodes.get(node) else {
            return (writes, next);
        };
        for (reason, series) in &log.series {
            let wait = match &series.written {
                Some(written) if written.count == series.count => continue,
                Some(written) => EVENT_INTERVAL.saturating_sub(now.mono - written.at),
                None => Duration::ZERO,
            };
            if wait.is_zero() {
                writes.push(DueWrite {
                    reason,
                    note: series.note.clone(),
                    count: series.count,
                    first_seen: series.first_seen,
                    last_seen: series.last_seen,
                    event: series.written.as_ref().map(|written| written.event.clone()),
                });
            } else {
                next = Some(next.map_or(wait, |next| next.min(wait)));
            }
        }
        writes.sort_by_key(|write| write.reason);
        (writes, next)
    }

    /// Records that `write` reached the API server as Event `event`.
    fn written(&mut self, node: &str, write: &DueWrite, event: String, at: Instant) {
        if let Some(series) = self
            .nodes
            .get_mut(node)
            .and_then(|log| log.series.get_mut(write.reason))
        {
            series.written = Some(Written {
                event,
                count: write.count,
                at,
            });
        }
    }

    /// Forgets a deleted node.
    fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
    }
}

/// Publishes findings as aggregated Warning Events.
pub(crate) struct Reporter {
    events: Api<Event>,
    instance: String,
    ledger: Mutex<Ledger>,
}

impl Reporter {
    pub(crate) fn new(client: Client, instance: &str) -> Self {
        Self {
            events: Api::namespaced(client, EVENT_NAMESPACE),
            instance: instance.to_owned(),
            ledger: Mutex::default(),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("report lock poisoned")
    }

    /// Forgets a deleted node.
    pub(crate) fn forget(&self, node: &str) {
        self.ledger().forget(node);
    }

    /// Counts the node's new `findings` (none when it is fine) and writes
    /// the Events that are due. Returns how long until a held-back write is
    /// due, for the caller to look at the node again by then.
    pub(crate) async fn report(
        &self,
        node: &Node,
        findings: &[Finding],
        metrics: &ControllerMetrics,
    ) -> Result<Option<Duration>, Error> {
        let name = node.name_any();
        let notes: Vec<(&'static str, String)> = findings
            .iter()
            .map(|finding| (finding.reason(), finding.note()))
            .collect();
        let now = Now::read();
        let (writes, next) = {
            let mut ledger = self.ledger();
            for index in ledger.observe(&name, &notes, now) {
                findings[index].record(metrics);
                tracing::debug!(reason = notes[index].0, "{}", notes[index].1);
            }
            ledger.due(&name, now)
        };
        for write in writes {
            tracing::warn!(
                reason = write.reason,
                occurrences = write.count,
                "{}",
                write.note
            );
            let event = self.publish(node, &write, now).await?;
            self.ledger().written(&name, &write, event, now.mono);
        }
        Ok(next)
    }

    /// Updates the series' Event, or creates it (also when it has expired).
    /// Returns the Event's name.
    async fn publish(&self, node: &Node, write: &DueWrite, now: Now) -> Result<String, Error> {
        let name = node.name_any();
        let failed = |source| Error::PublishEvent {
            node: name.clone(),
            reason: write.reason,
            source,
        };
        if let Some(event) = &write.event {
            let patch = json!({
                "count": write.count,
                "lastTimestamp": Time(write.last_seen),
                "message": write.note,
            });
            match self
                .events
                .patch(event, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(event.clone()),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(source) => return Err(failed(source)),
            }
        }
        let event = Event {
            metadata: ObjectMeta {
                // Unique per Event, the way client-go names events.
                name: Some(format!("{name}.{:x}", now.wall.as_nanosecond())),
                namespace: Some(EVENT_NAMESPACE.to_owned()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Node".to_owned()),
                name: Some(name.clone()),
                uid: node.uid(),
                ..ObjectReference::default()
            },
            reason: Some(write.reason.to_owned()),
            message: Some(write.note.clone()),
            type_: Some("Warning".to_owned()),
            count: Some(write.count),
            first_timestamp: Some(Time(write.first_seen)),
            last_timestamp: Some(Time(write.last_seen)),
            source: Some(EventSource {
                component: Some(FIELD_MANAGER.to_owned()),
                host: None,
            }),
            action: Some("AllocatePodCidr".to_owned()),
            reporting_component: Some(FIELD_MANAGER.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        let created = self
            .events
            .create(&PostParams::default(), &event)
            .await
            .map_err(failed)?;
        Ok(created.name_any())
    }
}

/// The findings for an exhausted node, one per family without a slice.
pub(crate) fn exhaustion_findings(
    families: &[IpFamily],
    v4: SlicePlan,
    v6: Option<SlicePlan>,
) -> Vec<Finding> {
    families
        .iter()
        .filter_map(|family| match family {
            IpFamily::V4 => Some(v4),
            IpFamily::V6 => v6,
        })
        .map(Finding::Exhausted)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Now, seconds: u64) -> Now {
        let offset = Duration::from_secs(seconds);
        Now {
            mono: start.mono + offset,
            wall: start.wall + offset,
        }
    }

    fn finding(reason: &'static str, note: &str) -> Vec<(&'static str, String)> {
        vec![(reason, note.to_owned())]
    }

    /// Runs `due` and records every write as done.
    fn flush(ledger: &mut Ledger, node: &str, now: Now) -> (Vec<DueWrite>, Option<Duration>) {
        let (writes, next) = ledger.due(node, now);
        for write in &writes {
            let event = write
                .event
                .clone()
                .unwrap_or_else(|| format!("{node}.event"));
            ledger.written(node, write, event, now.mono);
        }
        (writes, next)
    }

    #[test]
    fn the_same_finding_again_is_no_new_occurrence() {
        let start = Now::read();
        let mut ledger = Ledger::default();
        let problem = finding("PodCidrDuplicate", "holds 10.244.1.0/24");
        assert_eq!(ledger.observe("n", &problem, start), vec![0]);
        let (writes, next) = flush(&mut ledger, "n", start);
        assert_eq!(writes.len(), 1);
        assert_eq!((writes[0].count, writes[0].event.as_deref()), (1, None));
        assert_eq!(next, None);
        for seconds in [1, 100, 1000] {
            assert!(ledger.observe("n", &problem, at(start, seconds)).is_empty());
            assert_eq!(flush(&mut ledger, "n", at(start, seconds)), (vec![], None));
        }
    }

    #[test]
    fn a_flapping_claim_is_one_event_written_at_most_once_a_minute() {
        let start = Now::read();
        let mut ledger = Ledger::default();
        let mut writes = 0;
        // 44 changes a second for 20 s, as the flapping claim did.
        for step in 0..880u64 {
            let now = Now {
                mono: start.mono + Duration::from_millis(step * 1000 / 44),
                wall: start.wall,
            };
            let note = if step % 2 == 0 { "holds A" } else { "holds B" };
            assert_eq!(
                ledger
                    .observe("n", &finding("PodCidrDuplicate", note), now)
                    .len(),
                1
            );
            writes += flush(&mut ledger, "n", now).0.len();
        }
        assert_eq!(writes, 1, "only the first occurrence is written at once");
        let (pending, next) = ledger.due("n", at(start, 20));
        assert!(pending.is_empty());
        assert_eq!(next, Some(Duration::from_secs(40)));

        let (update, next) = flush(&mut ledger, "n", at(start, 60));
        assert_eq!(next, None);
        assert_eq!(update.len(), 1);
        assert_eq!(update[0].count, 880);
        assert_eq!(update[0].note, "holds B");
        assert_eq!(
            update[0].event.as_deref(),
            Some("n.event"),
            "the same Event is updated"
        );
    }

    #[test]
    fn a_problem_that_comes_back_counts_on_the_same_event() {
        let start = Now::read();
        let mut ledger = Ledger::default();
        let problem = finding("PodCidrMisaligned", "holds 10.244.0.0/20");
        ledger.observe("n", &problem, start);
        flush(&mut ledger, "n", start);
        // Fixed, then broken again.
        assert!(ledger.observe("n", &[], at(start, 5)).is_empty());
        assert_eq!(ledger.observe("n", &problem, at(start, 10)), vec![0]);
        assert_eq!(
            flush(&mut ledger, "n", at(start, 10)).1,
            Some(Duration::from_secs(50))
        );
        let (update, _) = flush(&mut ledger, "n", at(start, 61));
        assert_eq!(update[0].count, 2);
        assert_eq!(update[0].last_seen, at(start, 10).wall);
        assert_eq!(update[0].first_seen, start.wall);
    }

    #[test]
    fn reasons_and_nodes_have_their_own_events() {
        let start = Now::read();
        let mut ledger = Ledger::default();
        let two = vec![
            ("PodCidrDuplicate", "v4".to_owned()),
            ("PodCidrOutsideClusterCidr", "v6".to_owned()),
        ];
        assert_eq!(ledger.observe("a", &two, start), vec![0, 1]);
        ledger.observe("b", &two[..1], start);
        assert_eq!(flush(&mut ledger, "a", start).0.len(), 2);
        assert_eq!(flush(&mut ledger, "b", start).0.len(), 1);
        // A deleted node's series go with it: re-created, it starts afresh.
        ledger.forget("a");
        ledger.observe("a", &two[..1], at(start, 1));
        let (writes, _) = flush(&mut ledger, "a", at(start, 1));
        assert_eq!((writes[0].count, writes[0].event.clone()), (1, None));
    }
}
