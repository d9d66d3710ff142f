//! Pod egress masquerade: the nftables table `inet weft`.
//!
//! Pods keep their own address towards other pods (every node routes the
//! cluster CIDR), but the world outside the cluster cannot route back to pod
//! addresses, so traffic from the cluster CIDR to anywhere else leaves with
//! the node's address. Exceptions: destinations in the no-masquerade list,
//! multicast, and packets kube-proxy already marked for its own masquerade
//! (mark `0x4000/0x4000`), which would otherwise be rewritten twice.
//!
//! On nodes with the VXLAN device the table also carries the node's own
//! traffic into the tunnel ([`HostTraffic`], docs/host-traffic.md): a NAT
//! chain one step before kube-proxy's gives that traffic the node's
//! underlay address, and a `return-path` chain marks the replies to
//! connections that came in through the tunnel from a node address, which
//! a policy-routing rule sends back the way they came.
//!
//! The table is applied with the `nft` CLI as one transaction that creates
//! the table if missing, deletes it and recreates it whole: the kernel swaps
//! old for new atomically, so there is never a moment without rules (a flush
//! followed by re-adding would open one).

use std::net::IpAddr;

use ipnet::IpNet;

use weft_core::ip::IpFamily;
use weft_core::nft::{self, NftError};

use crate::dataplane::VXLAN_DEVICE;
use crate::nft_watch::TableCheck;

/// The nftables family and name of Weft's table.
pub const TABLE: &str = "inet weft";

/// kube-proxy's masquerade mark (its `--masquerade-bit` default, bit 14).
/// kube-proxy also uses `0x8000` (drop), and the plugin's hostPort table
/// `0x2000` (its own masquerade).
pub const KUBE_PROXY_MASQUERADE_MARK: u32 = 0x4000;

/// Weft's mark of the packets of connections that came in through the
/// tunnel from a node address (bit 28, clear of kube-proxy's and the
/// plugin's): on the connection (`ct mark`) and on each of its packets that
/// must be routed back through the tunnel (`meta mark`), where the return
/// rule ([`crate::dataplane::RETURN_RULE_PRIORITY`]) matches it.
pub const HOST_RETURN_MARK: u32 = 0x1000_0000;

/// What the table does for the node's own traffic into the tunnel: only on
/// nodes with the VXLAN device (see docs/host-traffic.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTraffic {
    /// The family of the node addresses peers publish (the underlay's):
    /// traffic from a peer's node address comes in through the tunnel only
    /// in that family, so only its replies are marked.
    pub family: IpFamily,
    /// The address the node's own traffic into the tunnel is given: the
    /// underlay address when it is the published public IP, which peers
    /// accept as this node's and route replies to. `None` (a public-IP
    /// overwrite) leaves that traffic with the tunnel device's address.
    pub snat: Option<IpAddr>,
}

/// Renders the whole transaction for `nft -f`: create-if-missing, delete,
/// recreate. `cluster_cidrs` holds one IPv4 and optionally one IPv6 CIDR;
/// `host` adds the chains of [`HostTraffic`].
pub fn render_ruleset(
    cluster_cidrs: &[IpNet],
    no_masquerade: &[IpNet],
    host: Option<&HostTraffic>,
) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n"
    ));
    out.push_str(
        "\tcomment \"Weft pod egress masquerade, owned by weft-agent: replaced as a whole\"\n",
    );
    let mut rules = Vec::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let Some(cluster) = cluster_cidrs.iter().find(|c| IpFamily::of(c) == family) else {
            continue;
        };
        // The set always holds the cluster CIDR (pod-to-pod is never
        // masqueraded) and multicast; auto-merge lets user entries overlap.
        let mut exempt = vec![*cluster, multicast(family)];
        exempt.extend(no_masquerade.iter().filter(|c| IpFamily::of(c) == family));
        let elements: Vec<String> = exempt.iter().map(|c| c.trunc().to_string()).collect();
        out.push_str(&format!(
            "\tset no-masquerade-{v} {{\n\t\ttype {t}\n\t\tflags interval\n\t\tauto-merge\n\t\telements = {{ {e} }}\n\t}}\n",
            v = nft::suffix(family),
            t = nft::address_type(family),
            e = elements.join(", "),
        ));
        rules.push(format!(
            "\t\t{p} saddr {cluster} {p} daddr != @no-masquerade-{v} masquerade random,fully-random\n",
            p = nft::header(family),
            cluster = cluster.trunc(),
            v = nft::suffix(family),
        ));
    }
    out.push_str(
        "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n",
    );
    out.push_str(&format!(
        "\t\tmeta mark & {KUBE_PROXY_MASQUERADE_MARK:#010x} == {KUBE_PROXY_MASQUERADE_MARK:#010x} return comment \"kube-proxy masquerades these itself\"\n"
    ));
    for rule in rules {
        out.push_str(&rule);
    }
    out.push_str("\t}\n");
    if let Some(host) = host {
        render_host_traffic(&mut out, cluster_cidrs, host);
    }
    out.push_str("}\n");
    out
}

