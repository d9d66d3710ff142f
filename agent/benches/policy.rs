//! NetworkPolicy benchmarks (root required, release build), each measuring
//! weft-agent's enforcement and, as its peer in the same run on the same
//! cluster, kube-router's network policy controller (only its firewall:
//! `--run-firewall --run-router=false --run-service-proxy=false`, built
//! from its Go module by `e2e/kube-router/build.sh`; iptables + ipset).
//!
//! The cluster is the agents' test bed: three namespace nodes (one behind
//! the router), a real kube-apiserver, weft-agents running the vxlan
//! overlay, pods made by the real plugin and published as Pod objects.
//! One enforcer runs at a time: weft-agents with `networkPolicy.enabled`,
//! or weft-agents without it and kube-router beside each.
//!
//! - `enforcement`: a default-deny policy isolates a server pod on each
//!   node; an allow policy is created (or an existing one updated to take
//!   the client in), and a client pod probes every server with fresh TCP
//!   connections every 2 ms. The time from the API call to the first
//!   probe that got through to the last of the three, p50/p99.
//! - `coverage`: a new client pod, reported Running through the API, until
//!   its connections pass the policies that already allow its label.
//! - `datapath`: TCP throughput (iperf3) and new connections per second
//!   from a client pod on node 0 to a server pod on node 1, with no
//!   policy and with 200 (100 selecting the server, 100 the client),
//!   interleaved rounds, medians.
//! - `memory`: 10,000 Pod objects in 100 namespaces, bound to the three
//!   nodes, and 1,000 policies: the enforcer's RSS on node 0 once it has
//!   enforced them, and how long that took from its start.
//!
//! `cargo bench -p weft-agent --bench policy` runs all four; a name after
//! `--` runs one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod as PodObject};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use weft_core::netns::Netns;
use weft_e2e::Pod;
use weft_testing::measure::{percentile, status_kib};

#[path = "../tests/testbed/mod.rs"]
mod testbed;

mod measure;

#[path = "policy/kube_router.rs"]
mod kube_router;

use kube_router::KubeRouter;
use measure::{gbit, iperf, median, ms, IPERF_SECONDS};
use testbed::{Overlay, OverlaySpec, PATIENCE};

/// Samples of each enforcement and coverage measurement (p99 is then the
/// second slowest).
const SAMPLES: usize = 100;
/// How often a prober opens a new connection.
const PROBE_EVERY: Duration = Duration::from_millis(2);
/// How long one probe waits for its handshake. Below the kernel's first
/// SYN retransmission (1 s), so a probe that passes is one whose first SYN
/// did.
const PROBE_PATIENCE: Duration = Duration::from_millis(500);
/// How long a connection that should be refused gets before it counts as
/// dropped.
const BLOCKED_AFTER: Duration = Duration::from_millis(200);
/// The port the server pods accept connections on (and close them).
const SERVER_PORT: u16 = 8080;
/// The port of their iperf3 server.
const IPERF_PORT: u16 = 5201;
/// Policies of the datapath measurement.
const DATAPATH_POLICIES: usize = 200;
/// Interleaved rounds of the datapath measurement.
const DATAPATH_ROUNDS: usize = 3;
/// Seconds of each connection-rate run, and its concurrent connectors.
const CONNECT_SECONDS: u64 = 5;
const CONNECTORS: usize = 4;
/// The memory measurement's cluster: namespaces, pods per namespace,
/// policies per namespace.
const SCALE_NAMESPACES: usize = 100;
const SCALE_PODS: usize = 100;
const SCALE_POLICIES: usize = 10;
/// Concurrent API requests while filling the cluster.
const API_CONCURRENCY: usize = 32;

