//! Weft on a dual-stack kubelet cluster, made as kubeadm makes one (IPv4
//! first): three nodes that each run containerd, a kubelet and kube-proxy
//! (nftables mode), one behind the underlay's router, each with an IPv4 and
//! an IPv6 InternalIP; Weft installed from `manifests/` with
//! `clusterCidrV6` set. Checked: every node gets an IPv4 and an IPv6 slice,
//! every pod both addresses from its node's slices, IPv6 pod to pod on one
//! node and across nodes (the routed one included) and node to pod, a
//! `RequireDualStack` Service answering on both ClusterIPs with the
//! client's own address, CoreDNS answering AAAA for it, and pods reaching
//! the outside over IPv6 with their node's address, and `kubectl weft
//! connectivity test` passing every check, IPv6 ones among them. One cluster, torn down
//! on failure too (keeping its logs).
//! Needs root (through `weft_testing::require_root!`: under `CI=true` it
//! never skips), containerd, runc and kubectl.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use weft_core::netns::Netns;
use weft_e2e::{
    command_exists, nslookup_addresses, pod_is_ready, wait_until_dns_ready, Cluster, ClusterNode,
    ClusterSpec, Kubectl, Phases, BUSYBOX_IMAGE, CLUSTER_CIDR_V6, SERVICE_CLUSTER_IP_RANGE_V6,
};
use weft_testing::{eventually, require_root};

/// Guards against a hang, not a timing assertion: on a loaded two-core
/// machine each wait below usually ends within seconds.
const HANG_GUARD: Duration = Duration::from_secs(240);

/// The IPv4 pod network `manifests/` installs.
const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// The test pods' label value (`app=`) and their Service's name.
const APP: &str = "web6";
/// Pods per node: two, so IPv6 is checked between pods of one node too.
const PODS_PER_NODE: usize = 2;
const TEST_PORT: u16 = 8080;
/// The port of the test's server in the outside namespace.
const OUTSIDE_PORT: u16 = 9000;

/// The test pods' `/cgi-bin/peer`: the pod's name and the address the
/// request came from (a printf format: `\n` is a newline).
const PEER_CGI: &str =
    "#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $(hostname) $REMOTE_ADDR\\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_kubelet_cluster_carries_ipv6_across_the_routed_node() -> Result<()> {
    require_root!("kubelet nodes: namespaces, cgroups, containerd");
    for tool in ["containerd", "runc", "kubectl"] {
        ensure!(
            command_exists(tool),
            "{tool} not found: kubelet nodes need Debian's containerd and runc (apt-get install containerd runc) and kubectl"
        );
    }
    let phase = Phases::start("dual-stack");
    let image = weft_e2e::build_weft_image()?;
    phase.done("Weft's image built");
    let cluster = Cluster::start(ClusterSpec {
        routed_nodes: 1,
        dual_stack: true,
        ..ClusterSpec::kubelet_nodes(3, vec![image])
    })
    .await?;
    phase.done("three dual-stack kubelet nodes registered, one behind a router");
    // A failure drops the cluster, which tears it down and keeps its logs.
    checks(&cluster, &phase).await?;
    cluster.stop().await?;
    phase.done("torn down");
    Ok(())
}

/// Everything checked on the running cluster.
async fn checks(cluster: &Cluster, phase: &Phases) -> Result<()> {
    let client = cluster.client().await?;
    let kubectl = Kubectl::new(cluster.kubeconfig());
    let nodes: Api<Node> = Api::all(client.clone());
    for node in cluster.nodes() {
        let object = nodes.get(&node.name).await?;
        let internal: Vec<IpAddr> = object
            .status
            .and_then(|status| status.addresses)
            .unwrap_or_default()
            .into_iter()
            .filter(|address| address.type_ == "InternalIP")
            .filter_map(|address| address.address.parse().ok())
            .collect();
        ensure!(
            internal == node.underlay_ips(),
            "{}'s InternalIPs are {internal:?}, not its underlay addresses {:?}",
            node.name,
            node.underlay_ips()
        );
    }

    weft_e2e::install_from_manifests(cluster).await?;
    phase.done("Weft installed with clusterCidrV6, agents ready, nodes Ready");

    let slices = node_slices(cluster, &nodes).await?;
    phase.done("every node has an IPv4 and an IPv6 slice");

    kubectl.apply_manifest(&test_pods(cluster))?;
    let pods = running_pods(cluster, &client, &slices).await?;
    phase.done("test pods Running with an address of each family from their node's slices");

    pod_to_pod_v6(cluster, &kubectl, &pods)
        .with_context(|| format!("IPv6 routes of the nodes:\n{}", ipv6_routes(cluster)))?;
    phase.done("IPv6 pod to pod on one node and across nodes, node to pod");

    kubectl.apply_manifest(&dual_stack_service())?;
    let cluster_ips = service_cluster_ips(&kubectl)?;
    for (pod, placed) in pods.iter().filter(|(_, placed)| placed.first) {
        for ip in &cluster_ips {
            let client_ip = match ip {
                IpAddr::V4(_) => IpAddr::V4(placed.v4),
                IpAddr::V6(_) => IpAddr::V6(placed.v6),
            };
            service_answers(&kubectl, pod, client_ip, *ip).await?;
        }
    }
    phase.done("the RequireDualStack Service answers on both ClusterIPs with the client's address");

    coredns_answers_aaaa(&client, &kubectl, &pods, &cluster_ips).await?;
    phase.done("CoreDNS answers A and AAAA for the dual-stack Service");

    outside_sees_nodes(cluster, &kubectl, &pods)?;
    phase.done("pods reach the outside over IPv6 with their node's address");

    connectivity_test_covers_ipv6(cluster)?;
    phase.done("kubectl weft connectivity test: every check passes, IPv6 ones too");
    Ok(())
}

