//! hostPort: `runtimeConfig.portMappings` as nftables NAT, in the table
//! `inet weft-hostport`, which the plugin creates on the first pod with a
//! hostPort and the agent's uninstall deletes.
//!
//! # The table
//! Four maps hold the mappings, one per family and kind of key: `any-v4`
//! (protocol . port, for hostPorts on every local address) and `ip-v4`
//! (address . protocol . port, for a given `hostIP`), and the same for v6.
//! Each value is the pod's address and port. Each map has a `-keys` set with
//! the same keys, which marks connections from this node's own pods.
//! - `prerouting` (traffic from other nodes, the outside and this node's
//!   pods) and `output` (from the node itself) DNAT a packet whose key is in
//!   a map; `output` skips loopback destinations, which the kernel would not
//!   route to a pod.
//! - `postrouting` masquerades marked connections: a pod reaching a hostPort
//!   on its own node (or its own hostPort, hairpin) would otherwise get the
//!   reply routed straight from the target pod, from an address it did not
//!   talk to.
//!   Traffic from elsewhere keeps its source address.
//!
//! One pod's elements are added in one `nft -f` transaction that also
//! declares the whole skeleton (maps and chains are added if missing, the
//! chains' rules replaced), so every ADD repairs the table and no
//! transaction leaves it half-built. Elements are found again by the pod's
//! address: DEL removes those pointing at the pod, GC those pointing at an
//! address no valid attachment holds, and ADD replaces a stale element (its
//! address no longer allocated) instead of failing on it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use super::{CODE_CHECK_FAILED, CODE_HOSTPORT_TAKEN};
use crate::cni::{CniError, ErrorCode, HostIp, PortMapping};
use weft_core::ip::IpFamily;
use weft_core::nft::{self, NftError, HOSTPORT_TABLE};
use weft_core::protocol::Protocol;

/// The packet mark bit for connections to masquerade (bit 13, as the
/// reference portmap plugin uses; kube-proxy uses bits 14 and 15).
const MASQUERADE_MARK: u32 = 0x2000;

/// One element of the maps: a key on the node and the pod address behind it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Entry {
    /// `Any(Some(family))` or `Address(_)`: which map and key shape.
    host_ip: HostIp,
    protocol: Protocol,
    host_port: u16,
    pod_ip: IpAddr,
    container_port: u16,
}

impl Entry {
    fn family(&self) -> IpFamily {
        IpFamily::of_addr(self.pod_ip)
    }

    fn map(&self) -> String {
        let kind = match self.host_ip {
            HostIp::Any(_) => "any",
            HostIp::Address(_) => "ip",
        };
        format!("{kind}-{}", suffix(self.family()))
    }

    fn key(&self) -> String {
        match self.host_ip {
            HostIp::Any(_) => format!("{} . {}", self.protocol, self.host_port),
            HostIp::Address(address) => {
                format!("{address} . {} . {}", self.protocol, self.host_port)
            }
        }
    }

    fn value(&self) -> String {
        format!("{} . {}", self.pod_ip, self.container_port)
    }

    /// The same map and key: only one of the two can exist.
    fn collides_with(&self, other: &Entry) -> bool {
        self.map() == other.map() && self.key() == other.key()
    }

    fn describe(&self) -> String {
        let on = match self.host_ip {
            HostIp::Any(_) => match self.family() {
                IpFamily::V4 => "every IPv4 address".to_owned(),
                IpFamily::V6 => "every IPv6 address".to_owned(),
            },
            HostIp::Address(address) => address.to_string(),
        };
        format!(
            "hostPort {}/{} on {on} → {}:{}",
            self.host_port, self.protocol, self.pod_ip, self.container_port
        )
    }
}

fn suffix(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "v4",
        IpFamily::V6 => "v6",
    }
}

/// The elements `mappings` call for, for a pod with addresses `pod_ips`:
/// a mapping without `hostIP` gets one per pod address family.
pub(super) fn entries(
    mappings: &[PortMapping],
    pod_ips: &[IpAddr],
) -> Result<Vec<Entry>, CniError> {
    let mut entries = Vec::new();
    for (index, mapping) in mappings.iter().enumerate() {
        let before = entries.len();
        for pod_ip in pod_ips {
            let family = IpFamily::of_addr(*pod_ip);
            if !mapping.host_ip.covers(family) {
                continue;
            }
            let host_ip = match mapping.host_ip {
                HostIp::Any(_) => HostIp::Any(Some(family)),
                address => address,
            };
            entries.push(Entry {
                host_ip,
                protocol: mapping.protocol,
                host_port: mapping.host_port,
                pod_ip: *pod_ip,
                container_port: mapping.container_port,
            });
        }
        if entries.len() == before {
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!(
                    "network config field \"runtimeConfig.portMappings[{index}].hostIP\" is of a family the pod has no address in: use an address of the pod's family, or leave it empty"
                ),
            ));
        }
    }
    entries.sort();
    entries.dedup();
    if let Some(pair) = entries
        .windows(2)
        .find(|pair| pair[0].collides_with(&pair[1]))
    {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!(
                "network config field \"runtimeConfig.portMappings\" asks for {} and {}: give each hostPort one target",
                pair[0].describe(),
                pair[1].describe()
            ),
        ));
    }
    Ok(entries)
}

