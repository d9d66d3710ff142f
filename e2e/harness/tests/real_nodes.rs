//! Weft deployed the way a cluster operator deploys it, on three nodes that
//! each run containerd, a kubelet and kube-proxy, one behind a router: no
//! node Ready before the install; installed from `manifests/` (kube-proxy
//! in nftables mode) and, in a second run, with `helm install` (iptables
//! mode); agents Running everywhere, the init container's plugin installed,
//! nodes Ready with their slices, a Deployment spread over the nodes whose
//! pods reach each other by pod IP, each node reaching its pods, the
//! apiserver reaching every pod through its proxy, a ClusterIP Service
//! reaching every backend from every pod with the client's own address, the
//! cluster DNS (CoreDNS, which the harness deploys) answering every pod for
//! Services, and pods reaching the outside with their node's;
//! `kubectl weft status` (the shipped static binary) healthy, then, after
//! the manifests install: `kubectl weft connectivity test` passing every
//! check and naming the pair of a fault injected, `kubectl weft trace` agreeing with real TCP
//! connections over random NetworkPolicies (pairs on one node and across
//! nodes, both directions), `kubectl weft bundle` holding every node and no
//! Secret's contents, and `status` naming the node and cause of each fault
//! injected in turn (a hostile Node, a route deleted by hand, a leaked
//! address in the plugin's store, an agent stopped, the node write policy
//! deleted); then the
//! uninstall (CoreDNS stays: it is the cluster's, not Weft's), and a
//! teardown that leaves nothing on the host. Also: a run killed outright
//! leaves nothing once cleaned up.
//! Needs root (through `weft_testing::require_root!`: under `CI=true` none
//! skips), containerd and runc.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams};
use tokio::sync::Mutex;
use weft_core::netns::Netns;
use weft_e2e::{
    cleanup_leftovers, command_exists, node_is_ready, nslookup_addresses, pod_is_ready,
    wait_until_dns_ready, Cluster, ClusterNode, ClusterSpec, Kubectl, Phases, ProxyMode,
    BUSYBOX_IMAGE,
};
use weft_testing::{eventually, require_root};

/// The tests here take turns: a few kubelets at a time is all two cores carry.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Guards against a hang, not a timing assertion: on a loaded two-core
/// machine each wait below usually ends within seconds.
const HANG_GUARD: Duration = Duration::from_secs(240);

/// The kernel tunables the kubelet would set; they are global, so the host's
/// values must be the same after the test as before.
const KUBELET_TUNABLES: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// The test Deployment: one busybox web server per node (required
/// anti-affinity), answering with its pod name.
const TEST_DEPLOYMENT: &str = "web";
const TEST_PORT: u16 = 8080;
/// The port of the test's server in the outside namespace.
const OUTSIDE_PORT: u16 = 9000;

#[derive(Debug)]
enum Install {
    /// `kubectl apply -f manifests/` (namespace kube-system).
    Manifests,
    /// `helm install weft charts/weft` into its own namespace.
    Helm { helm: PathBuf },
}

impl Install {
    fn namespace(&self) -> &'static str {
        match self {
            Install::Manifests => "kube-system",
            Install::Helm { .. } => "weft-system",
        }
    }

    /// Each flow runs kube-proxy in one of its two modes, so both are
    /// checked beside Weft.
    fn proxy_mode(&self) -> ProxyMode {
        match self {
            Install::Manifests => ProxyMode::Nftables,
            Install::Helm { .. } => ProxyMode::Iptables,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_on_kubelet_nodes_carries_pod_traffic_across_nodes_and_uninstalls() -> Result<()> {
    require_root!("kubelet nodes: namespaces, cgroups, containerd");
    let _turn = ONE_AT_A_TIME.lock().await;
    let repo = weft_testing::repository()
        .canonicalize()
        .context("locating the repository")?;
    for tool in ["containerd", "runc", "kubectl"] {
        ensure!(
            command_exists(tool),
            "{tool} not found: kubelet nodes need Debian's containerd and runc (apt-get install containerd runc) and kubectl"
        );
    }
    let started = Instant::now();
    let image = weft_e2e::build_weft_image()?;
    let helm = weft_e2e::build_helm()?;
    let build_time = started.elapsed();
    let host = HostState::read()?;

    let mut timings = vec![("image and helm builds".to_owned(), build_time)];
    for install in [Install::Manifests, Install::Helm { helm }] {
        let flow_started = Instant::now();
        let run = flow(&repo, &image, &install)
            .await
            .with_context(|| format!("the flow installing with {install:?}"))?;
        timings.push((format!("flow with {install:?}"), flow_started.elapsed()));
        assert_run_left_nothing(&run)?;
    }
    let after = HostState::read()?;
    ensure!(
        after == host,
        "the host changed: before {host:?}, after {after:?}"
    );
    for (what, time) in &timings {
        eprintln!("real-nodes: {what}: {:.1} s", time.as_secs_f64());
    }
    eprintln!("real-nodes: total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_with_kubelet_nodes_leaves_nothing_after_cleanup() -> Result<()> {
    require_root!("kubelet nodes: namespaces, cgroups, containerd");
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut up = Command::new(env!("CARGO_BIN_EXE_weft-e2e"))
        .args(["up", "--kubelet", "--nodes", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting weft-e2e up")?;
    let mut kubeconfig = String::new();
    BufReader::new(up.stdout.take().context("stdout of weft-e2e up")?)
        .read_line(&mut kubeconfig)
        .context("reading the kubeconfig path")?;
    if kubeconfig.trim().is_empty() {
        let status = up.wait()?;
        bail!("weft-e2e up --kubelet failed ({status}); run it by hand to see why");
    }
    let kubeconfig = PathBuf::from(kubeconfig.trim());
    let dir = kubeconfig.parent().context("the run directory")?.to_owned();
    let run = RunTraces {
        id: dir
            .file_name()
            .context("the run id")?
            .to_string_lossy()
            .into_owned(),
        dir,
    };
    // A container running when the owner dies: a shim, a pause process and
    // a workload, with mounts, inside the node. Host network: no CNI here.
    let kubectl = Kubectl::new(&kubeconfig);
    kubectl.apply_manifest(
        &serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "sleeper", "namespace": "default" },
            "spec": {
                "hostNetwork": true,
                "tolerations": [{ "operator": "Exists" }],
                "containers": [{
                    "name": "sleeper",
                    "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"],
                }],
            },
        })
        .to_string(),
    )?;
    eventually(HANG_GUARD, "the sleeper pod Running", || async {
        let phase = kubectl.run(&["get", "pod", "sleeper", "-o", "jsonpath={.status.phase}"])?;
        Ok((phase == "Running").then_some(()))
    })
    .await?;

    up.kill().context("killing weft-e2e up")?;
    up.wait().context("reaping weft-e2e up")?;
    // Everything dies with the owner (parent-death signals down to each
    // node's init, whose exit ends its PID namespace) ...
    eventually(
        HANG_GUARD,
        "every process of the killed run gone",
        || async { Ok(run_processes(&run.dir).is_empty().then_some(())) },
    )
    .await?;
    // ... and cleanup removes what stays: namespaces, cgroups, files.
    cleanup_leftovers()?;
    assert_run_left_nothing(&run)
}

/// Processes whose command line or mounts mention a run directory.
fn run_processes(dir: &Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mounts =
                std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&dir) || mounts.contains(&dir)
        })
        .collect()
}

/// What a finished run must not leave: identified by its id and directory.
struct RunTraces {
    id: String,
    dir: PathBuf,
}

