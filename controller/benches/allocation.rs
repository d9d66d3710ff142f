//! How fast `weft-controller` hands out slices to Node objects created in
//! bulk against a real kube-apiserver, and how much memory it needs, beside
//! Kubernetes' own node IPAM (kube-controller-manager's
//! node-ipam-controller, RangeAllocator) measured in the same run.
//!
//! `cargo bench -p weft-controller` (root; release build). For 1,000 and
//! 5,000 nodes and each contender, on a fresh control plane (so no contender
//! sees another's nodes): the allocator starts and is waited on until it is
//! ready; nodes are created 64 at a time; the clock runs from the first
//! create until every node carries its slice (weft: the `weft.dev/pod-cidr`
//! annotation; kube-controller-manager: `spec.podCIDR`); then the
//! allocator's peak and current RSS (VmHWM/VmRSS). For weft also the time a
//! restarted controller needs to rebuild and confirm every slice.
//! kube-controller-manager runs twice: with its client's default rate limit
//! (20 requests/s, burst 30), as a stock cluster has it, and with the limit
//! raised out of the way, since weft's client has none.
//!
//! Arguments select runs: numbers pick sizes (`5000`), words pick
//! contenders by key (`weft`, `kcm`, `kcm-unthrottled`).
//! Goals for weft: 5,000 nodes in under 60 s, RSS under 50 MiB.

#[path = "../tests/testbed/mod.rs"]
mod testbed;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kube::api::ListParams;
use testbed::{logs, Replica, Testbed};
use weft_e2e::ProcessHandle;
use weft_testing::measure::status_kib;
use weft_testing::{eventually, printed_path, root_available};

const IN_FLIGHT: usize = 64;
const SIZES: [usize; 2] = [1_000, 5_000];
const PATIENCE: Duration = Duration::from_secs(900);
const CLUSTER_CIDR: &str = "10.0.0.0/8";
const SLICE_PREFIX: u8 = 24;
const CONTENDERS: [Contender; 3] = [
    Contender::Weft,
    Contender::NodeIpam,
    Contender::NodeIpamUnthrottled,
];

/// Who hands out the slices.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    Weft,
    /// kube-controller-manager's node-ipam-controller at its default client
    /// rate limit.
    NodeIpam,
    /// The same with the client rate limit far above what it can use.
    NodeIpamUnthrottled,
}

impl Contender {
    /// The word that selects it on the command line.
    fn key(self) -> &'static str {
        match self {
            Contender::Weft => "weft",
            Contender::NodeIpam => "kcm",
            Contender::NodeIpamUnthrottled => "kcm-unthrottled",
        }
    }

    /// Its name in the table.
    fn label(self) -> &'static str {
        match self {
            Contender::Weft => "weft-controller",
            Contender::NodeIpam => "kcm node-ipam (qps 20)",
            Contender::NodeIpamUnthrottled => "kcm node-ipam (qps 5000)",
        }
    }
}

/// What one run measured.
struct Figures {
    created: Duration,
    allocated: Duration,
    peak_kib: u64,
    current_kib: u64,
    /// Restart to every slice confirmed again, and the restarted process's
    /// VmHWM (weft only).
    rebuilt: Option<(Duration, u64)>,
}

/// The allocator process under test, stopped when dropped so that it goes on
/// every way out of a run, errors and panics included.
struct Allocator(ProcessHandle);

impl Drop for Allocator {
    fn drop(&mut self) {
        if let Err(error) = self.0.kill() {
            eprintln!("stopping {}: {error:#}", self.0.name());
        }
    }
}

/// The slices weft handed out: pod CIDR annotations (metadata-only list: cheap).
async fn annotations(bed: &Testbed) -> Result<Vec<String>> {
    let list = bed.nodes().list_metadata(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|node| node.metadata.annotations?.remove("weft.dev/pod-cidr"))
        .collect())
}

/// The slices kube-controller-manager handed out: `spec.podCIDR` (the spec
/// is not in a metadata list, so this lists whole nodes).
async fn spec_pod_cidrs(bed: &Testbed) -> Result<Vec<String>> {
    let list = bed.nodes().list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|node| node.spec?.pod_cidr)
        .collect())
}