/// The skeleton: maps, key sets and chains added if missing, the chains'
/// rules replaced. `slices` are the node's pod slices (whose connections to
/// a hostPort are masqueraded).
fn render_skeleton(slices: &[IpNet]) -> String {
    let table = HOSTPORT_TABLE;
    let mut out = format!("add table {table}\n");
    for family in [IpFamily::V4, IpFamily::V6] {
        let (v, addr) = (nft::suffix(family), nft::address_type(family));
        let any_key = "inet_proto . inet_service";
        let ip_key = format!("{addr} . inet_proto . inet_service");
        let target = format!("{addr} . inet_service");
        let _ = writeln!(
            out,
            "add map {table} any-{v} {{ type {any_key} : {target}; }}"
        );
        let _ = writeln!(out, "add set {table} any-{v}-keys {{ type {any_key}; }}");
        let _ = writeln!(
            out,
            "add map {table} ip-{v} {{ type {ip_key} : {target}; }}"
        );
        let _ = writeln!(out, "add set {table} ip-{v}-keys {{ type {ip_key}; }}");
    }
    for (chain, hook, priority) in [
        ("prerouting", "prerouting", "dstnat"),
        ("output", "output", "-100"),
        ("postrouting", "postrouting", "srcnat"),
    ] {
        let _ = writeln!(
            out,
            "add chain {table} {chain} {{ type nat hook {hook} priority {priority}; policy accept; }}\nflush chain {table} {chain}"
        );
    }
    for family in [IpFamily::V4, IpFamily::V6] {
        let (v, ip) = (nft::suffix(family), nft::header(family));
        let (nfproto, loopback) = match family {
            IpFamily::V4 => ("ipv4", "127.0.0.0/8"),
            IpFamily::V6 => ("ipv6", "::1"),
        };
        let port = "meta l4proto . th dport";
        for slice in slices.iter().filter(|slice| IpFamily::of(slice) == family) {
            let slice = slice.trunc();
            let mark = format!("meta mark set meta mark | {MASQUERADE_MARK:#x}");
            let _ = writeln!(
                out,
                "add rule {table} prerouting {ip} saddr {slice} {ip} daddr . {port} @ip-{v}-keys {mark}"
            );
            let _ = writeln!(
                out,
                "add rule {table} prerouting {ip} saddr {slice} fib daddr type local {port} @any-{v}-keys {mark}"
            );
        }
        for (chain, local) in [
            ("prerouting", "fib daddr type local".to_owned()),
            (
                "output",
                format!("fib daddr type local {ip} daddr != {loopback}"),
            ),
        ] {
            let _ = writeln!(
                out,
                "add rule {table} {chain} dnat {ip} addr . port to {ip} daddr . {port} map @ip-{v}"
            );
            let _ = writeln!(
                out,
                "add rule {table} {chain} meta nfproto {nfproto} {local} dnat {ip} addr . port to {port} map @any-{v}"
            );
        }
    }
    let _ = writeln!(
        out,
        "add rule {table} postrouting meta mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} masquerade"
    );
    out
}

/// Adds `entries` (map element and key) to a transaction.
fn render_add(out: &mut String, entries: &[&Entry]) {
    for entry in entries {
        let (map, key) = (entry.map(), entry.key());
        let _ = writeln!(
            out,
            "add element {HOSTPORT_TABLE} {map} {{ {key} : {} }}",
            entry.value()
        );
        let _ = writeln!(out, "add element {HOSTPORT_TABLE} {map}-keys {{ {key} }}");
    }
}

/// Deletes `entries` (map element and key) in a transaction.
fn render_delete(out: &mut String, entries: &[&Entry]) {
    for entry in entries {
        let (map, key) = (entry.map(), entry.key());
        let _ = writeln!(out, "delete element {HOSTPORT_TABLE} {map} {{ {key} }}");
        let _ = writeln!(
            out,
            "delete element {HOSTPORT_TABLE} {map}-keys {{ {key} }}"
        );
    }
}