/// One whole flow on a fresh cluster; returns what identifies the run, for
/// the leftover checks after its teardown.
async fn flow(repo: &Path, image: &Path, install: &Install) -> Result<RunTraces> {
    let phase = Phases::start("real-nodes");
    // One node behind the underlay's router: its pods' traffic must cross
    // an L3 hop, so only the overlay carries it.
    let cluster = Cluster::start(ClusterSpec {
        routed_nodes: 1,
        proxy_mode: install.proxy_mode(),
        ..ClusterSpec::kubelet_nodes(3, vec![image.to_owned()])
    })
    .await?;
    let run = RunTraces {
        id: cluster.run_id(),
        dir: cluster.run_dir().to_owned(),
    };
    let client = cluster.client().await?;
    phase.done("three kubelet nodes registered, one behind a router");
    let kubectl = Kubectl::new(cluster.kubeconfig());
    // No node has a pod network yet, so none is Ready: a CNI config of the
    // host's must not leak into the nodes and stand in for Weft's.
    let nodes: Api<Node> = Api::all(client.clone());
    let ready_early: Vec<String> = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|node| node_is_ready(node))
        .filter_map(|node| node.metadata.name.clone())
        .collect();
    ensure!(
        ready_early.is_empty(),
        "Ready before Weft was installed: {ready_early:?}"
    );

    match install {
        Install::Manifests => {
            kubectl.run(&["apply", "-f", &repo.join("manifests").display().to_string()])?;
        }
        Install::Helm { helm } => {
            weft_testing::run(
                kubectl
                    .helm(helm)
                    .args(["install", "weft"])
                    .arg(repo.join("charts/weft"))
                    .args(["--namespace", install.namespace(), "--create-namespace"]),
            )?;
        }
    }
    let namespace = install.namespace();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let agents = ListParams::default().labels("app.kubernetes.io/component=agent");
    let node_names: BTreeSet<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    eventually(
        HANG_GUARD,
        "an agent pod Running and ready on every node",
        || async {
            let list = pods.list(&agents).await?;
            let ready: BTreeSet<String> = list
                .items
                .iter()
                .filter(|pod| pod_is_ready(pod))
                .filter_map(|pod| pod.spec.as_ref()?.node_name.clone())
                .collect();
            Ok((ready == node_names).then_some(()))
        },
    )
    .await?;
    phase.done("agents Running on every node");

    // The init container ran to completion and left the plugin and the
    // conflist in each node's own /opt/cni/bin and /etc/cni/net.d.
    for pod in pods.list(&agents).await?.items {
        let init = pod
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref())
            .and_then(|statuses| statuses.first())
            .and_then(|status| status.state.as_ref()?.terminated.as_ref())
            .map(|terminated| terminated.exit_code);
        ensure!(
            init == Some(0),
            "the init container of {} did not finish cleanly: {init:?}",
            pod.metadata.name.unwrap_or_default()
        );
    }
    for node in cluster.nodes() {
        for file in ["/opt/cni/bin/weft", "/etc/cni/net.d/10-weft.conflist"] {
            ensure!(
                node_has_file(node, file)?,
                "{} has no {file} after the init container ran",
                node.name
            );
        }
    }

    eventually(HANG_GUARD, "every node Ready", || async {
        let list = nodes.list(&ListParams::default()).await?;
        Ok((list.items.len() == 3 && list.items.iter().all(node_is_ready)).then_some(()))
    })
    .await?;
    phase.done("nodes Ready");

    // Each node shows its own slice of the cluster CIDR.
    let slices = kubectl.run(&[
        "get",
        "nodes",
        "-o",
        r"custom-columns=NAME:.metadata.name,SLICE:.metadata.annotations.weft\.dev/pod-cidr",
        "--no-headers",
    ])?;
    eprintln!("real-nodes: kubectl get nodes (slices):\n{slices}");
    let cluster_cidr: ipnet::Ipv4Net = "10.244.0.0/16".parse()?;
    let mut seen = BTreeSet::new();
    for line in slices.lines() {
        let [name, slice] = line.split_whitespace().collect::<Vec<_>>()[..] else {
            bail!("unexpected line in the node list: {line:?}");
        };
        let slice: ipnet::Ipv4Net = slice
            .parse()
            .with_context(|| format!("node {name} shows no slice: {line:?}"))?;
        ensure!(
            cluster_cidr.contains(&slice) && seen.insert(slice),
            "node {name}'s slice {slice} is outside {cluster_cidr} or shared"
        );
    }

    kubectl.apply_manifest(&test_deployment())?;
    let test_pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let selector = ListParams::default().labels(&format!("app={TEST_DEPLOYMENT}"));
    // Pod name -> (node, pod IP).
    let placed: BTreeMap<String, (String, IpAddr)> =
        eventually(HANG_GUARD, "a test pod Running on every node", || async {
            let list = test_pods.list(&selector).await?;
            let placed: BTreeMap<String, (String, IpAddr)> = list
                .items
                .iter()
                .filter(|pod| pod_is_ready(pod))
                .filter_map(|pod| {
                    let node = pod.spec.as_ref()?.node_name.clone()?;
                    let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
                    Some((pod.metadata.name.clone()?, (node, ip)))
                })
                .collect();
            let spread: BTreeSet<&String> = placed.values().map(|(node, _)| node).collect();
            Ok((placed.len() == 3 && spread.len() == 3).then_some(placed))
        })
        .await?;
    phase.done("test Deployment Running, one pod per node");

    // Pod to pod across nodes, by pod IP: ICMP and a TCP request whose
    // answer names the pod that served it.
    for (from, (from_node, _)) in &placed {
        for (to, (to_node, to_ip)) in &placed {
            if from == to {
                continue;
            }
            kubectl
                .run(&["exec", from, "--", "ping", "-c1", "-W3", &to_ip.to_string()])
                .with_context(|| {
                    format!("pinging {to} ({to_ip}, {to_node}) from {from} ({from_node})")
                })?;
            let request =
                format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {to_ip} {TEST_PORT}");
            let answer = kubectl.run(&["exec", from, "--", "sh", "-c", &request])?;
            ensure!(
                answer.contains(to.as_str()),
                "{from} ({from_node}) asked {to} ({to_ip}, {to_node}) over HTTP and got: {answer}"
            );
        }
    }
    // Each node reaches the pods on it.
    for (pod, (node_name, ip)) in &placed {
        let node = cluster.node(node_name).context("the pod's node")?;
        ensure!(
            node.ping(*ip),
            "{node_name} cannot ping its pod {pod} ({ip})"
        );
    }
    phase.done("pod-to-pod traffic across nodes and node-to-pod checked");

    // The apiserver reaches every pod, as from a control-plane node on the
    // pod network: its proxy to each pod's HTTP port answers with the pod.
    for pod in placed.keys() {
        let path = format!("/api/v1/namespaces/default/pods/{pod}:{TEST_PORT}/proxy/");
        let answer = kubectl
            .run(&["get", "--raw", &path])
            .with_context(|| format!("the apiserver's proxy to {pod}"))?;
        ensure!(answer.contains(pod.as_str()), "{path} answered {answer}");
    }
    phase.done("the apiserver reaches every pod");

    // Services through kube-proxy: the `kubernetes` Service's endpoint is a
    // node, and a ClusterIP in front of the test pods answers every pod,
    // from backends on its own node and on others.
    let endpoints = kubectl.run(&[
        "get",
        "endpoints",
        "kubernetes",
        "-o",
        "jsonpath={.subsets[*].addresses[*].ip}",
    ])?;
    let first_node = cluster.nodes()[0].underlay_ip().to_string();
    ensure!(
        endpoints.trim() == first_node,
        "kubernetes Service endpoints: {endpoints:?}"
    );
    kubectl.apply_manifest(&test_service())?;
    let cluster_ip = kubectl.run(&[
        "get",
        "service",
        TEST_DEPLOYMENT,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    for (from, (_, from_ip)) in &placed {
        let served = std::cell::RefCell::new(BTreeSet::new());
        let request = format!(
            "printf 'GET /cgi-bin/peer HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 80",
            cluster_ip.trim()
        );
        eventually(
            HANG_GUARD,
            &format!("every test pod answering {from} through the Service"),
            || async {
                let Ok(answer) = kubectl.run(&["exec", from, "--", "sh", "-c", &request]) else {
                    return Ok(None);
                };
                // kube-proxy leaves pod-to-Service traffic unmasqueraded, and
                // so must Weft: another backend sees the client pod itself.
                // (A pod reaching itself through the Service is masqueraded by
                // kube-proxy, as hairpin traffic must be.)
                let line = answer.lines().last().unwrap_or_default().to_owned();
                let [backend, seen] = line.split_whitespace().collect::<Vec<_>>()[..] else {
                    return Ok(None);
                };
                // busybox httpd writes an IPv4 client as [::ffff:a.b.c.d].
                let seen = seen
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim_start_matches("::ffff:");
                // A wrong answer ends the wait at once (`Some(Err)`): a
                // probe's error would only count as "not yet".
                if !(backend == from || seen == from_ip.to_string()) {
                    return Ok(Some(Err(anyhow!(
                        "{backend} saw {from} ({from_ip}) as {seen}"
                    ))));
                }
                served.borrow_mut().insert(backend.to_owned());
                Ok((served.borrow().len() == placed.len()).then_some(Ok(())))
            },
        )
        .await??;
    }
    phase.done("a ClusterIP Service reaches every backend from every pod");

    // Cluster DNS: CoreDNS starts once the pod network is up, and every pod
    // resolves Services through it: by full name with nslookup (which asks
    // the pod's nameserver, the kube-dns Service), and by short name through
    // the search path, as programs in a pod resolve names.
    let system_pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let dns_selector = ListParams::default().labels("k8s-app=kube-dns");
    wait_until_dns_ready(&client, HANG_GUARD).await?;
    let service_ip = |namespace: &str, name: &str| -> Result<IpAddr> {
        let ip = kubectl.run(&[
            "get",
            "service",
            name,
            "--namespace",
            namespace,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?;
        ip.trim()
            .parse()
            .with_context(|| format!("the ClusterIP of Service {namespace}/{name}: {ip:?}"))
    };
    let dns_ip = service_ip("kube-system", "kube-dns")?;
    let web_ip = service_ip("default", TEST_DEPLOYMENT)?;
    let kubernetes_ip = service_ip("default", "kubernetes")?;
    for (pod, (node, _)) in &placed {
        let resolv_conf = kubectl.run(&["exec", pod, "--", "cat", "/etc/resolv.conf"])?;
        ensure!(
            resolv_conf.contains(&format!("nameserver {dns_ip}"))
                && resolv_conf
                    .contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
            "{pod} ({node}) has no cluster DNS in its resolv.conf:\n{resolv_conf}"
        );
        // busybox nslookup applies no search path to a name with a dot, so
        // these are full names.
        for (name, expected) in [
            ("web.default.svc.cluster.local", web_ip),
            ("kubernetes.default.svc.cluster.local", kubernetes_ip),
        ] {
            eventually(
                HANG_GUARD,
                &format!("{pod} ({node}) resolving {name}"),
                || async {
                    let Ok(answer) = kubectl.run(&["exec", pod, "--", "nslookup", name]) else {
                        return Ok(None);
                    };
                    Ok(check_resolved(
                        pod,
                        name,
                        expected,
                        nslookup_addresses(&answer),
                        &answer,
                    ))
                },
            )
            .await??;
        }
        // ping prints the address the pod's resolver (search path, ndots)
        // gave before it sends anything; whether a ClusterIP answers ICMP is
        // kube-proxy's business, not the DNS's.
        for (name, expected) in [
            (TEST_DEPLOYMENT, web_ip),
            ("kubernetes.default", kubernetes_ip),
        ] {
            let script = format!("ping -c1 -W1 {name} 2>&1 | head -n1");
            eventually(
                HANG_GUARD,
                &format!("{pod} ({node}) resolving {name} by its short name"),
                || async {
                    let Ok(answer) = kubectl.run(&["exec", pod, "--", "sh", "-c", &script]) else {
                        return Ok(None);
                    };
                    Ok(check_resolved(
                        pod,
                        name,
                        expected,
                        ping_address(&answer),
                        &answer,
                    ))
                },
            )
            .await??;
        }
    }
    phase.done("every pod resolves Services through CoreDNS");

    // Pods to outside the cluster, with kube-proxy's rules in place too:
    // masqueraded to their node's address.
    let outside = cluster.outside().clone();
    let listener = Netns::open(format!("/var/run/netns/{}", outside.netns))?
        .run_here(|| std::net::TcpListener::bind((outside.ip(), OUTSIDE_PORT)))??;
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            if let Ok(peer) = stream.peer_addr() {
                let _ = std::io::Write::write_all(&mut stream, peer.ip().to_string().as_bytes());
            }
        }
    });
    for (pod, (node_name, _)) in &placed {
        let node = cluster.node(node_name).context("the pod's node")?;
        let request = format!("nc -w 5 {} {OUTSIDE_PORT} </dev/null", outside.ip());
        let seen = kubectl.run(&["exec", pod, "--", "sh", "-c", &request])?;
        ensure!(
            seen.trim() == node.underlay_ip().to_string(),
            "the outside saw {pod} (on {node_name}) as {seen:?}"
        );
    }
    phase.done("pods reach the outside with their node's address");

    let status = KubectlWeft::new(&cluster, namespace)?;
    status.healthy()?;
    phase.done("kubectl weft status: healthy");
    if matches!(install, Install::Manifests) {
        let external = SocketAddr::from((outside.ip(), OUTSIDE_PORT));
        connectivity_test_passes_then_names_a_fault(&cluster, &status, external).await?;
        phase.done("kubectl weft connectivity test: every check passes; a fault is named");
        trace_agrees_with_traffic(&cluster, &kubectl, &status, &phase).await?;
        bundle_has_every_node_and_no_secret(&kubectl, &status, &cluster)?;
        phase.done("kubectl weft bundle: every node, no Secret's contents");
        let namespaces = TRACE_NAMESPACES.map(|(name, ..)| name);
        kubectl.run(&[&["delete", "namespace", "--wait=true"][..], &namespaces].concat())?;
        phase.done("trace: namespaces deleted");
        status_names_each_fault(&cluster, &kubectl, &status, repo).await?;
        phase.done("kubectl weft status names each injected fault");
    }

    // Uninstall: the workloads on the pod network first (their pods' CNI
    // DEL needs the plugin), then Weft. CoreDNS is the cluster's and stays
    // installed, scaled to nothing.
    kubectl.run(&["delete", "deployment", TEST_DEPLOYMENT, "--wait=true"])?;
    kubectl.run(&[
        "scale",
        "deployment",
        "coredns",
        "--namespace",
        "kube-system",
        "--replicas=0",
    ])?;
    eventually(HANG_GUARD, "the test and CoreDNS pods gone", || async {
        let test_pods_gone = test_pods.list(&selector).await?.items.is_empty();
        let dns_pods_gone = system_pods.list(&dns_selector).await?.items.is_empty();
        Ok((test_pods_gone && dns_pods_gone).then_some(()))
    })
    .await?;
    match install {
        Install::Manifests => {
            kubectl.run(&[
                "delete",
                "-f",
                &repo.join("manifests").display().to_string(),
                "--wait=true",
            ])?;
        }
        Install::Helm { helm } => {
            weft_testing::run(kubectl.helm(helm).args([
                "uninstall",
                "weft",
                "--namespace",
                namespace,
                "--wait",
            ]))?;
        }
    }
    let every_weft_pod = ListParams::default().labels("app.kubernetes.io/name=weft");
    eventually(HANG_GUARD, "every Weft pod gone", || async {
        Ok(pods
            .list(&every_weft_pod)
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    phase.done("uninstalled");

    // The agents saw their DaemonSet go and removed Weft's node state.
    for node in cluster.nodes() {
        let left = WeftLeftovers::on(node)?;
        ensure!(
            left.is_empty(),
            "{} keeps Weft state after the uninstall: {left:?}",
            node.name
        );
    }
    // The uninstall took nothing of the cluster's DNS.
    kubectl
        .run(&[
            "get",
            "serviceaccount/coredns",
            "configmap/coredns",
            "deployment/coredns",
            "service/kube-dns",
            "--namespace",
            "kube-system",
        ])
        .context("CoreDNS's objects after the uninstall")?;
    kubectl
        .run(&[
            "get",
            "clusterrole/system:coredns",
            "clusterrolebinding/system:coredns",
        ])
        .context("CoreDNS's RBAC after the uninstall")?;

    cluster.stop().await?;
    phase.done("torn down");
    Ok(run)
}

/// The address in busybox ping's first line, `PING <name> (<address>): …`
/// (`ping: bad address '<name>'` when the name did not resolve).
fn ping_address(output: &str) -> Vec<IpAddr> {
    output
        .strip_prefix("PING ")
        .and_then(|rest| rest.split_once('(')?.1.split_once(')'))
        .and_then(|(address, _)| address.parse().ok())
        .into_iter()
        .collect()
}

/// Done (`Some(Ok)`) once `name` resolved to `expected`; not yet (`None`)
/// if it did not resolve (CoreDNS or kube-proxy may still be catching up);
/// a failure that ends the wait (`Some(Err)`) if it resolved to anything
/// else.
fn check_resolved(
    pod: &str,
    name: &str,
    expected: IpAddr,
    found: Vec<IpAddr>,
    answer: &str,
) -> Option<Result<()>> {
    if found.is_empty() {
        return None;
    }
    Some(if found == [expected] {
        Ok(())
    } else {
        Err(anyhow!(
            "{pod} resolved {name} to {found:?}, not the Service's {expected}:\n{answer}"
        ))
    })
}

/// The test pods' `/cgi-bin/peer`: the pod's name and the address the
/// request came from (a printf format: `\n` is a newline).
const PEER_CGI: &str =
    "#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $(hostname) $REMOTE_ADDR\\n";

/// A ClusterIP Service on port 80 in front of the test pods.
fn test_service() -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": TEST_DEPLOYMENT, "namespace": "default" },
        "spec": {
            "selector": { "app": TEST_DEPLOYMENT },
            "ports": [{ "port": 80, "targetPort": TEST_PORT, "protocol": "TCP" }],
        },
    })
    .to_string()
}

