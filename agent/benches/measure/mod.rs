//! Measuring helpers the agent's benchmarks share: the command line's
//! selection, units, medians, iperf3 runs. Percentiles and a process's
//! memory come from `weft_testing::measure`.

use std::future::Future;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use weft_testing::{root_available, run, wait_for};

/// The measurements a bench's command line names (`cargo bench … -- NAME`,
/// matched as substrings); all when it names none.
pub struct Selection(Vec<String>);

impl Selection {
    /// Whether measurement `name` is selected.
    pub fn wants(&self, name: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|wanted| name.contains(wanted.as_str()))
    }
}

/// Runs a bench's measurements, `body`, on a two-worker runtime with the
/// command line's selection. Without root it does nothing: every bench
/// makes namespaces.
pub fn run_as_root<F>(body: impl FnOnce(Selection) -> F) -> Result<()>
where
    F: Future<Output = Result<()>>,
{
    if !root_available("the benchmarks make network namespaces") {
        return Ok(());
    }
    let selection = Selection(
        std::env::args()
            .skip(1)
            .filter(|arg| !arg.starts_with('-'))
            .collect(),
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(body(selection))
}

/// Seconds of each iperf3 run.
pub const IPERF_SECONDS: &str = "5";

/// `d` in milliseconds, one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Received bits per second of a TCP iperf3 run to `server_ip`, with the
/// server started by `server` and the client by `client` (both `iperf3`
/// commands in their namespaces).
pub fn iperf(mut server: Command, client: impl Fn() -> Command, server_ip: IpAddr) -> Result<f64> {
    let mut server = server
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 (install the iperf3 package)")?;
    // The server needs a moment to listen; retry the client until it
    // connects. iperf3 -J exits 0 even when it could not connect and puts
    // the reason in "error".
    let received = wait_for(
        Duration::from_secs(10),
        &format!("iperf3 to {server_ip}"),
        || {
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
            let report: Value = serde_json::from_str(&run(&mut attempt)?)?;
            match report["end"]["sum_received"]["bits_per_second"].as_f64() {
                Some(bits) => Ok(Some(bits)),
                None => bail!("iperf3 reported no throughput: {}", report["error"]),
            }
        },
    );
    // A one-off server exits after its test; one that never saw it must go.
    let _ = server.kill();
    let _ = server.wait();
    received
}

/// Bits per second as Gbit/s.
pub fn gbit(bits: f64) -> String {
    format!("{:.2} Gbit/s", bits / 1e9)
}

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}