fn main() -> Result<()> {
    measure::run_as_root(|selection| async move {
        let wanted = |name: &str| selection.wants(name);
        let mut bench = Bench::start().await?;
        let outcome = async {
            let bench = &mut bench;
            for enforcer in [Enforcer::Weft, Enforcer::KubeRouter] {
                bench.enforce_with(enforcer).await?;
                if wanted("enforcement") {
                    bench.enforcement(enforcer).await?;
                }
                if wanted("coverage") {
                    bench.coverage(enforcer).await?;
                }
                if wanted("datapath") {
                    bench.datapath(enforcer).await?;
                }
            }
            if wanted("memory") {
                bench.memory().await?;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let logs = bench_logs(&bench);
        let stopped = bench.stop().await;
        outcome.with_context(|| logs).and(stopped)
    })
}

/// What enforces NetworkPolicy while a measurement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enforcer {
    /// weft-agent with `networkPolicy.enabled`.
    Weft,
    /// kube-router's firewall beside weft-agents without policy.
    KubeRouter,
}

impl Enforcer {
    fn label(self) -> &'static str {
        match self {
            Enforcer::Weft => "weft-agent",
            Enforcer::KubeRouter => "kube-router",
        }
    }
}

/// The cluster and its pods: a server on each node, a client and a
/// stranger (a pod no policy lets in) on node 0.
struct Bench {
    overlay: Overlay,
    servers: Vec<Pod>,
    client: Pod,
    stranger: Pod,
    kube_router: Option<KubeRouter>,
}

fn bench_logs(bench: &Bench) -> String {
    let mut logs = bench.overlay.logs();
    if let Some(kube_router) = &bench.kube_router {
        logs.push_str(&kube_router.logs());
    }
    logs
}

impl Bench {
    async fn start() -> Result<Self> {
        let mut overlay = Overlay::start(OverlaySpec::default()).await?;
        overlay.agent_env = policy_switch(false);
        overlay.start_agents()?;
        overlay.wait_programmed(2).await?;
        testbed::ensure_default_service_account(&overlay.admin, "default").await?;
        let mut servers = Vec::new();
        for (index, node) in overlay.cluster.nodes().to_vec().iter().enumerate() {
            let pod = overlay.add_pod_with(node, "server", serde_json::Map::new())?;
            let name = format!("server-{index}");
            testbed::publish_pod(&overlay.admin, &pod, &name, node, &json!({"app": "server"}))
                .await?;
            accept_and_close(&pod)?;
            servers.push(pod);
        }
        let node0 = overlay.node(0);
        let client = overlay.add_pod_with(&node0, "client", serde_json::Map::new())?;
        testbed::publish_pod(
            &overlay.admin,
            &client,
            "client",
            &node0,
            &json!({"app": "client"}),
        )
        .await?;
        let stranger = overlay.add_pod_with(&node0, "stranger", serde_json::Map::new())?;
        testbed::publish_pod(
            &overlay.admin,
            &stranger,
            "stranger",
            &node0,
            &json!({"app": "stranger"}),
        )
        .await?;
        let bench = Bench {
            overlay,
            servers,
            client,
            stranger,
            kube_router: None,
        };
        bench.wait_reach(&bench.client, true).await?;
        Ok(bench)
    }

    /// Hands enforcement to `enforcer`, with no policy in the cluster.
    async fn enforce_with(&mut self, enforcer: Enforcer) -> Result<()> {
        self.delete_policies().await?;
        self.hand_over(enforcer)?;
        for node in self.overlay.cluster.nodes().to_vec() {
            self.overlay.restart_agent(&node)?;
        }
        self.overlay.wait_programmed(2).await?;
        if enforcer == Enforcer::KubeRouter {
            self.kube_router = Some(KubeRouter::start(&self.overlay).await?);
        }
        // Enforcing: a default deny shuts the client out, and lifting it
        // lets it in again.
        let policies = self.policies();
        policies
            .create(&PostParams::default(), &deny_servers())
            .await?;
        self.wait_reach(&self.client, false).await?;
        self.delete_policies().await?;
        self.wait_reach(&self.client, true).await
    }

    /// Stops kube-router if it runs, and sets the agents started from now
    /// on to enforce policy if `enforcer` is Weft.
    fn hand_over(&mut self, enforcer: Enforcer) -> Result<()> {
        if let Some(kube_router) = self.kube_router.take() {
            kube_router.stop()?;
        }
        self.overlay.agent_env = policy_switch(enforcer == Enforcer::Weft);
        Ok(())
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(kube_router) = self.kube_router.take() {
            kube_router.stop()?;
        }
        self.overlay.cluster.stop().await
    }

    /// The NetworkPolicies of `default`, where the bench's pods are.
    fn policies(&self) -> Api<NetworkPolicy> {
        Api::namespaced(self.overlay.admin.clone(), "default")
    }