/// The test Deployment's manifest.
fn test_deployment() -> String {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": TEST_DEPLOYMENT, "namespace": "default" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": TEST_DEPLOYMENT } },
            "template": {
                "metadata": { "labels": { "app": TEST_DEPLOYMENT } },
                "spec": {
                    "affinity": { "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [{
                            "labelSelector": { "matchLabels": { "app": TEST_DEPLOYMENT } },
                            "topologyKey": "kubernetes.io/hostname",
                        }],
                    }},
                    // httpd as PID 1 ignores SIGTERM; nothing to drain anyway.
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "web",
                        "image": BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", format!(
                            "mkdir -p /www/cgi-bin && hostname > /www/index.html && printf '{PEER_CGI}' > /www/cgi-bin/peer && chmod +x /www/cgi-bin/peer && exec httpd -f -p {TEST_PORT} -h /www"
                        )],
                        "readinessProbe": { "tcpSocket": { "port": TEST_PORT }, "periodSeconds": 1 },
                    }],
                },
            },
        },
    })
    .to_string()
}

/// Weft's state found on a node after the uninstall.
#[derive(Debug, Default)]
struct WeftLeftovers {
    /// Links named like Weft's (`weft.1`, `weft0`) and pod veths.
    links: Vec<String>,
    /// Routes with Weft's protocol number.
    routes: Vec<String>,
    /// nftables tables whose names start with `weft` (`weft`,
    /// `weft-hostport`, `weft-policy`, …).
    tables: Vec<String>,
    /// The plugin, the conflist and the node file.
    files: Vec<String>,
}

