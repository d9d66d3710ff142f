//! `kubectl weft trace` against a real kube-apiserver (the e2e harness's
//! control plane, no kubelets): pods as objects whose status the test sets
//! (node, address), NetworkPolicies, and the two nodes' agents stood in for
//! by fake daemons whose `/status` (policy fingerprint, kernel entries
//! toward the other node) is read through the API server's pod proxy.
//!
//! What each agent enforces is compiled here from the API objects with
//! weft-policy, as an agent does, so the plugin's expected fingerprint is
//! checked against a compile it did not make.

mod common;

use std::collections::BTreeMap;
use std::process::Output;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use weft_e2e::Cluster;
use weft_policy::compile::compile;
use weft_policy::model::{screen_pod_addresses, NamespaceRecord, PodRecord, PolicyRecord};
use weft_testing::{eventually, require_root};

use common::{
    agent_document, create_nodes, create_workloads, fake_daemon, node, plugin, serve_document,
    stdout, PATIENCE,
};

/// The namespace of the traced pods.
const SHOP: &str = "shop";
/// The two nodes, their slices and their fake agents' pods and ports.
const NODES: [(&str, &str, &str, u16); 2] = [
    ("node-a", "10.244.1.0/24", "weft-agent-a", 19475),
    ("node-b", "10.244.2.0/24", "weft-agent-b", 19476),
];

/// A pod in `shop` with `labels` on `node` at `ip`, declaring `ports`, as a
/// kubelet would report it running.
async fn pod(
    client: &Client,
    name: &str,
    app: &str,
    node: &str,
    ip: &str,
    ports: &[u16],
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SHOP);
    let ports: Vec<Value> = ports
        .iter()
        .map(|port| json!({"containerPort": port}))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": app, "image": "localhost/shop:test", "ports": ports}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

async fn policy(client: &Client, spec: Value) -> Result<()> {
    let policy: NetworkPolicy = serde_json::from_value(spec)?;
    Api::<NetworkPolicy>::namespaced(client.clone(), SHOP)
        .create(&PostParams::default(), &policy)
        .await
        .context("creating a NetworkPolicy")?;
    Ok(())
}

/// The fingerprint of what each node's agent would enforce now: every
/// object read from the API, screened with both nodes' slices, compiled
/// for the node.
async fn compiled_fingerprints(client: &Client) -> Result<BTreeMap<String, String>> {
    let all = ListParams::default();
    let pods = Api::<Pod>::all(client.clone()).list(&all).await?;
    let namespaces = Api::<Namespace>::all(client.clone()).list(&all).await?;
    let policies = Api::<NetworkPolicy>::all(client.clone()).list(&all).await?;
    let slices = NODES
        .iter()
        .map(|(node, slice, _, _)| Ok((node.to_string(), vec![slice.parse()?])))
        .collect::<Result<_>>()?;
    let screened = screen_pod_addresses(pods.iter().filter_map(PodRecord::of).collect(), &slices);
    let namespaces: Vec<_> = namespaces.iter().filter_map(NamespaceRecord::of).collect();
    let policies: Vec<_> = policies
        .iter()
        .map(PolicyRecord::of)
        .collect::<Result<_, _>>()?;
    Ok(NODES
        .iter()
        .map(|(node, ..)| {
            let plan = compile(node, &screened.pods, &namespaces, &policies);
            (node.to_string(), plan.fingerprint())
        })
        .collect())
}

/// The entries a node holds toward `peer`, in kernel_check's words and
/// order.
fn entries_toward(peer: &str) -> Vec<String> {
    let number = if peer == NODES[0].0 { 1 } else { 2 };
    vec![
        format!("fdb 0a:58:0a:f4:0{number}:00 dst 192.168.0.{number} dev weft.1"),
        format!("neighbour 10.244.{number}.0 lladdr 0a:58:0a:f4:0{number}:00 dev weft.1"),
        format!("route 10.244.{number}.0/24 via 10.244.{number}.0 dev weft.1 onlink"),
    ]
}

