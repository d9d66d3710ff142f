//! weft-controller: gives every Node a pod CIDR slice of the cluster CIDR.
//!
//! Parses flags, environment and the config file, sets up logging, and runs
//! [`weft_controller::run`] until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use weft_controller::{leader, ControllerSettings};
use weft_daemon::config::Layer;

/// Hands every Node a pod CIDR slice of the cluster CIDR (flags > environment > config file > defaults).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// YAML config file; its keys are the Helm chart's controller values.
    #[arg(long, env = "WEFT_CONFIG")]
    config: Option<PathBuf>,
    /// The settings' flags and environment: one layer over the config file.
    #[command(flatten)]
    settings: ControllerSettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_daemon::process::init_logging();
    let args = Args::parse();
    let file = ControllerSettings::load(args.config.as_deref())?;
    let config = file.overlaid_with(args.settings).resolve()?;
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
