//! The agent's `/status` document ([`AgentStatus`]).
//!
//! The document is built from a small [`Snapshot`] that the reconcile loop
//! and the policy task update after each pass, copying in values they
//! already hold; a request only copies the snapshot out and serialises it,
//! so serving `/status` reads no kernel state and costs the loop nothing
//! between passes.
//!
//! Only the checks do work on request. `?check=kernel` dumps the kernel and
//! plans without applying ([`crate::kernel_check`]; with `&peer=<node>`,
//! also the entries this node must hold for that peer), and audits the
//! plugin's address store against the Pods the API shows on this node
//! ([`crate::ipam_audit`], read-only). The audit's result stays in the
//! snapshot, so a plain `/status` shows the last one (none before the
//! first check). `?check=dump` reads Weft's part of the kernel for a bug
//! report ([`crate::dump`]), one dump at a time: a second request waits
//! for the running one (within the endpoint's request limit, past which
//! it is answered 503).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::FutureExt;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use tokio::sync::Semaphore;
use weft_core::ipam_store::STORE_DIR;
use weft_core::status::{
    AgentStatus, Build, HeldPeer, IpamStatus, KernelDump, LastRun, Peers, PolicyStatus, Readiness,
    Reconcile, RefusedPolicy, RejectedPeer, Underlay,
};
use weft_daemon::serve::{Health, StatusQuery, StatusRefusal, StatusSource};

use super::dataplane::RouteConflict;
use super::dump::read_kernel_dump;
use super::ipam_audit::{audit, pod_addresses};
use super::kernel_check::KernelCheckHandle;
use super::peer::Peer;
use super::policy::compile::{Direction, PolicyPlan};
use super::policy::model::PolicyError;
use super::policy::nft::Applied;
use super::screen::Rejected;
use super::setup::AppliedSetup;

/// `/status?check=kernel`: the kernel against what the agent wants.
const KERNEL_CHECK: &str = "kernel";
/// `/status?check=dump`: Weft's part of the kernel, as it is.
const DUMP_CHECK: &str = "dump";

/// What the agent last knew, copied in after each pass: the small values
/// the document is made of.
#[derive(Debug, Clone)]
struct Snapshot {
    node: String,
    backend: String,
    slices: Vec<String>,
    mtu: Option<u32>,
    underlay: Option<Underlay>,
    vtep_mac: Option<String>,
    /// Why `/readyz` would not answer 200; shown only while it does not.
    not_ready: String,
    peers: Peers,
    last_reconcile: Option<Reconcile>,
    policy: PolicyStatus,
    ipam: Option<IpamStatus>,
}

impl Snapshot {
    /// The document for this snapshot, with `ready` as `/readyz` answers.
    fn document(&self, ready: bool) -> AgentStatus {
        AgentStatus {
            build: Build::current(),
            node: self.node.clone(),
            backend: self.backend.clone(),
            slices: self.slices.clone(),
            mtu: self.mtu,
            underlay: self.underlay.clone(),
            vtep_mac: self.vtep_mac.clone(),
            readiness: Readiness {
                ready,
                reason: (!ready).then(|| self.not_ready.clone()),
            },
            peers: self.peers.clone(),
            last_reconcile: self.last_reconcile.clone(),
            policy: Some(self.policy.clone()),
            ipam: self.ipam.clone(),
            kernel: None,
            dump: None,
        }
    }
}

/// The agent's `/status`: serves the latest [`Snapshot`], which the
/// reconcile loop updates through the recording methods. Clones share one
/// snapshot.
#[derive(Clone)]
pub(crate) struct AgentStatusSource {
    health: Arc<Health>,
    snapshot: Arc<Mutex<Snapshot>>,
    /// What `?check=kernel` runs, once the node cache it reads exists.
    checks: Arc<OnceLock<Checks>>,
    /// One permit: `?check=dump` runs one dump at a time.
    dumps: Arc<Semaphore>,
}

