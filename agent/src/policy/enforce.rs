//! The policy loop: once Pods, Namespaces, NetworkPolicies and Nodes are
//! listed, screen the pods' addresses against their nodes' slices, compile
//! what this node enforces and apply it on every change that matters, write
//! the table whole on each resync, and retry a failed apply with backoff.
//! Between changes the table watch ([`crate::nft_watch`]) restores the table
//! if anyone else changes it. The loop runs beside the overlay's reconcile
//! and shares nothing with it but the node cache (read only) and the
//! metrics: a policy that cannot be enforced never holds up routes, and
//! routes never wait for policy.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinError;
use weft_core::nft::NftError;
use weft_core::DEFAULT_BRIDGE;

use super::compile::{compile, Direction};
use super::model::{screen_pod_addresses, AddressRejection, PolicyError, RejectedAddress};
use super::nft::{PolicyDataplane, TABLE};
use super::watch::{watch_policy_inputs, PolicyCache};
use crate::cache::NodeCache;
use crate::metrics::AgentMetrics;
use crate::nft_watch::TableRegistry;
use crate::retry::{RETRY_CAP, RETRY_START};
use crate::status::PolicyRecorder;

/// The br_netfilter switches that pass bridged IPv4 and IPv6 packets
/// through the IP hooks. Pods are routed (no bridge), so their traffic
/// meets the forward hook anyway; only pods still attached to the legacy
/// bridge of an upgraded node ([`DEFAULT_BRIDGE`]) need these, until they
/// are re-created.
const BRIDGE_NETFILTER: [&str; 2] = [
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];

/// A br_netfilter switch that is off and could not be turned on.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source} (load br_netfilter with `modprobe br_netfilter` and set it to 1, or re-create the pods still on the legacy bridge {DEFAULT_BRIDGE}; until then traffic between those pods bypasses NetworkPolicy)")]
pub struct BridgeNetfilterError {
    path: &'static str,
    source: std::io::Error,
}

/// Turns br_netfilter's switches on while the legacy pod bridge exists in
/// this thread's namespace, so traffic between two pods still on it meets
/// the policy table; does nothing on a node without it.
pub fn ensure_legacy_bridge_netfilter() -> Result<(), BridgeNetfilterError> {
    // /proc/sys/net shows the namespace of whoever opens it.
    let legacy_bridge = format!("/proc/sys/net/ipv4/conf/{DEFAULT_BRIDGE}");
    if !std::path::Path::new(&legacy_bridge).exists() {
        return Ok(());
    }
    for path in BRIDGE_NETFILTER {
        let fail = |source| BridgeNetfilterError { path, source };
        if std::fs::read_to_string(path).map_err(fail)?.trim() != "1" {
            std::fs::write(path, "1").map_err(fail)?;
            tracing::info!(
                path,
                "turned on br_netfilter so pods on the legacy bridge meet network policy"
            );
        }
    }
    Ok(())
}

/// How often the drop counters are read for
/// `weft_agent_policy_denied_packets_total`.
const DENIED_READ_EVERY: Duration = Duration::from_secs(10);

/// Why one pass failed.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    BridgeNetfilter(#[from] BridgeNetfilterError),
    #[error("the blocking nft task ended abnormally: {0}")]
    Task(#[from] JoinError),
}

/// What a pass logged last, so that a standing problem is logged once.
#[derive(Debug, Default)]
struct Logged {
    refusals: Vec<PolicyError>,
    rejected_addresses: Vec<RejectedAddress>,
}

/// Enforces NetworkPolicy for the pods on `node_name` until `stop` turns
/// true, checking pod addresses against the slices in `nodes` and, when
/// `tables` is given, having the table restored after changes made by
/// others. Failures are logged, counted and retried; the table stays as the
/// last successful apply left them meanwhile. Each sync is recorded in
/// `status`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn enforce(
    client: Client,
    node_name: String,
    nodes: Arc<NodeCache>,
    tables: Option<TableRegistry>,
    metrics: AgentMetrics,
    status: PolicyRecorder,
    resync: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let (cache, watches) = watch_policy_inputs(client, metrics.clone());
    let dataplane = Arc::new(Mutex::new(PolicyDataplane::default()));
    let _restores = tables.map(|tables| {
        let dataplane = dataplane.clone();
        tables.register(TABLE, move || lock(&dataplane).restore_if_changed())
    });
    let mut next_resync = Instant::now() + resync;
    let mut retry = None;
    let mut logged = Logged::default();
    let mut count_denied = tokio::time::interval(DENIED_READ_EVERY);
    count_denied.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read_counters = false;
    loop {
        let wait = retry.unwrap_or_else(|| next_resync.saturating_duration_since(Instant::now()));
        tokio::select! {
            _ = cache.changed() => {}
            _ = nodes.changed_for_policy() => {}
            _ = tokio::time::sleep(wait) => {
                if retry.is_none() {
                    next_resync = Instant::now() + resync;
                    lock(&dataplane).resync();
                }
            }
            _ = count_denied.tick() => read_counters = true,
            _ = stop.wait_for(|stop| *stop) => break,
        }
        if std::mem::take(&mut read_counters) {
            read_denied(&dataplane, &metrics).await;
            continue;
        }
        match sync(
            &cache,
            &nodes,
            &node_name,
            &metrics,
            &status,
            &dataplane,
            &mut logged,
        )
        .await
        {
            Ok(()) => retry = None,
            Err(error) => {
                metrics.record_error("policy");
                status.failed(&error);
                let next = retry.map_or(RETRY_START, |r: Duration| (r * 2).min(RETRY_CAP));
                tracing::warn!(%error, retry_in = ?next, "enforcing network policy failed");
                retry = Some(next);
            }
        }
    }
    for watch in watches {
        watch.abort();
    }
}

