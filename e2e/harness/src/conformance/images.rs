//! The images the upstream network tests run, made offline under the exact
//! references the suite asks for (`e2e.test --network-images`), so the
//! kubelet finds them imported and never pulls: their tags are not `latest`,
//! so the tests' pods default to `imagePullPolicy: IfNotPresent`.
//!
//! Every image is the same root filesystem — agnhost, CoreDNS as
//! `/coredns` (upstream's agnhost image has it, for the DNS tests that run
//! a server of their own), the Conntrack test's server for kubernetes#74839
//! (`/regression-issue-74839`, its own image upstream), Debian's static
//! busybox for the coreutils with the harness's `wget` (see
//! [`install_busybox`]), and the host's dash (as `sh`), bash, curl,
//! dig, nslookup and OpenBSD nc with the shared libraries they load — under
//! a configuration of its own (entrypoint, command). One layer for all means containerd stores
//! it once per node.
//!
//! `distroless-iptables` (kube-proxy's base image upstream, which the
//! KubeProxy CLOSE_WAIT test runs on the host network to read
//! `/proc/net/nf_conntrack`) is this root filesystem too: the test runs
//! `sleep`, `sh`, `test`, `cat` and `grep` in it, not the iptables and
//! conntrack tools the real one ships.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use weft_testing::run;

use crate::images::{install_busybox, write_oci_archive};

/// Host programs the tests run in their pods, with options busybox's
/// applets lack (`curl -w`/`--interface`, OpenBSD `nc -v -u -t`, `dig`,
/// `getent hosts` through glibc's resolver),
/// and where each goes in the image (before busybox on `PATH`). The shell
/// is dash, not busybox's: that one runs its own applets in preference to
/// `PATH`, so `sh -c 'nc -v …'` would get busybox's `nc`.
const HOST_TOOLS: [(&str, &str); 7] = [
    ("/usr/bin/dash", "/bin/sh"),
    ("/usr/bin/bash", "/bin/bash"),
    ("/usr/bin/getent", "/usr/bin/getent"),
    ("/usr/bin/curl", "/usr/bin/curl"),
    ("/usr/bin/dig", "/usr/bin/dig"),
    ("/usr/bin/nslookup", "/usr/bin/nslookup"),
    ("/usr/bin/nc.openbsd", "/usr/bin/nc"),
];

/// The Debian packages of [`HOST_TOOLS`], for the error that names what to
/// install.
const PACKAGES: &str = "dash bash curl bind9-dnsutils netcat-openbsd";

const PATH: &str = "PATH=/usr/local/bin:/usr/bin:/bin";

/// Where the regression-issue-74839 image's server is, as in the real one.
const REGRESSION_SERVER: &str = "/regression-issue-74839";

/// Where the web-server images (`nginx`, `httpd`) serve from, on port 80 as
/// the real ones do.
const WEB_ROOT: &str = "srv/www";

/// The Go binaries the images carry, from `e2e/k8s/build.sh`.
pub(crate) struct ImageBinaries<'a> {
    /// `agnhost`, the tests' server and client.
    pub(crate) agnhost: &'a Path,
    /// CoreDNS, as `/coredns`.
    pub(crate) coredns: &'a Path,
    /// `regression-issue-74839`, the server that sends an out-of-window
    /// TCP segment.
    pub(crate) regression_server: &'a Path,
}

/// Builds an OCI archive in `dir` for each `(name, reference)` the suite
/// lists, with `binaries` inside; returns the archives.
pub(crate) fn build(
    dir: &Path,
    binaries: &ImageBinaries,
    images: &[(String, String)],
) -> Result<Vec<PathBuf>> {
    let rootfs = dir.join("rootfs");
    assemble_rootfs(&rootfs, binaries.agnhost)?;
    copy(binaries.coredns, &rootfs.join("coredns"))?;
    copy(
        binaries.regression_server,
        &rootfs.join(REGRESSION_SERVER.trim_start_matches('/')),
    )?;
    images
        .iter()
        .map(|(name, reference)| {
            let archive = dir.join(format!("{name}.oci.tar"));
            write_oci_archive(&rootfs, reference, image_config(name), &archive)?;
            Ok(archive)
        })
        .collect()
}

/// The runtime configuration of the image the suite calls `name`: what the
/// real image runs when a test's pod gives no command of its own.
fn image_config(name: &str) -> serde_json::Value {
    match name {
        "agnhost" => json!({ "Entrypoint": ["/agnhost"], "Cmd": ["pause"], "Env": [PATH] }),
        "pause" => json!({ "Entrypoint": ["/agnhost", "pause"], "Env": [PATH] }),
        "regression-issue-74839" => json!({ "Entrypoint": [REGRESSION_SERVER], "Env": [PATH] }),
        "nginx" | "httpd" => json!({
            "Cmd": ["httpd", "-f", "-p", "80", "-h", format!("/{WEB_ROOT}")],
            "Env": [PATH],
        }),
        _ => json!({ "Cmd": ["sh"], "Env": [PATH] }),
    }
}

