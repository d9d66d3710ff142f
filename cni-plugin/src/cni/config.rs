//! The plugin's network configuration, read from stdin.

use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::{Attachment, CniError, CniResult, CniVersion, Dns, ErrorCode};
use weft_core::fields::{check_mtu, check_prefix};
use weft_core::fields::{FieldError, FieldReader};
use weft_core::nodefile::DEFAULT_NODE_FILE;

/// Parent of the per-network IPAM stores when the config names none.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// One plugin's network configuration (spec section 1 plus Weft's fields).
/// Keys Weft does not know are ignored: a conflist carries settings for
/// other plugins, and runtimes add their own. Among them are `bridge` and
/// `hairpinMode`, which configs written for the bridge design may carry:
/// pods hang off routed veths with no bridge, and a pod reaches itself
/// through a Service like any other destination, so neither means
/// anything.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`: also the version the result is rendered in.
    pub cni_version: CniVersion,
    /// `name`: the network; also the IPAM store's directory name.
    pub name: String,
    /// `type`: the plugin binary's name.
    pub plugin_type: String,
    /// `mtu`: overrides the node file's MTU when set.
    pub mtu: Option<u32>,
    /// `subnet`: overrides the node's pod slices. Accepts one CIDR string or a
    /// list of at most one IPv4 and one IPv6 CIDR; empty means "use the node
    /// file". Families not listed are not configured at all.
    pub subnets: Vec<IpNet>,
    /// `dataDir` (default `/var/lib/cni/networks`).
    pub data_dir: PathBuf,
    /// `nodeFile` (default `/run/weft/node.json`).
    pub node_file: PathBuf,
    /// `isDefaultGateway` (default true): the pod's default route points at
    /// its gateway on the node; when false only the cluster CIDRs are routed
    /// there.
    pub is_default_gateway: bool,
    /// `dns`: copied into the ADD result.
    pub dns: Dns,
    /// `prevResult`: the previous plugin's result (conflist ADD) or the
    /// result of the earlier ADD (CHECK, DEL), parsed in `cniVersion`'s format.
    pub prev_result: Option<CniResult>,
    /// `runtimeConfig`: capability arguments from the runtime, as given.
    pub runtime_config: Map<String, Value>,
    /// `cni.dev/valid-attachments` (GC): every attachment still in use.
    /// `None` when the runtime sent no list, which GC must treat as "keep all".
    pub valid_attachments: Option<Vec<Attachment>>,
    /// `args`: free-form runtime arguments, as given.
    pub args: Option<Value>,
}

