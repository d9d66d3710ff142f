//! The offline image (`packaging/build-image.sh`): an OCI archive under the
//! name the chart uses, whose binaries run from its own root filesystem, whose
//! `nft` loads the agent's real masquerade table, whose plugin runs with no
//! libc at all, and whose shell runs the chart's install-cni script. Needs
//! root (buildah, chroot, a throwaway network namespace; through
//! `weft_testing::require_root!`: under `CI=true` it never skips) and builds
//! the release binaries.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use ipnet::IpNet;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::Value;
use weft_agent::masquerade::{render_ruleset, HostTraffic};
use weft_core::ip::IpFamily;
use weft_packaging::{plain_manifests, Rendered};
use weft_testing::{printed_path, require_root, run};

/// Reads a JSON blob of an unpacked OCI layout by digest.
fn blob(layout: &Path, digest: &str) -> Result<Value> {
    let path = blob_path(layout, digest)?;
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&text)?)
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unexpected digest {digest}"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn text(value: &Value) -> Result<&str> {
    value
        .as_str()
        .with_context(|| format!("{value} is not a string"))
}

/// Runs `command` inside `rootfs` (chroot) in a network namespace of its own.
fn in_image(rootfs: &Path, command: &[&str]) -> Command {
    let mut chroot = Command::new("unshare");
    chroot
        .args(["--net", "chroot"])
        .arg(rootfs)
        .args(command)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/sbin:/usr/bin:/bin");
    chroot
}

fn du_bytes(path: &Path) -> Result<u64> {
    let output = run(Command::new("du").args(["-sb"]).arg(path))?;
    output
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du output")
}