impl WeftLeftovers {
    fn on(node: &ClusterNode) -> Result<Self> {
        let run_in_node = |program: &str, args: &[&str]| -> Result<String> {
            weft_testing::run(node.command(program).args(args))
        };
        let links = run_in_node("ip", &["-o", "link", "show"])?
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .filter(|name| name.starts_with("weft") || name.starts_with("veth"))
            .collect();
        let protocol = weft_core::netlink::ROUTE_PROTOCOL.to_string();
        let mut routes = Vec::new();
        for family in ["-4", "-6"] {
            routes.extend(
                run_in_node(
                    "ip",
                    &[family, "route", "show", "table", "all", "proto", &protocol],
                )?
                .lines()
                .map(str::to_owned),
            );
        }
        let tables = run_in_node("nft", &["list", "tables"])?
            .lines()
            .filter(|line| {
                line.split_whitespace()
                    .last()
                    .is_some_and(|name| name.starts_with("weft"))
            })
            .map(str::to_owned)
            .collect();
        let mut files = Vec::new();
        for file in [
            "/opt/cni/bin/weft",
            "/etc/cni/net.d/10-weft.conflist",
            weft_core::nodefile::DEFAULT_NODE_FILE,
        ] {
            if node_has_file(node, file)? {
                files.push(file.to_owned());
            }
        }
        Ok(Self {
            links,
            routes,
            tables,
            files,
        })
    }

    fn is_empty(&self) -> bool {
        self.links.is_empty()
            && self.routes.is_empty()
            && self.tables.is_empty()
            && self.files.is_empty()
    }
}

/// Whether a file exists inside the node (its own mount namespace).
fn node_has_file(node: &ClusterNode, file: &str) -> Result<bool> {
    let machine = node
        .machine
        .as_ref()
        .context("a kubelet node has a machine")?;
    Ok(machine
        .command("test")
        .args(["-e", file])
        .status()
        .with_context(|| format!("looking for {file} on {}", node.name))?
        .success())
}

/// The shipped `kubectl-weft` binary pointed at one cluster.
struct KubectlWeft {
    binary: PathBuf,
    kubeconfig: PathBuf,
    namespace: &'static str,
}

/// What one `kubectl weft … -o json` said: its exit status and report.
struct PluginRun {
    exit: Option<i32>,
    report: serde_json::Value,
}

impl PluginRun {
    /// Runs `command` (which asks for `-o json`) once.
    fn of(command: &mut Command) -> Result<Self> {
        let output = command
            .output()
            .with_context(|| format!("starting {command:?}"))?;
        let report = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "{command:?} printed no report (exit {:?}): {}",
                output.status.code(),
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        Ok(Self {
            exit: output.status.code(),
            report,
        })
    }

    /// Trace's policy verdict for both ends.
    fn allowed(&self) -> Result<bool> {
        self.report["allowed"]
            .as_bool()
            .with_context(|| format!("a trace report without `allowed`: {:#}", self.report))
    }

    /// Whether trace found the agents of both ends enforcing the plan it
    /// computed from the API's objects (both ends are pods here).
    fn enforced_at_both_ends(&self) -> bool {
        ["egress", "ingress"]
            .iter()
            .all(|side| self.report["policy"][side]["fingerprintMatches"] == true)
    }

    /// The warnings of `kind` (as `-o json` spells it) that name `node`.
    fn names(&self, kind: &str, node: &str) -> bool {
        self.report["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|warning| {
                warning["kind"] == kind
                    && warning["nodes"]
                        .as_array()
                        .is_some_and(|nodes| nodes.iter().any(|n| n == node))
            })
    }

    /// The warnings of `kind`, whatever they name.
    fn has(&self, kind: &str) -> bool {
        self.report["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|warning| warning["kind"] == kind)
    }
}

impl KubectlWeft {
    /// The binary as `packaging/build-static.sh` builds it (the image build
    /// already did, so this only checks it is current).
    fn new(cluster: &Cluster, namespace: &'static str) -> Result<Self> {
        let binary = weft_testing::printed_path(
            Command::new("bash")
                .arg(weft_testing::repository().join("packaging/build-static.sh"))
                .args(["kubectl-weft", "kubectl-weft"]),
        )?;
        Ok(KubectlWeft {
            binary,
            kubeconfig: cluster.kubeconfig().to_owned(),
            namespace,
        })
    }

