//! The agents' test bed on the e2e harness: a real kube-apiserver, the real
//! `weft-controller`, a real `weft-agent` per node under a ServiceAccount
//! bound to `agent/rbac.yaml`, and pods made with the real `weft` plugin from
//! the conflist the agent installed. Shared by the end-to-end tests and the
//! benchmarks.

#![allow(dead_code)] // each test or bench binary uses a different part

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod as PodObject, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::Value;
use weft_core::netns::Netns;
use weft_e2e::{Cluster, ClusterNode, ClusterSpec, Pod, ProcessHandle};
use weft_testing::{eventually, run, wait_for};

/// The cluster CIDR the controller and the agents are given by default.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Deadline for anything expected "soon"; never an assertion on speed.
pub const PATIENCE: Duration = Duration::from_secs(180);
/// Where each agent serves /healthz, /readyz, /status and /metrics, in its node's namespace.
pub const METRICS_PORT: u16 = 9465;

/// The agent `binary` as `node`'s agent: its state under the node's state
/// directory, the plugin installed from `plugin`, metrics on loopback, the
/// API through `kubeconfig`. Backend and cluster CIDR are the caller's.
pub fn agent_command(
    binary: &Path,
    node: &ClusterNode,
    plugin: &Path,
    kubeconfig: &Path,
) -> Command {
    let state = &node.state_dir;
    let mut command = Command::new(binary);
    command
        .arg("--cni-bin-dir")
        .arg(state.join("bin"))
        .arg("--cni-conf-dir")
        .arg(state.join("net.d"))
        .arg("--node-file")
        .arg(state.join("node.json"))
        .arg("--cni-plugin-source")
        .arg(plugin)
        .arg(format!("--metrics-address=127.0.0.1:{METRICS_PORT}"))
        .env("NODE_NAME", &node.name)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info");
    command
}

/// Builds (if needed) a binary of another workspace package into the same
/// target directory and profile as this test, and returns its path.
pub fn workspace_binary(package: &str, name: &str) -> Result<PathBuf> {
    let agent = Path::new(env!("CARGO_BIN_EXE_weft-agent"));
    let profile_dir = agent.parent().context("agent binary has a directory")?;
    let target_dir = profile_dir
        .parent()
        .context("profile directory has a parent")?;
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "--package", package, "--bin", name])
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    run(&mut build).with_context(|| format!("building {name}"))?;
    Ok(profile_dir.join(name))
}

/// Weft's routes to peers on a node, as `destination -> "via <gw> dev <dev>"`
/// (the unreachable routes for the node's own slices left out).
pub fn weft_routes(node: &ClusterNode) -> Result<BTreeMap<String, String>> {
    let text = run(node
        .command("ip")
        .args(["-j", "route", "show", "proto", "87", "type", "unicast"]))?;
    let routes: Vec<Value> = if text.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&text)?
    };
    Ok(routes
        .iter()
        .map(|r| {
            let dst = r["dst"].as_str().unwrap_or("?").to_string();
            let via = format!(
                "via {} dev {}",
                r["gateway"].as_str().unwrap_or("-"),
                r["dev"].as_str().unwrap_or("?")
            );
            (dst, via)
        })
        .collect())
}

pub fn vxlan_ifindex(node: &ClusterNode) -> Result<u64> {
    let text = run(node.command("ip").args(["-j", "link", "show", "weft.1"]))?;
    let links: Vec<Value> = serde_json::from_str(&text)?;
    links
        .first()
        .and_then(|l| l["ifindex"].as_u64())
        .context("weft.1 has no ifindex")
}

/// `GET path` on the node's agent, from inside the node's namespace: the
/// whole HTTP response.
pub fn agent_get(node: &ClusterNode, path: &str) -> Result<String> {
    let netns = Netns::open(node.netns_path())?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n");
    let response = netns.run_in(|| -> std::io::Result<String> {
        let address = ([127, 0, 0, 1], METRICS_PORT).into();
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })?;
    response.with_context(|| format!("GET {path} on {}'s agent", node.name))
}

