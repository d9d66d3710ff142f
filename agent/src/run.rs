//! The agent loop: watch Nodes, keep the few fields routing needs, and
//! reconcile the node's data plane on start-up, on every change and on a
//! periodic resync.
//!
//! Shape: a node watcher (with backoff, so an absent API server only delays
//! it) folds events into a [`NodeCache`] of [`Peer`]s plus this node's own
//! fields, and wakes the reconciler when something that matters changed.
//! The reconciler never acts before the first complete list (`InitDone`):
//! programming from a partial list would remove routes to nodes not yet
//! seen. While the API server is away nothing is removed; the next full
//! list brings the cache up to date and the following reconcile repairs
//! whatever changed meanwhile.

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tracing::Instrument;

use super::config::AgentConfig;
use super::dataplane::{enable_forwarding, Dataplane, DataplaneError, Vtep, VXLAN_DEVICE};
use super::install::{install_conflist, install_plugin, render_conflist, InstallError, Installed};
use super::masquerade::{MasqueradeError, MasqueradeTable, TableChange};
use super::metrics::AgentMetrics;
use super::node::{network_up_patch, own_node, peer_of, OwnNode, Published};
use super::offload::{kernel_release, set_tx_checksum, tx_checksum, wanted_tx_checksum};
use super::overlay::{desired_state, SkippedPeer};
use super::peer::{LocalNode, PeerSet};
use super::underlay::{find_underlay, Underlay, UnderlayChoice, UnderlayError};
use super::uninstall::{ask_api, decide, tear_down, DaemonSetWatcher, OwnDaemonSet, Shutdown};
use weft::annotations::VtepMac;
use weft::netlink::{Netlink, NetlinkError, VxlanChange};
use weft::nodefile::{NodeConfig, NodeFileError};
use weft_daemon::serve::{self, Health, ServeError};

/// Field manager of the agent's writes to its Node.
pub const FIELD_MANAGER: &str = "weft-agent";

/// First retry after a failed reconcile, doubled up to [`RETRY_CAP`].
const RETRY_START: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(30);
/// How long a stopping agent waits for the API to say whether its DaemonSet
/// still exists: well within the pod's termination grace period.
const UNINSTALL_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// What stops the agent or one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The health and metrics endpoint failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Setting up or reading the data plane failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// No underlay interface fits the configuration.
    #[error(transparent)]
    Underlay(#[from] UnderlayError),
    /// Installing the CNI plugin or conflist failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// Writing the node file failed.
    #[error(transparent)]
    NodeFile(#[from] NodeFileError),
    /// The masquerade table could not be applied.
    #[error(transparent)]
    Masquerade(#[from] MasqueradeError),
    /// The kernel refused some of a plan's operations (the first is named;
    /// the rest are counted in the metrics); the reconcile is retried.
    #[error("kernel refused {operation}: {source}")]
    KernelRefused {
        /// The first refused operation.
        operation: String,
        /// Why.
        source: NetlinkError,
    },
    /// Checksum offload on the VXLAN device could not be read or set.
    #[error("setting tx checksum offload on {VXLAN_DEVICE}: {0} (set checksumOffload: on to leave it alone)")]
    Offload(std::io::Error),
    /// No VTEP MAC could be generated.
    #[error("generating a VTEP MAC from /dev/urandom: {0}")]
    RandomMac(std::io::Error),
    /// The Node has no InternalIP and no interface is configured.
    #[error("node {node} has no InternalIP address: set iface or ifaceRegex so the agent can find its underlay")]
    NoNodeAddress {
        /// The node.
        node: String,
    },
    /// A write to the Node failed.
    #[error("{action} on node {node}: {source}")]
    Api {
        /// What was written.
        action: &'static str,
        /// The node.
        node: String,
        /// The client error.
        source: kube::Error,
    },
}

impl AgentError {
    /// A short label for the errors metric.
    fn label(&self) -> &'static str {
        match self {
            AgentError::Serve(_) => "serve",
            AgentError::Netlink(_)
            | AgentError::Dataplane(_)
            | AgentError::KernelRefused { .. } => "netlink",
            AgentError::Underlay(_) | AgentError::NoNodeAddress { .. } => "underlay",
            AgentError::Install(_) => "cni_install",
            AgentError::NodeFile(_) => "node_file",
            AgentError::Masquerade(_) => "masquerade",
            AgentError::Offload(_) => "checksum_offload",
            AgentError::RandomMac(_) => "vtep_mac",
            AgentError::Api { .. } => "api",
        }
    }
}

/// The cluster as the agent keeps it: peers and this node's own fields.
#[derive(Debug, Default)]
struct CacheState {
    peers: PeerSet,
    own: Option<OwnNode>,
    /// Peers of a re-list in progress, swapped in at `InitDone`.
    relisting: Option<(PeerSet, Option<OwnNode>)>,
    /// Whether a complete list has been seen.
    synced: bool,
}

/// The node cache shared by the watcher and the reconciler.
#[derive(Debug, Default)]
struct NodeCache {
    state: Mutex<CacheState>,
    changed: Notify,
}

impl NodeCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().expect("node cache lock poisoned")
    }

    /// Folds one watch event in; wakes the reconciler if a peer or this
    /// node changed in a way that matters (heartbeats do not).
    fn observe(&self, own_name: &str, event: watcher::Event<Node>) {
        let mut state = self.lock();
        let changed = match event {
            watcher::Event::Init => {
                state.relisting = Some((PeerSet::new(), None));
                false
            }
            watcher::Event::InitApply(node) => {
                if let Some((peers, own)) = state.relisting.as_mut() {
                    fold(peers, own, own_name, &node);
                }
                false
            }
            watcher::Event::InitDone => {
                let (peers, own) = state.relisting.take().unwrap_or_default();
                let changed = !state.synced || state.peers != peers || state.own != own;
                state.peers = peers;
                state.own = own;
                state.synced = true;
                tracing::info!(peers = state.peers.len(), "node list complete");
                changed
            }
            watcher::Event::Apply(node) => {
                let CacheState { peers, own, .. } = &mut *state;
                fold(peers, own, own_name, &node)
            }
            watcher::Event::Delete(node) => {
                let name = node.name_any();
                if name == own_name {
                    state.own.take().is_some()
                } else {
                    state.peers.remove(&name).is_some()
                }
            }
        };
        drop(state);
        if changed {
            self.changed.notify_one();
        }
    }

    fn snapshot(&self) -> Option<(PeerSet, Option<OwnNode>)> {
        let state = self.lock();
        state
            .synced
            .then(|| (state.peers.clone(), state.own.clone()))
    }
}

