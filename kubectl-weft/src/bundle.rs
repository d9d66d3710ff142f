//! `kubectl weft bundle`: one gzipped tarball with what a bug report needs,
//! read through the API server alone, and no Secret.
//!
//! The tarball holds one directory, `weft-bundle-<UTC time>/`:
//!
//! - `status.json`, `status.txt`: what `kubectl weft status` finds;
//! - `versions.txt`: the API server's, each Node's (kubelet, kernel, OS,
//!   runtime), the workloads' images, the daemons' builds and this plugin's;
//! - `nodes/<node>/`: the agent's `/status?check=kernel` (`status.json`),
//!   its kernel dump (`dump.json` and readable `routes.txt`, `rules.txt`,
//!   `neighbours.txt`, `fdb.txt`, `links.txt`, `nft-<table>.txt`) and its
//!   recent log (`agent.log`, and `agent.previous.log` after a restart);
//! - `controller/<pod>/`: each replica's `/status` and recent log;
//! - `objects/`: the Nodes, every NetworkPolicy, Weft's DaemonSet,
//!   Deployment, ConfigMaps and daemon Pods, without `managedFields` and
//!   `last-applied-configuration`;
//! - `errors.txt`: every read that failed, and why.
//!
//! What it never holds: Secrets (it reads none), and literal environment
//! values of Weft's pods other than the few the chart sets
//! ([`KEPT_ENV`]); anyone may add an env var to a DaemonSet, and a
//! password pasted there must not travel in a bug report. References
//! (`valueFrom`) stay: they name a Secret, not its content. Other pods are
//! not read at all.
//!
//! A failed read never stops the bundle: it lands in `errors.txt`. Reads
//! run at most [`StatusOptions::concurrency`] at a time, each within
//! [`StatusOptions::request_timeout`]. The tarball is streamed to a
//! partial file beside the target (so thousands of nodes' logs never sit
//! in memory together) and moved into place once complete.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::fs::{self, File};
use std::future::Future;
use std::io::{self, BufWriter};
use std::path::PathBuf;
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;
use futures::{stream, StreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, PodTemplateSpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::version::Info;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, LogParams};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::Value;
use weft_core::status::{AgentStatus, Build, KernelDump};

use crate::error::{Error, Result};
use crate::observe::{
    askable, proxy_get, selector, within, ProxyError, StatusOptions, AGENT_DAEMON_SET,
    CONTROLLER_DEPLOYMENT,
};

/// The ConfigMap the chart mounts into both daemons, read when neither
/// workload exists to name its own.
pub const CONFIG_MAP: &str = "weft-config";
/// Lines of each log kept, from the end.
const LOG_TAIL_LINES: i64 = 5000;
/// Bytes of each log kept, at most.
const LOG_LIMIT_BYTES: i64 = 4 << 20;
/// The least time a cluster-wide list (Nodes, NetworkPolicies) gets: on a
/// large cluster it takes longer than one pod's `/status`.
const LIST_LIMIT: Duration = Duration::from_secs(60);
/// Environment variables whose literal values the chart sets and the
/// bundle keeps: they say how the daemons run and hold nothing secret.
pub const KEPT_ENV: &[&str] = &[
    "RUST_LOG",
    "PLUGIN_SOURCE",
    "CNI_BIN_DIR",
    "CNI_CONF_DIR",
    "WEFT_DAEMONSET",
    "POD_NAMESPACE",
];
/// What replaces any other literal environment value.
pub const REMOVED_VALUE: &str = "(removed by kubectl weft bundle)";
/// The annotation `kubectl apply` leaves: a full copy of the applied
/// object, env values included, so it goes with them.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Where the bundle goes and what its directory is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleTarget {
    /// The tarball's path.
    pub path: PathBuf,
    /// The one directory inside it, `weft-bundle-<UTC time>`.
    pub directory: String,
    /// Replace `path` when it exists.
    pub force: bool,
    /// When the bundle was taken, for the entries' times.
    pub taken: Timestamp,
}

impl BundleTarget {
    /// A bundle taken at `taken`, written to `path` or else to
    /// `weft-bundle-<UTC time>.tar.gz` in the current directory.
    pub fn new(path: Option<PathBuf>, force: bool, taken: Timestamp) -> Self {
        let directory = directory_name(taken);
        BundleTarget {
            path: path.unwrap_or_else(|| PathBuf::from(format!("{directory}.tar.gz"))),
            directory,
            force,
            taken,
        }
    }
}

/// The bundle's directory for a time: `weft-bundle-20240131T235959Z`.
pub fn directory_name(taken: Timestamp) -> String {
    format!("weft-bundle-{}", taken.strftime("%Y%m%dT%H%M%SZ"))
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The tarball.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// How many reads failed (the lines of `errors.txt`).
    pub failed_reads: usize,
}