    /// Deletes every NetworkPolicy in `default`.
    async fn delete_policies(&self) -> Result<()> {
        self.policies()
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
        Ok(())
    }

    /// The servers' connection addresses.
    fn targets(&self, port: u16) -> Result<Vec<SocketAddr>> {
        self.servers
            .iter()
            .map(|pod| {
                let ip = pod.ip().context("server without address")?;
                Ok(SocketAddr::new(ip, port))
            })
            .collect()
    }

    /// Waits until `from` reaches every server (`open`), or none.
    async fn wait_reach(&self, from: &Pod, open: bool) -> Result<()> {
        let netns = Arc::new(Netns::open(from.netns_path())?);
        let deadline = Instant::now() + PATIENCE;
        let mut waits = JoinSet::new();
        for target in self.targets(SERVER_PORT)? {
            let netns = netns.clone();
            waits.spawn(async move {
                // Closed means three refusals in a row: a probe that is
                // dropped can also be one that met a slow handshake.
                let mut streak = 0;
                while streak < if open { 1 } else { 3 } {
                    ensure!(
                        Instant::now() < deadline,
                        "{target} never {}",
                        if open { "reached" } else { "lost" }
                    );
                    let passed = connects(&netns, target, BLOCKED_AFTER).await?;
                    streak = if passed == open { streak + 1 } else { 0 };
                }
                Ok(())
            });
        }
        while let Some(wait) = waits.join_next().await {
            wait?.with_context(|| format!("from {}", from.netns))?;
        }
        Ok(())
    }

    /// Policy created, and policy updated, until enforced on every node.
    async fn enforcement(&mut self, enforcer: Enforcer) -> Result<()> {
        let policies = self.policies();
        policies
            .create(&PostParams::default(), &deny_servers())
            .await?;
        self.wait_reach(&self.client, false).await?;
        let targets = self.targets(SERVER_PORT)?;
        let mut created = Vec::new();
        for _ in 0..SAMPLES {
            let started = Instant::now();
            policies
                .create(
                    &PostParams::default(),
                    &allow_servers_from("allow", "client"),
                )
                .await?;
            created.push(first_reached_all(&self.client, &targets, started).await?);
            policies.delete("allow", &DeleteParams::default()).await?;
            self.wait_reach(&self.client, false).await?;
        }
        policies
            .create(
                &PostParams::default(),
                &allow_servers_from("allow", "nobody"),
            )
            .await?;
        let mut updated = Vec::new();
        for _ in 0..SAMPLES {
            let started = Instant::now();
            patch_from(&policies, "allow", "client").await?;
            updated.push(first_reached_all(&self.client, &targets, started).await?);
            patch_from(&policies, "allow", "nobody").await?;
            self.wait_reach(&self.client, false).await?;
        }
        self.delete_policies().await?;
        self.wait_reach(&self.client, true).await?;
        for (what, samples) in [("created", &created), ("updated", &updated)] {
            println!(
                "enforcement, {}: policy {what} -> enforced on all 3 nodes: p50 {}, p99 {} ({SAMPLES} samples)",
                enforcer.label(),
                ms(percentile(samples, 50.0)),
                ms(percentile(samples, 99.0)),
            );
        }
        Ok(())
    }

