//! The controller's run: serve health and metrics, stand for election, and
//! while leading reconcile every node's pod CIDR slices.
//!
//! Shape (kube-rs's "hard-mode" controller): a node watcher feeds a reflector
//! store; once the store is ready the allocation map is rebuilt from what the
//! nodes already carry; then [`kube::runtime::applier`] runs `reconcile`
//! for every node event, which asks the [`PodCidrAllocator`] for the node's
//! slices (desired state) and writes them only where the node differs.
//! Deletions free slices and wake the nodes waiting for one.
//!
//! Only the replica holding the leader Lease (see [`crate::leader`]) runs any
//! of that; losing the lease drops the whole term at once, and a new term
//! starts from a fresh watch and a fresh rebuild, which is also how the
//! controller catches up after the API server was away.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ApplierConfig, Error as ApplierError};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::{applier, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;

use crate::allocator::{Assignment, NodeSlices, PodCidrAllocator, PoolUsage};
use crate::config::ControllerConfig;
use crate::leader::{LeaderElection, LeaseTimings};
use crate::metrics::ControllerMetrics;
use crate::node::{claims_of, slice_patch};
use crate::report::{exhaustion_findings, Finding, Reporter};
use crate::status::StatusBoard;
use crate::{Error, FIELD_MANAGER};
use weft_daemon::serve::{self, Health};