/// Records `node` in `peers` (or `own`); true if anything changed.
fn fold(peers: &mut PeerSet, own: &mut Option<OwnNode>, own_name: &str, node: &Node) -> bool {
    let name = node.name_any();
    if name == own_name {
        let fresh = own_node(node);
        let changed = own.as_ref() != Some(&fresh);
        *own = Some(fresh);
        return changed;
    }
    match peer_of(node) {
        Some(peer) => peers.insert(name, peer.clone()).as_ref() != Some(&peer),
        None => peers.remove(&name).is_some(),
    }
}

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
    let listener = serve::bind(config.metrics_address).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve::serve(
        listener,
        Arc::new(registry),
        health.clone(),
        {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        },
    ));

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
    let cache = Arc::new(NodeCache::default());
    let watch = {
        let cache = cache.clone();
        let metrics = metrics.clone();
        let own_name = node_name.clone();
        watcher(nodes.clone(), watcher::Config::default())
            .default_backoff()
            .for_each(move |event| {
                match event {
                    Ok(event) => cache.observe(&own_name, event),
                    Err(error) => {
                        metrics.record_error("watch");
                        tracing::warn!(%error, "watching nodes failed; retrying with backoff, the data plane stays as it is");
                    }
                }
                futures::future::ready(())
            })
    };
    let watch = tokio::spawn(watch.in_current_span());

    let mut reconciler =
        Reconciler::new(config, node_name, nodes, metrics.clone(), health.clone())?;
    let mut resync = tokio::time::interval(reconciler.config.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_delay = RETRY_START;
    let mut retry_at: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let full = tokio::select! {
            _ = &mut shutdown => break,
            _ = cache.changed.notified() => false,
            _ = resync.tick() => true,
            _ = sleep_until(retry_at) => true,
        };
        let Some((peers, own)) = cache.snapshot() else {
            continue;
        };
        match reconciler.reconcile(own.as_ref(), &peers, full).await {
            Ok(()) => {
                retry_delay = RETRY_START;
                retry_at = None;
            }
            Err(error) => {
                metrics.record_error(error.label());
                tracing::warn!(%error, retry_in = ?retry_delay, "reconcile failed; the data plane keeps its last state");
                retry_at = Some(tokio::time::Instant::now() + retry_delay);
                retry_delay = (retry_delay * 2).min(RETRY_CAP);
            }
        }
    }
    watch.abort();
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

/// This node's settings derived from its Node and the underlay, applied by
/// the last successful set-up.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeSetup {
    local: LocalNode,
    public_ip: IpAddr,
    vtep: Option<Vtep>,
    mtu: u32,
}