/// What `?check=kernel` needs.
#[derive(Clone)]
struct Checks {
    kernel: KernelCheckHandle,
    /// For the list of this node's Pods the IPAM audit compares with.
    client: Client,
}

impl AgentStatusSource {
    /// A source for the agent of `node` on `backend`, reporting `health`
    /// as its readiness, with NetworkPolicy enforced when `policy` is set.
    pub(crate) fn new(node: &str, backend: &str, policy: bool, health: Arc<Health>) -> Self {
        let snapshot = Snapshot {
            node: node.to_owned(),
            backend: backend.to_owned(),
            slices: Vec::new(),
            mtu: None,
            underlay: None,
            vtep_mac: None,
            not_ready: "waiting for the first complete list of Nodes from the API server".into(),
            peers: Peers::default(),
            last_reconcile: None,
            policy: PolicyStatus {
                enabled: policy,
                ..PolicyStatus::default()
            },
            ipam: None,
        };
        AgentStatusSource {
            health,
            snapshot: Arc::new(Mutex::new(snapshot)),
            checks: Arc::default(),
            dumps: Arc::new(Semaphore::new(1)),
        }
    }

    /// Makes `?check=kernel` available: `kernel` checks the kernel, and
    /// `client` lists this node's Pods for the IPAM audit. Until then the
    /// check is refused as not available yet.
    pub(crate) fn attach_checks(&self, kernel: KernelCheckHandle, client: Client) {
        if self.checks.set(Checks { kernel, client }).is_err() {
            tracing::debug!("the kernel check was attached twice; the first one stays");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot.lock().expect("status snapshot lock poisoned")
    }

    /// Records why the agent is not ready (shown while `/readyz` says so).
    pub(crate) fn not_ready(&self, reason: String) {
        self.lock().not_ready = reason;
    }

    /// Records the node set-up the last reconcile used.
    pub(crate) fn record_setup(&self, setup: &AppliedSetup) {
        let mut snapshot = self.lock();
        snapshot.slices = setup
            .local
            .pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        snapshot.mtu = Some(setup.mtu);
        snapshot.underlay = Some(Underlay {
            device: setup.underlay_device.clone(),
            address: setup.public_ip.to_string(),
        });
        snapshot.vtep_mac = setup.vtep.as_ref().map(|vtep| vtep.mac.to_string());
    }

    /// Records what the last reconcile made of the peers.
    pub(crate) fn record_peers(&self, peers: Peers) {
        self.lock().peers = peers;
    }

    /// Records a reconcile that ended well after `took`; `repaired` is the
    /// number of kernel entries it changed when it was a periodic resync
    /// (what the resync found wrong), `None` for any other pass.
    pub(crate) fn reconciled(&self, took: Duration, repaired: Option<usize>) {
        let mut snapshot = self.lock();
        let before = snapshot.last_reconcile.take();
        snapshot.last_reconcile = Some(reconcile_record(before, took, Ok(repaired)));
    }

    /// Records a reconcile that failed with `error` after `took`.
    pub(crate) fn reconcile_failed(&self, took: Duration, error: &dyn std::error::Error) {
        let mut snapshot = self.lock();
        let before = snapshot.last_reconcile.take();
        snapshot.last_reconcile = Some(reconcile_record(before, took, Err(error.to_string())));
    }

    /// The handle the policy task records its syncs with.
    pub(crate) fn policy_recorder(&self) -> PolicyRecorder {
        PolicyRecorder {
            snapshot: self.snapshot.clone(),
        }
    }
}

impl StatusSource for AgentStatusSource {
    fn status(
        &self,
        query: StatusQuery,
    ) -> BoxFuture<'static, Result<serde_json::Value, StatusRefusal>> {
        let mut document = self.lock().document(self.health.is_ready());
        let checks = self.checks.get().cloned();
        let snapshot = self.snapshot.clone();
        let dumps = self.dumps.clone();
        async move {
            match query.check.as_deref() {
                None => {}
                Some(KERNEL_CHECK) => {
                    let checks = checks.ok_or_else(|| {
                        StatusRefusal("check=kernel is not available yet: the agent is starting; ask again once /readyz answers 200".into())
                    })?;
                    let (kernel, ipam) = futures::join!(
                        checks
                            .kernel
                            .check(query.peer.as_deref(), &document.peers.held),
                        audit_ipam(checks.client, document.node.clone())
                    );
                    let kernel = kernel.map_err(|error| StatusRefusal(error.to_string()))?;
                    document.kernel = Some(kernel);
                    if let Some(ipam) = ipam {
                        snapshot.lock().expect("status snapshot lock poisoned").ipam =
                            Some(ipam.clone());
                        document.ipam = Some(ipam);
                    }
                }
                Some(DUMP_CHECK) => document.dump = Some(dump_kernel(dumps).await?),
                Some(other) => return Err(unknown_check(other)),
            }
            serde_json::to_value(document).map_err(|error| {
                StatusRefusal(format!("the status document does not serialise: {error}"))
            })
        }
        .boxed()
    }
}

