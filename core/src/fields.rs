//! Reading a JSON object field by field, so that every type error names the
//! field it came from. `serde_json` alone reports only a line and column,
//! which tells an operator nothing about which setting to fix.

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A field that is missing or has the wrong type or value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's JSON key, dotted for nested objects (`ips[0].address`).
    pub field: String,
    /// What is wrong with it, e.g. `invalid type: string "x", expected u32`.
    pub problem: String,
}

impl FieldError {
    /// The error for `field`, with the problem and its fix in `problem`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// A JSON object whose fields are taken out one at a time.
pub struct FieldReader {
    fields: Map<String, Value>,
    path: String,
}

impl FieldReader {
    /// Wraps `value`, which must be an object; `path` names it in errors
    /// (empty for the top level).
    pub fn new(value: Value, path: &str) -> Result<Self, FieldError> {
        match value {
            Value::Object(fields) => Ok(FieldReader {
                fields,
                path: path.to_owned(),
            }),
            other => Err(FieldError::new(
                if path.is_empty() { "(top level)" } else { path },
                format!("must be a JSON object, found {}", kind(&other)),
            )),
        }
    }

    /// The full name of `key` for error messages.
    pub fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Takes `key` out of the object; absent and `null` both give `None`.
    pub fn take<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, FieldError> {
        match self.fields.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => serde_json::from_value(value)
                .map(Some)
                .map_err(|e| FieldError::new(self.name(key), e.to_string())),
        }
    }

    /// Takes `key`, which must be present and not `null`.
    pub fn require<T: DeserializeOwned>(&mut self, key: &str) -> Result<T, FieldError> {
        self.take(key)?
            .ok_or_else(|| FieldError::new(self.name(key), "is missing"))
    }
}

/// A word for the JSON type of `value`, for messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Accepted MTU values: IPv4's minimum link MTU up to the largest IP packet.
pub fn check_mtu(mtu: u32) -> Result<(), String> {
    if (68..=65535).contains(&mtu) {
        Ok(())
    } else {
        Err(format!(
            "{mtu} is out of range: use an MTU between 68 and 65535 (1280 or more with IPv6)"
        ))
    }
}

/// A prefix with no host bits set, or the problem and the corrected value.
pub fn check_prefix(net: IpNet) -> Result<(), String> {
    if net.addr() == net.network() {
        Ok(())
    } else {
        Err(format!("{net} has host bits set: write {}", net.trunc()))
    }
}
