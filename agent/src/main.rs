//! weft-agent: programs Weft's overlay on the node it runs on.
//!
//! Parses flags, environment and the config file, sets up logging, and runs
//! [`weft_agent::run`] until SIGTERM or Ctrl-C. Stopping the agent leaves
//! the data plane in place: pods keep their connectivity while it restarts.
//! Only when its DaemonSet (`--daemonset`) is gone does it remove Weft from
//! the node (see [`weft_agent::uninstall`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use weft_agent::config::AgentSettings;
use weft_agent::uninstall::OwnDaemonSet;
use weft_daemon::config::Layer;

/// Programs the pod network on this node (flags > environment > config file > defaults).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// This node's name; set it from the downward API (spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The DaemonSet running this agent; when it is deleted, stopping removes
    /// Weft from the node. Unset: the node state always stays.
    #[arg(long, env = "WEFT_DAEMONSET")]
    daemonset: Option<String>,
    /// The DaemonSet's namespace; set it from the downward API (metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// YAML config file; its keys are the Helm chart's agent values.
    #[arg(long, env = "WEFT_CONFIG")]
    config: Option<PathBuf>,
    /// The settings' flags and environment: one layer over the config file.
    #[command(flatten)]
    settings: AgentSettings,
}

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads, so they share the one arena.
    weft_daemon::process::use_one_malloc_arena();
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    weft_daemon::process::init_logging();
    let args = Args::parse();
    let file = AgentSettings::load(args.config.as_deref())?;
    let own_daemonset = match (args.daemonset.clone(), args.pod_namespace.clone()) {
        (Some(name), Some(namespace)) => Some(OwnDaemonSet { namespace, name }),
        (Some(_), None) => anyhow::bail!(
            "--daemonset is set but the namespace is not: set --pod-namespace or POD_NAMESPACE (downward API metadata.namespace)"
        ),
        (None, _) => None,
    };
    let agent_binary = std::env::current_exe().context("locating the weft-agent binary")?;
    let config = file.overlaid_with(args.settings).resolve(&agent_binary)?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    weft_agent::run(
        config,
        args.node_name,
        own_daemonset,
        client,
        weft_daemon::process::shutdown_signal(),
    )
    .await
    .context("running the agent")
}
