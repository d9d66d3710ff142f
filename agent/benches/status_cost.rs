//! What the agent's `/status` costs its steady state (issue 23: "`/status`
//! without `check` adds nothing to the agent's steady state"), on the e2e
//! harness (root required, release build).
//!
//! One cluster (a real kube-apiserver, three namespace nodes) and three
//! agents side by side, one per node, with the same load at the same time:
//!
//! - node 0: the agent of the revision before `/status`
//!   (`WEFT_AGENT_BEFORE`, required);
//! - node 1: the agent with `/status` (`WEFT_AGENT_AFTER`; by default this
//!   workspace's own build), never asked for it;
//! - node 2: the same binary, asked for a plain `/status` (no `check`)
//!   every 10 s.
//!
//! The load is [`PEERS`] peer Node objects, [`PODS`] Pod objects bound to
//! the three nodes and [`POLICIES`] NetworkPolicies, with enforcement on and
//! the default resync (60 s). Once every agent has programmed every peer
//! and reports ready, the cluster settles for [`SETTLE`]; then, over a
//! window (`WEFT_STATUS_COST_SECONDS`, default 300), each agent's RSS is
//! sampled every 10 s and its CPU time (user + system, all threads) is
//! taken at both ends. Printed as a table; nothing is asserted.
//!
//! `WEFT_AGENT_BEFORE=… cargo bench -p weft-agent --bench status_cost --
//! status_cost`; without `WEFT_AGENT_BEFORE`, a run that does not name it
//! (`cargo bench -p weft-agent`, as `make bench` runs it) skips it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod as PodObject};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use weft_e2e::{Cluster, ClusterNode, ProcessHandle};
use weft_testing::eventually;
use weft_testing::measure::status_kib;

#[path = "../tests/testbed/mod.rs"]
mod testbed;

// Only the selection is used here; iperf3 and the units are the other benches'.
#[allow(dead_code)]
mod measure;

use testbed::{agent_get, agent_ready, weft_routes, PATIENCE};

/// Peer Node objects every agent programs.
const PEERS: usize = 500;
/// Pod objects, bound to the three nodes in turn.
const PODS: usize = 150;
/// NetworkPolicies, each selecting a tenth of the pods.
const POLICIES: usize = 15;
/// Time between `/status` requests to the polled agent, and between RSS
/// samples of every agent.
const TICK: Duration = Duration::from_secs(10);
/// Quiet time after every agent is programmed and ready, before the window:
/// one resync period, so every agent has run a resync pass.
const SETTLE: Duration = Duration::from_secs(60);
/// The window's length when `WEFT_STATUS_COST_SECONDS` is not set.
const DEFAULT_WINDOW_SECONDS: u64 = 300;
/// The cluster CIDR: peers' slices from 10.0.0.0, the nodes' own 10.255.N.0/24.
const CLUSTER_CIDR: &str = "10.0.0.0/8";
/// API requests in flight while the load is created.
const API_CONCURRENCY: usize = 32;
/// Clock ticks per second of `/proc/<pid>/stat`'s times (USER_HZ, which
/// Linux fixes at 100 on x86 and arm64 whatever the kernel's HZ).
const USER_HZ: f64 = 100.0;
/// The variable naming the agent binary of the revision before `/status`.
const BEFORE: &str = "WEFT_AGENT_BEFORE";

fn main() -> Result<()> {
    measure::run_as_root(|selection| async move {
        if !selection.wants("status_cost") {
            return Ok(());
        }
        // `cargo bench -p weft-agent` (as `make bench` runs it) skips this
        // bench without a before binary; naming it asks for it.
        let named = std::env::args().skip(1).any(|arg| arg == "status_cost");
        if std::env::var_os(BEFORE).is_none() && !named {
            eprintln!("status_cost skipped: {BEFORE} is not set");
            return Ok(());
        }
        status_cost().await
    })
}

/// One agent under measurement and what was measured of it.
struct Arm {
    label: &'static str,
    binary: PathBuf,
    /// Whether the bench asks it for `/status` every tick.
    polled: bool,
    node: ClusterNode,
    process: Option<ProcessHandle>,
    /// VmRSS at the window's start and at every tick, KiB.
    rss: Vec<u64>,
    /// utime + stime at the window's start and end, clock ticks.
    cpu: Vec<u64>,
    /// Bytes of each `/status` response it gave.
    responses: Vec<usize>,
}