impl NetConf {
    /// Parses the stdin bytes. Not JSON → code 6 with serde's position; an
    /// unsupported or missing `cniVersion` → code 1; a wrong field → code 7
    /// naming the field and the fix.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        Self::from_value(decode(stdin)?)
    }

    /// [`NetConf::parse`] for DEL, which must clean up even when the result
    /// the runtime cached from ADD comes back damaged: DEL does not use
    /// `prevResult`, so it is left unread rather than allowed to fail the
    /// verb.
    pub fn parse_without_prev_result(stdin: &[u8]) -> Result<NetConf, CniError> {
        let mut value = decode(stdin)?;
        if let Some(object) = value.as_object_mut() {
            if object.remove("prevResult").is_some() {
                tracing::debug!("prevResult not read: DEL does not use it");
            }
        }
        Self::from_value(value)
    }

    fn from_value(value: Value) -> Result<NetConf, CniError> {
        let mut conf = FieldReader::new(value, "").map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                format!(
                    "network config on stdin {}: pass the plugin's JSON config object on stdin",
                    e.problem
                ),
            )
        })?;
        let version: Option<String> = conf.take("cniVersion").map_err(invalid)?;
        let cni_version: CniVersion = version.as_deref().unwrap_or("").parse()?;

        let name: String = conf.require("name").map_err(invalid)?;
        super::env::check_identifier(&name).map_err(|problem| {
            invalid(FieldError::new(
                "name",
                format!("{name:?} {problem}: use letters, digits, '_', '.' and '-', starting with a letter or digit"),
            ))
        })?;
        let plugin_type: String = conf.require("type").map_err(invalid)?;
        if plugin_type.is_empty() {
            return Err(invalid(FieldError::new(
                "type",
                "is empty: set it to \"weft\"",
            )));
        }
        let mtu = conf.take::<u32>("mtu").map_err(invalid)?;
        if let Some(mtu) = mtu {
            check_mtu(mtu).map_err(|p| invalid(FieldError::new("mtu", p)))?;
        }
        let subnets = take_subnets(&mut conf).map_err(invalid)?;
        let data_dir = take_abs_path(&mut conf, "dataDir", DEFAULT_DATA_DIR).map_err(invalid)?;
        let node_file = take_abs_path(&mut conf, "nodeFile", DEFAULT_NODE_FILE).map_err(invalid)?;
        let is_default_gateway = conf
            .take("isDefaultGateway")
            .map_err(invalid)?
            .unwrap_or(true);
        let dns: Dns = conf.take("dns").map_err(invalid)?.unwrap_or_default();
        let prev_result = match conf.take::<Value>("prevResult").map_err(invalid)? {
            Some(value) => {
                Some(CniResult::read(value, cni_version, "prevResult").map_err(invalid)?)
            }
            None => None,
        };
        let runtime_config = conf
            .take("runtimeConfig")
            .map_err(invalid)?
            .unwrap_or_default();
        // The spec text and libcni disagreed on the key for a while; libcni
        // 1.2.3 sends both, older 1.2.x only the second.
        let valid_attachments = match conf.take("cni.dev/valid-attachments").map_err(invalid)? {
            Some(list) => Some(list),
            None => conf.take("cni.dev/attachments").map_err(invalid)?,
        };
        let args = conf.take("args").map_err(invalid)?;
        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            mtu,
            subnets,
            data_dir,
            node_file,
            is_default_gateway,
            dns,
            prev_result,
            runtime_config,
            valid_attachments,
            args,
        })
    }

    /// The `cniVersion` of a config that may be otherwise invalid, so an error
    /// about it can still be rendered in the caller's version. `None` when
    /// stdin is not JSON or the version is missing or unsupported.
    pub fn peek_version(stdin: &[u8]) -> Option<CniVersion> {
        #[derive(serde::Deserialize)]
        struct VersionOnly {
            #[serde(rename = "cniVersion")]
            cni_version: String,
        }
        let only: VersionOnly = serde_json::from_slice(stdin).ok()?;
        only.cni_version.parse().ok()
    }

    /// The IPAM store directory: `<dataDir>/<name>`.
    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir.join(&self.name)
    }
}

fn decode(stdin: &[u8]) -> Result<Value, CniError> {
    serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            ErrorCode::Decode,
            format!("network config on stdin is not valid JSON ({e}): pass the plugin's JSON config on stdin"),
        )
    })
}

fn invalid(e: FieldError) -> CniError {
    CniError::new(
        ErrorCode::InvalidNetworkConfig,
        format!("network config field {:?} {}", e.field, e.problem),
    )
}

fn take_abs_path(conf: &mut FieldReader, key: &str, default: &str) -> Result<PathBuf, FieldError> {
    let path = conf
        .take::<PathBuf>(key)?
        .unwrap_or_else(|| PathBuf::from(default));
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(FieldError::new(
            key,
            format!(
                "{} is not an absolute path: use an absolute path such as {default}",
                path.display()
            ),
        ))
    }
}

/// `subnet` as one CIDR string or a list of them, at most one per family.
fn take_subnets(conf: &mut FieldReader) -> Result<Vec<IpNet>, FieldError> {
    let subnets = match conf.take::<Value>("subnet")? {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![parse_cidr("subnet", &s)?],
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let field = format!("subnet[{i}]");
                match item {
                    Value::String(s) => parse_cidr(&field, &s),
                    other => Err(FieldError::new(
                        field,
                        format!(
                            "is {}: write a CIDR string such as \"10.244.1.0/24\"",
                            weft_core::fields::kind(&other)
                        ),
                    )),
                }
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(FieldError::new(
                "subnet",
                format!(
                    "is {}: write a CIDR string or a list of at most one IPv4 and one IPv6 CIDR",
                    weft_core::fields::kind(&other)
                ),
            ))
        }
    };
    if subnets.is_empty() {
        return Err(FieldError::new(
            "subnet",
            "is an empty list: remove it to use the node's pod CIDRs, or list the subnets",
        ));
    }
    let v4 = subnets.iter().filter(|n| matches!(n, IpNet::V4(_))).count();
    if v4 > 1 || subnets.len() - v4 > 1 {
        return Err(FieldError::new(
            "subnet",
            "lists two subnets of the same family: give at most one IPv4 and one IPv6 CIDR",
        ));
    }
    Ok(subnets)
}

