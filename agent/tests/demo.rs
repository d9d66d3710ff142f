//! The README's cluster demo on namespace nodes: a real kube-apiserver, the
//! controller, an agent per node (vxlan, one node behind a router), a pod on
//! every node made by the real `weft` plugin, a cross-node ping, and each
//! node's slice as `kubectl get nodes` shows it. Everything is torn down at
//! the end, on failure too (the harness's `Drop`).

mod testbed;

use std::process::Command;

use anyhow::{Context, Result};
use testbed::{ping_all, Overlay, OverlaySpec};

fn step(what: &str) {
    println!("\n\x1b[1m== {what}\x1b[0m");
}

fn show(mut command: Command) -> Result<()> {
    print!("{}", weft_testing::run(&mut command)?);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    anyhow::ensure!(
        weft_testing::root_available("the demo makes network namespaces"),
        "the demo makes network namespaces: run it as root"
    );
    step("control plane (kube-apiserver + etcd), 3 namespace nodes, the controller");
    let mut overlay = Overlay::start(OverlaySpec::default()).await?;
    let kubeconfig = overlay.cluster.kubeconfig().to_owned();
    let kubectl = |args: &[&str]| {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(&kubeconfig).args(args);
        command
    };
    step("an agent per node (vxlan; node-2 sits behind a router)");
    overlay.start_agents()?;
    let peers = overlay.spec.nodes - 1;
    overlay.wait_programmed(peers).await?;
    show(kubectl(&[
        "get",
        "nodes",
        "-o",
        r"custom-columns=NAME:.metadata.name,INTERNAL-IP:.status.addresses[0].address,POD-CIDR:.metadata.annotations.weft\.dev/pod-cidr,BACKEND:.metadata.annotations.weft\.dev/backend-type",
    ]))?;

    let first = overlay.node(0);
    step(&format!(
        "{}'s overlay: weft.1, routes, neighbours, FDB",
        first.name
    ));
    for args in [
        &["-d", "link", "show", "weft.1"][..],
        &["route", "show", "proto", "87"],
        &["neigh", "show", "dev", "weft.1"],
    ] {
        let mut ip = first.command("ip");
        ip.args(args);
        show(ip)?;
    }
    let mut fdb = first.command("bridge");
    fdb.args(["fdb", "show", "dev", "weft.1"]);
    show(fdb)?;

    step("a pod on every node, made by the weft CNI plugin");
    let pods = overlay.add_pods()?;
    for pod in &pods {
        println!(
            "{:<24} {}",
            pod.netns,
            pod.ip().context("pod without an address")?
        );
    }
    step("every pod pings every other pod across nodes");
    ping_all(&pods, &overlay)?;
    let (from, to) = (&pods[0], &pods[pods.len() - 1]);
    let mut ping = from.command("ping");
    ping.args(["-c", "3", "-W", "2"])
        .arg(to.ip().context("pod without an address")?.to_string());
    show(ping)?;

    step("tearing down");
    for pod in pods {
        pod.delete()?;
    }
    overlay.cluster.stop().await?;
    println!("demo: done, nothing left behind");
    Ok(())
}
