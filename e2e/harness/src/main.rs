//! `weft-e2e`: bring a test cluster up in the foreground, tear it down,
//! clean up after crashed runs, or run Kubernetes' network e2e tests
//! against Weft.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use weft_e2e::conformance::{self, markdown, selection_dir, Selector, SuiteRun};
use weft_e2e::{cleanup_leftovers, stop_held_clusters, Cluster, ClusterSpec, NodeKind, ProxyMode};

#[derive(Parser)]
#[command(
    version,
    about = "A real kube-apiserver + etcd and network-namespace nodes for Weft (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Bring up a cluster, print its kubeconfig path on stdout, and keep it
    /// up until Ctrl-C, SIGTERM or `weft-e2e down`; then tear it down.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How many of the nodes sit on the second underlay subnet, behind a router.
        #[arg(long, default_value_t = 0)]
        routed: usize,
        /// MTU of the underlay links.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Do not create Node objects (for trying out the controller's own registration flow).
        #[arg(long)]
        no_register: bool,
        /// Run containerd and a kubelet on every node (which then registers
        /// itself), plus kube-controller-manager and kube-scheduler.
        #[arg(long, conflicts_with = "no_register")]
        kubelet: bool,
        /// An image archive (OCI or docker) to import on every kubelet node;
        /// repeatable.
        #[arg(long = "image", value_name = "ARCHIVE", requires = "kubelet")]
        images: Vec<PathBuf>,
        /// kube-proxy's mode on kubelet nodes.
        #[arg(long, value_enum, default_value_t = ProxyMode::Nftables, requires = "kubelet")]
        proxy_mode: ProxyMode,
        /// Spread the kubelet nodes over this many zones
        /// (`topology.kubernetes.io/zone=zone-<i mod N>`); 0: no zone labels.
        #[arg(long, default_value_t = 0, requires = "kubelet")]
        zones: usize,
        /// Dual-stack, IPv4 first: IPv6 on the underlay and the nodes, and
        /// with --kubelet a dual Service range, kubelets with an IPv4 and an
        /// IPv6 node IP and kube-proxy with both pod networks, as a kubeadm
        /// dual-stack cluster (Weft still to be installed with clusterCidrV6).
        #[arg(long)]
        dual_stack: bool,
        /// Register the first kubelet node with the control-plane taint
        /// (`node-role.kubernetes.io/control-plane:NoSchedule`), as kubeadm
        /// does: only pods that tolerate it run there.
        #[arg(long, requires = "kubelet")]
        control_plane_taint: bool,
        /// Return once the cluster is up, leaving it running in the background
        /// until `weft-e2e down`; its messages go to the file named on stderr.
        #[arg(long)]
        detach: bool,
    },
    /// Tear down every cluster held by a running `weft-e2e up`.
    Down,
    /// Remove namespaces, processes and run directories left by crashed runs.
    Cleanup,
    /// Run Kubernetes' own network e2e tests (e2e/conformance/focus.txt
    /// less skip.txt) against Weft on a kubeadm-like dual-stack cluster of
    /// four kubelet nodes, building what is missing; print the results table
    /// and write it to e2e/conformance/RESULTS.md. Fails if a test failed.
    Conformance {
        /// Run only the tests matching this regular expression (repeatable)
        /// instead of focus.txt; the table then goes to
        /// target/conformance/RESULTS.md.
        #[arg(long = "focus", value_name = "REGEX")]
        focus: Vec<String>,
        /// kube-proxy's mode on the nodes.
        #[arg(long, value_enum, default_value_t = ProxyMode::Nftables)]
        proxy_mode: ProxyMode,
        /// An IPv4-only cluster, without the [Feature:IPv6DualStack] tests.
        #[arg(long)]
        single_stack: bool,
        /// How many tests run at once (Ginkgo processes); [Serial] ones run
        /// alone after the rest.
        #[arg(long, default_value_t = conformance::DEFAULT_PROCESSES as u16,
              value_parser = clap::value_parser!(u16).range(1..))]
        procs: u16,
        /// Weft's image archive, already built (e.g. target/image/weft.oci.tar),
        /// instead of building it with packaging/build-image.sh.
        #[arg(long, value_name = "ARCHIVE")]
        weft_image: Option<PathBuf>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Action::Up { detach: true, .. } => detach(),
        Action::Up {
            nodes,
            routed,
            mtu,
            no_register,
            kubelet,
            images,
            proxy_mode,
            zones,
            dual_stack,
            control_plane_taint,
            detach: false,
        } => {
            up(ClusterSpec {
                nodes,
                routed_nodes: routed,
                underlay_mtu: mtu,
                register_nodes: !no_register && !kubelet,
                node_kind: match kubelet {
                    true => NodeKind::Kubelet,
                    false => NodeKind::Namespace,
                },
                images,
                proxy_mode,
                zones,
                dual_stack,
                control_plane_taint,
            })
            .await
        }
        Action::Down => {
            let stopped = stop_held_clusters()?;
            eprintln!("stopped {} cluster(s) {stopped:?}", stopped.len());
            Ok(())
        }
        Action::Cleanup => cleanup_leftovers(),
        Action::Conformance {
            focus,
            proxy_mode,
            single_stack,
            procs,
            weft_image,
        } => {
            let mut suite = SuiteRun::from_selection_files()?;
            if single_stack {
                suite = suite.single_stack();
            }
            suite.proxy_mode = proxy_mode;
            suite.processes = procs.into();
            suite.weft_image = weft_image;
            run_conformance(suite, focus).await
        }
    }
}

