//! The node file: what `weft-agent` tells the `weft` CNI plugin about this
//! node (its pod slices, the cluster CIDRs, the MTU). The agent writes it once
//! the node is set up; until then the plugin reports "not ready".
//!
//! Format (JSON, default path [`DEFAULT_NODE_FILE`]):
//! ```json
//! {"nodeName":"node-a","podCidrs":["10.244.1.0/24","fd00:10:244:1::/64"],
//!  "clusterCidrs":["10.244.0.0/16","fd00:10:244::/56"],"mtu":1450}
//! ```

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Serialize;
use serde_json::Value;

use crate::fields::{FieldError, FieldReader};

/// Where the agent writes the node file and the plugin looks for it.
pub const DEFAULT_NODE_FILE: &str = "/run/weft/node.json";

/// The most [`NodeConfig::load`] reads. The agent writes a few hundred
/// bytes; a `nodeFile` pointing at something else (a log, `/dev/zero`) must
/// fail fast instead of filling the plugin's memory.
pub const NODE_FILE_MAX_BYTES: u64 = 64 * 1024;

/// The smallest MTU IPv6 allows on a link.
const IPV6_MIN_MTU: u32 = 1280;

/// Why the node file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeFileError {
    /// The file does not exist: the agent has not set this node up yet.
    #[error("node file {} does not exist: weft-agent has not set up this node yet; start weft-agent (or point nodeFile at the right path)", path.display())]
    Missing {
        /// The path looked at.
        path: PathBuf,
    },
    /// Reading the file failed for another reason.
    #[error("cannot read node file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file holds more than [`NODE_FILE_MAX_BYTES`]: it is not a node
    /// file the agent wrote.
    #[error("node file {} is larger than {cap} bytes, so it is not the node file weft-agent writes (a few hundred bytes): point nodeFile at weft-agent's node file (default {DEFAULT_NODE_FILE})", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit it exceeds, in bytes.
        cap: u64,
    },
    /// The file is not valid JSON, or a field is missing or wrong.
    #[error("node file {} is malformed: field {field:?} {problem}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The offending field (`(top level)` for a syntax error).
        field: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// Writing the file (temp file, fsync or rename) failed.
    #[error("cannot write node file {}: {step}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Which step failed.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// This node's network settings as the agent publishes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    /// The Kubernetes Node name.
    pub node_name: String,
    /// The node's pod slices: one IPv4 and/or one IPv6 prefix.
    pub pod_cidrs: Vec<IpNet>,
    /// The whole cluster's pod CIDRs; each pod slice lies inside one of them.
    pub cluster_cidrs: Vec<IpNet>,
    /// The MTU for pod interfaces (the overlay's MTU).
    pub mtu: u32,
}