/// Lays out the shared root filesystem in `rootfs` (made afresh).
fn assemble_rootfs(rootfs: &Path, agnhost: &Path) -> Result<()> {
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs)
            .with_context(|| format!("removing {}", rootfs.display()))?;
    }
    for dir in ["bin", "usr/bin", "etc", "tmp", WEB_ROOT] {
        let path = rootfs.join(dir);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    // Tests write scratch files to /tmp as whichever user they run as.
    std::fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .context("making the image's /tmp world-writable")?;
    copy(agnhost, &rootfs.join("agnhost"))?;

    install_busybox(&rootfs.join("bin"))?;

    for (host, image) in HOST_TOOLS {
        ensure!(
            Path::new(host).is_file(),
            "{host} is missing; install the tools the tests run in their pods: apt-get install {PACKAGES}"
        );
        copy(Path::new(host), &rootfs.join(image.trim_start_matches('/')))?;
        for library in shared_libraries(host)? {
            let target = rootfs.join(library.strip_prefix("/").unwrap_or(&library));
            if !target.exists() {
                copy(&library, &target)?;
            }
        }
    }
    // agnhost porter's TLS ports serve with these, read from its working
    // directory; upstream's image ships a pair, this one makes its own.
    run(Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:P-256", "-days", "36500"])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,IP:::1",
        ])
        .arg("-keyout")
        .arg(rootfs.join("localhost.key"))
        .arg("-out")
        .arg(rootfs.join("localhost.crt")))
    .context("making agnhost porter's TLS certificate (is openssl installed?)")?;
    // glibc's resolver, as the real images' files give it.
    std::fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files dns\n")
        .context("writing the image's nsswitch.conf")?;
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .context("writing the image's passwd")?;
    std::fs::write(
        rootfs.join(WEB_ROOT).join("index.html"),
        "<html><body>It works!</body></html>\n",
    )
    .context("writing the web-server images' index page")
}

/// The shared libraries (and the dynamic loader) `binary` loads, as `ldd`
/// lists them.
fn shared_libraries(binary: &str) -> Result<Vec<PathBuf>> {
    let listing = run(Command::new("ldd").arg(binary))?;
    // Lines are `name => /path (address)` or `/path (address)`; the vDSO
    // has no path.
    Ok(listing
        .lines()
        .filter_map(|line| {
            let path = line.rsplit("=>").next()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `from` (following symbolic links) to `to`, creating its directory
/// and replacing what is there.
fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // An applet's link names busybox: copying through it would overwrite
    // the image's busybox.
    match std::fs::remove_file(to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("replacing {}", to.display()))
        }
        _ => {}
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} into the image", from.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agnhost_and_pause_images_start_agnhost_like_the_real_ones() {
        assert_eq!(image_config("agnhost")["Entrypoint"], json!(["/agnhost"]));
        assert_eq!(image_config("agnhost")["Cmd"], json!(["pause"]));
        assert_eq!(
            image_config("pause")["Entrypoint"],
            json!(["/agnhost", "pause"])
        );
        assert_eq!(image_config("nginx")["Cmd"][0], json!("httpd"));
        assert_eq!(image_config("busybox")["Cmd"], json!(["sh"]));
        assert_eq!(
            image_config("regression-issue-74839")["Entrypoint"],
            json!(["/regression-issue-74839"])
        );
        assert_eq!(image_config("distroless-iptables")["Cmd"], json!(["sh"]));
    }

    #[test]
    fn the_tests_shell_finds_the_host_tools_before_busybox() {
        if !weft_testing::root_available("chroot into the image's root filesystem") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        // Any binary stands in for agnhost here.
        assemble_rootfs(&rootfs, Path::new("/usr/bin/dash")).unwrap();
        let found = run(Command::new("chroot").arg(&rootfs).args([
            "/bin/sh",
            "-c",
            "PATH=/usr/bin:/bin; for t in nc curl dig getent seq wget; do command -v $t; done",
        ]))
        .unwrap();
        assert_eq!(
            found.trim(),
            "/usr/bin/nc\n/usr/bin/curl\n/usr/bin/dig\n/usr/bin/getent\n/bin/seq\n/bin/wget"
        );
        // Busybox's wget would crash on -T (status 139); this one reports
        // the refused connection (nothing listens on the discard port).
        let wget = Command::new("chroot")
            .arg(&rootfs)
            .args([
                "/bin/wget",
                "-q",
                "-O",
                "-",
                "-T",
                "1",
                "http://127.0.0.1:9",
            ])
            .output()
            .unwrap();
        assert_eq!(wget.status.code(), Some(1), "{wget:?}");
        let usage = Command::new("chroot")
            .arg(&rootfs)
            .args([
                "/bin/sh",
                "-c",
                "PATH=/usr/bin:/bin; nc -h 2>&1; dig -v 2>&1",
            ])
            .output()
            .unwrap();
        let usage = String::from_utf8_lossy(&usage.stdout);
        assert!(
            usage.contains("OpenBSD netcat") && usage.contains("DiG"),
            "{usage}"
        );
    }

    #[test]
    fn ldd_output_gives_the_library_paths() {
        let libraries = shared_libraries("/bin/sh").unwrap();
        assert!(
            libraries.iter().all(|path| path.is_absolute()),
            "{libraries:?}"
        );
        assert!(
            libraries
                .iter()
                .any(|path| path.to_string_lossy().contains("libc.so")),
            "{libraries:?}"
        );
    }
}
