//! Kubernetes' own network e2e tests against Weft (`weft-e2e conformance`,
//! `make conformance`).
//!
//! A trimmed upstream `e2e.test` (`e2e/k8s/kubernetes/netsuite`: the
//! framework and the network test packages only) runs under the Ginkgo CLI,
//! several specs at a time as upstream's jobs run it, against a kubeadm-like
//! cluster of kubelet nodes ([`NODES`]) with Weft installed from
//! `manifests/`. There is no registry: the images the tests run are built
//! here (`images.rs`) and imported on every node under the references the
//! suite asks for. Which tests run is in `e2e/conformance/focus.txt` and
//! `skip.txt`, each entry with its reason; the results come from the
//! suite's JUnit report (`report.rs`).

mod images;
mod report;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use weft_testing::repository;

pub use report::{markdown, parse_junit, parse_selectors, Outcome, RunFacts, Selector, TestResult};

use crate::control_plane::{k8s_binaries, SERVICE_CLUSTER_IP_RANGE};
use crate::exec::tail;
use crate::install::{build_weft_image, install_from_manifests};
use crate::kube_proxy::CLUSTER_CIDR;
use crate::{Cluster, ClusterSpec, ProxyMode, CLUSTER_CIDR_V6, SERVICE_CLUSTER_IP_RANGE_V6};

/// The cluster's nodes, as `kubeadm init` and three `kubeadm join`s make
/// them: `node-0` is the control-plane node, tainted `NoSchedule`, so the
/// tests' pods run on the other three: two schedulable nodes at least for
/// the granular checks, three for the ExternalTrafficPolicy test.
const NODES: usize = 4;

/// The last node sits behind the router: pod traffic crosses an L3 hop.
const ROUTED_NODES: usize = 1;

/// Zones, round robin over the nodes: each schedulable node has one of its
/// own (`node-3` shares `zone-0` with the control-plane node, which
/// kube-controller-manager leaves out of its zone counts), for the Topology
/// Hints (two zones at least) and Traffic Distribution (three) tests.
const ZONES: usize = 3;

/// Specs in flight at once by default: upstream's jobs run many; the tests
/// mostly wait on pods and the network, so three keep a 2-core machine busy
/// without starving the cluster.
pub const DEFAULT_PROCESSES: usize = 3;

/// How often the suite's new output is passed on to stderr.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);

/// The Ginkgo timeout of the whole suite: well above a full run, which
/// Ginkgo's default (one hour) is too close to.
const SUITE_TIMEOUT: &str = "3h";

/// A run of the suite: which tests, on what cluster, and where its files go.
#[derive(Clone, Debug)]
pub struct SuiteRun {
    /// A test runs if its name matches one of these …
    pub focus: Vec<Selector>,
    /// … and none of these.
    pub skip: Vec<Selector>,
    /// Where the JUnit report (`junit_01.xml`) and the suite's output
    /// (`e2e.test.log`) go.
    pub output: PathBuf,
    /// A dual-stack cluster (IPv4 first, as kubeadm makes one), which runs
    /// the IPv4 tests as a single-stack one does and the
    /// `[Feature:IPv6DualStack]` ones besides. See [`SuiteRun::single_stack`].
    pub dual_stack: bool,
    /// kube-proxy's mode on every node.
    pub proxy_mode: ProxyMode,
    /// How many Ginkgo processes run specs at once; `[Serial]` specs run
    /// after the others, alone.
    pub processes: usize,
    /// Weft's image archive, already built; `None` builds it
    /// ([`build_weft_image`]).
    pub weft_image: Option<PathBuf>,
}

impl SuiteRun {
    /// The full selection, from `e2e/conformance/focus.txt` and `skip.txt`,
    /// with its files in `target/conformance/`, on a dual-stack cluster with
    /// kube-proxy in nftables mode and [`DEFAULT_PROCESSES`] processes.
    pub fn from_selection_files() -> Result<Self> {
        let read = |name: &str| -> Result<Vec<Selector>> {
            let file = selection_dir().join(name);
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            parse_selectors(&text).with_context(|| format!("in {}", file.display()))
        };
        Ok(Self {
            focus: read("focus.txt")?,
            skip: read("skip.txt")?,
            output: repository().join("target/conformance"),
            dual_stack: true,
            proxy_mode: ProxyMode::default(),
            processes: DEFAULT_PROCESSES,
            weft_image: None,
        })
    }