impl NodeConfig {
    /// Reads and validates the node file at `path`; a missing file is
    /// [`NodeFileError::Missing`], distinct from a malformed one. At most
    /// [`NODE_FILE_MAX_BYTES`] are read ([`NodeFileError::TooLarge`]
    /// beyond): the size is counted while reading, not taken from the
    /// file's metadata, which character devices and `/proc` files leave at
    /// zero.
    pub fn load(path: &Path) -> Result<NodeConfig, NodeFileError> {
        let read_err = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => NodeFileError::Missing {
                path: path.to_owned(),
            },
            _ => NodeFileError::Read {
                path: path.to_owned(),
                source,
            },
        };
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|file| file.take(NODE_FILE_MAX_BYTES + 1).read_to_end(&mut bytes))
            .map_err(read_err)?;
        if bytes.len() as u64 > NODE_FILE_MAX_BYTES {
            return Err(NodeFileError::TooLarge {
                path: path.to_owned(),
                cap: NODE_FILE_MAX_BYTES,
            });
        }
        Self::from_json(&bytes).map_err(|e| NodeFileError::Malformed {
            path: path.to_owned(),
            field: e.field,
            problem: e.problem,
        })
    }

    /// Writes the file so a reader sees either the old or the new content,
    /// never a partial one: a temp file in the same directory, fsync, rename
    /// over `path`, fsync of the directory so the rename survives a crash.
    /// Refuses to write a config that [`NodeConfig::load`] would reject.
    pub fn write_atomic(&self, path: &Path) -> Result<(), NodeFileError> {
        let write_err = |step| {
            move |source| NodeFileError::Write {
                path: path.to_owned(),
                step,
                source,
            }
        };
        self.validate().map_err(|e| NodeFileError::Malformed {
            path: path.to_owned(),
            field: e.field,
            problem: e.problem,
        })?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        fs::create_dir_all(dir).map_err(write_err("create directory"))?;
        let mut json = serde_json::to_vec_pretty(self).expect("NodeConfig is plain data");
        json.push(b'\n');
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
        let result = (|| {
            let mut file = File::create(&tmp).map_err(write_err("create temp file"))?;
            file.write_all(&json)
                .map_err(write_err("write temp file"))?;
            file.sync_all().map_err(write_err("fsync temp file"))?;
            fs::rename(&tmp, path).map_err(write_err("rename temp file"))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(write_err("fsync directory"))
        })();
        if result.is_err() {
            // Best effort: the temp file is useless once the write failed.
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The IPv4 pod slice, if the node has one.
    pub fn pod_cidr_v4(&self) -> Option<IpNet> {
        self.pod_cidrs
            .iter()
            .copied()
            .find(|n| matches!(n, IpNet::V4(_)))
    }

    /// The IPv6 pod slice, if the node has one.
    pub fn pod_cidr_v6(&self) -> Option<IpNet> {
        self.pod_cidrs
            .iter()
            .copied()
            .find(|n| matches!(n, IpNet::V6(_)))
    }

    /// Parses and validates node-file JSON.
    pub(crate) fn from_json(json: &[u8]) -> Result<NodeConfig, FieldError> {
        let value: Value = serde_json::from_slice(json).map_err(|e| {
            FieldError::new(
                "(top level)",
                format!("is not valid JSON ({e}): let weft-agent rewrite the file"),
            )
        })?;
        let mut file = FieldReader::new(value, "")?;
        let node = NodeConfig {
            node_name: file.require("nodeName")?,
            pod_cidrs: file.require("podCidrs")?,
            cluster_cidrs: file.require("clusterCidrs")?,
            mtu: file.require("mtu")?,
        };
        node.validate()?;
        Ok(node)
    }

    fn validate(&self) -> Result<(), FieldError> {
        if self.node_name.is_empty() {
            return Err(FieldError::new(
                "nodeName",
                "is empty: set it to the Kubernetes Node name",
            ));
        }
        let v4 = self
            .pod_cidrs
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)))
            .count();
        let v6 = self.pod_cidrs.len() - v4;
        if self.pod_cidrs.is_empty() || v4 > 1 || v6 > 1 {
            return Err(FieldError::new(
                "podCidrs",
                format!(
                    "has {} IPv4 and {} IPv6 prefixes: list one IPv4 and/or one IPv6 pod slice",
                    v4, v6
                ),
            ));
        }
        if self.cluster_cidrs.is_empty() {
            return Err(FieldError::new(
                "clusterCidrs",
                "is empty: list the cluster's pod CIDRs",
            ));
        }
        for (field, list) in [
            ("podCidrs", &self.pod_cidrs),
            ("clusterCidrs", &self.cluster_cidrs),
        ] {
            for (i, net) in list.iter().enumerate() {
                crate::fields::check_prefix(*net)
                    .map_err(|p| FieldError::new(format!("{field}[{i}]"), p))?;
            }
        }
        for (i, slice) in self.pod_cidrs.iter().enumerate() {
            if !self.cluster_cidrs.iter().any(|c| c.contains(slice)) {
                return Err(FieldError::new(
                    format!("podCidrs[{i}]"),
                    format!("{slice} lies in none of clusterCidrs: list a cluster CIDR that contains it"),
                ));
            }
        }
        crate::fields::check_mtu(self.mtu).map_err(|p| FieldError::new("mtu", p))?;
        if v6 == 1 && self.mtu < IPV6_MIN_MTU {
            return Err(FieldError::new(
                "mtu",
                format!("{} is below IPv6's minimum: use {IPV6_MIN_MTU} or more on a node with an IPv6 slice", self.mtu),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUAL: &[u8] = include_bytes!("../tests/fixtures/node-dual.json");

    fn dual() -> NodeConfig {
        NodeConfig {
            node_name: "node-a".into(),
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
            ],
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap(),
            ],
            mtu: 1450,
        }
    }

    /// The fixture with `field` replaced by `value`.
    fn malformed(field: &str, value: Value) -> FieldError {
        let mut json: Value = serde_json::from_slice(DUAL).unwrap();
        json[field] = value;
        NodeConfig::from_json(&serde_json::to_vec(&json).unwrap()).unwrap_err()
    }

    #[test]
    fn loads_the_fixture() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        fs::write(&path, DUAL).unwrap();
        let node = NodeConfig::load(&path).unwrap();
        assert_eq!(node, dual());
        assert_eq!(node.pod_cidr_v4(), Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!(
            node.pod_cidr_v6(),
            Some("fd00:10:244:1::/64".parse().unwrap())
        );
    }

    #[test]
    fn missing_is_distinct_from_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        let e = NodeConfig::load(&path).unwrap_err();
        assert!(matches!(e, NodeFileError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("weft-agent"), "{e}");

        fs::write(&path, b"{\"nodeName\":").unwrap();
        let e = NodeConfig::load(&path).unwrap_err();
        assert!(matches!(e, NodeFileError::Malformed { .. }), "{e}");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn oversized_and_endless_files_are_refused_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        // Valid JSON padded past the cap: refused for its size, not parsed.
        let mut padded = DUAL.to_vec();
        padded.resize(NODE_FILE_MAX_BYTES as usize + 1, b' ');
        fs::write(&path, &padded).unwrap();
        let e = NodeConfig::load(&path).unwrap_err();
        assert!(
            matches!(e, NodeFileError::TooLarge { cap, .. } if cap == NODE_FILE_MAX_BYTES),
            "{e}"
        );
        padded.truncate(NODE_FILE_MAX_BYTES as usize);
        fs::write(&path, &padded).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap(), dual());

        let e = NodeConfig::load(Path::new("/dev/zero")).unwrap_err();
        let message = e.to_string();
        assert!(matches!(e, NodeFileError::TooLarge { .. }), "{message}");
        for named in ["/dev/zero", "65536 bytes", "nodeFile"] {
            assert!(message.contains(named), "{message} should name {named}");
        }
    }

    #[test]
    fn malformed_fields_are_named() {
        let cases = [
            ("nodeName", Value::Null, "nodeName"),
            ("nodeName", "".into(), "nodeName"),
            ("mtu", "1450".into(), "mtu"),
            ("mtu", 0.into(), "mtu"),
            ("mtu", 1200.into(), "mtu"),
            ("podCidrs", serde_json::json!([]), "podCidrs"),
            (
                "podCidrs",
                serde_json::json!(["10.244.1.0/24", "10.244.2.0/24"]),
                "podCidrs",
            ),
            (
                "podCidrs",
                serde_json::json!(["10.244.1.1/24"]),
                "podCidrs[0]",
            ),
            (
                "podCidrs",
                serde_json::json!(["10.99.0.0/24"]),
                "podCidrs[0]",
            ),
            ("podCidrs", serde_json::json!("10.244.1.0/24"), "podCidrs"),
            ("clusterCidrs", serde_json::json!([]), "clusterCidrs"),
            (
                "clusterCidrs",
                serde_json::json!(["10.244.0.0/16", "10.0.0.1/8"]),
                "clusterCidrs[1]",
            ),
        ];
        for (field, value, named) in cases {
            let e = malformed(field, value.clone());
            assert_eq!(e.field, named, "{field}={value}: {}", e.problem);
        }
    }

    #[test]
    fn single_stack_nodes_are_fine() {
        let mut json: Value = serde_json::from_slice(DUAL).unwrap();
        json["podCidrs"] = serde_json::json!(["fd00:10:244:1::/64"]);
        let node = NodeConfig::from_json(&serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(node.pod_cidr_v4(), None);
        // An IPv4-only node may use a small MTU.
        json["podCidrs"] = serde_json::json!(["10.244.1.0/24"]);
        json["mtu"] = 576.into();
        assert!(NodeConfig::from_json(&serde_json::to_vec(&json).unwrap()).is_ok());
    }

    #[test]
    fn write_atomic_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/weft/node.json");
        dual().write_atomic(&path).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap(), dual());
        let mut changed = dual();
        changed.mtu = 1400;
        changed.write_atomic(&path).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap(), changed);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["node.json"]);
    }

    #[test]
    fn write_atomic_refuses_an_invalid_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        let mut bad = dual();
        bad.pod_cidrs.clear();
        let e = bad.write_atomic(&path).unwrap_err();
        assert!(
            matches!(e, NodeFileError::Malformed { ref field, .. } if field == "podCidrs"),
            "{e}"
        );
        assert!(!path.exists());
    }
}