#[test]
fn offline_image_runs_what_the_chart_asks_of_it() -> Result<()> {
    require_root!("buildah, chroot and a network namespace");
    let work = tempfile::tempdir()?;
    let archive = work.path().join("weft.oci.tar");
    let printed = printed_path(
        Command::new(weft_testing::repository().join("packaging/build-image.sh"))
            .env("WEFT_IMAGE_ARCHIVE", &archive),
    )?;
    ensure!(
        printed == archive,
        "build-image.sh printed {}",
        printed.display()
    );

    // Named as the plain manifests reference it, so an imported archive is
    // what the kubelet looks for.
    let layout = work.path().join("layout");
    std::fs::create_dir(&layout)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout))?;
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let descriptor = &index["manifests"][0];
    let name = text(&descriptor["annotations"]["org.opencontainers.image.ref.name"])?;
    let daemon_set: DaemonSet = Rendered::load(&plain_manifests())?.object("weft-agent")?;
    let pod = daemon_set
        .spec
        .and_then(|s| s.template.spec)
        .context("weft-agent has no pod spec")?;
    let chart_image = pod.containers[0].image.clone().unwrap_or_default();
    ensure!(
        name == chart_image,
        "the archive holds {name}, the manifests run {chart_image}"
    );

    // Unpack the root filesystem the way a runtime would.
    let manifest = blob(&layout, text(&descriptor["digest"])?)?;
    let config = blob(&layout, text(&manifest["config"]["digest"])?)?;
    ensure!(
        config["config"]["Env"].as_array().is_some_and(|env| env
            .iter()
            .any(|e| e.as_str() == Some("PATH=/usr/local/bin:/usr/sbin:/usr/bin:/bin"))),
        "the image's PATH does not reach nft: {}",
        config["config"]
    );
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir(&rootfs)?;
    for layer in manifest["layers"]
        .as_array()
        .context("manifest has no layers")?
    {
        let path = blob_path(&layout, text(&layer["digest"])?)?;
        run(Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(&rootfs))?;
    }
    eprintln!(
        "image {name}: archive {} bytes, unpacked {} bytes",
        std::fs::metadata(&archive)?.len(),
        du_bytes(&rootfs)?
    );

    let version = env!("CARGO_PKG_VERSION");
    for binary in ["weft-controller", "weft-agent"] {
        let printed = run(&mut in_image(
            &rootfs,
            &[&format!("/usr/local/bin/{binary}"), "--version"],
        ))?;
        ensure!(
            printed.trim() == format!("{binary} {version}"),
            "{binary} printed {printed}"
        );
    }

    // The plugin runs on hosts whatever their libc: alone in an empty root.
    let bare = work.path().join("bare");
    std::fs::create_dir(&bare)?;
    std::fs::copy(rootfs.join("usr/local/bin/weft"), bare.join("weft"))?;
    // Built from this checkout: the commit is known, so every binary's
    // /status and weft_build_info name it.
    let printed = run(&mut in_image(&bare, &["/weft", "--version"]))?;
    ensure!(
        printed.starts_with(&format!("weft {version} (commit "))
            && !printed.contains("commit unknown")
            && printed.contains("1.1.0"),
        "weft --version printed {printed}"
    );
    let mut plugin = in_image(&bare, &["/weft"]);
    plugin
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = plugin.spawn()?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(br#"{"cniVersion":"1.0.0"}"#)?;
    let output = child.wait_with_output()?;
    let reply: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "plugin VERSION reply: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    ensure!(
        output.status.success() && reply["supportedVersions"].is_array(),
        "the plugin did not run without a libc: {reply}"
    );
    // So does the kubectl plugin, wherever an operator copies it.
    std::fs::copy(
        rootfs.join("usr/local/bin/kubectl-weft"),
        bare.join("kubectl-weft"),
    )?;
    let printed = run(&mut in_image(&bare, &["/kubectl-weft", "--version"]))?;
    ensure!(
        printed.trim() == format!("kubectl-weft {version}"),
        "kubectl-weft printed {printed}"
    );

    // The agent's own masquerade table, dual-stack and with the chains for
    // the node's own traffic into the tunnel, through the image's nft.
    let cidrs: Vec<IpNet> = vec!["10.244.0.0/16".parse()?, "fd00:10:244::/56".parse()?];
    let no_masquerade: Vec<IpNet> = vec!["192.168.0.0/16".parse()?];
    let host = HostTraffic {
        family: IpFamily::V4,
        snat: Some("172.31.0.10".parse()?),
    };
    std::fs::write(
        rootfs.join("ruleset.nft"),
        render_ruleset(&cidrs, &no_masquerade, Some(&host)),
    )?;
    let listed = run(&mut in_image(
        &rootfs,
        &[
            "/bin/sh",
            "-c",
            "nft -f /ruleset.nft && nft list table inet weft",
        ],
    ))?;
    ensure!(
        listed.contains("table inet weft")
            && listed.contains("masquerade")
            && listed.contains("snat ip to 172.31.0.10")
            && listed.contains("chain return-path-local"),
        "nft listed: {listed}"
    );

    // The chart's install-cni init container, as written, in this image.
    let init = pod
        .init_containers
        .as_ref()
        .and_then(|c| c.first())
        .context("weft-agent has no init container")?;
    let config_map: ConfigMap = Rendered::load(&plain_manifests())?.object("weft-config")?;
    let conflist = config_map
        .data
        .as_ref()
        .and_then(|d| d.get("10-weft.conflist"))
        .context("no 10-weft.conflist")?;
    let mut script: Vec<&str> = init.command.iter().flatten().map(String::as_str).collect();
    script.extend(init.args.iter().flatten().map(String::as_str));
    let mut install = in_image(&rootfs, &script);
    for variable in init.env.iter().flatten() {
        let value = variable.value.as_deref().unwrap_or_default();
        if variable.name.ends_with("_DIR") {
            std::fs::create_dir_all(rootfs.join(value.trim_start_matches('/')))?;
        }
        install.env(&variable.name, value);
    }
    std::fs::create_dir_all(rootfs.join("etc/weft"))?;
    std::fs::write(rootfs.join("etc/weft/10-weft.conflist"), conflist)?;
    run(&mut install)?;
    ensure!(
        std::fs::read(rootfs.join("opt/cni/bin/weft"))?
            == std::fs::read(rootfs.join("usr/local/bin/weft"))?,
        "install-cni did not install the plugin"
    );
    ensure!(
        &std::fs::read_to_string(rootfs.join("etc/cni/net.d/10-weft.conflist"))? == conflist,
        "install-cni did not install the conflist"
    );
    let leftovers: Vec<_> = ["opt/cni/bin", "etc/cni/net.d"]
        .iter()
        .flat_map(|dir| {
            std::fs::read_dir(rootfs.join(dir))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|entry| entry.file_name())
        .filter(|name| name.to_string_lossy().starts_with('.'))
        .collect();
    ensure!(leftovers.is_empty(), "install-cni left {leftovers:?}");
    Ok(())
}