    /// A new pod whose label existing policies allow, from Running to
    /// reaching every server.
    async fn coverage(&mut self, enforcer: Enforcer) -> Result<()> {
        let policies = self.policies();
        policies
            .create(&PostParams::default(), &deny_servers())
            .await?;
        policies
            .create(
                &PostParams::default(),
                &allow_servers_from("allow", "client"),
            )
            .await?;
        self.wait_reach(&self.stranger, false).await?;
        let targets = self.targets(SERVER_PORT)?;
        let pods: Api<PodObject> = Api::namespaced(self.overlay.admin.clone(), "default");
        let mut covered = Vec::new();
        let mut newcomers = Vec::new();
        for sample in 0..SAMPLES {
            // New pods stay until the end: an enforcer that is slow to
            // forget a deleted pod could otherwise let its reused address in.
            let node = self.overlay.node(sample % self.servers.len());
            let name = format!("newcomer-{}-{sample}", enforcer.label());
            let pod = self
                .overlay
                .add_pod_with(&node, &name, serde_json::Map::new())?;
            pods.create(
                &PostParams::default(),
                &testbed::pod_object(&name, &node.name, &json!({"app": "client"}))?,
            )
            .await?;
            let ip = pod.ip().context("new pod without address")?;
            let started = Instant::now();
            testbed::report_running(&pods, &name, ip, IpAddr::V4(node.underlay_ip())).await?;
            covered.push(first_reached_all(&pod, &targets, started).await?);
            newcomers.push((name, pod));
        }
        self.delete_policies().await?;
        self.wait_reach(&self.stranger, true).await?;
        // The next measurement, and the other enforcer's, see the cluster
        // this one started with.
        // No kubelet confirms a deletion here: without a grace period of 0
        // the objects would stay, terminating, for every enforcer to read.
        let at_once = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        for (name, pod) in newcomers {
            pods.delete(&name, &at_once).await?;
            pod.delete()?;
        }
        println!(
            "coverage, {}: new pod Running -> its connections pass on all 3 nodes: p50 {}, p99 {} ({SAMPLES} samples)",
            enforcer.label(),
            ms(percentile(&covered, 50.0)),
            ms(percentile(&covered, 99.0)),
        );
        Ok(())
    }

    /// Throughput and connection rate node 0 -> node 1 with no policy and
    /// with [`DATAPATH_POLICIES`], in interleaved rounds.
    async fn datapath(&mut self, enforcer: Enforcer) -> Result<()> {
        let server = &self.servers[1];
        let server_ip = server.ip().context("server without address")?;
        let target = SocketAddr::new(server_ip, SERVER_PORT);
        let mut throughput = [Vec::new(), Vec::new()];
        let mut rate = [Vec::new(), Vec::new()];
        // Rounds alternate which goes first (none, many; many, none; ...),
        // so the policies change only between rounds' halves.
        let mut have_policies = false;
        for round in 0..DATAPATH_ROUNDS {
            for with_policies in [!round.is_multiple_of(2), round.is_multiple_of(2)] {
                if with_policies && !have_policies {
                    self.create_datapath_policies().await?;
                    self.wait_reach(&self.stranger, false).await?;
                    self.wait_reach(&self.client, true).await?;
                } else if !with_policies && have_policies {
                    self.delete_policies().await?;
                    self.wait_reach(&self.stranger, true).await?;
                }
                have_policies = with_policies;
                let client = &self.client;
                let bits = iperf(
                    server.command("iperf3"),
                    || client.command("iperf3"),
                    server_ip,
                )?;
                throughput[usize::from(with_policies)].push(bits);
                rate[usize::from(with_policies)].push(connection_rate(client, target).await?);
            }
        }
        self.delete_policies().await?;
        self.wait_reach(&self.stranger, true).await?;
        let [bits_none, bits_many] = throughput.map(|runs| median(&runs));
        let [rate_none, rate_many] = rate.map(|runs| median(&runs));
        println!(
            "datapath, {}: TCP throughput {} with none, {} with {DATAPATH_POLICIES} policies = {:.3}x; new connections {rate_none:.0}/s with none, {rate_many:.0}/s with {DATAPATH_POLICIES} = {:.3}x (iperf3 {IPERF_SECONDS} s and {CONNECTORS} connectors for {CONNECT_SECONDS} s, medians of {DATAPATH_ROUNDS} interleaved rounds)",
            enforcer.label(),
            gbit(bits_none),
            gbit(bits_many),
            bits_many / bits_none,
            rate_many / rate_none,
        );
        Ok(())
    }

