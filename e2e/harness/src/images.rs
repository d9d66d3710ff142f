//! Container images for kubelet nodes, made offline because no registry is
//! reachable: a pause image for pod sandboxes, a busybox image for test
//! pods and a CoreDNS image for the cluster DNS, each written as an OCI
//! archive (`ctr images import` reads it).
//!
//! The archives are assembled by hand, with `tar` and `sha256sum`: an OCI
//! layout is one layer tarball, a config and a manifest addressed by digest,
//! and an index naming the image. Tools like buildah would do the same but
//! leave state on the host (`/var/lib/containers`, `/etc/cni/net.d`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::json;
use weft_testing::run;

use crate::exec::go_arch;

/// The pod sandbox image every kubelet node's containerd is configured with.
pub const PAUSE_IMAGE: &str = "localhost/weft-e2e/pause:v1";

/// A test image with Debian's static busybox: `sh`, `ping`, `nc`, `httpd`,
/// `ip`, … on `PATH`, and the harness's own `wget` (see [`install_busybox`]).
/// Pods using it need `imagePullPolicy: IfNotPresent` or `Never` (no
/// registry).
pub const BUSYBOX_IMAGE: &str = "localhost/weft-e2e/busybox:v1";

/// The cluster DNS image (see [`crate::dns`]): the CoreDNS binary that
/// `e2e/k8s/build.sh` builds, alone. The tag is the CoreDNS version in
/// `e2e/k8s/coredns/go.mod`.
///
/// It runs as root, unlike upstream's (`nonroot`): that one binds port 53
/// through a file capability on the binary, since containerd gives a
/// non-root user no effective capabilities, and a layer packed by `tar`
/// here carries no such attribute. The pod drops every capability but
/// `NET_BIND_SERVICE` all the same.
pub(crate) const COREDNS_IMAGE: &str = "localhost/weft-e2e/coredns:v1.12.0";

/// Where Debian's `busybox-static` puts busybox.
const BUSYBOX: &str = "/bin/busybox";

/// The source of the pause binary.
const PAUSE_SOURCE: &str = include_str!("../images/pause.c");

/// The source of the test images' `wget`.
const WGET_SOURCE: &str = include_str!("../images/wget.c");

/// The images built for one run.
pub(crate) struct NodeImages {
    /// The static pause binary, also the init of every kubelet node.
    pub(crate) pause_binary: PathBuf,
    /// OCI archives to import on every node.
    pub(crate) archives: Vec<PathBuf>,
}

/// Builds the pause, busybox and CoreDNS images into `dir` (a second or
/// two), the last from the static binary `coredns`.
pub(crate) fn build(dir: &Path, coredns: &Path) -> Result<NodeImages> {
    let pause_root = dir.join("pause-rootfs");
    let pause_binary = pause_root.join("pause");
    compile_static("pause", PAUSE_SOURCE, &pause_binary)?;
    let pause = dir.join("pause.oci.tar");
    write_oci_archive(
        &pause_root,
        PAUSE_IMAGE,
        json!({ "Entrypoint": ["/pause"] }),
        &pause,
    )?;

    let busybox_root = dir.join("busybox-rootfs");
    install_busybox(&busybox_root.join("bin"))?;
    let busybox = dir.join("busybox.oci.tar");
    write_oci_archive(
        &busybox_root,
        BUSYBOX_IMAGE,
        json!({ "Cmd": ["sh"], "Env": ["PATH=/bin"] }),
        &busybox,
    )?;

    let coredns_root = dir.join("coredns-rootfs");
    std::fs::create_dir_all(&coredns_root)
        .with_context(|| format!("creating {}", coredns_root.display()))?;
    std::fs::copy(coredns, coredns_root.join("coredns"))
        .with_context(|| format!("copying {} into its image", coredns.display()))?;
    let coredns_archive = dir.join("coredns.oci.tar");
    write_oci_archive(
        &coredns_root,
        COREDNS_IMAGE,
        json!({ "Entrypoint": ["/coredns"] }),
        &coredns_archive,
    )?;
    // The archive holds it; a second copy of 50 MB per run is only disk used.
    std::fs::remove_dir_all(&coredns_root)
        .with_context(|| format!("removing {}", coredns_root.display()))?;
    Ok(NodeImages {
        pause_binary,
        archives: vec![pause, busybox, coredns_archive],
    })
}

/// Compiles the C program `source` into the static binary `out`, creating
/// its directory; `name` is for errors.
fn compile_static(name: &str, source: &str, out: &Path) -> Result<()> {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut compiler = Command::new("cc")
        .args(["-Os", "-static", "-s", "-x", "c", "-", "-o"])
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context(
            "running cc (install a C compiler and static libc: apt-get install build-essential)",
        )?;
    let mut stdin = compiler.stdin.take().context("cc's stdin")?;
    stdin
        .write_all(source.as_bytes())
        .with_context(|| format!("passing the source of {name} to cc"))?;
    drop(stdin);
    let result = compiler
        .wait_with_output()
        .with_context(|| format!("waiting for cc to compile {name}"))?;
    // Static glibc warns about getaddrinfo's shared NSS modules; the
    // built-in `files` and `dns` sources are all the images use.
    if !result.status.success() {
        bail!(
            "compiling {name} failed ({}; install a C compiler and static libc: apt-get install build-essential):\n{}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        );
    }
    Ok(())
}

/// Puts Debian's static busybox into an image's `bin` directory, with a link
/// named after each of its applets (`sh`, `ls`, `nc`, …), but for `wget`:
/// that applet is built without the timeout option and crashes when given
/// `-T`, which upstream's Service tests pass, so `wget` is the harness's
/// own (`images/wget.c`, static).
pub(crate) fn install_busybox(bin: &Path) -> Result<()> {
    std::fs::create_dir_all(bin).with_context(|| format!("creating {}", bin.display()))?;
    // A dynamic busybox would need a libc in the image.
    if Command::new("ldd")
        .arg(BUSYBOX)
        .output()
        .is_ok_and(|output| output.status.success())
    {
        bail!("{BUSYBOX} is dynamically linked; install the static one: apt-get install busybox-static");
    }
    std::fs::copy(BUSYBOX, bin.join("busybox")).with_context(|| {
        format!("copying {BUSYBOX} (install it: apt-get install busybox-static)")
    })?;
    let applets = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("listing the applets of {BUSYBOX}"))?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" && applet != "wget" {
            std::os::unix::fs::symlink("busybox", bin.join(applet))
                .with_context(|| format!("linking applet {applet}"))?;
        }
    }
    compile_static("wget", WGET_SOURCE, &bin.join("wget"))
}

