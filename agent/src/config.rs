//! The agent's configuration: [`AgentSettings`], the keys that the YAML
//! config file, the environment (`WEFT_*`) and the flags each set, layered
//! as [`weft_daemon::config`] describes (flags > environment > file), and
//! [`AgentConfig`], the defaults filled in and every value validated once.
//!
//! The keys are the Helm chart's agent values (camelCase, like the
//! controller's `clusterCidr`); docs/configuration.md lists them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use weft_core::ip::IpFamily;
use weft_daemon::config::Layer;
use weft_daemon::slices::{SlicePlans, SliceSettings, SliceSettingsError};

/// How the agent reaches peers' slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Every peer through the `weft.1` VXLAN tunnel.
    #[default]
    Vxlan,
    /// Plain routes via each peer's node address; needs every node on one L2
    /// segment.
    HostGw,
    /// host-gw to peers on this node's underlay subnet, vxlan to the rest.
    Direct,
}

impl Backend {
    /// The name used in config and in the `weft.dev/backend-type` annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Direct => "direct",
        }
    }

    /// Whether this backend needs the `weft.1` VXLAN device.
    pub fn uses_vxlan(self) -> bool {
        !matches!(self, Backend::HostGw)
    }
}

impl std::str::FromStr for Backend {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vxlan" => Ok(Backend::Vxlan),
            "host-gw" => Ok(Backend::HostGw),
            "direct" => Ok(Backend::Direct),
            other => Err(ConfigError::invalid(
                "backend",
                other,
                "use vxlan, host-gw or direct",
            )),
        }
    }
}

/// Whether tx checksum offload stays on for `weft.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChecksumOffload {
    /// Off on kernels known to corrupt VXLAN UDP checksums under NAT, on
    /// elsewhere (see [`crate::offload`]).
    #[default]
    Auto,
    /// Always leave the kernel's default (offload on).
    On,
    /// Always turn it off (costs throughput, always correct).
    Off,
}

impl std::str::FromStr for ChecksumOffload {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ChecksumOffload::Auto),
            "on" => Ok(ChecksumOffload::On),
            "off" => Ok(ChecksumOffload::Off),
            other => Err(ConfigError::invalid(
                "checksumOffload",
                other,
                "use auto, on or off",
            )),
        }
    }
}

/// A bad setting. The message names the key and the fix (a config file that
/// cannot be read or parsed is a [`weft_daemon::config::ConfigFileError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range or malformed.
    #[error("config key {key}: {value:?} is invalid: {fix}")]
    Invalid {
        /// The YAML key (the flag is its kebab-case form).
        key: &'static str,
        /// The rejected value.
        value: String,
        /// What to write instead.
        fix: &'static str,
    },
    /// The cluster CIDRs and slice sizes do not make the controller's
    /// slice plans.
    #[error(transparent)]
    Slices(#[from] SliceSettingsError),
}

impl ConfigError {
    fn invalid(key: &'static str, value: impl ToString, fix: &'static str) -> Self {
        ConfigError::Invalid {
            key,
            value: value.to_string(),
            fix,
        }
    }
}

