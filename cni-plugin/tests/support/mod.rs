//! Test fixtures: a node namespace with its node file and IPAM directory,
//! pod namespaces, and the `weft` binary run the way a runtime runs it.
//!
//! Namespaces are [`TestNetns`], removed on drop, which also runs while a
//! failing test unwinds; names carry the test process id and a per-test tag
//! so tests can run in parallel.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use weft_testing::TestNetns;

/// The plugin binary under test.
pub const WEFT: &str = env!("CARGO_BIN_EXE_weft");
/// The network name every test config uses.
pub const NETWORK: &str = "weftnet";

/// What one plugin run printed and how it exited.
#[derive(Debug)]
pub struct Reply {
    /// Exit status (-1 when killed).
    pub status: i32,
    /// Stdout parsed as JSON; `Null` when stdout was empty.
    pub json: Value,
    /// Stdout as printed.
    pub stdout: String,
    /// Stderr, for failure messages.
    pub stderr: String,
}

impl Reply {
    fn from_output(output: Output) -> Result<Self> {
        let stdout = String::from_utf8(output.stdout).context("stdout is not UTF-8")?;
        let json = if stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout)
                .with_context(|| format!("stdout is not only JSON: {stdout:?}"))?
        };
        Ok(Self {
            status: output.status.code().unwrap_or(-1),
            json,
            stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Fails unless the run succeeded.
    pub fn ok(self) -> Result<Self> {
        ensure!(
            self.status == 0,
            "plugin failed with {}: {} / {}",
            self.status,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    /// The spec error code of a failed run.
    pub fn error_code(&self) -> Option<u64> {
        self.json["code"].as_u64()
    }

    /// The error message of a failed run.
    pub fn error_msg(&self) -> &str {
        self.json["msg"].as_str().unwrap_or_default()
    }

    /// The pod interface addresses of an ADD result, in result order.
    pub fn addresses(&self) -> Vec<String> {
        self.json["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str().map(str::to_owned))
            .collect()
    }
}

/// One invocation's `CNI_*` environment.
#[derive(Debug, Clone, Default)]
pub struct Invocation<'a> {
    /// CNI_COMMAND; unset when `None`.
    pub command: Option<&'a str>,
    /// CNI_CONTAINERID
    pub container: Option<&'a str>,
    /// CNI_IFNAME
    pub ifname: Option<&'a str>,
    /// CNI_NETNS
    pub netns: Option<String>,
    /// CNI_ARGS
    pub args: Option<&'a str>,
}

impl<'a> Invocation<'a> {
    /// A verb on attachment (`container`, eth0) in `netns`.
    pub fn attach(command: &'a str, container: &'a str, netns: Option<String>) -> Self {
        Self {
            command: Some(command),
            container: Some(container),
            ifname: Some("eth0"),
            netns,
            args: None,
        }
    }

    /// A verb without attachment (GC, STATUS, VERSION).
    pub fn verb(command: &'a str) -> Self {
        Self {
            command: Some(command),
            ..Self::default()
        }
    }
}

/// The node's addresses on its uplink (see [`Node::uplink`]).
pub const NODE_V4: &str = "192.0.2.1";
/// The node's IPv6 address on its uplink.
pub const NODE_V6: &str = "2001:db8:7::1";

/// A node: its namespace (where the plugin runs and the host veths live)
/// and a directory with the node file and the IPAM data.
pub struct Node {
    /// The node namespace.
    pub netns: TestNetns,
    tag: String,
    dir: tempfile::TempDir,
}

impl Node {
    /// A node namespace for test `tag` with a dual-stack node file.
    pub fn new(tag: &str) -> Result<Self> {
        let node = Self::without_node_file(tag)?;
        node.write_node_file(&["10.123.4.0/24", "fd12:3:4:5::/64"], 1450)?;
        Ok(node)
    }

    /// A node namespace whose agent has not written the node file yet.
    pub fn without_node_file(tag: &str) -> Result<Self> {
        Ok(Self {
            netns: TestNetns::create(&format!("{tag}-node")),
            tag: tag.to_owned(),
            dir: tempfile::tempdir().context("creating the node's directory")?,
        })
    }

    /// Writes the node file as the agent would, in the cluster CIDRs
    /// 10.123.0.0/16 and fd12:3::/32.
    pub fn write_node_file(&self, pod_cidrs: &[&str], mtu: u32) -> Result<()> {
        self.write_node_file_in(pod_cidrs, &["10.123.0.0/16", "fd12:3::/32"], mtu)
    }

    /// Writes the node file with the given cluster CIDRs.
    pub fn write_node_file_in(
        &self,
        pod_cidrs: &[&str],
        cluster_cidrs: &[&str],
        mtu: u32,
    ) -> Result<()> {
        let file = json!({
            "nodeName": format!("node-{}", self.tag),
            "podCidrs": pod_cidrs,
            "clusterCidrs": cluster_cidrs,
            "mtu": mtu,
        });
        std::fs::write(self.node_file(), file.to_string()).context("writing the node file")
    }

    /// Where the node file lives.
    pub fn node_file(&self) -> PathBuf {
        self.dir.path().join("node.json")
    }

    /// The IPAM store of the test network.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam").join(NETWORK)
    }

    /// A pod namespace of this node.
    pub fn pod(&self, name: &str) -> TestNetns {
        TestNetns::create(&format!("{}-{name}", self.tag))
    }

    /// Gives the node an uplink: a veth `up0` with [`NODE_V4`]/24 and
    /// [`NODE_V6`]/64 to an "outside" namespace with `.2` and `::2`, which
    /// routes the node's pod slice (10.123.0.0/16, fd12:3::/32) via the
    /// node. Returns the outside namespace.
    pub fn uplink(&self) -> Result<TestNetns> {
        let outside = TestNetns::create(&format!("{}-out", self.tag));
        self.netns.run(&[
            "ip",
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            outside.name(),
        ])?;
        for (netns, device, v4, v6) in [
            (&self.netns, "up0", "192.0.2.1/24", "2001:db8:7::1/64"),
            (&outside, "eth0", "192.0.2.2/24", "2001:db8:7::2/64"),
        ] {
            netns.run(&["ip", "addr", "add", v4, "dev", device])?;
            netns.run(&["ip", "addr", "add", v6, "dev", device, "nodad"])?;
            netns.run(&["ip", "link", "set", device, "up"])?;
            netns.run(&["ip", "link", "set", "lo", "up"])?;
        }
        outside.run(&["ip", "route", "add", "10.123.0.0/16", "via", NODE_V4])?;
        outside.run(&["ip", "route", "add", "fd12:3::/32", "via", NODE_V6])?;
        Ok(outside)
    }

    /// The plugin config in `version`, with `extra` keys merged in.
    pub fn config(&self, version: &str, extra: Value) -> String {
        let mut config = json!({
            "cniVersion": version,
            "name": NETWORK,
            "type": "weft",
            "nodeFile": self.node_file(),
            "dataDir": self.dir.path().join("ipam"),
        });
        if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
            config.extend(extra);
        }
        config.to_string()
    }

    /// Starts the plugin inside the node namespace, exactly as a runtime
    /// would (environment + stdin), without waiting for it.
    pub fn spawn(&self, invocation: &Invocation, stdin: &str) -> Result<Child> {
        let mut command = self.netns.command(WEFT);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let pairs = [
            ("CNI_COMMAND", invocation.command.map(str::to_owned)),
            ("CNI_CONTAINERID", invocation.container.map(str::to_owned)),
            ("CNI_IFNAME", invocation.ifname.map(str::to_owned)),
            ("CNI_NETNS", invocation.netns.clone()),
            ("CNI_ARGS", invocation.args.map(str::to_owned)),
            ("CNI_PATH", Some("/opt/cni/bin".to_owned())),
        ];
        for (key, value) in pairs {
            if let Some(value) = value {
                command.env(key, value);
            }
        }
        let mut child = command.spawn().context("starting weft")?;
        let mut input = child.stdin.take().context("weft's stdin")?;
        // A plugin killed early closes its stdin; that is not a test failure.
        let _ = input.write_all(stdin.as_bytes());
        Ok(child)
    }

    /// Runs the plugin and waits for its reply.
    pub fn invoke(&self, invocation: &Invocation, stdin: &str) -> Result<Reply> {
        let child = self.spawn(invocation, stdin)?;
        Reply::from_output(child.wait_with_output().context("waiting for weft")?)
    }

    /// ADD of (`container`, eth0) into `pod` with the default 1.1.0 config.
    pub fn add(&self, container: &str, pod: &TestNetns) -> Result<Reply> {
        self.invoke(
            &Invocation::attach("ADD", container, Some(pod.path())),
            &self.config("1.1.0", json!({})),
        )
    }

    /// DEL of (`container`, eth0), optionally with a namespace path.
    pub fn del(&self, container: &str, netns: Option<String>) -> Result<Reply> {
        self.invoke(
            &Invocation::attach("DEL", container, netns),
            &self.config("1.1.0", json!({})),
        )
    }

    /// Names of the links in the node namespace.
    pub fn links(&self) -> Result<BTreeSet<String>> {
        let out = self.netns.run(&["ip", "-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .collect())
    }

    /// Host veth names in the node namespace.
    pub fn host_veths(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .links()?
            .into_iter()
            .filter(|name| name.starts_with("veth"))
            .collect())
    }

    /// Allocated addresses and their owner file contents.
    pub fn allocations(&self) -> Result<Vec<(String, String)>> {
        let dir = self.ipam_dir();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).context("listing the IPAM store")? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.parse::<std::net::IpAddr>().is_ok() {
                let owner = std::fs::read_to_string(entry.path()).unwrap_or_default();
                found.push((name, owner));
            }
        }
        found.sort();
        Ok(found)
    }

    /// Everything a failed invocation must leave unchanged: links, their
    /// addresses, routes and permanent neighbours in the node namespace,
    /// and the IPAM store.
    ///
    /// Only what the plugin can change is compared. IPv6 link-local
    /// addresses and their routes, the multicast route (`ff00::/8`) and an
    /// address's `tentative` flag are left out: the kernel adds and settles
    /// them on its own as links come up (duplicate address detection takes
    /// a second or more), so comparing them would compare timing.
    pub fn snapshot(&self) -> Result<String> {
        let ours = |listing: String| -> String {
            listing
                .lines()
                .filter(|line| !line.contains("fe80:") && !line.contains("ff00::/8"))
                .map(|line| line.replace(" tentative", ""))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let links = self.links()?;
        let addresses = ours(self.netns.run(&["ip", "-o", "addr", "show"])?);
        let routes = ours(self.netns.run(&["ip", "route", "show", "table", "all"])?);
        let neighbours = self
            .netns
            .run(&["ip", "neigh", "show", "nud", "permanent"])?;
        let store = self.allocations()?;
        Ok(format!(
            "{links:?}\n{addresses}\n{routes}\n{neighbours}\n{store:?}"
        ))
    }
}

/// The addresses of `ifname` in `pod` but IPv6 link-local ones, as
/// `address/len`.
pub fn pod_addresses(pod: &TestNetns, ifname: &str) -> Result<Vec<String>> {
    let out = pod.output(&["ip", "-o", "addr", "show", "dev", ifname])?;
    if !out.status.success() {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next().map(str::to_owned)
        })
        .filter(|address| !address.starts_with("fe80"))
        .collect())
}

/// Pings `address` once from `pod`; true if a reply came back.
pub fn ping(pod: &TestNetns, address: &str) -> Result<bool> {
    let family = if address.contains(':') { "-6" } else { "-4" };
    Ok(pod
        .output(&["ping", family, "-c", "1", "-W", "5", address])?
        .status
        .success())
}