    /// The plugin running `subcommand` against the cluster.
    fn command(&self, subcommand: &str) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["-n", self.namespace, subcommand]);
        command
    }

    /// `status -o json` once.
    fn json(&self) -> Result<PluginRun> {
        PluginRun::of(self.command("status").args(["-o", "json"]))
    }

    /// `trace <from> <to> --port <port>/tcp -o json` once; `from` and `to`
    /// are `namespace/pod`.
    fn trace(&self, from: &str, to: &str, port: u16) -> Result<PluginRun> {
        PluginRun::of(self.command("trace").args([
            from,
            to,
            "--port",
            &format!("{port}/tcp"),
            "-o",
            "json",
        ]))
    }

    /// `bundle -f <file>`, which must succeed.
    fn bundle(&self, file: &Path) -> Result<()> {
        weft_testing::run(self.command("bundle").arg("-f").arg(file))?;
        Ok(())
    }

    /// `status --wait` exits 0; its table is printed for the docs.
    fn healthy(&self) -> Result<()> {
        let output = self.command("status").arg("--wait=4m").output()?;
        let table = String::from_utf8_lossy(&output.stdout);
        eprintln!("real-nodes: kubectl weft status:\n{table}");
        ensure!(
            output.status.success(),
            "kubectl weft status says the cluster is not healthy ({:?}):\n{table}\n{}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// Runs `status` until `seen` holds of its report, which must also exit
    /// 1; `inject` runs before each look, so a fault the agents repair on
    /// their own is made again.
    async fn until(
        &self,
        what: &str,
        mut inject: impl FnMut() -> Result<()>,
        seen: impl Fn(&PluginRun) -> bool,
    ) -> Result<()> {
        let mut last = None;
        let found = eventually(HANG_GUARD, what, || {
            let run = inject().and_then(|()| self.json());
            let outcome = match run {
                Ok(run) if seen(&run) => {
                    let exit = run.exit;
                    Some(exit)
                }
                Ok(run) => {
                    last = Some(run.report);
                    None
                }
                Err(error) => return std::future::ready(Err(error)),
            };
            std::future::ready(Ok(outcome))
        })
        .await
        .with_context(|| format!("last report: {last:#?}"))?;
        ensure!(found == Some(1), "status named it but exited {found:?}");
        let table = self.command("status").output()?;
        eprintln!(
            "real-nodes: kubectl weft status, {what}:\n{}",
            String::from_utf8_lossy(&table.stdout)
        );
        Ok(())
    }
}

/// The connectivity test's checks: every kind must be among the rows, and
/// pass.
const CONNECTIVITY_CHECKS: [&str; 12] = [
    "pod-to-pod",
    "pod-to-node",
    "node-to-pod",
    "pod-to-service",
    "pod-to-nodeport",
    "pod-to-hostport",
    "pod-to-service-dns",
    "pod-to-external",
    "policy-deny",
    "policy-allow",
    "policy-allow-others-denied",
    "policy-removed",
];
/// The nftables table of the connectivity test's fault, in the first node.
const FAULT_TABLE: &str = "weft-e2e-fault";

/// `kubectl weft connectivity test -o json`, the shipped binary, with the
/// outside server as `--external`: every check passes (the time printed).
/// Then with the second node's pods' traffic to the first node's pods
/// dropped on the first node (a table of the test's own, removed after):
/// it exits 1 and names the pair, with what trace says.
async fn connectivity_test_passes_then_names_a_fault(
    cluster: &Cluster,
    weft: &KubectlWeft,
    external: SocketAddr,
) -> Result<()> {
    let started = Instant::now();
    let run = PluginRun::of(weft.command("connectivity").args([
        "test",
        "--external",
        &external.to_string(),
        "-o",
        "json",
    ]))?;
    let took = started.elapsed();
    let rows = run.report["rows"].as_array().cloned().unwrap_or_default();
    let not_passed: Vec<&serde_json::Value> =
        rows.iter().filter(|row| row["result"] != "pass").collect();
    ensure!(
        run.exit == Some(0) && not_passed.is_empty(),
        "connectivity test exited {:?}; checks that did not pass: {not_passed:#?}",
        run.exit
    );
    for check in CONNECTIVITY_CHECKS {
        ensure!(
            rows.iter().any(|row| row["check"] == check),
            "no {check} row among {} rows",
            rows.len()
        );
    }
    eprintln!(
        "real-nodes: kubectl weft connectivity test: {} checks passed in {:.1} s (pods ready after {:.1} s)",
        rows.len(),
        took.as_secs_f64(),
        run.report["setupSeconds"].as_f64().unwrap_or_default()
    );

    let [victim, other, ..] = cluster.nodes() else {
        bail!("the connectivity fault needs two nodes");
    };
    let client = cluster.client().await?;
    // The first run's pods hold the node ports until its namespace is gone.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let labelled = ListParams::default().labels("weft.dev/connectivity-test=true");
    eventually(HANG_GUARD, "the first run's namespace gone", || async {
        Ok(namespaces
            .list_metadata(&labelled)
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let mut slices = Vec::new();
    for node in [other, victim] {
        let object = nodes.get(&node.name).await?;
        let annotations = object.metadata.annotations.unwrap_or_default();
        slices.push(
            annotations
                .get(weft_core::annotations::POD_CIDR)
                .with_context(|| format!("{} has no slice", node.name))?
                .clone(),
        );
    }
    let rules = format!(
        "table inet {FAULT_TABLE} {{ chain forward {{ type filter hook forward priority -5; ip saddr {} ip daddr {} drop; }}; }}",
        slices[0], slices[1]
    );
    weft_testing::run(victim.command("nft").arg(&rules))?;
    let faulty = weft
        .command("connectivity")
        .args(["test", "--check-timeout", "5s"])
        .output();
    weft_testing::run(
        victim
            .command("nft")
            .args(["delete", "table", "inet", FAULT_TABLE]),
    )?;
    let faulty = faulty.context("running connectivity test with the fault")?;
    let table = String::from_utf8_lossy(&faulty.stdout);
    eprintln!(
        "real-nodes: kubectl weft connectivity test, {} dropping {}'s pods' traffic:\n{table}",
        victim.name, other.name
    );
    let failures = table
        .split_once("Failures")
        .map(|(_, rest)| rest)
        .unwrap_or("");
    let named = failures.lines().any(|line| {
        line.starts_with("- pod-to-pod TCP/IPv4:")
            && line.contains(&format!("({}) -> server-", other.name))
            && line.contains(&format!("({})", victim.name))
    });
    ensure!(
        faulty.status.code() == Some(1) && named && failures.contains("  trace: "),
        "with the fault, connectivity test exited {:?} without naming {} -> {} with a trace:\n{table}\n{}",
        faulty.status.code(),
        other.name,
        victim.name,
        String::from_utf8_lossy(&faulty.stderr)
    );
    Ok(())
}

/// Each fault in turn, undone before the next: `kubectl weft status`
/// exits 1 naming the node and the cause, then 0 again.
async fn status_names_each_fault(
    cluster: &Cluster,
    kubectl: &Kubectl,
    status: &KubectlWeft,
    repo: &Path,
) -> Result<()> {
    let client = cluster.client().await?;
    let nodes: Api<Node> = Api::all(client);
    let victim = &cluster.nodes()[0];

    // A hostile Node claiming the first node's address: every agent
    // rejects it, and it runs no agent.
    let impostor: Node = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "impostor",
            "annotations": {"weft.dev/public-ip": victim.underlay_ip().to_string()},
        },
    }))?;
    nodes.create(&Default::default(), &impostor).await?;
    status
        .until(
            "status to name the impostor as rejected and without an agent",
            || Ok(()),
            |run| run.names("peer-rejected", "impostor") && run.names("no-agent", "impostor"),
        )
        .await?;
    nodes.delete("impostor", &Default::default()).await?;
    status.healthy()?;

    // A route of the overlay deleted by hand: drift until the agent's next
    // resync repairs it, so it is deleted again before each look.
    let machine = victim
        .machine
        .as_ref()
        .context("a kubelet node has a machine")?;
    let delete_a_peer_route = || -> Result<()> {
        let routes = weft_testing::run(
            machine
                .command("ip")
                .args(["-j", "route", "show", "proto", "87"]),
        )?;
        let routes: Vec<serde_json::Value> = serde_json::from_str(&routes)?;
        if let Some(destination) = routes
            .iter()
            .filter(|route| route["type"] != "unreachable")
            .find_map(|route| route["dst"].as_str())
        {
            weft_testing::run(machine.command("ip").args([
                "route",
                "del",
                destination,
                "proto",
                "87",
            ]))?;
        }
        Ok(())
    };
    status
        .until(
            "status to name the route deleted on the first node",
            delete_a_peer_route,
            |run| run.names("kernel-drift", &victim.name),
        )
        .await?;
    status.healthy()?;

    // An address in the plugin's store that no pod has, held for an hour.
    let leaked = "/var/lib/cni/networks/weft/10.244.255.254";
    let leak = format!(
        "mkdir -p /var/lib/cni/networks/weft && printf 'leaked-by-test\\neth0' > {leaked} && touch -d '1 hour ago' {leaked}"
    );
    weft_testing::run(machine.command("sh").args(["-c", &leak]))?;
    status
        .until(
            "status to name the leaked address on the first node",
            || Ok(()),
            |run| run.names("leak-suspects", &victim.name),
        )
        .await?;
    weft_testing::run(machine.command("rm").arg(leaked))?;
    status.healthy()?;

    // An agent stopped (frozen, so its pod stays and its port hangs, the
    // hardest case for a reader): its /status does not answer.
    let agent = |signal: &str| {
        weft_testing::run(machine.command("pkill").args([signal, "-x", "weft-agent"]))
    };
    agent("-STOP")?;
    let stopped = status
        .until(
            "status to name the first node's stopped agent",
            || Ok(()),
            |run| {
                ["agent-unreachable", "agent-not-ready", "agent-not-running"]
                    .iter()
                    .any(|kind| run.names(kind, &victim.name))
            },
        )
        .await;
    agent("-CONT")?;
    stopped?;
    status.healthy()?;

    // The node write policy's binding deleted: agents' and kubelets'
    // writes are no longer confined.
    kubectl.run(&[
        "delete",
        "validatingadmissionpolicybinding",
        "weft-node-writers",
    ])?;
    status
        .until(
            "status to say the node write policy is missing",
            || Ok(()),
            |run| run.has("write-policy-missing"),
        )
        .await?;
    kubectl.run(&["apply", "-f", &repo.join("manifests").display().to_string()])?;
    status.healthy()
}

/// The trace phase's namespaces and the labels a `namespaceSelector` tells
/// them apart by: (name, `weft-trace` label, `zone` label).
const TRACE_NAMESPACES: [(&str, &str, &str); 2] =
    [("trace-a", "a", "blue"), ("trace-b", "b", "green")];
/// The label every server pod of the trace phase carries.
const TRACE_SERVER_LABEL: &str = "weft-trace-server";
/// Server pods in the trace phase: two per node.
const TRACE_SERVERS: usize = 6;
/// The ports every server listens on, a busybox httpd on each.
const TRACE_PORTS: [u16; 3] = [7001, 7002, 7003];
/// Names servers give some of their container ports, each server to
/// numbers of its own, so one name stands for different numbers.
const PORT_NAMES: [&str; 2] = ["alpha", "beta"];
/// What a drawn policy isolates for.
const POLICY_TYPES: [&[&str]; 3] = [&["Ingress"], &["Egress"], &["Ingress", "Egress"]];
/// Values of the servers' `role` and `tier` labels.
const ROLES: [&str; 3] = ["web", "db", "cache"];
const TIERS: [&str; 2] = ["front", "back"];
/// Draws of policies tried for one with both verdicts among the checks.
const POLICY_DRAWS: usize = 5;
/// The fewest checks of each verdict a draw must give to be kept.
const EACH_VERDICT_AT_LEAST: usize = 4;
/// Trace runs or connection attempts at once: enough to overlap their
/// waits, few enough for two cores.
const AT_ONCE: usize = 6;
/// busybox nc's connect timeout (`-w`), in seconds.
const CONNECT_TIMEOUT_SECONDS: u32 = 3;
/// How long a connection trace allows gets to succeed: guards against a
/// slow start on a loaded machine, not a timing assertion.
const ALLOWED_PATIENCE: Duration = Duration::from_secs(30);
/// A Secret the bundle must not carry the contents of, labelled as Weft's.
const CANARY_SECRET: &str = "weft-bundle-canary";
/// Its one value.
const CANARY_VALUE: &str = "canary-7d1e5b9c04a2f3e8";