/// The checks of `kubectl weft connectivity test` that must run over IPv6
/// on this cluster.
const IPV6_CHECKS: [&str; 7] = [
    "pod-to-pod",
    "pod-to-node",
    "node-to-pod",
    "pod-to-service",
    "pod-to-nodeport",
    "pod-to-hostport",
    "pod-to-external",
];

/// `kubectl weft connectivity test -o json` (the shipped static binary),
/// with the outside's IPv6 server (still answering from
/// [`outside_sees_nodes`]) as `--external`: every check passes, and each
/// of [`IPV6_CHECKS`] has IPv6 rows.
fn connectivity_test_covers_ipv6(cluster: &Cluster) -> Result<()> {
    let binary = weft_testing::printed_path(
        Command::new("bash")
            .arg(weft_testing::repository().join("packaging/build-static.sh"))
            .args(["kubectl-weft", "kubectl-weft"]),
    )?;
    let outside_v6 = cluster
        .outside()
        .ip_v6()
        .context("the outside namespace of a dual-stack cluster has no IPv6 address")?;
    let external = std::net::SocketAddr::from((outside_v6, OUTSIDE_PORT)).to_string();
    let started = std::time::Instant::now();
    let output = Command::new(&binary)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args([
            "connectivity",
            "test",
            "--external",
            &external,
            "-o",
            "json",
        ])
        .output()
        .context("running kubectl weft connectivity test")?;
    let took = started.elapsed();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "connectivity test printed no report (exit {:?}): {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    let not_passed: Vec<&serde_json::Value> =
        rows.iter().filter(|row| row["result"] != "pass").collect();
    ensure!(
        output.status.code() == Some(0) && not_passed.is_empty(),
        "connectivity test exited {:?}; checks that did not pass: {not_passed:#?}",
        output.status.code()
    );
    for check in IPV6_CHECKS {
        ensure!(
            rows.iter()
                .any(|row| row["check"] == check && row["family"] == "IPv6"),
            "no IPv6 {check} row among {} rows",
            rows.len()
        );
    }
    let ipv6 = rows.iter().filter(|row| row["family"] == "IPv6").count();
    eprintln!(
        "dual-stack: kubectl weft connectivity test: {} checks ({ipv6} over IPv6) passed in {:.1} s",
        rows.len(),
        took.as_secs_f64()
    );
    Ok(())
}

/// A node's slices.
#[derive(Debug)]
struct Slices {
    v4: Ipv4Net,
    v6: Ipv6Net,
}

