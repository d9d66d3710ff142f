//! `runtimeConfig.portMappings`: the hostPorts a runtime asks for when the
//! conflist advertises the `portMappings` capability (the kubelet fills it
//! from each container's `ports[].hostPort`).

use std::net::IpAddr;

use serde_json::{Map, Value};

use super::{CniError, ErrorCode};
use weft_core::ip::IpFamily;
use weft_core::protocol::Protocol;

/// Which of the node's addresses a hostPort listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostIp {
    /// Every local address of these families: `hostIP` unset or empty
    /// (both families), `0.0.0.0` (IPv4) or `::` (IPv6).
    Any(Option<IpFamily>),
    /// This one address.
    Address(IpAddr),
}

impl HostIp {
    /// Whether the mapping applies to pod addresses of `family`.
    pub fn covers(self, family: IpFamily) -> bool {
        match self {
            HostIp::Any(None) => true,
            HostIp::Any(Some(only)) => only == family,
            HostIp::Address(address) => IpFamily::of_addr(address) == family,
        }
    }
}

/// One requested hostPort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// The node's port.
    pub host_port: u16,
    /// The pod's port.
    pub container_port: u16,
    /// The protocol (default TCP).
    pub protocol: Protocol,
    /// The node address(es) it is reached on.
    pub host_ip: HostIp,
}

impl PortMapping {
    /// The mappings in `runtimeConfig` (none when the key is absent). Each
    /// error names the entry and field and says what is expected.
    pub fn from_runtime_config(runtime: &Map<String, Value>) -> Result<Vec<PortMapping>, CniError> {
        let Some(value) = runtime.get("portMappings") else {
            return Ok(Vec::new());
        };
        let Some(entries) = value.as_array() else {
            return Err(invalid(
                "runtimeConfig.portMappings".to_owned(),
                "is not a list: pass [{\"hostPort\": 8080, \"containerPort\": 80, \"protocol\": \"tcp\"}]",
            ));
        };
        entries
            .iter()
            .enumerate()
            .map(|(index, entry)| parse_entry(index, entry))
            .collect()
    }
}

fn parse_entry(index: usize, entry: &Value) -> Result<PortMapping, CniError> {
    let field = |name: &str| format!("runtimeConfig.portMappings[{index}].{name}");
    let Some(entry) = entry.as_object() else {
        return Err(invalid(
            format!("runtimeConfig.portMappings[{index}]"),
            "is not an object: write {\"hostPort\": 8080, \"containerPort\": 80}",
        ));
    };
    // containerd (go-cni) sends Go's field names, `HostPort`, `ContainerPort`,
    // `Protocol`, `HostIP`: its struct has no JSON tags, and Go plugins match
    // keys without regard to case. So does this, preferring the exact key.
    let get = |name: &str| {
        entry.get(name).or_else(|| {
            entry
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value)
        })
    };
    let port = |name: &str| -> Result<u16, CniError> {
        get(name)
            .and_then(Value::as_u64)
            .and_then(|port| u16::try_from(port).ok())
            .filter(|port| *port != 0)
            .ok_or_else(|| invalid(field(name), "must be a port number from 1 to 65535"))
    };
    let host_port = port("hostPort")?;
    let container_port = port("containerPort")?;
    let protocol = match get("protocol") {
        None | Some(Value::Null) => Protocol::Tcp,
        Some(Value::String(text)) if text.is_empty() => Protocol::Tcp,
        Some(Value::String(text)) => Protocol::parse(text)
            .ok_or_else(|| invalid(field("protocol"), "must be \"tcp\", \"udp\" or \"sctp\""))?,
        Some(_) => {
            return Err(invalid(
                field("protocol"),
                "must be \"tcp\", \"udp\" or \"sctp\"",
            ))
        }
    };
    let host_ip = match get("hostIP") {
        None | Some(Value::Null) => HostIp::Any(None),
        Some(Value::String(text)) if text.is_empty() => HostIp::Any(None),
        Some(Value::String(text)) => match text.parse::<IpAddr>() {
            Ok(address) if address.is_unspecified() => {
                HostIp::Any(Some(IpFamily::of_addr(address)))
            }
            Ok(address) if address.is_multicast() => {
                return Err(invalid(
                    field("hostIP"),
                    "is a multicast address: use one of the node's unicast addresses, or leave it empty for all",
                ))
            }
            Ok(address) => HostIp::Address(address),
            Err(_) => {
                return Err(invalid(
                    field("hostIP"),
                    "is not an IP address: use one of the node's addresses, or leave it empty for all",
                ))
            }
        },
        Some(_) => {
            return Err(invalid(
                field("hostIP"),
                "is not a string: write it as \"192.0.2.10\", or leave it out",
            ))
        }
    };
    Ok(PortMapping {
        host_port,
        container_port,
        protocol,
        host_ip,
    })
}