/// A seeded source of choices (splitmix64): the seed printed reproduces
/// the whole draw of pods, policies and checks.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below a usize")
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for last in (1..items.len()).rev() {
            items.swap(last, self.below(last + 1));
        }
    }
}

/// `WEFT_TRACE_SEED` when set, else one from the clock.
fn trace_seed() -> Result<u64> {
    match std::env::var("WEFT_TRACE_SEED") {
        Ok(text) => text
            .parse()
            .with_context(|| format!("WEFT_TRACE_SEED={text:?} is not a number")),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64),
    }
}

/// A server pod of the trace phase as drawn.
struct Server {
    namespace: &'static str,
    name: String,
    node: String,
    role: &'static str,
    tier: &'static str,
    /// Its named container ports: (name, number).
    named_ports: Vec<(&'static str, u16)>,
}

impl Server {
    fn manifest(&self) -> serde_json::Value {
        let ports: Vec<serde_json::Value> = TRACE_PORTS
            .iter()
            .map(
                |port| match self.named_ports.iter().find(|(_, named)| named == port) {
                    Some((name, _)) => serde_json::json!({ "containerPort": port, "name": name }),
                    None => serde_json::json!({ "containerPort": port }),
                },
            )
            .collect();
        let [first, second, last] = TRACE_PORTS;
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": { TRACE_SERVER_LABEL: "true", "role": self.role, "tier": self.tier },
            },
            "spec": {
                "nodeName": self.node,
                // httpd as PID 1 ignores SIGTERM; nothing to drain anyway.
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "server",
                    "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    // Each answer names the pod, so a client sees who answered.
                    "command": ["sh", "-c", format!(
                        "mkdir -p /www && hostname > /www/index.html && httpd -p {first} -h /www && httpd -p {second} -h /www && exec httpd -f -p {last} -h /www"
                    )],
                    "ports": ports,
                }],
            },
        })
    }
}

/// A server with the address its pod got.
struct RunningServer {
    server: Server,
    ip: Ipv4Addr,
}

impl RunningServer {
    /// `namespace/name`, as trace takes it.
    fn reference(&self) -> String {
        format!("{}/{}", self.server.namespace, self.server.name)
    }
}

/// Two servers per node, in namespaces drawn three and three, with drawn
/// labels and named ports.
fn draw_servers(draw: &mut Draw, nodes: &[String]) -> Vec<Server> {
    let mut namespaces: Vec<&'static str> = TRACE_NAMESPACES
        .iter()
        .flat_map(|(name, ..)| [*name; TRACE_SERVERS / 2])
        .collect();
    draw.shuffle(&mut namespaces);
    namespaces
        .into_iter()
        .enumerate()
        .map(|(index, namespace)| {
            let mut ports = TRACE_PORTS;
            draw.shuffle(&mut ports);
            // A pod names both, one or none of its ports.
            let named_ports = PORT_NAMES
                .into_iter()
                .zip(ports)
                .filter(|_| draw.below(3) > 0)
                .collect();
            Server {
                namespace,
                name: format!("server-{index}"),
                node: nodes[index % nodes.len()].clone(),
                role: draw.pick(&ROLES),
                tier: draw.pick(&TIERS),
                named_ports,
            }
        })
        .collect()
}

/// One check: a TCP connection from a server's container to another
/// server's address and port.
struct Check {
    from: usize,
    to: usize,
    port: u16,
}

/// Every pair of servers on one node and as many pairs across nodes, each
/// in both directions: two ports each way on one node, one across nodes.
fn draw_checks(draw: &mut Draw, servers: &[RunningServer]) -> Vec<Check> {
    let (mut same_node, mut cross_node) = (Vec::new(), Vec::new());
    for from in 0..servers.len() {
        for to in from + 1..servers.len() {
            if servers[from].server.node == servers[to].server.node {
                same_node.push((from, to));
            } else {
                cross_node.push((from, to));
            }
        }
    }
    draw.shuffle(&mut cross_node);
    cross_node.truncate(same_node.len() * 2);
    let mut checks = Vec::new();
    for (pairs, ports_each_way) in [(same_node, 2), (cross_node, 1)] {
        for (one, other) in pairs {
            for (from, to) in [(one, other), (other, one)] {
                let mut ports = TRACE_PORTS;
                draw.shuffle(&mut ports);
                checks.extend(
                    ports[..ports_each_way]
                        .iter()
                        .map(|&port| Check { from, to, port }),
                );
            }
        }
    }
    checks
}

/// Three to six NetworkPolicies over the trace namespaces: ingress,
/// egress or both; peers by podSelector, namespaceSelector (with or
/// without a podSelector) and ipBlock (with or without except); ports by
/// number, by name and as ranges, some of them UDP.
fn draw_policies(
    draw: &mut Draw,
    servers: &[RunningServer],
    round: usize,
) -> Vec<serde_json::Value> {
    let count = 3 + draw.below(4);
    (0..count)
        .map(|index| {
            let (namespace, ..) = draw.pick(&TRACE_NAMESPACES);
            let types = draw.pick(&POLICY_TYPES);
            let mut spec = serde_json::json!({
                "podSelector": pod_selector(draw),
                "policyTypes": types,
            });
            for kind in types {
                let (field, peers) = if *kind == "Ingress" {
                    ("ingress", "from")
                } else {
                    ("egress", "to")
                };
                // No rule at all isolates with nothing allowed.
                let rules = draw.pick(&[0, 1, 1, 2]);
                spec[field] = (0..rules)
                    .map(|_| draw_rule(draw, servers, peers))
                    .collect::<Vec<_>>()
                    .into();
            }
            serde_json::json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": { "name": format!("drawn-{round}-{index}"), "namespace": namespace },
                "spec": spec,
            })
        })
        .collect()
}

/// A rule with up to two peers and two ports; none of either means all.
fn draw_rule(draw: &mut Draw, servers: &[RunningServer], peers: &str) -> serde_json::Value {
    let mut rule = serde_json::json!({});
    let count = draw.pick(&[0, 1, 1, 2]);
    if count > 0 {
        rule[peers] = (0..count)
            .map(|_| draw_peer(draw, servers))
            .collect::<Vec<_>>()
            .into();
    }
    let count = draw.pick(&[0, 1, 1, 2]);
    if count > 0 {
        rule["ports"] = (0..count)
            .map(|_| draw_port(draw))
            .collect::<Vec<_>>()
            .into();
    }
    rule
}

fn draw_peer(draw: &mut Draw, servers: &[RunningServer]) -> serde_json::Value {
    match draw.below(6) {
        0 | 1 => serde_json::json!({ "podSelector": pod_selector(draw) }),
        2 => serde_json::json!({ "namespaceSelector": namespace_selector(draw) }),
        3 => serde_json::json!({
            "namespaceSelector": namespace_selector(draw),
            "podSelector": pod_selector(draw),
        }),
        _ => ip_block(draw, servers),
    }
}

/// An ipBlock around a server's address: the cluster's /16, its /24 or
/// the address alone; a wider one sometimes excepts a server inside it.
fn ip_block(draw: &mut Draw, servers: &[RunningServer]) -> serde_json::Value {
    let addresses: Vec<Ipv4Addr> = servers.iter().map(|s| s.ip).collect();
    let around = draw.pick(&addresses);
    let prefix = draw.pick(&[16, 24, 32]);
    let cidr = ipnet::Ipv4Net::new(around, prefix)
        .expect("a prefix of at most 32")
        .trunc();
    let inside: Vec<Ipv4Addr> = addresses
        .into_iter()
        .filter(|ip| prefix < 32 && cidr.contains(ip))
        .collect();
    if inside.is_empty() || draw.below(2) == 0 {
        serde_json::json!({ "ipBlock": { "cidr": cidr.to_string() } })
    } else {
        let hole = draw.pick(&inside);
        serde_json::json!({ "ipBlock": { "cidr": cidr.to_string(), "except": [format!("{hole}/32")] } })
    }
}

fn pod_selector(draw: &mut Draw) -> serde_json::Value {
    match draw.below(5) {
        0 => serde_json::json!({}),
        1 => serde_json::json!({ "matchLabels": { "role": draw.pick(&ROLES) } }),
        2 => serde_json::json!({ "matchLabels": { "tier": draw.pick(&TIERS) } }),
        3 => {
            let mut roles = ROLES;
            draw.shuffle(&mut roles);
            serde_json::json!({ "matchExpressions": [{
                "key": "role",
                "operator": draw.pick(&["In", "NotIn"]),
                "values": &roles[..2],
            }]})
        }
        _ => serde_json::json!({
            "matchLabels": { "role": draw.pick(&ROLES), "tier": draw.pick(&TIERS) },
        }),
    }
}