/// The chains of [`HostTraffic`].
fn render_host_traffic(out: &mut String, cluster_cidrs: &[IpNet], host: &HostTraffic) {
    let p = nft::header(host.family);
    if let Some(address) = host.snat {
        // One priority step before kube-proxy's masquerade: the first NAT
        // chain that binds a connection's source wins, so the connections
        // kube-proxy marked for masquerade get the node address too.
        out.push_str(&format!(
            "\tchain host-snat {{\n\t\ttype nat hook postrouting priority srcnat - 1; policy accept;\n\t\toifname \"{VXLAN_DEVICE}\" fib saddr type local snat {p} to {address} comment \"the node's own traffic into the tunnel leaves as the node\"\n\t}}\n"
        ));
    }
    let mark = format!("{HOST_RETURN_MARK:#010x}");
    let marked = format!("ct mark & {mark} == {mark} meta mark set meta mark | {mark}");
    out.push_str(
        "\tchain return-path {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n",
    );
    if let Some(cluster) = cluster_cidrs
        .iter()
        .find(|c| IpFamily::of(c) == host.family)
    {
        out.push_str(&format!(
            "\t\tiifname \"{VXLAN_DEVICE}\" {p} saddr != {cluster} ct state new ct mark set ct mark | {mark} comment \"a node's own connection through the tunnel\"\n",
            cluster = cluster.trunc(),
        ));
    }
    // Marked on the way in too: with src_valid_mark on the device, the
    // reverse-path check meets the return rule and finds the tunnel.
    out.push_str(&format!("\t\tiifname \"{VXLAN_DEVICE}\" {marked}\n"));
    out.push_str(&format!(
        "\t\tiifname \"{POD_VETHS}\" ct direction reply {marked} comment \"a pod's reply goes back through the tunnel\"\n\t}}\n"
    ));
    // The node's own replies (to its VTEP address) are routed on output;
    // a route chain routes them again once marked.
    out.push_str(&format!(
        "\tchain return-path-local {{\n\t\ttype route hook output priority mangle; policy accept;\n\t\tct direction reply {marked}\n\t}}\n"
    ));
}

/// Where multicast lies in `family`: never masqueraded.
fn multicast(family: IpFamily) -> IpNet {
    match family {
        IpFamily::V4 => "224.0.0.0/4".parse().expect("valid literal"),
        IpFamily::V6 => "ff00::/8".parse().expect("valid literal"),
    }
}

/// The host ends of pod veths, as the plugin names them (shared with the
/// guard table).
pub(crate) const POD_VETHS: &str = "veth*";

/// Keeps the table equal to one rendered ruleset, in the network namespace
/// of the calling thread (child processes inherit it).
#[derive(Debug, Clone)]
pub struct MasqueradeTable {
    cluster_cidrs: Vec<IpNet>,
    no_masquerade: Vec<IpNet>,
    ruleset: String,
    /// `nft list table` right after the last apply: the kernel's own
    /// rendering of our rules, compared on resync to detect drift.
    applied_listing: Option<String>,
}

/// What [`MasqueradeTable::ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableChange {
    /// The table already matched.
    Unchanged,
    /// The table was missing or different and has been replaced.
    Replaced,
}

impl MasqueradeTable {
    /// The table for these CIDRs and `host` traffic; nothing is applied
    /// yet.
    pub fn new(
        cluster_cidrs: &[IpNet],
        no_masquerade: &[IpNet],
        host: Option<&HostTraffic>,
    ) -> Self {
        MasqueradeTable {
            cluster_cidrs: cluster_cidrs.to_vec(),
            no_masquerade: no_masquerade.to_vec(),
            ruleset: render_ruleset(cluster_cidrs, no_masquerade, host),
            applied_listing: None,
        }
    }

    /// Renders the table again for `host` traffic; the next
    /// [`Self::ensure`] applies it.
    pub fn set_host_traffic(&mut self, host: Option<&HostTraffic>) {
        let ruleset = render_ruleset(&self.cluster_cidrs, &self.no_masquerade, host);
        if ruleset != self.ruleset {
            self.ruleset = ruleset;
            // The kernel's table is the old ruleset's even where its
            // listing matches the last apply: write it whatever it holds.
            self.applied_listing = None;
        }
    }

    /// The rendered transaction.
    pub fn ruleset(&self) -> &str {
        &self.ruleset
    }

    /// Applies the ruleset unless the kernel's table is exactly what the last
    /// apply left (a missing, edited or foreign table is replaced).
    /// Blocking: runs `nft`.
    pub fn ensure(&mut self) -> Result<TableChange, NftError> {
        // Any failure to list (typically: no such table) means "not ours".
        let current = list_table().ok().flatten();
        if current.is_some() && current == self.applied_listing {
            return Ok(TableChange::Unchanged);
        }
        nft::apply(&self.ruleset, "replace table inet weft")?;
        self.applied_listing = list_table()?;
        Ok(TableChange::Replaced)
    }

    /// [`Self::ensure`] as the table watch ([`crate::nft_watch`]) calls it
    /// after any change to the table, on the same table node set-up
    /// renders for its host traffic.
    pub fn restore_if_changed(&mut self) -> Result<TableCheck, NftError> {
        Ok(match self.ensure()? {
            TableChange::Unchanged => TableCheck::Intact,
            TableChange::Replaced => TableCheck::Restored,
        })
    }
}

