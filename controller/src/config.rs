//! The controller's configuration: [`ControllerSettings`], the keys that the
//! YAML config file, the environment (`WEFT_*`) and the flags each set,
//! layered as [`weft_daemon::config`] describes (flags > environment > file),
//! and [`ControllerConfig`], the defaults filled in and every value validated
//! once.
//!
//! The keys are the Helm chart's `controller` values; docs/configuration.md
//! lists them.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use weft_core::slice::SlicePlan;
use weft_daemon::config::Layer;
use weft_daemon::slices::{SlicePlans, SliceSettings, SliceSettingsError};

/// Default namespace of the leader-election Lease.
pub const DEFAULT_LEASE_NAMESPACE: &str = "kube-system";
/// Default name of the leader-election Lease.
pub const DEFAULT_LEASE_NAME: &str = "weft-controller";
/// Default time a deleted node's slice is kept for a node re-registering under
/// its name (see [`crate::allocator`]).
pub const DEFAULT_SLICE_HOLD_SECONDS: u64 = 300;
/// Default address of `/healthz`, `/readyz` and `/metrics`.
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:9464";

/// Why the settings do not make a configuration (a config file that cannot
/// be read or parsed is a [`weft_daemon::config::ConfigFileError`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cluster CIDRs and slice sizes do not make slice plans.
    #[error(transparent)]
    Slices(#[from] SliceSettingsError),
    /// A name that must not be empty is.
    #[error("{key} must not be empty")]
    Empty {
        /// The key.
        key: &'static str,
    },
}

/// The controller's settings as one layer (config file, or environment and
/// flags) gives them. Each field's doc is its `--help` text, which names the
/// file key; the flag is the field name in kebab-case. Unknown file keys are
/// rejected so a typo does not silently fall back to a default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerSettings {
    /// The cluster CIDRs and slice sizes, shared with the agent.
    #[command(flatten)]
    #[serde(flatten)]
    pub slices: SliceSettings,
    /// Namespace of the leader-election Lease (leaseNamespace) [default: kube-system].
    #[arg(long, env = "WEFT_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the leader-election Lease (leaseName) [default: weft-controller].
    #[arg(long, env = "WEFT_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Seconds a deleted node's slice is kept for a node re-registering under its name (sliceHoldSeconds) [default: 300].
    #[arg(long, env = "WEFT_SLICE_HOLD_SECONDS")]
    pub slice_hold_seconds: Option<u64>,
    /// Listen address of /healthz, /readyz, /status and /metrics (metricsAddress) [default: 0.0.0.0:9464].
    #[arg(long, env = "WEFT_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
}

impl Layer for ControllerSettings {
    fn overlaid_with(self, higher: ControllerSettings) -> ControllerSettings {
        ControllerSettings {
            slices: self.slices.overlaid_with(higher.slices),
            lease_namespace: higher.lease_namespace.or(self.lease_namespace),
            lease_name: higher.lease_name.or(self.lease_name),
            slice_hold_seconds: higher.slice_hold_seconds.or(self.slice_hold_seconds),
            metrics_address: higher.metrics_address.or(self.metrics_address),
        }
    }
}

/// Resolved, validated controller configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    /// How the IPv4 cluster CIDR is sliced.
    pub v4: SlicePlan,
    /// How the IPv6 cluster CIDR is sliced, when dual-stack.
    pub v6: Option<SlicePlan>,
    /// Namespace of the leader-election Lease.
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    pub lease_name: String,
    /// How long a deleted node's slice is kept for its name.
    pub slice_hold: Duration,
    /// Listen address of `/healthz`, `/readyz` and `/metrics`.
    pub metrics_address: SocketAddr,
}