    /// 100 policies that isolate the server and 100 that isolate the
    /// client, each allowing something else; one of each allows the
    /// client's traffic to the server.
    async fn create_datapath_policies(&self) -> Result<()> {
        let policies = self.policies();
        let half = DATAPATH_POLICIES / 2;
        let objects = (0..half).flat_map(|index| {
            let (from, to) = if index == half - 1 {
                ("client".to_owned(), "server".to_owned())
            } else {
                (format!("client-{index}"), format!("server-{index}"))
            };
            [
                policy(&format!("ingress-{index}"), json!({
                    "podSelector": {"matchLabels": {"app": "server"}},
                    "ingress": [{
                        "from": [{"podSelector": {"matchLabels": {"app": from}}}],
                        "ports": [{"port": SERVER_PORT}, {"port": IPERF_PORT}, {"port": 10_000 + index}],
                    }],
                })),
                policy(&format!("egress-{index}"), json!({
                    "podSelector": {"matchLabels": {"app": "client"}},
                    "policyTypes": ["Egress"],
                    "egress": [{
                        "to": [{"podSelector": {"matchLabels": {"app": to}}}],
                        "ports": [{"port": SERVER_PORT}, {"port": IPERF_PORT}, {"port": 20_000 + index}],
                    }],
                })),
            ]
        });
        futures::stream::iter(objects)
            .map(|object| {
                let policies = policies.clone();
                async move {
                    policies
                        .create(&PostParams::default(), &object?)
                        .await
                        .map(drop)
                        .map_err(anyhow::Error::from)
                }
            })
            .buffer_unordered(API_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// The memory measurement: fills the cluster, then runs each enforcer
    /// over it.
    async fn memory(&mut self) -> Result<()> {
        let started = Instant::now();
        let expected = fill_cluster(
            &self.overlay.admin,
            &self.overlay.node(0).name,
            &self.overlay,
        )
        .await?;
        println!(
            "memory: {} pods in {SCALE_NAMESPACES} namespaces and {} policies created in {:.1} s",
            SCALE_NAMESPACES * SCALE_PODS,
            SCALE_NAMESPACES * SCALE_POLICIES,
            started.elapsed().as_secs_f64()
        );
        for enforcer in [Enforcer::Weft, Enforcer::KubeRouter] {
            let synced = self.enforce_over_scale(enforcer, &expected).await?;
            let pid = match enforcer {
                Enforcer::Weft => self.overlay.agents[&self.overlay.node(0).name].pid(),
                Enforcer::KubeRouter => self
                    .kube_router
                    .as_ref()
                    .context("kube-router not running")?
                    .pid(0),
            };
            let syncs = match enforcer {
                Enforcer::Weft => {
                    sync_summary(&testbed::agent_get(&self.overlay.node(0), "/metrics")?)
                }
                Enforcer::KubeRouter => String::new(),
            };
            println!(
                "memory, {}: enforcing on node 0 after {:.1} s from start{syncs}; RSS {:.1} MiB (peak {:.1} MiB)",
                enforcer.label(),
                synced.as_secs_f64(),
                status_kib(pid, "VmRSS:")? as f64 / 1024.0,
                status_kib(pid, "VmHWM:")? as f64 / 1024.0,
            );
        }
        Ok(())
    }

    /// Starts `enforcer` over the filled cluster and waits until node 0
    /// enforces what `expected` says; returns how long that took from the
    /// enforcer's start.
    async fn enforce_over_scale(
        &mut self,
        enforcer: Enforcer,
        expected: &ScaleExpectation,
    ) -> Result<Duration> {
        self.hand_over(enforcer)?;
        let node0 = self.overlay.node(0);
        let started = Instant::now();
        self.overlay.restart_agent(&node0)?;
        let deadline = started + PATIENCE * 5;
        match enforcer {
            Enforcer::Weft => loop {
                let metrics = testbed::agent_get(&node0, "/metrics").unwrap_or_default();
                let isolated = |direction: &str, count: usize| {
                    metrics.contains(&format!(
                        "weft_agent_policy_isolated_pods{{direction=\"{direction}\"}} {count}\n"
                    ))
                };
                if isolated("ingress", expected.ingress) && isolated("egress", expected.egress) {
                    return Ok(started.elapsed());
                }
                ensure!(
                    Instant::now() < deadline,
                    "weft-agent never enforced the scale cluster"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
            Enforcer::KubeRouter => {
                let kube_router = KubeRouter::start_on(&self.overlay, &[node0]).await?;
                let result = kube_router
                    .wait_isolated(expected.ingress + expected.egress, deadline)
                    .await;
                self.kube_router = Some(kube_router);
                result.map(|()| started.elapsed())
            }
        }
    }
}

/// ", N syncs of M ms on average" from weft-agent's metrics text.
fn sync_summary(metrics: &str) -> String {
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let count = value("weft_agent_policy_sync_duration_seconds_count ");
    let sum = value("weft_agent_policy_sync_duration_seconds_sum ");
    format!(
        ", {count} syncs (compile and nft) of {:.0} ms on average",
        sum / count.max(1.0) * 1000.0
    )
}

/// The agents' environment switching their policy enforcement.
fn policy_switch(on: bool) -> Vec<(String, String)> {
    vec![("WEFT_NETWORK_POLICY_ENABLED".into(), on.to_string())]
}

/// A NetworkPolicy named `name` in `default` with `spec`.
fn policy(name: &str, spec: Value) -> Result<NetworkPolicy> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": spec,
    }))?)
}

