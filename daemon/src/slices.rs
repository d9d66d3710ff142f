//! The settings both daemons share, the cluster CIDRs and the slice sizes
//! ([`SliceSettings`]), declared once and flattened into each daemon's
//! settings, and their validation into [`SlicePlans`]: the controller hands
//! out the slices and the agent routes them, so both read these keys the
//! same way and refuse the same values with the same words.

use ipnet::IpNet;
use serde::Deserialize;
use weft_core::ip::IpFamily;
use weft_core::slice::{cluster_cidr_key, slice_size_key, CidrError, SlicePlan};

/// The cluster CIDRs and slice sizes as one layer of a daemon's settings
/// (config file, or environment and flags) gives them. Both daemons flatten
/// it into their settings, so the keys, flags and variables are the same in
/// each. Each field's doc is its `--help` text, which names the file key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
// Unknown keys are refused by the settings this is flattened into (serde
// does not support `deny_unknown_fields` on a flattened struct).
#[serde(rename_all = "camelCase")]
pub struct SliceSettings {
    /// IPv4 cluster CIDR the controller cuts into node slices (clusterCidr).
    #[arg(long, env = "WEFT_CLUSTER_CIDR")]
    #[serde(default, deserialize_with = "keyed::cluster_cidr")]
    pub cluster_cidr: Option<IpNet>,
    /// IPv6 cluster CIDR, for dual-stack (clusterCidrV6).
    #[arg(long, env = "WEFT_CLUSTER_CIDR_V6")]
    #[serde(default, deserialize_with = "keyed::cluster_cidr_v6")]
    pub cluster_cidr_v6: Option<IpNet>,
    /// Prefix length of every node's IPv4 slice (sliceSizeV4) [default: 24].
    #[arg(long, env = "WEFT_SLICE_SIZE_V4")]
    #[serde(default, deserialize_with = "keyed::slice_size_v4")]
    pub slice_size_v4: Option<u8>,
    /// Prefix length of every node's IPv6 slice (sliceSizeV6) [default: 64].
    #[arg(long, env = "WEFT_SLICE_SIZE_V6")]
    #[serde(default, deserialize_with = "keyed::slice_size_v6")]
    pub slice_size_v6: Option<u8>,
}

/// The values of [`SliceSettings`]' keys, read so that an error names the
/// key. Flattened into a daemon's settings, the keys are read from serde's
/// buffer of the whole map, whose errors name neither key nor line.
mod keyed {
    use ipnet::IpNet;
    use serde::de::{Deserialize, Deserializer, Error};

    use super::{cluster_cidr_key, slice_size_key};
    use weft_core::ip::IpFamily;

    fn value<'de, D, T>(key: &str, deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(deserializer)
            .map_err(|error| D::Error::custom(format_args!("{key}: {error}")))
    }

    pub(super) fn cluster_cidr<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<IpNet>, D::Error> {
        value(cluster_cidr_key(IpFamily::V4), deserializer)
    }

    pub(super) fn cluster_cidr_v6<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<IpNet>, D::Error> {
        value(cluster_cidr_key(IpFamily::V6), deserializer)
    }

    pub(super) fn slice_size_v4<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u8>, D::Error> {
        value(slice_size_key(IpFamily::V4), deserializer)
    }

    pub(super) fn slice_size_v6<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u8>, D::Error> {
        value(slice_size_key(IpFamily::V6), deserializer)
    }
}

/// The slice plans of a cluster: IPv4 always, IPv6 when dual-stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlicePlans {
    /// How the IPv4 cluster CIDR is cut.
    pub v4: SlicePlan,
    /// How the IPv6 cluster CIDR is cut, when dual-stack.
    pub v6: Option<SlicePlan>,
}

/// Why the cluster CIDRs and slice sizes do not make slice plans. The
/// message names the keys and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceSettingsError {
    /// The IPv4 cluster CIDR is missing.
    #[error("clusterCidr is not set: pass --cluster-cidr, set WEFT_CLUSTER_CIDR or add clusterCidr to the config file (e.g. 10.244.0.0/16)")]
    MissingClusterCidr,
    /// One family's CIDR and slice size do not make a plan.
    // The plan's error is the substance of the message, so it is part of it
    // rather than a source printed again below.
    #[error("{} / {}: {problem}", cluster_cidr_key(*family), slice_size_key(*family))]
    Plan {
        /// The family whose keys are at fault.
        family: IpFamily,
        /// What is wrong.
        problem: CidrError,
    },
}

impl SliceSettings {
    /// These settings with every key that `higher` sets taken from
    /// `higher` (the daemons' layering: flags > environment > file).
    pub fn overlaid_with(self, higher: SliceSettings) -> SliceSettings {
        SliceSettings {
            cluster_cidr: higher.cluster_cidr.or(self.cluster_cidr),
            cluster_cidr_v6: higher.cluster_cidr_v6.or(self.cluster_cidr_v6),
            slice_size_v4: higher.slice_size_v4.or(self.slice_size_v4),
            slice_size_v6: higher.slice_size_v6.or(self.slice_size_v6),
        }
    }