/// How often a healthy node is looked at again without any event.
const RESYNC: Duration = Duration::from_secs(600);
/// Fallback retry for a node waiting on a free slice (frees also wake it).
const EXHAUSTED_RETRY: Duration = Duration::from_secs(30);
/// Re-check for conflicted nodes (held-back Event updates come sooner).
const CONFLICTED_RETRY: Duration = Duration::from_secs(300);
/// Node reconciles in flight at once: bounds the write burst on the API server.
const CONCURRENCY: u16 = 32;
/// Standby retry after an API error, doubling up to the cap.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Runs the controller until `shutdown` resolves: serves `/healthz`,
/// `/readyz`, `/status`, `/metrics`, stands for election and allocates while
/// leading.
/// On shutdown a held lease is released so a standby takes over at once.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    identity: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let mut registry = Registry::default();
    let metrics = ControllerMetrics::register(&mut registry);
    let health = Health::new();
    let shutdown = shutdown.boxed().shared();
    let clusters = std::iter::once(config.v4)
        .chain(config.v6)
        .map(|plan| plan.cluster())
        .collect();
    let status = StatusBoard::new(&identity, clusters);
    let server = serve::start(
        config.metrics_address,
        registry,
        health.clone(),
        status.clone(),
        shutdown.clone(),
    )
    .await?;
    let mut election = LeaderElection::new(
        client.clone(),
        &config.lease_namespace,
        &config.lease_name,
        &identity,
        LeaseTimings::default(),
    );
    tracing::info!(
        identity,
        lease = %format!("{}/{}", config.lease_namespace, config.lease_name),
        cluster_cidr = %config.v4.cluster(),
        cluster_cidr_v6 = ?config.v6.map(|plan| plan.cluster()),
        "standing for election"
    );
    loop {
        tokio::select! {
            () = shutdown.clone() => break,
            () = stand_by(&mut election, &health, &status) => {}
        }
        tracing::info!(identity, "leading: allocating pod CIDRs");
        metrics.set_leader(true);
        status.set_leading(true);
        let lost = tokio::select! {
            () = shutdown.clone() => None,
            lost = election.keep() => Some(lost),
            never = lead(client.clone(), &config, &identity, &metrics, &status) => match never {},
        };
        metrics.set_leader(false);
        status.set_leading(false);
        status.set_leader(election.holder());
        match lost {
            Some(lost) => tracing::warn!(%lost, "stopped leading; standing by"),
            None => {
                if let Err(error) = election.release().await {
                    tracing::warn!(%error, "could not release the leader lease; a standby takes over when it expires");
                }
                break;
            }
        }
    }
    tracing::info!("shut down");
    match server.await {
        Ok(result) => result.map_err(Error::from),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// Returns once this replica holds the lease. Readiness means "talking to
/// the API server": a standby is ready too, it just waits. Each look at the
/// lease records its holder for `/status`.
async fn stand_by(election: &mut LeaderElection, health: &Health, status: &StatusBoard) {
    let timings = election.timings();
    let mut backoff = BACKOFF_START;
    loop {
        // A hung connection must not stall the standby past a lease duration.
        let attempt = tokio::time::timeout(timings.renew_deadline, election.try_acquire_or_renew());
        let attempt = attempt.await;
        status.set_leader(election.holder());
        let problem = match attempt {
            Ok(Ok(leading)) => {
                health.set_ready(true);
                if leading {
                    return;
                }
                backoff = BACKOFF_START;
                tokio::time::sleep(timings.retry_every).await;
                continue;
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => "the API server did not answer the lease request in time".to_owned(),
        };
        tracing::warn!(error = %problem, retry_in = ?backoff, "cannot reach the API server for the leader lease; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// State shared by one leadership term's watcher and reconciles.
struct Context {
    nodes: Api<Node>,
    store: Store<Node>,
    config: ControllerConfig,
    /// `None` until the store is ready and the map has been rebuilt from it.
    allocator: Mutex<Option<PodCidrAllocator>>,
    /// Reconcile requests: changed nodes, every node after a (re-)list, and
    /// nodes waiting on a slice that just freed.
    wake: mpsc::UnboundedSender<ObjectRef<Node>>,
    metrics: ControllerMetrics,
    reporter: Reporter,
    status: Arc<StatusBoard>,
}

/// One leadership term; runs until dropped.
async fn lead(
    client: Client,
    config: &ControllerConfig,
    identity: &str,
    metrics: &ControllerMetrics,
    status: &Arc<StatusBoard>,
) -> Infallible {
    let nodes: Api<Node> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let (wake, requests) = mpsc::unbounded();
    let context = Arc::new(Context {
        nodes: nodes.clone(),
        store: store.clone(),
        config: config.clone(),
        allocator: Mutex::new(None),
        wake,
        metrics: metrics.clone(),
        reporter: Reporter::new(client, identity),
        status: status.clone(),
    });
    let watch = watcher(nodes, watcher::Config::default())
        // Status (images, conditions) is most of a Node and none of our business.
        .modify(|node| {
            node.status = None;
            node.managed_fields_mut().clear();
        })
        .default_backoff()
        .reflect(writer)
        .for_each({
            let context = context.clone();
            move |event| {
                context.observe(event);
                futures::future::ready(())
            }
        });
    let apply = async {
        if store.wait_until_ready().await.is_err() {
            // The writer lives in `watch`, which runs as long as this term.
            return futures::future::pending().await;
        }
        context.rebuild();
        applier(
            |node, context| Box::pin(reconcile(node, context)),
            error_policy,
            context.clone(),
            store.clone(),
            requests.map(Ok::<_, Infallible>),
            ApplierConfig::default().concurrency(CONCURRENCY),
        )
        .for_each(|result| {
            match result {
                Ok(_) | Err(ApplierError::ReconcilerFailed(..)) => {}
                // Requests for deleted nodes: the deletion already freed the slice.
                Err(ApplierError::ObjectNotFound(node)) => {
                    tracing::debug!(%node, "node gone before its reconcile")
                }
                Err(error) => tracing::warn!(%error, "node reconcile queue failed"),
            }
            futures::future::ready(())
        })
        .await;
        futures::future::pending().await
    };
    tokio::join!(watch, apply).1
}

impl Context {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PodCidrAllocator>> {
        // A panic while allocating is a bug; crashing and rebuilding from the
        // nodes is safer than continuing from a half-updated map.
        self.allocator.lock().expect("allocator lock poisoned")
    }

    fn observe(&self, event: watcher::Result<watcher::Event<Node>>) {
        match event {
            Ok(watcher::Event::Apply(node)) => {
                // The receiver lives as long as the term; a send error means it is ending.
                let _ = self.wake.unbounded_send(ObjectRef::from_obj(&node));
            }
            Ok(watcher::Event::Delete(node)) => self.forget(&node.name_any()),
            Ok(watcher::Event::InitDone) => {
                tracing::info!(nodes = self.store.len(), "node cache synced");
                // A (re-)list reports nodes only once complete: the store
                // swaps to the new list here, so this is when every node can
                // be looked at, including ones created while the watch was down.
                for node in self.store.state() {
                    let _ = self.wake.unbounded_send(ObjectRef::from_obj(&*node));
                }
                // Nor does a re-list report nodes deleted while the watch was down.
                let store = self.store.clone();
                let exists = move |name: &str| store.get(&ObjectRef::new(name)).is_some();
                self.status.retain_nodes(&exists);
                self.free_where(|allocator, now| allocator.retain_nodes(&exists, now));
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(error) => {
                tracing::warn!(%error, "watching nodes failed; retrying with backoff (is the API server reachable?)")
            }
        }
    }

    fn forget(&self, node: &str) {
        self.reporter.forget(node);
        self.status.retain_nodes(|name| name != node);
        if self.free_where(|allocator, now| allocator.release(node, now)) {
            tracing::info!(node, "node deleted: its pod CIDR is free");
        }
    }

    /// Publishes the allocator's slice counts as metrics and for `/status`.
    fn record_usage(&self, usage: Vec<PoolUsage>) {
        self.metrics.record_usage(&usage);
        self.status.record_usage(usage);
    }

    /// Runs `free` on the allocator (once rebuilt); when it reports freed
    /// space, wakes every waiting node. Returns what `free` returned.
    fn free_where(&self, free: impl FnOnce(&mut PodCidrAllocator, Instant) -> bool) -> bool {
        let mut guard = self.lock();
        let Some(allocator) = guard.as_mut() else {
            return false;
        };
        let freed = free(allocator, Instant::now());
        if freed {
            for node in allocator.waiting() {
                let _ = self.wake.unbounded_send(ObjectRef::new(node));
            }
        }
        self.record_usage(allocator.usage());
        freed
    }

    /// Builds the allocation map from the ready store: every node's existing
    /// pod CIDRs before any node is given a new one. Nodes whose annotation
    /// records this controller's assignment go first, then the oldest node
    /// (so the older of two claimants keeps a contested slice); agents route
    /// only by the annotations, so this keeps traffic where it flows.
    fn rebuild(&self) {
        let mut nodes = self.store.state();
        nodes.sort_by_cached_key(|node| {
            let assigned = claims_of(node).assigned();
            (!assigned, node.creation_timestamp(), node.name_any())
        });
        let mut allocator =
            PodCidrAllocator::new(self.config.v4, self.config.v6, self.config.slice_hold);
        for node in &nodes {
            allocator.adopt_existing(&node.name_any(), &claims_of(node));
        }
        let usage = allocator.usage();
        tracing::info!(
            nodes = nodes.len(),
            allocated = usage[0].allocated,
            "rebuilt the allocation map from the nodes"
        );
        self.record_usage(usage);
        *self.lock() = Some(allocator);
    }

    /// The allocator's decision for `node`, made under the lock.
    fn decide(&self, node: &Node) -> Option<Assignment> {
        let name = node.name_any();
        let mut guard = self.lock();
        let allocator = guard.as_mut().expect("reconciles start after the rebuild");
        let assignment = allocator.assign(&name, &claims_of(node), Instant::now());
        // The node may have been deleted after this reconcile read it and
        // before `assign` ran, in which case the deletion's release came too
        // early. The store drops a node before its deletion is observed, so
        // checking it now, after `assign`, closes that gap.
        let gone = self.store.get(&ObjectRef::from_obj(node)).is_none();
        if gone {
            allocator.release(&name, Instant::now());
        }
        self.record_usage(allocator.usage());
        (!gone).then_some(assignment)
    }

    async fn reconcile_node(&self, node: &Node) -> Result<Action, Error> {
        let Some(assignment) = self.decide(node) else {
            return Ok(Action::await_change());
        };
        let (findings, requeue) = match assignment {
            Assignment::Allocated(slices) => {
                self.write_slices(node, &slices).await?;
                (Vec::new(), RESYNC)
            }
            Assignment::Conflicted(problems) => (
                problems.into_iter().map(Finding::Claim).collect(),
                CONFLICTED_RETRY,
            ),
            Assignment::Exhausted(families) => (
                exhaustion_findings(&families, self.config.v4, self.config.v6),
                EXHAUSTED_RETRY,
            ),
        };
        self.status.record_findings(&node.name_any(), &findings);
        // A fixed node reports no findings, so a problem that comes back
        // counts as a new occurrence.
        let held_back = self.reporter.report(node, &findings, &self.metrics).await?;
        Ok(Action::requeue(
            held_back.map_or(requeue, |wait| wait.min(requeue)),
        ))
    }

    /// Patches `node` to carry `slices` where it does not yet.
    async fn write_slices(&self, node: &Node, slices: &NodeSlices) -> Result<(), Error> {
        let name = node.name_any();
        let Some(patch) = slice_patch(node, slices) else {
            return Ok(());
        };
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        self.nodes
            .patch(&name, &params, &Patch::Merge(&patch))
            .await
            .map_err(|source| match &source {
                kube::Error::Api(status) if status.code == 409 => {
                    Error::WriteConflict { node: name.clone() }
                }
                _ => Error::WriteNode {
                    node: name.clone(),
                    source,
                },
            })?;
        tracing::info!(
            pod_cidrs = %slices.to_vec().iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "pod CIDR written"
        );
        Ok(())
    }
}

/// Desired slices for one node, applied where the node differs.
#[tracing::instrument(skip_all, fields(node = %node.name_any()))]
async fn reconcile(node: Arc<Node>, context: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = context.reconcile_node(&node).await;
    context
        .metrics
        .record_reconcile(started.elapsed().as_secs_f64());
    result
}

/// Counts and logs a failed reconcile and retries it: soon for a write
/// conflict (the watch brings the fresh node), later for anything else.
fn error_policy(node: Arc<Node>, error: &Error, context: Arc<Context>) -> Action {
    context.metrics.record_error(error.label());
    if let Error::WriteConflict { .. } = error {
        context.metrics.record_write_conflict();
        tracing::debug!(node = %node.name_any(), %error, "write conflict");
        return Action::requeue(Duration::from_millis(200));
    }
    tracing::warn!(node = %node.name_any(), %error, "reconcile failed; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}
