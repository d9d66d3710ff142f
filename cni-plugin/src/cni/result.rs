//! The ADD result: one model, rendered in and parsed from every supported
//! spec version.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{CniError, CniVersion, ErrorCode};
use weft_core::fields::{FieldError, FieldReader};

/// A hardware address as results carry it: colon-separated hex bytes
/// (6 for Ethernet; other link types use more, so the length is open).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MacAddress(Vec<u8>);

impl MacAddress {
    /// The raw bytes.
    pub fn octets(&self) -> &[u8] {
        &self.0
    }
}

impl From<[u8; 6]> for MacAddress {
    fn from(octets: [u8; 6]) -> Self {
        MacAddress(octets.to_vec())
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for MacAddress {
    type Err = String;

    /// Accepts `aa:bb:...` in either case, 1 to 20 bytes (InfiniBand's length).
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = s
            .split(':')
            // Exactly two hex digits: from_str_radix alone would take "+f".
            .map(|part| match part.len() {
                2 if part.bytes().all(|b| b.is_ascii_hexdigit()) => u8::from_str_radix(part, 16).ok(),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()
            .filter(|b| b.len() <= 20)
            .ok_or_else(|| format!("{s:?} is not a MAC address: write it as colon-separated hex bytes, e.g. 0a:58:0a:f4:01:02"))?;
        Ok(MacAddress(bytes))
    }
}

/// An interface the plugin created or moved into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name (host side: the veth; sandbox side: CNI_IFNAME).
    pub name: String,
    /// Hardware address.
    pub mac: Option<MacAddress>,
    /// The netns path, for interfaces inside the sandbox; `None` on the host.
    pub sandbox: Option<String>,
    /// MTU; rendered only for spec 1.1.0, which added the field.
    pub mtu: Option<u32>,
}

/// One address given to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// The address with its prefix length, e.g. `10.244.1.5/32`.
    pub address: IpNet,
    /// The next hop for the pod's routes in this family.
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`] of the interface holding it.
    pub interface: Option<usize>,
}

/// One route in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Next hop; `None` means the `ips` gateway of the same family.
    pub gw: Option<IpAddr>,
}

/// Resolver settings (the spec's well-known `dns` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dns {
    /// Name server addresses, in priority order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain for short names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// True when no field is set (and so the result omits `dns`).
    pub fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

/// What an ADD returns (and what CHECK and DEL receive as `prevResult`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    /// Interfaces, referenced by index from `ips`.
    pub interfaces: Vec<Interface>,
    /// Addresses.
    pub ips: Vec<IpConfig>,
    /// Routes in the sandbox.
    pub routes: Vec<Route>,
    /// Resolver settings.
    pub dns: Dns,
}

impl CniResult {
    /// Renders the result JSON of `version`: 0.3.x/0.4.0 tag each `ips` entry
    /// with `"version":"4"|"6"`, 1.0.0 and later do not; only 1.1.0 carries
    /// interface `mtu`. Empty lists and an empty `dns` are left out.
    pub fn to_json(&self, version: CniVersion) -> Value {
        let mut out = Map::new();
        out.insert("cniVersion".into(), version.as_str().into());
        if !self.interfaces.is_empty() {
            let interfaces = self.interfaces.iter().map(|i| {
                let mut obj = Map::new();
                obj.insert("name".into(), i.name.clone().into());
                if let Some(mac) = &i.mac {
                    obj.insert("mac".into(), mac.to_string().into());
                }
                if let (Some(mtu), CniVersion::V1_1_0) = (i.mtu, version) {
                    obj.insert("mtu".into(), mtu.into());
                }
                if let Some(sandbox) = &i.sandbox {
                    obj.insert("sandbox".into(), sandbox.clone().into());
                }
                Value::Object(obj)
            });
            out.insert("interfaces".into(), interfaces.collect());
        }
        if !self.ips.is_empty() {
            let ips = self.ips.iter().map(|ip| {
                let mut obj = Map::new();
                if version.ips_carry_version() {
                    let family = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    obj.insert("version".into(), family.into());
                }
                obj.insert("address".into(), ip.address.to_string().into());
                if let Some(gw) = ip.gateway {
                    obj.insert("gateway".into(), gw.to_string().into());
                }
                if let Some(index) = ip.interface {
                    obj.insert("interface".into(), index.into());
                }
                Value::Object(obj)
            });
            out.insert("ips".into(), ips.collect());
        }
        if !self.routes.is_empty() {
            let routes = self.routes.iter().map(|r| match r.gw {
                Some(gw) => json!({"dst": r.dst.to_string(), "gw": gw.to_string()}),
                None => json!({"dst": r.dst.to_string()}),
            });
            out.insert("routes".into(), routes.collect());
        }
        if !self.dns.is_empty() {
            out.insert(
                "dns".into(),
                serde_json::to_value(&self.dns).expect("Dns is plain data"),
            );
        }
        Value::Object(out)
    }

    /// Parses a result of `version` (e.g. a `prevResult`). Fields of newer
    /// versions and unknown keys are ignored; a wrong field is code 7 naming it.
    pub fn from_json(value: Value, version: CniVersion) -> Result<CniResult, CniError> {
        Self::read(value, version, "result").map_err(|e| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("{} {}", e.field, e.problem),
            )
        })
    }

    /// [`CniResult::from_json`] with errors naming fields under `path`.
    pub(crate) fn read(
        value: Value,
        version: CniVersion,
        path: &str,
    ) -> Result<CniResult, FieldError> {
        let mut result = FieldReader::new(value, path)?;
        let interfaces = read_list(&mut result, "interfaces", |mut i| {
            let mac = i
                .take::<String>("mac")?
                .map(|m| {
                    m.parse::<MacAddress>()
                        .map_err(|p| FieldError::new(i.name("mac"), p))
                })
                .transpose()?;
            Ok(Interface {
                name: i.require("name")?,
                mac,
                sandbox: i.take("sandbox")?,
                mtu: i.take("mtu")?,
            })
        })?;
        let ips = read_list(&mut result, "ips", |mut ip| {
            let address = cidr(&mut ip, "address")?
                .ok_or_else(|| FieldError::new(ip.name("address"), "is missing"))?;
            if version.ips_carry_version() {
                // 0.x results tag each address with its family; a tag that
                // disagrees with the address means the producer is broken.
                if let Some(family) = ip.take::<String>("version")? {
                    let expected = if address.addr().is_ipv4() { "4" } else { "6" };
                    if family != expected {
                        return Err(FieldError::new(
                            ip.name("version"),
                            format!("is {family:?} but the address {address} needs {expected:?}"),
                        ));
                    }
                }
            }
            let interface: Option<usize> = ip.take("interface")?;
            Ok(IpConfig {
                address,
                gateway: addr(&mut ip, "gateway")?,
                interface,
            })
        })?;
        if let Some((i, ip)) = ips
            .iter()
            .enumerate()
            .find(|(_, ip)| ip.interface.is_some_and(|n| n >= interfaces.len()))
        {
            return Err(FieldError::new(
                format!("{}[{i}].interface", result.name("ips")),
                format!(
                    "is {} but there are only {} interfaces: it must index into \"interfaces\"",
                    ip.interface.unwrap_or_default(),
                    interfaces.len()
                ),
            ));
        }
        let routes = read_list(&mut result, "routes", |mut r| {
            let dst =
                cidr(&mut r, "dst")?.ok_or_else(|| FieldError::new(r.name("dst"), "is missing"))?;
            Ok(Route {
                dst,
                gw: addr(&mut r, "gw")?,
            })
        })?;
        let dns = result.take("dns")?.unwrap_or_default();
        Ok(CniResult {
            interfaces,
            ips,
            routes,
            dns,
        })
    }

    /// This plugin's result appended to the previous plugin's in a conflist:
    /// the previous interfaces come first, so this result's interface indices
    /// shift by their number. This result's `dns` wins when it has any.
    pub fn chained_after(self, prev: &CniResult) -> CniResult {
        let offset = prev.interfaces.len();
        let mut chained = prev.clone();
        chained.interfaces.extend(self.interfaces);
        chained.ips.extend(self.ips.into_iter().map(|ip| IpConfig {
            interface: ip.interface.map(|i| i + offset),
            ..ip
        }));
        chained.routes.extend(self.routes);
        if !self.dns.is_empty() {
            chained.dns = self.dns;
        }
        chained
    }
}

fn read_list<T>(
    parent: &mut FieldReader,
    key: &str,
    mut read_item: impl FnMut(FieldReader) -> Result<T, FieldError>,
) -> Result<Vec<T>, FieldError> {
    let items: Vec<Value> = parent.take(key)?.unwrap_or_default();
    let list = parent.name(key);
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| read_item(FieldReader::new(item, &format!("{list}[{i}]"))?))
        .collect()
}

fn cidr(obj: &mut FieldReader, key: &str) -> Result<Option<IpNet>, FieldError> {
    obj.take::<String>(key)?
        .map(|s| {
            s.parse().map_err(|_| {
                FieldError::new(
                    obj.name(key),
                    format!("{s:?} is not an address/prefix such as \"10.244.1.5/24\""),
                )
            })
        })
        .transpose()
}

fn addr(obj: &mut FieldReader, key: &str) -> Result<Option<IpAddr>, FieldError> {
    obj.take::<String>(key)?
        .map(|s| {
            s.parse()
                .map_err(|_| FieldError::new(obj.name(key), format!("{s:?} is not an IP address")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::SUPPORTED_VERSIONS;

    fn fixture(version: CniVersion) -> Value {
        let text = match version {
            CniVersion::V0_3_0 => include_str!("../../tests/fixtures/result-0.3.0.json"),
            CniVersion::V0_3_1 => include_str!("../../tests/fixtures/result-0.3.1.json"),
            CniVersion::V0_4_0 => include_str!("../../tests/fixtures/result-0.4.0.json"),
            CniVersion::V1_0_0 => include_str!("../../tests/fixtures/result-1.0.0.json"),
            CniVersion::V1_1_0 => include_str!("../../tests/fixtures/result-1.1.0.json"),
        };
        serde_json::from_str(text).unwrap()
    }

    fn mac(s: &str) -> Option<MacAddress> {
        Some(s.parse().unwrap())
    }

    fn dual_stack_result() -> CniResult {
        let iface = |name: &str, m: &str, sandbox: Option<&str>| Interface {
            name: name.into(),
            mac: mac(m),
            sandbox: sandbox.map(str::to_owned),
            mtu: Some(1450),
        };
        CniResult {
            interfaces: vec![
                iface("weft0", "0a:58:0a:f4:01:01", None),
                iface("veth5f2c9a1e", "6E:1D:44:9B:02:C7", None),
                iface("eth0", "0a:58:0a:f4:01:05", Some("/var/run/netns/pod1")),
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/24".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: Some(2),
                },
                IpConfig {
                    address: "fd00:10:244:1::5/64".parse().unwrap(),
                    gateway: Some("fd00:10:244:1::1".parse().unwrap()),
                    interface: Some(2),
                },
            ],
            routes: vec![
                Route {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: Some("10.244.1.1".parse().unwrap()),
                },
                Route {
                    dst: "::/0".parse().unwrap(),
                    gw: Some("fd00:10:244:1::1".parse().unwrap()),
                },
            ],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                search: vec!["default.svc.cluster.local".into()],
                ..Dns::default()
            },
        }
    }

    #[test]
    fn renders_each_version_like_its_fixture() {
        let result = dual_stack_result();
        for version in SUPPORTED_VERSIONS {
            assert_eq!(result.to_json(version), fixture(version), "{version}");
        }
    }

    #[test]
    fn parses_each_version_back_into_the_model() {
        for version in SUPPORTED_VERSIONS {
            let parsed = CniResult::from_json(fixture(version), version).unwrap();
            let mut expected = dual_stack_result();
            if version != CniVersion::V1_1_0 {
                // Older versions have no interface MTU to carry.
                expected.interfaces.iter_mut().for_each(|i| i.mtu = None);
            }
            assert_eq!(parsed, expected, "{version}");
        }
    }

    #[test]
    fn empty_parts_are_left_out() {
        let v = CniResult::default().to_json(CniVersion::V1_0_0);
        assert_eq!(v, serde_json::json!({"cniVersion": "1.0.0"}));
        assert_eq!(
            CniResult::from_json(v, CniVersion::V1_0_0).unwrap(),
            CniResult::default()
        );
    }

    #[test]
    fn route_without_gateway_and_ip_without_interface() {
        let result = CniResult {
            ips: vec![IpConfig {
                address: "10.0.0.2/8".parse().unwrap(),
                gateway: None,
                interface: None,
            }],
            routes: vec![Route {
                dst: "10.0.0.0/8".parse().unwrap(),
                gw: None,
            }],
            ..CniResult::default()
        };
        assert_eq!(
            result.to_json(CniVersion::V0_3_1),
            serde_json::json!({
                "cniVersion": "0.3.1",
                "ips": [{"version": "4", "address": "10.0.0.2/8"}],
                "routes": [{"dst": "10.0.0.0/8"}]
            })
        );
    }

    #[test]
    fn malformed_results_name_the_field() {
        let cases = [
            (
                serde_json::json!({"ips": [{"address": "10.0.0.2/8", "interface": 0}]}),
                "result.ips[0].interface",
            ),
            (
                serde_json::json!({"ips": [{"version": "6", "address": "10.0.0.2/8"}]}),
                "result.ips[0].version",
            ),
            (
                serde_json::json!({"ips": [{"gateway": "10.0.0.1"}]}),
                "result.ips[0].address",
            ),
            (
                serde_json::json!({"interfaces": [{"name": "eth0", "mac": "zz"}]}),
                "result.interfaces[0].mac",
            ),
            (
                serde_json::json!({"interfaces": [{"mac": "0a:00:00:00:00:01"}]}),
                "result.interfaces[0].name",
            ),
            (
                serde_json::json!({"routes": [{"dst": "0.0.0.0/0", "gw": "gw"}]}),
                "result.routes[0].gw",
            ),
            (serde_json::json!({"routes": {}}), "result.routes"),
            (serde_json::json!([]), "result"),
        ];
        for (value, field) in cases {
            let e = CniResult::from_json(value.clone(), CniVersion::V0_4_0).unwrap_err();
            assert_eq!(e.code, 7);
            assert!(e.msg.starts_with(field), "{value}: {}", e.msg);
        }
    }

    #[test]
    fn chaining_appends_after_the_previous_result() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "lo".into(),
                mac: None,
                sandbox: Some("/var/run/netns/pod1".into()),
                mtu: None,
            }],
            ips: vec![IpConfig {
                address: "127.0.0.1/8".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            }],
            dns: Dns {
                domain: Some("prev".into()),
                ..Dns::default()
            },
            ..CniResult::default()
        };
        let chained = dual_stack_result().chained_after(&prev);
        assert_eq!(chained.interfaces.len(), 4);
        assert_eq!(chained.interfaces[0].name, "lo");
        assert_eq!(chained.ips[0].interface, Some(0));
        assert_eq!(chained.ips[1].interface, Some(3));
        assert_eq!(chained.ips[2].interface, Some(3));
        assert_eq!(chained.routes.len(), 2);
        assert_eq!(chained.dns, dual_stack_result().dns);

        let keeps_prev_dns = CniResult::default().chained_after(&prev);
        assert_eq!(keeps_prev_dns.dns, prev.dns);
    }

    #[test]
    fn mac_address_format() {
        let m: MacAddress = "0A:58:0a:F4:01:05".parse().unwrap();
        assert_eq!(m.to_string(), "0a:58:0a:f4:01:05");
        assert_eq!(
            MacAddress::from([0, 1, 2, 3, 4, 0xff]).to_string(),
            "00:01:02:03:04:ff"
        );
        assert_eq!(m.octets(), &[0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05]);
        for bad in [
            "",
            "0a:5",
            "0a-58-0a-f4-01-05",
            "zz:00:00:00:00:00",
            "+f:00:00:00:00:00",
            &["00"; 21].join(":"),
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
    }
}
