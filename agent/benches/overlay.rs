//! The agent's benchmarks, on the e2e harness (root required, release
//! build). Each measures weft-agent and, as its peer in the same run,
//! flanneld (`--kube-subnet-mgr`, built from its Go module by
//! `e2e/flannel/build.sh`), with the same harness, parameters and clock:
//!
//! - `convergence`: 10 real agents; a Node object appears through the API;
//!   time until its route is in every agent's kernel, p50/p99.
//! - `scale`: 1,000 and 5,000 peers (Node objects created through the API
//!   before the agent starts); time from the agent's cache being ready to
//!   every route programmed, and the agent's RSS.
//! - `dataplane`: pod-to-pod TCP throughput across two nodes (iperf3), per
//!   backend (vxlan, host-gw), weft and flannel each on a cluster of its
//!   own whose pods were made under that backend, both clusters up at
//!   once: rounds that run both contenders' pod-to-pod and underlay paths
//!   in turn, reported as medians of each one's share of its underlay and
//!   of weft over flannel within a round.
//!
//! `cargo bench -p weft-agent` runs all three; `cargo bench -p weft-agent --
//! scale` (or `convergence`, `dataplane`) runs one.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use weft_core::ip::IpFamily;
use weft_core::netlink::{Netlink, Route};
use weft_core::netns::Netns;
use weft_e2e::{Cluster, ClusterNode, Pod, ProcessHandle};
use weft_testing::measure::{percentile, status_kib};

#[path = "../tests/testbed/mod.rs"]
mod testbed;

#[path = "overlay/flannel.rs"]
mod flannel;

mod measure;

use flannel::Flannel;
use measure::{gbit, iperf, median, ms, IPERF_SECONDS};
use testbed::{Overlay, OverlaySpec, PATIENCE};

/// Samples of the convergence benchmark.
const CONVERGENCE_SAMPLES: usize = 50;
/// Rounds of the dataplane comparison per backend. The machine is shared:
/// one run of each path swings by 20% with other processes' load, which a
/// median over rounds that measure both contenders absorbs.
const DATAPLANE_ROUNDS: usize = 7;
/// Lines of each agent's log shown when a benchmark fails.
const LOG_TAIL_LINES: usize = 40;

fn main() -> Result<()> {
    measure::run_as_root(|selection| async move {
        let wanted = |name: &str| selection.wants(name);
        if wanted("convergence") {
            convergence::<Weft>().await?;
            convergence::<Flannel>().await?;
        }
        if wanted("scale") {
            for peers in [1_000, 5_000] {
                scale::<Weft>(peers).await?;
                scale::<Flannel>(peers).await?;
            }
        }
        if wanted("dataplane") {
            for backend in ["vxlan", "host-gw"] {
                dataplane(backend).await?;
            }
        }
        Ok(())
    })
}

/// An overlay agent under measurement: weft-agent, or flanneld as its
/// peer. Each runs on harness nodes with the same underlay; the benchmarks
/// see them only through the API and the nodes' kernels.
trait Contender: Sized {
    /// Name in the printed figures.
    const LABEL: &'static str;
    /// What of the contender's data path was on, printed with the
    /// dataplane figures.
    const FEATURES: &'static str;

    /// A cluster of `nodes` namespace nodes, on one underlay segment, whose
    /// agents will run `backend` in `cluster_cidr`; no agent runs yet.
    async fn start(nodes: usize, backend: &'static str, cluster_cidr: &'static str)
        -> Result<Self>;

    fn cluster(&self) -> &Cluster;

    fn admin(&self) -> Client;

    /// Gives `node` its pod slice, as the contender's allocator would
    /// (weft-controller; kube-controller-manager for flannel).
    async fn assign_slice(&self, node: &ClusterNode, slice: IpNet) -> Result<()>;

    fn start_agent(&mut self, node: &ClusterNode) -> Result<()>;

    /// The running agent processes.
    fn agents(&self) -> Vec<&ProcessHandle>;