/// The elements of the four maps in `nft -j list table` output.
fn parse_listing(json: &str) -> Result<Vec<Entry>, String> {
    let listing: Value = serde_json::from_str(json).map_err(|error| error.to_string())?;
    let mut entries = Vec::new();
    let objects = listing["nftables"].as_array().cloned().unwrap_or_default();
    for map in objects.iter().filter_map(|object| object.get("map")) {
        let name = map["name"].as_str().unwrap_or_default();
        let any = match name {
            "any-v4" | "any-v6" => true,
            "ip-v4" | "ip-v6" => false,
            _ => continue,
        };
        for pair in map["elem"].as_array().into_iter().flatten() {
            let entry = parse_element(any, pair)
                .ok_or_else(|| format!("unexpected element {pair} in map {name}"))?;
            entries.push(entry);
        }
    }
    Ok(entries)
}

fn parse_element(any: bool, pair: &Value) -> Option<Entry> {
    let key = pair.get(0)?.get("concat")?.as_array()?;
    let value = pair.get(1)?.get("concat")?.as_array()?;
    let port = |value: &Value| value.as_u64().and_then(|port| u16::try_from(port).ok());
    let address = |value: &Value| value.as_str()?.parse::<IpAddr>().ok();
    let pod_ip = address(value.first()?)?;
    let (host_ip, rest) = if any {
        (HostIp::Any(Some(IpFamily::of_addr(pod_ip))), &key[..])
    } else {
        (HostIp::Address(address(key.first()?)?), &key[1..])
    };
    Some(Entry {
        host_ip,
        protocol: Protocol::parse(rest.first()?.as_str()?)?,
        host_port: port(rest.get(1)?)?,
        pod_ip,
        container_port: port(value.get(1)?)?,
    })
}

/// The elements in the kernel now; none when the table does not exist (or
/// nft is not installed, in which case the plugin never made one).
fn current() -> Result<Vec<Entry>, CniError> {
    let listing = match nft::list_table(HOSTPORT_TABLE, true, "list the hostPort table") {
        Ok(Some(listing)) => listing,
        Ok(None) => return Ok(Vec::new()),
        Err(error) if error.is_missing_binary() => return Ok(Vec::new()),
        Err(error) => return Err(nft_error(error)),
    };
    parse_listing(&listing).map_err(|problem| {
        CniError::new(
            super::CODE_KERNEL,
            format!("cannot read table {HOSTPORT_TABLE}: {problem}"),
        )
    })
}

fn nft_error(error: NftError) -> CniError {
    let code = if error.is_missing_binary() {
        ErrorCode::Io.code()
    } else {
        super::CODE_KERNEL
    };
    CniError::new(code, format!("hostPort: {error}"))
}

/// ADD: maps `entries` to the pod. An element with the same key that points
/// at an address `allocated` no longer holds is stale and replaced; one
/// that points at a live pod is a conflict, and nothing changes.
pub(super) fn add(
    entries: &[Entry],
    slices: &[IpNet],
    allocated: &HashSet<IpAddr>,
) -> Result<(), CniError> {
    let existing = current()?;
    let mut stale = Vec::new();
    for entry in entries {
        for other in existing.iter().filter(|other| other.collides_with(entry)) {
            if other == entry || entries.contains(other) {
                continue;
            }
            if allocated.contains(&other.pod_ip)
                && !entries.iter().any(|mine| mine.pod_ip == other.pod_ip)
            {
                return Err(CniError::new(
                    CODE_HOSTPORT_TAKEN,
                    format!(
                        "{} is wanted, but this node already has {}: give one of the pods another hostPort (or hostIP)",
                        entry.describe(),
                        other.describe()
                    ),
                ));
            }
            if !stale.contains(&other) {
                stale.push(other);
            }
        }
    }
    let mut transaction = render_skeleton(slices);
    render_delete(&mut transaction, &stale);
    render_add(&mut transaction, &entries.iter().collect::<Vec<_>>());
    nft::apply(&transaction, "map hostPorts").map_err(nft_error)?;
    tracing::debug!(
        entries = entries.len(),
        replaced = stale.len(),
        "hostPorts mapped"
    );
    Ok(())
}

/// Removes every element that points at an address `keep` rejects; returns
/// how many went. Does nothing (not even run nft) when there is no table.
pub(super) fn remove_where(keep: impl Fn(IpAddr) -> bool) -> Result<usize, CniError> {
    let existing = current()?;
    let gone: Vec<&Entry> = existing
        .iter()
        .filter(|entry| !keep(entry.pod_ip))
        .collect();
    if gone.is_empty() {
        return Ok(0);
    }
    let mut transaction = String::new();
    render_delete(&mut transaction, &gone);
    nft::apply(&transaction, "remove hostPorts").map_err(nft_error)?;
    Ok(gone.len())
}

