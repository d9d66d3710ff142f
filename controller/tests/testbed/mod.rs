//! A real kube-apiserver (from the e2e harness) with the controller's RBAC
//! from `controller/rbac.yaml` applied, and `weft-controller` processes
//! running under that ServiceAccount. Shared by the integration tests and the
//! benchmark.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, NodeSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use weft_core::status::ControllerStatus;
use weft_e2e::{Cluster, ProcessHandle};
use weft_testing::eventually;

/// Namespace of the controller's ServiceAccount and Lease, as in rbac.yaml.
pub const NAMESPACE: &str = "kube-system";
/// The ServiceAccount and Lease name, as in rbac.yaml.
pub const NAME: &str = "weft-controller";
/// Generous bound for anything the controller should do "soon"; only a
/// deadline for giving up, never an assertion on speed.
pub const PATIENCE: Duration = Duration::from_secs(180);

const POD_CIDR: &str = "weft.dev/pod-cidr";
const POD_CIDR_V6: &str = "weft.dev/pod-cidr-v6";

/// A control plane with the controller's RBAC and a kubeconfig for its ServiceAccount.
pub struct Testbed {
    pub cluster: Cluster,
    pub admin: Client,
    controller_kubeconfig: PathBuf,
}

/// One `weft-controller` process.
pub struct Replica {
    pub process: ProcessHandle,
    pub metrics_port: u16,
}

/// A node's pod CIDRs as the API shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCidrs {
    pub spec: Vec<String>,
    pub annotation: Option<String>,
    pub annotation_v6: Option<String>,
}

impl Testbed {
    pub async fn start() -> Result<Self> {
        let cluster = Cluster::start_control_plane_only().await?;
        let admin = cluster.client().await?;
        eventually(PATIENCE, "namespace kube-system", || {
            let namespaces: Api<Namespace> = Api::all(admin.clone());
            async move { Ok(namespaces.get_opt(NAMESPACE).await?.map(drop)) }
        })
        .await?;
        apply_rbac(&admin).await?;
        let controller_kubeconfig = cluster.service_account_kubeconfig(NAMESPACE, NAME).await?;
        Ok(Self {
            cluster,
            admin,
            controller_kubeconfig,
        })
    }

    /// Starts a controller replica as the ServiceAccount with `args`.
    pub fn start_controller(&self, name: &str, args: &[&str]) -> Result<Replica> {
        self.spawn_controller(&self.controller_kubeconfig, name, args)
    }

    /// Like [`Testbed::start_controller`], but reaching the API server only
    /// through `relay`.
    pub fn start_controller_through(
        &self,
        relay: &ApiRelay,
        name: &str,
        args: &[&str],
    ) -> Result<Replica> {
        let direct = format!("https://{}", self.cluster.apiserver_address());
        let text = std::fs::read_to_string(&self.controller_kubeconfig)?;
        ensure!(
            text.contains(&direct),
            "the kubeconfig does not name {direct}"
        );
        let relayed = self
            .cluster
            .run_dir()
            .join(format!("{name}-relayed.kubeconfig"));
        std::fs::write(
            &relayed,
            text.replace(&direct, &format!("https://{}", relay.address)),
        )?;
        self.spawn_controller(&relayed, name, args)
    }

    fn spawn_controller(&self, kubeconfig: &Path, name: &str, args: &[&str]) -> Result<Replica> {
        let metrics_port = free_port()?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_weft-controller"));
        command
            .args(args)
            .arg(format!("--metrics-address=127.0.0.1:{metrics_port}"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info");
        let process = self.cluster.spawn_host(name, command)?;
        Ok(Replica {
            process,
            metrics_port,
        })
    }

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.admin.clone())
    }