/// Isolates the servers for ingress, allowing nothing.
fn deny_servers() -> NetworkPolicy {
    policy(
        "deny",
        json!({"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}),
    )
    .expect("a valid policy")
}

/// Lets pods labelled app=`app` into the servers on [`SERVER_PORT`].
fn allow_servers_from(name: &str, app: &str) -> NetworkPolicy {
    policy(
        name,
        json!({
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": app}}}],
                "ports": [{"port": SERVER_PORT}],
            }],
        }),
    )
    .expect("a valid policy")
}

/// Changes the allowed label of [`allow_servers_from`]'s policy `name`.
async fn patch_from(policies: &Api<NetworkPolicy>, name: &str, app: &str) -> Result<()> {
    let patch = json!({"spec": {"ingress": [{
        "from": [{"podSelector": {"matchLabels": {"app": app}}}],
        "ports": [{"port": SERVER_PORT}],
    }]}});
    policies
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Serves [`SERVER_PORT`] inside `pod`: accepts each connection and closes
/// it at once (so the server side, not the client, keeps TIME_WAIT).
fn accept_and_close(pod: &Pod) -> Result<()> {
    let listener = Netns::open(pod.netns_path())?
        .run_here(|| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, SERVER_PORT)))??;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    Ok(())
}

/// A TCP socket made inside `netns`; it keeps that namespace wherever it
/// is used afterwards.
fn socket_in(netns: &Netns, target: SocketAddr) -> Result<TcpSocket> {
    Ok(netns.run_here(|| match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    })??)
}

/// Whether one connection from `netns` to `target` completes its
/// handshake within `patience`.
async fn connects(netns: &Netns, target: SocketAddr, patience: Duration) -> Result<bool> {
    let socket = socket_in(netns, target)?;
    Ok(matches!(
        tokio::time::timeout(patience, socket.connect(target)).await,
        Ok(Ok(_))
    ))
}

/// When a connection from `from` to `target` first got through: probes
/// start every [`PROBE_EVERY`], each a fresh connection, and the answer is
/// the start of the first that completed.
async fn first_reached(
    netns: Arc<Netns>,
    target: SocketAddr,
    deadline: Instant,
) -> Result<Instant> {
    let mut probes = JoinSet::new();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                ensure!(Instant::now() < deadline, "{target} never reached");
                let socket = socket_in(&netns, target)?;
                let sent = Instant::now();
                probes.spawn(async move {
                    matches!(
                        tokio::time::timeout(PROBE_PATIENCE, socket.connect(target)).await,
                        Ok(Ok(_))
                    )
                    .then_some(sent)
                });
            }
            Some(probe) = probes.join_next() => {
                if let Some(sent) = probe? {
                    return Ok(sent);
                }
            }
        }
    }
}

/// From `started` to the moment the last of `targets` was first reached
/// from `from`, all probed at once.
async fn first_reached_all(
    from: &Pod,
    targets: &[SocketAddr],
    started: Instant,
) -> Result<Duration> {
    let netns = Arc::new(Netns::open(from.netns_path())?);
    let deadline = started + PATIENCE;
    let mut probers = JoinSet::new();
    for &target in targets {
        probers.spawn(first_reached(netns.clone(), target, deadline));
    }
    let mut last = started;
    while let Some(reached) = probers.join_next().await {
        last = last.max(reached??);
    }
    Ok(last.saturating_duration_since(started))
}