impl fmt::Display for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wrote {} ({} bytes)", self.path.display(), self.bytes)?;
        match self.failed_reads {
            0 => write!(f, "; every read succeeded"),
            1 => write!(f, "; 1 read failed, see errors.txt in it"),
            n => write!(f, "; {n} reads failed, see errors.txt in it"),
        }
    }
}

/// A read that failed: which, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Failure {
    /// What was read, e.g. `log of pod kube-system/weft-agent-x`.
    pub what: String,
    /// Why it failed.
    pub why: String,
}

impl Failure {
    fn new(what: impl Into<String>, why: impl fmt::Display) -> Self {
        Failure {
            what: what.into(),
            why: why.to_string(),
        }
    }
}

/// Reads the cluster and writes the bundle to `target`. Fails only when
/// the tarball cannot be written (or exists, without `force`); every
/// failed read is in its `errors.txt`.
pub async fn write_bundle(
    client: &Client,
    options: &StatusOptions,
    target: &BundleTarget,
) -> Result<Written> {
    let write_error = |source| Error::Write {
        path: target.path.clone(),
        source,
    };
    // Refused before any read, so a mistaken -f costs nothing.
    if !target.force && target.path.exists() {
        return Err(Error::Exists {
            path: target.path.clone(),
        });
    }
    let mut archive = Archive::create(target).map_err(write_error)?;
    let failed_reads = collect(client, options, &mut archive)
        .await
        .map_err(write_error)?;
    let bytes = archive.finish().map_err(|error| match error.kind() {
        io::ErrorKind::AlreadyExists => Error::Exists {
            path: target.path.clone(),
        },
        _ => write_error(error),
    })?;
    Ok(Written {
        path: target.path.clone(),
        bytes,
        failed_reads,
    })
}

/// The tarball being written: a partial file beside the target, removed
/// unless [`Archive::finish`] moves it into place.
struct Archive {
    builder: Option<tar::Builder<GzEncoder<BufWriter<File>>>>,
    partial: PathBuf,
    target: PathBuf,
    force: bool,
    directory: String,
    mtime: u64,
}

impl Archive {
    fn create(target: &BundleTarget) -> io::Result<Self> {
        let name = target
            .path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
        let mut partial_name = std::ffi::OsString::from(".");
        partial_name.push(name);
        partial_name.push(format!(".{}.partial", std::process::id()));
        let partial = target.path.with_file_name(partial_name);
        let file = File::create(&partial)?;
        let encoder = GzEncoder::new(BufWriter::new(file), Compression::default());
        Ok(Archive {
            builder: Some(tar::Builder::new(encoder)),
            partial,
            target: target.path.clone(),
            force: target.force,
            directory: target.directory.clone(),
            mtime: u64::try_from(target.taken.as_second()).unwrap_or(0),
        })
    }

    /// Adds `contents` as `<directory>/<path>`.
    fn add(&mut self, path: &str, contents: &[u8]) -> io::Result<()> {
        let builder = self
            .builder
            .as_mut()
            .expect("the builder lives until finish");
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(self.mtime);
        builder.append_data(&mut header, format!("{}/{path}", self.directory), contents)
    }

    /// Adds `value` as pretty-printed JSON.
    fn add_json(&mut self, path: &str, value: &impl Serialize) -> io::Result<()> {
        let mut json = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
        json.push(b'\n');
        self.add(path, &json)
    }

    /// Completes the tarball, moves it into place and returns its size.
    fn finish(mut self) -> io::Result<u64> {
        let builder = self.builder.take().expect("the builder lives until finish");
        let file = builder
            .into_inner()?
            .finish()?
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        let bytes = file.metadata()?.len();
        drop(file);
        if self.force {
            fs::rename(&self.partial, &self.target)?;
        } else {
            // A hard link, unlike a rename, refuses to replace a file that
            // appeared while the bundle was read. A file system without
            // hard links gets the rename after a last look.
            match fs::hard_link(&self.partial, &self.target) {
                Ok(()) => fs::remove_file(&self.partial)?,
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => return Err(error),
                Err(_) if !self.target.exists() => fs::rename(&self.partial, &self.target)?,
                Err(error) => return Err(error),
            }
        }
        Ok(bytes)
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        // Gone already when finish moved it; otherwise half a tarball.
        let _ = fs::remove_file(&self.partial);
    }
}

/// Files of the bundle and failed reads, as one reading task found them.
#[derive(Debug, Default)]
struct Part {
    /// Paths inside the bundle directory, and contents.
    files: Vec<(String, Vec<u8>)>,
    failures: Vec<Failure>,
    /// `versions.txt` lines of the daemons read.
    builds: Vec<String>,
}

