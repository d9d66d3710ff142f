//! The CNI error object: what a plugin prints on stdout when a verb fails.

use std::fmt;

use serde::Serialize;

use super::CniVersion;

/// Well-known error codes from the CNI specification (codes 0-99 are reserved
/// for these; plugins may use 100 and above for their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1: the config's `cniVersion` is not one the plugin supports.
    IncompatibleVersion,
    /// 2: a field in the network configuration is not supported.
    UnsupportedField,
    /// 3: the container is unknown or does not exist.
    UnknownContainer,
    /// 4: a `CNI_*` environment variable is missing or malformed.
    InvalidEnvironment,
    /// 5: an I/O failure (reading stdin, files, the IPAM store).
    Io,
    /// 6: stdin could not be decoded as JSON.
    Decode,
    /// 7: the network configuration is invalid.
    InvalidNetworkConfig,
    /// 11: a transient condition; the runtime should retry later.
    TryAgainLater,
    /// 50: the plugin is not ready to serve ADD (STATUS).
    PluginNotAvailable,
    /// 51: the plugin works but existing pods may have limited connectivity (STATUS).
    LimitedConnectivity,
}

impl ErrorCode {
    /// The numeric code the spec assigns.
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidNetworkConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::PluginNotAvailable => 50,
            ErrorCode::LimitedConnectivity => 51,
        }
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        code.code()
    }
}

/// A failed CNI verb: `code`, a short `msg` naming the problem and the fix,
/// and optional longer `details` (e.g. the underlying OS error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// Spec code (1-99 well known, 100+ plugin specific).
    pub code: u32,
    /// Short message: what is wrong and how to fix it.
    pub msg: String,
    /// Longer explanation; empty when there is nothing to add.
    pub details: String,
}

impl CniError {
    /// An error with a well-known or plugin-specific code and no details.
    pub fn new(code: impl Into<u32>, msg: impl Into<String>) -> Self {
        CniError {
            code: code.into(),
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The same error with `details` set.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Process exit status for this error: non-zero as the spec requires, equal
    /// to the code where it fits in a byte.
    pub fn exit_status(&self) -> u8 {
        u8::try_from(self.code)
            .ok()
            .filter(|c| *c != 0)
            .unwrap_or(1)
    }

    /// The spec error JSON, e.g.
    /// `{"cniVersion":"1.1.0","code":7,"msg":"...","details":"..."}`.
    /// `details` is left out when empty, as the reference library does.
    pub fn to_json(&self, version: CniVersion) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version: version.as_str(),
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        serde_json::to_string(&wire).expect("a struct of strings and numbers always serializes")
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_spec_error_json() {
        let e = CniError::new(ErrorCode::InvalidNetworkConfig, "bad mtu").with_details("more");
        let v: serde_json::Value = serde_json::from_str(&e.to_json(CniVersion::V1_0_0)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"1.0.0","code":7,"msg":"bad mtu","details":"more"})
        );
        let v: serde_json::Value = serde_json::from_str(
            &CniError::new(ErrorCode::PluginNotAvailable, "x").to_json(CniVersion::V1_1_0),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"1.1.0","code":50,"msg":"x"})
        );
    }

    #[test]
    fn codes_match_the_spec() {
        let codes = [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::UnsupportedField, 2),
            (ErrorCode::UnknownContainer, 3),
            (ErrorCode::InvalidEnvironment, 4),
            (ErrorCode::Io, 5),
            (ErrorCode::Decode, 6),
            (ErrorCode::InvalidNetworkConfig, 7),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::PluginNotAvailable, 50),
            (ErrorCode::LimitedConnectivity, 51),
        ];
        for (code, n) in codes {
            assert_eq!(code.code(), n);
        }
    }

    #[test]
    fn exit_status_is_never_zero() {
        assert_eq!(CniError::new(7u32, "").exit_status(), 7);
        assert_eq!(CniError::new(300u32, "").exit_status(), 1);
        assert_eq!(CniError::new(0u32, "").exit_status(), 1);
    }
}