fn parse_cidr(field: &str, s: &str) -> Result<IpNet, FieldError> {
    let net: IpNet = s.parse().map_err(|_| {
        FieldError::new(
            field,
            format!("{s:?} is not a CIDR: write it as address/prefix, e.g. \"10.244.1.0/24\""),
        )
    })?;
    check_prefix(net).map_err(|p| FieldError::new(field, p))?;
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &[u8] = include_bytes!("../../tests/fixtures/netconf-minimal.json");
    const FULL: &[u8] = include_bytes!("../../tests/fixtures/netconf-full.json");
    const GC: &[u8] = include_bytes!("../../tests/fixtures/netconf-gc.json");

    /// The minimal fixture with `extra` merged in at the top level.
    fn with(extra: Value) -> Vec<u8> {
        let mut conf: Value = serde_json::from_slice(MINIMAL).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        serde_json::to_vec(&conf).unwrap()
    }

    fn rejected(stdin: &[u8]) -> CniError {
        NetConf::parse(stdin).expect_err("config should be rejected")
    }

    #[test]
    fn del_parses_past_a_damaged_prev_result() {
        let stdin = with(serde_json::json!({"prevResult": {"ips": [{"address": "x"}]}}));
        assert!(NetConf::parse(&stdin).is_err());
        let conf = NetConf::parse_without_prev_result(&stdin).unwrap();
        assert_eq!((conf.name.as_str(), conf.prev_result), ("weft", None));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let conf = NetConf::parse(MINIMAL).unwrap();
        assert_eq!(conf.cni_version, CniVersion::V1_1_0);
        assert_eq!(conf.name, "weft");
        assert_eq!(conf.plugin_type, "weft");
        assert_eq!(conf.mtu, None);
        assert!(conf.subnets.is_empty());
        assert_eq!(conf.data_dir, PathBuf::from("/var/lib/cni/networks"));
        assert_eq!(conf.node_file, PathBuf::from("/run/weft/node.json"));
        assert!(conf.is_default_gateway);
        assert!(conf.dns.is_empty());
        assert_eq!(conf.prev_result, None);
        assert!(conf.runtime_config.is_empty());
        assert_eq!(conf.valid_attachments, None);
        assert_eq!(conf.args, None);
        assert_eq!(conf.ipam_dir(), PathBuf::from("/var/lib/cni/networks/weft"));
    }

    #[test]
    fn full_config_reads_every_field_and_ignores_unknown_keys() {
        let conf = NetConf::parse(FULL).unwrap();
        assert_eq!(conf.cni_version, CniVersion::V0_4_0);
        assert_eq!(conf.mtu, Some(1400));
        assert_eq!(
            conf.subnets,
            vec![
                "10.244.1.0/25".parse::<IpNet>().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(conf.data_dir, PathBuf::from("/tmp/weft-ipam"));
        assert_eq!(conf.node_file, PathBuf::from("/tmp/weft/node.json"));
        assert!(!conf.is_default_gateway);
        assert_eq!(conf.dns.nameservers, vec!["10.96.0.10"]);
        assert_eq!(conf.dns.search, vec!["svc.cluster.local"]);
        assert!(conf.runtime_config.contains_key("portMappings"));
        assert_eq!(conf.args.unwrap()["cni"]["labels"]["app"], "web");
        let prev = conf.prev_result.unwrap();
        assert_eq!(prev.interfaces[0].name, "lo");
        assert_eq!(prev.ips[0].address, "127.0.0.1/8".parse::<IpNet>().unwrap());
    }

    #[test]
    fn bridge_design_keys_are_ignored_whatever_their_value() {
        // Nothing reads them, so not even a malformed value is refused.
        let conf = NetConf::parse(&with(
            serde_json::json!({"bridge": "br:0", "hairpinMode": "yes"}),
        ))
        .unwrap();
        assert_eq!(conf.name, "weft");
    }

    #[test]
    fn gc_config_reads_valid_attachments_under_either_key() {
        let conf = NetConf::parse(GC).unwrap();
        let valid = conf.valid_attachments.unwrap();
        assert_eq!(valid.len(), 2);
        assert_eq!(valid[1].container_id, "c2");
        assert_eq!(valid[1].ifname, "eth0");

        let conf = NetConf::parse(&with(serde_json::json!({
            "cni.dev/attachments": [{"containerID": "c9", "ifname": "net1"}]
        })))
        .unwrap();
        assert_eq!(conf.valid_attachments.unwrap()[0].container_id, "c9");

        let e = rejected(&with(
            serde_json::json!({"cni.dev/valid-attachments": [{"ifname": "eth0"}]}),
        ));
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("cni.dev/valid-attachments"), "{}", e.msg);
    }

    #[test]
    fn subnet_accepts_a_string_or_a_list() {
        let conf = NetConf::parse(&with(serde_json::json!({"subnet": "10.244.1.0/24"}))).unwrap();
        assert_eq!(
            conf.subnets,
            vec!["10.244.1.0/24".parse::<IpNet>().unwrap()]
        );
        let conf = NetConf::parse(&with(serde_json::json!({"subnet": ["fd00::/64"]}))).unwrap();
        assert_eq!(conf.subnets, vec!["fd00::/64".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn bad_subnets_name_the_field_and_the_fix() {
        let cases = [
            (
                serde_json::json!({"subnet": "10.244.1.5/24"}),
                "write 10.244.1.0/24",
            ),
            (
                serde_json::json!({"subnet": "10.244.1.0"}),
                "address/prefix",
            ),
            (
                serde_json::json!({"subnet": ["10.1.0.0/24", "10.2.0.0/24"]}),
                "same family",
            ),
            (serde_json::json!({"subnet": []}), "empty list"),
            (serde_json::json!({"subnet": [24]}), "subnet[0]"),
            (serde_json::json!({"subnet": 24}), "CIDR string"),
        ];
        for (extra, fix) in cases {
            let e = rejected(&with(extra.clone()));
            assert_eq!(e.code, 7, "{extra}");
            assert!(
                e.msg.contains("\"subnet") && e.msg.contains(fix),
                "{extra}: {}",
                e.msg
            );
        }
    }

    #[test]
    fn bad_values_are_code_7_naming_the_field() {
        let cases = [
            (serde_json::json!({"mtu": 0}), "mtu"),
            (serde_json::json!({"mtu": 70000}), "mtu"),
            (serde_json::json!({"mtu": "1500"}), "mtu"),
            (serde_json::json!({"dataDir": "relative/dir"}), "dataDir"),
            (serde_json::json!({"nodeFile": "node.json"}), "nodeFile"),
            (
                serde_json::json!({"isDefaultGateway": 1}),
                "isDefaultGateway",
            ),
            (serde_json::json!({"name": "../etc"}), "name"),
            (serde_json::json!({"name": ""}), "name"),
            (serde_json::json!({"type": ""}), "type"),
            (
                serde_json::json!({"dns": {"nameservers": "10.0.0.1"}}),
                "dns",
            ),
            (serde_json::json!({"runtimeConfig": []}), "runtimeConfig"),
            (
                serde_json::json!({"prevResult": {"ips": [{"address": "x"}]}}),
                "prevResult.ips[0].address",
            ),
        ];
        for (extra, field) in cases {
            let e = rejected(&with(extra.clone()));
            assert_eq!(e.code, 7, "{extra}: {}", e.msg);
            assert!(
                e.msg.contains(&format!("\"{field}\"")),
                "{extra}: {}",
                e.msg
            );
        }
    }

    #[test]
    fn missing_required_fields() {
        for key in ["name", "type"] {
            let mut conf: Value = serde_json::from_slice(MINIMAL).unwrap();
            conf.as_object_mut().unwrap().remove(key);
            let e = rejected(&serde_json::to_vec(&conf).unwrap());
            assert_eq!(e.code, 7);
            assert!(
                e.msg.contains(key) && e.msg.contains("missing"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn version_problems_are_code_1() {
        let e = rejected(br#"{"cniVersion":"0.2.0","name":"n","type":"weft"}"#);
        assert_eq!(e.code, 1);
        let e = rejected(br#"{"name":"n","type":"weft"}"#);
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("cniVersion"));
        let e = rejected(br#"{"cniVersion":1,"name":"n","type":"weft"}"#);
        assert_eq!(e.code, 7);
    }

    #[test]
    fn invalid_json_is_code_6_with_the_position() {
        let e = rejected(b"{\"cniVersion\": \"1.0.0\",\n \"name\": }");
        assert_eq!(e.code, 6);
        assert!(e.msg.contains("line 2 column"), "{}", e.msg);
        assert_eq!(rejected(b"").code, 6);
        assert_eq!(rejected(b"[1,2]").code, 6);
        assert_eq!(rejected(&[0xff, 0xfe]).code, 6);
    }

    #[test]
    fn peek_version_reads_only_the_version() {
        assert_eq!(
            NetConf::peek_version(br#"{"cniVersion":"0.3.1","mtu":"bad"}"#),
            Some(CniVersion::V0_3_1)
        );
        assert_eq!(NetConf::peek_version(br#"{"cniVersion":"9.9.9"}"#), None);
        assert_eq!(NetConf::peek_version(b"not json"), None);
    }
}