/// The last lines of a process's log, for failure messages.
fn log_tail(process: &ProcessHandle) -> String {
    let log = process.log();
    let lines: Vec<&str> = log.lines().collect();
    format!(
        "--- {} (pid {}), {} ---\n{}",
        process.name(),
        process.pid(),
        process.log_path().display(),
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

async fn leader(bed: &Testbed, replica: &Replica) -> Result<()> {
    eventually(PATIENCE, "the controller to lead", || async {
        Ok(bed
            .lease_holder()
            .await?
            .filter(|holder| replica.is(holder))
            .map(drop))
    })
    .await
    .with_context(|| logs(&[replica]))
}

/// The kube-controller-manager binary: from `$WEFT_E2E_K8S_BIN` like the
/// harness, else from the cache `e2e/k8s/build.sh` fills (building it on a
/// cold cache, which takes many minutes).
fn kube_controller_manager() -> Result<PathBuf> {
    let dir = match std::env::var_os("WEFT_E2E_K8S_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => printed_path(
            Command::new("bash")
                .arg(weft_testing::repository().join("e2e/k8s/build.sh"))
                .arg("kube-controller-manager"),
        )?,
    };
    let binary = dir.join("kube-controller-manager");
    ensure!(
        binary.is_file(),
        "{} is missing; set WEFT_E2E_K8S_BIN to a directory holding it, \
         or unset it to build it with e2e/k8s/build.sh",
        binary.display()
    );
    Ok(binary)
}

/// Starts kube-controller-manager with only node IPAM, as the admin, and
/// waits until its allocator has synced its node cache and takes work.
async fn start_node_ipam(bed: &Testbed, binary: &Path, throttled: bool) -> Result<Allocator> {
    let mut command = Command::new(binary);
    command
        .arg(format!(
            "--kubeconfig={}",
            bed.cluster.kubeconfig().display()
        ))
        .arg("--controllers=node-ipam-controller")
        .arg("--allocate-node-cidrs=true")
        .arg(format!("--cluster-cidr={CLUSTER_CIDR}"))
        .arg(format!("--node-cidr-mask-size={SLICE_PREFIX}"))
        .arg("--cidr-allocator-type=RangeAllocator")
        .arg("--leader-elect=false")
        .arg("--use-service-account-credentials=false")
        // No health port: other clusters may share the loopback.
        .arg("--secure-port=0");
    if !throttled {
        command.args(["--kube-api-qps=5000", "--kube-api-burst=5000"]);
    }
    let allocator = Allocator(bed.cluster.spawn_host("kube-controller-manager", command)?);
    // With leader election off, the sign of readiness is the allocator's
    // informer reporting its cache synced.
    eventually(PATIENCE, "the node IPAM allocator to sync", || async {
        if !allocator.0.is_running() {
            bail!("exited ({:?})", allocator.0.exit_status());
        }
        let log = allocator.0.log();
        Ok(log
            .lines()
            .any(|line| line.contains("Caches are synced") && line.contains("cidrallocator"))
            .then_some(()))
    })
    .await
    .with_context(|| log_tail(&allocator.0))?;
    Ok(allocator)
}

/// Creates `count` nodes and waits until `slices` reports one distinct slice each.
async fn create_and_allocate<F, Fut>(
    bed: &Testbed,
    count: usize,
    slices: F,
    log: impl Fn() -> String,
) -> Result<(Duration, Duration)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>>>,
{
    let names: Vec<String> = (0..count).map(|i| format!("bench-{i:05}")).collect();
    let started = Instant::now();
    bed.create_nodes(&names, IN_FLIGHT).await?;
    let created = started.elapsed();
    eventually(PATIENCE, "every node to carry its slice", || async {
        Ok((slices().await?.len() == count).then_some(()))
    })
    .await
    .with_context(&log)?;
    let allocated = started.elapsed();
    let slices = slices().await?;
    let distinct: BTreeSet<&String> = slices.iter().collect();
    ensure!(
        distinct.len() == count,
        "{} distinct slices for {count} nodes",
        distinct.len()
    );
    Ok((created, allocated))
}

async fn measure_weft(bed: &Testbed, count: usize) -> Result<Figures> {
    let cluster_cidr = format!("--cluster-cidr={CLUSTER_CIDR}");
    let slice_size = format!("--slice-size-v4={SLICE_PREFIX}");
    let args = [cluster_cidr.as_str(), slice_size.as_str()];
    let controller = bed.start_controller("controller", &args)?;
    leader(bed, &controller).await?;
    let (created, allocated) =
        create_and_allocate(bed, count, || annotations(bed), || logs(&[&controller])).await?;
    let pid = controller.process.pid();
    let (peak_kib, current_kib) = (status_kib(pid, "VmHWM:")?, status_kib(pid, "VmRSS:")?);

    controller.process.kill()?;
    let restarted_at = Instant::now();
    let restarted = bed.start_controller("controller-restarted", &args)?;
    let series = "weft_controller_slices_allocated{family=\"ipv4\"}";
    eventually(PATIENCE, "the restarted controller to rebuild", || async {
        Ok((restarted.metric(series).ok().flatten() == Some(count as f64)).then_some(()))
    })
    .await
    .with_context(|| logs(&[&restarted]))?;
    let rebuilt = restarted_at.elapsed();
    Ok(Figures {
        created,
        allocated,
        peak_kib,
        current_kib,
        rebuilt: Some((rebuilt, status_kib(restarted.process.pid(), "VmHWM:")?)),
    })
}

async fn measure_node_ipam(
    bed: &Testbed,
    count: usize,
    binary: &Path,
    throttled: bool,
) -> Result<Figures> {
    let allocator = start_node_ipam(bed, binary, throttled).await?;
    let (created, allocated) = create_and_allocate(
        bed,
        count,
        || spec_pod_cidrs(bed),
        || log_tail(&allocator.0),
    )
    .await?;
    let pid = allocator.0.pid();
    Ok(Figures {
        created,
        allocated,
        peak_kib: status_kib(pid, "VmHWM:")?,
        current_kib: status_kib(pid, "VmRSS:")?,
        rebuilt: None,
    })
}

/// One run on a control plane of its own.
async fn measure(contender: Contender, count: usize, kcm: &Path) -> Result<Figures> {
    let bed = Testbed::start().await?;
    let figures = match contender {
        Contender::Weft => measure_weft(&bed, count).await?,
        Contender::NodeIpam => measure_node_ipam(&bed, count, kcm, true).await?,
        Contender::NodeIpamUnthrottled => measure_node_ipam(&bed, count, kcm, false).await?,
    };
    bed.stop().await?;
    Ok(figures)
}

fn print_header() {
    println!(
        "{:>5}  {:<26} {:>9} {:>11} {:>8} {:>9} {:>9} {:>9} {:>17}",
        "nodes",
        "allocator",
        "created s",
        "allocated s",
        "nodes/s",
        "VmHWM MiB",
        "VmRSS MiB",
        "restart s",
        "restart VmHWM MiB"
    );
}

fn print_row(count: usize, contender: Contender, figures: &Figures) {
    let (rebuilt, rebuilt_peak) = figures.rebuilt.map_or_else(
        || ("-".to_owned(), "-".to_owned()),
        |(took, peak_kib)| {
            (
                format!("{:.2}", took.as_secs_f64()),
                format!("{:.1}", peak_kib as f64 / 1024.0),
            )
        },
    );
    println!(
        "{count:>5}  {:<26} {:>9.2} {:>11.2} {:>8.0} {:>9.1} {:>9.1} {:>9} {:>17}",
        contender.label(),
        figures.created.as_secs_f64(),
        figures.allocated.as_secs_f64(),
        count as f64 / figures.allocated.as_secs_f64(),
        figures.peak_kib as f64 / 1024.0,
        figures.current_kib as f64 / 1024.0,
        rebuilt,
        rebuilt_peak,
    );
}

fn main() -> Result<()> {
    if !root_available("the allocation benchmark starts the e2e harness") {
        return Ok(());
    }
    // `cargo bench` passes `--bench`; other arguments select sizes and contenders.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (size_words, contender_words): (Vec<&String>, Vec<&String>) = filter
        .iter()
        .partition(|word| word.bytes().all(|b| b.is_ascii_digit()));
    let sizes: Vec<usize> = SIZES
        .into_iter()
        .filter(|count| {
            size_words.is_empty()
                || size_words
                    .iter()
                    .any(|word| count.to_string().contains(word.as_str()))
        })
        .collect();
    let contenders: Vec<Contender> = CONTENDERS
        .into_iter()
        .filter(|contender| {
            contender_words.is_empty()
                || contender_words
                    .iter()
                    .any(|word| contender.key() == word.as_str())
        })
        .collect();
    ensure!(
        !sizes.is_empty() && !contenders.is_empty(),
        "nothing selected by {filter:?}; sizes are {SIZES:?}, contenders weft, kcm, kcm-unthrottled"
    );
    let kcm = kube_controller_manager()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    print_header();
    for count in sizes {
        for &contender in &contenders {
            let figures = runtime
                .block_on(measure(contender, count, &kcm))
                .with_context(|| format!("{} with {count} nodes", contender.label()))?;
            print_row(count, contender, &figures);
        }
    }
    Ok(())
}
