//! weft-agent: programs Weft's overlay on the node it runs on.
//!
//! Parses flags, environment and the config file, sets up logging, and runs
//! [`weft_agent::run`] until SIGTERM or Ctrl-C. Stopping the agent leaves
//! the data plane in place: pods keep their connectivity while it restarts.
//! Only when its DaemonSet (`--daemonset`) is gone does it remove Weft from
//! the node (see [`weft_agent::uninstall`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ipnet::IpNet;
use weft_agent::config::{AgentConfig, Backend, ChecksumOffload, ConfigLayer};
use weft_agent::uninstall::OwnDaemonSet;

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
    /// vxlan, host-gw or direct (backend) [default: vxlan].
    #[arg(long, env = "WEFT_BACKEND")]
    backend: Option<Backend>,
    /// VXLAN network identifier (vni) [default: 1].
    #[arg(long, env = "WEFT_VNI")]
    vni: Option<u32>,
    /// VXLAN UDP port (port) [default: 8472].
    #[arg(long, env = "WEFT_PORT")]
    port: Option<u16>,
    /// MTU of weft.1 and pods (mtu) [default: underlay MTU minus the VXLAN overhead].
    #[arg(long, env = "WEFT_MTU")]
    mtu: Option<u32>,
    /// Underlay interface name (iface) [default: the link holding the Node's InternalIP].
    #[arg(long, env = "WEFT_IFACE")]
    iface: Option<String>,
    /// Underlay interface name pattern (ifaceRegex).
    #[arg(long, env = "WEFT_IFACE_REGEX")]
    iface_regex: Option<String>,
    /// Seconds between full reconciles that repair drift (resyncSeconds) [default: 60].
    #[arg(long, env = "WEFT_RESYNC_SECONDS")]
    resync_seconds: Option<u64>,
    /// IPv4 cluster CIDR, as given to the controller (clusterCidr).
    #[arg(long, env = "WEFT_CLUSTER_CIDR")]
    cluster_cidr: Option<IpNet>,
    /// IPv6 cluster CIDR, for dual-stack (clusterCidrV6).
    #[arg(long, env = "WEFT_CLUSTER_CIDR_V6")]
    cluster_cidr_v6: Option<IpNet>,
    /// Destinations pods reach without masquerade, comma separated (noMasqueradeCidrs).
    #[arg(long, env = "WEFT_NO_MASQUERADE_CIDRS", value_delimiter = ',')]
    no_masquerade_cidrs: Option<Vec<IpNet>>,
    /// auto, on or off: tx checksum offload on weft.1 (checksumOffload) [default: auto].
    #[arg(long, env = "WEFT_CHECKSUM_OFFLOAD")]
    checksum_offload: Option<ChecksumOffload>,
    /// Where the weft plugin binary is installed (cniBinDir) [default: /opt/cni/bin].
    #[arg(long, env = "WEFT_CNI_BIN_DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// Where the conflist is installed (cniConfDir) [default: /etc/cni/net.d].
    #[arg(long, env = "WEFT_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// The plugin binary to install (cniPluginSource) [default: weft beside this binary].
    #[arg(long, env = "WEFT_CNI_PLUGIN_SOURCE")]
    cni_plugin_source: Option<PathBuf>,
    /// The node file the plugin reads (nodeFile) [default: /run/weft/node.json].
    #[arg(long, env = "WEFT_NODE_FILE")]
    node_file: Option<PathBuf>,
    /// Listen address of /healthz, /readyz and /metrics (metricsAddress) [default: 0.0.0.0:9465].
    #[arg(long, env = "WEFT_METRICS_ADDRESS")]
    metrics_address: Option<SocketAddr>,
}

impl Args {
    fn layer(&self) -> ConfigLayer {
        ConfigLayer {
            backend: self.backend,
            vni: self.vni,
            port: self.port,
            mtu: self.mtu,
            iface: self.iface.clone(),
            iface_regex: self.iface_regex.clone(),
            resync_seconds: self.resync_seconds,
            cluster_cidr: self.cluster_cidr,
            cluster_cidr_v6: self.cluster_cidr_v6,
            no_masquerade_cidrs: self.no_masquerade_cidrs.clone(),
            checksum_offload: self.checksum_offload,
            cni_bin_dir: self.cni_bin_dir.clone(),
            cni_conf_dir: self.cni_conf_dir.clone(),
            cni_plugin_source: self.cni_plugin_source.clone(),
            node_file: self.node_file.clone(),
            metrics_address: self.metrics_address,
        }
    }
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
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            ConfigLayer::from_yaml(path, &text)?
        }
        None => ConfigLayer::default(),
    };
    let own_daemonset = match (args.daemonset.clone(), args.pod_namespace.clone()) {
        (Some(name), Some(namespace)) => Some(OwnDaemonSet { namespace, name }),
        (Some(_), None) => anyhow::bail!(
            "--daemonset is set but the namespace is not: set --pod-namespace or POD_NAMESPACE (downward API metadata.namespace)"
        ),
        (None, _) => None,
    };
    let agent_binary = std::env::current_exe().context("locating the weft-agent binary")?;
    let config = AgentConfig::from_layer(file.overlaid_with(args.layer()), &agent_binary)?;
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
