//! CNI protocol types for the `weft` plugin: the error object, the `CNI_*`
//! environment, the network configuration read from stdin, and results in
//! every supported spec version. Everything here is pure logic; the kernel work lives elsewhere.

mod config;
mod env;
mod error;
mod port_mappings;
mod result;

use std::fmt;
use std::str::FromStr;

pub use config::{NetConf, DEFAULT_DATA_DIR};
pub use env::{Attachment, CniArgs, Command, Invocation};
pub use error::{CniError, ErrorCode};
pub use port_mappings::{HostIp, PortMapping};
pub use result::{CniResult, Dns, Interface, IpConfig, MacAddress, Route};

/// A CNI specification version this plugin speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.3.0
    V0_3_0,
    /// 0.3.1
    V0_3_1,
    /// 0.4.0 (adds CHECK)
    V0_4_0,
    /// 1.0.0 (drops `version` from result `ips`)
    V1_0_0,
    /// 1.1.0 (adds GC, STATUS, interface `mtu`)
    V1_1_0,
}

/// Every version the plugin supports, oldest first; reported by VERSION.
pub const SUPPORTED_VERSIONS: [CniVersion; 5] = [
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

impl CniVersion {
    /// The newest supported version; used when the config's version is unknown
    /// (e.g. for an error about unreadable stdin).
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// The version string as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Whether results of this version carry `"version"` in each `ips` entry
    /// (0.3.x and 0.4.0 do; 1.0.0 removed it).
    pub fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CniVersion {
    type Err = CniError;

    /// Parses a supported version; anything else is spec error 1 naming the
    /// versions that would work.
    fn from_str(s: &str) -> Result<Self, CniError> {
        SUPPORTED_VERSIONS
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::IncompatibleVersion,
                    format!(
                        "cniVersion {s:?} is not supported by weft: set \"cniVersion\" to one of {}",
                        supported_versions_list()
                    ),
                )
            })
    }
}

/// The supported versions, oldest first, comma-separated: for messages and
/// `weft --version`.
pub fn supported_versions_list() -> String {
    SUPPORTED_VERSIONS
        .iter()
        .map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The JSON the VERSION verb prints:
/// `{"cniVersion":"1.1.0","supportedVersions":["0.3.0",...]}`.
pub fn version_json() -> String {
    serde_json::json!({
        "cniVersion": CniVersion::LATEST.as_str(),
        "supportedVersions": SUPPORTED_VERSIONS.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_round_trips() {
        for v in SUPPORTED_VERSIONS {
            assert_eq!(v.as_str().parse::<CniVersion>().unwrap(), v);
        }
    }

    #[test]
    fn unsupported_version_is_code_1_listing_the_supported_ones() {
        for bad in ["0.2.0", "1.2.0", "", "1.0"] {
            let e = bad.parse::<CniVersion>().unwrap_err();
            assert_eq!(e.code, 1);
            assert!(
                e.msg.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn version_output() {
        let v: serde_json::Value = serde_json::from_str(&version_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "cniVersion": "1.1.0",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
            })
        );
    }
}