/// A content-addressed blob of an OCI layout.
struct Blob {
    digest: String,
    size: u64,
}

/// Writes `rootfs` as a one-layer image named `reference`, with `config` as
/// the image's runtime configuration, to the OCI archive `out`.
pub(crate) fn write_oci_archive(
    rootfs: &Path,
    reference: &str,
    config: serde_json::Value,
    out: &Path,
) -> Result<()> {
    let layout = out.with_extension("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256"))
        .with_context(|| format!("creating {}", layout.display()))?;
    let layer_file = layout.join("layer.tar");
    // Fixed owner and times: the same rootfs always gives the same digest.
    run(Command::new("tar")
        .args([
            "--create",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
        ])
        .arg("--file")
        .arg(&layer_file)
        .arg("--directory")
        .arg(rootfs)
        .arg("."))
    .with_context(|| format!("packing the layer of {reference}"))?;
    let layer = add_blob(&layout, &layer_file)?;
    let image_config = json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
    });
    let config_blob = add_json_blob(&layout, &image_config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_blob.digest,
            "size": config_blob.size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer.digest,
            "size": layer.size,
        }],
    });
    let manifest_blob = add_json_blob(&layout, &manifest)?;
    // containerd names the imported image after these annotations.
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_blob.digest,
            "size": manifest_blob.size,
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": reference,
            },
        }],
    });
    write_json(&layout.join("index.json"), &index)?;
    write_json(
        &layout.join("oci-layout"),
        &json!({ "imageLayoutVersion": "1.0.0" }),
    )?;
    run(Command::new("tar")
        .arg("--create")
        .arg("--file")
        .arg(out)
        .arg("--directory")
        .arg(&layout)
        .args(["oci-layout", "index.json", "blobs"]))
    .with_context(|| format!("writing the archive of {reference}"))?;
    std::fs::remove_dir_all(&layout).with_context(|| format!("removing {}", layout.display()))
}

/// Moves `file` into the layout's blobs under its digest.
fn add_blob(layout: &Path, file: &Path) -> Result<Blob> {
    let sums = run(Command::new("sha256sum").arg(file)).context("running sha256sum (coreutils)")?;
    let Some(hex) = sums.split_whitespace().next() else {
        bail!("sha256sum {} printed no digest", file.display());
    };
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading the size of {}", file.display()))?
        .len();
    let target = layout.join("blobs/sha256").join(hex);
    std::fs::rename(file, &target)
        .with_context(|| format!("moving {} into the layout", file.display()))?;
    Ok(Blob {
        digest: format!("sha256:{hex}"),
        size,
    })
}

fn add_json_blob(layout: &Path, value: &serde_json::Value) -> Result<Blob> {
    let file = layout.join("blob.json");
    write_json(&file, value)?;
    add_blob(layout, &file)
}

fn write_json(file: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_vec(value).context("encoding JSON")?;
    std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    use super::*;

    fn wget(dir: &Path) -> PathBuf {
        let binary = dir.join("wget");
        compile_static("wget", WGET_SOURCE, &binary).unwrap();
        binary
    }

    /// Serves one request with `answer`, returning the request's first line.
    fn serve_once(listener: TcpListener, answer: &'static str) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let (mut connection, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(connection.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut header = String::new();
            while header != "\r\n" {
                header.clear();
                reader.read_line(&mut header).unwrap();
            }
            connection.write_all(answer.as_bytes()).unwrap();
            request_line
        })
    }

    #[test]
    fn wget_prints_the_body_with_the_options_the_service_tests_give() {
        let dir = tempfile::tempdir().unwrap();
        let wget = wget(dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hostname", listener.local_addr().unwrap());
        let server = serve_once(
            listener,
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npod-1\n",
        );
        let output = Command::new(&wget)
            .args(["-T", "5", "-qO-", &url])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout), "pod-1\n");
        assert_eq!(server.join().unwrap(), "GET /hostname HTTP/1.0\r\n");

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let server = serve_once(listener, "HTTP/1.1 404 Not Found\r\n\r\n");
        let output = Command::new(&wget)
            .args(["-q", "-O", "-", "-T", "1", &url])
            .output()
            .unwrap();
        server.join().unwrap();
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("server returned error: HTTP/1.1 404"),
            "{stderr}"
        );
    }

    #[test]
    fn wget_gives_up_on_a_silent_server_after_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let wget = wget(dir.path());
        // The kernel completes the handshake, nothing ever answers: only
        // -T ends the download.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", silent.local_addr().unwrap());
        let output = Command::new(&wget)
            .args(["-q", "-O", "-", "-T", "1", &url])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("download timed out"), "{stderr}");
    }
}