impl Arm {
    fn new(label: &'static str, binary: PathBuf, polled: bool, node: &ClusterNode) -> Self {
        Arm {
            label,
            binary,
            polled,
            node: node.clone(),
            process: None,
            rss: Vec::new(),
            cpu: Vec::new(),
            responses: Vec::new(),
        }
    }

    fn pid(&self) -> Result<u32> {
        Ok(self
            .process
            .as_ref()
            .with_context(|| format!("the {} agent was never started", self.label))?
            .pid())
    }

    fn sample_rss(&mut self) -> Result<()> {
        let rss = status_kib(self.pid()?, "VmRSS:")?;
        self.rss.push(rss);
        Ok(())
    }

    fn sample_cpu(&mut self) -> Result<()> {
        let ticks = cpu_ticks(self.pid()?)?;
        self.cpu.push(ticks);
        Ok(())
    }

    /// A row of the printed table.
    fn row(&self, window: Duration) -> Result<String> {
        let first = *self.rss.first().context("no RSS sample")?;
        let last = *self.rss.last().context("no RSS sample")?;
        let peak = self.rss.iter().copied().max().unwrap_or_default();
        let hwm = status_kib(self.pid()?, "VmHWM:")?;
        let ticks = self.cpu.last().unwrap_or(&0) - self.cpu.first().unwrap_or(&0);
        let cpu = ticks as f64 / USER_HZ;
        let polled = match self.responses.len() {
            0 => "no".to_string(),
            n => format!(
                "every {} s ({n} requests, {:.1} KiB each)",
                TICK.as_secs(),
                self.responses.iter().sum::<usize>() as f64 / n as f64 / 1024.0
            ),
        };
        Ok(format!(
            "| {} | {polled} | {} | {} | {} | {} | {cpu:.2} s ({:.3} %) |",
            self.label,
            mib(first),
            mib(last),
            mib(peak),
            mib(hwm),
            100.0 * cpu / window.as_secs_f64(),
        ))
    }
}

/// KiB as "N.N MiB".
fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// utime + stime of process `pid` (all its threads), in clock ticks:
/// fields 14 and 15 of `/proc/<pid>/stat`, counted after the command name,
/// which is in parentheses and may hold spaces.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(')')
        .with_context(|| format!("no command name in /proc/{pid}/stat"))?
        .1;
    // After the name come field 3 (state) onwards: utime is field 14.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |number: usize| -> Result<u64> {
        fields
            .get(number - 3)
            .with_context(|| format!("/proc/{pid}/stat has no field {number}"))?
            .parse()
            .with_context(|| format!("field {number} of /proc/{pid}/stat"))
    };
    Ok(field(14)? + field(15)?)
}