/// Waits until every node carries an IPv4 and an IPv6 slice (spec.podCIDRs,
/// IPv4 first, and Weft's annotations) inside the cluster's pod networks,
/// none shared.
async fn node_slices(cluster: &Cluster, nodes: &Api<Node>) -> Result<BTreeMap<String, Slices>> {
    let cluster_v4: Ipv4Net = CLUSTER_CIDR.parse()?;
    let cluster_v6: Ipv6Net = CLUSTER_CIDR_V6.parse()?;
    let slices = eventually(
        HANG_GUARD,
        "an IPv4 and an IPv6 slice on every node",
        || async {
            let mut slices = BTreeMap::new();
            for node in cluster.nodes() {
                let object = nodes.get(&node.name).await?;
                let cidrs: Vec<IpNet> = object
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.pod_cidrs.clone())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|cidr| cidr.parse().ok())
                    .collect();
                let [IpNet::V4(v4), IpNet::V6(v6)] = cidrs[..] else {
                    return Ok(None);
                };
                let annotations = object.metadata.annotations.unwrap_or_default();
                let annotated = |key: &str| annotations.get(key).cloned().unwrap_or_default();
                ensure!(
                    annotated("weft.dev/pod-cidr") == v4.to_string()
                        && annotated("weft.dev/pod-cidr-v6") == v6.to_string(),
                    "{}'s annotations {annotations:?} disagree with its podCIDRs {cidrs:?}",
                    node.name
                );
                slices.insert(node.name.clone(), Slices { v4, v6 });
            }
            Ok(Some(slices))
        },
    )
    .await?;
    let mut seen = BTreeSet::new();
    for (name, Slices { v4, v6 }) in &slices {
        eprintln!("dual-stack: {name}: {v4} {v6}");
        ensure!(
            cluster_v4.contains(v4) && v4.prefix_len() == 24,
            "{name}'s IPv4 slice {v4} is not a /24 of {cluster_v4}"
        );
        ensure!(
            cluster_v6.contains(v6) && v6.prefix_len() == 64,
            "{name}'s IPv6 slice {v6} is not a /64 of {cluster_v6}"
        );
        ensure!(
            seen.insert(IpNet::from(*v4)) && seen.insert(IpNet::from(*v6)),
            "{name} shares a slice: {v4} {v6}"
        );
    }
    Ok(slices)
}

/// The pod name of test pod `index` on `node`.
fn pod_name(node: &str, index: usize) -> String {
    format!("{APP}-{node}-{index}")
}

/// The test pods: [`PODS_PER_NODE`] busybox web servers bound to each node
/// (`nodeName`), answering `/cgi-bin/peer`, as one List.
fn test_pods(cluster: &Cluster) -> String {
    let mut items = Vec::new();
    for node in cluster.nodes() {
        for index in 0..PODS_PER_NODE {
            items.push(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name(&node.name, index),
                    "namespace": "default",
                    "labels": { "app": APP },
                },
                "spec": {
                    "nodeName": node.name,
                    // httpd as PID 1 ignores SIGTERM; nothing to drain anyway.
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "web",
                        "image": BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", format!(
                            "mkdir -p /www/cgi-bin && printf '{PEER_CGI}' > /www/cgi-bin/peer && chmod +x /www/cgi-bin/peer && exec httpd -f -p {TEST_PORT} -h /www"
                        )],
                        "readinessProbe": { "tcpSocket": { "port": TEST_PORT }, "periodSeconds": 1 },
                    }],
                },
            }));
        }
    }
    serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string()
}

/// A test pod: its node, its addresses, and whether it is its node's first.
#[derive(Debug)]
struct Placed {
    node: String,
    v4: std::net::Ipv4Addr,
    v6: Ipv6Addr,
    first: bool,
}

/// Waits until every test pod is Ready, then checks that its `podIPs` are
/// one of each family, IPv4 first, from its node's slices.
async fn running_pods(
    cluster: &Cluster,
    client: &kube::Client,
    slices: &BTreeMap<String, Slices>,
) -> Result<BTreeMap<String, Placed>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let selector = ListParams::default().labels(&format!("app={APP}"));
    let wanted = cluster.nodes().len() * PODS_PER_NODE;
    let ready = eventually(HANG_GUARD, "every test pod Ready", || async {
        let list = pods.list(&selector).await?;
        let ready: Vec<Pod> = list.items.into_iter().filter(pod_is_ready).collect();
        Ok((ready.len() == wanted).then_some(ready))
    })
    .await?;
    let mut placed = BTreeMap::new();
    for pod in ready {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.node_name.clone())
            .context("a test pod without a node")?;
        let ips: Vec<IpAddr> = pod
            .status
            .as_ref()
            .and_then(|status| status.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        let [IpAddr::V4(v4), IpAddr::V6(v6)] = ips[..] else {
            bail!("{name} on {node} has podIPs {ips:?}, not an IPv4 and an IPv6 address");
        };
        let slice = slices.get(&node).context("a test pod on an unknown node")?;
        ensure!(
            slice.v4.contains(&v4) && slice.v6.contains(&v6),
            "{name}'s addresses {v4} {v6} are not from its node {node}'s slices {slice:?}"
        );
        let first = name == pod_name(&node, 0);
        placed.insert(
            name,
            Placed {
                node,
                v4,
                v6,
                first,
            },
        );
    }
    Ok(placed)
}

