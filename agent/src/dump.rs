//! `/status?check=dump`: Weft's part of the node's kernel as it is, for bug
//! reports (`kubectl weft bundle`). Read-only: nothing is planned or
//! compared, and nothing is changed.
//!
//! What is read ([`KernelDump`]), one line per entry in `ip`'s one-line
//! words but formatted here:
//!
//! ```text
//! links       weft.1 vxlan mtu 1450 up lladdr 0a:58:0a:f4:00:00 inet 10.244.0.0/32 vxlan id 1 local 172.31.0.10 dstport 8472 nolearning
//!             veth3f1a9c2b7d0 veth mtu 1450 up lladdr 62:0c:… inet 169.254.1.1/32 alias weft:weft:<container>:eth0
//! routes      10.244.1.0/24 via 10.244.1.0 dev weft.1 proto 87 onlink
//!             unreachable 10.244.0.0/24 proto 87
//!             172.31.0.11/32 via 10.244.1.0 dev weft.1 table 8787 proto 87 onlink
//! rules       from 10.244.0.0/24 fwmark 0x10000000/0x10000000 lookup 8787 pref 87 proto 87
//! neighbours  10.244.1.0 dev weft.1 lladdr 0a:58:0a:f4:01:00 permanent
//! fdb         0a:58:0a:f4:01:00 dev weft.1 dst 172.31.0.11 self permanent
//! ```
//!
//! Weft's links are `weft.1`, the `weft0` bridge when there is one, and
//! the host ends of pod veths (the plugin marks them with an owner alias
//! `weft:…`). Routes are every route of the main table in both families,
//! Weft's (`proto 87`) and the others', since a foreign route is often
//! what holds a peer back, then the return table's. Rules are Weft's
//! (`proto 87`). Neighbours are the permanent entries (the only
//! kind Weft and its plugin make) on Weft's links; FDB entries are those
//! with a remote on `weft.1`. Tables are Weft's nftables tables
//! ([`TABLES`]) as `nft list table` prints them; a table that is not
//! there is left out.
//!
//! Whatever cannot be read is named in `errors` and the rest is still
//! read. Blocking ([`read_kernel_dump`] runs `nft` and a runtime of its
//! own for netlink): call it off the async runtime, from a thread in the
//! agent's network namespace.

use std::collections::BTreeMap;
use std::fmt::Write;

use weft_core::ip::IpFamily;
use weft_core::netlink::{
    Address, FdbRemote, Link, Netlink, PermanentNeighbour, Route, RouteProtocol, RouteScope,
    RouteType, Rule, VxlanAttributes, ROUTE_PROTOCOL,
};
use weft_core::nft::{self, HOSTPORT_TABLE};
use weft_core::status::KernelDump;
use weft_core::DEFAULT_BRIDGE;

use super::dataplane::{RETURN_TABLE, VXLAN_DEVICE};
use super::{guard, masquerade, policy};

/// Weft's nftables tables, as nft spells them: the agent's masquerade,
/// guard and policy tables and the plugin's hostPort table.
pub const TABLES: [&str; 4] = [
    masquerade::TABLE,
    guard::TABLE,
    policy::nft::TABLE,
    HOSTPORT_TABLE,
];

/// How the plugin's owner alias on a pod's host veth starts
/// (`weft:<network>:<container>:<ifname>`).
const POD_VETH_ALIAS: &str = "weft:";

/// Reads Weft's part of the kernel of the calling thread's network
/// namespace (see the module's documentation). Blocking.
pub fn read_kernel_dump() -> KernelDump {
    let mut dump = KernelDump::default();
    // The netlink socket is made on this thread, so in its namespace, and
    // driven by a runtime of its own rather than the agent's workers.
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(read_netlink(&mut dump)),
        Err(error) => dump
            .errors
            .push(format!("starting a runtime for the netlink reads: {error}")),
    }
    read_tables(&mut dump);
    dump
}