/// The agent's settings as one layer (config file, or environment and
/// flags) gives them. Each field's doc is its `--help` text, which names the
/// file key; the flag is the field name in kebab-case.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSettings {
    /// vxlan, host-gw or direct (backend) [default: vxlan].
    #[arg(long, env = "WEFT_BACKEND")]
    pub backend: Option<Backend>,
    /// VXLAN network identifier (vni) [default: 1].
    #[arg(long, env = "WEFT_VNI")]
    pub vni: Option<u32>,
    /// VXLAN UDP port (port) [default: 8472].
    #[arg(long, env = "WEFT_PORT")]
    pub port: Option<u16>,
    /// MTU of weft.1 and pods (mtu) [default: underlay MTU minus the VXLAN overhead].
    #[arg(long, env = "WEFT_MTU")]
    pub mtu: Option<u32>,
    /// Underlay interface name (iface) [default: the link holding the Node's InternalIP].
    #[arg(long, env = "WEFT_IFACE")]
    pub iface: Option<String>,
    /// Underlay interface name pattern (ifaceRegex).
    #[arg(long, env = "WEFT_IFACE_REGEX")]
    pub iface_regex: Option<String>,
    /// Seconds between full reconciles that repair drift (resyncSeconds) [default: 60].
    #[arg(long, env = "WEFT_RESYNC_SECONDS")]
    pub resync_seconds: Option<u64>,
    /// The cluster CIDRs and slice sizes, as given to the controller.
    #[command(flatten)]
    #[serde(flatten)]
    pub slices: SliceSettings,
    /// Destinations pods reach without masquerade, comma separated (noMasqueradeCidrs).
    #[arg(long, env = "WEFT_NO_MASQUERADE_CIDRS", value_delimiter = ',')]
    pub no_masquerade_cidrs: Option<Vec<IpNet>>,
    /// auto, on or off: tx checksum offload on weft.1 (checksumOffload) [default: auto].
    #[arg(long, env = "WEFT_CHECKSUM_OFFLOAD")]
    pub checksum_offload: Option<ChecksumOffload>,
    /// Where the weft plugin binary is installed (cniBinDir) [default: /opt/cni/bin].
    #[arg(long, env = "WEFT_CNI_BIN_DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// Where the conflist is installed (cniConfDir) [default: /etc/cni/net.d].
    #[arg(long, env = "WEFT_CNI_CONF_DIR")]
    pub cni_conf_dir: Option<PathBuf>,
    /// The plugin binary to install (cniPluginSource) [default: weft beside this binary].
    #[arg(long, env = "WEFT_CNI_PLUGIN_SOURCE")]
    pub cni_plugin_source: Option<PathBuf>,
    /// The node file the plugin reads (nodeFile) [default: /run/weft/node.json].
    #[arg(long, env = "WEFT_NODE_FILE")]
    pub node_file: Option<PathBuf>,
    /// Listen address of /healthz, /readyz, /status and /metrics (metricsAddress) [default: 0.0.0.0:9465].
    #[arg(long, env = "WEFT_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
    /// NetworkPolicy enforcement (networkPolicy).
    #[command(flatten)]
    #[serde(default)]
    pub network_policy: NetworkPolicySettings,
}

/// The `networkPolicy` keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySettings {
    /// Enforce NetworkPolicy for this node's pods (networkPolicy.enabled) [default: true].
    #[arg(long = "network-policy-enabled", env = "WEFT_NETWORK_POLICY_ENABLED")]
    pub enabled: Option<bool>,
}

impl Layer for AgentSettings {
    fn overlaid_with(self, higher: AgentSettings) -> AgentSettings {
        AgentSettings {
            backend: higher.backend.or(self.backend),
            vni: higher.vni.or(self.vni),
            port: higher.port.or(self.port),
            mtu: higher.mtu.or(self.mtu),
            iface: higher.iface.or(self.iface),
            iface_regex: higher.iface_regex.or(self.iface_regex),
            resync_seconds: higher.resync_seconds.or(self.resync_seconds),
            slices: self.slices.overlaid_with(higher.slices),
            no_masquerade_cidrs: higher.no_masquerade_cidrs.or(self.no_masquerade_cidrs),
            checksum_offload: higher.checksum_offload.or(self.checksum_offload),
            cni_bin_dir: higher.cni_bin_dir.or(self.cni_bin_dir),
            cni_conf_dir: higher.cni_conf_dir.or(self.cni_conf_dir),
            cni_plugin_source: higher.cni_plugin_source.or(self.cni_plugin_source),
            node_file: higher.node_file.or(self.node_file),
            metrics_address: higher.metrics_address.or(self.metrics_address),
            network_policy: NetworkPolicySettings {
                enabled: higher
                    .network_policy
                    .enabled
                    .or(self.network_policy.enabled),
            },
        }
    }
}

