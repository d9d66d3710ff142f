//! `kubectl weft bundle` against a real kube-apiserver (the e2e harness's
//! control plane, no kubelets) and the fake daemons of `common`: what the
//! tarball holds per node, that a dead agent only costs lines in
//! `errors.txt`, that no Secret gets in, and the binary's exit codes.
//!
//! No kubelet runs here, so every `pods/log` read fails and lands in
//! `errors.txt`; the kubelet e2e test checks the logs themselves.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use weft_testing::require_root;

use common::{
    agent_document, fake_cluster, operator_kubeconfig, plugin, serve_document, settled_report,
    NAMESPACE,
};
use kubectl_weft::bundle::{write_bundle, BundleTarget};
use kubectl_weft::StatusOptions;

/// What the test's Secrets hold; the bundle must hold it nowhere.
const MARKER: &str = "weft-bundle-marker-7f3a9c";

/// The files of a tarball, by path, read back with the same crates the
/// plugin writes it with.
fn unpack(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut files = BTreeMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.display().to_string();
        let mut contents = Vec::new();
        entry.read_to_end(&mut contents)?;
        files.insert(name, contents);
    }
    Ok(files)
}

/// The bundle's one directory, and the files under it by their path in it.
fn inside(files: &BTreeMap<String, Vec<u8>>) -> Result<(String, BTreeMap<String, String>)> {
    let directory = files
        .keys()
        .next()
        .and_then(|path| path.split('/').next())
        .context("an empty tarball")?
        .to_string();
    ensure!(
        directory.starts_with("weft-bundle-") && directory.ends_with('Z'),
        "the bundle's directory is {directory}"
    );
    let inside = files
        .iter()
        .map(|(path, contents)| {
            let relative = path
                .strip_prefix(&format!("{directory}/"))
                .with_context(|| format!("{path} is outside {directory}/"))?;
            Ok((
                relative.to_string(),
                String::from_utf8_lossy(contents).into_owned(),
            ))
        })
        .collect::<Result<_>>()?;
    Ok((directory, inside))
}

/// An agent document with a kernel dump, as `/status?check=dump` answers
/// (the fake daemons ignore the query and serve it for every check).
fn agent_with_dump(node: &str, accepted: &[&str]) -> Value {
    let mut document = agent_document(node, accepted);
    document["dump"] = json!({
        "links": ["3: weft.1: <BROADCAST,MULTICAST,UP> mtu 1450 vxlan id 1 dstport 8472"],
        "routes": ["10.244.2.0/24 via 10.244.2.0 dev weft.1 proto 87 onlink"],
        "neighbours": ["10.244.2.0 dev weft.1 lladdr 02:00:00:00:00:02 PERMANENT"],
        "fdb": ["02:00:00:00:00:02 dev weft.1 dst 192.0.2.2 self permanent"],
        "tables": {"weft": "table inet weft {\n}\n", "weft-policy": "table inet weft-policy {\n}\n"},
        "errors": []
    });
    document
}