    /// Fills in the default slice sizes and makes the plans: `clusterCidr`
    /// is required, `clusterCidrV6` makes the cluster dual-stack, and a
    /// slice size is only read for a family that has a cluster CIDR.
    pub fn resolve(self) -> Result<SlicePlans, SliceSettingsError> {
        let plan = |family: IpFamily, cluster: IpNet, size: Option<u8>| {
            let size = size.unwrap_or(family.default_slice_prefix());
            SlicePlan::for_family(family, cluster, size)
                .map_err(|problem| SliceSettingsError::Plan { family, problem })
        };
        let cluster = self
            .cluster_cidr
            .ok_or(SliceSettingsError::MissingClusterCidr)?;
        let v4 = plan(IpFamily::V4, cluster, self.slice_size_v4)?;
        let v6 = self
            .cluster_cidr_v6
            .map(|cluster| plan(IpFamily::V6, cluster, self.slice_size_v6))
            .transpose()?;
        Ok(SlicePlans { v4, v6 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn plan(cluster: &str, slice: u8) -> SlicePlan {
        SlicePlan::new(net(cluster), slice).unwrap()
    }

    fn settings(v4: &str, v6: Option<&str>) -> SliceSettings {
        SliceSettings {
            cluster_cidr: Some(net(v4)),
            cluster_cidr_v6: v6.map(net),
            ..SliceSettings::default()
        }
    }

    #[test]
    fn settings_default_the_slice_sizes_per_family() {
        let plans = settings("10.244.0.0/16", None).resolve().unwrap();
        assert_eq!(plans.v4, plan("10.244.0.0/16", 24));
        assert_eq!(plans.v6, None);
        let plans = SliceSettings {
            slice_size_v4: Some(26),
            ..settings("10.244.0.0/16", Some("fd00:10::/48"))
        }
        .resolve()
        .unwrap();
        assert_eq!(plans.v4, plan("10.244.0.0/16", 26));
        assert_eq!(plans.v6, Some(plan("fd00:10::/48", 64)));
    }

    #[test]
    fn higher_layers_win_key_by_key() {
        let file = SliceSettings {
            slice_size_v4: Some(20),
            ..settings("10.0.0.0/8", None)
        };
        let flags = SliceSettings {
            slice_size_v4: Some(22),
            slice_size_v6: Some(80),
            ..SliceSettings::default()
        };
        assert_eq!(
            file.overlaid_with(flags),
            SliceSettings {
                cluster_cidr: Some(net("10.0.0.0/8")),
                cluster_cidr_v6: None,
                slice_size_v4: Some(22),
                slice_size_v6: Some(80),
            }
        );
    }

    /// A daemon's settings: these keys flattened beside its own.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Daemon {
        #[serde(flatten)]
        slices: SliceSettings,
        lease_name: Option<String>,
    }

    #[test]
    fn flattened_keys_parse_and_bad_values_name_their_key() {
        let parse = |text: &str| serde_yaml::from_str::<Daemon>(text);
        let daemon = parse(
            r#"{"clusterCidr": "10.244.0.0/16", "clusterCidrV6": null, "sliceSizeV4": 26, "leaseName": "l"}"#,
        )
        .unwrap();
        assert_eq!(
            daemon.slices,
            SliceSettings {
                slice_size_v4: Some(26),
                ..settings("10.244.0.0/16", None)
            }
        );
        assert_eq!(daemon.lease_name.as_deref(), Some("l"));
        assert_eq!(parse("{}").unwrap().slices, SliceSettings::default());
        for (text, key) in [
            (r#"{"clusterCidr": "10.244.0.0"}"#, "clusterCidr: "),
            (r#"{"clusterCidrV6": 6}"#, "clusterCidrV6: "),
            (r#"{"sliceSizeV4": 300}"#, "sliceSizeV4: "),
            (r#"{"sliceSizeV6": "64"}"#, "sliceSizeV6: "),
            (r#"{"sliceSize": 24}"#, "sliceSize"),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    #[test]
    fn settings_errors_name_the_keys_and_the_fix() {
        let message = |settings: SliceSettings| settings.resolve().unwrap_err().to_string();
        let missing = message(SliceSettings::default());
        assert!(
            missing.contains("clusterCidr") && missing.contains("--cluster-cidr"),
            "{missing}"
        );
        let swapped = message(settings("fd00::/48", None));
        assert!(
            swapped.starts_with("clusterCidr / sliceSizeV4: ")
                && swapped.contains("ipv4")
                && swapped.contains("clusterCidrV6"),
            "{swapped}"
        );
        let swapped_v6 = message(settings("10.244.0.0/16", Some("10.0.0.0/8")));
        assert!(
            swapped_v6.starts_with("clusterCidrV6 / sliceSizeV6: ")
                && swapped_v6.contains("goes in clusterCidr"),
            "{swapped_v6}"
        );
        let host_bits = message(settings("10.244.1.0/16", None));
        assert!(
            host_bits.contains("did you mean 10.244.0.0/16"),
            "{host_bits}"
        );
        let too_small = message(SliceSettings {
            slice_size_v6: Some(127),
            ..settings("10.244.0.0/16", Some("fd00::/56"))
        });
        assert!(
            too_small.starts_with("clusterCidrV6 / sliceSizeV6: ")
                && too_small.contains("at most 126"),
            "{too_small}"
        );
    }
}