/// Reads Weft's part of the kernel off the runtime, once the one permit of
/// `dumps` is free; the permit stays with the read, so a request that gave
/// up waiting for it does not let a second read start beside it.
async fn dump_kernel(dumps: Arc<Semaphore>) -> Result<KernelDump, StatusRefusal> {
    let Ok(permit) = dumps.acquire_owned().await else {
        unreachable!("the dump permit is never closed");
    };
    tokio::task::spawn_blocking(move || {
        let dump = read_kernel_dump();
        drop(permit);
        dump
    })
    .await
    .map_err(|join| {
        StatusRefusal(format!(
            "check=dump ended abnormally: {join}; see the agent's log"
        ))
    })
}

/// Audits the plugin's address store against the addresses of the Pods the
/// API shows on `node`; `None`, logged, when the Pods or the store cannot
/// be read.
async fn audit_ipam(client: Client, node: String) -> Option<IpamStatus> {
    let pods = match pod_addresses(client, &node).await {
        Ok(pods) => pods,
        Err(error) => {
            tracing::warn!(%error, "IPAM audit skipped: listing this node's Pods failed (the agent needs list on pods)");
            return None;
        }
    };
    // Reading the store's files blocks.
    let audited =
        tokio::task::spawn_blocking(move || audit(Path::new(STORE_DIR), &pods, SystemTime::now()))
            .await;
    match audited {
        Ok(Ok(audited)) => {
            for note in &audited.notes {
                tracing::info!(note, "IPAM audit");
            }
            Some(audited.status)
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "IPAM audit failed");
            None
        }
        Err(join) => {
            tracing::warn!(%join, "the IPAM audit ended abnormally");
            None
        }
    }
}

/// The refusal of a `check` the agent does not know.
fn unknown_check(check: &str) -> StatusRefusal {
    StatusRefusal(format!(
        "unknown check {check:?}: the agent knows check={KERNEL_CHECK} (optionally with &peer=<node>) and check={DUMP_CHECK}"
    ))
}

/// The current time in RFC 3339, to the millisecond.
fn now() -> String {
    format!("{:.3}", Timestamp::now())
}

/// The record of a reconcile that just ended after `took`: `Ok` with the
/// entries a resync repaired (`None` for other passes, which keep the
/// count of the resync `before`), or `Err` with the error's text.
fn reconcile_record(
    before: Option<Reconcile>,
    took: Duration,
    outcome: Result<Option<usize>, String>,
) -> Reconcile {
    let repaired_before = before.map_or(0, |before| before.repaired_at_last_resync);
    let (result, repaired) = match outcome {
        Ok(repaired) => (
            "ok".to_string(),
            repaired.map_or(repaired_before, |count| count as u64),
        ),
        Err(error) => (error, repaired_before),
    };
    Reconcile {
        at: now(),
        duration_ms: took.as_millis().try_into().unwrap_or(u64::MAX),
        result,
        repaired_at_last_resync: repaired,
    }
}