/// What the agent of `node` serves: it enforces `fingerprint` and holds
/// its entries toward the other node except those in `missing`.
fn agent(node: &str, fingerprint: &str, missing: &[&str]) -> Value {
    let peer = NODES
        .iter()
        .map(|(name, ..)| *name)
        .find(|name| *name != node)
        .unwrap_or_default();
    let mut document = agent_document(node, &[peer]);
    document["policy"]["fingerprint"] = json!(fingerprint);
    let entries: Vec<Value> = entries_toward(peer)
        .into_iter()
        .map(|entry| {
            let held = !missing.iter().any(|m| entry.starts_with(m));
            json!({"entry": entry, "held": held})
        })
        .collect();
    document["kernel"]["peer"] = json!({"node": peer, "state": "accepted", "entries": entries});
    document
}

/// Makes both fake agents enforce what the objects now give, with every
/// entry held.
async fn agents_in_sync(cluster: &Cluster, client: &Client) -> Result<()> {
    let fingerprints = compiled_fingerprints(client).await?;
    for (node, _, pod, _) in NODES {
        serve_document(cluster, pod, &agent(node, &fingerprints[node], &[]))?;
    }
    Ok(())
}

/// Runs `trace ARGS -o json`: its exit code, the JSON, and the output.
fn trace(cluster: &Cluster, args: &[&str]) -> Result<(i32, Value, Output)> {
    let mut all = vec!["trace"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let output = plugin(cluster.kubeconfig(), &all)?;
    let code = output
        .status
        .code()
        .context("the plugin died of a signal")?;
    let json = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "trace {args:?} exited {code}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok((code, json, output))
}

/// Prints the text form of `trace ARGS` (for docs/troubleshooting.md).
fn show(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let mut all = vec!["trace"];
    all.extend_from_slice(args);
    let output = plugin(cluster.kubeconfig(), &all)?;
    let text = stdout(&output);
    println!(
        "$ kubectl weft trace {}\n{text}(exit {:?})\n",
        args.join(" "),
        output.status.code()
    );
    Ok(text)
}

fn warnings(json: &Value) -> Vec<String> {
    json["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect()
}

/// Two nodes with agents, `shop/client` on node-a and `shop/web` (port
/// 80) on node-b; nothing isolates anything yet.
async fn shop() -> Result<(Cluster, Client)> {
    let cluster = Cluster::start_control_plane_only().await?;
    let client = cluster.client().await?;
    create_workloads(&client).await?;
    create_nodes(
        &client,
        NODES
            .iter()
            .map(|(name, slice, ..)| node(name, Some(slice), None))
            .collect::<Vec<Node>>(),
    )
    .await?;
    let post = PostParams::default();
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": SHOP}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&post, &namespace)
        .await?;
    // No controller-manager creates the namespace's default account.
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), SHOP)
        .create(&post, &account)
        .await?;
    pod(&client, "client", "client", "node-a", "10.244.1.5", &[]).await?;
    pod(&client, "web", "web", "node-b", "10.244.2.7", &[80]).await?;
    let fingerprints = compiled_fingerprints(&client).await?;
    for (node, _, pod, port) in NODES {
        let document = agent(node, &fingerprints[node], &[]);
        fake_daemon(&cluster, &client, "agent", pod, node, port, Some(document)).await?;
    }
    Ok((cluster, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_names_the_rules_and_the_path_and_exits_by_them() -> Result<()> {
    require_root!("the e2e harness's control plane and outside namespace");
    let (cluster, client) = shop().await?;

    // No policy: allowed, nothing isolates either end, the path is whole.
    let (code, json) = eventually(PATIENCE, "both fake agents to answer", || async {
        let (code, json, _) = trace(&cluster, &["shop/client", "shop/web"])?;
        Ok(warnings(&json).is_empty().then_some((code, json)))
    })
    .await?;
    show(&cluster, &["shop/client", "shop/web"])?;
    ensure!(code == 0, "exit {code}: {json:#}");
    ensure!(
        json["source"] == json!({"pod": "shop/client", "ip": "10.244.1.5", "node": "node-a"})
            && json["destination"]
                == json!({"pod": "shop/web", "ip": "10.244.2.7", "node": "node-b"}),
        "{json:#}"
    );
    ensure!(
        json["protocol"] == "TCP" && json["port"] == 80 && json["allowed"] == true,
        "{json:#}"
    );
    let fingerprints = compiled_fingerprints(&client).await?;
    for (direction, node) in [("egress", "node-a"), ("ingress", "node-b")] {
        let side = &json["policy"][direction];
        ensure!(
            side["node"] == node
                && side["allows"] == true
                && side["isolating"] == json!([])
                && side["expectedFingerprint"] == fingerprints[node].as_str()
                && side["fingerprintMatches"] == true,
            "{direction}: {json:#}"
        );
    }
    let path = &json["path"];
    ensure!(
        path["sameNode"] == false
            && path["backend"] == "vxlan"
            && path["complete"] == true
            && path["hops"][0]["node"] == "node-a"
            && path["hops"][0]["toward"] == "node-b"
            && path["hops"][1]["node"] == "node-b"
            && path["hops"][0]["entries"].as_array().map(Vec::len) == Some(3),
        "{path:#}"
    );

    // The destination given as the pod's address is that pod.
    let (code, by_ip, _) = trace(&cluster, &["shop/client", "10.244.2.7"])?;
    ensure!(
        code == 0 && by_ip["destination"]["pod"] == "shop/web" && by_ip["port"] == 80,
        "exit {code}: {by_ip:#}"
    );

    // Default deny for ingress: denied at web, the policy named, no rule.
    policy(
        &client,
        json!({"metadata": {"name": "deny-all"},
               "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}),
    )
    .await?;
    agents_in_sync(&cluster, &client).await?;
    let (code, json, _) = trace(&cluster, &["shop/client", "shop/web"])?;
    show(&cluster, &["shop/client", "shop/web"])?;
    let ingress = &json["policy"]["ingress"];
    ensure!(
        code == 1
            && json["allowed"] == false
            && ingress["allows"] == false
            && ingress["isolating"] == json!(["shop/deny-all"])
            && ingress["admittedBy"] == json!([])
            && ingress["fingerprintMatches"] == true
            && json["policy"]["egress"]["allows"] == true,
        "exit {code}: {json:#}"
    );

    // An allow rule: named with its rule, peer and port.
    policy(
        &client,
        json!({"metadata": {"name": "allow-web"},
               "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                        "ingress": [{"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}},
                                              {"podSelector": {"matchLabels": {"app": "client"}}}],
                                     "ports": [{"port": 443}, {"port": 80}]}]}}),
    )
    .await?;
    agents_in_sync(&cluster, &client).await?;
    let (code, json, _) = trace(&cluster, &["shop/client", "shop/web"])?;
    show(&cluster, &["shop/client", "shop/web"])?;
    println!("$ kubectl weft trace shop/client shop/web -o json\n{json:#}\n");
    let ingress = &json["policy"]["ingress"];
    ensure!(
        code == 0
            && json["allowed"] == true
            && ingress["isolating"] == json!(["shop/allow-web", "shop/deny-all"])
            && ingress["admittedBy"]
                == json!([{"policy": "shop/allow-web", "rule": 0, "peer": 1, "port": 1,
                           "text": "ingress rule 0: from pods with app=client in namespace shop, on TCP port 80"}]),
        "exit {code}: {json:#}"
    );
    // Another port is not in the rule.
    let (code, json, _) = trace(&cluster, &["shop/client", "shop/web", "--port", "8080"])?;
    ensure!(
        code == 1 && json["allowed"] == false && json["port"] == 8080,
        "exit {code}: {json:#}"
    );

    // Egress isolation of the client: only 192.0.2.0/24 on 443.
    policy(
        &client,
        json!({"metadata": {"name": "client-out"},
               "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}],
                                    "ports": [{"port": 443}]}]}}),
    )
    .await?;
    agents_in_sync(&cluster, &client).await?;
    let (code, json, _) = trace(&cluster, &["shop/client", "shop/web"])?;
    let egress = &json["policy"]["egress"];
    ensure!(
        code == 1
            && json["allowed"] == false
            && egress["allows"] == false
            && egress["isolating"] == json!(["shop/client-out"])
            && egress["admittedBy"] == json!([])
            && json["policy"]["ingress"]["allows"] == true,
        "exit {code}: {json:#}"
    );
    // An address outside the pod network: the egress rule admits it, no
    // ingress end, no entries, out through the underlay.
    let outside = ["shop/client", "192.0.2.10", "--port", "443"];
    let (code, json, _) = trace(&cluster, &outside)?;
    show(&cluster, &outside)?;
    ensure!(
        code == 0
            && json["destination"] == json!({"pod": null, "ip": "192.0.2.10", "node": null})
            && json["policy"]["ingress"].is_null()
            && json["policy"]["egress"]["admittedBy"][0]["policy"] == "shop/client-out"
            && json["path"]["leavesCluster"] == true
            && json["path"]["hops"] == json!([])
            && json["path"]["complete"] == true,
        "exit {code}: {json:#}"
    );
    // An address without --port cannot be traced: exit 2, naming --port.
    let output = plugin(
        cluster.kubeconfig(),
        &["trace", "shop/client", "192.0.2.10"],
    )?;
    let error = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(2) && error.contains("--port"),
        "exit {:?}: {error}",
        output.status
    );
    // So is a pod that does not exist.
    let output = plugin(cluster.kubeconfig(), &["trace", "shop/nobody", "shop/web"])?;
    ensure!(
        output.status.code() == Some(2)
            && String::from_utf8_lossy(&output.stderr).contains("pod shop/nobody not found"),
        "exit {:?}",
        output.status
    );

    // node-b's agent has not synced since the last policy: exit 1 and
    // the fix named.
    Api::<NetworkPolicy>::namespaced(client.clone(), SHOP)
        .delete("client-out", &DeleteParams::default())
        .await?;
    agents_in_sync(&cluster, &client).await?;
    let fingerprints = compiled_fingerprints(&client).await?;
    policy(
        &client,
        json!({"metadata": {"name": "web-out"},
               "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"]}}),
    )
    .await?;
    serve_document(
        &cluster,
        "weft-agent-a",
        &agent(
            "node-a",
            &compiled_fingerprints(&client).await?["node-a"],
            &[],
        ),
    )?;
    let (code, json, _) = trace(&cluster, &["shop/client", "shop/web"])?;
    show(&cluster, &["shop/client", "shop/web"])?;
    let ingress = &json["policy"]["ingress"];
    ensure!(
        code == 1
            && json["allowed"] == true
            && ingress["fingerprintMatches"] == false
            && ingress["enforcedFingerprint"] == fingerprints["node-b"].as_str()
            && json["policy"]["egress"]["fingerprintMatches"] == true,
        "exit {code}: {json:#}"
    );
    ensure!(
        warnings(&json).iter().any(|w| w
            .starts_with("agent on node-b enforces an older policy plan")
            && w.contains("kubectl logs -n kube-system weft-agent-b")),
        "{json:#}"
    );

    // A route missing on node-a: the path is incomplete, exit 1.
    agents_in_sync(&cluster, &client).await?;
    let fingerprints = compiled_fingerprints(&client).await?;
    serve_document(
        &cluster,
        "weft-agent-a",
        &agent("node-a", &fingerprints["node-a"], &["route"]),
    )?;
    let (code, json, _) = trace(&cluster, &["shop/client", "shop/web"])?;
    show(&cluster, &["shop/client", "shop/web"])?;
    let hop = &json["path"]["hops"][0];
    ensure!(
        code == 1
            && json["allowed"] == true
            && json["path"]["complete"] == false
            && hop["entries"][2]
                == json!({"entry": "route 10.244.2.0/24 via 10.244.2.0 dev weft.1 onlink", "held": false})
            && json["path"]["hops"][1]["entries"]
                .as_array()
                .is_some_and(|e| e.iter().all(|e| e["held"] == true)),
        "exit {code}: {json:#}"
    );
    ensure!(
        warnings(&json)
            == ["route missing on node-a: route 10.244.2.0/24 via 10.244.2.0 dev weft.1 onlink: the agent will repair it at the next resync; `kubectl weft status` shows drift"],
        "{json:#}"
    );
    cluster.stop().await
}
