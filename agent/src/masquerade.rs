//! Pod egress masquerade: the nftables table `inet weft`.
//!
//! Pods keep their own address towards other pods (every node routes the
//! cluster CIDR), but the world outside the cluster cannot route back to pod
//! addresses, so traffic from the cluster CIDR to anywhere else leaves with
//! the node's address. Exceptions: destinations in the no-masquerade list,
//! multicast, and packets kube-proxy already marked for its own masquerade
//! (mark `0x4000/0x4000`), which would otherwise be rewritten twice.
//!
//! The table is applied with the `nft` CLI as one transaction that creates
//! the table if missing, deletes it and recreates it whole: the kernel swaps
//! old for new atomically, so there is never a moment without rules (a flush
//! followed by re-adding would open one).

use ipnet::IpNet;

use weft_core::ip::IpFamily;
use weft_core::nft::{self, NftError};

use crate::nft_watch::TableCheck;

/// The nftables family and name of Weft's table.
pub const TABLE: &str = "inet weft";

/// kube-proxy's masquerade mark (its `--masquerade-bit` default, bit 14).
pub const KUBE_PROXY_MASQUERADE_MARK: u32 = 0x4000;

/// Renders the whole transaction for `nft -f`: create-if-missing, delete,
/// recreate. `cluster_cidrs` holds one IPv4 and optionally one IPv6 CIDR.
pub fn render_ruleset(cluster_cidrs: &[IpNet], no_masquerade: &[IpNet]) -> String {
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
    out.push_str("\t}\n}\n");
    out
}

/// Where multicast lies in `family`: never masqueraded.
fn multicast(family: IpFamily) -> IpNet {
    match family {
        IpFamily::V4 => "224.0.0.0/4".parse().expect("valid literal"),
        IpFamily::V6 => "ff00::/8".parse().expect("valid literal"),
    }
}

/// Keeps the table equal to one rendered ruleset, in the network namespace
/// of the calling thread (child processes inherit it).
#[derive(Debug, Clone)]
pub struct MasqueradeTable {
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
    /// The table for these CIDRs; nothing is applied yet.
    pub fn new(cluster_cidrs: &[IpNet], no_masquerade: &[IpNet]) -> Self {
        MasqueradeTable {
            ruleset: render_ruleset(cluster_cidrs, no_masquerade),
            applied_listing: None,
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
    /// after any change to the table. A second `MasqueradeTable` for the
    /// same settings may do this beside node set-up's: both write the same
    /// ruleset, whose listing is the same whichever wrote it last.
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
        let text = render_ruleset(&nets(&["10.244.0.0/16"]), &[]);
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
}
