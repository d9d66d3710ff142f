//! Acceptance tests of the harness itself: a real control plane, nodes, RBAC,
//! pods through a CNI plugin, teardown and crash cleanup. Need root (through
//! `weft_testing::require_root!`: under `CI=true` none skips).

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod as PodObject};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{
    Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use weft_e2e::{cleanup_leftovers, Cluster, ClusterSpec, Segment};
use weft_testing::{eventually, require_root, wait_for};

/// Guards against a hang (e.g. a watch that never delivers); not a timing
/// assertion: every wait below normally ends in well under a second.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// How long a crashed run's processes may take to die after cleanup.
const EXIT_PATIENCE: Duration = Duration::from_secs(5);

/// The reference plugin standing in for `weft` in the runtime-side test.
const BRIDGE_PLUGIN: &str = "/usr/lib/cni/bridge";

fn netns_of_run(run_id: &str) -> Vec<String> {
    weft_testing::run(Command::new("ip").args(["netns", "list"]))
        .expect("ip netns list")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&format!("we2e-{run_id}-")))
        .map(str::to_owned)
        .collect()
}

fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_are_listed_watched_and_leave_nothing_behind() -> Result<()> {
    require_root!("a cluster's network namespaces");
    let cluster = Cluster::start(ClusterSpec {
        nodes: 3,
        routed_nodes: 1,
        underlay_mtu: 1400,
        register_nodes: true,
        ..ClusterSpec::default()
    })
    .await?;
    let run_id = cluster.run_id();
    let run_dir = cluster.run_dir().to_owned();
    let nodes: Api<Node> = Api::all(cluster.client().await?);

    // Listed as a kubelet registers them: Ready, InternalIP = underlay address.
    let listed = nodes.list(&ListParams::default()).await?;
    ensure!(
        listed.items.len() == 3,
        "expected 3 nodes, got {}",
        listed.items.len()
    );
    for node in cluster.nodes() {
        let object = nodes.get(&node.name).await?;
        let status = object.status.context("node status")?;
        let internal_ip = status
            .addresses
            .unwrap_or_default()
            .into_iter()
            .find(|a| a.type_ == "InternalIP")
            .context("InternalIP address")?;
        ensure!(internal_ip.address == node.underlay_ip().to_string());
        let ready = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .context("Ready condition")?;
        ensure!(ready.status == "True");
        let link = weft_testing::run(node.command("ip").args([
            "-o",
            "link",
            "show",
            &node.underlay_link,
        ]))?;
        ensure!(link.contains("mtu 1400"), "{} MTU", node.name);
    }
    let segments: Vec<Segment> = cluster.nodes().iter().map(|n| n.segment).collect();
    ensure!(
        segments == [Segment::Main, Segment::Main, Segment::Routed],
        "{segments:?}"
    );

    // A watch sees an update made after it started.
    let version = listed
        .metadata
        .resource_version
        .context("list resourceVersion")?;
    let mut events = nodes
        .watch(&WatchParams::default(), &version)
        .await?
        .boxed();
    let target = &cluster.nodes()[1].name;
    nodes
        .patch(
            target,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"weft-e2e/touched": "yes"}}})),
        )
        .await?;
    let seen = tokio::time::timeout(HANG_GUARD, async {
        while let Some(event) = events.try_next().await? {
            if let WatchEvent::Modified(node) = event {
                let labels = node.metadata.labels.unwrap_or_default();
                if node.metadata.name.as_ref() == Some(target)
                    && labels.contains_key("weft-e2e/touched")
                {
                    return Ok::<_, anyhow::Error>(true);
                }
            }
        }
        Ok(false)
    })
    .await
    .context("the watch hung")??;
    ensure!(seen, "the watch ended without showing the label update");

    // Nodes reach each other across the router, and the outside namespace.
    let (first, routed) = (&cluster.nodes()[0], &cluster.nodes()[2]);
    ensure!(first.ping(IpAddr::V4(routed.underlay_ip())));
    ensure!(routed.ping(IpAddr::V4(cluster.outside().ip())));

    // A client inside a node namespace reaches the apiserver with the node's kubeconfig.
    let names = list_nodes_from_inside(&first.netns_path(), &first.kubeconfig)?;
    ensure!(names.len() == 3, "from inside {}: {names:?}", first.name);

    // Processes on nodes and on the host are killed at teardown.
    let mut sleeper = Command::new("sleep");
    sleeper.arg("1000");
    let on_node = cluster.spawn_on_node(first, "sleeper-node", sleeper)?;
    let mut sleeper = Command::new("sleep");
    sleeper.arg("1000");
    let on_host = cluster.spawn_host("sleeper-host", sleeper)?;
    ensure!(on_node.is_running() && on_host.is_running());
    let pids = [on_node.pid(), on_host.pid()];
    ensure!(!netns_of_run(&run_id).is_empty());

    cluster.stop().await?;
    let left = netns_of_run(&run_id);
    ensure!(left.is_empty(), "namespaces left: {left:?}");
    for pid in pids {
        ensure!(!pid_exists(pid), "process {pid} survived teardown");
    }
    ensure!(
        !run_dir.exists(),
        "run directory {} left",
        run_dir.display()
    );
    Ok(())
}

