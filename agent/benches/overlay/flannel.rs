//! flanneld as the agents' peer: the flannel that Weft means to replace,
//! run on the same harness nodes with its upstream chart's flags and RBAC,
//! and with pods wired as flannel's CNI plugin wires them (it delegates to
//! the reference `bridge` + `host-local`, which Debian ships).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::SystemTime;

use anyhow::{Context, Result};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::jiff::{tz::TimeZone, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use weft_e2e::{Cluster, ClusterNode, Pod, ProcessHandle};
use weft_testing::printed_path;

use super::testbed::start_cluster;
use super::{mac_text, node_object, patch_node, Contender};

/// The prefix of every annotation flannel's kube subnet manager reads and writes.
const ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com";
/// What flanneld logs once its Node informer has synced: the counterpart
/// of weft-agent's "node list complete".
const CACHE_SYNCED: &str = "Node controller sync successful";
/// Where Debian's containernetworking-plugins puts `bridge` and `host-local`.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// flanneld on every node, under a ServiceAccount bound to the ClusterRole
/// of flannel's own chart.
pub struct Flannel {
    cluster: Cluster,
    admin: Client,
    flanneld: PathBuf,
    kubeconfig: PathBuf,
    backend: &'static str,
    cluster_cidr: &'static str,
    daemons: BTreeMap<String, ProcessHandle>,
}

impl Contender for Flannel {
    const LABEL: &'static str = "flannel";
    const FEATURES: &'static str = "bridge cni0, no policy engine";

    async fn start(
        nodes: usize,
        backend: &'static str,
        cluster_cidr: &'static str,
    ) -> Result<Self> {
        let flanneld = build_flanneld()?;
        let (cluster, admin) = start_cluster(nodes, 0).await?;
        apply_rbac(&admin).await?;
        let kubeconfig = cluster
            .service_account_kubeconfig("kube-system", "flannel")
            .await?;
        Ok(Flannel {
            cluster,
            admin,
            flanneld,
            kubeconfig,
            backend,
            cluster_cidr,
            daemons: BTreeMap::new(),
        })
    }

    fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn admin(&self) -> Client {
        self.admin.clone()
    }

    /// The pod CIDR in the spec, as kube-controller-manager sets it, and the
    /// annotation a kubelet adds on registration: flanneld 0.28 panics
    /// ("assignment to entry in nil map") on its own Node when that has no
    /// annotations at all, which the harness's registration leaves.
    async fn assign_slice(&self, node: &ClusterNode, slice: IpNet) -> Result<()> {
        let patch = json!({
            "metadata": { "annotations": { "volumes.kubernetes.io/controller-managed-attach-detach": "true" } },
            "spec": { "podCIDR": slice.to_string(), "podCIDRs": [slice.to_string()] },
        });
        patch_node(&self.admin, node, &patch).await
    }

    /// flanneld with the upstream chart's flags (`--ip-masq
    /// --kube-subnet-mgr`), its files in the node's state directory.
    fn start_agent(&mut self, node: &ClusterNode) -> Result<()> {
        let net_conf = node.state_dir.join("net-conf.json");
        let config = json!({ "Network": self.cluster_cidr, "Backend": { "Type": self.backend } });
        std::fs::write(&net_conf, config.to_string())
            .with_context(|| format!("writing {}", net_conf.display()))?;
        let mut command = Command::new(&self.flanneld);
        command
            .args(["--kube-subnet-mgr", "--ip-masq", "--iface"])
            .arg(&node.underlay_link)
            .arg("--kubeconfig-file")
            .arg(&self.kubeconfig)
            .arg("--net-config-path")
            .arg(&net_conf)
            .arg("--subnet-file")
            .arg(subnet_file(node))
            .env("NODE_NAME", &node.name)
            // klog stamps lines in local time without a year or zone; UTC
            // makes the cache-synced line's time readable (see
            // `cache_ready_at`).
            .env("TZ", "UTC");
        let name = format!("flanneld-{}", node.name);
        let process = self.cluster.spawn_on_node(node, &name, command)?;
        self.daemons.insert(node.name.clone(), process);
        Ok(())
    }

    fn agents(&self) -> Vec<&ProcessHandle> {
        self.daemons.values().collect()
    }

    fn peer_node(name: &str, slice: IpNet, public_ip: IpAddr, mac: [u8; 6]) -> Node {
        let annotation = |key: &str| format!("{ANNOTATION_PREFIX}/{key}");
        node_object(
            name,
            slice,
            [
                (&annotation("backend-type"), "vxlan".to_string()),
                (
                    &annotation("backend-data"),
                    json!({ "VNI": 1, "VtepMAC": mac_text(mac) }).to_string(),
                ),
                (&annotation("public-ip"), public_ip.to_string()),
                (&annotation("kube-subnet-manager"), "true".to_string()),
            ],
        )
    }

    /// klog's header is `Lmmdd hh:mm:ss.uuuuuu pid file:line]`, in the
    /// process's local time (UTC here, see `start_agent`) and without a
    /// year: the current year is assumed.
    fn cache_ready_at(log: &str) -> Option<SystemTime> {
        let line = log.lines().find(|line| line.contains(CACHE_SYNCED))?;
        let mut fields = line.split_whitespace();
        let month_day = fields.next()?.get(1..5)?;
        let time = fields.next()?;
        let year = Timestamp::now().to_zoned(TimeZone::UTC).year();
        let stamp = format!(
            "{year:04}-{}-{}T{time}Z",
            month_day.get(..2)?,
            month_day.get(2..)?
        );
        Some(SystemTime::from(Timestamp::from_str(&stamp).ok()?))
    }

    /// The delegate config flannel's CNI plugin builds from the subnet file
    /// flanneld wrote: a `cni0` bridge as the pods' gateway with flannel's
    /// MTU, `host-local` addresses from the node's subnet, a route to the
    /// cluster network (flanneld masquerades itself: `ipMasq` off).
    fn add_pod(&self, node: &ClusterNode) -> Result<Pod> {
        let path = subnet_file(node);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading flanneld's {}", path.display()))?;
        let value = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(&format!("{key}=")))
                .with_context(|| format!("no {key} in {}", path.display()))
        };
        let subnet: IpNet = value("FLANNEL_SUBNET")?.parse()?;
        let mtu: u32 = value("FLANNEL_MTU")?.parse()?;
        let netconf = json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "mtu": mtu,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet.trunc().to_string() }]],
                "routes": [{ "dst": value("FLANNEL_NETWORK")? }],
                "dataDir": node.state_dir.join("flannel-ipam").display().to_string(),
            },
        });
        node.add_pod(
            &Path::new(REFERENCE_PLUGINS).join("bridge"),
            &netconf.to_string(),
            "web",
        )
    }

    async fn stop(self) -> Result<()> {
        self.cluster.stop().await
    }
}

fn subnet_file(node: &ClusterNode) -> PathBuf {
    node.state_dir.join("subnet.env")
}

/// Runs `e2e/flannel/build.sh` (a no-op on a warm cache; a cold build
/// takes minutes and shows its progress) and returns the binary it printed.
fn build_flanneld() -> Result<PathBuf> {
    let script = weft_testing::repository().join("e2e/flannel/build.sh");
    printed_path(&mut Command::new(script)).context("building flanneld with e2e/flannel/build.sh")
}

/// flannel's chart's ClusterRole, bound to ServiceAccount kube-system/flannel
/// (which `Cluster::service_account_kubeconfig` creates).
async fn apply_rbac(admin: &Client) -> Result<()> {
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": { "name": "flannel" },
        "rules": [
            { "apiGroups": [""], "resources": ["pods", "nodes", "namespaces"], "verbs": ["get", "list", "watch"] },
            { "apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"] },
        ],
    }))?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "flannel" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "flannel" },
        "subjects": [{ "kind": "ServiceAccount", "name": "flannel", "namespace": "kube-system" }],
    }))?;
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .context("creating ClusterRole flannel")?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .context("creating ClusterRoleBinding flannel")?;
    Ok(())
}