fn lock(dataplane: &Mutex<PolicyDataplane>) -> MutexGuard<'_, PolicyDataplane> {
    dataplane.lock().expect("policy data plane lock poisoned")
}

/// Counts the packets the table dropped since the last read into the
/// metrics. Off the sync's path: a policy change never waits for a counter
/// read.
async fn read_denied(dataplane: &Arc<Mutex<PolicyDataplane>>, metrics: &AgentMetrics) {
    let dataplane = dataplane.clone();
    match tokio::task::spawn_blocking(move || lock(&dataplane).newly_denied()).await {
        Ok(Ok((egress, ingress))) => {
            metrics.record_policy_denied(Direction::Egress.name(), egress);
            metrics.record_policy_denied(Direction::Ingress.name(), ingress);
        }
        Ok(Err(error)) => tracing::debug!(%error, "reading the policy drop counters failed"),
        Err(error) => tracing::debug!(%error, "the counter read ended abnormally"),
    }
}

/// One pass: screen and compile from the caches, and apply.
async fn sync(
    cache: &PolicyCache,
    nodes: &NodeCache,
    node_name: &str,
    metrics: &AgentMetrics,
    status: &PolicyRecorder,
    dataplane: &Arc<Mutex<PolicyDataplane>>,
    logged: &mut Logged,
) -> Result<(), SyncError> {
    let (Some(inputs), Some(slices)) = (cache.snapshot(), nodes.pod_slices()) else {
        return Ok(());
    };
    if inputs.refused != logged.refusals {
        for refused in &inputs.refused {
            tracing::warn!(policy = %format!("{}/{}", refused.namespace, refused.name), field = %refused.field, "NetworkPolicy not enforced: {refused}");
        }
        logged.refusals = inputs.refused.clone();
    }
    let started = Instant::now();
    let screened = screen_pod_addresses(inputs.pods, &slices);
    metrics.record_policy_rejected_pod_ips(
        AddressRejection::LABELS,
        screened.rejected.iter().map(|r| r.reason.label()),
    );
    // Each rejection is logged when it starts and when it ends (both lists
    // are sorted).
    let before = std::mem::take(&mut logged.rejected_addresses);
    for rejected in &screened.rejected {
        if before.binary_search(rejected).is_err() {
            tracing::warn!(pod = %format!("{}/{}", rejected.namespace, rejected.name), ip = %rejected.ip, reason = rejected.reason.label(), "pod address selects nothing in network policy: {rejected}");
        }
    }
    for resolved in &before {
        if screened.rejected.binary_search(resolved).is_err() {
            tracing::info!(pod = %format!("{}/{}", resolved.namespace, resolved.name), ip = %resolved.ip, reason = resolved.reason.label(), "pod address no longer rejected by network policy");
        }
    }
    logged.rejected_addresses = screened.rejected;
    let plan = compile(
        node_name,
        &screened.pods,
        &inputs.namespaces,
        &inputs.policies,
    );
    let (dataplane, recorded, refused) = (dataplane.clone(), metrics.clone(), inputs.refused.len());
    let enforced = status.clone();
    let applied = tokio::task::spawn_blocking(move || {
        ensure_legacy_bridge_netfilter()?;
        let mut dataplane = lock(&dataplane);
        let applied = dataplane.apply(plan)?;
        // The metrics say what the kernel enforces, not what is on its way.
        if let Some(plan) = dataplane.enforced() {
            for direction in Direction::BOTH {
                let side = direction.of(plan);
                let rules = side.allow_sets.values().map(|set| set.len()).sum();
                recorded.record_policy_enforced(direction.name(), rules, side.isolated.len());
            }
            recorded.record_policy_refused(refused);
            enforced.enforced(plan, applied);
        }
        Ok::<_, SyncError>(applied)
    })
    .await??;
    metrics.record_policy_synced(started.elapsed().as_secs_f64());
    status.synced(&inputs.refused);
    tracing::debug!(
        ?applied,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "network policy synced"
    );
    Ok(())
}