/// CHECK: every entry is in the kernel as ADD left it.
pub(super) fn check(entries: &[Entry]) -> Result<(), CniError> {
    let existing = current()?;
    match entries.iter().find(|entry| !existing.contains(entry)) {
        None => Ok(()),
        Some(missing) => Err(CniError::new(
            CODE_CHECK_FAILED,
            format!(
                "{} is not in table {HOSTPORT_TABLE}: delete and re-create the pod to repair its hostPorts",
                missing.describe()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(host_port: u16, protocol: Protocol, host_ip: HostIp) -> PortMapping {
        PortMapping {
            host_port,
            container_port: 80,
            protocol,
            host_ip,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_mapping_without_host_ip_covers_each_pod_family() {
        let pod = [ip("10.244.1.5"), ip("fd00:10:244:1::5")];
        let found = entries(&[mapping(8080, Protocol::Tcp, HostIp::Any(None))], &pod).unwrap();
        let maps: Vec<String> = found.iter().map(Entry::map).collect();
        assert_eq!(maps, ["any-v4", "any-v6"]);
        assert_eq!(found[0].key(), "tcp . 8080");
        assert_eq!(found[1].value(), "fd00:10:244:1::5 . 80");

        let v6_only = mapping(53, Protocol::Udp, HostIp::Address(ip("2001:db8::1")));
        let found = entries(&[v6_only], &pod).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].map(), "ip-v6");
        assert_eq!(found[0].key(), "2001:db8::1 . udp . 53");

        let error = entries(&[v6_only], &pod[..1]).unwrap_err();
        assert!(
            error.msg.contains("portMappings[0].hostIP"),
            "{}",
            error.msg
        );

        let first = mapping(8080, Protocol::Tcp, HostIp::Any(None));
        let twice = PortMapping {
            container_port: 81,
            ..first
        };
        let error = entries(&[first, twice], &pod).unwrap_err();
        assert!(
            error.msg.contains("give each hostPort one target"),
            "{}",
            error.msg
        );
    }

    #[test]
    fn the_skeleton_replaces_rules_but_keeps_maps() {
        let text = render_skeleton(&["10.244.1.0/24".parse().unwrap()]);
        assert!(text.starts_with("add table inet weft-hostport\n"));
        assert!(!text.contains("delete table") && !text.contains("flush map"));
        assert_eq!(text.matches("flush chain").count(), 3);
        assert!(text.contains(
            "add rule inet weft-hostport prerouting ip saddr 10.244.1.0/24 fib daddr type local meta l4proto . th dport @any-v4-keys meta mark set meta mark | 0x2000"
        ));
        // No IPv6 slice: no IPv6 mark rule, but the IPv6 maps and DNAT exist.
        assert!(!text.contains("ip6 saddr"));
        assert!(text.contains("dnat ip6 addr . port to meta l4proto . th dport map @any-v6"));
        assert!(text.contains("fib daddr type local ip daddr != 127.0.0.0/8"));
    }

    #[test]
    fn listing_round_trips_the_elements() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"map": {"family": "inet", "name": "any-v4", "table": "weft-hostport",
              "elem": [[{"concat": ["tcp", 8080]}, {"concat": ["10.244.1.5", 80]}]]}},
            {"set": {"family": "inet", "name": "any-v4-keys", "table": "weft-hostport",
              "elem": [{"concat": ["tcp", 8080]}]}},
            {"map": {"family": "inet", "name": "ip-v6", "table": "weft-hostport",
              "elem": [[{"concat": ["2001:db8::1", "udp", 53]}, {"concat": ["fd00::5", 5353]}]]}},
            {"map": {"family": "inet", "name": "ip-v4", "table": "weft-hostport"}}]}"#;
        let found = parse_listing(json).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(
            found[0].describe(),
            "hostPort 8080/tcp on every IPv4 address → 10.244.1.5:80"
        );
        assert_eq!(found[1].key(), "2001:db8::1 . udp . 53");
        assert_eq!(found[1].value(), "fd00::5 . 5353");
        assert!(parse_listing(
            "{\"nftables\": [{\"map\": {\"name\": \"any-v4\", \"elem\": [[1, 2]]}}]}"
        )
        .is_err());
    }

    #[test]
    fn delete_renders_keys_only() {
        let entry = &entries(
            &[mapping(8080, Protocol::Sctp, HostIp::Any(None))],
            &[ip("10.244.1.5")],
        )
        .unwrap()[0];
        let mut out = String::new();
        render_delete(&mut out, &[entry]);
        assert_eq!(
            out,
            "delete element inet weft-hostport any-v4 { sctp . 8080 }\ndelete element inet weft-hostport any-v4-keys { sctp . 8080 }\n"
        );
    }
}
