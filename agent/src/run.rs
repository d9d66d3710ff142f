//! The agent loop: wait for the first complete node list, then reconcile
//! the node's data plane on every change that matters, on a periodic
//! resync, and after a failure with backoff; on shutdown, decide between
//! restart and uninstall.
//!
//! One reconcile is node set-up ([`super::setup`], only when this node's
//! own fields changed or on resync), then the peers (screened by
//! [`super::screen`], desired state from [`super::overlay`], dumped,
//! planned and applied by [`super::dataplane`]), then the Node writes
//! ([`super::publish`]). A peer whose entries the kernel refuses is logged,
//! counted and put on its own backoff ([`super::retry`]); the other peers
//! and the Node writes go on in the same pass. A failed reconcile is logged,
//! counted and retried, and never undoes the data plane: while the API
//! server is away nothing is removed, and the next full list brings the
//! [`super::cache`] up to date for the following reconcile to repair
//! whatever changed meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use tracing::Instrument;

use super::cache::{watch_nodes, NodeCache, NodeSnapshot};
use super::config::AgentConfig;
use super::dataplane::{ApplyReport, Dataplane, RouteConflict};
use super::error::AgentError;
use super::guard::{Guard, GuardChange, GuardState, TABLE as GUARD_TABLE};
use super::kernel_check::{desired_for_peers, KernelCheckHandle};
use super::metrics::AgentMetrics;
use super::nft_watch::{TableRegistry, TableWatch};
use super::overlay::{EntryOwners, Operation, SkippedPeer};
use super::policy::enforce::enforce;
use super::policy::nft::{remove_table, TABLE as POLICY_TABLE};
use super::publish::NodePublisher;
use super::retry::{held_peers, ConflictLog, PeerRetries, RETRY_CAP, RETRY_START};
use super::screen::{Rejected, Screened};
use super::setup::{AppliedSetup, NodeSetup};
use super::status::{peers, AgentStatusSource, PolicyRecorder, Retrying};
use super::uninstall::{ask_api, decide, tear_down, DaemonSetWatcher, OwnDaemonSet, Shutdown};
use weft_core::netlink::{Netlink, Removal};
use weft_daemon::serve::{self, Health};

/// How long a stopping agent waits for the API to say whether its DaemonSet
/// still exists: well within the pod's termination grace period.
const UNINSTALL_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the agent for node `node_name` until `shutdown` resolves. Returns
/// early only if the health endpoint cannot be served; every other failure
/// is logged, counted and retried, and never undoes the data plane.
///
/// On shutdown the data plane stays, unless `own_daemonset` is given and
/// turns out to be deleted (see [`super::uninstall`]): then everything Weft
/// put on the node is removed.
pub async fn run(
    config: AgentConfig,
    node_name: String,
    own_daemonset: Option<OwnDaemonSet>,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let span = tracing::info_span!("agent", node = %node_name);
    run_inner(config, node_name, own_daemonset, client, shutdown)
        .instrument(span)
        .await
}