/// Lists node names from a thread that entered `netns`, so every socket the
/// client opens is made inside it, as for a process running on the node.
fn list_nodes_from_inside(netns: &Path, kubeconfig: &Path) -> Result<Vec<String>> {
    let (netns, kubeconfig) = (netns.to_owned(), kubeconfig.to_owned());
    std::thread::spawn(move || -> Result<Vec<String>> {
        let file = std::fs::File::open(&netns)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let config = kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&kubeconfig)?,
                &Default::default(),
            )
            .await?;
            let nodes: Api<Node> = Api::all(kube::Client::try_from(config)?);
            let list = nodes.list(&ListParams::default()).await?;
            Ok(list
                .items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the in-namespace client thread panicked"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_is_denied_until_bound_to_a_role() -> Result<()> {
    require_root!("a cluster's network namespaces");
    let cluster = Cluster::start_control_plane_only().await?;
    let pods: Api<PodObject> = Api::namespaced(
        cluster.service_account_client("default", "reader").await?,
        "default",
    );

    let denied = pods.list(&ListParams::default()).await;
    ensure!(
        matches!(&denied, Err(kube::Error::Api(status)) if status.code == 403),
        "expected 403 without RBAC, got {denied:?}"
    );

    let admin = cluster.client().await?;
    let role = Role {
        metadata: ObjectMeta {
            name: Some("pod-reader".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &role)
        .await?;
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("reader-reads-pods".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "pod-reader".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reader".into(),
            namespace: Some("default".into()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin, "default")
        .create(&PostParams::default(), &binding)
        .await?;

    // The RBAC authorizer reads bindings from an informer: allow it to catch up.
    // Only a 403 means "not yet": any other error ends the wait (`Some(Err)`).
    eventually(
        HANG_GUARD,
        "the reader allowed after the RoleBinding",
        || async {
            match pods.list(&ListParams::default()).await {
                Ok(_) => Ok(Some(Ok(()))),
                Err(kube::Error::Api(status)) if status.code == 403 => Ok(None),
                Err(e) => Ok(Some(Err(e))),
            }
        },
    )
    .await??;
    // Still nothing beyond the role.
    let nodes: Api<Node> = Api::all(cluster.service_account_client("default", "reader").await?);
    ensure!(
        nodes.list(&ListParams::default()).await.is_err(),
        "nodes must stay forbidden"
    );
    cluster.stop().await
}

/// The reference `bridge` plugin (Debian's containernetworking-plugins)
/// stands in for `weft` to check the runtime side: ADD with CNI_* and stdin
/// inside the node namespace, result parsing, DEL with prevResult.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_wired_by_a_cni_plugin_reach_each_other() -> Result<()> {
    require_root!("a cluster's network namespaces");
    let bridge = PathBuf::from(BRIDGE_PLUGIN);
    ensure!(
        bridge.exists(),
        "{BRIDGE_PLUGIN} is missing: apt-get install containernetworking-plugins (scripts/deps installs it)"
    );
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        register_nodes: false,
        ..ClusterSpec::default()
    })
    .await?;
    let node = &cluster.nodes()[0];
    let netconf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "e2e-bridge",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipam": {
            "type": "host-local",
            "subnet": "10.244.0.0/24",
            "dataDir": node.state_dir.join("ipam"),
        },
    })
    .to_string();
    let a = node.add_pod(&bridge, &netconf, "a")?;
    let b = node.add_pod(&bridge, &netconf, "b")?;
    let (a_ip, b_ip) = (
        a.ip().context("pod a address")?,
        b.ip().context("pod b address")?,
    );
    ensure!(a_ip != b_ip);
    ensure!(a.ping(b_ip), "pod a cannot reach pod b at {b_ip}");
    ensure!(node.ping(a_ip), "the node cannot reach pod a at {a_ip}");
    let b_netns = b.netns.clone();
    b.delete()?;
    ensure!(!Path::new("/var/run/netns").join(&b_netns).exists());
    // DEL (run with the same identity as ADD) released the address.
    let lease = node
        .state_dir
        .join("ipam/e2e-bridge")
        .join(b_ip.to_string());
    ensure!(
        !lease.exists(),
        "{} still leased after DEL",
        lease.display()
    );
    cluster.stop().await
}