/// Everything one reconcile needs between runs.
struct Reconciler {
    config: AgentConfig,
    node_name: String,
    nodes: Api<Node>,
    metrics: AgentMetrics,
    health: Arc<Health>,
    dataplane: Dataplane,
    masquerade: Option<MasqueradeTable>,
    /// The own-node fields and set-up of the last successful set-up.
    applied: Option<(OwnNode, NodeSetup)>,
    /// The last skipped peers logged, so a standing problem is logged once.
    logged_skips: Vec<SkippedPeer>,
    waiting_logged: bool,
}

impl Reconciler {
    fn new(
        config: AgentConfig,
        node_name: String,
        nodes: Api<Node>,
        metrics: AgentMetrics,
        health: Arc<Health>,
    ) -> Result<Self, AgentError> {
        let masquerade = MasqueradeTable::new(&config.cluster_cidrs, &config.no_masquerade_cidrs);
        Ok(Reconciler {
            dataplane: Dataplane::new(Netlink::current()?),
            masquerade: Some(masquerade),
            config,
            node_name,
            nodes,
            metrics,
            health,
            applied: None,
            logged_skips: Vec::new(),
            waiting_logged: false,
        })
    }

    /// One pass: node set-up when this node changed (or on resync), then
    /// the peers, then the Node writes.
    async fn reconcile(
        &mut self,
        own: Option<&OwnNode>,
        peers: &PeerSet,
        full: bool,
    ) -> Result<(), AgentError> {
        let Some(own) = own.filter(|own| !own.pod_cidrs.is_empty()) else {
            if !self.waiting_logged {
                tracing::info!("waiting for the controller to assign this node a pod CIDR");
                self.waiting_logged = true;
            }
            return Ok(());
        };
        let started = Instant::now();
        let setup = match &self.applied {
            Some((seen, setup)) if !full && seen == own => setup.clone(),
            _ => {
                let setup = self.set_up(own).await?;
                self.applied = Some((own.clone(), setup.clone()));
                setup
            }
        };

        let desired = desired_state(self.config.backend, &setup.local, peers.values());
        let report = self.dataplane.reconcile(&desired).await?;
        self.metrics
            .record_state(peers.len(), desired.routes.len(), desired.skipped.len());
        self.metrics
            .record_apply(started.elapsed().as_secs_f64(), &report);
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
        if let Some((operation, error)) = report.failed.into_iter().next() {
            return Err(AgentError::KernelRefused {
                operation: format!("{operation:?}"),
                source: error,
            });
        }

        self.publish(own, &setup).await?;
        self.health.set_ready(true);
        Ok(())
    }

    /// Node set-up: underlay, VTEP device, forwarding, node file, CNI files,
    /// masquerade. Every step compares before it changes anything.
    async fn set_up(&mut self, own: &OwnNode) -> Result<NodeSetup, AgentError> {
        let underlay = self.underlay(own).await?;
        let public_ip = own.public_ip_overwrite.unwrap_or(underlay.address.addr());
        let vxlan = self.config.backend.uses_vxlan();
        let mtu = self.config.mtu.unwrap_or(if vxlan {
            underlay.mtu - underlay.vxlan_overhead()
        } else {
            underlay.mtu
        });

        let vtep = if vxlan {
            let vtep = Vtep {
                vni: self.config.vni,
                port: self.config.port,
                local: underlay.address.addr(),
                underlay_index: underlay.link_index,
                mac: self.vtep_mac(own).await?,
                mtu,
                addresses: own
                    .pod_cidrs
                    .iter()
                    .map(|slice| {
                        IpNet::new(slice.network(), slice.max_prefix_len())
                            .expect("max prefix is valid")
                    })
                    .collect(),
            };
            let change = self.dataplane.ensure_vtep(&vtep).await?;
            if change != VxlanChange::Reused {
                tracing::info!(?change, mac = %vtep.mac, local = %vtep.local, mtu, "{VXLAN_DEVICE} set up");
            }
            self.apply_offload_policy()?;
            Some(vtep)
        } else {
            if self.dataplane.remove_vtep().await? == weft::netlink::Removal::Removed {
                tracing::info!("{VXLAN_DEVICE} removed: backend host-gw does not use it");
            }
            None
        };

        let ipv6 = own.pod_cidrs.iter().any(|c| matches!(c, IpNet::V6(_)));
        enable_forwarding(ipv6)?;
        self.write_node_file(own, mtu)?;
        self.install_cni()?;
        self.ensure_masquerade().await?;

        Ok(NodeSetup {
            local: LocalNode {
                name: self.node_name.clone(),
                pod_cidrs: own.pod_cidrs.clone(),
                underlay: underlay.address,
            },
            public_ip,
            vtep,
            mtu,
        })
    }