    /// Creates a Node object, optionally with `spec.podCIDRs` and annotations.
    pub async fn create_node(
        &self,
        name: &str,
        pod_cidrs: &[&str],
        annotations: &[(&str, &str)],
    ) -> Result<()> {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                annotations: (!annotations.is_empty()).then(|| {
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                }),
                ..ObjectMeta::default()
            },
            spec: (!pod_cidrs.is_empty()).then(|| NodeSpec {
                pod_cidr: Some(pod_cidrs[0].to_owned()),
                pod_cidrs: Some(pod_cidrs.iter().map(|c| c.to_string()).collect()),
                ..NodeSpec::default()
            }),
            status: None,
        };
        self.nodes()
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("creating node {name}"))?;
        Ok(())
    }

    /// Creates plain nodes, `in_flight` requests at a time.
    pub async fn create_nodes(&self, names: &[String], in_flight: usize) -> Result<()> {
        futures::stream::iter(names)
            .map(|name| self.create_node(name, &[], &[]))
            .buffer_unordered(in_flight)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    pub async fn delete_node(&self, name: &str) -> Result<()> {
        self.nodes()
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting node {name}"))?;
        Ok(())
    }

    /// Every node's pod CIDRs.
    pub async fn cidrs(&self) -> Result<BTreeMap<String, NodeCidrs>> {
        let list = self.nodes().list(&ListParams::default()).await?;
        Ok(list
            .into_iter()
            .map(|node| {
                let spec = node.spec.clone().unwrap_or_default();
                let annotations = node.annotations();
                let cidrs = NodeCidrs {
                    spec: spec.pod_cidrs.unwrap_or_default(),
                    annotation: annotations.get(POD_CIDR).cloned(),
                    annotation_v6: annotations.get(POD_CIDR_V6).cloned(),
                };
                (node.name_any(), cidrs)
            })
            .collect())
    }

    /// Waits until every node in `names` has a spec pod CIDR and the
    /// annotation, then returns all nodes' CIDRs.
    pub async fn wait_for_slices(
        &self,
        names: &[String],
        replicas: &[&Replica],
    ) -> Result<BTreeMap<String, NodeCidrs>> {
        let outcome = eventually(PATIENCE, "every node to get a pod CIDR", || async {
            let cidrs = self.cidrs().await?;
            let done = names.iter().all(|name| {
                cidrs
                    .get(name)
                    .is_some_and(|c| !c.spec.is_empty() && c.annotation.is_some())
            });
            Ok(done.then_some(cidrs))
        })
        .await;
        outcome.with_context(|| logs(replicas))
    }

    /// Warning events the controller published about `node` with `reason`.
    pub async fn events(&self, node: &str, reason: &str) -> Result<Vec<Event>> {
        let events: Api<Event> = Api::namespaced(self.admin.clone(), "default");
        Ok(events
            .list(&ListParams::default())
            .await?
            .into_iter()
            .filter(|event| {
                event.involved_object.name.as_deref() == Some(node)
                    && event.reason.as_deref() == Some(reason)
                    && event.reporting_component.as_deref() == Some(NAME)
            })
            .collect())
    }

    /// Waits for at least one `reason` event about `node`.
    pub async fn wait_for_event(
        &self,
        node: &str,
        reason: &str,
        replicas: &[&Replica],
    ) -> Result<Event> {
        let outcome = eventually(
            PATIENCE,
            &format!("a {reason} event on node {node}"),
            || async { Ok(self.events(node, reason).await?.into_iter().next()) },
        )
        .await;
        outcome.with_context(|| logs(replicas))
    }

    /// The current holder of the controller's Lease.
    pub async fn lease_holder(&self) -> Result<Option<String>> {
        let leases: Api<Lease> = Api::namespaced(self.admin.clone(), NAMESPACE);
        Ok(leases
            .get_opt(NAME)
            .await?
            .and_then(|lease| lease.spec)
            .and_then(|spec| spec.holder_identity)
            .filter(|holder| !holder.is_empty()))
    }

    pub async fn stop(self) -> Result<()> {
        self.cluster.stop().await
    }
}

impl Replica {
    /// Whether this process holds the lease with `holder` (identity `<host>-<pid>`).
    pub fn is(&self, holder: &str) -> bool {
        holder.ends_with(&format!("-{}", self.process.pid()))
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        http_get(self.metrics_port, "/metrics")
    }

    /// The value of the first sample line starting with `series`.
    pub fn metric(&self, series: &str) -> Result<Option<f64>> {
        Ok(self
            .metrics()?
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok()))
    }

    /// The `/status` document, parsed.
    pub fn status(&self) -> Result<ControllerStatus> {
        let response = http_get(self.metrics_port, "/status")?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("the /status response has no body")?;
        ensure!(head.starts_with("HTTP/1.1 200"), "GET /status: {response}");
        serde_json::from_str(body).with_context(|| format!("reading the /status body {body}"))
    }

    /// Kills it outright (no chance to release the lease), then reaps it.
    pub fn kill_hard(&self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.process.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)
            .context("sending SIGKILL to the controller")?;
        self.process.kill()
    }
}

/// A TCP relay in front of the API server that a test can cut and restore,
/// to put the controller through an API server outage.
pub struct ApiRelay {
    pub address: SocketAddr,
    state: Arc<Mutex<RelayState>>,
    accepting: JoinHandle<()>,
}

#[derive(Default)]
struct RelayState {
    cut: bool,
    connections: Vec<AbortHandle>,
}

impl ApiRelay {
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let state = Arc::new(Mutex::new(RelayState::default()));
        let accepting = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let mut state = state.lock().unwrap();
                    if state.cut {
                        continue; // dropping `inbound` closes it
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    state.connections.push(relay.abort_handle());
                }
            }
        });
        Ok(Self {
            address,
            state,
            accepting,
        })
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.cut = true;
        for connection in state.connections.drain(..) {
            connection.abort();
        }
    }

    /// Relays again.
    pub fn restore(&self) {
        self.state.lock().unwrap().cut = false;
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

/// A plain HTTP/1.1 GET against a local port.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The tail of each replica's log, for failure messages.
pub fn logs(replicas: &[&Replica]) -> String {
    replicas
        .iter()
        .map(|replica| {
            let log = replica.process.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "--- {} (pid {}) ---\n{}",
                replica.process.name(),
                replica.process.pid(),
                tail.join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

async fn create<K>(api: Api<K>, document: serde_yaml::Value) -> Result<()>
where
    K: kube::Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_yaml::from_value(document).context("reading an rbac.yaml document")?;
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(error).with_context(|| format!("creating {}", object.name_any())),
    }
}

/// Creates every object in controller/rbac.yaml.
async fn apply_rbac(admin: &Client) -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let document = serde_yaml::Value::deserialize(document)?;
        let namespace = document["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let client = admin.clone();
        match document["kind"].as_str() {
            Some("ServiceAccount") => create::<ServiceAccount>(Api::namespaced(client, &namespace), document).await?,
            Some("ClusterRole") => create::<ClusterRole>(Api::all(client), document).await?,
            Some("ClusterRoleBinding") => create::<ClusterRoleBinding>(Api::all(client), document).await?,
            Some("Role") => create::<Role>(Api::namespaced(client, &namespace), document).await?,
            Some("RoleBinding") => create::<RoleBinding>(Api::namespaced(client, &namespace), document).await?,
            other => bail!("rbac.yaml holds an unexpected kind {other:?}; the test knows ServiceAccount, ClusterRole(Binding) and Role(Binding)"),
        }
    }
    Ok(())
}