/// The agent's validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// How peers are reached.
    pub backend: Backend,
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// VXLAN UDP destination port.
    pub port: u16,
    /// MTU override for `weft.1` and pods; `None` derives it from the
    /// underlay.
    pub mtu: Option<u32>,
    /// Underlay interface by name.
    pub iface: Option<String>,
    /// Underlay interface by regular expression (validated here).
    pub iface_regex: Option<String>,
    /// Period of the full reconcile.
    pub resync: Duration,
    /// The cluster's pod CIDRs (IPv4 first, then IPv6 when dual-stack).
    pub cluster_cidrs: Vec<IpNet>,
    /// The prefix length of every IPv4 slice; a peer's slice of another
    /// length is rejected.
    pub slice_size_v4: u8,
    /// The prefix length of every IPv6 slice.
    pub slice_size_v6: u8,
    /// Destinations never masqueraded.
    pub no_masquerade_cidrs: Vec<IpNet>,
    /// Checksum offload policy for `weft.1`.
    pub checksum_offload: ChecksumOffload,
    /// Directory the plugin binary is installed into.
    pub cni_bin_dir: PathBuf,
    /// Directory the conflist is installed into.
    pub cni_conf_dir: PathBuf,
    /// The plugin binary to install.
    pub cni_plugin_source: PathBuf,
    /// The node file path.
    pub node_file: PathBuf,
    /// Address of the health and metrics server.
    pub metrics_address: SocketAddr,
    /// Whether the agent enforces NetworkPolicy.
    pub network_policy: bool,
}

/// Default VXLAN UDP port: the Linux kernel's and flannel's, so existing
/// firewall rules for flannel keep working.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

impl AgentSettings {
    /// Fills in the defaults and validates the merged layers (the file
    /// overlaid with environment and flags). `agent_binary` is the running
    /// agent's path, whose directory holds the plugin binary by default.
    pub fn resolve(self, agent_binary: &Path) -> Result<AgentConfig, ConfigError> {
        let vni = self.vni.unwrap_or(1);
        if !(1..=0x00ff_ffff).contains(&vni) {
            return Err(ConfigError::invalid(
                "vni",
                vni,
                "use a VXLAN network identifier from 1 to 16777215",
            ));
        }
        let port = self.port.unwrap_or(DEFAULT_VXLAN_PORT);
        if port == 0 {
            return Err(ConfigError::invalid(
                "port",
                port,
                "use a UDP port from 1 to 65535 (default 8472)",
            ));
        }
        if let Some(mtu) = self.mtu {
            if !(1280..=65535).contains(&mtu) {
                return Err(ConfigError::invalid(
                    "mtu",
                    mtu,
                    "use 1280..=65535 (IPv6 needs 1280), or leave it unset to derive it from the underlay",
                ));
            }
        }
        if let Some(pattern) = &self.iface_regex {
            if regex::Regex::new(pattern).is_err() {
                return Err(ConfigError::invalid(
                    "ifaceRegex",
                    pattern,
                    "write a valid regular expression (Rust regex syntax), e.g. ^eth[0-9]+$",
                ));
            }
        }
        let resync_seconds = self.resync_seconds.unwrap_or(60);
        if resync_seconds == 0 {
            return Err(ConfigError::invalid(
                "resyncSeconds",
                resync_seconds,
                "use a period of at least 1 second (default 60)",
            ));
        }
        let SlicePlans { v4, v6 } = self.slices.resolve()?;
        let cluster_cidrs = std::iter::once(v4.cluster())
            .chain(v6.map(|plan| plan.cluster()))
            .collect();
        let slice_size_v6 = v6.map_or(IpFamily::V6.default_slice_prefix(), |plan| {
            plan.slice_prefix()
        });
        let cni_plugin_source = self
            .cni_plugin_source
            .unwrap_or_else(|| agent_binary.parent().unwrap_or(Path::new("/")).join("weft"));
        Ok(AgentConfig {
            backend: self.backend.unwrap_or_default(),
            vni,
            port,
            mtu: self.mtu,
            iface: self.iface,
            iface_regex: self.iface_regex,
            resync: Duration::from_secs(resync_seconds),
            cluster_cidrs,
            slice_size_v4: v4.slice_prefix(),
            slice_size_v6,
            no_masquerade_cidrs: self
                .no_masquerade_cidrs
                .unwrap_or_default()
                .into_iter()
                .map(|cidr| cidr.trunc())
                .collect(),
            checksum_offload: self.checksum_offload.unwrap_or_default(),
            cni_bin_dir: self
                .cni_bin_dir
                .unwrap_or_else(|| PathBuf::from("/opt/cni/bin")),
            cni_conf_dir: self
                .cni_conf_dir
                .unwrap_or_else(|| PathBuf::from("/etc/cni/net.d")),
            cni_plugin_source,
            node_file: self
                .node_file
                .unwrap_or_else(|| PathBuf::from("/run/weft/node.json")),
            metrics_address: self
                .metrics_address
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9465))),
            network_policy: self.network_policy.enabled.unwrap_or(true),
        })
    }
}

