//! weft-controller: gives every Node a pod CIDR slice of the cluster CIDR.
//!
//! Parses flags, environment and the config file, sets up logging, and runs
//! [`weft_controller::run`] until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ipnet::IpNet;
use weft_controller::{leader, ControllerSettings};

/// Hands every Node a pod CIDR slice of the cluster CIDR (flags > environment > config file > defaults).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// YAML config file; its keys are the Helm chart's controller values.
    #[arg(long, env = "WEFT_CONFIG")]
    config: Option<PathBuf>,
    /// IPv4 cluster CIDR the slices come from (clusterCidr).
    #[arg(long, env = "WEFT_CLUSTER_CIDR")]
    cluster_cidr: Option<IpNet>,
    /// IPv6 cluster CIDR, for dual-stack (clusterCidrV6).
    #[arg(long, env = "WEFT_CLUSTER_CIDR_V6")]
    cluster_cidr_v6: Option<IpNet>,
    /// Prefix length of each node's IPv4 slice (sliceSizeV4) [default: 24].
    #[arg(long, env = "WEFT_SLICE_SIZE_V4")]
    slice_size_v4: Option<u8>,
    /// Prefix length of each node's IPv6 slice (sliceSizeV6) [default: 64].
    #[arg(long, env = "WEFT_SLICE_SIZE_V6")]
    slice_size_v6: Option<u8>,
    /// Namespace of the leader-election Lease (leaseNamespace) [default: kube-system].
    #[arg(long, env = "WEFT_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leader-election Lease (leaseName) [default: weft-controller].
    #[arg(long, env = "WEFT_LEASE_NAME")]
    lease_name: Option<String>,
    /// Seconds a deleted node's slice is kept for a node re-registering under its name (sliceHoldSeconds) [default: 300].
    #[arg(long, env = "WEFT_SLICE_HOLD_SECONDS")]
    slice_hold_seconds: Option<u64>,
    /// Listen address of /healthz, /readyz and /metrics (metricsAddress) [default: 0.0.0.0:9464].
    #[arg(long, env = "WEFT_METRICS_ADDRESS")]
    metrics_address: Option<SocketAddr>,
}

impl Args {
    fn settings(&self) -> ControllerSettings {
        ControllerSettings {
            cluster_cidr: self.cluster_cidr,
            cluster_cidr_v6: self.cluster_cidr_v6,
            slice_size_v4: self.slice_size_v4,
            slice_size_v6: self.slice_size_v6,
            lease_namespace: self.lease_namespace.clone(),
            lease_name: self.lease_name.clone(),
            slice_hold_seconds: self.slice_hold_seconds,
            metrics_address: self.metrics_address,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_daemon::process::init_logging();
    let args = Args::parse();
    let file = match &args.config {
        Some(path) => ControllerSettings::from_file(path)?,
        None => ControllerSettings::default(),
    };
    let config = args.settings().over(file).resolve()?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    weft_controller::run(
        client,
        config,
        leader::default_identity(),
        weft_daemon::process::shutdown_signal(),
    )
    .await
    .context("running the controller")
}
