//! The kubelet of a kubelet node: registers its Node, runs pods through the
//! node's containerd, and serves exec and logs to the apiserver.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use serde_json::json;

use crate::cluster::CONTROL_PLANE_LABEL;
use crate::control_plane::{write_kubeconfig, Credentials, Pki};
use crate::exec::tail;
use crate::machine::NodeMachine;
use crate::node::ClusterNode;
use crate::process::ProcessHandle;
use crate::run::RunGuard;
use crate::{containerd, dns};

/// The well-known label of a node's zone (`v1.LabelTopologyZone`), which a
/// kubelet may set on its own Node.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// How long a kubelet may take to register its Node.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(120);

/// The kubelet configuration for `node`.
///
/// Choices forced by the machine: cgroup v1 (`failCgroupV1: false`), the
/// cgroupfs driver (no systemd), a cgroup root of the node's own (all nodes
/// share the cgroup tree), no swap check, no image garbage collection (the
/// images cannot be pulled back) and eviction thresholds low enough that a
/// busy disk never taints the node: absolute sizes, since a percentage of a
/// large shared disk is gigabytes that the test machine's builds may use.
/// Pods get the cluster DNS (CoreDNS behind [`dns::CLUSTER_DNS_IP`]) as their
/// nameserver, with the `cluster.local` search path; the node has no
/// resolv.conf of its own to hand to pods on the node's resolver
/// (`dnsPolicy: Default`, CoreDNS's own among them), as there is no upstream.
fn config(node: &ClusterNode, machine: &NodeMachine, ca_cert: &Path) -> serde_json::Value {
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true },
            "x509": { "clientCAFile": ca_cert },
        },
        "authorization": { "mode": "Webhook" },
        "containerRuntimeEndpoint": format!("unix://{}", containerd::SOCKET),
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": machine.cgroup_root,
        "failCgroupV1": false,
        "failSwapOn": false,
        "readOnlyPort": 0,
        "clusterDomain": dns::CLUSTER_DOMAIN,
        "clusterDNS": [dns::CLUSTER_DNS_IP.to_string()],
        "resolvConf": "",
        "maxPods": 30,
        "serializeImagePulls": false,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "256Mi",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "256Mi",
        },
        // Readiness shows soon after the network plugin is installed.
        "nodeStatusUpdateFrequency": "4s",
        // No systemd-logind to take inhibitor locks from.
        "shutdownGracePeriod": "0s",
        "shutdownGracePeriodCriticalPods": "0s",
        "address": node.underlay_ip().to_string(),
    })
}

/// Which kubelet a node runs, and how its Node differs from its peers'.
pub(crate) struct KubeletSetup<'a> {
    /// The kubelet binary.
    pub(crate) binary: &'a Path,
    /// The node's zone label ([`crate::ClusterSpec::zones`]), if any.
    pub(crate) zone: Option<&'a str>,
    /// Register the Node with the control-plane taint
    /// ([`crate::ClusterSpec::control_plane_taint`]).
    pub(crate) control_plane_taint: bool,
}

/// Starts the node's kubelet (`<node>-kubelet`) with a client certificate
/// of its own (`system:node:<name>`, so the Node authorizer applies) and
/// waits until it has registered its Node, with the zone label if `setup`
/// has one.
pub(crate) async fn start(
    run: &RunGuard,
    client: &kube::Client,
    node: &ClusterNode,
    machine: &NodeMachine,
    pki: &Pki,
    apiserver: std::net::SocketAddr,
    setup: KubeletSetup<'_>,
) -> Result<ProcessHandle> {
    let user = format!("system:node:{}", node.name);
    let certificate = pki.issue_client(
        &format!("kubelet-{}", node.name),
        &format!("/O=system:nodes/CN={user}"),
    )?;
    let kubeconfig = node.state_dir.join("kubelet.kubeconfig");
    write_kubeconfig(
        &kubeconfig,
        apiserver,
        &pki.ca_cert,
        &user,
        Credentials::Certificate {
            cert: &certificate.cert,
            key: &certificate.key,
        },
    )?;
    let config_file = node.state_dir.join("kubelet-config.json");
    let mut config = config(node, machine, &pki.ca_cert);
    if setup.control_plane_taint {
        // As kubeadm's `nodeRegistration.taints` reaches the kubelet: set at
        // registration, so no pod is ever placed before it (a patch after
        // registration would race the scheduler and the node lifecycle
        // controller's own taints).
        config["registerWithTaints"] =
            json!([{ "key": CONTROL_PLANE_LABEL, "effect": "NoSchedule" }]);
    }
    let text =
        serde_json::to_string_pretty(&config).context("encoding the kubelet configuration")?;
    std::fs::write(&config_file, text)
        .with_context(|| format!("writing {}", config_file.display()))?;

    let mut command = machine.command(setup.binary);
    command
        .arg(format!("--config={}", config_file.display()))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--hostname-override={}", node.name))
        // Both families on a dual-stack node, IPv4 first: its InternalIPs.
        .arg(format!("--node-ip={}", node_ips(node)))
        .arg("--v=1");
    if let Some(zone) = setup.zone {
        command.arg(format!("--node-labels={ZONE_LABEL}={zone}"));
    }
    let kubelet = run.spawn(Some(&node.name), &format!("{}-kubelet", node.name), command)?;

    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    loop {
        if !kubelet.is_running() {
            bail!(
                "the kubelet of {} exited ({:?}); the end of {}:\n{}",
                node.name,
                kubelet.exit_status(),
                kubelet.log_path().display(),
                tail(&kubelet.log(), 30)
            );
        }
        if let Ok(Some(_)) = nodes.get_opt(&node.name).await {
            return Ok(kubelet);
        }
        if Instant::now() > deadline {
            bail!(
                "the kubelet of {} did not register its Node within {REGISTER_TIMEOUT:?}; see {}",
                node.name,
                kubelet.log_path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The kubelet's `--node-ip`: the node's underlay addresses, comma-separated.
fn node_ips(node: &ClusterNode) -> String {
    let ips: Vec<String> = node
        .underlay_ips()
        .iter()
        .map(ToString::to_string)
        .collect();
    ips.join(",")
}