    /// The same run on an IPv4-only cluster, without the
    /// `[Feature:IPv6DualStack]` tests (they fail there rather than skip).
    pub fn single_stack(mut self) -> Self {
        self.dual_stack = false;
        self.skip.push(Selector {
            pattern: r"\[Feature:IPv6DualStack\]".to_owned(),
            reason: "An IPv4-only cluster (`--single-stack`): no pod, node or Service has an IPv6 address.".to_owned(),
        });
        self
    }
}

/// The directory of the selection files and the results page.
pub fn selection_dir() -> PathBuf {
    repository().join("e2e/conformance")
}

/// What a run gave.
pub struct SuiteResults {
    /// Every selected test, in the order it ran.
    pub tests: Vec<TestResult>,
    /// Where, when and how long.
    pub facts: RunFacts,
}

impl SuiteResults {
    /// The tests that failed.
    pub fn failures(&self) -> impl Iterator<Item = &TestResult> {
        self.tests.iter().filter(|t| t.outcome == Outcome::Failed)
    }
}

/// Builds what is missing (e2e.test, agnhost, CoreDNS, the Ginkgo CLI,
/// Weft's image, the test images), brings up the cluster, installs Weft,
/// runs the selected tests and tears the cluster down. Fails only if the run
/// could not be made; failed tests are in the results. The cluster goes on
/// every path (kept logs named on stderr if the run fails before the tests
/// end).
pub async fn run(suite: &SuiteRun) -> Result<SuiteResults> {
    let started = Instant::now();
    let date = weft_testing::run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?
        .trim()
        .to_owned();
    let binaries =
        k8s_binaries(&["e2e.test", "agnhost", "coredns", "regression-issue-74839"]).await?;
    let e2e_test = binaries.join("e2e.test");
    let ginkgo = ginkgo_cli(&binaries).await?;
    let kubernetes = weft_testing::run(Command::new(&e2e_test).arg("--version"))?
        .trim()
        .to_owned();
    let ginkgo_version = weft_testing::run(Command::new(&ginkgo).arg("version"))?
        .trim()
        .to_owned();
    std::fs::create_dir_all(&suite.output)
        .with_context(|| format!("creating {}", suite.output.display()))?;

    let image_build = Instant::now();
    let mut archives = vec![match &suite.weft_image {
        Some(archive) => archive.clone(),
        None => build_weft_image()?,
    }];
    // Removed once every node has imported them.
    let image_dir = tempfile::Builder::new()
        .prefix("images.")
        .tempdir_in(&suite.output)
        .context("creating a directory for the test images")?;
    archives.extend(images::build(
        image_dir.path(),
        &images::ImageBinaries {
            agnhost: &binaries.join("agnhost"),
            coredns: &binaries.join("coredns"),
            regression_server: &binaries.join("regression-issue-74839"),
        },
        &network_images(&e2e_test)?,
    )?);
    tracing::info!(seconds = image_build.elapsed().as_secs(), "images built");

    let cluster = Cluster::start(ClusterSpec {
        routed_nodes: ROUTED_NODES,
        zones: ZONES,
        control_plane_taint: true,
        dual_stack: suite.dual_stack,
        proxy_mode: suite.proxy_mode,
        ..ClusterSpec::kubelet_nodes(NODES, archives)
    })
    .await?;
    drop(image_dir);
    install_from_manifests(&cluster).await?;
    tracing::info!(
        seconds = started.elapsed().as_secs(),
        "Weft installed, running the suite"
    );

    let suite_started = Instant::now();
    let tests = run_suite(&cluster, &ginkgo, &e2e_test, suite).await?;
    let suite_duration = suite_started.elapsed();
    let spec = cluster.spec().clone();
    cluster.stop().await?;
    Ok(SuiteResults {
        tests,
        facts: RunFacts {
            date,
            kubernetes,
            machine: machine()?,
            cluster: describe_cluster(&spec),
            runner: format!(
                "{ginkgo_version}, {} processes; `[Serial]` tests after the others, one at a time",
                suite.processes
            ),
            duration: started.elapsed(),
            suite_duration,
        },
    })
}

