//! Kubernetes' own network e2e tests against Weft (`weft-e2e conformance`,
//! `make conformance`).
//!
//! A trimmed upstream `e2e.test` (`e2e/k8s/kubernetes/netsuite`: the
//! framework and the network test packages only) runs against three kubelet
//! nodes, one behind a router, with Weft installed from `manifests/`. There
//! is no registry: the images the tests run are built here
//! (`images.rs`) and imported on every node under the references the suite
//! asks for. Which tests run is in `e2e/conformance/focus.txt` and
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

use crate::control_plane::k8s_binaries;
use crate::exec::tail;
use crate::install::{build_weft_image, install_from_manifests};
use crate::{Cluster, ClusterSpec};

/// Three nodes: a pod's peers on its own node and on others, as the
/// granular checks want (they need two schedulable nodes at least).
const NODES: usize = 3;

/// How often the suite's new output is passed on to stderr.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);

/// The Ginkgo timeout of the whole suite; the full selection takes well
/// under an hour here, but Ginkgo's default (one hour) is too close.
const SUITE_TIMEOUT: &str = "3h";

/// A run of the suite: which tests, and where its files go.
#[derive(Clone, Debug)]
pub struct SuiteRun {
    /// A test runs if its name matches one of these …
    pub focus: Vec<Selector>,
    /// … and none of these.
    pub skip: Vec<Selector>,
    /// Where the JUnit report (`junit_01.xml`) and the suite's output
    /// (`e2e.test.log`) go.
    pub output: PathBuf,
}

impl SuiteRun {
    /// The full selection, from `e2e/conformance/focus.txt` and `skip.txt`,
    /// with its files in `target/conformance/`.
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
        })
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

/// Builds what is missing (e2e.test, agnhost, CoreDNS, Weft's image, the
/// test images), brings up the cluster, installs Weft, runs the selected tests
/// and tears the cluster down. Fails only if the run could not be made;
/// failed tests are in the results. The cluster goes on every path (kept
/// logs named on stderr if the run fails before the tests end).
pub async fn run(suite: &SuiteRun) -> Result<SuiteResults> {
    let started = Instant::now();
    let date = weft_testing::run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?
        .trim()
        .to_owned();
    let binaries =
        k8s_binaries(&["e2e.test", "agnhost", "coredns", "regression-issue-74839"]).await?;
    let e2e_test = binaries.join("e2e.test");
    let kubernetes = weft_testing::run(Command::new(&e2e_test).arg("--version"))?
        .trim()
        .to_owned();
    std::fs::create_dir_all(&suite.output)
        .with_context(|| format!("creating {}", suite.output.display()))?;

    let image_build = Instant::now();
    let mut archives = vec![build_weft_image()?];
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
        routed_nodes: 1,
        // A zone each: the most zones three nodes give, for the Topology
        // Hints (two at least) and Traffic Distribution (three) tests.
        zones: NODES,
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
    let tests = run_suite(&cluster, &e2e_test, suite).await?;
    let suite_duration = suite_started.elapsed();
    let spec = cluster.spec().clone();
    cluster.stop().await?;
    Ok(SuiteResults {
        tests,
        facts: RunFacts {
            date,
            kubernetes,
            machine: machine()?,
            cluster: format!(
                "{} kubelet nodes ({} behind a router) in {} zones, containerd, kube-proxy in {} mode, \
                 the harness's CoreDNS, Weft from manifests/",
                spec.nodes,
                spec.routed_nodes,
                spec.zones,
                spec.proxy_mode.as_str()
            ),
            duration: started.elapsed(),
            suite_duration,
        },
    })
}

/// Runs e2e.test against `cluster`, its output followed on stderr and kept
/// in the output directory, and reads its JUnit report.
async fn run_suite(
    cluster: &Cluster,
    e2e_test: &Path,
    suite: &SuiteRun,
) -> Result<Vec<TestResult>> {
    let junit = suite.output.join("junit_01.xml");
    if junit.exists() {
        std::fs::remove_file(&junit)
            .with_context(|| format!("removing the old {}", junit.display()))?;
    }
    let mut command = Command::new(e2e_test);
    command
        .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
        // No cloud: the tests that need one skip themselves.
        .arg("--provider=local")
        .arg(format!("--report-dir={}", suite.output.display()))
        .arg(format!("--ginkgo.timeout={SUITE_TIMEOUT}"))
        .arg("--ginkgo.no-color")
        // Not one `S` for each of the hundreds of specs left out.
        .arg("--ginkgo.silence-skips");
    for selector in &suite.focus {
        command.arg(format!("--ginkgo.focus={}", selector.pattern));
    }
    for selector in &suite.skip {
        command.arg(format!("--ginkgo.skip={}", selector.pattern));
    }
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