async fn run_inner(
    config: AgentConfig,
    node_name: String,
    own_daemonset: Option<OwnDaemonSet>,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let mut registry = Registry::default();
    let metrics = AgentMetrics::register(&mut registry);
    let health = Health::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let status = AgentStatusSource::new(
        &node_name,
        config.backend.as_str(),
        config.network_policy,
        health.clone(),
    );
    let server = serve::start(
        config.metrics_address,
        registry,
        health.clone(),
        Arc::new(status.clone()),
        {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        },
    )
    .await?;

    let daemonset_watch = match own_daemonset {
        Some(own) => {
            tracing::info!(daemonset = %own.name, namespace = %own.namespace, "watching the agent's DaemonSet: its deletion means uninstall");
            Some((DaemonSetWatcher::start(client.clone(), &own), own))
        }
        None => {
            tracing::info!("no DaemonSet configured (--daemonset): the node state is never removed on shutdown");
            None
        }
    };
    let nodes: Api<Node> = Api::all(client.clone());
    let (cache, watch) = watch_nodes(nodes.clone(), node_name.clone(), metrics.clone());
    let table_watch = start_table_watch(&metrics);
    let (stop_policy, policy_stop) = tokio::sync::watch::channel(false);
    let policy = start_policy(
        &config,
        &client,
        &node_name,
        &cache,
        table_watch.as_ref().map(TableWatch::registry),
        &metrics,
        status.policy_recorder(),
        policy_stop,
    )
    .await;
    let kernel = KernelCheckHandle::new(
        config.clone(),
        cache.clone(),
        table_watch.as_ref().map(TableWatch::registry),
    );
    status.attach_checks(kernel.clone(), client.clone());
    let mut reconciler =
        Reconciler::new(config, node_name, nodes, metrics, health, status, kernel)?;
    let guard_watch = table_watch
        .as_ref()
        .map(|watch| reconciler.guard.register(&watch.registry()));
    let masquerade_watch = table_watch
        .as_ref()
        .map(|watch| reconciler.setup.register_masquerade(&watch.registry()));
    reconciler.run_until(&cache, shutdown).await;
    watch.abort();
    // Policy stops before a teardown could remove its table.
    let _ = stop_policy.send(true);
    if let Some(policy) = policy {
        if let Err(join) = policy.await {
            tracing::warn!(%join, "network policy task ended abnormally");
        }
    }
    // Nothing is restored once a teardown may remove the tables.
    drop(guard_watch);
    drop(masquerade_watch);
    drop(table_watch);
    let removed = match daemonset_watch {
        Some((watch, own)) => remove_if_uninstalled(&own, watch, client, &reconciler).await,
        None => false,
    };
    let _ = stop.send(true);
    match server.await {
        Ok(result) => result?,
        Err(join) => tracing::warn!(%join, "health endpoint task ended abnormally"),
    }
    if removed {
        tracing::info!("agent stopped; Weft is removed from this node");
    } else {
        tracing::info!("agent stopped; the data plane is left in place");
    }
    Ok(())
}

/// Starts the watch that restores Weft's nftables tables moments after a
/// change made behind the agent's back (node set-up, the guard and the
/// policy task register their tables). `None`, logged, when the
/// notifications cannot be had: resync still repairs the tables.
fn start_table_watch(metrics: &AgentMetrics) -> Option<TableWatch> {
    match TableWatch::start(metrics.clone()) {
        Ok(watch) => Some(watch),
        Err(error) => {
            tracing::warn!(%error, "not watching Weft's nftables tables");
            None
        }
    }
}

/// Starts enforcing NetworkPolicy when the configuration asks for it; when
/// it does not, removes a table an earlier run left, so turning policy off
/// stops enforcement.
#[allow(clippy::too_many_arguments)]
async fn start_policy(
    config: &AgentConfig,
    client: &Client,
    node_name: &str,
    nodes: &Arc<NodeCache>,
    tables: Option<TableRegistry>,
    metrics: &AgentMetrics,
    status: PolicyRecorder,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if config.network_policy {
        let task = enforce(
            client.clone(),
            node_name.to_owned(),
            nodes.clone(),
            tables,
            metrics.clone(),
            status,
            config.resync,
            stop,
        );
        return Some(tokio::spawn(task.in_current_span()));
    }
    tracing::info!("network policy is off (networkPolicy.enabled: false): NetworkPolicy objects are not enforced on this node");
    match tokio::task::spawn_blocking(remove_table).await {
        Ok(Ok(Removal::Removed)) => {
            tracing::info!(table = POLICY_TABLE, "removed the network policy table")
        }
        Ok(Ok(Removal::AlreadyGone)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "could not remove the network policy table"),
        Err(join) => tracing::warn!(%join, "removing the network policy table ended abnormally"),
    }
    None
}