impl Part {
    fn text(&mut self, path: String, text: String) {
        self.files.push((path, text.into_bytes()));
    }

    fn json(&mut self, path: String, value: &impl Serialize) {
        let mut json = serde_json::to_vec_pretty(value).expect("JSON values serialise");
        json.push(b'\n');
        self.files.push((path, json));
    }
}

/// Reads everything, adds it to `archive` as it comes, and returns how many
/// reads failed.
async fn collect(
    client: &Client,
    options: &StatusOptions,
    archive: &mut Archive,
) -> io::Result<usize> {
    let namespace = options.namespace.as_str();
    let limit = options.request_timeout;
    let list_limit = limit.max(LIST_LIMIT);
    let mut failures = Vec::new();

    let all = ListParams::default();
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let nodes: Api<Node> = Api::all(client.clone());
    let policies: Api<NetworkPolicy> = Api::all(client.clone());
    let (version, nodes, daemon_set, deployment, policies, report) = tokio::join!(
        read(
            limit,
            "get the API server's version".into(),
            client.apiserver_version()
        ),
        read(list_limit, "list nodes".into(), nodes.list(&all)),
        read(
            limit,
            format!("get daemonset {namespace}/{AGENT_DAEMON_SET}"),
            daemon_sets.get(AGENT_DAEMON_SET)
        ),
        read(
            limit,
            format!("get deployment {namespace}/{CONTROLLER_DEPLOYMENT}"),
            deployments.get(CONTROLLER_DEPLOYMENT)
        ),
        read(
            list_limit,
            "list networkpolicies in all namespaces".into(),
            policies.list(&all)
        ),
        crate::status(client, options),
    );
    match report {
        Ok(report) => {
            archive.add_json("status.json", &report)?;
            archive.add("status.txt", report.table().as_bytes())?;
        }
        Err(error) => failures.push(Failure::new("kubectl weft status", error)),
    }
    let version = ok(version, &mut failures);
    let nodes = ok(nodes, &mut failures).map(|list| list.items);
    if let Some(nodes) = &nodes {
        archive.add_json("objects/nodes.json", &object_list(nodes, clean))?;
    }
    if let Some(policies) = ok(policies, &mut failures) {
        archive.add_json(
            "objects/networkpolicies.json",
            &object_list(&policies.items, clean),
        )?;
    }
    let daemon_set = ok(daemon_set, &mut failures);
    let deployment = ok(deployment, &mut failures);
    if let Some(daemon_set) = &daemon_set {
        archive.add_json(
            "objects/daemonset.json",
            &cleaned(daemon_set, redact_workload),
        )?;
    }
    if let Some(deployment) = &deployment {
        archive.add_json(
            "objects/deployment.json",
            &cleaned(deployment, redact_workload),
        )?;
    }
    let agent_template = daemon_set
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .map(|s| &s.template);
    let controller_template = deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .map(|s| &s.template);

    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let agent_list = ListParams::default().labels(&selector(
        daemon_set
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .map(|s| &s.selector),
        "agent",
    ));
    let controller_list = ListParams::default().labels(&selector(
        deployment
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .map(|s| &s.selector),
        "controller",
    ));
    let config_map_names = config_map_names([agent_template, controller_template]);
    let (agent_pods, controller_pods, config_map_reads) = tokio::join!(
        read(
            limit,
            format!("list the agent pods in {namespace}"),
            pods.list(&agent_list)
        ),
        read(
            limit,
            format!("list the controller pods in {namespace}"),
            pods.list(&controller_list)
        ),
        futures::future::join_all(config_map_names.iter().map(|name| read(
            limit,
            format!("get configmap {namespace}/{name}"),
            config_maps.get(name)
        ))),
    );
    for (name, config_map) in config_map_names.iter().zip(config_map_reads) {
        if let Some(config_map) = ok(config_map, &mut failures) {
            archive.add_json(
                &format!("objects/configmap-{}.json", path_component(name)),
                &cleaned(&config_map, clean),
            )?;
        }
    }
    let agent_pods = ok(agent_pods, &mut failures)
        .map(|l| l.items)
        .unwrap_or_default();
    let controller_pods = ok(controller_pods, &mut failures)
        .map(|l| l.items)
        .unwrap_or_default();
    let daemon_pods: Vec<&Pod> = agent_pods.iter().chain(&controller_pods).collect();
    archive.add_json("objects/pods.json", &object_list(&daemon_pods, redact_pod))?;

    let mut agents_on: HashMap<Option<&str>, usize> = HashMap::new();
    for pod in &agent_pods {
        *agents_on.entry(node_of(pod)).or_default() += 1;
    }
    let daemons = agent_pods
        .iter()
        .map(|pod| Daemon {
            pod,
            component: Component::Agent,
            directory: agent_directory(node_of(pod), name_of(pod), agents_on[&node_of(pod)] > 1),
        })
        .chain(controller_pods.iter().map(|pod| Daemon {
            pod,
            component: Component::Controller,
            directory: format!("controller/{}", path_component(name_of(pod))),
        }));
    let mut builds = Vec::new();
    let mut parts = stream::iter(daemons)
        .map(|daemon| read_daemon(client, options, daemon))
        .buffer_unordered(options.concurrency.max(1));
    while let Some(part) = parts.next().await {
        for (path, contents) in &part.files {
            archive.add(path, contents)?;
        }
        failures.extend(part.failures);
        builds.extend(part.builds);
    }
    builds.sort();

    let versions = versions(
        version.as_ref(),
        nodes.as_deref().unwrap_or_default(),
        &[
            (
                format!("daemonset {namespace}/{AGENT_DAEMON_SET}"),
                agent_template,
            ),
            (
                format!("deployment {namespace}/{CONTROLLER_DEPLOYMENT}"),
                controller_template,
            ),
        ],
        &builds,
    );
    archive.add("versions.txt", versions.as_bytes())?;
    failures.sort();
    archive.add("errors.txt", errors_text(&failures).as_bytes())?;
    Ok(failures.len())
}