/// Fills the links, routes, neighbours and FDB entries of `dump`.
async fn read_netlink(dump: &mut KernelDump) {
    let netlink = match Netlink::current() {
        Ok(netlink) => netlink,
        Err(error) => {
            dump.errors.push(error.to_string());
            return;
        }
    };
    let errors = &mut dump.errors;
    let links = netlink.links().await.unwrap_or_else(|error| {
        errors.push(error.to_string());
        Vec::new()
    });
    let names: BTreeMap<u32, &str> = links
        .iter()
        .map(|link| (link.index, link.name.as_str()))
        .collect();
    let weft: Vec<&Link> = links.iter().filter(|link| is_weft_link(link)).collect();
    let addresses = netlink.addresses(None).await.unwrap_or_else(|error| {
        errors.push(error.to_string());
        Vec::new()
    });
    let vxlan = match netlink.vxlan_by_name(VXLAN_DEVICE).await {
        Ok(found) => found.and_then(|found| found.vxlan),
        Err(error) => {
            errors.push(error.to_string());
            None
        }
    };
    for link in &weft {
        let vxlan = vxlan.as_ref().filter(|_| link.name == VXLAN_DEVICE);
        dump.links.push(link_line(link, &names, &addresses, vxlan));
    }
    for table in [Route::MAIN_TABLE, RETURN_TABLE] {
        for family in [IpFamily::V4, IpFamily::V6] {
            match netlink.routes(family, table).await {
                Ok(routes) => dump
                    .routes
                    .extend(routes.iter().map(|route| route_line(route, &names))),
                Err(error) => errors.push(error.to_string()),
            }
        }
    }
    for family in [IpFamily::V4, IpFamily::V6] {
        match netlink.rules(family).await {
            Ok(rules) => dump.rules.extend(
                rules
                    .iter()
                    .filter(|rule| rule.protocol == RouteProtocol::from(ROUTE_PROTOCOL))
                    .map(rule_line),
            ),
            Err(error) => errors.push(error.to_string()),
        }
    }
    for link in &weft {
        match netlink.permanent_neighbours(link.index).await {
            Ok(found) => dump
                .neighbours
                .extend(found.iter().map(|n| neighbour_line(n, &link.name))),
            Err(error) => errors.push(error.to_string()),
        }
    }
    if let Some(overlay) = weft.iter().find(|link| link.name == VXLAN_DEVICE) {
        match netlink.fdb_remotes(overlay.index).await {
            Ok(found) => dump
                .fdb
                .extend(found.iter().map(|entry| fdb_line(entry, &overlay.name))),
            Err(error) => errors.push(error.to_string()),
        }
    }
}

/// Fills the tables of `dump`.
fn read_tables(dump: &mut KernelDump) {
    for table in TABLES {
        match nft::list_table(
            table,
            false,
            "read a table of Weft's for /status?check=dump",
        ) {
            Ok(Some(listing)) => {
                dump.tables.insert(table.to_owned(), listing);
            }
            Ok(None) => {}
            Err(error) => {
                dump.errors.push(format!("listing {table}: {error}"));
                // Every other table would fail the same way.
                if error.is_missing_binary() {
                    break;
                }
            }
        }
    }
}

/// Whether `link` is one of Weft's: the overlay device, the bridge, or
/// the host end of a pod's veth.
fn is_weft_link(link: &Link) -> bool {
    link.name == VXLAN_DEVICE
        || link.name == DEFAULT_BRIDGE
        || link
            .alias
            .as_deref()
            .is_some_and(|alias| alias.starts_with(POD_VETH_ALIAS))
}

/// `name kind mtu N up|down [master M] lladdr MAC [inet A]… [alias …]`,
/// with the VXLAN settings of the overlay device.
fn link_line(
    link: &Link,
    names: &BTreeMap<u32, &str>,
    addresses: &[Address],
    vxlan: Option<&VxlanAttributes>,
) -> String {
    let kind = link.kind.as_deref().unwrap_or("device");
    let state = if link.up { "up" } else { "down" };
    let mut line = format!("{} {kind} mtu {} {state}", link.name, link.mtu);
    if let Some(master) = link.controller {
        let _ = write!(line, " master {}", device_name(master, names));
    }
    if link.mac.is_some() {
        let _ = write!(line, " lladdr {}", link.mac_text());
    }
    for address in addresses.iter().filter(|a| a.link_index == link.index) {
        let family = match address.address {
            ipnet::IpNet::V4(_) => "inet",
            ipnet::IpNet::V6(_) => "inet6",
        };
        let _ = write!(line, " {family} {}", address.address);
    }
    if let Some(vxlan) = vxlan {
        line.push_str(" vxlan");
        if let Some(vni) = vxlan.vni {
            let _ = write!(line, " id {vni}");
        }
        if let Some(local) = vxlan.local {
            let _ = write!(line, " local {local}");
        }
        if let Some(port) = vxlan.port {
            let _ = write!(line, " dstport {port}");
        }
        if let Some(learning) = vxlan.learning {
            line.push_str(if learning { " learning" } else { " nolearning" });
        }
    }
    if let Some(alias) = &link.alias {
        let _ = write!(line, " alias {alias}");
    }
    line
}