/// Secrets holding [`MARKER`] in Weft's namespace and another, a pod of
/// someone else's with it in its env, and the agent DaemonSet with it as a
/// literal env value and in `kubectl apply`'s annotation: every way it
/// could slip into a bundle. Also a NetworkPolicy and Weft's ConfigMap.
async fn plant(client: &Client) -> Result<()> {
    let post = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(
            &post,
            &serde_json::from_value(json!({"metadata": {"name": "other"}}))?,
        )
        .await?;
    Api::<ServiceAccount>::namespaced(client.clone(), "other")
        .create(
            &post,
            &serde_json::from_value(json!({"metadata": {"name": "default"}}))?,
        )
        .await?;
    for namespace in [NAMESPACE, "other"] {
        Api::<Secret>::namespaced(client.clone(), namespace)
            .create(
                &post,
                &serde_json::from_value(json!({
                    "metadata": {"name": "weft-test-secret"},
                    "stringData": {"password": MARKER}
                }))?,
            )
            .await?;
    }
    Api::<Pod>::namespaced(client.clone(), "other")
        .create(
            &post,
            &serde_json::from_value(json!({
                "metadata": {"name": "app"},
                "spec": {"containers": [{"name": "app", "image": "app",
                    "env": [{"name": "PASSWORD", "value": MARKER}]}]}
            }))?,
        )
        .await?;
    Api::<NetworkPolicy>::namespaced(client.clone(), "other")
        .create(
            &post,
            &serde_json::from_value(json!({
                "metadata": {"name": "deny-all"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
            }))?,
        )
        .await?;
    Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE)
        .create(
            &post,
            &serde_json::from_value(json!({
                "metadata": {"name": "weft-config"},
                "data": {"agent.yaml": "backend: vxlan\n"}
            }))?,
        )
        .await?;
    let last_applied = json!({"spec": {"env": [{"name": "TOKEN", "value": MARKER}]}}).to_string();
    Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE)
        .patch(
            "weft-agent",
            &PatchParams::default(),
            &Patch::Strategic(json!({
                "metadata": {"annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": last_applied
                }},
                "spec": {"template": {"spec": {"containers": [{
                    "name": "agent",
                    "env": [
                        {"name": "TOKEN", "value": MARKER},
                        {"name": "RUST_LOG", "value": "debug"}
                    ]
                }]}}}
            })),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_holds_each_agents_files_names_what_failed_and_no_secret() -> Result<()> {
    require_root!("the e2e harness's control plane and outside namespace");
    // node-c's agent pod runs, but nothing answers for it.
    let cluster = fake_cluster(0, true).await?;
    let client = cluster.client().await?;
    plant(&client).await?;
    serve_document(
        &cluster,
        "weft-agent-a",
        &agent_with_dump("node-a", &["node-b", "node-c"]),
    )?;
    serve_document(
        &cluster,
        "weft-agent-b",
        &agent_with_dump("node-b", &["node-a", "node-c"]),
    )?;
    settled_report(&client, 2).await?;

    let path = cluster.run_dir().join("bundle.tar.gz");
    let target = BundleTarget::new(
        Some(path.clone()),
        false,
        k8s_openapi::jiff::Timestamp::now(),
    );
    let written = write_bundle(&client, &StatusOptions::default(), &target).await?;
    eprintln!("{written}");
    ensure!(
        written.bytes == std::fs::metadata(&path)?.len(),
        "{written:?}"
    );
    let raw = unpack(&path)?;
    let (_, files) = inside(&raw)?;
    println!("$ tar tzf bundle.tar.gz");
    for (name, contents) in &raw {
        println!("{:>8}  {name}", contents.len());
    }

    let mut expected: Vec<String> = [
        "status.json",
        "status.txt",
        "versions.txt",
        "errors.txt",
        "objects/nodes.json",
        "objects/networkpolicies.json",
        "objects/daemonset.json",
        "objects/deployment.json",
        "objects/configmap-weft-config.json",
        "objects/pods.json",
        "controller/weft-controller-0/status.json",
    ]
    .map(str::to_string)
    .to_vec();
    for node in ["node-a", "node-b"] {
        expected.extend(
            [
                "status.json",
                "dump.json",
                "links.txt",
                "routes.txt",
                "rules.txt",
                "neighbours.txt",
                "fdb.txt",
                "nft-weft.txt",
                "nft-weft-policy.txt",
            ]
            .map(|file| format!("nodes/{node}/{file}")),
        );
    }
    expected.sort();
    let listed: Vec<String> = files.keys().cloned().collect();
    ensure!(listed == expected, "the bundle lists {listed:#?}");

    for (name, contents) in files.iter().filter(|(name, _)| name.ends_with(".json")) {
        serde_json::from_str::<Value>(contents).with_context(|| format!("{name} is not JSON"))?;
    }
    ensure!(
        files["nodes/node-a/routes.txt"]
            == "10.244.2.0/24 via 10.244.2.0 dev weft.1 proto 87 onlink\n",
        "{}",
        files["nodes/node-a/routes.txt"]
    );
    let status: Value = serde_json::from_str(&files["status.json"])?;
    ensure!(status["healthy"] == false, "{status:#}");
    ensure!(
        files["status.txt"].contains("NODE"),
        "{}",
        files["status.txt"]
    );
    let versions = &files["versions.txt"];
    for line in [
        "API server: v",
        "agent weft-agent-a on node-a: 0.1.0 (commit test)",
        "controller weft-controller-0 on node-a: 0.1.0 (commit test)",
        "daemonset kube-system/weft-agent container agent: localhost/weft:test",
        "node-a: no nodeInfo",
    ] {
        ensure!(
            versions.contains(line),
            "versions.txt lacks {line:?}:\n{versions}"
        );
    }
    let nodes: Value = serde_json::from_str(&files["objects/nodes.json"])?;
    ensure!(
        nodes["items"].as_array().map(Vec::len) == Some(4)
            && !files["objects/nodes.json"].contains("managedFields"),
        "{nodes:#}"
    );
    ensure!(
        files["objects/networkpolicies.json"].contains("deny-all"),
        "{}",
        files["objects/networkpolicies.json"]
    );
    ensure!(
        files["objects/daemonset.json"].contains("\"debug\""),
        "the chart's own env values stay: {}",
        files["objects/daemonset.json"]
    );

    // The dead agent and the missing kubelets, each a line.
    let errors = &files["errors.txt"];
    println!("errors.txt:\n{errors}");
    ensure!(
        errors.lines().count() == written.failed_reads,
        "{} lines, {} failed reads",
        errors.lines().count(),
        written.failed_reads
    );
    for read in [
        "GET /status?check=kernel of pod kube-system/weft-agent-c (agent on node-c)",
        "GET /status?check=dump of pod kube-system/weft-agent-c (agent on node-c)",
        "log of pod kube-system/weft-agent-a container agent",
        "log of pod kube-system/weft-agent-c container agent",
        "log of pod kube-system/weft-controller-0 container controller",
    ] {
        ensure!(
            errors
                .lines()
                .any(|line| line.starts_with(&format!("{read}: "))),
            "errors.txt lacks {read:?}"
        );
    }

    // No Secret, nor the marker by any other way, anywhere: not in a file,
    // not in a name.
    for (name, contents) in &raw {
        ensure!(
            !name.contains(MARKER)
                && !contents
                    .windows(MARKER.len())
                    .any(|w| w == MARKER.as_bytes()),
            "{name} holds the Secret's marker"
        );
    }
    ensure!(
        !files.values().any(|text| text.contains("weft-test-secret")),
        "a Secret's name is in the bundle"
    );

    // Without --force the file stays as it is.
    let again = write_bundle(&client, &StatusOptions::default(), &target).await;
    ensure!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("--force")),
        "a second bundle to the same file: {again:?}"
    );
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_writes_a_bundle_with_the_operators_role_alone() -> Result<()> {
    require_root!("the e2e harness's control plane and outside namespace");
    let cluster = fake_cluster(0, false).await?;
    let client = cluster.client().await?;
    settled_report(&client, 3).await?;
    let operator = operator_kubeconfig(&cluster, &client, "operator").await?;

    // The default name, in the current directory.
    let dir = cluster.run_dir().join("bundles");
    std::fs::create_dir_all(&dir)?;
    let output = Command::new(env!("CARGO_BIN_EXE_kubectl-weft"))
        .arg("--kubeconfig")
        .arg(&operator)
        .arg("bundle")
        .current_dir(&dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(0) && output.stdout.is_empty(),
        "bundle exited {:?}: {stderr}",
        output.status
    );
    let written: Vec<String> = std::fs::read_dir(&dir)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    ensure!(
        written.len() == 1
            && written[0].starts_with("weft-bundle-")
            && written[0].ends_with("Z.tar.gz")
            && stderr.contains(&format!("wrote {}", written[0])),
        "{written:?}, {stderr}"
    );
    let (directory, files) = inside(&unpack(&dir.join(&written[0]))?)?;
    ensure!(
        written[0] == format!("{directory}.tar.gz"),
        "{written:?} holds {directory}/"
    );
    // The role allows every read the bundle makes.
    let errors = &files["errors.txt"];
    ensure!(
        !errors.contains("forbidden"),
        "reads failed as the operator:\n{errors}"
    );
    for node in ["node-a", "node-b", "node-c"] {
        ensure!(
            files.contains_key(&format!("nodes/{node}/status.json")),
            "no status of {node}: {:?}",
            files.keys()
        );
    }

    // -f names the file; an existing one stays unless --force.
    let path = dir.join("report.tgz");
    let file = path.to_str().context("a UTF-8 path")?;
    let first = plugin(&operator, &["bundle", "-f", file])?;
    ensure!(first.status.code() == Some(0), "{first:?}");
    let size = std::fs::metadata(&path)?.len();
    let refused = plugin(&operator, &["bundle", "-f", file])?;
    let error = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        refused.status.code() == Some(2) && error.contains("exists already"),
        "a second bundle to {file}: exit {:?}, {error}",
        refused.status
    );
    ensure!(std::fs::metadata(&path)?.len() == size, "the file changed");
    let forced = plugin(&operator, &["bundle", "-f", file, "--force"])?;
    ensure!(forced.status.code() == Some(0), "{forced:?}");
    let nowhere = plugin(&operator, &["bundle", "-f", "/nonexistent/dir/b.tgz"])?;
    ensure!(
        nowhere.status.code() == Some(2),
        "an unwritable file: {nowhere:?}"
    );
    ensure!(
        std::fs::read_dir(&dir)?.count() == 2,
        "a partial file was left behind"
    );
    cluster.stop().await
}
