//! Pods as a container runtime makes them: a network namespace wired by the
//! CNI plugin, driven per the CNI specification (environment + netconf on
//! stdin, result on stdout).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde_json::Value;

use crate::exec::{command_in, netns_path, ping_from};
use crate::underlay;

/// The interface name a runtime asks the plugin to create in the pod.
pub const POD_INTERFACE: &str = "eth0";

/// A pod created on a node by the CNI plugin's ADD.
///
/// Dropping it leaves it in place (the cluster's teardown removes it with the
/// node); [`Pod::delete`] runs DEL and removes the namespace, as a runtime
/// does when a pod goes away.
#[derive(Debug)]
pub struct Pod {
    /// The pod's name (passed as `K8S_POD_NAME`).
    pub name: String,
    /// The pod's network namespace name.
    pub netns: String,
    /// The addresses of the plugin's result (`ips[].address`).
    pub ips: Vec<IpNet>,
    /// The plugin's whole ADD result.
    pub result: Value,
    node_netns: String,
    plugin: PathBuf,
    netconf: String,
}

impl Pod {
    /// Creates namespace `netns` for pod `name` and runs the plugin's ADD
    /// inside `node_netns`, the namespace of the node the pod is on; the
    /// node names its pods' namespaces, so it can find them again to remove.
    pub(crate) fn add(
        node_netns: &str,
        netns: String,
        plugin: &Path,
        netconf: &str,
        name: &str,
    ) -> Result<Self> {
        underlay::add_netns(&netns)
            .with_context(|| format!("creating the namespace of pod {name}"))?;
        let mut pod = Self {
            name: name.to_owned(),
            netns,
            ips: Vec::new(),
            result: Value::Null,
            node_netns: node_netns.to_owned(),
            plugin: plugin.to_owned(),
            netconf: netconf.to_owned(),
        };
        match pod.invoke("ADD", netconf) {
            Ok(result) => {
                pod.ips = addresses_of(&result)
                    .with_context(|| format!("reading the ADD result of pod {name}: {result}"))?;
                pod.result = result;
                Ok(pod)
            }
            Err(e) => {
                // A runtime calls DEL after a failed ADD so the plugin can
                // release what it took; then the sandbox goes.
                let _ = pod.invoke("DEL", netconf);
                let _ = underlay::delete_netns_with_processes(&pod.netns);
                Err(e)
            }
        }
    }

    /// The first address of the pod (without prefix).
    pub fn ip(&self) -> Option<IpAddr> {
        self.ips.first().map(IpNet::addr)
    }

    /// The pod's namespace as a path.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// A command that runs `program` inside the pod's network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.netns, program)
    }

    /// Whether one ICMP echo to `ip` from the pod is answered within a second.
    pub fn ping(&self, ip: IpAddr) -> bool {
        ping_from(&self.netns, ip)
    }

    /// Runs the plugin's DEL (with the ADD result as `prevResult`) and removes
    /// the pod's namespace. The namespace goes even if DEL fails.
    pub fn delete(self) -> Result<()> {
        let netconf = with_prev_result(&self.netconf, &self.result);
        let deleted = self.invoke("DEL", &netconf).map(drop);
        let removed = underlay::delete_netns_with_processes(&self.netns);
        deleted.and(removed)
    }

    /// Runs the plugin inside the node's namespace for `command` and returns
    /// its stdout as JSON (`null` when empty, as DEL's may be).
    fn invoke(&self, command: &str, netconf: &str) -> Result<Value> {
        let plugin_dir = self.plugin.parent().unwrap_or(Path::new("/"));
        // Beside the plugin first, then where Debian and upstream put the
        // reference plugins, for a plugin that delegates (e.g. to host-local).
        let cni_path = format!("{}:/opt/cni/bin:/usr/lib/cni", plugin_dir.display());
        let mut child = command_in(&self.node_netns, &self.plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.netns)
            .env("CNI_NETNS", netns_path(&self.netns))
            .env("CNI_IFNAME", POD_INTERFACE)
            .env("CNI_PATH", cni_path)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                    self.name, self.netns
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting CNI plugin {}", self.plugin.display()))?;
        child
            .stdin
            .take()
            .context("CNI plugin stdin")?
            .write_all(netconf.as_bytes())
            .context("writing the network configuration to the CNI plugin")?;
        let output = child
            .wait_with_output()
            .context("waiting for the CNI plugin")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "CNI {command} for pod {} failed ({}): stdout: {} stderr: {}",
                self.name,
                output.status,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).with_context(|| {
            format!(
                "CNI {command} for pod {} printed something other than JSON: {stdout}",
                self.name
            )
        })
    }
}

/// The netconf a runtime passes to DEL: the ADD one plus `prevResult`.
fn with_prev_result(netconf: &str, result: &Value) -> String {
    match serde_json::from_str::<Value>(netconf) {
        Ok(Value::Object(mut conf)) if !result.is_null() => {
            conf.insert("prevResult".into(), result.clone());
            Value::Object(conf).to_string()
        }
        _ => netconf.to_owned(),
    }
}

/// `ips[].address` of a CNI result.
fn addresses_of(result: &Value) -> Result<Vec<IpNet>> {
    let Some(ips) = result.get("ips").and_then(Value::as_array) else {
        bail!("the result has no `ips` list");
    };
    ips.iter()
        .map(|ip| {
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .context("an `ips` entry has no `address`")?;
            address
                .parse()
                .with_context(|| format!("`{address}` is not an address with prefix"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn addresses_come_from_the_ips_list() {
        let result = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1"}]});
        assert_eq!(
            addresses_of(&result).unwrap(),
            vec!["10.244.1.5/24".parse::<IpNet>().unwrap()]
        );
        assert!(addresses_of(&json!({"cniVersion": "1.0.0"})).is_err());
    }

    #[test]
    fn del_gets_the_add_result_as_prev_result() {
        let conf = r#"{"cniVersion":"1.0.0","name":"weft","type":"weft"}"#;
        let result = json!({"ips": []});
        let del: Value = serde_json::from_str(&with_prev_result(conf, &result)).unwrap();
        assert_eq!(del["prevResult"], result);
        assert_eq!(del["type"], "weft");
    }
}
