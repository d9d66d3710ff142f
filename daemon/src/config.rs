//! How both daemons layer their settings: defaults < config file <
//! environment and flags.
//!
//! Each daemon declares its settings once, as one struct of `Option` fields
//! that derives `serde::Deserialize` (the YAML config file, camelCase keys,
//! unknown keys rejected) and `clap::Args` (flattened into the binary's
//! parser, where clap reads a flag or else its `WEFT_*` variable). Both
//! sources therefore give the same type, a [`Layer`], and `main` writes
//!
//! ```text
//! let file = Settings::load(args.config.as_deref())?;
//! let config = file.overlaid_with(args.settings).resolve(..)?;
//! ```
//!
//! leaving the defaults to `resolve`, which validates the merged layer once.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A config file that cannot be used. The message names the file and, for
/// a parse error, the key, line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML of the daemon's keys.
    // The YAML error is the substance of the message (which key, which
    // line), so it is part of it rather than a source printed again below.
    #[error("config file {path} is invalid: {error} (keys are camelCase, e.g. clusterCidr)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The YAML error, naming the key, line and column.
        error: serde_yaml::Error,
    },
}

/// One source of a daemon's settings, the config file or the environment
/// and flags, in which every key is optional.
pub trait Layer: Default + DeserializeOwned {
    /// This layer with every key that `higher` sets taken from `higher`;
    /// the receiver is always the lower layer, so a chain reads in the
    /// order of precedence.
    fn overlaid_with(self, higher: Self) -> Self;

    /// Parses the config file's text; `path` only names it in errors. A
    /// file of nothing but whitespace sets no key (serde_yaml would reject
    /// one holding a tab).
    fn from_yaml(path: &Path, text: &str) -> Result<Self, ConfigFileError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text).map_err(|error| ConfigFileError::Parse {
            path: path.to_path_buf(),
            error,
        })
    }

    /// Reads the config file at `path`; no file (`None`) sets no key.
    fn load(path: Option<&Path>) -> Result<Self, ConfigFileError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Sample {
        cluster_cidr: Option<String>,
        slice_size: Option<u8>,
    }

    impl Layer for Sample {
        fn overlaid_with(self, higher: Self) -> Self {
            Sample {
                cluster_cidr: higher.cluster_cidr.or(self.cluster_cidr),
                slice_size: higher.slice_size.or(self.slice_size),
            }
        }
    }

    #[test]
    fn no_file_and_an_empty_file_set_no_key() {
        assert_eq!(Sample::load(None).unwrap(), Sample::default());
        let empty = Sample::from_yaml(Path::new("empty.yaml"), " \t\n").unwrap();
        assert_eq!(empty, Sample::default());
    }

    #[test]
    fn file_errors_name_the_file_and_the_key() {
        let path = Path::new("/nonexistent/weft/daemon.yaml");
        let unreadable = Sample::load(Some(path)).unwrap_err().to_string();
        assert!(
            unreadable.contains("/nonexistent/weft/daemon.yaml"),
            "{unreadable}"
        );

        let typo = Sample::from_yaml(Path::new("daemon.yaml"), "cluster_cidr: 10.0.0.0/8\n")
            .unwrap_err()
            .to_string();
        assert!(
            typo.contains("daemon.yaml")
                && typo.contains("cluster_cidr")
                && typo.contains("camelCase"),
            "{typo}"
        );
        let bad_value = Sample::from_yaml(Path::new("daemon.yaml"), "sliceSize: 300\n")
            .unwrap_err()
            .to_string();
        assert!(bad_value.contains("sliceSize"), "{bad_value}");
    }

    #[test]
    fn the_higher_layer_wins_key_by_key() {
        let file = Sample::from_yaml(
            Path::new("daemon.yaml"),
            "clusterCidr: 10.0.0.0/8\nsliceSize: 20\n",
        )
        .unwrap();
        let flags = Sample {
            slice_size: Some(22),
            ..Sample::default()
        };
        let merged = file.overlaid_with(flags);
        assert_eq!(merged.cluster_cidr.as_deref(), Some("10.0.0.0/8"));
        assert_eq!(merged.slice_size, Some(22));
    }
}