/// Runs this same `up` command without `--detach` as a background process
/// in its own process group (so the terminal's Ctrl-C does not reach it),
/// and returns once it prints the kubeconfig path.
fn detach() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    let log = std::env::temp_dir().join(format!("weft-e2e-up.{}.log", std::process::id()));
    let mut child =
        std::process::Command::new(std::env::current_exe().context("locating weft-e2e")?)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?)
            .process_group(0)
            .spawn()
            .context("starting weft-e2e up in the background")?;
    let mut kubeconfig = String::new();
    BufReader::new(child.stdout.take().context("stdout of weft-e2e up")?)
        .read_line(&mut kubeconfig)
        .context("reading the kubeconfig path")?;
    if kubeconfig.trim().is_empty() {
        let status = child.wait()?;
        bail!("weft-e2e up failed ({status}); see {}", log.display());
    }
    eprintln!(
        "cluster up (pid {}); messages in {}; `weft-e2e down` tears it down",
        child.id(),
        log.display()
    );
    println!("{}", kubeconfig.trim());
    Ok(())
}

async fn up(spec: ClusterSpec) -> Result<()> {
    // Installed before the (possibly long) start, so a Ctrl-C during it
    // still unwinds through the cluster's teardown instead of killing us.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let started = std::time::Instant::now();
    let cluster = tokio::select! {
        cluster = Cluster::start(spec) => cluster?,
        _ = terminate.recv() => return Ok(()),
        _ = interrupt.recv() => return Ok(()),
    };
    cluster.mark_held_by_cli()?;
    eprintln!(
        "cluster {} up in {:.1} s",
        cluster.run_id(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("run directory (logs): {}", cluster.run_dir().display());
    // An IPv6 address, if any, after the IPv4 one.
    let v6 = |address: Option<ipnet::Ipv6Net>| {
        address.map(|a| format!(", IPv6 {a}")).unwrap_or_default()
    };
    for node in cluster.nodes() {
        eprintln!(
            "  {:<8} {:<16} {:?} segment, netns {}{}",
            node.name,
            node.underlay_address,
            node.segment,
            node.netns,
            v6(node.underlay_address_v6)
        );
    }
    eprintln!(
        "  outside  {:<16} netns {}{}",
        cluster.outside().address,
        cluster.outside().netns,
        v6(cluster.outside().address_v6)
    );
    eprintln!(
        "try: kubectl --kubeconfig {} get nodes -o wide",
        cluster.kubeconfig().display()
    );
    eprintln!("Ctrl-C or `weft-e2e down` tears it down");
    // stdout carries only the path, for scripts.
    println!("{}", cluster.kubeconfig().display());
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    eprintln!("tearing down");
    cluster.stop().await
}

async fn run_conformance(mut suite: SuiteRun, focus: Vec<String>) -> Result<()> {
    let page = if focus.is_empty() {
        selection_dir().join("RESULTS.md")
    } else {
        suite.focus = focus
            .into_iter()
            .map(|pattern| Selector {
                pattern,
                reason: "given with --focus".to_owned(),
            })
            .collect();
        suite.output.join("RESULTS.md")
    };
    // On a signal the run is dropped, and the cluster with it.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let results = tokio::select! {
        results = conformance::run(&suite) => results?,
        _ = terminate.recv() => bail!("stopped by SIGTERM"),
        _ = interrupt.recv() => bail!("stopped by Ctrl-C"),
    };
    let text = markdown(&results.facts, &results.tests, &suite.focus, &suite.skip);
    std::fs::write(&page, &text).with_context(|| format!("writing {}", page.display()))?;
    println!("{text}");
    let failed = results.failures().count();
    ensure!(
        failed == 0,
        "{failed} of {} tests failed; see {} and the suite's output in {}",
        results.tests.len(),
        page.display(),
        suite.output.join("e2e.test.log").display()
    );
    eprintln!(
        "all {} tests passed or skipped themselves; table in {}",
        results.tests.len(),
        page.display()
    );
    Ok(())
}