/// From each node's first pod, one `kubectl exec` pings every other test
/// pod's IPv6 address and asks its web server who it sees; the answer must
/// name the target and the source's own IPv6 address (no NAT between
/// pods). Then each node pings its own pods over IPv6.
fn pod_to_pod_v6(
    cluster: &Cluster,
    kubectl: &Kubectl,
    pods: &BTreeMap<String, Placed>,
) -> Result<()> {
    for (from, source) in pods.iter().filter(|(_, placed)| placed.first) {
        let targets: Vec<(&String, &Placed)> = pods.iter().filter(|(to, _)| *to != from).collect();
        let mut script = String::new();
        for (to, target) in &targets {
            script.push_str(&format!(
                "echo '== {to}'; ping -c1 -W3 {ip} >/dev/null && echo ping-ok; \
                 printf 'GET /cgi-bin/peer HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} {TEST_PORT} | tail -n1; ",
                ip = target.v6
            ));
        }
        let output = kubectl.run(&["exec", from, "--", "sh", "-c", &script])?;
        let sections: BTreeMap<&str, &str> = output
            .split("== ")
            .filter_map(|section| section.split_once('\n'))
            .collect();
        for (to, target) in &targets {
            let what = format!(
                "{from} ({}, {}) to {to} ({}, {}) over IPv6",
                source.node, source.v6, target.node, target.v6
            );
            let answer = sections
                .get(to.as_str())
                .with_context(|| format!("{what}: no answer in\n{output}"))?;
            ensure!(
                answer.contains("ping-ok"),
                "{what}: no ping reply: {answer:?}"
            );
            let seen = answer.lines().last().unwrap_or_default();
            let [backend, client] = seen.split_whitespace().collect::<Vec<_>>()[..] else {
                bail!("{what}: no HTTP answer: {answer:?}");
            };
            ensure!(
                backend == to.as_str() && unbracket(client) == source.v6.to_string(),
                "{what}: answered by {backend}, who saw the client as {client}"
            );
        }
    }
    for (pod, placed) in pods {
        let node = cluster.node(&placed.node).context("the pod's node")?;
        ensure!(
            node.ping(IpAddr::V6(placed.v6)),
            "{} cannot ping its pod {pod} ({}) over IPv6",
            placed.node,
            placed.v6
        );
    }
    Ok(())
}

/// busybox httpd writes the client address in brackets, `[fd00::1]`, and an
/// IPv4 client as `[::ffff:a.b.c.d]`.
fn unbracket(address: &str) -> &str {
    address
        .trim_matches(|c| c == '[' || c == ']')
        .trim_start_matches("::ffff:")
}

/// A dual-stack Service (`RequireDualStack`, IPv4 first) on port 80 in
/// front of the test pods.
fn dual_stack_service() -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": APP, "namespace": "default" },
        "spec": {
            "ipFamilyPolicy": "RequireDualStack",
            "ipFamilies": ["IPv4", "IPv6"],
            "selector": { "app": APP },
            "ports": [{ "port": 80, "targetPort": TEST_PORT, "protocol": "TCP" }],
        },
    })
    .to_string()
}

/// The test Service's ClusterIPs: an IPv4 one from the primary range, then
/// an IPv6 one from [`SERVICE_CLUSTER_IP_RANGE_V6`].
fn service_cluster_ips(kubectl: &Kubectl) -> Result<Vec<IpAddr>> {
    let text = kubectl.run(&[
        "get",
        "service",
        APP,
        "-o",
        "jsonpath={.spec.clusterIPs[*]}",
    ])?;
    let ips: Vec<IpAddr> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("the ClusterIPs of Service {APP}: {text:?}"))?;
    let range_v6: Ipv6Net = SERVICE_CLUSTER_IP_RANGE_V6.parse()?;
    match ips[..] {
        [IpAddr::V4(_), IpAddr::V6(v6)] if range_v6.contains(&v6) => Ok(ips),
        _ => bail!("Service {APP} has ClusterIPs {ips:?}, not an IPv4 one and one of {range_v6}"),
    }
}

