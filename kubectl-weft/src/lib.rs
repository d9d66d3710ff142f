//! `kubectl weft`: the health of a Weft pod network, read through the API
//! server alone (a kubeconfig is all it needs).
//!
//! `kubectl weft status` reads the Nodes, the agent DaemonSet and the
//! controller Deployment with their Pods, and each daemon's `/status`
//! through the API server's pod proxy ([`mod@observe`]), judges it all without
//! I/O ([`mod@assess`]) and prints a row per node, the controller leader and
//! the warnings, each naming the nodes and the fix ([`report`]). It exits
//! 0 when healthy, 1 with warnings and 2 when it could not look.
//!
//! `kubectl weft trace` ([`trace`]) says whether NetworkPolicy lets one pod
//! reach another pod or an address, by which rules, and whether the two
//! nodes hold the path.
//!
//! `kubectl weft connectivity test` ([`connectivity`]) runs pods of its
//! own on every node and checks pod, node, Service, hostPort, DNS, outside
//! and NetworkPolicy traffic end to end; its pods run the hidden `probe`
//! subcommand ([`probe`]) from Weft's image.
//!
//! Tests and other tools call [`status`] with a [`kube::Client`] of their own.

pub mod assess;
pub mod bundle;
pub mod cli;
pub mod connectivity;
pub mod error;
pub mod observe;
pub mod probe;
pub mod report;
pub mod trace;

use std::time::Duration;

use kube::Client;

pub use crate::assess::assess;
pub use crate::error::{Error, Result};
pub use crate::observe::{observe, Observation, StatusOptions};
pub use crate::report::Report;

/// How often `--wait` looks again.
const WAIT_POLL: Duration = Duration::from_secs(2);

/// Reads the cluster and judges it: what `kubectl weft status` prints.
pub async fn status(client: &Client, options: &StatusOptions) -> Result<Report> {
    Ok(assess(&observe(client, options).await?))
}

/// Reports until the cluster is healthy or `limit` has passed, and returns
/// the last report (healthy or not).
pub async fn wait_until_healthy(
    client: &Client,
    options: &StatusOptions,
    limit: Duration,
) -> Result<Report> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let report = status(client, options).await?;
        let now = tokio::time::Instant::now();
        if report.healthy || now >= deadline {
            return Ok(report);
        }
        tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
    }
}