/// The cluster in a line of the results page.
fn describe_cluster(spec: &ClusterSpec) -> String {
    let addressing = match spec.dual_stack {
        true => format!(
            "dual-stack, IPv4 first (pods {CLUSTER_CIDR} and {CLUSTER_CIDR_V6}, Services \
             {SERVICE_CLUSTER_IP_RANGE} and {SERVICE_CLUSTER_IP_RANGE_V6})"
        ),
        false => format!("IPv4 only (pods {CLUSTER_CIDR}, Services {SERVICE_CLUSTER_IP_RANGE})"),
    };
    format!(
        "{} kubelet nodes ({} behind a router) in {} zones, node-0 the control-plane node{}; \
         {addressing}; containerd, kube-proxy in {} mode, the harness's CoreDNS, Weft from \
         manifests/",
        spec.nodes,
        spec.routed_nodes,
        spec.zones,
        match spec.control_plane_taint {
            true => ", tainted `node-role.kubernetes.io/control-plane:NoSchedule` as kubeadm does",
            false => " (untainted)",
        },
        spec.proxy_mode.as_str()
    )
}

/// The nodes test pods may run on: all but a tainted control-plane node.
fn schedulable_nodes(spec: &ClusterSpec) -> usize {
    spec.nodes - usize::from(spec.control_plane_taint && spec.nodes > 0)
}

/// `go-build-cached`'s LDFLAGS argument (one argument, passed on to
/// `-ldflags`): no symbol table or DWARF, as the cache's other binaries.
const STRIPPED: &str = "-s -w";

/// The Ginkgo CLI of the version the suite is built with (`e2e/k8s/
/// kubernetes/go.mod`), which runs specs in parallel processes, built once
/// beside the suite (`scripts/go-build-cached`, through the Go module proxy;
/// seconds).
async fn ginkgo_cli(binaries: &Path) -> Result<PathBuf> {
    let ginkgo = binaries.join("ginkgo");
    let mut build = Command::new(repository().join("scripts/go-build-cached"));
    build
        .arg(repository().join("e2e/k8s/kubernetes"))
        .arg("github.com/onsi/ginkgo/v2/ginkgo")
        .arg(&ginkgo)
        .arg(STRIPPED);
    tokio::task::spawn_blocking(move || weft_testing::run(&mut build))
        .await
        .context("the Ginkgo CLI build task")?
        .context("building the Ginkgo CLI")?;
    Ok(ginkgo)
}

