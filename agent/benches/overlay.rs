//! The agent's benchmarks, on the e2e harness (root required, release build):
//!
//! - `convergence`: 10 real agents; a Node object appears through the API;
//!   time until its route is in every agent's kernel, p50/p99.
//! - `scale`: 1,000 and 5,000 peers (Node objects created through the API
//!   before the agent starts); time from the agent's cache being ready to
//!   every route programmed, and the agent's RSS.
//! - `dataplane`: pod-to-pod TCP throughput across two nodes (iperf3) over
//!   vxlan and host-gw, each beside the same node pair's underlay throughput
//!   measured in the same run.
//!
//! `cargo bench -p weft-agent` runs all three; `cargo bench -p weft-agent --
//! scale` (or `convergence`, `dataplane`) runs one.

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;
use podnet::agent::ROUTE_PROTOCOL;
use podnet::netlink::{IpFamily, Netlink, Route, RouteProtocol};
use podnet::netns::Netns;
use serde_json::{json, Value};
use weft_e2e::ClusterNode;

#[path = "../tests/testbed/mod.rs"]
mod testbed;

use testbed::{output, Overlay, OverlaySpec, PATIENCE};

/// Samples of the convergence benchmark.
const CONVERGENCE_SAMPLES: usize = 50;
/// Seconds of each iperf3 run.
const IPERF_SECONDS: &str = "5";