    /// A Node object as a running agent of this kind leaves it: slice,
    /// public IP, VTEP MAC.
    fn peer_node(name: &str, slice: IpNet, public_ip: IpAddr, mac: [u8; 6]) -> Node;

    /// When the agent logged that its Node cache was complete.
    fn cache_ready_at(log: &str) -> Option<SystemTime>;

    /// A pod on `node`, wired the way this contender's CNI setup wires it.
    fn add_pod(&self, node: &ClusterNode) -> Result<Pod>;

    async fn stop(self) -> Result<()>;
}

/// Every agent's log tail and state, for failure messages.
fn logs<C: Contender>(contender: &C) -> String {
    contender
        .agents()
        .into_iter()
        .map(|agent| {
            let log = agent.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            let state = match agent.exit_status() {
                Some(status) => format!("exited: {status}"),
                None => "running".to_string(),
            };
            format!(
                "--- {} ({state}, {})\n{tail}\n",
                agent.name(),
                agent.log_path().display()
            )
        })
        .collect()
}

/// Fails with the logs if an agent has exited: a dead one would otherwise
/// only show as a wait running out.
fn ensure_running<C: Contender>(contender: &C) -> Result<()> {
    if contender.agents().iter().all(|agent| agent.is_running()) {
        Ok(())
    } else {
        bail!("a {} exited\n{}", C::LABEL, logs(contender))
    }
}

/// weft-agent, slices given by the benchmark as weft-controller would.
struct Weft(Overlay);

impl Contender for Weft {
    const LABEL: &'static str = "weft";
    const FEATURES: &'static str = "routed pod veths, guard table (anti-spoofing; on vxlan also the VXLAN sender check), NetworkPolicy enforcement on with no policy, masquerade table";

    async fn start(
        nodes: usize,
        backend: &'static str,
        cluster_cidr: &'static str,
    ) -> Result<Self> {
        Ok(Weft(
            Overlay::start(OverlaySpec {
                backend,
                nodes,
                routed_nodes: 0,
                cluster_cidr,
                controller: false,
            })
            .await?,
        ))
    }

    fn cluster(&self) -> &Cluster {
        &self.0.cluster
    }

    fn admin(&self) -> Client {
        self.0.admin.clone()
    }

    async fn assign_slice(&self, node: &ClusterNode, slice: IpNet) -> Result<()> {
        let patch =
            json!({ "metadata": { "annotations": { "weft.dev/pod-cidr": slice.to_string() } } });
        patch_node(&self.0.admin, node, &patch).await
    }

    fn start_agent(&mut self, node: &ClusterNode) -> Result<()> {
        self.0.start_agent(node)
    }

    fn agents(&self) -> Vec<&ProcessHandle> {
        self.0.agents.values().collect()
    }

    fn peer_node(name: &str, slice: IpNet, public_ip: IpAddr, mac: [u8; 6]) -> Node {
        node_object(
            name,
            slice,
            [
                ("weft.dev/pod-cidr", slice.to_string()),
                ("weft.dev/public-ip", public_ip.to_string()),
                ("weft.dev/backend-type", "vxlan".to_string()),
                (
                    "weft.dev/backend-data",
                    json!({ "vtepMAC": mac_text(mac) }).to_string(),
                ),
            ],
        )
    }

    /// weft-agent logs RFC 3339 timestamps first on each line.
    fn cache_ready_at(log: &str) -> Option<SystemTime> {
        let line = log
            .lines()
            .find(|line| line.contains("node list complete"))?;
        let stamp = line.split_whitespace().next()?;
        let timestamp = k8s_openapi::jiff::Timestamp::from_str(stamp).ok()?;
        Some(SystemTime::from(timestamp))
    }

    /// The real `weft` plugin from the conflist the node's agent installed.
    fn add_pod(&self, node: &ClusterNode) -> Result<Pod> {
        self.0.add_pod(node)
    }

    async fn stop(self) -> Result<()> {
        self.0.cluster.stop().await
    }
}