/// A cleanup that keeps its runs elsewhere (`WEFT_E2E_RUNS`) knows nothing
/// of this run's directory, and still leaves it alone while its owner
/// lives; a namespace whose owner is gone it removes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_with_another_runs_root_spares_a_live_run() -> Result<()> {
    require_root!("a cluster's network namespaces");
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        register_nodes: true,
        ..ClusterSpec::default()
    })
    .await?;
    let run_id = cluster.run_id();
    let before = netns_of_run(&run_id);
    ensure!(!before.is_empty());
    let mut gone = Command::new("true").spawn()?;
    gone.wait()?;
    let orphan = format!("we2e-{}-0-orphan", gone.id());
    ensure!(Command::new("ip")
        .args(["netns", "add", &orphan])
        .status()?
        .success());

    let other_root = tempfile::tempdir()?;
    let status = Command::new(env!("CARGO_BIN_EXE_weft-e2e"))
        .arg("cleanup")
        .env("WEFT_E2E_RUNS", other_root.path())
        .status()?;
    let orphan_left = !netns_of_run(&format!("{}-0", gone.id())).is_empty();
    if orphan_left {
        let _ = Command::new("ip").args(["netns", "del", &orphan]).status();
    }
    ensure!(status.success(), "weft-e2e cleanup failed: {status}");
    ensure!(
        !orphan_left,
        "the namespace {orphan} of a gone owner was left"
    );
    ensure!(
        netns_of_run(&run_id) == before,
        "the live run lost namespaces"
    );
    ensure!(cluster.run_dir().exists());
    let nodes: Api<Node> = Api::all(cluster.client().await?);
    ensure!(nodes.list(&ListParams::default()).await?.items.len() == 1);
    cluster.stop().await
}

#[test]
fn a_crashed_run_is_cleaned_up() -> Result<()> {
    require_root!("a cluster's network namespaces");
    let mut up = Command::new(env!("CARGO_BIN_EXE_weft-e2e"))
        .args(["up", "--nodes", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(up.stdout.take().context("stdout")?).read_line(&mut line)?;
    let kubeconfig = PathBuf::from(line.trim());
    let run_dir = kubeconfig.parent().context("run directory")?.to_owned();
    let run_id = run_dir
        .file_name()
        .context("run id")?
        .to_string_lossy()
        .into_owned();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("state.json"))?)?;
    let pids: Vec<u32> = state["processes"]
        .as_array()
        .context("processes")?
        .iter()
        .map(|p| p["pid"].as_u64().map(|pid| pid as u32).context("pid"))
        .collect::<Result<_>>()?;
    ensure!(!pids.is_empty() && !netns_of_run(&run_id).is_empty());

    // A crash: no teardown runs.
    up.kill()?;
    up.wait()?;
    ensure!(run_dir.exists() && !netns_of_run(&run_id).is_empty());

    cleanup_leftovers()?;
    let left = netns_of_run(&run_id);
    ensure!(left.is_empty(), "namespaces left: {left:?}");
    ensure!(
        !run_dir.exists(),
        "run directory {} left",
        run_dir.display()
    );
    // The control plane died with its parent (PR_SET_PDEATHSIG) or by cleanup.
    for pid in pids {
        wait_for(EXIT_PATIENCE, &format!("process {pid} to exit"), || {
            Ok((!pid_exists(pid)).then_some(()))
        })
        .with_context(|| format!("process {pid} of the crashed run survived"))?;
    }
    Ok(())
}