/// One API read within `limit`, as a [`Failure`] when it fails.
async fn read<T>(
    limit: Duration,
    what: String,
    read: impl Future<Output = kube::Result<T>>,
) -> Result<T, Failure> {
    within(limit, &what, read).await.map_err(|error| {
        let why = match error {
            Error::Read {
                source: kube::Error::Api(status),
                ..
            } => format!("HTTP {}: {}", status.code, status.message.trim()),
            Error::Read { source, .. } => source.to_string(),
            Error::Timeout { seconds, .. } => format!("no answer within {seconds} s"),
            other => other.to_string(),
        };
        Failure { what, why }
    })
}

/// The value of a read, or none with its failure noted.
fn ok<T>(read: Result<T, Failure>, failures: &mut Vec<Failure>) -> Option<T> {
    read.map_err(|failure| failures.push(failure)).ok()
}

/// Which daemon a reading task reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Component {
    Agent,
    Controller,
}

impl Component {
    /// The container's name in the chart, and the log file's stem.
    fn name(self) -> &'static str {
        match self {
            Component::Agent => "agent",
            Component::Controller => "controller",
        }
    }
}

/// One daemon pod to read, and where its files go.
struct Daemon<'a> {
    pod: &'a Pod,
    component: Component,
    directory: String,
}

fn name_of(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// Reads one daemon, one request at a time: its `/status` (an agent's with
/// the kernel check, then its dump) and its logs.
async fn read_daemon(client: &Client, options: &StatusOptions, daemon: Daemon<'_>) -> Part {
    let mut part = Part::default();
    let namespace = options.namespace.as_str();
    let limit = options.request_timeout;
    let pod = name_of(daemon.pod);
    let node = node_of(daemon.pod).unwrap_or("no node");
    let dir = &daemon.directory;
    let component = daemon.component.name();

    match askable(daemon.pod) {
        None => part.failures.push(Failure::new(
            format!("GET /status of pod {namespace}/{pod} ({component} on {node})"),
            format!(
                "not read: the pod is not running with an address (phase {})",
                daemon
                    .pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .unwrap_or("unknown")
            ),
        )),
        Some((_, port)) => {
            let status_query = match daemon.component {
                Component::Agent => "?check=kernel",
                Component::Controller => "",
            };
            let get = |query: &'static str| {
                let what =
                    format!("GET /status{query} of pod {namespace}/{pod} ({component} on {node})");
                async move {
                    proxy_get::<Value>(client, namespace, pod, port, query, limit)
                        .await
                        .map_err(|error| (what, error))
                }
            };
            let status = match get(status_query).await {
                // An agent refuses the kernel check before its first
                // reconcile: its plain document still tells a lot.
                Err((what, ProxyError::Refused(refusal))) if !status_query.is_empty() => {
                    part.failures
                        .push(Failure::new(what, format!("refused: {refusal}")));
                    get("").await
                }
                status => status,
            };
            match status {
                Ok(status) => {
                    let build = status
                        .get("build")
                        .cloned()
                        .and_then(|b| serde_json::from_value::<Build>(b).ok());
                    part.builds.push(match build {
                        Some(b) => format!(
                            "{component} {pod} on {node}: {} (commit {})",
                            b.version, b.commit
                        ),
                        None => format!("{component} {pod} on {node}: no build in its /status"),
                    });
                    part.json(format!("{dir}/status.json"), &status);
                }
                Err((what, error)) => part.failures.push(Failure::new(what, error)),
            }
            if daemon.component == Component::Agent {
                match get("?check=dump").await {
                    Ok(document) => read_dump(&mut part, dir, document, namespace, pod),
                    Err((what, error)) => part.failures.push(Failure::new(what, error)),
                }
            }
        }
    }

    let Some(container) = daemon_container(daemon.pod) else {
        part.failures.push(Failure::new(
            format!("log of pod {namespace}/{pod}"),
            "the pod has no container",
        ));
        return part;
    };
    let restarted = daemon
        .pod
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .any(|s| s.name == container.name && s.restart_count > 0);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for previous in [false, true] {
        if previous && !restarted {
            break;
        }
        let params = LogParams {
            container: Some(container.name.clone()),
            tail_lines: Some(LOG_TAIL_LINES),
            limit_bytes: Some(LOG_LIMIT_BYTES),
            previous,
            ..LogParams::default()
        };
        let which = if previous { "previous log" } else { "log" };
        let what = format!(
            "{which} of pod {namespace}/{pod} container {}",
            container.name
        );
        match read(limit, what, pods.logs(pod, &params)).await {
            Ok(log) => part.text(
                format!("{dir}/{}", log_file_name(daemon.component, previous)),
                log,
            ),
            Err(failure) => part.failures.push(failure),
        }
    }
    part
}