/// Waits until `pod` gets an answer through the Service at `cluster_ip`
/// (kube-proxy programs it shortly after the Service appears) from a
/// backend that saw the client as `client_ip`, or as itself when the
/// request came back to the client (kube-proxy masquerades hairpin traffic).
async fn service_answers(
    kubectl: &Kubectl,
    pod: &str,
    client_ip: IpAddr,
    cluster_ip: IpAddr,
) -> Result<()> {
    let request =
        format!("printf 'GET /cgi-bin/peer HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {cluster_ip} 80");
    eventually(
        HANG_GUARD,
        &format!("{pod} reaching Service {APP} at {cluster_ip}"),
        || async {
            let Ok(answer) = kubectl.run(&["exec", pod, "--", "sh", "-c", &request]) else {
                return Ok(None);
            };
            let line = answer.lines().last().unwrap_or_default();
            let [backend, seen] = line.split_whitespace().collect::<Vec<_>>()[..] else {
                return Ok(None);
            };
            if backend != pod && unbracket(seen) != client_ip.to_string() {
                // A wrong answer ends the wait at once.
                return Ok(Some(Err(anyhow!(
                    "{backend} saw {pod} ({client_ip}) through {cluster_ip} as {seen}"
                ))));
            }
            Ok(Some(Ok(())))
        },
    )
    .await?
}

/// Waits for CoreDNS, then asks it, from each node's first pod, for the
/// test Service's A and AAAA records by full name.
async fn coredns_answers_aaaa(
    client: &kube::Client,
    kubectl: &Kubectl,
    pods: &BTreeMap<String, Placed>,
    cluster_ips: &[IpAddr],
) -> Result<()> {
    wait_until_dns_ready(client, HANG_GUARD).await?;
    let name = format!("{APP}.default.svc.cluster.local");
    for (pod, placed) in pods.iter().filter(|(_, placed)| placed.first) {
        for (record, expected) in ["A", "AAAA"].into_iter().zip(cluster_ips) {
            let query = format!("-type={record}");
            eventually(
                HANG_GUARD,
                &format!("{pod} ({}) resolving {name} ({record})", placed.node),
                || async {
                    let Ok(answer) = kubectl.run(&["exec", pod, "--", "nslookup", &query, &name])
                    else {
                        return Ok(None);
                    };
                    let found = nslookup_addresses(&answer);
                    if found.is_empty() {
                        return Ok(None);
                    }
                    // A wrong answer ends the wait at once.
                    Ok(Some((found == [*expected]).then_some(()).ok_or_else(|| {
                        anyhow!("{pod} resolved {name} ({record}) to {found:?}, not {expected}:\n{answer}")
                    })))
                },
            )
            .await??;
        }
    }
    Ok(())
}

/// A server in the outside namespace answers each connection with the
/// address it came from; each node's first pod must be seen there with
/// its node's IPv6 address (Weft masquerades IPv6 pod traffic leaving the
/// cluster's pod network).
fn outside_sees_nodes(
    cluster: &Cluster,
    kubectl: &Kubectl,
    pods: &BTreeMap<String, Placed>,
) -> Result<()> {
    let outside = cluster.outside().clone();
    let outside_v6 = outside
        .ip_v6()
        .context("the outside namespace of a dual-stack cluster has no IPv6 address")?;
    let listener = Netns::open(format!("/var/run/netns/{}", outside.netns))?
        .run_here(|| std::net::TcpListener::bind((outside_v6, OUTSIDE_PORT)))??;
    // Ends with the test process; it only ever answers this test's pods.
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            if let Ok(peer) = stream.peer_addr() {
                let _ = std::io::Write::write_all(&mut stream, peer.ip().to_string().as_bytes());
            }
        }
    });
    for (pod, placed) in pods.iter().filter(|(_, placed)| placed.first) {
        let node: &ClusterNode = cluster.node(&placed.node).context("the pod's node")?;
        let request = format!("nc -w 5 {outside_v6} {OUTSIDE_PORT} </dev/null");
        let seen = kubectl
            .run(&["exec", pod, "--", "sh", "-c", &request])
            .with_context(|| format!("IPv6 routes of the nodes:\n{}", ipv6_routes(cluster)))?;
        let expected = node.underlay_ip_v6().context("a node without IPv6")?;
        ensure!(
            seen.trim() == expected.to_string(),
            "the outside saw {pod} (on {}) as {seen:?}, not as {expected}",
            placed.node
        );
    }
    Ok(())
}

/// Every node's IPv6 routes, for an error message.
fn ipv6_routes(cluster: &Cluster) -> String {
    let mut text = String::new();
    for node in cluster.nodes() {
        let routes = weft_testing::run(Command::new("ip").args(["-n", &node.netns, "-6", "route"]))
            .unwrap_or_else(|e| format!("({e:#})"));
        text.push_str(&format!("{}:\n{routes}\n", node.name));
    }
    text
}