/// `/proc/loadavg`'s three load averages.
fn load_average() -> Result<String> {
    let text = std::fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    Ok(text
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "))
}

/// The agent binary named by environment variable `variable`, or `default`
/// when it is unset; it must exist.
fn agent_binary(variable: &str, default: Option<&str>) -> Result<PathBuf> {
    let path = match (std::env::var_os(variable), default) {
        (Some(path), _) => PathBuf::from(path),
        (None, Some(path)) => PathBuf::from(path),
        (None, None) => bail!(
            "{variable} is not set: set it to the weft-agent binary of the revision before \
             /status, e.g. `git worktree add /tmp/weft-before 03023b0`, then \
             `CARGO_TARGET_DIR=/tmp/weft-before-target cargo build --release -p weft-agent \
             --locked` in /tmp/weft-before and \
             {variable}=/tmp/weft-before-target/release/weft-agent"
        ),
    };
    ensure!(
        path.is_file(),
        "{variable}={} is not a file: point it at a built weft-agent binary",
        path.display()
    );
    Ok(path)
}

async fn status_cost() -> Result<()> {
    let before = agent_binary(BEFORE, None)?;
    let after = agent_binary("WEFT_AGENT_AFTER", Some(env!("CARGO_BIN_EXE_weft-agent")))?;
    let window = match std::env::var("WEFT_STATUS_COST_SECONDS") {
        Ok(text) => Duration::from_secs(text.parse().with_context(|| {
            format!("WEFT_STATUS_COST_SECONDS={text:?}: give the window in whole seconds")
        })?),
        Err(_) => Duration::from_secs(DEFAULT_WINDOW_SECONDS),
    };
    let plugin = testbed::workspace_binary("weft-cni", "weft")?;

    let (cluster, admin) = testbed::start_cluster(3, 0).await?;
    testbed::apply_agent_rbac(&admin).await?;
    let kubeconfig = cluster
        .service_account_kubeconfig("kube-system", "weft-agent")
        .await?;
    let nodes = cluster.nodes().to_vec();
    let mut arms = vec![
        Arm::new("before", before, false, &nodes[0]),
        Arm::new("after", after.clone(), false, &nodes[1]),
        Arm::new("after", after, true, &nodes[2]),
    ];
    create_load(&admin, &nodes).await?;
    for arm in &mut arms {
        let process = start_agent(&cluster, &arm.node, &arm.binary, &kubeconfig, &plugin)?;
        ensure_measures_the_binary(&process, &arm.binary).await?;
        arm.process = Some(process);
    }
    // Every peer and the two other agents' nodes.
    let routes = PEERS + nodes.len() - 1;
    eventually(PATIENCE, "every agent to program its peers", || async {
        for arm in &arms {
            ensure_running(arm)?;
            let programmed = weft_routes(&arm.node)?.len();
            let ready = agent_ready(&arm.node)?;
            // Not yet: the reason is what a timeout reports.
            ensure!(
                programmed == routes && ready,
                "{} has {programmed} of {routes} routes, ready {ready}",
                arm.node.name,
            );
        }
        Ok(Some(()))
    })
    .await
    .with_context(|| logs(&arms))?;
    tokio::time::sleep(SETTLE).await;

    let load_before = load_average()?;
    for arm in &mut arms {
        arm.sample_cpu()?;
        arm.sample_rss()?;
    }
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
    for _ in 0..window.as_secs() / TICK.as_secs() {
        ticks.tick().await;
        arms.iter()
            .try_for_each(ensure_running)
            .with_context(|| logs(&arms))?;
        for arm in &mut arms {
            if arm.polled {
                let node = arm.node.clone();
                let response =
                    tokio::task::spawn_blocking(move || agent_get(&node, "/status")).await??;
                ensure!(
                    response.starts_with("HTTP/1.1 200"),
                    "/status on {} answered {}",
                    arm.node.name,
                    response.lines().next().unwrap_or_default()
                );
                arm.responses.push(response.len());
            }
            arm.sample_rss()?;
        }
    }
    for arm in &mut arms {
        arm.sample_cpu()?;
    }
    let load_after = load_average()?;

    println!(
        "status_cost: {PEERS} peers, {PODS} pods, {POLICIES} policies, NetworkPolicy on, resync 60 s; \
         settled {} s, window {} s, RSS every {} s; load average {load_before} at the start, {load_after} at the end",
        SETTLE.as_secs(),
        window.as_secs(),
        TICK.as_secs(),
    );
    for arm in &arms {
        println!(
            "  {} on {}: {}",
            arm.label,
            arm.node.name,
            arm.binary.display()
        );
    }
    println!(
        "| agent | /status polled | RSS at start | RSS at end | RSS max | VmHWM | CPU in window |"
    );
    println!("|---|---|---|---|---|---|---|");
    for arm in &arms {
        println!("{}", arm.row(window)?);
    }
    cluster.stop().await
}

/// Starts `binary` as `node`'s agent, configured as the testbed configures
/// its agents except for the resync, which stays at its default, and with
/// NetworkPolicy enforcement on.
fn start_agent(
    cluster: &Cluster,
    node: &ClusterNode,
    binary: &Path,
    kubeconfig: &Path,
    plugin: &Path,
) -> Result<ProcessHandle> {
    let mut command = testbed::agent_command(binary, node, plugin, kubeconfig);
    command
        .args(["--backend", "vxlan", "--cluster-cidr", CLUSTER_CIDR])
        .env("WEFT_NETWORK_POLICY_ENABLED", "true");
    cluster.spawn_on_node(node, &format!("weft-agent-{}", node.name), command)
}

/// Fails unless the process is `binary` itself: the figures must not be a
/// wrapper's (the harness starts it through `ip netns exec`, which execs).
async fn ensure_measures_the_binary(process: &ProcessHandle, binary: &Path) -> Result<()> {
    let wanted = binary.canonicalize()?;
    let exe = format!("/proc/{}/exe", process.pid());
    eventually(
        Duration::from_secs(10),
        "the agent to be exec'd",
        || async {
            let running = std::fs::read_link(&exe).with_context(|| format!("reading {exe}"))?;
            Ok((running == wanted).then_some(()))
        },
    )
    .await
}

fn ensure_running(arm: &Arm) -> Result<()> {
    let process = arm.process.as_ref().context("agent not started")?;
    ensure!(
        process.is_running(),
        "the {} agent on {} exited: {:?}",
        arm.label,
        arm.node.name,
        process.exit_status()
    );
    Ok(())
}

/// Every agent's log, for failure messages.
fn logs(arms: &[Arm]) -> String {
    arms.iter()
        .filter_map(|arm| arm.process.as_ref())
        .map(|process| format!("--- {}\n{}", process.name(), process.log()))
        .collect()
}

/// The nodes' own slices, and the peers, pods and policies every agent
/// holds in its steady state: [`PEERS`] Node objects as running agents leave them (slice, public IP,
/// VTEP MAC), [`PODS`] Running pods in `default` on the three nodes, and
/// [`POLICIES`] policies that each let one tenth of the pods in from
/// another tenth on one port.
async fn create_load(admin: &Client, nodes: &[ClusterNode]) -> Result<()> {
    let node_api: Api<Node> = Api::all(admin.clone());
    // Each node's own slice, 10.255.N.0/24, before its agent starts.
    for (index, node) in nodes.iter().enumerate() {
        let patch = json!({"metadata": {"annotations": {
            "weft.dev/pod-cidr": format!("10.255.{index}.0/24")}}});
        node_api
            .patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("giving {} its slice", node.name))?;
    }
    futures::stream::iter(0..PEERS)
        .map(|i| {
            let node_api = node_api.clone();
            async move {
                let (high, low) = (i / 256, i % 256);
                let slice = format!("10.{high}.{low}.0/24");
                let peer: Node = serde_json::from_value(json!({
                    "metadata": {"name": format!("peer-{i}"), "annotations": {
                        "weft.dev/pod-cidr": slice,
                        "weft.dev/public-ip": format!("100.64.{high}.{low}"),
                        "weft.dev/backend-type": "vxlan",
                        "weft.dev/backend-data": json!({
                            "vtepMAC": format!("0a:58:00:00:{high:02x}:{low:02x}")
                        }).to_string(),
                    }},
                    "spec": {"podCIDR": slice, "podCIDRs": [slice]},
                }))?;
                node_api.create(&PostParams::default(), &peer).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(API_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .context("creating the peer Nodes")?;

    testbed::ensure_default_service_account(admin, "default").await?;
    let pods: Api<PodObject> = Api::namespaced(admin.clone(), "default");
    futures::stream::iter(0..PODS)
        .map(|p| {
            let pods = pods.clone();
            let node = nodes[p % nodes.len()].clone();
            async move {
                let name = format!("pod-{p:03}");
                let labels = json!({"app": format!("a{}", p % 10)});
                pods.create(
                    &PostParams::default(),
                    &testbed::pod_object(&name, &node.name, &labels)?,
                )
                .await?;
                let ip = Ipv4Addr::new(
                    10,
                    255,
                    (p % nodes.len()) as u8,
                    10 + (p / nodes.len()) as u8,
                );
                testbed::report_running(
                    &pods,
                    &name,
                    IpAddr::V4(ip),
                    IpAddr::V4(node.underlay_ip()),
                )
                .await
            }
        })
        .buffer_unordered(API_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .context("creating the Pods")?;

    let policies: Api<NetworkPolicy> = Api::namespaced(admin.clone(), "default");
    for n in 0..POLICIES {
        let policy: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": format!("policy-{n}")},
            "spec": {
                "podSelector": {"matchLabels": {"app": format!("a{}", n % 10)}},
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (n + 1) % 10)}}}],
                    "ports": [{"port": 8080 + n}],
                }],
            },
        }))?;
        policies
            .create(&PostParams::default(), &policy)
            .await
            .with_context(|| format!("creating NetworkPolicy policy-{n}"))?;
    }
    Ok(())
}