/// `GET /readyz` on the node's agent answers 200.
pub fn agent_ready(node: &ClusterNode) -> Result<bool> {
    Ok(agent_get(node, "/readyz").is_ok_and(|response| response.starts_with("HTTP/1.1 200")))
}

/// A harness cluster of `nodes` namespace nodes (the last `routed_nodes`
/// behind the router) and an admin client, once the API server has made
/// the `kube-system` namespace that agents' ServiceAccounts live in.
pub async fn start_cluster(nodes: usize, routed_nodes: usize) -> Result<(Cluster, Client)> {
    let cluster = Cluster::start(ClusterSpec {
        nodes,
        routed_nodes,
        ..ClusterSpec::default()
    })
    .await?;
    let admin = cluster.client().await?;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    eventually(PATIENCE, "namespace kube-system", || async {
        Ok(namespaces.get_opt("kube-system").await?.map(drop))
    })
    .await?;
    Ok((cluster, admin))
}

/// What to bring up.
#[derive(Debug, Clone)]
pub struct OverlaySpec {
    /// The agents' backend.
    pub backend: &'static str,
    /// Number of nodes.
    pub nodes: usize,
    /// How many of them (the last ones) sit behind the router.
    pub routed_nodes: usize,
    /// The cluster CIDR given to the controller and the agents.
    pub cluster_cidr: &'static str,
    /// Whether to run the controller (without it, tests set slices).
    pub controller: bool,
}

impl Default for OverlaySpec {
    /// vxlan, three nodes of which one is routed, with the controller.
    fn default() -> Self {
        OverlaySpec {
            backend: "vxlan",
            nodes: 3,
            routed_nodes: 1,
            cluster_cidr: CLUSTER_CIDR,
            controller: true,
        }
    }
}

/// A harness cluster with the controller, an agent per node once
/// [`Overlay::start_agents`] ran, and one pod per node once
/// [`Overlay::add_pods`] ran.
pub struct Overlay {
    pub cluster: Cluster,
    pub admin: Client,
    pub spec: OverlaySpec,
    pub plugin: PathBuf,
    agent: PathBuf,
    agent_kubeconfig: PathBuf,
    pub agents: BTreeMap<String, ProcessHandle>,
    /// Extra environment for agents started from now on.
    pub agent_env: Vec<(String, String)>,
    starts: usize,
    _controller: Option<ProcessHandle>,
}

impl Overlay {
    /// Control plane, agent RBAC and (per the spec) the controller.
    pub async fn start(spec: OverlaySpec) -> Result<Self> {
        let plugin = workspace_binary("weft-cni", "weft")?;
        let controller = workspace_binary("weft-controller", "weft-controller")?;
        let (cluster, admin) = start_cluster(spec.nodes, spec.routed_nodes).await?;
        apply_agent_rbac(&admin).await?;
        let agent_kubeconfig = cluster
            .service_account_kubeconfig("kube-system", "weft-agent")
            .await?;

        let controller = if spec.controller {
            let mut command = Command::new(controller);
            command
                .args([
                    "--cluster-cidr",
                    spec.cluster_cidr,
                    "--metrics-address",
                    "127.0.0.1:0",
                ])
                .env("KUBECONFIG", cluster.kubeconfig())
                .env("RUST_LOG", "info");
            Some(cluster.spawn_host("weft-controller", command)?)
        } else {
            None
        };
        Ok(Overlay {
            cluster,
            admin,
            spec,
            plugin,
            agent: PathBuf::from(env!("CARGO_BIN_EXE_weft-agent")),
            agent_kubeconfig,
            agents: BTreeMap::new(),
            agent_env: Vec::new(),
            starts: 0,
            _controller: controller,
        })
    }

    /// Starts an agent on every node.
    pub fn start_agents(&mut self) -> Result<()> {
        for node in self.cluster.nodes().to_vec() {
            self.start_agent(&node)?;
        }
        Ok(())
    }