/// Asks whether Weft is being uninstalled and, if so, removes its node
/// state. True if it did.
async fn remove_if_uninstalled(
    own: &OwnDaemonSet,
    watch: DaemonSetWatcher,
    client: Client,
    reconciler: &Reconciler,
) -> bool {
    let seen = watch.stop();
    let answer = ask_api(client, own, UNINSTALL_CHECK_TIMEOUT).await;
    let reason = match decide(seen, &answer) {
        Shutdown::Restart { reason } => {
            tracing::info!(?seen, ?answer, "restart, not uninstall: {reason}");
            return false;
        }
        Shutdown::Uninstall { reason } => reason,
    };
    tracing::info!(
        ?seen,
        ?answer,
        "uninstall: {reason}; removing Weft from this node"
    );
    let report = tear_down(reconciler.dataplane.netlink(), &reconciler.config).await;
    for removed in &report.removed {
        tracing::info!(%removed, "removed");
    }
    for kept in &report.kept {
        tracing::info!(%kept, "left in place");
    }
    for error in &report.errors {
        tracing::warn!(%error, "could not remove; continued with the rest");
    }
    tracing::info!(
        removed = report.removed.len(),
        kept = report.kept.len(),
        failed = report.errors.len(),
        "uninstall teardown done"
    );
    true
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => futures::future::pending().await,
    }
}

/// Everything one reconcile needs between runs.
struct Reconciler {
    config: AgentConfig,
    node_name: String,
    metrics: AgentMetrics,
    health: Arc<Health>,
    dataplane: Dataplane,
    setup: NodeSetup,
    publisher: NodePublisher,
    /// The guard table, written before anything else on the node.
    guard: Guard,
    /// The last skipped peers logged, so a standing problem is logged once.
    logged_skips: Vec<SkippedPeer>,
    /// The last rejected peers logged, likewise.
    logged_rejections: Vec<Rejected>,
    /// Peers the kernel refused, on their backoff.
    retries: PeerRetries,
    /// What `/status` serves, updated after each pass.
    status: AgentStatusSource,
    /// What `/status?check=kernel` plans against, updated after each pass.
    kernel: KernelCheckHandle,
    /// The route conflicts logged last.
    conflicts: ConflictLog,
    waiting_logged: bool,
}

impl Reconciler {
    fn new(
        config: AgentConfig,
        node_name: String,
        nodes: Api<Node>,
        metrics: AgentMetrics,
        health: Arc<Health>,
        status: AgentStatusSource,
        kernel: KernelCheckHandle,
    ) -> Result<Self, AgentError> {
        Ok(Reconciler {
            dataplane: Dataplane::new(Netlink::current()?),
            setup: NodeSetup::new(&config),
            publisher: NodePublisher::new(nodes, node_name.clone()),
            guard: Guard::default(),
            config,
            node_name,
            metrics,
            health,
            logged_skips: Vec::new(),
            logged_rejections: Vec::new(),
            retries: PeerRetries::default(),
            status,
            kernel,
            conflicts: ConflictLog::default(),
            waiting_logged: false,
        })
    }

    /// Reconciles on every change in `cache`, every resync period and, after
    /// a failure, with backoff, until `shutdown` resolves. Nothing happens
    /// before the cache has seen a complete list; the change that list
    /// signals makes the first pass.
    async fn run_until(&mut self, cache: &NodeCache, shutdown: impl Future<Output = ()>) {
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_delay = RETRY_START;
        let mut retry_at: Option<tokio::time::Instant> = None;
        tokio::pin!(shutdown);
        loop {
            // A resync is a full pass the clock asked for: what it changes
            // had drifted, so `/status` counts it as repaired.
            let (full, resync_due) = tokio::select! {
                _ = &mut shutdown => break,
                _ = cache.changed() => (false, false),
                _ = resync.tick() => (true, true),
                _ = sleep_until(retry_at) => (true, false),
            };
            let Some(nodes) = cache.snapshot() else {
                continue;
            };
            let started = Instant::now();
            let outcome = self.reconcile(&nodes, full).await;
            match &outcome {
                Ok(Some(applied)) => self
                    .status
                    .reconciled(started.elapsed(), resync_due.then_some(*applied)),
                Ok(None) => {}
                Err(error) => {
                    self.status.reconcile_failed(started.elapsed(), error);
                    self.status
                        .not_ready(format!("the last reconcile failed: {error}"));
                }
            }
            match outcome {
                Ok(_) => {
                    retry_delay = RETRY_START;
                    // Peers the kernel refused are retried when due.
                    retry_at = self.retries.next_due();
                }
                Err(error) => {
                    self.metrics.record_error(error.label());
                    tracing::warn!(%error, retry_in = ?retry_delay, "reconcile failed; the data plane keeps its last state");
                    retry_at = Some(tokio::time::Instant::now() + retry_delay);
                    retry_delay = (retry_delay * 2).min(RETRY_CAP);
                }
            }
        }
    }

