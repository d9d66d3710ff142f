//! The node file's pod slices, screened before anything is changed.
//!
//! Every address of a slice gets a route to a pod on this node, so a slice
//! that is no place for pods (all of the address space, loopback,
//! link-local, multicast, the unspecified address), or that overlaps the
//! node's own network, would send the node's traffic, or traffic no node
//! may forward, into pods. The agent writes the slices from the Node's
//! annotations; a bad one means a bad cluster CIDR or a tampered Node, and
//! the plugin refuses it rather than wire anything.

use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::host_veth::HostVeth;
use super::{kernel_error, LOOPBACK_INDEX};
use crate::cni::{CniError, ErrorCode};
use weft_core::netlink::{Link, Netlink, NetlinkError};
use weft_core::nodefile::NodeConfig;
use weft_core::DEFAULT_BRIDGE;

/// Address ranges no slice may overlap, and what they are.
const RESERVED: [(&str, &str); 8] = [
    ("0.0.0.0/32", "the unspecified address"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// Where a cluster's slices come from, which is where a bad one is fixed.
const FIX: &str = "weft-agent writes podCidrs from the slice weft-controller gave this Node; set a --cluster-cidr (on weft-controller and weft-agent) that avoids it, and the node file is rewritten";

/// A node file slice the plugin refuses, or the failure to find out.
#[derive(Debug, thiserror::Error)]
pub(super) enum SliceError {
    /// The slice overlaps a range no pod may have.
    #[error("node file {} field \"podCidrs\" holds {slice}, which {problem}: no pod can use it; {FIX}", path.display())]
    Unusable {
        /// The node file.
        path: PathBuf,
        /// The slice.
        slice: IpNet,
        /// What it overlaps.
        problem: String,
    },
    /// The slice overlaps an address of the node's own network.
    #[error("node file {} field \"podCidrs\" holds {slice}, which overlaps {address} on {link}, the node's own network: pod routes would take the node's neighbours away; {FIX}", path.display())]
    Underlay {
        /// The node file.
        path: PathBuf,
        /// The slice.
        slice: IpNet,
        /// The node's address, with its prefix length.
        address: IpNet,
        /// The interface holding it.
        link: String,
    },
    /// The node's addresses could not be read.
    #[error(transparent)]
    Kernel(#[from] NetlinkError),
}

impl SliceError {
    /// As a CNI error of `code`; a kernel failure keeps its own code.
    pub(super) fn into_cni(self, code: impl Into<u32>) -> CniError {
        match self {
            SliceError::Kernel(error) => kernel_error(error),
            refused => CniError::new(code.into(), refused.to_string()),
        }
    }
}

impl From<SliceError> for CniError {
    /// The verbs that wire pods refuse a bad slice as a bad network config.
    fn from(error: SliceError) -> Self {
        error.into_cni(ErrorCode::InvalidNetworkConfig)
    }
}

/// Refuses a node file with a slice [`unusable`] for pods. Pure, so it runs
/// before any socket is opened.
pub(super) fn check_usable(node: &NodeConfig, node_file: &Path) -> Result<(), SliceError> {
    for slice in &node.pod_cidrs {
        if let Some(problem) = unusable(slice) {
            return Err(SliceError::Unusable {
                path: node_file.to_owned(),
                slice: *slice,
                problem,
            });
        }
    }
    Ok(())
}

/// Refuses a node file with a slice that overlaps an address (and so the
/// connected network) of the node's own interfaces. One address dump; the
/// link of an overlapping address is looked up to tell Weft's own devices
/// apart, which only happens when something overlaps.
pub(super) async fn check_underlay(
    node_nl: &Netlink,
    node: &NodeConfig,
    node_file: &Path,
) -> Result<(), SliceError> {
    let addresses = node_nl.addresses(None).await?;
    for address in &addresses {
        let Some(slice) = node
            .pod_cidrs
            .iter()
            .find(|slice| overlaps(slice, &address.address))
        else {
            continue;
        };
        let Some(link) = node_nl.link_by_index(address.link_index).await? else {
            // Gone since the dump: its addresses went with it.
            continue;
        };
        if is_underlay(&link) {
            return Err(SliceError::Underlay {
                path: node_file.to_owned(),
                slice: *slice,
                address: address.address,
                link: link.name,
            });
        }
    }
    Ok(())
}

/// Why no pod may have an address in `slice`, if none may.
fn unusable(slice: &IpNet) -> Option<String> {
    if slice.prefix_len() == 0 {
        return Some("is /0, every address there is".to_owned());
    }
    RESERVED.iter().find_map(|(range, what)| {
        let range: IpNet = range.parse().expect("the reserved ranges are valid CIDRs");
        overlaps(slice, &range).then(|| format!("overlaps {range}, {what}"))
    })
}

/// Whether two networks share an address (never across families).
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether the addresses on `link` are the node's own network: every
/// interface's but loopback's and Weft's own devices': a pod's host veth,
/// a tunnel device (the VXLAN device carries the slice's network address
/// as its VTEP address, and a tunnel rides on the underlay, never is it)
/// and the bridge `weft0` that nodes attached by the bridge design keep
/// with the slice's first host until their last bridged pod is gone.
fn is_underlay(link: &Link) -> bool {
    link.index != LOOPBACK_INDEX
        && !HostVeth::is_weft_alias(link.alias.as_deref())
        && link.kind.as_deref() != Some("vxlan")
        && link.name != DEFAULT_BRIDGE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn node(slices: &[&str]) -> NodeConfig {
        NodeConfig {
            node_name: "n".into(),
            pod_cidrs: slices.iter().map(|slice| net(slice)).collect(),
            cluster_cidrs: vec![],
            mtu: 1450,
        }
    }

    #[test]
    fn special_ranges_are_refused_naming_the_field_and_the_fix() {
        for (slice, problem) in [
            ("0.0.0.0/0", "every address"),
            ("::/0", "every address"),
            ("0.0.0.0/24", "unspecified"),
            ("::/64", "unspecified"),
            ("127.0.0.0/24", "loopback"),
            ("::1/128", "loopback"),
            ("169.254.1.0/24", "link-local"),
            ("169.0.0.0/8", "link-local"),
            ("fe80::/64", "link-local"),
            ("224.0.1.0/24", "multicast"),
            ("ff02::/64", "multicast"),
        ] {
            let error = check_usable(&node(&["10.244.1.0/24", slice]), Path::new("/run/n.json"))
                .unwrap_err();
            let message = CniError::from(error);
            assert_eq!(message.code, 7, "{slice}");
            for part in [
                "node file /run/n.json field \"podCidrs\"",
                slice,
                problem,
                "--cluster-cidr",
            ] {
                assert!(message.msg.contains(part), "{slice}: {}", message.msg);
            }
        }
    }

    #[test]
    fn ordinary_slices_pass() {
        let ordinary = node(&["10.244.1.0/24", "fd00:10:244:1::/64", "100.64.0.0/24"]);
        assert!(check_usable(&ordinary, Path::new("/n")).is_ok());
    }

    #[test]
    fn only_the_nodes_own_interfaces_count_as_underlay() {
        let link = |index: u32, name: &str, kind: Option<&str>, alias: Option<&str>| Link {
            index,
            name: name.into(),
            kind: kind.map(Into::into),
            mtu: 1500,
            up: true,
            mac: None,
            controller: None,
            alias: alias.map(Into::into),
            peer_index: None,
        };
        assert!(is_underlay(&link(2, "eth0", None, None)));
        assert!(is_underlay(&link(3, "eth1", Some("veth"), None)));
        assert!(is_underlay(&link(4, "br0", Some("bridge"), None)));
        assert!(!is_underlay(&link(LOOPBACK_INDEX, "lo", None, None)));
        assert!(!is_underlay(&link(5, "weft.1", Some("vxlan"), None)));
        assert!(!is_underlay(&link(6, DEFAULT_BRIDGE, Some("bridge"), None)));
        assert!(!is_underlay(&link(
            7,
            "veth0123456789a",
            Some("veth"),
            Some("weft:weft:c1:eth0")
        )));
    }

    #[test]
    fn overlap_is_either_way_and_per_family() {
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.244.1.0/24")));
        assert!(overlaps(&net("10.244.1.0/24"), &net("10.0.0.0/8")));
        assert!(overlaps(&net("10.244.1.0/24"), &net("10.244.1.7/32")));
        assert!(!overlaps(&net("10.244.1.0/24"), &net("10.244.2.0/24")));
        assert!(!overlaps(&net("0.0.0.0/8"), &net("::/8")));
    }
}