/// Files of an agent's `/status?check=dump` answer: the dump as JSON and
/// as readable text; what the agent could not dump goes to `errors.txt`.
fn read_dump(part: &mut Part, dir: &str, document: Value, namespace: &str, pod: &str) {
    let what = format!("GET /status?check=dump of pod {namespace}/{pod}");
    let dump = match serde_json::from_value::<AgentStatus>(document) {
        Ok(AgentStatus {
            dump: Some(dump), ..
        }) => dump,
        Ok(_) => {
            part.failures.push(Failure::new(
                what,
                "the answer has no dump (an agent older than check=dump?)",
            ));
            return;
        }
        Err(error) => {
            part.failures.push(Failure::new(
                what,
                format!("not a Weft agent status: {error}"),
            ));
            return;
        }
    };
    part.json(format!("{dir}/dump.json"), &dump);
    for error in &dump.errors {
        part.failures.push(Failure::new(
            format!("the kernel dump of pod {namespace}/{pod}"),
            error,
        ));
    }
    for (name, text) in dump_files(&dump) {
        part.text(format!("{dir}/{name}"), text);
    }
}

/// A dump's readable files: one per kind of entry, one per nft table.
pub fn dump_files(dump: &KernelDump) -> Vec<(String, String)> {
    let lines = |entries: &[String]| {
        entries
            .iter()
            .map(|line| format!("{line}\n"))
            .collect::<String>()
    };
    let mut files = vec![
        ("links.txt".to_string(), lines(&dump.links)),
        ("routes.txt".to_string(), lines(&dump.routes)),
        ("rules.txt".to_string(), lines(&dump.rules)),
        ("neighbours.txt".to_string(), lines(&dump.neighbours)),
        ("fdb.txt".to_string(), lines(&dump.fdb)),
    ];
    files.extend(
        dump.tables
            .iter()
            .map(|(table, text)| (format!("nft-{}.txt", path_component(table)), text.clone())),
    );
    files
}

/// The log file of a daemon: `agent.log`, `controller.previous.log`.
fn log_file_name(component: Component, previous: bool) -> String {
    let stem = component.name();
    if previous {
        format!("{stem}.previous.log")
    } else {
        format!("{stem}.log")
    }
}

/// The container whose log is the daemon's: the one serving `metrics`,
/// else the first.
fn daemon_container(pod: &Pod) -> Option<&Container> {
    let containers = &pod.spec.as_ref()?.containers;
    containers
        .iter()
        .find(|c| {
            c.ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some("metrics"))
        })
        .or_else(|| containers.first())
}

/// An agent's directory: `nodes/<node>`; `nodes/<node>/<pod>` when the
/// node has several agent pods (a rollout); `nodes/_unscheduled/<pod>`
/// (no Node name has an underscore) when it has none.
pub fn agent_directory(node: Option<&str>, pod: &str, shared: bool) -> String {
    match node {
        Some(node) if shared => format!("nodes/{}/{}", path_component(node), path_component(pod)),
        Some(node) => format!("nodes/{}", path_component(node)),
        None => format!("nodes/_unscheduled/{}", path_component(pod)),
    }
}