fn namespace_selector(draw: &mut Draw) -> serde_json::Value {
    match draw.below(4) {
        0 => serde_json::json!({}),
        1 | 2 => {
            serde_json::json!({ "matchLabels": { "weft-trace": draw.pick(&TRACE_NAMESPACES).1 } })
        }
        // Also every namespace without the label, the cluster's own.
        _ => serde_json::json!({ "matchExpressions": [{
            "key": "zone",
            "operator": "NotIn",
            "values": [draw.pick(&TRACE_NAMESPACES).2],
        }]}),
    }
}

fn draw_port(draw: &mut Draw) -> serde_json::Value {
    match draw.below(6) {
        // Without a protocol: TCP.
        0 => serde_json::json!({ "port": draw.pick(&TRACE_PORTS) }),
        1 => serde_json::json!({ "protocol": "TCP", "port": draw.pick(&TRACE_PORTS) }),
        2 => serde_json::json!({ "protocol": "TCP", "port": draw.pick(&PORT_NAMES) }),
        3 => serde_json::json!({ "port": draw.pick(&PORT_NAMES) }),
        4 => {
            let first = draw.pick(&TRACE_PORTS[..2]);
            serde_json::json!({ "protocol": "TCP", "port": first, "endPort": first + 1 })
        }
        _ => serde_json::json!({ "protocol": "UDP", "port": draw.pick(&TRACE_PORTS) }),
    }
}

/// A `v1` List of `items`, for one `kubectl apply`.
fn list(items: impl IntoIterator<Item = serde_json::Value>) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items.into_iter().collect::<Vec<_>>(),
    })
    .to_string()
}

/// `work` on each of `items`, [`AT_ONCE`] at a time, results in order.
fn in_parallel<T: Sync, R: Send>(items: &[T], work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    items
        .chunks(AT_ONCE)
        .flat_map(|chunk| {
            std::thread::scope(|scope| {
                let running: Vec<_> = chunk
                    .iter()
                    .map(|item| scope.spawn(|| work(item)))
                    .collect();
                running
                    .into_iter()
                    .map(|thread| thread.join().expect("a check's thread panicked"))
                    .collect::<Vec<_>>()
            })
        })
        .collect()
}

/// What one TCP connection attempt from a server's container did.
struct Connection {
    connected: bool,
    /// nc's output (the answer, if any) and its exit status.
    output: String,
}

/// One HTTP request with busybox nc from `from`'s container to `to`
/// (busybox nc has no `-z`; an answer proves the connection); an error
/// only when `kubectl exec` did not run it.
fn connect_once(
    kubectl: &Kubectl,
    from: &RunningServer,
    to: &RunningServer,
    port: u16,
) -> Result<Connection> {
    let script = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w {CONNECT_TIMEOUT_SECONDS} {} {port}; echo nc-exit=$?",
        to.ip
    );
    let output = kubectl
        .command()
        .args(["exec", "-n", from.server.namespace, &from.server.name])
        .args(["--", "sh", "-c", &script])
        .output()
        .context("running kubectl exec")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        text.contains("nc-exit="),
        "kubectl exec into {} did not run nc: {}",
        from.reference(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(Connection {
        connected: text.contains("HTTP/1."),
        output: text,
    })
}

/// A connection from `from` to `to`: when trace allows it, attempts until
/// one connects or [`ALLOWED_PATIENCE`] passes; when it denies it, one
/// attempt (the agents already enforce the policies).
fn connect(
    kubectl: &Kubectl,
    from: &RunningServer,
    to: &RunningServer,
    port: u16,
    allowed: bool,
) -> Result<Connection> {
    let deadline = Instant::now() + ALLOWED_PATIENCE;
    loop {
        let attempt = connect_once(kubectl, from, to, port);
        let settled = attempt
            .as_ref()
            .is_ok_and(|connection| connection.connected || !allowed);
        if settled || Instant::now() > deadline {
            return attempt;
        }
    }
}

/// Traces of every check once trace finds the policies enforced at both
/// ends of each.
async fn enforced_traces(
    weft: &KubectlWeft,
    servers: &[RunningServer],
    checks: &[Check],
) -> Result<Vec<PluginRun>> {
    let mut stale = None;
    eventually(
        HANG_GUARD,
        "trace to find the drawn policies enforced on every node",
        || {
            let runs = in_parallel(checks, |check| {
                weft.trace(
                    &servers[check.from].reference(),
                    &servers[check.to].reference(),
                    check.port,
                )
            });
            let outcome = runs.into_iter().collect::<Result<Vec<_>>>().map(|runs| {
                match runs.iter().find(|run| !run.enforced_at_both_ends()) {
                    Some(run) => {
                        stale = Some(run.report.clone());
                        None
                    }
                    None => Some(runs),
                }
            });
            std::future::ready(outcome)
        },
    )
    .await
    .with_context(|| format!("a trace not finding them enforced: {stale:#?}"))
}

/// What is wrong with one check, if anything: trace's verdict against the
/// connection, and what trace says of the path and its own exit status.
fn disagreement(
    from: &RunningServer,
    to: &RunningServer,
    port: u16,
    trace: &PluginRun,
    allowed: bool,
    connection: &Connection,
) -> Option<String> {
    let same_node = from.server.node == to.server.node;
    let report = &trace.report;
    let mut wrong = Vec::new();
    if allowed != connection.connected {
        wrong.push(format!(
            "trace says {}, but the connection {}",
            if allowed { "allowed" } else { "denied" },
            if connection.connected {
                "succeeded"
            } else {
                "failed"
            }
        ));
    }
    if connection.connected && !connection.output.contains(&to.server.name) {
        wrong.push(format!("{} did not answer", to.server.name));
    }
    if report["path"]["sameNode"] != same_node || report["path"]["complete"] != true {
        wrong.push(format!(
            "the path should be complete and sameNode {same_node}"
        ));
    }
    for (end, server) in [("source", from), ("destination", to)] {
        if report[end]["ip"] != server.ip.to_string() || report[end]["node"] != server.server.node {
            wrong.push(format!(
                "the {end} should be {} on {}",
                server.ip, server.server.node
            ));
        }
    }
    let exit = if allowed { 0 } else { 1 };
    if trace.exit != Some(exit) {
        wrong.push(format!("trace exited {:?}, not {exit}", trace.exit));
    }
    (!wrong.is_empty()).then(|| {
        format!(
            "{} ({}) -> {} ({}) port {port}/tcp: {}\ntrace: {report:#}\nconnection: {}",
            from.reference(),
            from.server.node,
            to.reference(),
            to.server.node,
            wrong.join("; "),
            connection.output
        )
    })
}