    /// Starts the agent on `node` with the spec's backend and cluster CIDR.
    pub fn start_agent(&mut self, node: &ClusterNode) -> Result<()> {
        let mut command = agent_command(&self.agent, node, &self.plugin, &self.agent_kubeconfig);
        command
            .args([
                "--backend",
                self.spec.backend,
                "--cluster-cidr",
                self.spec.cluster_cidr,
                "--resync-seconds",
                "5",
            ])
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        self.starts += 1;
        let name = format!("weft-agent-{}-{}", node.name, self.starts);
        let process = self.cluster.spawn_on_node(node, &name, command)?;
        self.agents.insert(node.name.clone(), process);
        Ok(())
    }

    /// Stops the agent on `node` (SIGTERM) and starts a new one.
    pub fn restart_agent(&mut self, node: &ClusterNode) -> Result<()> {
        if let Some(old) = self.agents.remove(&node.name) {
            old.kill()?;
        }
        self.start_agent(node)
    }

    /// The `index`th node.
    pub fn node(&self, index: usize) -> ClusterNode {
        self.cluster.nodes()[index].clone()
    }

    /// Every agent's log, for failure messages.
    pub fn logs(&self) -> String {
        self.agents
            .values()
            .map(|agent| format!("--- {}\n{}", agent.name(), agent.log()))
            .collect()
    }

    /// Every node's slice, from the controller's annotation.
    pub async fn slices(&self) -> Result<BTreeMap<String, String>> {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        let mut slices = BTreeMap::new();
        for node in nodes.list(&Default::default()).await? {
            let name = node.metadata.name.clone().unwrap_or_default();
            if let Some(slice) = node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("weft.dev/pod-cidr"))
            {
                slices.insert(name, slice.clone());
            }
        }
        Ok(slices)
    }

    /// Waits until every agent reports ready and set its Node condition,
    /// and node 0 holds `expected_routes` routes.
    pub async fn wait_programmed(&self, expected_routes: usize) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        eventually(PATIENCE, "the agents to program their nodes", || async {
            let mut up = 0;
            for node in nodes.list(&Default::default()).await? {
                let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
                if conditions.iter().any(|c| {
                    c.type_ == "NetworkUnavailable"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("WeftIsUp")
                }) {
                    up += 1;
                }
            }
            let routes = weft_routes(&self.node(0))?.len();
            let ready = self
                .cluster
                .nodes()
                .iter()
                .all(|n| agent_ready(n).unwrap_or(false));
            // Not yet: the reason is what a timeout reports.
            ensure!(
                up == self.spec.nodes && ready && routes == expected_routes,
                "{up}/{} nodes up, ready {ready}, node-0 has {routes} routes",
                self.spec.nodes
            );
            Ok(Some(()))
        })
        .await
        .with_context(|| self.logs())
    }

    /// One pod per node (see [`Overlay::add_pod`]).
    pub fn add_pods(&self) -> Result<Vec<Pod>> {
        self.cluster
            .nodes()
            .iter()
            .map(|node| self.add_pod(node))
            .collect()
    }

    /// A pod on `node`, configured from the conflist the node's agent
    /// installed (plus an IPAM directory of the node's own).
    pub fn add_pod(&self, node: &ClusterNode) -> Result<Pod> {
        self.add_pod_with(node, "web", serde_json::Map::new())
    }

    /// [`Overlay::add_pod`] named `name`, with `extra` keys in its config
    /// (`runtimeConfig`, as a runtime adds for the capabilities it uses).
    pub fn add_pod_with(
        &self,
        node: &ClusterNode,
        name: &str,
        extra: serde_json::Map<String, Value>,
    ) -> Result<Pod> {
        let conflist_path = node.state_dir.join("net.d/10-weft.conflist");
        let conflist: Value = serde_json::from_str(&std::fs::read_to_string(&conflist_path)?)?;
        let mut netconf = conflist["plugins"][0].clone();
        netconf["cniVersion"] = conflist["cniVersion"].clone();
        netconf["name"] = conflist["name"].clone();
        netconf["dataDir"] = Value::from(node.state_dir.join("ipam").display().to_string());
        if let Some(netconf) = netconf.as_object_mut() {
            netconf.extend(extra);
        }
        node.add_pod(&self.plugin, &netconf.to_string(), name)
    }
}