/// New connections per second from `from` to `target` (a server that
/// closes each at once), by [`CONNECTORS`] loops for [`CONNECT_SECONDS`].
async fn connection_rate(from: &Pod, target: SocketAddr) -> Result<f64> {
    let netns = Arc::new(Netns::open(from.netns_path())?);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(CONNECT_SECONDS);
    let mut connectors = JoinSet::new();
    for _ in 0..CONNECTORS {
        let (netns, done) = (netns.clone(), done.clone());
        connectors.spawn(async move {
            while Instant::now() < until {
                let mut stream = socket_in(&netns, target)?
                    .connect(target)
                    .await
                    .with_context(|| format!("connecting to {target}"))?;
                // Wait for the server's close, so TIME_WAIT stays with it.
                let mut byte = [0u8; 1];
                tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(connector) = connectors.join_next().await {
        connector??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// How many of node 0's pods the scale cluster isolates, per direction.
struct ScaleExpectation {
    ingress: usize,
    egress: usize,
}

/// Fills the cluster for the memory measurement: [`SCALE_NAMESPACES`]
/// namespaces labelled team=t0..t9, each with [`SCALE_PODS`] pods spread
/// over the three nodes (app=a0..a9 in turn, every other one role=client)
/// at addresses outside every node's slice, and [`SCALE_POLICIES`]
/// policies, one per app label: even ones let this namespace's and the
/// next namespace's clients in on 8080, odd ones let their pods out to the
/// previous app's pods on 8080.
async fn fill_cluster(admin: &Client, node0: &str, overlay: &Overlay) -> Result<ScaleExpectation> {
    let nodes = overlay.cluster.nodes().to_vec();
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let mut expected = ScaleExpectation {
        ingress: 0,
        egress: 0,
    };
    let mut pods = Vec::new();
    let mut policies = Vec::new();
    for n in 0..SCALE_NAMESPACES {
        let namespace = format!("scale-{n:03}");
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": namespace, "labels": {"team": format!("t{}", n % 10)}},
                }))?,
            )
            .await?;
        testbed::ensure_default_service_account(admin, &namespace).await?;
        for p in 0..SCALE_PODS {
            let index = n * SCALE_PODS + p;
            let node = &nodes[index % nodes.len()];
            let app = p % SCALE_POLICIES;
            let role = if p.is_multiple_of(2) {
                "client"
            } else {
                "server"
            };
            if node.name == node0 {
                if app.is_multiple_of(2) {
                    expected.ingress += 1;
                } else {
                    expected.egress += 1;
                }
            }
            // 10.244.64.0 onwards: inside the cluster CIDR, past the slices
            // the controller gives three nodes.
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 64, 0)) + index as u32);
            pods.push((
                namespace.clone(),
                format!("pod-{p:03}"),
                node.clone(),
                json!({"app": format!("a{app}"), "role": role}),
                ip,
            ));
        }
        for app in 0..SCALE_POLICIES {
            let spec = if app.is_multiple_of(2) {
                json!({
                    "podSelector": {"matchLabels": {"app": format!("a{app}")}},
                    "ingress": [{
                        "from": [
                            {"podSelector": {"matchLabels": {"role": "client"}}},
                            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": format!("scale-{:03}", (n + 1) % SCALE_NAMESPACES)}},
                             "podSelector": {"matchLabels": {"role": "client"}}},
                        ],
                        "ports": [{"port": 8080}],
                    }],
                })
            } else {
                json!({
                    "podSelector": {"matchLabels": {"app": format!("a{app}")}},
                    "policyTypes": ["Egress"],
                    "egress": [{
                        "to": [{"podSelector": {"matchLabels": {"app": format!("a{}", app - 1)}}}],
                        "ports": [{"port": 8080}],
                    }],
                })
            };
            policies.push((namespace.clone(), format!("policy-{app}"), spec));
        }
    }
    futures::stream::iter(pods)
        .map(|(namespace, name, node, labels, ip)| {
            let api: Api<PodObject> = Api::namespaced(admin.clone(), &namespace);
            async move {
                api.create(
                    &PostParams::default(),
                    &testbed::pod_object(&name, &node.name, &labels)?,
                )
                .await?;
                testbed::report_running(&api, &name, IpAddr::V4(ip), IpAddr::V4(node.underlay_ip()))
                    .await
            }
        })
        .buffer_unordered(API_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    futures::stream::iter(policies)
        .map(|(namespace, name, spec)| {
            let api: Api<NetworkPolicy> = Api::namespaced(admin.clone(), &namespace);
            async move {
                let mut object = policy(&name, spec)?;
                object.metadata.namespace = Some(namespace);
                api.create(&PostParams::default(), &object).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(API_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(expected)
}