impl AgentConfig {
    /// The prefix length of every slice of `family`.
    pub fn slice_size(&self, family: IpFamily) -> u8 {
        match family {
            IpFamily::V4 => self.slice_size_v4,
            IpFamily::V6 => self.slice_size_v6,
        }
    }
}

/// A dual-stack configuration for unit tests: 10.244.0.0/16 in /24s,
/// fd00:10:244::/56 in /64s, everything else default.
#[cfg(test)]
pub(crate) fn dual_stack_config() -> AgentConfig {
    AgentSettings {
        slices: weft_daemon::slices::SliceSettings {
            cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
            cluster_cidr_v6: Some("fd00:10:244::/56".parse().unwrap()),
            ..Default::default()
        },
        ..AgentSettings::default()
    }
    .resolve(std::path::Path::new("/weft-agent"))
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> AgentSettings {
        AgentSettings {
            slices: SliceSettings {
                cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
                ..SliceSettings::default()
            },
            ..AgentSettings::default()
        }
    }

    /// `minimal()` with these cluster CIDRs and slice sizes.
    fn with_slices(slices: SliceSettings) -> AgentSettings {
        AgentSettings {
            slices: minimal().slices.overlaid_with(slices),
            ..minimal()
        }
    }

    #[test]
    fn defaults_fill_every_unset_key() {
        let config = minimal().resolve(Path::new("/usr/bin/weft-agent")).unwrap();
        assert_eq!(config.backend, Backend::Vxlan);
        assert_eq!(config.vni, 1);
        assert_eq!(config.port, 8472);
        assert_eq!(config.resync, Duration::from_secs(60));
        assert_eq!(config.checksum_offload, ChecksumOffload::Auto);
        assert_eq!(config.cni_plugin_source, PathBuf::from("/usr/bin/weft"));
        assert_eq!(config.node_file, PathBuf::from("/run/weft/node.json"));
        assert_eq!(config.cni_bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(config.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(config.slice_size(IpFamily::V4), 24);
        assert_eq!(config.slice_size(IpFamily::V6), 64);
        assert!(config.network_policy);
    }

    #[test]
    fn yaml_keys_are_camel_case_and_unknown_keys_rejected() {
        let text = "backend: host-gw\nvni: 7\nport: 4789\nresyncSeconds: 5\nclusterCidr: 10.244.0.0/16\nclusterCidrV6: fd00:10:244::/56\nnoMasqueradeCidrs: [192.168.0.0/16]\nchecksumOffload: 'off'\nifaceRegex: ^eth\n";
        let layer = AgentSettings::from_yaml(Path::new("agent.yaml"), text).unwrap();
        let config = layer.resolve(Path::new("/a/weft-agent")).unwrap();
        assert_eq!(config.backend, Backend::HostGw);
        assert_eq!(config.vni, 7);
        assert_eq!(config.port, 4789);
        assert_eq!(config.cluster_cidrs.len(), 2);
        assert_eq!(config.checksum_offload, ChecksumOffload::Off);
        assert_eq!(config.no_masquerade_cidrs.len(), 1);
        let off = AgentSettings::from_yaml(
            Path::new("agent.yaml"),
            "clusterCidr: 10.244.0.0/16\nnetworkPolicy:\n  enabled: false\n",
        )
        .unwrap();
        assert!(
            !off.resolve(Path::new("/a/weft-agent"))
                .unwrap()
                .network_policy
        );

        let error = AgentSettings::from_yaml(Path::new("agent.yaml"), "cluster_cidr: 10.0.0.0/8")
            .unwrap_err();
        assert!(error.to_string().contains("agent.yaml"), "{error}");
        assert!(error.to_string().contains("cluster_cidr"), "{error}");
    }

    #[test]
    fn higher_layers_win_key_by_key() {
        let file = AgentSettings {
            vni: Some(5),
            port: Some(4789),
            ..minimal()
        };
        let flags = AgentSettings {
            vni: Some(9),
            network_policy: NetworkPolicySettings {
                enabled: Some(false),
            },
            ..AgentSettings::default()
        };
        let merged = file.overlaid_with(flags);
        assert_eq!(merged.vni, Some(9));
        assert_eq!(merged.network_policy.enabled, Some(false));
        assert_eq!(merged.port, Some(4789));
        assert!(merged.slices.cluster_cidr.is_some());
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        let cases: Vec<(AgentSettings, &str)> = vec![
            (
                AgentSettings {
                    vni: Some(0),
                    ..minimal()
                },
                "vni",
            ),
            (
                AgentSettings {
                    vni: Some(1 << 24),
                    ..minimal()
                },
                "vni",
            ),
            (
                AgentSettings {
                    port: Some(0),
                    ..minimal()
                },
                "port",
            ),
            (
                AgentSettings {
                    mtu: Some(500),
                    ..minimal()
                },
                "mtu",
            ),
            (
                AgentSettings {
                    resync_seconds: Some(0),
                    ..minimal()
                },
                "resyncSeconds",
            ),
            (
                AgentSettings {
                    iface_regex: Some("(".into()),
                    ..minimal()
                },
                "ifaceRegex",
            ),
            (
                AgentSettings {
                    slices: SliceSettings::default(),
                    ..minimal()
                },
                "clusterCidr",
            ),
            (
                with_slices(SliceSettings {
                    cluster_cidr: Some("fd00::/48".parse().unwrap()),
                    ..SliceSettings::default()
                }),
                "clusterCidrV6",
            ),
            (
                with_slices(SliceSettings {
                    cluster_cidr_v6: Some("10.0.0.0/8".parse().unwrap()),
                    ..SliceSettings::default()
                }),
                "clusterCidrV6",
            ),
            (
                with_slices(SliceSettings {
                    slice_size_v4: Some(12),
                    ..SliceSettings::default()
                }),
                "sliceSizeV4",
            ),
            (
                with_slices(SliceSettings {
                    cluster_cidr_v6: Some("fd00::/56".parse().unwrap()),
                    slice_size_v6: Some(129),
                    ..SliceSettings::default()
                }),
                "sliceSizeV6",
            ),
        ];
        for (layer, key) in cases {
            let error = layer.resolve(Path::new("/a/weft-agent")).unwrap_err();
            assert!(error.to_string().contains(key), "{error} should name {key}");
        }
    }

    /// The agent refuses the slice settings the controller refuses, in the
    /// controller's words (`weft-controller`'s config tests hold the same
    /// messages).
    #[test]
    fn slice_settings_the_controller_refuses_are_refused() {
        let refused = |slices: SliceSettings| {
            with_slices(slices)
                .resolve(Path::new("/a/weft-agent"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused(SliceSettings {
                slice_size_v4: Some(31),
                ..SliceSettings::default()
            }),
            "clusterCidr / sliceSizeV4: slice size /31 leaves no room for pods in ipv4: use a prefix length of at most 30"
        );
        assert_eq!(
            refused(SliceSettings {
                slice_size_v4: Some(32),
                ..SliceSettings::default()
            }),
            "clusterCidr / sliceSizeV4: slice size /32 leaves no room for pods in ipv4: use a prefix length of at most 30"
        );
        assert_eq!(
            refused(SliceSettings {
                cluster_cidr: Some("10.244.1.0/16".parse().unwrap()),
                ..SliceSettings::default()
            }),
            "clusterCidr / sliceSizeV4: cluster CIDR 10.244.1.0/16 has host bits set: did you mean 10.244.0.0/16?"
        );
        assert_eq!(
            refused(SliceSettings {
                cluster_cidr_v6: Some("fd00:10:244::1/56".parse().unwrap()),
                ..SliceSettings::default()
            }),
            "clusterCidrV6 / sliceSizeV6: cluster CIDR fd00:10:244::1/56 has host bits set: did you mean fd00:10:244::/56?"
        );
    }

    #[test]
    fn enum_values_parse_from_flag_text() {
        assert_eq!("direct".parse::<Backend>().unwrap(), Backend::Direct);
        assert!("udp"
            .parse::<Backend>()
            .unwrap_err()
            .to_string()
            .contains("backend"));
        assert_eq!(
            "on".parse::<ChecksumOffload>().unwrap(),
            ChecksumOffload::On
        );
        assert!("maybe".parse::<ChecksumOffload>().is_err());
    }
}
