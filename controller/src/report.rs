//! Telling operators about nodes the controller will not touch: a warning
//! log, a metric and a Warning Event on the Node, once per distinct problem.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::allocator::{ClaimProblem, SlicePlan};
use crate::metrics::ControllerMetrics;
use crate::{Error, FIELD_MANAGER};
use weft::ip::IpFamily;

/// Events about cluster-scoped objects live in this namespace (as the
/// kubelet's node events do); `kubectl describe node` finds them there.
pub(crate) const EVENT_NAMESPACE: &str = "default";

/// The API limits an Event note to 1 kB.
const MAX_NOTE_BYTES: usize = 1024;

/// Something wrong with one node.
pub(crate) enum Finding {
    /// An existing pod CIDR the controller leaves alone.
    Claim(ClaimProblem),
    /// No slice left for the node in this family.
    Exhausted(SlicePlan),
}

impl Finding {
    fn reason(&self) -> &'static str {
        match self {
            Finding::Claim(problem) => problem.reason(),
            Finding::Exhausted(_) => "PodCidrExhausted",
        }
    }

    fn note(&self) -> String {
        match self {
            Finding::Claim(problem) => problem.to_string(),
            Finding::Exhausted(plan) => format!(
                "no free /{} slice left in the {} cluster CIDR {}; the node gets one as soon as a slice frees (delete unused nodes, or widen the cluster CIDR)",
                plan.slice_prefix(),
                plan.family(),
                plan.cluster()
            ),
        }
    }

    fn record(&self, metrics: &ControllerMetrics) {
        match self {
            Finding::Claim(problem) => metrics.record_claim_problem(problem.reason()),
            Finding::Exhausted(plan) => metrics.record_exhaustion(plan.family()),
        }
    }
}

/// Publishes findings, skipping those already reported for the node.
pub(crate) struct Reporter {
    events: Api<Event>,
    instance: String,
    /// The notes last reported per node; cleared when the node is fine again.
    reported: Mutex<HashMap<String, Vec<String>>>,
}

impl Reporter {
    pub(crate) fn new(client: Client, instance: &str) -> Self {
        Self {
            events: Api::namespaced(client, EVENT_NAMESPACE),
            instance: instance.to_owned(),
            reported: Mutex::default(),
        }
    }

    /// Forgets what was reported for `node` (it is fine now, or gone).
    pub(crate) fn clear(&self, node: &str) {
        self.reported
            .lock()
            .expect("report lock poisoned")
            .remove(node);
    }

    /// Logs, counts and publishes `findings` unless exactly these were
    /// reported for the node already.
    pub(crate) async fn report(
        &self,
        node: &Node,
        findings: &[Finding],
        metrics: &ControllerMetrics,
    ) -> Result<(), Error> {
        let name = node.name_any();
        let notes: Vec<String> = findings.iter().map(Finding::note).collect();
        if self
            .reported
            .lock()
            .expect("report lock poisoned")
            .get(&name)
            == Some(&notes)
        {
            return Ok(());
        }
        for (finding, note) in findings.iter().zip(&notes) {
            tracing::warn!(reason = finding.reason(), "{note}");
            finding.record(metrics);
            self.publish(node, finding.reason(), note).await?;
        }
        self.reported
            .lock()
            .expect("report lock poisoned")
            .insert(name, notes);
        Ok(())
    }

    async fn publish(&self, node: &Node, reason: &'static str, note: &str) -> Result<(), Error> {
        let now = Timestamp::now();
        let name = node.name_any();
        let mut note = note.to_owned();
        if note.len() > MAX_NOTE_BYTES {
            let mut end = MAX_NOTE_BYTES;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let event = Event {
            metadata: ObjectMeta {
                // Unique per publication, the way client-go names events.
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(EVENT_NAMESPACE.to_owned()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            reporting_controller: Some(FIELD_MANAGER.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            action: Some("AllocatePodCidr".to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(note),
            type_: Some("Warning".to_owned()),
            regarding: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Node".to_owned()),
                name: Some(name.clone()),
                uid: node.uid(),
                ..ObjectReference::default()
            }),
            ..Event::default()
        };
        self.events
            .create(&PostParams::default(), &event)
            .await
            .map(drop)
            .map_err(|source| Error::PublishEvent {
                node: name,
                reason,
                source,
            })
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
