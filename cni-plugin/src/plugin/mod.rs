//! The `weft` CNI plugin: one invocation, from the `CNI_*` environment and
//! the config on stdin to the JSON for stdout and the exit status.
//!
//! The binary only reads stdin, calls [`run`], prints [`Reply::stdout`] and
//! exits with [`Reply::exit_status`]. Logs go through `tracing`, which the
//! binary points at stderr: stdout is the protocol.
//!
//! Kernel work happens on a current-thread tokio runtime: the plugin's own
//! namespace (the node) gets a netlink socket directly, the pod's namespace
//! gets one made inside it by [`Netlink::in_netns`].

mod add;
mod check;
mod host_veth;
mod hostport;
mod network;
mod node_slices;
mod remove;
// Forks a child that shares the parent's memory: the one place the plugin
// needs unsafe code, kept beside the DEL path that uses it.
#[allow(unsafe_code)]
mod unregister;

pub use network::{FamilyNetwork, Network, POD_GATEWAY_V4, POD_GATEWAY_V6};

use crate::cni::{version_json, CniError, CniVersion, Command, ErrorCode, Invocation, NetConf};
use crate::ipam::IpamError;
use weft_core::netlink::{Netlink, NetlinkError};
use weft_core::netns::{Netns, NetnsError};
use weft_core::nodefile::{NodeConfig, NodeFileError};

/// Plugin-specific error code (the spec leaves 100 and up to plugins): the
/// pod subnet has no free address.
pub const CODE_RANGE_EXHAUSTED: u32 = 100;
/// Plugin-specific error code: the kernel refused a network change.
pub const CODE_KERNEL: u32 = 101;
/// Plugin-specific error code: CHECK found the attachment differs from
/// `prevResult`.
pub const CODE_CHECK_FAILED: u32 = 102;
/// Plugin-specific error code: a requested hostPort is already mapped to
/// another pod on this node.
pub const CODE_HOSTPORT_TAKEN: u32 = 103;

/// The loopback device is always interface 1 in a network namespace (the
/// kernel registers it first, as LOOPBACK_IFINDEX).
const LOOPBACK_INDEX: u32 = 1;

/// What one invocation prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Result or error JSON; empty for verbs that return nothing.
    pub stdout: String,
    /// 0 on success, the error's status otherwise.
    pub exit_status: u8,
}

/// Runs one plugin invocation. `env` is the process environment (only
/// `CNI_*` variables are read), `stdin` the network configuration.
pub fn run<I>(env: I, stdin: &[u8]) -> Reply
where
    I: IntoIterator<Item = (String, String)>,
{
    match execute(env, stdin) {
        Ok(stdout) => Reply {
            stdout,
            exit_status: 0,
        },
        Err(error) => {
            tracing::error!(%error, "CNI invocation failed");
            // An error is rendered in the caller's version when stdin says
            // which one it speaks, even if the rest of the config is bad.
            let version = NetConf::peek_version(stdin).unwrap_or(CniVersion::LATEST);
            Reply {
                stdout: error.to_json(version),
                exit_status: error.exit_status(),
            }
        }
    }
}

fn execute<I>(env: I, stdin: &[u8]) -> Result<String, CniError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let invocation = Invocation::from_env(env)?;
    if invocation.command == Command::Version {
        return Ok(version_json());
    }
    let conf = match invocation.command {
        Command::Del => NetConf::parse_without_prev_result(stdin)?,
        _ => NetConf::parse(stdin)?,
    };
    require_version(invocation.command, conf.cni_version)?;
    tracing::debug!(command = %invocation.command, network = %conf.name, "invoked");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| {
            CniError::new(
                ErrorCode::Io,
                "cannot start the plugin's event loop: check the process's file descriptor limit",
            )
            .with_details(source.to_string())
        })?;
    runtime.block_on(async {
        match invocation.command {
            Command::Add => {
                let result = add::add(&invocation, &conf).await?;
                Ok(result.to_json(conf.cni_version).to_string())
            }
            Command::Del => remove::del(&invocation, &conf)
                .await
                .map(|()| String::new()),
            Command::Check => check::check(&invocation, &conf)
                .await
                .map(|()| String::new()),
            Command::Gc => remove::gc(&conf).await.map(|()| String::new()),
            Command::Status => status(&conf).await.map(|()| String::new()),
            Command::Version => Ok(version_json()),
        }
    })
}

/// CHECK arrived in spec 0.4.0, GC and STATUS in 1.1.0; a config of an
/// older version cannot ask for them.
fn require_version(command: Command, version: CniVersion) -> Result<(), CniError> {
    let needed = match command {
        Command::Check => CniVersion::V0_4_0,
        Command::Gc | Command::Status => CniVersion::V1_1_0,
        _ => return Ok(()),
    };
    if version >= needed {
        return Ok(());
    }
    Err(CniError::new(
        ErrorCode::IncompatibleVersion,
        format!("{command} is not part of cniVersion {version}: set \"cniVersion\" to {needed} or later"),
    ))
}

/// STATUS: ready once the agent has written a node file whose slices ADD
/// would accept.
async fn status(conf: &NetConf) -> Result<(), CniError> {
    let not_available = ErrorCode::PluginNotAvailable;
    let node = NodeConfig::load(&conf.node_file)
        .map_err(|error| CniError::new(not_available, error.to_string()))?;
    node_slices::check_usable(&node, &conf.node_file)
        .map_err(|error| error.into_cni(not_available))?;
    node_slices::check_underlay(&node_netlink()?, &node, &conf.node_file)
        .await
        .map_err(|error| error.into_cni(not_available))
}