    async fn underlay(&self, own: &OwnNode) -> Result<Underlay, AgentError> {
        let family_of = own.internal_ip;
        let choice = if let Some(name) = &self.config.iface {
            UnderlayChoice::Interface {
                name: name.clone(),
                family_of,
            }
        } else if let Some(pattern) = &self.config.iface_regex {
            UnderlayChoice::Pattern {
                pattern: regex::Regex::new(pattern).expect("validated with the config"),
                family_of,
            }
        } else {
            UnderlayChoice::Address(own.internal_ip.ok_or_else(|| AgentError::NoNodeAddress {
                node: self.node_name.clone(),
            })?)
        };
        Ok(find_underlay(self.dataplane.netlink(), &choice).await?)
    }

    /// The MAC to give `weft.1`: the one published on the Node (so peers'
    /// entries stay valid across device re-creation), else the existing
    /// device's, else a fresh one.
    async fn vtep_mac(&self, own: &OwnNode) -> Result<VtepMac, AgentError> {
        if let Some(mac) = own.published_vtep_mac {
            return Ok(mac);
        }
        if let Some(mac) = self.dataplane.existing_vtep_mac().await? {
            return Ok(mac);
        }
        VtepMac::random().map_err(AgentError::RandomMac)
    }

    fn apply_offload_policy(&self) -> Result<(), AgentError> {
        let release = kernel_release().map_err(AgentError::Offload)?;
        let wanted = wanted_tx_checksum(self.config.checksum_offload, &release);
        if tx_checksum(VXLAN_DEVICE).map_err(AgentError::Offload)? != wanted {
            set_tx_checksum(VXLAN_DEVICE, wanted).map_err(AgentError::Offload)?;
            tracing::info!(kernel = %release, tx_checksum = wanted, policy = ?self.config.checksum_offload, "{VXLAN_DEVICE} tx checksum offload set");
        }
        Ok(())
    }

    fn write_node_file(&self, own: &OwnNode, mtu: u32) -> Result<(), AgentError> {
        let wanted = NodeConfig {
            node_name: self.node_name.clone(),
            pod_cidrs: own.pod_cidrs.clone(),
            cluster_cidrs: self.config.cluster_cidrs.clone(),
            mtu,
        };
        if NodeConfig::load(&self.config.node_file).ok().as_ref() != Some(&wanted) {
            wanted.write_atomic(&self.config.node_file)?;
            tracing::info!(path = %self.config.node_file.display(), mtu, "node file written");
        }
        Ok(())
    }

    fn install_cni(&self) -> Result<(), AgentError> {
        if install_plugin(&self.config.cni_plugin_source, &self.config.cni_bin_dir)?
            == Installed::Written
        {
            tracing::info!(dir = %self.config.cni_bin_dir.display(), "CNI plugin installed");
        }
        let conflist = render_conflist(&self.config.node_file);
        if install_conflist(&self.config.cni_conf_dir, &conflist)? == Installed::Written {
            tracing::info!(dir = %self.config.cni_conf_dir.display(), "CNI conflist installed");
        }
        Ok(())
    }

    async fn ensure_masquerade(&mut self) -> Result<(), AgentError> {
        let Some(mut table) = self.masquerade.take() else {
            return Ok(());
        };
        // nft is a child process: run it off the async workers.
        let (table, result) = tokio::task::spawn_blocking(move || {
            let result = table.ensure();
            (table, result)
        })
        .await
        .expect("the masquerade task does not panic");
        self.masquerade = Some(table);
        if result? == TableChange::Replaced {
            tracing::info!("masquerade table inet weft applied");
        }
        Ok(())
    }

    /// Writes the annotations (only when they differ) and, once the node is
    /// programmed, the NetworkUnavailable=False condition.
    async fn publish(&self, own: &OwnNode, setup: &NodeSetup) -> Result<(), AgentError> {
        let wanted = Published::wanted(
            self.config.backend,
            setup.public_ip,
            setup.vtep.as_ref().map(|v| v.mac),
        );
        if own.published != wanted {
            self.nodes
                .patch(
                    &self.node_name,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(wanted.patch()),
                )
                .await
                .map_err(|source| self.api_error("publishing backend annotations", source))?;
            tracing::info!(public_ip = %setup.public_ip, backend = self.config.backend.as_str(), "annotations published");
        }
        if !own.network_up {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            self.nodes
                .patch_status(
                    &self.node_name,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..PatchParams::default()
                    },
                    &Patch::Strategic(network_up_patch(&now)),
                )
                .await
                .map_err(|source| self.api_error("setting NetworkUnavailable=False", source))?;
            tracing::info!("node condition NetworkUnavailable=False (WeftIsUp) set");
        }
        Ok(())
    }

    fn api_error(&self, action: &'static str, source: kube::Error) -> AgentError {
        AgentError::Api {
            action,
            node: self.node_name.clone(),
            source,
        }
    }
}