/// `[type ]destination [via G] [dev D] [table T] proto P [scope S]
/// [onlink]`; the type only when not unicast, the table only when not
/// `main`, the protocol by number when it has no name (Weft's is 87).
fn route_line(route: &Route, names: &BTreeMap<u32, &str>) -> String {
    let mut line = String::new();
    if route.kind != RouteType::Unicast {
        let kind = format!("{:?}", route.kind).to_lowercase();
        let _ = write!(line, "{kind} ");
    }
    let _ = write!(line, "{}", route.destination);
    if let Some(gateway) = route.gateway {
        let _ = write!(line, " via {gateway}");
    }
    if let Some(device) = route.output_interface {
        let _ = write!(line, " dev {}", device_name(device, names));
    }
    if route.table != Route::MAIN_TABLE {
        let _ = write!(line, " table {}", route.table);
    }
    let _ = write!(line, " proto {}", protocol_word(route.protocol));
    if route.scope != RouteScope::Universe {
        let _ = write!(line, " scope {}", route.scope);
    }
    if route.onlink {
        line.push_str(" onlink");
    }
    line
}

/// The protocol as `ip` words it: by name, by number when it has none.
fn protocol_word(protocol: RouteProtocol) -> String {
    match protocol {
        RouteProtocol::Other(number) => number.to_string(),
        named => named.to_string(),
    }
}

/// `[from S] [fwmark V/M] lookup T pref P proto P`.
fn rule_line(rule: &Rule) -> String {
    let mut line = String::new();
    if let Some(source) = rule.source {
        let _ = write!(line, "from {source} ");
    }
    if let Some(mark) = rule.mark {
        let _ = write!(line, "fwmark {:#x}/{:#x} ", mark.value, mark.mask);
    }
    let _ = write!(
        line,
        "lookup {} pref {} proto {}",
        rule.table,
        rule.priority,
        protocol_word(rule.protocol)
    );
    line
}

/// `ip dev D lladdr MAC permanent`.
fn neighbour_line(neighbour: &PermanentNeighbour, device: &str) -> String {
    format!(
        "{} dev {device} lladdr {} permanent",
        neighbour.ip,
        mac_text(&neighbour.mac)
    )
}

/// `MAC dev D dst REMOTE self permanent`, as `bridge fdb` shows it.
fn fdb_line(entry: &FdbRemote, device: &str) -> String {
    format!(
        "{} dev {device} dst {} self permanent",
        mac_text(&entry.mac),
        entry.remote
    )
}

/// A link's name, or `#index` for a link the listing did not have (gone
/// in between, or the listing failed).
fn device_name(index: u32, names: &BTreeMap<u32, &str>) -> String {
    names
        .get(&index)
        .map_or_else(|| format!("#{index}"), |name| (*name).to_owned())
}

