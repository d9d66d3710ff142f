//! ADD and DEL latency of `weft` (routed veths) against Debian's reference
//! `bridge` + `host-local` plugins with a config that gives a pod the same
//! reach (a gateway, a default route, hairpin), measured in one run.
//!
//! Run as root: `cargo bench -p weft-cni`. It measures `weft` as it ships,
//! built by `packaging/build-plugin.sh` (release, static; the reference
//! plugins are static Go binaries too). Each cycle makes a fresh pod namespace outside the timed part,
//! times ADD and DEL of one plugin (the process spawn included, as a runtime
//! pays it), and removes the namespace; the two plugins alternate cycles so
//! drift on the machine hits both alike. Both run inside a node namespace,
//! entered with `setns` between fork and exec, never in the root namespace.
//! `WEFT_BENCH_CYCLES` overrides the 200 cycles per plugin.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sched::{setns, CloneFlags};
use serde_json::json;
use weft_testing::measure::percentile;
use weft_testing::{printed_path, TestNetns};

/// Builds the shipped plugin and prints its path.
const BUILD_PLUGIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/build-plugin.sh");
/// Where Debian's containernetworking-plugins installs the reference plugins.
const REFERENCE_DIR: &str = "/usr/lib/cni";
const WARMUP_CYCLES: usize = 5;

/// One plugin under test: binary, config and CNI_PATH.
struct Plugin {
    label: &'static str,
    binary: PathBuf,
    config: String,
    cni_path: String,
    add: Vec<Duration>,
    del: Vec<Duration>,
}

impl Plugin {
    /// Runs one verb inside the node namespace and returns its wall time.
    // pre_exec (setns in the child before exec) is unsafe by signature.
    #[allow(unsafe_code)]
    fn invoke(&self, node: &File, verb: &str, container: &str, pod: &str) -> Result<Duration> {
        let node_fd = node.as_raw_fd();
        let mut command = Command::new(&self.binary);
        command
            .env_clear()
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", container)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", pod)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: runs in the forked child before exec and only makes the
        // setns system call on a descriptor the parent keeps open.
        unsafe {
            command.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(node_fd);
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", self.label))?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("plugin stdin")?;
            stdin.write_all(self.config.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        let elapsed = started.elapsed();
        if !output.status.success() {
            bail!(
                "{} {verb} failed: {} {}",
                self.label,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(elapsed)
    }

    /// One cycle: fresh pod namespace (untimed), ADD, DEL, namespace gone.
    fn cycle(&mut self, node: &File, id: &str, record: bool) -> Result<()> {
        let pod = TestNetns::create(id);
        let container = format!("bench-{id}");
        let add = self.invoke(node, "ADD", &container, &pod.path())?;
        let del = self.invoke(node, "DEL", &container, &pod.path())?;
        if record {
            self.add.push(add);
            self.del.push(del);
        }
        Ok(())
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    if !weft_testing::root_available("the ADD/DEL benchmark creates network namespaces") {
        return Ok(());
    }
    for plugin in ["bridge", "host-local"] {
        ensure!(
            Path::new(REFERENCE_DIR).join(plugin).exists(),
            "{REFERENCE_DIR}/{plugin} is missing: apt-get install -y containernetworking-plugins"
        );
    }
    let cycles: usize = match std::env::var("WEFT_BENCH_CYCLES") {
        Ok(value) => value
            .parse()
            .context("WEFT_BENCH_CYCLES must be a number")?,
        Err(_) => 200,
    };

    let dir = tempfile::tempdir()?;
    let node_file = dir.path().join("node.json");
    std::fs::write(
        &node_file,
        json!({
            "nodeName": "bench",
            "podCidrs": ["10.124.0.0/16"],
            "clusterCidrs": ["10.124.0.0/14"],
            "mtu": 1450,
        })
        .to_string(),
    )?;
    let node = TestNetns::create("node");
    let node_handle = File::open(node.path()).context("opening the node namespace")?;

    let mut plugins = [
        Plugin {
            label: "weft",
            binary: printed_path(&mut Command::new(BUILD_PLUGIN))?,
            config: json!({
                "cniVersion": "1.0.0",
                "name": "weftbench",
                "type": "weft",
                "nodeFile": node_file,
                "dataDir": dir.path().join("weft-ipam"),
            })
            .to_string(),
            cni_path: REFERENCE_DIR.into(),
            add: Vec::new(),
            del: Vec::new(),
        },
        Plugin {
            label: "bridge+host-local",
            binary: Path::new(REFERENCE_DIR).join("bridge"),
            config: json!({
                "cniVersion": "1.0.0",
                "name": "refbench",
                "type": "bridge",
                "bridge": "refbr0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": "10.125.0.0/16" }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": dir.path().join("ref-ipam"),
                },
            })
            .to_string(),
            cni_path: REFERENCE_DIR.into(),
            add: Vec::new(),
            del: Vec::new(),
        },
    ];

    for i in 0..WARMUP_CYCLES + cycles {
        for (n, plugin) in plugins.iter_mut().enumerate() {
            plugin.cycle(&node_handle, &format!("p{n}-{i}"), i >= WARMUP_CYCLES)?;
        }
    }

    println!("ADD/DEL latency, {cycles} cycles per plugin, fresh pod netns per cycle (ms)");
    println!(
        "{:<20} {:>8} {:>8} {:>8} {:>8}",
        "plugin", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    let row = |plugin: &Plugin| {
        [
            percentile(&plugin.add, 50.0),
            percentile(&plugin.add, 99.0),
            percentile(&plugin.del, 50.0),
            percentile(&plugin.del, 99.0),
        ]
    };
    for plugin in &plugins {
        let [a50, a99, d50, d99] = row(plugin).map(millis);
        println!(
            "{:<20} {a50:>8.2} {a99:>8.2} {d50:>8.2} {d99:>8.2}",
            plugin.label
        );
    }
    let (ours, reference) = (row(&plugins[0]), row(&plugins[1]));
    let ratio = |i: usize| millis(ours[i]) / millis(reference[i]);
    println!(
        "{:<20} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        "weft / reference",
        ratio(0),
        ratio(1),
        ratio(2),
        ratio(3)
    );
    println!("goal: ADD p50 ratio <= 0.30, DEL p50 ratio <= 0.50");
    Ok(())
}
