//! The controller's settings: one set of keys shared by the YAML config file,
//! the environment and the command line, resolved with the precedence
//! flags > environment > file > defaults.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::allocator::{CidrError, SlicePlan};
use weft::ip::IpFamily;

/// Default IPv4 slice: 254 pods per node.
pub const DEFAULT_SLICE_SIZE_V4: u8 = 24;
/// Default IPv6 slice: the conventional subnet size.
pub const DEFAULT_SLICE_SIZE_V6: u8 = 64;
/// Default namespace of the leader-election Lease.
pub const DEFAULT_LEASE_NAMESPACE: &str = "kube-system";
/// Default name of the leader-election Lease.
pub const DEFAULT_LEASE_NAME: &str = "weft-controller";
/// Default time a deleted node's slice is kept for a node re-registering under
/// its name (see [`crate::allocator`]).
pub const DEFAULT_SLICE_HOLD_SECONDS: u64 = 300;
/// Default address of `/healthz`, `/readyz` and `/metrics`.
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:9464";

/// Why the settings do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML for these keys.
    #[error("config file {path} is invalid: {source} (known keys: clusterCidr, clusterCidrV6, sliceSizeV4, sliceSizeV6, leaseNamespace, leaseName, sliceHoldSeconds, metricsAddress)")]
    Parse {
        /// The file.
        path: String,
        /// The YAML error, naming the key and line.
        #[source]
        source: serde_yaml::Error,
    },
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

/// The controller's settings as one layer gives them; every key optional.
///
/// The YAML config file (`--config`) holds exactly these keys, which are also
/// the Helm chart's `controller` values:
///
/// | key                | flag / environment                              | default            |
/// |--------------------|-------------------------------------------------|--------------------|
/// | `clusterCidr`      | `--cluster-cidr` / `WEFT_CLUSTER_CIDR`           | (required) IPv4    |
/// | `clusterCidrV6`    | `--cluster-cidr-v6` / `WEFT_CLUSTER_CIDR_V6`     | unset: IPv4 only   |
/// | `sliceSizeV4`      | `--slice-size-v4` / `WEFT_SLICE_SIZE_V4`         | `24`               |
/// | `sliceSizeV6`      | `--slice-size-v6` / `WEFT_SLICE_SIZE_V6`         | `64`               |
/// | `leaseNamespace`   | `--lease-namespace` / `WEFT_LEASE_NAMESPACE`     | `kube-system`      |
/// | `leaseName`        | `--lease-name` / `WEFT_LEASE_NAME`               | `weft-controller`  |
/// | `sliceHoldSeconds` | `--slice-hold-seconds` / `WEFT_SLICE_HOLD_SECONDS` | `300` (0: no hold) |
/// | `metricsAddress`   | `--metrics-address` / `WEFT_METRICS_ADDRESS`     | `0.0.0.0:9464`     |
///
/// Unknown keys are rejected so a typo does not silently fall back to a default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerSettings {
    /// IPv4 cluster CIDR every node's slice comes from.
    pub cluster_cidr: Option<IpNet>,
    /// IPv6 cluster CIDR; set for dual-stack.
    pub cluster_cidr_v6: Option<IpNet>,
    /// Prefix length of each node's IPv4 slice.
    pub slice_size_v4: Option<u8>,
    /// Prefix length of each node's IPv6 slice.
    pub slice_size_v6: Option<u8>,
    /// Namespace of the leader-election Lease.
    pub lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    pub lease_name: Option<String>,
    /// Seconds a deleted node's slice is kept for a node with the same name.
    pub slice_hold_seconds: Option<u64>,
    /// Listen address of `/healthz`, `/readyz` and `/metrics`.
    pub metrics_address: Option<SocketAddr>,
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
    /// Reads a YAML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses the YAML config format; an empty document is no settings.
    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text)
    }

    /// Keeps every key this layer sets and takes the rest from `lower`.
    pub fn over(self, lower: Self) -> Self {
        Self {
            cluster_cidr: self.cluster_cidr.or(lower.cluster_cidr),
            cluster_cidr_v6: self.cluster_cidr_v6.or(lower.cluster_cidr_v6),
            slice_size_v4: self.slice_size_v4.or(lower.slice_size_v4),
            slice_size_v6: self.slice_size_v6.or(lower.slice_size_v6),
            lease_namespace: self.lease_namespace.or(lower.lease_namespace),
            lease_name: self.lease_name.or(lower.lease_name),
            slice_hold_seconds: self.slice_hold_seconds.or(lower.slice_hold_seconds),
            metrics_address: self.metrics_address.or(lower.metrics_address),
        }
    }

    /// Fills defaults and validates.
    pub fn resolve(self) -> Result<ControllerConfig, ConfigError> {
        let cluster = self.cluster_cidr.ok_or(ConfigError::MissingClusterCidr)?;
        let v4 = SlicePlan::for_family(
            IpFamily::V4,
            cluster,
            self.slice_size_v4.unwrap_or(DEFAULT_SLICE_SIZE_V4),
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
                    self.slice_size_v6.unwrap_or(DEFAULT_SLICE_SIZE_V6),
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
    use super::*;

    #[test]
    fn file_keys_are_camel_case() {
        let file = ControllerSettings::from_yaml(
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
        assert_eq!(config.v4.slice_prefix(), DEFAULT_SLICE_SIZE_V4);
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
        let file =
            ControllerSettings::from_yaml("clusterCidr: 10.0.0.0/8\nsliceSizeV4: 20\n").unwrap();
        let flags = ControllerSettings {
            slice_size_v4: Some(22),
            ..Default::default()
        };
        let config = flags.over(file).resolve().unwrap();
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
        let typo = ControllerSettings::from_yaml("clusterCIDR: 10.0.0.0/8\n")
            .unwrap_err()
            .to_string();
        assert!(typo.contains("clusterCIDR"), "{typo}");
        let swapped = ControllerSettings::from_yaml("clusterCidr: fd00::/48\n")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            swapped.contains("clusterCidr") && swapped.contains("ipv4"),
            "{swapped}"
        );
        let too_small = ControllerSettings::from_yaml("clusterCidr: 10.0.0.0/8\nsliceSizeV4: 31\n")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            too_small.contains("sliceSizeV4") && too_small.contains("at most 30"),
            "{too_small}"
        );
        let empty = ControllerSettings::from_yaml("clusterCidr: 10.0.0.0/8\nleaseName: ''\n")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(empty.contains("leaseName"), "{empty}");
    }
}