/// Runs e2e.test under the Ginkgo CLI against `cluster`, its output
/// followed on stderr and kept in the output directory, and reads its
/// JUnit report (the suite writes one for all processes).
async fn run_suite(
    cluster: &Cluster,
    ginkgo: &Path,
    e2e_test: &Path,
    suite: &SuiteRun,
) -> Result<Vec<TestResult>> {
    let junit = suite.output.join("junit_01.xml");
    if junit.exists() {
        std::fs::remove_file(&junit)
            .with_context(|| format!("removing the old {}", junit.display()))?;
    }
    let mut command = Command::new(ginkgo);
    command
        .arg(format!("--procs={}", suite.processes.max(1)))
        .arg(format!("--timeout={SUITE_TIMEOUT}"))
        .arg("--no-color")
        // Not one `S` for each of the hundreds of specs left out.
        .arg("--silence-skips");
    for selector in &suite.focus {
        command.arg(format!("--focus={}", selector.pattern));
    }
    for selector in &suite.skip {
        command.arg(format!("--skip={}", selector.pattern));
    }
    command
        .arg(e2e_test)
        .arg("--")
        .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
        // No cloud: the tests that need one skip themselves.
        .arg("--provider=local")
        // The schedulable nodes. The suite counts them itself only in the
        // first Ginkgo process, so every other one would skip the tests
        // that need two ("Requires at least 2 nodes (not -1)"); upstream's
        // jobs pass it too.
        .arg(format!("--num-nodes={}", schedulable_nodes(cluster.spec())))
        .arg(format!("--report-dir={}", suite.output.display()));
    // A cluster process: killed with the cluster if this run is stopped.
    let process = cluster.spawn_host("e2e.test", command)?;
    let mut shown = 0;
    loop {
        let running = process.is_running();
        let log = process.log();
        eprint!("{}", log.get(shown..).unwrap_or_default());
        shown = log.len();
        if !running {
            break;
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
    }
    let log_copy = suite.output.join("e2e.test.log");
    std::fs::copy(process.log_path(), &log_copy)
        .with_context(|| format!("keeping the suite's output in {}", log_copy.display()))?;
    let report = std::fs::read_to_string(&junit).with_context(|| {
        format!(
            "reading {}: e2e.test ended ({:?}) without a report; the end of its output:\n{}",
            junit.display(),
            process.exit_status(),
            tail(&process.log(), 30)
        )
    })?;
    parse_junit(&report)
}

/// The images the suite's network tests run, as `(name, reference)`
/// (`e2e.test --network-images`).
fn network_images(e2e_test: &Path) -> Result<Vec<(String, String)>> {
    weft_testing::run(Command::new(e2e_test).arg("--network-images"))?
        .lines()
        .map(|line| {
            let (name, reference) = line.split_once(' ').with_context(|| {
                format!("unexpected line from e2e.test --network-images: {line:?}")
            })?;
            Ok((name.to_owned(), reference.to_owned()))
        })
        .collect()
}

/// This machine, for the results page: OS, kernel, CPU, cores, memory.
fn machine() -> Result<String> {
    let read =
        |file: &str| std::fs::read_to_string(file).with_context(|| format!("reading {file}"));
    let field = |text: &str, key: &str| {
        text.lines()
            .find_map(|line| {
                let (name, value) = line.split_once([':', '='])?;
                (name.trim() == key).then(|| value.trim().trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned())
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    Ok(format!(
        "{}, kernel {}, {} ({cores} cores), {} memory",
        field(&read("/etc/os-release")?, "PRETTY_NAME"),
        read("/proc/sys/kernel/osrelease")?.trim(),
        field(&read("/proc/cpuinfo")?, "model name"),
        field(&read("/proc/meminfo")?, "MemTotal"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_stack_runs_leave_out_the_dual_stack_tests_with_a_reason() {
        let suite = SuiteRun::from_selection_files().unwrap();
        assert!(suite.dual_stack);
        assert!(
            suite
                .focus
                .iter()
                .any(|s| s.pattern.contains("Feature:IPv6DualStack")),
            "{:?}",
            suite.focus
        );
        let single = suite.clone().single_stack();
        assert!(!single.dual_stack);
        assert_eq!(single.skip.len(), suite.skip.len() + 1);
        let added = single.skip.last().unwrap();
        assert!(
            added.pattern.contains("Feature:IPv6DualStack") && !added.reason.is_empty(),
            "{added:?}"
        );
    }

    #[test]
    fn the_results_page_names_the_cluster_shape() {
        let spec = ClusterSpec {
            routed_nodes: ROUTED_NODES,
            zones: ZONES,
            control_plane_taint: true,
            dual_stack: true,
            ..ClusterSpec::kubelet_nodes(NODES, Vec::new())
        };
        assert_eq!(schedulable_nodes(&spec), 3);
        let line = describe_cluster(&spec);
        for fact in [
            "4 kubelet nodes (1 behind a router)",
            "control-plane:NoSchedule",
            "3 zones",
            "dual-stack, IPv4 first",
            "fd00:10:244::/56",
            "nftables mode",
        ] {
            assert!(line.contains(fact), "{fact:?} missing from {line:?}");
        }
        let single = describe_cluster(&ClusterSpec {
            dual_stack: false,
            ..spec
        });
        assert!(single.contains("IPv4 only"), "{single}");
    }
}