/// A name as one path component: the API server's names are safe already,
/// but nft table names come from the agent.
pub fn path_component(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .collect();
    match safe.as_str() {
        "" | "." | ".." => "_".to_string(),
        _ => safe,
    }
}

/// The ConfigMaps Weft's pod templates use (volumes, `envFrom`, `env`),
/// sorted; the chart's own when no template is known.
fn config_map_names<'a>(
    templates: impl IntoIterator<Item = Option<&'a PodTemplateSpec>>,
) -> Vec<String> {
    let mut names = Vec::new();
    for spec in templates
        .into_iter()
        .flatten()
        .filter_map(|t| t.spec.as_ref())
    {
        for volume in spec.volumes.iter().flatten() {
            names.extend(volume.config_map.as_ref().map(|c| c.name.clone()));
            for source in volume
                .projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten())
            {
                names.extend(source.config_map.as_ref().map(|c| c.name.clone()));
            }
        }
        for container in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            for from in container.env_from.iter().flatten() {
                names.extend(from.config_map_ref.as_ref().map(|c| c.name.clone()));
            }
            for var in container.env.iter().flatten() {
                names.extend(
                    var.value_from
                        .as_ref()
                        .and_then(|v| v.config_map_key_ref.as_ref())
                        .map(|c| c.name.clone()),
                );
            }
        }
    }
    if names.is_empty() {
        names.push(CONFIG_MAP.to_string());
    }
    names.sort();
    names.dedup();
    names
}

/// `objects` as one JSON `List`, each passed through `prepare`.
fn object_list<T: Serialize>(objects: &[T], prepare: fn(&mut Value)) -> Value {
    let items: Vec<Value> = objects.iter().map(|o| cleaned(o, prepare)).collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// `object` as JSON, passed through `prepare`.
fn cleaned<T: Serialize>(object: &T, prepare: fn(&mut Value)) -> Value {
    let mut value = serde_json::to_value(object).expect("API objects serialise");
    prepare(&mut value);
    value
}

/// Drops what only makes an object longer (`managedFields`) or carries a
/// copy of it with nothing removed (`last-applied-configuration`).
pub fn clean(object: &mut Value) {
    let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    metadata.remove("managedFields");
    if let Some(annotations) = metadata
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.remove(LAST_APPLIED);
    }
}

/// [`clean`], and the pod template's literal env values removed.
pub fn redact_workload(workload: &mut Value) {
    clean(workload);
    if let Some(spec) = workload.pointer_mut("/spec/template/spec") {
        redact_env(spec);
    }
}

/// [`clean`], and the pod's literal env values removed.
pub fn redact_pod(pod: &mut Value) {
    clean(pod);
    if let Some(spec) = pod.get_mut("spec") {
        redact_env(spec);
    }
}

/// Replaces each literal `env[].value` of a pod spec's containers with
/// [`REMOVED_VALUE`], except the chart's own ([`KEPT_ENV`]).
fn redact_env(pod_spec: &mut Value) {
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        let containers = pod_spec.get_mut(list).and_then(Value::as_array_mut);
        for container in containers.into_iter().flatten() {
            let env = container.get_mut("env").and_then(Value::as_array_mut);
            for var in env.into_iter().flatten() {
                let kept = var
                    .get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|name| KEPT_ENV.contains(&name));
                if let (false, Some(value)) = (kept, var.get_mut("value")) {
                    *value = Value::from(REMOVED_VALUE);
                }
            }
        }
    }
}