fn mac_text(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: Option<&str>, alias: Option<&str>) -> Link {
        Link {
            index,
            name: name.into(),
            kind: kind.map(Into::into),
            mtu: 1450,
            up: true,
            mac: Some(vec![0x0a, 0x58, 0x0a, 0xf4, 0, 0]),
            controller: None,
            alias: alias.map(Into::into),
            peer_index: None,
        }
    }

    fn names() -> BTreeMap<u32, &'static str> {
        BTreeMap::from([(2, "eth0"), (5, "weft.1")])
    }

    #[test]
    fn only_weft_links_are_dumped() {
        assert!(is_weft_link(&link(5, "weft.1", Some("vxlan"), None)));
        assert!(is_weft_link(&link(6, "weft0", Some("bridge"), None)));
        let pod = link(
            7,
            "veth3f1a9c2b7d0",
            Some("veth"),
            Some("weft:weft:abc:eth0"),
        );
        assert!(is_weft_link(&pod));
        assert!(!is_weft_link(&link(2, "eth0", None, None)));
        assert!(!is_weft_link(&link(
            8,
            "veth0",
            Some("veth"),
            Some("podman")
        )));
    }

    #[test]
    fn a_link_line_names_kind_state_addresses_and_vxlan_settings() {
        let overlay = link(5, "weft.1", Some("vxlan"), None);
        let addresses = [
            Address {
                link_index: 5,
                address: "10.244.0.0/32".parse().unwrap(),
            },
            Address {
                link_index: 2,
                address: "172.31.0.10/24".parse().unwrap(),
            },
        ];
        let vxlan = VxlanAttributes {
            vni: Some(1),
            port: Some(8472),
            local: Some("172.31.0.10".parse().unwrap()),
            underlay_index: Some(2),
            learning: Some(false),
        };
        assert_eq!(
            link_line(&overlay, &names(), &addresses, Some(&vxlan)),
            "weft.1 vxlan mtu 1450 up lladdr 0a:58:0a:f4:00:00 inet 10.244.0.0/32 vxlan id 1 local 172.31.0.10 dstport 8472 nolearning"
        );
        let mut port = link(
            9,
            "veth3f1a9c2b7d0",
            Some("veth"),
            Some("weft:weft:abc:eth0"),
        );
        port.up = false;
        port.controller = Some(42);
        assert_eq!(
            link_line(&port, &names(), &[], None),
            "veth3f1a9c2b7d0 veth mtu 1450 down master #42 lladdr 0a:58:0a:f4:00:00 alias weft:weft:abc:eth0"
        );
    }

    #[test]
    fn route_lines_read_like_ip_route() {
        let mut overlay = Route::new("10.244.1.0/24".parse().unwrap());
        overlay.gateway = Some("10.244.1.0".parse().unwrap());
        overlay.output_interface = Some(5);
        overlay.protocol = RouteProtocol::Other(87);
        overlay.onlink = true;
        assert_eq!(
            route_line(&overlay, &names()),
            "10.244.1.0/24 via 10.244.1.0 dev weft.1 proto 87 onlink"
        );
        let mut own = Route::new("10.244.0.0/24".parse().unwrap());
        own.kind = RouteType::Unreachable;
        own.protocol = RouteProtocol::Other(87);
        assert_eq!(
            route_line(&own, &names()),
            "unreachable 10.244.0.0/24 proto 87"
        );
        let mut connected = Route::new("172.31.0.0/24".parse().unwrap());
        connected.output_interface = Some(2);
        connected.protocol = RouteProtocol::Kernel;
        connected.scope = RouteScope::Link;
        assert_eq!(
            route_line(&connected, &names()),
            "172.31.0.0/24 dev eth0 proto kernel scope link"
        );
        let mut back = Route::new("172.31.0.11/32".parse().unwrap());
        back.gateway = Some("10.244.1.0".parse().unwrap());
        back.output_interface = Some(5);
        back.table = RETURN_TABLE;
        back.protocol = RouteProtocol::Other(87);
        back.onlink = true;
        assert_eq!(
            route_line(&back, &names()),
            "172.31.0.11/32 via 10.244.1.0 dev weft.1 table 8787 proto 87 onlink"
        );
    }

    #[test]
    fn a_rule_line_reads_like_ip_rule() {
        let rule = crate::dataplane::return_rule("10.244.0.0/24".parse().unwrap());
        assert_eq!(
            rule_line(&rule),
            "from 10.244.0.0/24 fwmark 0x10000000/0x10000000 lookup 8787 pref 87 proto 87"
        );
    }

    #[test]
    fn neighbour_and_fdb_lines_name_the_device() {
        let mac = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x00];
        let neighbour = PermanentNeighbour {
            link_index: 5,
            ip: "10.244.1.0".parse().unwrap(),
            mac,
        };
        assert_eq!(
            neighbour_line(&neighbour, "weft.1"),
            "10.244.1.0 dev weft.1 lladdr 0a:58:0a:f4:01:00 permanent"
        );
        let entry = FdbRemote {
            link_index: 5,
            mac,
            remote: "172.31.0.11".parse().unwrap(),
        };
        assert_eq!(
            fdb_line(&entry, "weft.1"),
            "0a:58:0a:f4:01:00 dev weft.1 dst 172.31.0.11 self permanent"
        );
    }
}