    /// One pass: node set-up when this node changed (or on a `full` pass),
    /// then the peers, then the Node writes. Returns how many kernel
    /// operations on peer entries it applied, or `None` when it waits for
    /// this node's Node or slice.
    async fn reconcile(
        &mut self,
        nodes: &NodeSnapshot,
        full: bool,
    ) -> Result<Option<usize>, AgentError> {
        // Pods are guarded before the set-up installs the plugin that wires
        // them; a table the last run left keeps guarding meanwhile.
        if self.guard.start().await.map_err(AgentError::Guard)? == GuardChange::Written {
            tracing::info!(
                table = GUARD_TABLE,
                "guard table written: pods checked, VXLAN checked once peers are known"
            );
        }
        if full {
            self.count_guard_drops().await;
        }
        let Some(own) = nodes
            .own
            .as_ref()
            .filter(|own| !own.pod_cidrs.is_empty() || own.malformed_pod_cidr.is_some())
        else {
            if !self.waiting_logged {
                tracing::info!("waiting for the controller to assign this node a pod CIDR");
                self.waiting_logged = true;
            }
            self.status.not_ready(match nodes.own {
                None => format!(
                    "Node {} is not in the API server's node list",
                    self.node_name
                ),
                Some(_) => format!(
                    "Node {} has no pod CIDR yet: waiting for weft-controller to assign one",
                    self.node_name
                ),
            });
            return Ok(None);
        };
        let started = Instant::now();
        // Nothing is set up from a slice that fails a peer's checks.
        let own_slices = match self
            .dataplane
            .check_own_slices(&self.config, &self.node_name, own)
            .await
        {
            Ok(slices) => slices,
            Err(refused) => {
                self.health.set_ready(false);
                return Err(refused.into());
            }
        };
        let setup = self
            .setup
            .ensure(
                &self.config,
                &self.node_name,
                &mut self.dataplane,
                own,
                full,
            )
            .await?;

        // The kernel check plans with the same screen and desired state.
        let (screened, desired) = desired_for_peers(&self.config, &setup, &nodes.peers);
        // Before the routes: a new peer's VXLAN is let in before traffic
        // to its pods can leave.
        let guard = GuardState::of(
            self.config.backend.uses_vxlan().then_some(self.config.port),
            screened.accepted.iter().copied(),
        );
        let change = self.guard.ensure(guard).await.map_err(AgentError::Guard)?;
        if change != GuardChange::Unchanged {
            tracing::info!(
                table = GUARD_TABLE,
                ?change,
                peers = screened.accepted.len(),
                "guard table VXLAN senders set"
            );
        }
        let now = tokio::time::Instant::now();
        // Only accepted peers are held: a waiting peer rejected since has
        // its entries removed like any other rejected peer's.
        let waiting: BTreeSet<&str> = self.retries.waiting(now).collect();
        let report = self
            .dataplane
            .reconcile_holding(&desired, &own_slices, |conflicts| {
                let held = held_peers(&screened.accepted, &waiting, conflicts);
                move |operation: &Operation| held.owner(operation).is_some()
            })
            .await?;
        self.kernel.record(&setup, &own_slices, &waiting);
        self.record_refusals(now, &screened, &report);
        self.record_status(&setup, &screened, &report.conflicts);
        self.conflicts.record(&report.conflicts, &screened.accepted);
        self.metrics.record_route_conflicts(report.conflicts.len());
        for change in &report.own_slices {
            tracing::info!(?change, "this node's unreachable slice route changed");
        }
        self.metrics.record_state(
            nodes.peers.len(),
            desired.routes.len(),
            desired.skipped.len(),
        );
        self.metrics.record_rejections(
            screened.rejected.iter().map(|r| r.reason.label()),
            self.retries.len(),
        );
        self.metrics
            .record_apply(started.elapsed().as_secs_f64(), &report);
        if screened.rejected != self.logged_rejections {
            for rejected in &screened.rejected {
                tracing::warn!(peer = %rejected.node_name, field = rejected.reason.field(), reason = rejected.reason.label(), "peer rejected, no kernel entries for it: {}", rejected.reason);
            }
            self.logged_rejections = screened.rejected;
        }
        if desired.skipped != self.logged_skips {
            for skip in &desired.skipped {
                tracing::warn!(peer = %skip.node_name, slice = %skip.slice, reason = ?skip.reason, "peer slice not programmed");
            }
            self.logged_skips = desired.skipped.clone();
        }
        if !report.applied.is_empty() || !report.failed.is_empty() {
            tracing::info!(
                applied = report.applied.len(),
                failed = report.failed.len(),
                held_back = report.held_back.len(),
                routes = desired.routes.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "peers reconciled"
            );
        }

        self.publisher
            .publish(self.config.backend, own, &setup)
            .await?;
        self.health.set_ready(true);
        Ok(Some(report.applied.len()))
    }

