//! The controller's configuration: [`ControllerSettings`], the keys that the
//! YAML config file, the environment (`WEFT_*`) and the flags each set,
//! layered as [`weft_daemon::config`] describes (flags > environment > file),
//! and [`ControllerConfig`], the defaults filled in and every value validated
//! once.
//!
//! The keys are the Helm chart's `controller` values; the README's
//! Configuration table lists them.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::allocator::{CidrError, SlicePlan};
use weft_core::ip::IpFamily;
use weft_daemon::config::Layer;

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
    /// The IPv4 cluster CIDR is missing.
    #[error("clusterCidr is not set: pass --cluster-cidr, set WEFT_CLUSTER_CIDR or add clusterCidr to the config file (e.g. 10.244.0.0/16)")]
    MissingClusterCidr,
    /// A CIDR and slice size do not make a plan.
    #[error("{key} / {size_key}: {source}")]
    Plan {
        /// The CIDR key.
        key: &'static str,
        /// The slice size key.
        size_key: &'static str,
        /// What is wrong.
        #[source]
        source: CidrError,
    },
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
    /// IPv4 cluster CIDR the slices come from (clusterCidr).
    #[arg(long, env = "WEFT_CLUSTER_CIDR")]
    pub cluster_cidr: Option<IpNet>,
    /// IPv6 cluster CIDR, for dual-stack (clusterCidrV6).
    #[arg(long, env = "WEFT_CLUSTER_CIDR_V6")]
    pub cluster_cidr_v6: Option<IpNet>,
    /// Prefix length of each node's IPv4 slice (sliceSizeV4) [default: 24].
    #[arg(long, env = "WEFT_SLICE_SIZE_V4")]
    pub slice_size_v4: Option<u8>,
    /// Prefix length of each node's IPv6 slice (sliceSizeV6) [default: 64].
    #[arg(long, env = "WEFT_SLICE_SIZE_V6")]
    pub slice_size_v6: Option<u8>,
    /// Namespace of the leader-election Lease (leaseNamespace) [default: kube-system].
    #[arg(long, env = "WEFT_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the leader-election Lease (leaseName) [default: weft-controller].
    #[arg(long, env = "WEFT_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// Seconds a deleted node's slice is kept for a node re-registering under its name (sliceHoldSeconds) [default: 300].
    #[arg(long, env = "WEFT_SLICE_HOLD_SECONDS")]
    pub slice_hold_seconds: Option<u64>,
    /// Listen address of /healthz, /readyz and /metrics (metricsAddress) [default: 0.0.0.0:9464].
    #[arg(long, env = "WEFT_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
}

impl Layer for ControllerSettings {
    fn overlaid_with(self, higher: ControllerSettings) -> ControllerSettings {
        ControllerSettings {
            cluster_cidr: higher.cluster_cidr.or(self.cluster_cidr),
            cluster_cidr_v6: higher.cluster_cidr_v6.or(self.cluster_cidr_v6),
            slice_size_v4: higher.slice_size_v4.or(self.slice_size_v4),
            slice_size_v6: higher.slice_size_v6.or(self.slice_size_v6),
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
        let cluster = self.cluster_cidr.ok_or(ConfigError::MissingClusterCidr)?;
        let v4 = SlicePlan::for_family(
            IpFamily::V4,
            cluster,
            self.slice_size_v4
                .unwrap_or(IpFamily::V4.default_slice_prefix()),
        )
        .map_err(|source| ConfigError::Plan {
            key: "clusterCidr",
            size_key: "sliceSizeV4",
            source,
        })?;
        let v6 = self
            .cluster_cidr_v6
            .map(|cluster| {
                SlicePlan::for_family(
                    IpFamily::V6,
                    cluster,
                    self.slice_size_v6
                        .unwrap_or(IpFamily::V6.default_slice_prefix()),
                )
                .map_err(|source| ConfigError::Plan {
                    key: "clusterCidrV6",
                    size_key: "sliceSizeV6",
                    source,
                })
            })
            .transpose()?;
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
            cluster_cidr: Some("10.0.0.0/8".parse().unwrap()),
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
            slice_size_v4: Some(22),
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
}