/// The node file for ADD: missing means "not yet", which a runtime retries.
fn load_node(conf: &NetConf) -> Result<NodeConfig, CniError> {
    NodeConfig::load(&conf.node_file).map_err(|error| {
        let code = match error {
            NodeFileError::Missing { .. } => ErrorCode::TryAgainLater,
            NodeFileError::Read { .. } | NodeFileError::Write { .. } => ErrorCode::Io,
            NodeFileError::Malformed { .. } | NodeFileError::TooLarge { .. } => {
                ErrorCode::InvalidNetworkConfig
            }
        };
        CniError::new(code, error.to_string())
    })
}

/// Opens `CNI_NETNS`; a path that is not a namespace, or is the plugin's
/// own, is the runtime's mistake (code 4), anything else an I/O failure.
///
/// The plugin runs in the node's namespace, so wiring "the pod" there would
/// put the pod interface, its address and a default route on the node.
fn open_netns(invocation: &Invocation) -> Result<Netns, CniError> {
    let Some(path) = &invocation.netns else {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_NETNS is required for {}: the container runtime must set it",
                invocation.command
            ),
        ));
    };
    let netns = Netns::open(path).and_then(|netns| Ok((netns.is_current()?, netns)));
    match netns {
        Ok((false, netns)) => Ok(netns),
        Ok((true, _)) => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_NETNS {} is the network namespace weft runs in (the node's or the runtime's own), not a pod's: pass the path of the pod's network namespace",
                path.display()
            ),
        )),
        Err(error @ (NetnsError::Missing { .. } | NetnsError::NotNetns { .. })) => {
            Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!(
                    "CNI_NETNS: {error}: pass the path of the container's existing network namespace"
                ),
            ))
        }
        Err(other) => Err(CniError::new(ErrorCode::Io, format!("CNI_NETNS: {other}"))),
    }
}

/// A kernel refusal as a CNI error.
fn kernel_error(error: NetlinkError) -> CniError {
    match error {
        NetlinkError::Netns(error) => CniError::new(ErrorCode::Io, error.to_string()),
        other => CniError::new(CODE_KERNEL, other.to_string()),
    }
}

/// An IPAM failure as a CNI error.
fn ipam_error(error: IpamError) -> CniError {
    let code = match error {
        IpamError::Exhausted { .. } => CODE_RANGE_EXHAUSTED,
        IpamError::RangeTooSmall { .. } => ErrorCode::InvalidNetworkConfig.code(),
        IpamError::Io { .. } => ErrorCode::Io.code(),
    };
    CniError::new(code, error.to_string())
}

/// The netlink socket of the namespace the plugin runs in (the node).
fn node_netlink() -> Result<Netlink, CniError> {
    Netlink::current().map_err(kernel_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn version_needs_no_config() {
        let reply = run(env(&[("CNI_COMMAND", "VERSION")]), b"");
        assert_eq!(reply.exit_status, 0);
        assert!(
            reply.stdout.contains("\"supportedVersions\""),
            "{}",
            reply.stdout
        );
    }

    #[test]
    fn verbs_newer_than_the_config_version_are_refused() {
        let config = br#"{"cniVersion":"0.3.1","name":"net","type":"weft"}"#;
        for verb in ["CHECK", "GC", "STATUS"] {
            let reply = run(
                env(&[
                    ("CNI_COMMAND", verb),
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/proc/self/ns/net"),
                    ("CNI_PATH", "/opt/cni/bin"),
                ]),
                config,
            );
            assert_eq!(reply.exit_status, 1, "{verb}: {}", reply.stdout);
            assert!(
                reply.stdout.contains("\"cniVersion\":\"0.3.1\""),
                "{}",
                reply.stdout
            );
        }
    }

    #[test]
    fn add_and_check_refuse_the_plugins_own_netns() {
        let dir = tempfile::tempdir().unwrap();
        let node_file = dir.path().join("node.json");
        std::fs::write(
            &node_file,
            br#"{"nodeName":"n","podCidrs":["10.244.1.0/24"],"clusterCidrs":["10.244.0.0/16"],"mtu":1450}"#,
        )
        .unwrap();
        let data_dir = dir.path().join("ipam");
        let config = serde_json::json!({
            "cniVersion": "1.1.0", "name": "net", "type": "weft",
            "nodeFile": node_file, "dataDir": data_dir,
            "prevResult": { "cniVersion": "1.1.0" },
        })
        .to_string();
        for verb in ["ADD", "CHECK"] {
            let reply = run(
                env(&[
                    ("CNI_COMMAND", verb),
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/proc/thread-self/ns/net"),
                    ("CNI_PATH", "/opt/cni/bin"),
                ]),
                config.as_bytes(),
            );
            assert_eq!(reply.exit_status, 4, "{verb}: {}", reply.stdout);
            let error: serde_json::Value = serde_json::from_str(&reply.stdout).unwrap();
            let msg = error["msg"].as_str().unwrap();
            assert!(
                msg.contains(
                    "CNI_NETNS /proc/thread-self/ns/net is the network namespace weft runs in"
                ),
                "{verb}: {msg}"
            );
        }
        assert!(!data_dir.exists(), "no address was allocated");
    }

    #[test]
    fn status_without_node_file_is_code_50() {
        let config = br#"{"cniVersion":"1.1.0","name":"net","type":"weft","nodeFile":"/nonexistent/node.json"}"#;
        let reply = run(env(&[("CNI_COMMAND", "STATUS")]), config);
        assert_eq!(reply.exit_status, 50, "{}", reply.stdout);
    }
}