    /// Copies what this pass found into the `/status` snapshot: the node's
    /// set-up and what became of each peer.
    fn record_status(
        &self,
        setup: &AppliedSetup,
        screened: &Screened<'_>,
        conflicts: &[RouteConflict],
    ) {
        self.status.record_setup(setup);
        let now = tokio::time::Instant::now();
        let retrying: Vec<Retrying<'_>> = self
            .retries
            .due()
            .map(|(node, due, refusal)| Retrying {
                node,
                retry_in: due.saturating_duration_since(now),
                refusal,
            })
            .collect();
        self.status.record_peers(peers(
            &screened.accepted,
            &screened.rejected,
            &retrying,
            conflicts,
        ));
    }

    /// Adds what the guard table dropped since the last reading to the
    /// metrics. Only on full passes: nft fetches every set element to read
    /// a counter.
    async fn count_guard_drops(&self) {
        match self.guard.newly_dropped().await {
            Ok(drops) => {
                for (reason, packets) in drops.iter() {
                    self.metrics.record_guard_dropped(reason.label(), packets);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "reading the guard table's drop counters failed")
            }
        }
    }

    /// Traces the operations the kernel refused to their peers, logs each,
    /// and puts those peers on their backoff; the rest of the reconcile is
    /// not held up by them.
    fn record_refusals(
        &mut self,
        now: tokio::time::Instant,
        screened: &Screened<'_>,
        report: &ApplyReport,
    ) {
        // Each refused peer once, with the last of its refusals.
        let mut refused = BTreeMap::new();
        if !report.failed.is_empty() {
            let owners = EntryOwners::of(screened.accepted.iter().copied());
            for (operation, error) in &report.failed {
                let peer = owners.owner(operation);
                tracing::warn!(peer = peer.unwrap_or("(none)"), ?operation, %error, "kernel refused a peer entry; the other peers go on");
                if let Some(peer) = peer {
                    refused.insert(peer, error.to_string());
                }
            }
        }
        // Called only for peers on their backoff, which are few.
        let accepted = |name: &str| screened.accepted.iter().any(|peer| peer.node_name == name);
        for (peer, delay) in self.retries.record(now, refused, accepted) {
            tracing::info!(%peer, retry_in = ?delay, "peer entries held back until the retry");
        }
    }
}