/// `versions.txt`: this plugin, the API server, each Node, the workloads'
/// images and the daemons' builds.
fn versions(
    api_server: Option<&Info>,
    nodes: &[Node],
    workloads: &[(String, Option<&PodTemplateSpec>)],
    daemons: &[String],
) -> String {
    let mut out = String::new();
    let plugin = Build::current();
    let _ = writeln!(
        out,
        "kubectl-weft: {} (commit {})",
        plugin.version, plugin.commit
    );
    match api_server {
        Some(info) => {
            let _ = writeln!(
                out,
                "API server: {} (commit {}, {}, {})",
                info.git_version, info.git_commit, info.go_version, info.platform
            );
        }
        None => out.push_str("API server: unknown (see errors.txt)\n"),
    }

    out.push_str("\nNodes (kubelet, kernel, OS, container runtime, architecture):\n");
    for node in nodes {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        // An unset nodeInfo reads as empty strings, not as none.
        let info = node.status.as_ref().and_then(|s| s.node_info.as_ref());
        match info.filter(|info| !info.kubelet_version.is_empty()) {
            Some(info) => {
                let _ = writeln!(
                    out,
                    "  {name}: kubelet {}, kernel {}, {}, {}, {}",
                    info.kubelet_version,
                    info.kernel_version,
                    info.os_image,
                    info.container_runtime_version,
                    info.architecture
                );
            }
            None => {
                let _ = writeln!(out, "  {name}: no nodeInfo (no kubelet has reported)");
            }
        }
    }

    out.push_str("\nImages:\n");
    for (workload, template) in workloads {
        let Some(spec) = template.and_then(|t| t.spec.as_ref()) else {
            let _ = writeln!(out, "  {workload}: not found");
            continue;
        };
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| ("init container", c));
        for (kind, container) in init.chain(spec.containers.iter().map(|c| ("container", c))) {
            let image = container.image.as_deref().unwrap_or("none");
            let _ = writeln!(out, "  {workload} {kind} {}: {image}", container.name);
        }
    }

    out.push_str("\nDaemons (from their /status):\n");
    if daemons.is_empty() {
        out.push_str("  none answered\n");
    }
    for line in daemons {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// `errors.txt`: a line per failed read.
pub fn errors_text(failures: &[Failure]) -> String {
    if failures.is_empty() {
        return "No read failed.\n".to_string();
    }
    failures
        .iter()
        .map(|f| format!("{}: {}\n", f.what, f.why))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapVolumeSource, EnvFromSource, PodSpec, Volume,
    };
    use serde_json::json;

    use super::*;

    fn taken() -> Timestamp {
        "2024-01-31T23:59:59.75Z".parse().unwrap()
    }

    #[test]
    fn the_directory_and_default_file_are_named_by_utc_time() {
        assert_eq!(directory_name(taken()), "weft-bundle-20240131T235959Z");
        let target = BundleTarget::new(None, false, taken());
        assert_eq!(target.directory, "weft-bundle-20240131T235959Z");
        assert_eq!(
            target.path,
            PathBuf::from("weft-bundle-20240131T235959Z.tar.gz")
        );
        let named = BundleTarget::new(Some("/tmp/x.tgz".into()), true, taken());
        assert_eq!(named.path, PathBuf::from("/tmp/x.tgz"));
        assert_eq!(named.directory, "weft-bundle-20240131T235959Z");
    }

    #[test]
    fn agents_get_a_directory_per_node() {
        assert_eq!(
            agent_directory(Some("n1"), "weft-agent-x", false),
            "nodes/n1"
        );
        assert_eq!(
            agent_directory(Some("n1"), "weft-agent-x", true),
            "nodes/n1/weft-agent-x"
        );
        assert_eq!(
            agent_directory(None, "weft-agent-x", false),
            "nodes/_unscheduled/weft-agent-x"
        );
        assert_eq!(log_file_name(Component::Agent, false), "agent.log");
        assert_eq!(
            log_file_name(Component::Controller, true),
            "controller.previous.log"
        );
    }

    #[test]
    fn names_cannot_leave_their_directory() {
        assert_eq!(path_component("node-1.example.com"), "node-1.example.com");
        assert_eq!(path_component("../etc/passwd"), ".._etc_passwd");
        assert_eq!(path_component(".."), "_");
        assert_eq!(path_component(""), "_");
        assert_eq!(path_component("weft filter"), "weft_filter");
    }

    #[test]
    fn a_dump_reads_as_a_file_per_kind_and_table() {
        let dump = KernelDump {
            links: vec!["weft.1 vxlan".into()],
            routes: vec![
                "10.244.2.0/24 via 10.244.2.0".into(),
                "10.244.3.0/24".into(),
            ],
            rules: vec![],
            neighbours: vec![],
            fdb: vec!["aa:bb dst 192.0.2.2".into()],
            tables: [("inet weft".to_string(), "table inet weft {}\n".to_string())].into(),
            errors: vec![],
        };
        let files = dump_files(&dump);
        let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "links.txt",
                "routes.txt",
                "rules.txt",
                "neighbours.txt",
                "fdb.txt",
                "nft-inet_weft.txt"
            ]
        );
        assert_eq!(files[1].1, "10.244.2.0/24 via 10.244.2.0\n10.244.3.0/24\n");
        assert_eq!(files[3].1, "");
        assert_eq!(files[5].1, "table inet weft {}\n");
    }

    #[test]
    fn objects_lose_managed_fields_last_applied_and_foreign_env_values() {
        let mut daemon_set = json!({
            "metadata": {
                "name": "weft-agent",
                "managedFields": [{"manager": "kubectl"}],
                "annotations": {LAST_APPLIED: "{\"password\":\"x\"}", "keep": "me"}
            },
            "spec": {"template": {"spec": {
                "initContainers": [{"name": "install", "env": [
                    {"name": "CNI_BIN_DIR", "value": "/opt/cni/bin"},
                    {"name": "TOKEN", "value": "hunter2"}
                ]}],
                "containers": [{"name": "agent", "env": [
                    {"name": "RUST_LOG", "value": "info"},
                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                    {"name": "PROXY", "value": "http://user:hunter2@proxy"}
                ]}]
            }}}
        });
        redact_workload(&mut daemon_set);
        let text = daemon_set.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("password"),
            "{text}"
        );
        assert!(!text.contains("managedFields"), "{text}");
        assert_eq!(daemon_set["metadata"]["annotations"], json!({"keep": "me"}));
        let spec = &daemon_set["spec"]["template"]["spec"];
        assert_eq!(spec["initContainers"][0]["env"][0]["value"], "/opt/cni/bin");
        assert_eq!(spec["initContainers"][0]["env"][1]["value"], REMOVED_VALUE);
        assert_eq!(spec["containers"][0]["env"][0]["value"], "info");
        assert_eq!(
            spec["containers"][0]["env"][2]["valueFrom"]["secretKeyRef"]["name"],
            "s"
        );
        assert_eq!(spec["containers"][0]["env"][3]["value"], REMOVED_VALUE);

        let mut pod = json!({"spec": {"ephemeralContainers": [{"env": [{"name": "X", "value": "hunter2"}]}]}});
        redact_pod(&mut pod);
        assert_eq!(
            pod["spec"]["ephemeralContainers"][0]["env"][0]["value"],
            REMOVED_VALUE
        );
    }

    #[test]
    fn the_config_maps_read_are_those_the_templates_use() {
        assert_eq!(config_map_names([None, None]), [CONFIG_MAP]);
        let template = PodTemplateSpec {
            spec: Some(PodSpec {
                volumes: Some(vec![Volume {
                    name: "config".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: "weft-config".into(),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                }]),
                containers: vec![Container {
                    name: "agent".into(),
                    env_from: Some(vec![EnvFromSource {
                        config_map_ref: Some(ConfigMapEnvSource {
                            name: "extra".into(),
                            ..ConfigMapEnvSource::default()
                        }),
                        ..EnvFromSource::default()
                    }]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..PodTemplateSpec::default()
        };
        assert_eq!(
            config_map_names([Some(&template), Some(&template)]),
            ["extra", "weft-config"]
        );
    }

    #[test]
    fn the_summary_and_errors_say_what_failed() {
        let written = Written {
            path: "b.tar.gz".into(),
            bytes: 10,
            failed_reads: 2,
        };
        assert_eq!(
            written.to_string(),
            "wrote b.tar.gz (10 bytes); 2 reads failed, see errors.txt in it"
        );
        assert_eq!(errors_text(&[]), "No read failed.\n");
        assert_eq!(
            errors_text(&[Failure::new("log of pod a", "forbidden")]),
            "log of pod a: forbidden\n"
        );
    }

    #[test]
    fn the_tarball_appears_whole_and_is_not_overwritten_without_force() {
        let dir = std::env::temp_dir().join(format!("weft-bundle-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.tar.gz");
        let target = BundleTarget::new(Some(path.clone()), false, taken());
        let mut archive = Archive::create(&target).unwrap();
        archive.add("errors.txt", b"No read failed.\n").unwrap();
        archive
            .add_json("nodes/n1/status.json", &json!({"node": "n1"}))
            .unwrap();
        assert!(!path.exists(), "the tarball shows before it is complete");
        let bytes = archive.finish().unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), bytes);

        let mut entries = Vec::new();
        let mut tarball =
            tar::Archive::new(flate2::read::GzDecoder::new(File::open(&path).unwrap()));
        for entry in tarball.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            entries.push((entry.path().unwrap().display().to_string(), text));
        }
        assert_eq!(
            entries[0],
            (
                "weft-bundle-20240131T235959Z/errors.txt".to_string(),
                "No read failed.\n".to_string()
            )
        );
        assert_eq!(
            entries[1].0,
            "weft-bundle-20240131T235959Z/nodes/n1/status.json"
        );

        // Without --force the existing file stays, and no partial is left.
        let again = Archive::create(&target).unwrap();
        assert_eq!(
            again.finish().unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), bytes);
        let forced = BundleTarget {
            force: true,
            ..target
        };
        let mut replace = Archive::create(&forced).unwrap();
        replace.add("errors.txt", b"").unwrap();
        replace.finish().unwrap();
        assert_ne!(fs::metadata(&path).unwrap().len(), bytes);
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["b.tar.gz"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