fn main() -> Result<()> {
    if !testbed::is_root() {
        eprintln!("the agent benchmarks need root (network namespaces); skipped");
        return Ok(());
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if wanted("convergence") {
            convergence().await?;
        }
        if wanted("scale") {
            for peers in [1_000, 5_000] {
                scale(peers).await?;
            }
        }
        if wanted("dataplane") {
            dataplane().await?;
        }
        Ok(())
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A Node object as a running agent and the controller leave it: slice,
/// public IP, VTEP MAC.
fn peer_node(name: &str, slice: IpNet, public_ip: IpAddr, mac: [u8; 6]) -> Node {
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            annotations: Some(
                [
                    ("weft.dev/pod-cidr", slice.to_string()),
                    ("weft.dev/public-ip", public_ip.to_string()),
                    ("weft.dev/backend-type", "vxlan".to_string()),
                    (
                        "weft.dev/backend-data",
                        json!({ "vtepMAC": mac }).to_string(),
                    ),
                ]
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

/// The IPv4 destinations of Weft's routes in a node's main table.
async fn weft_destinations(netlink: &Netlink) -> Result<Vec<IpNet>> {
    Ok(netlink
        .routes(IpFamily::V4, Route::MAIN_TABLE)
        .await?
        .into_iter()
        .filter(|r| r.protocol == RouteProtocol::from(ROUTE_PROTOCOL))
        .map(|r| r.destination)
        .collect())
}

async fn node_netlink(node: &ClusterNode) -> Result<Netlink> {
    Ok(Netlink::in_netns(&Netns::open(node.netns_path())?)?)
}

async fn convergence() -> Result<()> {
    let mut overlay = Overlay::start(OverlaySpec {
        nodes: 10,
        routed_nodes: 0,
        ..OverlaySpec::default()
    })
    .await?;
    overlay.start_agents()?;
    overlay.wait_programmed(9).await?;
    let mut sockets = Vec::new();
    for node in overlay.cluster.nodes() {
        sockets.push(node_netlink(node).await?);
    }
    let nodes: Api<Node> = Api::all(overlay.admin.clone());
    let mut everywhere = Vec::new();
    let mut each = Vec::new();
    for i in 0..CONVERGENCE_SAMPLES {
        let name = format!("bench-peer-{i}");
        let slice: IpNet = format!("10.244.{}.0/24", 200 + i).parse()?;
        let node = peer_node(
            &name,
            slice,
            format!("172.31.1.{}", 100 + i).parse()?,
            [0x0a, 0x58, 0xbe, 0, 0, i as u8],
        );
        let created = Instant::now();
        nodes.create(&PostParams::default(), &node).await?;
        let mut pending: Vec<usize> = (0..sockets.len()).collect();
        while !pending.is_empty() {
            ensure!(
                created.elapsed() < PATIENCE,
                "route to {slice} never reached every node\n{}",
                overlay.logs()
            );
            let mut still = Vec::new();
            for index in pending {
                if weft_destinations(&sockets[index]).await?.contains(&slice) {
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
            while weft_destinations(socket).await?.contains(&slice) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    everywhere.sort();
    each.sort();
    println!(
        "convergence (10 agents, {CONVERGENCE_SAMPLES} Node creations): route on every agent p50 {} p99 {}; on one agent p50 {} p99 {}",
        ms(percentile(&everywhere, 50.0)),
        ms(percentile(&everywhere, 99.0)),
        ms(percentile(&each, 50.0)),
        ms(percentile(&each, 99.0)),
    );
    overlay.cluster.stop().await
}

/// The wall-clock time of the first agent log line containing `message`.
fn logged_at(log: &str, message: &str) -> Option<SystemTime> {
    let line = log.lines().find(|line| line.contains(message))?;
    let stamp = line.split_whitespace().next()?;
    let timestamp = k8s_openapi::jiff::Timestamp::from_str(stamp).ok()?;
    Some(SystemTime::from(timestamp))
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?)
}

async fn scale(peers: usize) -> Result<()> {
    let mut overlay = Overlay::start(OverlaySpec {
        nodes: 1,
        routed_nodes: 0,
        cluster_cidr: "10.0.0.0/8",
        controller: false,
        ..OverlaySpec::default()
    })
    .await?;
    let node = overlay.node(0);
    let nodes: Api<Node> = Api::all(overlay.admin.clone());
    let own = json!({ "metadata": { "annotations": { "weft.dev/pod-cidr": "10.255.255.0/24" } } });
    nodes
        .patch(&node.name, &PatchParams::default(), &Patch::Merge(&own))
        .await?;

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
                let node = peer_node(
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

    let started = Instant::now();
    overlay.start_agent(&node)?;
    let netlink = node_netlink(&node).await?;
    while weft_destinations(&netlink).await?.len() < peers {
        if started.elapsed() > PATIENCE {
            bail!(
                "{peers} routes not programmed after {PATIENCE:?}\n{}",
                overlay.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let programmed_wall = SystemTime::now();
    let programmed = started.elapsed();
    let agent = overlay.agents.get(&node.name).context("agent handle")?;
    let log = agent.log();
    let cache_ready = logged_at(&log, "node list complete")
        .context("no 'node list complete' in the agent log")?;
    let after_cache = programmed_wall
        .duration_since(cache_ready)
        .unwrap_or_default();
    let rss = status_kib(agent.pid(), "VmRSS:")?;
    let hwm = status_kib(agent.pid(), "VmHWM:")?;
    println!(
        "scale ({peers} peers): Node objects created in {:.1} s; agent start -> all routes {}; cache ready -> all routes {}; agent RSS {:.1} MiB (peak {:.1} MiB)",
        creation.as_secs_f64(),
        ms(programmed),
        ms(after_cache),
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
    );
    overlay.cluster.stop().await
}

/// Received bits per second of a TCP iperf3 run to `server_ip`, with the
/// server started by `server` and the client by `client` (both `iperf3`
/// commands in their namespaces).
fn iperf(mut server: Command, client: impl Fn() -> Command, server_ip: IpAddr) -> Result<f64> {
    let mut server = server
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 (install the iperf3 package)")?;
    // The server needs a moment to listen; retry the client until it
    // connects. iperf3 -J exits 0 even when it could not connect and puts
    // the reason in "error".
    let deadline = Instant::now() + Duration::from_secs(10);
    let received = loop {
        let mut attempt = client();
        attempt.args([
            "-c",
            &server_ip.to_string(),
            "-p",
            "5201",
            "-t",
            IPERF_SECONDS,
            "-J",
        ]);
        let report: Result<Value> =
            output(attempt).and_then(|text| Ok(serde_json::from_str(&text)?));
        let problem = match report {
            Ok(report) => match report["end"]["sum_received"]["bits_per_second"].as_f64() {
                Some(bits) => break Ok(bits),
                None => format!("iperf3 reported no throughput: {}", report["error"]),
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("iperf3 to {server_ip}: {problem}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // A one-off server exits after its test; one that never saw it must go.
    let _ = server.kill();
    let _ = server.wait();
    received
}

fn gbit(bits: f64) -> String {
    format!("{:.2} Gbit/s", bits / 1e9)
}

async fn dataplane() -> Result<()> {
    let mut overlay = Overlay::start(OverlaySpec {
        nodes: 2,
        routed_nodes: 0,
        ..OverlaySpec::default()
    })
    .await?;
    overlay.start_agents()?;
    overlay.wait_programmed(1).await?;
    let pods = overlay.add_pods()?;
    let (node0, node1) = (overlay.node(0), overlay.node(1));
    let pod1_ip = pods[1].ip().context("pod without address")?;
    let underlay = || {
        iperf(
            node1.command("iperf3"),
            || node0.command("iperf3"),
            IpAddr::V4(node1.underlay_ip()),
        )
    };
    let pod_to_pod = || {
        iperf(
            pods[1].command("iperf3"),
            || pods[0].command("iperf3"),
            pod1_ip,
        )
    };

    let underlay_vxlan = underlay()?;
    let vxlan = pod_to_pod()?;

    overlay.spec.backend = "host-gw";
    for node in [&node0, &node1] {
        overlay.restart_agent(node)?;
    }
    let deadline = Instant::now() + PATIENCE;
    while !testbed::weft_routes(&node0)?
        .values()
        .any(|via| via.ends_with("dev eth0"))
    {
        ensure!(
            Instant::now() < deadline,
            "host-gw route never appeared\n{}",
            overlay.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let underlay_host_gw = underlay()?;
    let host_gw = pod_to_pod()?;

    println!(
        "dataplane (pod-to-pod TCP, iperf3 {IPERF_SECONDS} s): vxlan {} vs underlay {} = {:.2}x; host-gw {} vs underlay {} = {:.2}x",
        gbit(vxlan),
        gbit(underlay_vxlan),
        vxlan / underlay_vxlan,
        gbit(host_gw),
        gbit(underlay_host_gw),
        host_gw / underlay_host_gw,
    );
    overlay.cluster.stop().await
}