fn invalid(field: String, problem: &str) -> CniError {
    CniError::new(
        ErrorCode::InvalidNetworkConfig,
        format!("network config field {field:?} {problem}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<Vec<PortMapping>, CniError> {
        let runtime = json!({ "portMappings": value });
        PortMapping::from_runtime_config(runtime.as_object().unwrap())
    }

    #[test]
    fn reads_what_the_kubelet_sends() {
        let mappings = parse(json!([
            { "hostPort": 8080, "containerPort": 80, "protocol": "tcp" },
            { "hostPort": 53, "containerPort": 5353, "protocol": "UDP", "hostIP": "192.0.2.10" },
            { "hostPort": 9000, "containerPort": 9000, "protocol": "sctp", "hostIP": "" },
            { "hostPort": 443, "containerPort": 8443, "hostIP": "::" },
        ]))
        .unwrap();
        assert_eq!(
            mappings[0],
            PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: HostIp::Any(None),
            }
        );
        assert_eq!(mappings[1].protocol, Protocol::Udp);
        assert_eq!(
            mappings[1].host_ip,
            HostIp::Address("192.0.2.10".parse().unwrap())
        );
        assert_eq!(mappings[2].protocol, Protocol::Sctp);
        assert_eq!(mappings[3].host_ip, HostIp::Any(Some(IpFamily::V6)));
        assert!(mappings[3].host_ip.covers(IpFamily::V6));
        assert!(!mappings[3].host_ip.covers(IpFamily::V4));
        assert!(mappings[0].host_ip.covers(IpFamily::V4));
        assert!(PortMapping::from_runtime_config(&Map::new())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn reads_what_containerd_sends() {
        let mappings = parse(json!([
            { "HostPort": 54323, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": "127.0.0.1" },
        ]))
        .unwrap();
        assert_eq!(
            mappings,
            [PortMapping {
                host_port: 54323,
                container_port: 8080,
                protocol: Protocol::Tcp,
                host_ip: HostIp::Address("127.0.0.1".parse().unwrap()),
            }]
        );
    }

    #[test]
    fn errors_name_the_entry_and_field() {
        for (value, field) in [
            (json!({}), "runtimeConfig.portMappings\""),
            (json!(["x"]), "runtimeConfig.portMappings[0]\""),
            (json!([{ "containerPort": 80 }]), "[0].hostPort"),
            (
                json!([{ "hostPort": 70000, "containerPort": 80 }]),
                "[0].hostPort",
            ),
            (
                json!([{ "hostPort": 8080, "containerPort": 0 }]),
                "[0].containerPort",
            ),
            (
                json!([{ "hostPort": 1, "containerPort": 1 }, { "hostPort": 1, "containerPort": 1, "protocol": "icmp" }]),
                "[1].protocol",
            ),
            (
                json!([{ "hostPort": 1, "containerPort": 1, "hostIP": "node-1" }]),
                "[0].hostIP",
            ),
            (
                json!([{ "hostPort": 1, "containerPort": 1, "hostIP": "224.0.0.1" }]),
                "[0].hostIP",
            ),
        ] {
            let error = parse(value.clone()).unwrap_err();
            assert_eq!(error.code, 7, "{value}");
            assert!(error.msg.contains(field), "{value}: {}", error.msg);
        }
    }
}