/// The default overlay (vxlan, three nodes, one routed) with every agent
/// ready and a pod per node that reaches every other.
pub async fn vxlan_overlay_with_pods() -> Result<(Overlay, Vec<Pod>)> {
    let mut overlay = Overlay::start(OverlaySpec::default()).await?;
    overlay.start_agents()?;
    overlay.wait_programmed(2).await?;
    let pods = overlay.add_pods()?;
    ping_all(&pods, &overlay)?;
    Ok((overlay, pods))
}

/// Applies `agent/rbac.yaml`.
pub async fn apply_agent_rbac(admin: &Client) -> Result<()> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rbac.yaml"))?;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document)?;
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let json = serde_json::to_value(&value)?;
        match kind.as_str() {
            "ServiceAccount" => {
                let api: Api<ServiceAccount> = Api::namespaced(admin.clone(), "kube-system");
                api.create(&PostParams::default(), &serde_json::from_value(json)?)
                    .await?;
            }
            "ClusterRole" => {
                let api: Api<ClusterRole> = Api::all(admin.clone());
                api.create(&PostParams::default(), &serde_json::from_value(json)?)
                    .await?;
            }
            "ClusterRoleBinding" => {
                let api: Api<ClusterRoleBinding> = Api::all(admin.clone());
                api.create(&PostParams::default(), &serde_json::from_value(json)?)
                    .await?;
            }
            "Role" => {
                let api: Api<Role> = Api::namespaced(admin.clone(), "kube-system");
                api.create(&PostParams::default(), &serde_json::from_value(json)?)
                    .await?;
            }
            "RoleBinding" => {
                let api: Api<RoleBinding> = Api::namespaced(admin.clone(), "kube-system");
                api.create(&PostParams::default(), &serde_json::from_value(json)?)
                    .await?;
            }
            other => bail!("agent/rbac.yaml has a {other}, which this test does not apply"),
        }
    }
    Ok(())
}

/// Every pod pings every other pod (polled: peers appear as their agents
/// publish).
pub fn ping_all(pods: &[Pod], overlay: &Overlay) -> Result<()> {
    for from in pods {
        for to in pods {
            if from.name == to.name && from.netns == to.netns {
                continue;
            }
            let target = to.ip().context("pod without address")?;
            wait_for(
                PATIENCE,
                &format!("{} to reach {target}", from.netns),
                || Ok(from.ping(target).then_some(())),
            )
            .with_context(|| overlay.logs())?;
        }
    }
    Ok(())
}

/// Makes sure `namespace` has its `default` ServiceAccount, which the API
/// server's admission wants before it takes a Pod there (no controller
/// manager runs here to make it).
pub async fn ensure_default_service_account(admin: &Client, namespace: &str) -> Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    if accounts.get_opt("default").await?.is_none() {
        let account = serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}}))?;
        accounts.create(&PostParams::default(), &account).await?;
    }
    Ok(())
}

/// A Pod object bound to `node` with `labels` and one container port
/// named http (8080), as a scheduler leaves it.
pub fn pod_object(name: &str, node: &str, labels: &Value) -> Result<PodObject> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "server", "image": "none",
                            "ports": [{"name": "http", "containerPort": 8080}]}],
        },
    }))?)
}

/// Reports the Pod `name` in `pods` Running at `ip` on the node at
/// `host_ip`, as its kubelet would.
pub async fn report_running(
    pods: &Api<PodObject>,
    name: &str,
    ip: IpAddr,
    host_ip: IpAddr,
) -> Result<()> {
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("reporting Pod {name} Running"))?;
    Ok(())
}

/// Publishes the testbed pod `pod` on `node` as the Pod object `name` in
/// `default` with `labels` (see [`pod_object`]), Running at its address.
pub async fn publish_pod(
    admin: &Client,
    pod: &Pod,
    name: &str,
    node: &ClusterNode,
    labels: &Value,
) -> Result<()> {
    let pods: Api<PodObject> = Api::namespaced(admin.clone(), "default");
    pods.create(
        &PostParams::default(),
        &pod_object(name, &node.name, labels)?,
    )
    .await
    .with_context(|| format!("creating Pod {name}"))?;
    let ip = pod.ip().context("pod without address")?;
    report_running(&pods, name, ip, IpAddr::V4(node.underlay_ip())).await
}