impl ControllerSettings {
    /// Fills in the defaults and validates the merged layers (the file
    /// overlaid with environment and flags).
    pub fn resolve(self) -> Result<ControllerConfig, ConfigError> {
        let SlicePlans { v4, v6 } = self.slices.resolve()?;
        let non_empty = |value: Option<String>, default: &str, key| {
            let value = value.unwrap_or_else(|| default.to_owned());
            if value.is_empty() {
                Err(ConfigError::Empty { key })
            } else {
                Ok(value)
            }
        };
        Ok(ControllerConfig {
            v4,
            v6,
            lease_namespace: non_empty(
                self.lease_namespace,
                DEFAULT_LEASE_NAMESPACE,
                "leaseNamespace",
            )?,
            lease_name: non_empty(self.lease_name, DEFAULT_LEASE_NAME, "leaseName")?,
            slice_hold: Duration::from_secs(
                self.slice_hold_seconds
                    .unwrap_or(DEFAULT_SLICE_HOLD_SECONDS),
            ),
            metrics_address: self.metrics_address.unwrap_or_else(|| {
                DEFAULT_METRICS_ADDRESS
                    .parse()
                    .expect("the default metrics address parses")
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ipnet::IpNet;

    use super::*;
    use weft_daemon::config::ConfigFileError;

    /// The settings a config file `controller.yaml` holding `text` gives.
    fn parse(text: &str) -> Result<ControllerSettings, ConfigFileError> {
        ControllerSettings::from_yaml(Path::new("controller.yaml"), text)
    }

    #[test]
    fn file_keys_are_camel_case() {
        let file = parse(
            "clusterCidr: 10.244.0.0/16\nclusterCidrV6: fd00:10::/48\nsliceSizeV4: 26\nsliceSizeV6: 80\nleaseNamespace: weft\nleaseName: alloc\nsliceHoldSeconds: 0\nmetricsAddress: 127.0.0.1:9000\n",
        )
        .unwrap();
        let config = file.resolve().unwrap();
        assert_eq!(
            config.v4.cluster(),
            "10.244.0.0/16".parse::<IpNet>().unwrap()
        );
        assert_eq!(config.v4.slice_prefix(), 26);
        assert_eq!(config.v6.unwrap().slice_prefix(), 80);
        assert_eq!(config.lease_namespace, "weft");
        assert_eq!(config.lease_name, "alloc");
        assert_eq!(config.slice_hold, Duration::ZERO);
        assert_eq!(config.metrics_address, "127.0.0.1:9000".parse().unwrap());
    }

    #[test]
    fn defaults_fill_what_no_layer_sets() {
        let config = ControllerSettings {
            slices: SliceSettings {
                cluster_cidr: Some("10.0.0.0/8".parse().unwrap()),
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.v4.slice_prefix(), 24);
        assert_eq!(config.v6, None);
        assert_eq!(config.lease_namespace, DEFAULT_LEASE_NAMESPACE);
        assert_eq!(config.lease_name, DEFAULT_LEASE_NAME);
        assert_eq!(
            config.slice_hold,
            Duration::from_secs(DEFAULT_SLICE_HOLD_SECONDS)
        );
    }

    #[test]
    fn higher_layers_win_key_by_key() {
        let file = parse("clusterCidr: 10.0.0.0/8\nsliceSizeV4: 20\n").unwrap();
        let flags = ControllerSettings {
            slices: SliceSettings {
                slice_size_v4: Some(22),
                ..Default::default()
            },
            ..Default::default()
        };
        let config = file.overlaid_with(flags).resolve().unwrap();
        assert_eq!(config.v4.cluster(), "10.0.0.0/8".parse::<IpNet>().unwrap());
        assert_eq!(config.v4.slice_prefix(), 22);
    }

    #[test]
    fn bad_settings_name_the_key_and_the_fix() {
        let missing = ControllerSettings::default()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("--cluster-cidr") && missing.contains("WEFT_CLUSTER_CIDR"),
            "{missing}"
        );
        let typo = parse("clusterCIDR: 10.0.0.0/8\n").unwrap_err().to_string();
        assert!(typo.contains("clusterCIDR"), "{typo}");
        let swapped = parse("clusterCidr: fd00::/48\n")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            swapped.contains("clusterCidr") && swapped.contains("ipv4"),
            "{swapped}"
        );
        let too_small = parse("clusterCidr: 10.0.0.0/8\nsliceSizeV4: 31\n")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            too_small.contains("sliceSizeV4") && too_small.contains("at most 30"),
            "{too_small}"
        );
        let empty = parse("clusterCidr: 10.0.0.0/8\nleaseName: ''\n")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(empty.contains("leaseName"), "{empty}");
    }

    /// The controller's words for refused slice settings, which the agent's
    /// config tests hold too: both daemons refuse them alike.
    #[test]
    fn refused_slice_settings_read_as_in_the_agent() {
        let refused = |text: &str| parse(text).unwrap().resolve().unwrap_err().to_string();
        assert_eq!(
            refused("clusterCidr: 10.244.0.0/16\nsliceSizeV4: 31\n"),
            "clusterCidr / sliceSizeV4: slice size /31 leaves no room for pods in ipv4: use a prefix length of at most 30"
        );
        assert_eq!(
            refused("clusterCidr: 10.244.1.0/16\n"),
            "clusterCidr / sliceSizeV4: cluster CIDR 10.244.1.0/16 has host bits set: did you mean 10.244.0.0/16?"
        );
    }
}
