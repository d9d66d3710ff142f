//! Property tests for everything the `weft` plugin parses from outside:
//! stdin config, `CNI_*` environment, `prevResult`, the node file. Whatever
//! the input, the parsers return a value or a spec error; they never panic.

use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use serde_json::Value;
use weft_cni::cni::{
    CniArgs, CniResult, CniVersion, Dns, Interface, Invocation, IpConfig, MacAddress, NetConf,
    Route, SUPPORTED_VERSIONS,
};
use weft_core::nodefile::NodeConfig;

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        // Strings that look like what the fields expect.
        prop_oneof![
            Just("1.1.0"),
            Just("0.4.0"),
            Just("10.244.1.0/24"),
            Just("fd00::/64"),
            Just("10.0.0.1"),
            Just("/tmp/x"),
            Just("eth0"),
            Just("0a:58:0a:f4:01:05"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Keys the parsers look for, plus noise.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "cniVersion",
            "name",
            "type",
            "mtu",
            "subnet",
            "dataDir",
            "nodeFile",
            "isDefaultGateway",
            "dns",
            "prevResult",
            "runtimeConfig",
            "cni.dev/valid-attachments",
            "cni.dev/attachments",
            "args",
            "interfaces",
            "ips",
            "routes",
            "address",
            "gateway",
            "interface",
            "version",
            "dst",
            "gw",
            "mac",
            "sandbox",
            "containerID",
            "ifname",
            "nameservers",
            "nodeName",
            "podCidrs",
            "clusterCidrs",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z]{1,8}",
    ]
}

/// A config object that parses far enough to reach the field checks.
fn config_object() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(SUPPORTED_VERSIONS.to_vec()),
        prop::collection::btree_map(key(), json_value(), 0..8),
    )
        .prop_map(|(version, fields)| {
            let mut obj: serde_json::Map<String, Value> = fields.into_iter().collect();
            obj.insert("cniVersion".into(), version.as_str().into());
            obj.entry("name").or_insert_with(|| "weft".into());
            obj.entry("type").or_insert_with(|| "weft".into());
            Value::Object(obj)
        })
}

fn env_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        prop::sample::select(vec![
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_ARGS",
            "CNI_PATH",
        ])
        .prop_map(str::to_owned),
        "CNI_[A-Z]{0,6}",
    ];
    let value = prop_oneof![
        prop::sample::select(vec![
            "ADD",
            "DEL",
            "CHECK",
            "GC",
            "STATUS",
            "VERSION",
            "eth0",
            "abc",
            "/run/netns/x"
        ])
        .prop_map(str::to_owned),
        ".{0,20}",
        "([A-Za-z_0-9]{0,10}(=[^;]{0,6})?;){0,4}",
    ];
    prop::collection::vec((name, value), 0..8)
}

fn ip_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| IpNet::new(IpAddr::from(a), p).unwrap()),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| IpNet::new(IpAddr::from(a), p).unwrap()),
    ]
}

fn ip_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from)
    ]
}

/// A well-formed result model (interface indices point at interfaces).
fn result_model() -> impl Strategy<Value = CniResult> {
    let interface = (
        "[a-z0-9]{1,15}",
        proptest::option::of(any::<[u8; 6]>().prop_map(MacAddress::from)),
        proptest::option::of("/[a-z/]{1,20}"),
        proptest::option::of(68u32..=65535),
    )
        .prop_map(|(name, mac, sandbox, mtu)| Interface {
            name,
            mac,
            sandbox,
            mtu,
        });
    (
        prop::collection::vec(interface, 0..4),
        prop::collection::vec(
            (
                ip_net(),
                proptest::option::of(ip_addr()),
                any::<prop::sample::Index>(),
                any::<bool>(),
            ),
            0..4,
        ),
        prop::collection::vec((ip_net(), proptest::option::of(ip_addr())), 0..4),
        prop::collection::vec("[0-9.]{1,15}", 0..3),
    )
        .prop_map(|(interfaces, ips, routes, nameservers)| {
            let ips = ips
                .into_iter()
                .map(|(address, gateway, index, linked)| IpConfig {
                    address,
                    gateway,
                    interface: (linked && !interfaces.is_empty())
                        .then(|| index.index(interfaces.len())),
                })
                .collect();
            let routes = routes
                .into_iter()
                .map(|(dst, gw)| Route { dst, gw })
                .collect();
            CniResult {
                interfaces,
                ips,
                routes,
                dns: Dns {
                    nameservers,
                    ..Dns::default()
                },
            }
        })
}

proptest! {
    #[test]
    fn netconf_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = NetConf::parse(&bytes) {
            prop_assert!([1, 6, 7].contains(&e.code), "code {}", e.code);
        }
        let _ = NetConf::peek_version(&bytes);
    }

    #[test]
    fn netconf_survives_json_ish_text(text in r#"[{}\[\]":,0-9a-zA-Z./_ -]{0,200}"#) {
        if let Err(e) = NetConf::parse(text.as_bytes()) {
            prop_assert!([1, 6, 7].contains(&e.code), "code {}", e.code);
        }
    }

    #[test]
    fn netconf_survives_arbitrary_fields(conf in config_object()) {
        let bytes = serde_json::to_vec(&conf).unwrap();
        match NetConf::parse(&bytes) {
            Ok(parsed) => prop_assert_eq!(parsed.cni_version.as_str(), conf["cniVersion"].as_str().unwrap()),
            Err(e) => prop_assert!([1, 6, 7].contains(&e.code), "code {}: {}", e.code, e.msg),
        }
    }

    #[test]
    fn environment_survives_arbitrary_variables(vars in env_pairs()) {
        match Invocation::from_env(vars) {
            Ok(inv) => {
                if let Some(att) = &inv.attachment {
                    prop_assert!(!att.container_id.is_empty() && !att.ifname.is_empty());
                    prop_assert!(att.ifname.len() <= 15);
                }
            }
            Err(e) => prop_assert_eq!(e.code, 4, "{}", e.msg),
        }
    }

    #[test]
    fn cni_args_survive_arbitrary_text(text in ".{0,80}") {
        if let Err(e) = text.parse::<CniArgs>() {
            prop_assert_eq!(e.code, 4);
        }
    }

    #[test]
    fn results_survive_arbitrary_json(value in json_value(), v in prop::sample::select(SUPPORTED_VERSIONS.to_vec())) {
        if let Err(e) = CniResult::from_json(value, v) {
            prop_assert_eq!(e.code, 7);
        }
    }

    #[test]
    fn results_round_trip_through_every_version(model in result_model(), v in prop::sample::select(SUPPORTED_VERSIONS.to_vec())) {
        let parsed = CniResult::from_json(model.to_json(v), v).unwrap();
        let mut expected = model;
        if v != CniVersion::V1_1_0 {
            expected.interfaces.iter_mut().for_each(|i| i.mtu = None);
        }
        prop_assert_eq!(parsed, expected);
    }

    #[test]
    fn mac_addresses_survive_arbitrary_text(text in "[0-9a-fA-F:+ -]{0,40}") {
        if let Ok(mac) = text.parse::<MacAddress>() {
            prop_assert_eq!(mac.to_string().parse::<MacAddress>().unwrap(), mac);
        }
    }

    #[test]
    fn node_file_survives_arbitrary_content(
        content in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..128),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ]
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        std::fs::write(&path, &content).unwrap();
        if let Ok(node) = NodeConfig::load(&path) {
            prop_assert!(!node.pod_cidrs.is_empty() && node.pod_cidrs.len() <= 2);
        }
    }
}