/// Merges `patch` into `node`'s Node object.
async fn patch_node(admin: &Client, node: &ClusterNode, patch: &Value) -> Result<()> {
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes
        .patch(&node.name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("patching Node {}", node.name))?;
    Ok(())
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A Node object with `slice` in its spec and the given annotations.
fn node_object<const N: usize>(name: &str, slice: IpNet, annotations: [(&str, String); N]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            annotations: Some(
                annotations
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(slice.to_string()),
            pod_cidrs: Some(vec![slice.to_string()]),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// The peer slices a node's kernel routes: main-table IPv4 routes through
/// a gateway to a destination inside the cluster CIDR. Both agents add
/// exactly these (via the peer's VTEP address, onlink, for vxlan; via its
/// node address for host-gw); the node's own slice is a connected route.
async fn routed_slices(netlink: &Netlink, cluster_cidr: IpNet) -> Result<Vec<IpNet>> {
    Ok(netlink
        .routes(IpFamily::V4, Route::MAIN_TABLE)
        .await?
        .into_iter()
        .filter(|r| r.gateway.is_some() && cluster_cidr.contains(&r.destination))
        .map(|r| r.destination)
        .collect())
}

async fn node_netlink(node: &ClusterNode) -> Result<Netlink> {
    Ok(Netlink::in_netns(&Netns::open(node.netns_path())?)?)
}

/// A cluster of `nodes` with an agent on each, node `i` owning
/// `10.244.i.0/24`, once every node routes to every other; with a netlink
/// socket in each node, in node order.
async fn meshed<C: Contender>(nodes: usize, backend: &'static str) -> Result<(C, Vec<Netlink>)> {
    let mut contender = C::start(nodes, backend, testbed::CLUSTER_CIDR).await?;
    let cluster_cidr: IpNet = testbed::CLUSTER_CIDR.parse()?;
    let mut sockets = Vec::new();
    for (index, node) in contender.cluster().nodes().to_vec().iter().enumerate() {
        contender
            .assign_slice(node, format!("10.244.{index}.0/24").parse()?)
            .await?;
        contender.start_agent(node)?;
        sockets.push(node_netlink(node).await?);
    }
    let deadline = Instant::now() + PATIENCE;
    for socket in &sockets {
        while routed_slices(socket, cluster_cidr).await?.len() < nodes - 1 {
            ensure_running(&contender)?;
            ensure!(
                Instant::now() < deadline,
                "{} never meshed the {nodes} nodes\n{}",
                C::LABEL,
                logs(&contender)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((contender, sockets))
}

async fn convergence<C: Contender>() -> Result<()> {
    let (contender, sockets) = meshed::<C>(10, "vxlan").await?;
    let cluster_cidr: IpNet = testbed::CLUSTER_CIDR.parse()?;
    let nodes: Api<Node> = Api::all(contender.admin());
    let mut everywhere = Vec::new();
    let mut each = Vec::new();
    for i in 0..CONVERGENCE_SAMPLES {
        let name = format!("bench-peer-{i}");
        let slice: IpNet = format!("10.244.{}.0/24", 200 + i).parse()?;
        let node = C::peer_node(
            &name,
            slice,
            format!("172.31.1.{}", 100 + i).parse()?,
            [0x0a, 0x58, 0xbe, 0, 0, i as u8],
        );
        let created = Instant::now();
        nodes.create(&PostParams::default(), &node).await?;
        let mut pending: Vec<usize> = (0..sockets.len()).collect();
        while !pending.is_empty() {
            if created.elapsed() > PATIENCE {
                ensure_running(&contender)?;
                bail!(
                    "route to {slice} never reached every node\n{}",
                    logs(&contender)
                );
            }
            let mut still = Vec::new();
            for index in pending {
                if routed_slices(&sockets[index], cluster_cidr)
                    .await?
                    .contains(&slice)
                {
                    each.push(created.elapsed());
                } else {
                    still.push(index);
                }
            }
            pending = still;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        everywhere.push(created.elapsed());
        nodes.delete(&name, &DeleteParams::default()).await?;
        for socket in &sockets {
            while routed_slices(socket, cluster_cidr).await?.contains(&slice) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    println!(
        "convergence, {} (10 agents, {CONVERGENCE_SAMPLES} Node creations): route on every agent p50 {} p99 {}; on one agent p50 {} p99 {}",
        C::LABEL,
        ms(percentile(&everywhere, 50.0)),
        ms(percentile(&everywhere, 99.0)),
        ms(percentile(&each, 50.0)),
        ms(percentile(&each, 99.0)),
    );
    contender.stop().await
}

async fn scale<C: Contender>(peers: usize) -> Result<()> {
    const CLUSTER_CIDR: &str = "10.0.0.0/8";
    let mut contender = C::start(1, "vxlan", CLUSTER_CIDR).await?;
    let node = contender.cluster().nodes()[0].clone();
    // The node's own slice is set before the clock starts.
    contender
        .assign_slice(&node, "10.255.255.0/24".parse()?)
        .await?;
    let nodes: Api<Node> = Api::all(contender.admin());

    let creating = Instant::now();
    let results: Vec<Result<Node, kube::Error>> = futures::stream::iter(0..peers)
        .map(|i| {
            let nodes = nodes.clone();
            async move {
                let slice: IpNet = format!("10.{}.{}.0/24", i / 256, i % 256)
                    .parse()
                    .expect("valid slice");
                let public_ip: IpAddr = format!("100.64.{}.{}", i / 256, i % 256)
                    .parse()
                    .expect("valid address");
                let node = C::peer_node(
                    &format!("peer-{i}"),
                    slice,
                    public_ip,
                    [0x0a, 0x58, 0, 0, (i >> 8) as u8, i as u8],
                );
                nodes.create(&PostParams::default(), &node).await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for result in results {
        result.context("creating a peer Node")?;
    }
    let creation = creating.elapsed();

    let netlink = node_netlink(&node).await?;
    let cluster_cidr: IpNet = CLUSTER_CIDR.parse()?;
    let started = Instant::now();
    contender.start_agent(&node)?;
    while routed_slices(&netlink, cluster_cidr).await?.len() < peers {
        if started.elapsed() > PATIENCE {
            bail!(
                "{peers} routes not programmed after {PATIENCE:?}\n{}",
                logs(&contender)
            );
        }
        ensure_running(&contender)?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let programmed_wall = SystemTime::now();
    let programmed = started.elapsed();
    let agent = contender.agents()[0];
    let cache_ready = C::cache_ready_at(&agent.log()).with_context(|| {
        format!(
            "{} logged no 'node cache complete' line\n{}",
            C::LABEL,
            logs(&contender)
        )
    })?;
    let after_cache = programmed_wall
        .duration_since(cache_ready)
        .unwrap_or_default();
    let rss = status_kib(agent.pid(), "VmRSS:")?;
    let hwm = status_kib(agent.pid(), "VmHWM:")?;
    println!(
        "scale, {} ({peers} peers): Node objects created in {:.1} s; agent start -> all routes {}; cache ready -> all routes {}; agent RSS {:.1} MiB (peak {:.1} MiB)",
        C::LABEL,
        creation.as_secs_f64(),
        ms(programmed),
        ms(after_cache),
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
    );
    contender.stop().await
}

/// One contender's two nodes running a backend, a pod on each made under
/// it (so with the MTU that backend gives pods), and the throughput of
/// each path between the nodes.
struct Lane<C: Contender> {
    contender: C,
    nodes: Vec<ClusterNode>,
    pods: Vec<Pod>,
    pod1_ip: IpAddr,
    underlay: Vec<f64>,
    pod_to_pod: Vec<f64>,
}

impl<C: Contender> Lane<C> {
    async fn start(backend: &'static str) -> Result<Self> {
        let (contender, _) = meshed::<C>(2, backend).await?;
        let nodes = contender.cluster().nodes().to_vec();
        let pods = nodes
            .iter()
            .map(|node| contender.add_pod(node))
            .collect::<Result<Vec<_>>>()?;
        let pod1_ip = pods[1].ip().context("pod without address")?;
        Ok(Lane {
            contender,
            nodes,
            pods,
            pod1_ip,
            underlay: Vec::new(),
            pod_to_pod: Vec::new(),
        })
    }

    fn measure_underlay(&mut self) -> Result<()> {
        let (server, client) = (&self.nodes[1], &self.nodes[0]);
        let rate = iperf(
            server.command("iperf3"),
            || client.command("iperf3"),
            IpAddr::V4(server.underlay_ip()),
        )?;
        self.underlay.push(rate);
        Ok(())
    }

    fn measure_pod_to_pod(&mut self) -> Result<()> {
        let (server, client) = (&self.pods[1], &self.pods[0]);
        let rate = iperf(
            server.command("iperf3"),
            || client.command("iperf3"),
            self.pod1_ip,
        )?;
        self.pod_to_pod.push(rate);
        Ok(())
    }

    /// Each round's pod-to-pod / underlay ratio: the two runs of a round
    /// share the machine's load of that moment.
    fn ratios(&self) -> Vec<f64> {
        ratios(&self.pod_to_pod, &self.underlay)
    }

    /// "P Gbit/s vs underlay U Gbit/s = R x (rounds lo-hi)", medians.
    fn summary(&self) -> String {
        format!(
            "{} vs underlay {} = {}",
            gbit(median(&self.pod_to_pod)),
            gbit(median(&self.underlay)),
            spread(&self.ratios()),
        )
    }
}

/// `numerators[i] / denominators[i]` for every round.
fn ratios(numerators: &[f64], denominators: &[f64]) -> Vec<f64> {
    numerators
        .iter()
        .zip(denominators)
        .map(|(n, d)| n / d)
        .collect()
}

/// "M.MMx (rounds lo-hi)": the median of `ratios` and their range.
fn spread(ratios: &[f64]) -> String {
    let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.2}x (rounds {lowest:.2}-{highest:.2})", median(ratios))
}

/// Weft and flannel on `backend`, each on a two-node cluster of its own,
/// both up at once and measured in the same rounds: each round runs both
/// contenders' pod-to-pod paths back to back and both underlays, the
/// order turning from round to round, so that a swing of the shared
/// machine's load lands on both. Printed: each contender's pod-to-pod
/// throughput as a share of its own underlay, and weft's pod-to-pod
/// throughput over flannel's within each round (the head-to-head).
async fn dataplane(backend: &'static str) -> Result<()> {
    let mut weft = Lane::<Weft>::start(backend).await?;
    let mut flannel = Lane::<Flannel>::start(backend).await?;
    for round in 0..DATAPLANE_ROUNDS {
        if round % 2 == 0 {
            weft.measure_pod_to_pod()?;
            flannel.measure_pod_to_pod()?;
            weft.measure_underlay()?;
            flannel.measure_underlay()?;
        } else {
            flannel.measure_pod_to_pod()?;
            weft.measure_pod_to_pod()?;
            flannel.measure_underlay()?;
            weft.measure_underlay()?;
        }
    }
    let head_to_head = ratios(&weft.pod_to_pod, &flannel.pod_to_pod);
    println!(
        "dataplane {backend} (pod-to-pod TCP, iperf3 {IPERF_SECONDS} s, medians of {DATAPLANE_ROUNDS} rounds measuring both at once)"
    );
    println!("  {} ({}): {}", Weft::LABEL, Weft::FEATURES, weft.summary());
    println!(
        "  {} ({}): {}",
        Flannel::LABEL,
        Flannel::FEATURES,
        flannel.summary()
    );
    println!(
        "  {} / {} pod-to-pod, same round: {}",
        Weft::LABEL,
        Flannel::LABEL,
        spread(&head_to_head)
    );
    weft.contender.stop().await?;
    flannel.contender.stop().await
}