/// `kubectl weft trace` against real traffic: server pods on every node,
/// random NetworkPolicies over them, and for pairs on one node and across
/// nodes, in both directions, trace's verdict is what a TCP connection
/// does. The namespaces stay, with their policies, for the bundle.
async fn trace_agrees_with_traffic(
    cluster: &Cluster,
    kubectl: &Kubectl,
    weft: &KubectlWeft,
    phase: &Phases,
) -> Result<()> {
    let seed = trace_seed()?;
    eprintln!(
        "real-nodes: trace phase seed {seed} (WEFT_TRACE_SEED={seed} draws the same pods, policies and checks)"
    );
    let mut draw = Draw(seed);
    let nodes: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let servers = draw_servers(&mut draw, &nodes);
    let namespaces = TRACE_NAMESPACES.iter().map(|(name, label, zone)| {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": { "weft-trace": label, "zone": zone } },
        })
    });
    kubectl.apply_manifest(&list(namespaces))?;
    kubectl.apply_manifest(&list(servers.iter().map(Server::manifest)))?;
    let client = cluster.client().await?;
    let addresses: BTreeMap<(String, String), Ipv4Addr> =
        eventually(HANG_GUARD, "every trace server Running", || async {
            let mut addresses = BTreeMap::new();
            for (namespace, ..) in TRACE_NAMESPACES {
                let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
                let listed = pods
                    .list(&ListParams::default().labels(TRACE_SERVER_LABEL))
                    .await?;
                addresses.extend(
                    listed
                        .items
                        .iter()
                        .filter(|pod| pod_is_ready(pod))
                        .filter_map(|pod| {
                            let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
                            Some(((namespace.to_owned(), pod.metadata.name.clone()?), ip))
                        }),
                );
            }
            Ok((addresses.len() == servers.len()).then_some(addresses))
        })
        .await?;
    let servers: Vec<RunningServer> = servers
        .into_iter()
        .map(|server| RunningServer {
            ip: addresses[&(server.namespace.to_owned(), server.name.clone())],
            server,
        })
        .collect();
    phase.done("trace: server pods Running, two per node");

    let checks = draw_checks(&mut draw, &servers);
    let mut kept = None;
    for round in 1..=POLICY_DRAWS {
        let policies = draw_policies(&mut draw, &servers, round);
        for (namespace, ..) in TRACE_NAMESPACES {
            kubectl.run(&["delete", "networkpolicy", "--all", "--namespace", namespace])?;
        }
        kubectl.apply_manifest(&list(policies.iter().cloned()))?;
        let traces = enforced_traces(weft, &servers, &checks).await?;
        let verdicts = traces
            .iter()
            .map(PluginRun::allowed)
            .collect::<Result<Vec<bool>>>()?;
        let allowed = verdicts.iter().filter(|allowed| **allowed).count();
        eprintln!(
            "real-nodes: trace: draw {round}: {} policies, {allowed} of {} checks allowed",
            policies.len(),
            checks.len()
        );
        if allowed.min(checks.len() - allowed) >= EACH_VERDICT_AT_LEAST {
            kept = Some((policies, traces, verdicts));
            break;
        }
    }
    let (policies, traces, verdicts) = kept.with_context(|| {
        format!("{POLICY_DRAWS} draws of policies from seed {seed} all allowed or denied nearly every check")
    })?;
    phase.done("trace: the drawn policies enforced on every node");

    let judged: Vec<(&Check, (&PluginRun, bool))> =
        checks.iter().zip(traces.iter().zip(verdicts)).collect();
    let outcomes = in_parallel(&judged, |(check, (trace, allowed))| {
        let (from, to) = (&servers[check.from], &servers[check.to]);
        let connection = connect(kubectl, from, to, check.port, *allowed)?;
        let same_node = from.server.node == to.server.node;
        let wrong = disagreement(from, to, check.port, trace, *allowed, &connection);
        Ok((same_node, *allowed, wrong))
    });
    let outcomes = outcomes.into_iter().collect::<Result<Vec<_>>>()?;
    let count = |same: bool, allowed: bool| {
        outcomes
            .iter()
            .filter(|(s, a, _)| *s == same && *a == allowed)
            .count()
    };
    eprintln!(
        "real-nodes: trace: {} checks: same node {} allowed, {} denied; across nodes {} allowed, {} denied",
        outcomes.len(),
        count(true, true),
        count(true, false),
        count(false, true),
        count(false, false)
    );
    let wrong: Vec<&String> = outcomes.iter().filter_map(|(.., w)| w.as_ref()).collect();
    ensure!(
        wrong.is_empty(),
        "kubectl weft trace disagrees with real traffic (seed {seed}) in {} of {} checks:\n{}\nthe policies:\n{:#}",
        wrong.len(),
        outcomes.len(),
        wrong.iter().map(|w| w.as_str()).collect::<Vec<_>>().join("\n\n"),
        serde_json::Value::from(policies)
    );
    phase.done("trace: every verdict is what a TCP connection does");
    // One allowed and one denied check across nodes as an operator reads
    // them, for docs/troubleshooting.md.
    for wanted in [true, false] {
        let shown = outcomes
            .iter()
            .zip(&checks)
            .find(|((same, allowed, _), _)| !*same && *allowed == wanted);
        if let Some((_, check)) = shown {
            let (from, to) = (&servers[check.from], &servers[check.to]);
            let output = weft
                .command("trace")
                .args([from.reference(), to.reference(), "--port".into()])
                .arg(format!("{}/tcp", check.port))
                .output()?;
            eprintln!(
                "real-nodes: $ kubectl weft trace {} {} --port {}/tcp\n{}",
                from.reference(),
                to.reference(),
                check.port,
                String::from_utf8_lossy(&output.stdout)
            );
        }
    }
    Ok(())
}

/// `kubectl weft bundle`: every node's status, dump, routes, agent log and
/// nft tables, and no Secret's contents, though a Secret labelled as
/// Weft's sits in Weft's namespace.
fn bundle_has_every_node_and_no_secret(
    kubectl: &Kubectl,
    weft: &KubectlWeft,
    cluster: &Cluster,
) -> Result<()> {
    kubectl.run(&[
        "create",
        "secret",
        "generic",
        CANARY_SECRET,
        "--namespace",
        weft.namespace,
        &format!("--from-literal=token={CANARY_VALUE}"),
    ])?;
    kubectl.run(&[
        "label",
        "secret",
        CANARY_SECRET,
        "--namespace",
        weft.namespace,
        "app.kubernetes.io/name=weft",
    ])?;
    let dir = tempfile::tempdir()?;
    let tarball = dir.path().join("b.tar.gz");
    weft.bundle(&tarball)?;
    weft_testing::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir.path()),
    )?;
    let tops: Vec<PathBuf> = std::fs::read_dir(dir.path())?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect();
    let [top] = &tops[..] else {
        bail!("the bundle holds {tops:?}, not one weft-bundle-* directory");
    };
    ensure!(
        top.file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("weft-bundle-")),
        "the bundle's directory is {}, not weft-bundle-*",
        top.display()
    );
    let non_empty = |path: &Path| -> Result<Vec<u8>> {
        let bytes =
            std::fs::read(path).with_context(|| format!("the bundle's {}", path.display()))?;
        ensure!(
            !bytes.is_empty(),
            "the bundle's {} is empty",
            path.display()
        );
        Ok(bytes)
    };
    let json = |path: &Path| -> Result<serde_json::Value> {
        serde_json::from_slice(&non_empty(path)?)
            .with_context(|| format!("the bundle's {} is not JSON", path.display()))
    };
    json(&top.join("status.json"))?;
    non_empty(&top.join("versions.txt"))?;
    for node in cluster.nodes() {
        let files = top.join("nodes").join(&node.name);
        for file in ["agent.log", "routes.txt"] {
            non_empty(&files.join(file))?;
        }
        for file in ["status.json", "dump.json"] {
            json(&files.join(file))?;
        }
        let tables: Vec<PathBuf> = std::fs::read_dir(&files)?
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name().is_some_and(|name| {
                    let name = name.to_string_lossy();
                    name.starts_with("nft-") && name.ends_with(".txt")
                })
            })
            .collect();
        ensure!(
            !tables.is_empty(),
            "the bundle has no nft-*.txt for {}",
            node.name
        );
        for table in &tables {
            non_empty(table)?;
        }
    }
    if let Ok(errors) = std::fs::read_to_string(top.join("errors.txt")) {
        eprintln!("real-nodes: the bundle's errors.txt:\n{errors}");
    }
    let encoded = weft_testing::run(
        Command::new("sh").args(["-c", &format!("printf %s {CANARY_VALUE} | base64 -w0")]),
    )?;
    let search = Command::new("grep")
        .args(["-rlaF", "-e", CANARY_VALUE, "-e", encoded.trim()])
        .arg(top)
        .output()?;
    ensure!(
        search.status.code() == Some(1),
        "the bundle carries the Secret's contents (grep exited {:?}) in: {}",
        search.status.code(),
        String::from_utf8_lossy(&search.stdout)
    );
    let listing = weft_testing::run(Command::new("tar").arg("-tzvf").arg(&tarball))?;
    eprintln!("real-nodes: kubectl weft bundle:\n{listing}");
    kubectl.run(&[
        "delete",
        "secret",
        CANARY_SECRET,
        "--namespace",
        weft.namespace,
    ])?;
    Ok(())
}

/// After a run's teardown: none of its processes, network namespaces, mount
/// namespaces (seen through any process's mounts), cgroups or files.
fn assert_run_left_nothing(run: &RunTraces) -> Result<()> {
    let dir = run.dir.display().to_string();
    let mut found: Vec<String> = run_processes(&run.dir)
        .into_iter()
        .map(|pid| format!("process {pid} (its command line or mounts name {dir})"))
        .collect();
    let prefix = format!("we2e-{}-", run.id);
    let netns = weft_testing::run(Command::new("ip").args(["netns", "list"]))?;
    found.extend(
        netns
            .lines()
            .filter(|line| line.starts_with(&prefix))
            .map(|line| format!("network namespace {line}")),
    );
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        for cgroup in std::fs::read_dir(hierarchy.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if cgroup.file_name().to_string_lossy().starts_with(&prefix) {
                found.push(format!("cgroup {}", cgroup.path().display()));
            }
        }
    }
    if run.dir.exists() {
        found.push(format!("run directory {dir}"));
    }
    ensure!(found.is_empty(), "run {} left behind: {found:#?}", run.id);
    Ok(())
}

/// Host-wide state the test must not change.
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    tunables: Vec<(String, String)>,
    /// The root network namespace's firewall (iptables-nft shows here too).
    ruleset: String,
}

impl HostState {
    fn read() -> Result<Self> {
        let tunables = KUBELET_TUNABLES
            .iter()
            .map(|key| {
                let value = std::fs::read_to_string(format!("/proc/sys/{key}"))
                    .with_context(|| format!("reading /proc/sys/{key}"))?;
                Ok((key.to_string(), value.trim().to_owned()))
            })
            .collect::<Result<_>>()?;
        let ruleset = weft_testing::run(Command::new("nft").args(["list", "ruleset"]))?;
        Ok(Self { tunables, ruleset })
    }
}