/// The kernel's current `inet weft` table as `nft list table` prints it,
/// `None` when there is none.
pub fn list_table() -> Result<Option<String>, NftError> {
    nft::list_table(TABLE, false, "list table inet weft")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn transaction_creates_deletes_then_recreates() {
        let text = render_ruleset(&nets(&["10.244.0.0/16"]), &[], None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "table inet weft");
        assert_eq!(lines[1], "delete table inet weft");
        assert_eq!(lines[2], "table inet weft {");
        assert!(!text.contains("flush"));
    }

    #[test]
    fn ipv4_only_masquerades_cluster_sources_leaving_the_cluster() {
        let text = render_ruleset(
            &nets(&["10.244.0.0/16"]),
            &nets(&["192.168.0.0/16", "fd00::/8"]),
            None,
        );
        assert!(
            text.contains("elements = { 10.244.0.0/16, 224.0.0.0/4, 192.168.0.0/16 }"),
            "{text}"
        );
        assert!(text.contains(
            "ip saddr 10.244.0.0/16 ip daddr != @no-masquerade-v4 masquerade random,fully-random"
        ));
        assert!(text.contains("meta mark & 0x00004000 == 0x00004000 return"));
        // An IPv6 no-masquerade entry without an IPv6 cluster CIDR is moot.
        assert!(!text.contains("ip6"), "{text}");
        // The kube-proxy exemption comes before any masquerade rule.
        assert!(text.find("meta mark").unwrap() < text.find("masquerade random").unwrap());
    }

    #[test]
    fn dual_stack_gets_a_set_and_rule_per_family() {
        let text = render_ruleset(
            &nets(&["10.244.0.0/16", "fd00:10:244::/56"]),
            &nets(&["2001:db8::/32"]),
            None,
        );
        assert!(text.contains("set no-masquerade-v6"));
        assert!(
            text.contains("elements = { fd00:10:244::/56, ff00::/8, 2001:db8::/32 }"),
            "{text}"
        );
        assert!(text.contains(
            "ip6 saddr fd00:10:244::/56 ip6 daddr != @no-masquerade-v6 masquerade random,fully-random"
        ));
    }

    #[test]
    fn without_host_traffic_there_is_no_snat_and_no_return_path() {
        let text = render_ruleset(&nets(&["10.244.0.0/16"]), &[], None);
        assert!(!text.contains("host-snat"), "{text}");
        assert!(!text.contains("return-path"), "{text}");
        assert!(!text.contains("0x10000000"), "{text}");
    }

    #[test]
    fn host_traffic_into_the_tunnel_is_snatted_before_kube_proxy_and_replies_marked() {
        let host = HostTraffic {
            family: IpFamily::V4,
            snat: Some("172.31.0.10".parse().unwrap()),
        };
        let text = render_ruleset(
            &nets(&["10.244.0.0/16", "fd00:10:244::/56"]),
            &[],
            Some(&host),
        );
        assert!(
            text.contains("type nat hook postrouting priority srcnat - 1; policy accept;"),
            "{text}"
        );
        assert!(
            text.contains("oifname \"weft.1\" fib saddr type local snat ip to 172.31.0.10"),
            "{text}"
        );
        assert!(
            text.contains("iifname \"weft.1\" ip saddr != 10.244.0.0/16 ct state new ct mark set ct mark | 0x10000000"),
            "{text}"
        );
        assert!(text.contains(
            "iifname \"weft.1\" ct mark & 0x10000000 == 0x10000000 meta mark set meta mark | 0x10000000"
        ));
        assert!(text.contains(
            "iifname \"veth*\" ct direction reply ct mark & 0x10000000 == 0x10000000 meta mark set meta mark | 0x10000000"
        ));
        assert!(text.contains("type route hook output priority mangle"));
        // Only the published family's node addresses come through the
        // tunnel: nothing of IPv6 is marked.
        assert!(
            !text.contains("ip6 saddr != fd00:10:244::/56 ct state new"),
            "{text}"
        );
        // The mark clears kube-proxy's and the plugin's.
        for other in [KUBE_PROXY_MASQUERADE_MARK, 0x8000, 0x2000] {
            assert_eq!(HOST_RETURN_MARK & other, 0);
        }
    }

    #[test]
    fn a_public_ip_overwrite_keeps_the_return_path_without_snat() {
        let host = HostTraffic {
            family: IpFamily::V6,
            snat: None,
        };
        let text = render_ruleset(&nets(&["fd00:10:244::/56"]), &[], Some(&host));
        assert!(!text.contains("host-snat"), "{text}");
        assert!(
            text.contains("iifname \"weft.1\" ip6 saddr != fd00:10:244::/56 ct state new"),
            "{text}"
        );
        let mut table = MasqueradeTable::new(&nets(&["fd00:10:244::/56"]), &[], None);
        assert!(!table.ruleset().contains("return-path"));
        table.set_host_traffic(Some(&host));
        assert_eq!(table.ruleset(), text);
    }
}