/// A peer on its kernel-refusal backoff, for [`peers`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retrying<'a> {
    /// The peer's Node.
    pub(crate) node: &'a str,
    /// Time until its retry.
    pub(crate) retry_in: Duration,
    /// The kernel's last refusal.
    pub(crate) refusal: &'a str,
}

/// What a reconcile made of the peers: the `accepted` peers not held
/// (programmed), the `rejected` ones with the annotation at fault and why,
/// and the held ones: the `retrying` peers, waiting after a kernel refusal,
/// and accepted peers whose slice another owner's route holds
/// (`conflicts`), which every reconcile retries. Each peer is in one list.
pub(crate) fn peers(
    accepted: &[&Peer],
    rejected: &[Rejected],
    retrying: &[Retrying<'_>],
    conflicts: &[RouteConflict],
) -> Peers {
    let mut held: BTreeMap<&str, HeldPeer> = BTreeMap::new();
    for retry in retrying {
        let reason = format!("the kernel refused one of its entries: {}", retry.refusal);
        held.insert(
            retry.node,
            HeldPeer {
                node: retry.node.to_owned(),
                reason,
                retry_in_ms: Some(retry.retry_in.as_millis().try_into().unwrap_or(u64::MAX)),
            },
        );
    }
    for conflict in conflicts {
        let Some(peer) = accepted.iter().find(|peer| conflict.concerns(peer)) else {
            continue;
        };
        let reason = conflict_reason(conflict);
        held.entry(&peer.node_name)
            .and_modify(|held| {
                held.reason.push_str("; ");
                held.reason.push_str(&reason);
            })
            .or_insert_with(|| HeldPeer {
                node: peer.node_name.clone(),
                reason,
                retry_in_ms: None,
            });
    }
    Peers {
        accepted: accepted
            .iter()
            .filter(|peer| !held.contains_key(peer.node_name.as_str()))
            .map(|peer| peer.node_name.clone())
            .collect(),
        rejected: rejected
            .iter()
            .map(|rejected| RejectedPeer {
                node: rejected.node_name.clone(),
                field: rejected.reason.field().to_owned(),
                reason: rejected.reason.to_string(),
            })
            .collect(),
        held: held.into_values().collect(),
    }
}

/// Why a peer is held for `conflict`, as `/status` says it.
pub(crate) fn conflict_reason(conflict: &RouteConflict) -> String {
    format!("route conflict: {conflict}; held until that route is removed")
}

/// How the policy task records its syncs in the agent's `/status`.
#[derive(Debug, Clone)]
pub(crate) struct PolicyRecorder {
    snapshot: Arc<Mutex<Snapshot>>,
}

impl PolicyRecorder {
    fn policy(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot.lock().expect("status snapshot lock poisoned")
    }

    /// Records the plan the table enforces after an apply that reported
    /// `applied`; the fingerprint is computed again only when the plan may
    /// have changed.
    pub(crate) fn enforced(&self, plan: &PolicyPlan, applied: Applied) {
        let fingerprint = {
            let snapshot = self.policy();
            match (&snapshot.policy.fingerprint, applied) {
                (Some(kept), Applied::Unchanged) => Some(kept.clone()),
                _ => None,
            }
        };
        // Hashed outside the lock: a request never waits for it.
        let fingerprint = fingerprint.unwrap_or_else(|| plan.fingerprint());
        let mut snapshot = self.policy();
        let policy = &mut snapshot.policy;
        policy.isolated_ingress = Direction::Ingress.of(plan).isolated.len() as u64;
        policy.isolated_egress = Direction::Egress.of(plan).isolated.len() as u64;
        policy.fingerprint = Some(fingerprint);
    }

    /// Records a sync that ended well, with the policies it had to refuse.
    pub(crate) fn synced(&self, refused: &[PolicyError]) {
        let mut snapshot = self.policy();
        let policy = &mut snapshot.policy;
        policy.last_sync = Some(LastRun {
            at: now(),
            result: "ok".into(),
        });
        policy.refused = refused.iter().map(refused_policy).collect();
    }

    /// Records a sync that failed with `error`; the table keeps enforcing
    /// the plan recorded last.
    pub(crate) fn failed(&self, error: &dyn std::error::Error) {
        self.policy().policy.last_sync = Some(LastRun {
            at: now(),
            result: error.to_string(),
        });
    }
}

/// A refused policy as `/status` shows it.
fn refused_policy(refused: &PolicyError) -> RefusedPolicy {
    RefusedPolicy {
        policy: format!("{}/{}", refused.namespace, refused.name),
        field: refused.field.clone(),
        reason: refused.problem.clone(),
    }
}

#[cfg(test)]
mod tests {
    use weft_core::annotations::VtepMac;

    use super::*;
    use crate::policy::compile::AllowSetId;
    use crate::screen::Rejection;

    fn peer(name: &str, slice: &str, last: u8) -> Peer {
        Peer {
            node_name: name.into(),
            pod_cidrs: vec![slice.parse().unwrap()],
            public_ip: format!("172.31.0.{last}").parse().unwrap(),
            vtep_mac: Some(VtepMac::new([0x0a, 0x58, 0, 0, 0, last])),
            created: 0,
            malformed: None,
        }
    }

    fn source(ready: bool) -> AgentStatusSource {
        let health = Health::new();
        health.set_ready(ready);
        AgentStatusSource::new("node-a", "vxlan", true, health)
    }

    #[test]
    fn held_peers_leave_the_accepted_list_and_say_why() {
        let peers_given = [
            peer("b", "10.244.1.0/24", 11),
            peer("c", "10.244.2.0/24", 12),
            peer("d", "10.244.3.0/24", 13),
        ];
        let accepted: Vec<&Peer> = peers_given.iter().collect();
        let rejected = [Rejected {
            node_name: "e".into(),
            reason: Rejection::OwnPublicIp("172.31.0.10".parse().unwrap()),
        }];
        let retrying = [Retrying {
            node: "b",
            retry_in: Duration::from_millis(1500),
            refusal: "File exists",
        }];
        let conflict = RouteConflict {
            destination: "10.244.2.0/24".parse().unwrap(),
            foreign: None,
        };
        let peers = peers(&accepted, &rejected, &retrying, &[conflict]);
        assert_eq!(peers.accepted, vec!["d".to_string()]);
        assert_eq!(
            peers.rejected,
            vec![RejectedPeer {
                node: "e".into(),
                field: "weft.dev/public-ip".into(),
                reason: "172.31.0.10 is this node's address".into(),
            }]
        );
        let held: Vec<(&str, Option<u64>)> = peers
            .held
            .iter()
            .map(|held| (held.node.as_str(), held.retry_in_ms))
            .collect();
        assert_eq!(held, vec![("b", Some(1500)), ("c", None)]);
        assert!(peers.held[0].reason.contains("File exists"));
        assert!(peers.held[1].reason.contains("10.244.2.0/24"));
    }

    #[test]
    fn a_peer_both_retrying_and_in_conflict_is_listed_once_with_both_reasons() {
        let b = peer("b", "10.244.1.0/24", 11);
        let retrying = [Retrying {
            node: "b",
            retry_in: Duration::from_secs(2),
            refusal: "No such device",
        }];
        let conflict = RouteConflict {
            destination: "10.244.1.0/24".parse().unwrap(),
            foreign: None,
        };
        let peers = peers(&[&b], &[], &retrying, &[conflict]);
        assert!(peers.accepted.is_empty());
        assert_eq!(peers.held.len(), 1);
        assert_eq!(peers.held[0].retry_in_ms, Some(2000));
        assert!(peers.held[0].reason.contains("refused"));
        assert!(peers.held[0].reason.contains("route conflict"));
    }

    #[test]
    fn the_reason_shows_only_while_not_ready() {
        let status = source(false);
        status.not_ready("no pod CIDR yet".into());
        let document = status.lock().document(false);
        assert_eq!(
            document.readiness.reason.as_deref(),
            Some("no pod CIDR yet")
        );
        assert!(status.lock().document(true).readiness.reason.is_none());
    }

    #[test]
    fn a_resync_sets_the_repair_count_and_other_passes_keep_it() {
        let took = Duration::from_millis(12);
        let resync = reconcile_record(None, took, Ok(Some(3)));
        assert_eq!(
            (resync.result.as_str(), resync.repaired_at_last_resync),
            ("ok", 3)
        );
        assert_eq!(resync.duration_ms, 12);
        let change = reconcile_record(Some(resync), took, Ok(None));
        assert_eq!(change.repaired_at_last_resync, 3);
        let failed = reconcile_record(Some(change), took, Err("guard: nft failed".into()));
        assert_eq!(failed.result, "guard: nft failed");
        assert_eq!(failed.repaired_at_last_resync, 3);
        assert!(failed.at.parse::<Timestamp>().is_ok(), "{}", failed.at);
    }

    #[test]
    fn policy_syncs_fill_the_policy_section() {
        let status = source(true);
        let recorder = status.policy_recorder();
        let mut plan = PolicyPlan::default();
        plan.egress.isolated = [
            ("10.244.1.5".parse().unwrap(), AllowSetId(1)),
            ("10.244.1.6".parse().unwrap(), AllowSetId(1)),
        ]
        .into();
        recorder.enforced(&plan, Applied::Replaced);
        recorder.synced(&[PolicyError {
            namespace: "shop".into(),
            name: "deny".into(),
            field: "spec.ingress[0].from[0].ipBlock.cidr".into(),
            problem: "not a CIDR".into(),
        }]);
        let policy = status.lock().document(true).policy.unwrap();
        assert!(policy.enabled);
        assert_eq!((policy.isolated_ingress, policy.isolated_egress), (0, 2));
        assert_eq!(policy.fingerprint, Some(plan.fingerprint()));
        assert_eq!(policy.last_sync.unwrap().result, "ok");
        assert_eq!(
            policy.refused,
            vec![RefusedPolicy {
                policy: "shop/deny".into(),
                field: "spec.ingress[0].from[0].ipBlock.cidr".into(),
                reason: "not a CIDR".into(),
            }]
        );
        recorder.failed(&std::io::Error::other("nft: table busy"));
        let policy = status.lock().document(true).policy.unwrap();
        assert_eq!(policy.last_sync.unwrap().result, "nft: table busy");
        assert_eq!(policy.fingerprint, Some(plan.fingerprint()));
    }

    #[tokio::test]
    async fn unknown_checks_and_checks_before_start_up_are_refused() {
        let check = |check: &str, peer: Option<&str>| StatusQuery {
            check: Some(check.into()),
            peer: peer.map(Into::into),
        };
        let refusal = source(true).status(check("nope", None)).await.unwrap_err();
        assert!(refusal.0.contains("check=kernel"), "{refusal}");
        assert!(refusal.0.contains("check=dump"), "{refusal}");
        for peer in [None, Some("node-b")] {
            let refusal = source(true)
                .status(check(KERNEL_CHECK, peer))
                .await
                .unwrap_err();
            assert!(refusal.0.contains("not available yet"), "{refusal}");
        }
        let document = source(true).status(StatusQuery::default()).await.unwrap();
        assert!(document.get("dump").is_none_or(serde_json::Value::is_null));
        assert_eq!(document["node"], "node-a");
        assert_eq!(document["readiness"]["ready"], true);
    }
}
