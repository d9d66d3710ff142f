//! The gateway addresses on the node bridge: the current gateways are
//! added, and a gateway of an earlier slice is removed, so a node whose
//! slice changed does not keep answering for addresses it no longer owns.
//!
//! One address dump of the bridge decides both; in the steady state it is
//! the only request, where adding every gateway blindly would cost one
//! request per family.

use ipnet::IpNet;

use super::kernel_error;
use crate::cni::CniError;
use weft_core::ip::IpFamily;
use weft_core::netlink::Netlink;

/// What the bridge's addresses need to hold exactly the current gateways.
#[derive(Debug, Default, PartialEq, Eq)]
struct GatewayChange {
    /// Current gateways the bridge lacks.
    add: Vec<IpNet>,
    /// Gateways of earlier slices.
    remove: Vec<IpNet>,
}

impl GatewayChange {
    /// Compares the bridge's `present` addresses with the `gateways` wanted
    /// now, given the node's current `slices`.
    ///
    /// An address is an earlier slice's gateway when the network has a
    /// gateway of its family, it is not an IPv6 link-local address (the
    /// kernel's), and it lies outside the current slice or is a current
    /// gateway with another prefix length (the slice resized in place).
    /// Other addresses inside the slice stay: another network may share the
    /// bridge with its own `subnet` there.
    fn between(present: &[IpNet], gateways: &[IpNet], slices: &[IpNet]) -> Self {
        let outdated = |address: &&IpNet| {
            let family = IpFamily::of(address);
            let kernel_managed =
                matches!(address, IpNet::V6(v6) if v6.addr().is_unicast_link_local());
            let same_family: Vec<&IpNet> = gateways
                .iter()
                .filter(|gateway| IpFamily::of(gateway) == family)
                .collect();
            let resized = same_family
                .iter()
                .any(|gateway| gateway.addr() == address.addr());
            let in_slice = slices.iter().any(|slice| slice.contains(&address.addr()));
            !kernel_managed
                && !same_family.is_empty()
                && !same_family.contains(address)
                && (resized || !in_slice)
        };
        GatewayChange {
            add: gateways
                .iter()
                .filter(|gateway| !present.contains(gateway))
                .copied()
                .collect(),
            remove: present.iter().filter(outdated).copied().collect(),
        }
    }
}

/// Puts `gateways` on the bridge and takes earlier slices' gateways off it
/// (see [`GatewayChange::between`]). The new gateways go on first, so pods
/// of the current slice never lose theirs; both steps are idempotent, so
/// concurrent ADDs may race through them.
pub(super) async fn set_bridge_gateways(
    node_nl: &Netlink,
    bridge_index: u32,
    gateways: &[IpNet],
    slices: &[IpNet],
) -> Result<(), CniError> {
    let present: Vec<IpNet> = node_nl
        .addresses(Some(bridge_index))
        .await
        .map_err(kernel_error)?
        .into_iter()
        .map(|address| address.address)
        .collect();
    let change = GatewayChange::between(&present, gateways, slices);
    // Both lists are empty in the steady state and short after a slice
    // change, so one request at a time costs nothing and keeps the order:
    // a new gateway is on the bridge before an old one goes.
    for gateway in &change.add {
        node_nl
            .ensure_address(bridge_index, *gateway)
            .await
            .map_err(kernel_error)?;
    }
    if !change.remove.is_empty() {
        tracing::info!(removed = ?change.remove, current = ?gateways, "removing the gateways of earlier pod slices from the bridge");
    }
    for address in &change.remove {
        node_nl
            .delete_address(bridge_index, *address)
            .await
            .map_err(kernel_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|net| net.parse().unwrap()).collect()
    }

    const SLICES: &[&str] = &["10.244.2.0/24", "fd00:10:244:2::/64"];
    const GATEWAYS: &[&str] = &["10.244.2.1/24", "fd00:10:244:2::1/64"];

    fn change(present: &[&str]) -> GatewayChange {
        GatewayChange::between(&nets(present), &nets(GATEWAYS), &nets(SLICES))
    }

    #[test]
    fn a_bridge_with_the_current_gateways_needs_nothing() {
        let present = [
            "10.244.2.1/24",
            "fd00:10:244:2::1/64",
            "fe80::858:aff:fef4:201/64",
        ];
        assert_eq!(change(&present), GatewayChange::default());
    }

    #[test]
    fn a_new_bridge_gets_every_gateway() {
        assert_eq!(
            change(&[]),
            GatewayChange {
                add: nets(GATEWAYS),
                remove: vec![],
            }
        );
    }

    #[test]
    fn gateways_of_an_earlier_slice_are_replaced_and_link_local_stays() {
        let present = [
            "10.244.1.1/24",
            "fd00:10:244:1::1/64",
            "fe80::858:aff:fef4:101/64",
        ];
        assert_eq!(
            change(&present),
            GatewayChange {
                add: nets(GATEWAYS),
                remove: nets(&["10.244.1.1/24", "fd00:10:244:1::1/64"]),
            }
        );
    }

    #[test]
    fn a_slice_resized_in_place_drops_the_old_prefix_length() {
        let present = ["10.244.2.1/25", "10.244.2.1/24", "fd00:10:244:2::1/64"];
        assert_eq!(
            change(&present),
            GatewayChange {
                add: vec![],
                remove: nets(&["10.244.2.1/25"]),
            }
        );
    }

    #[test]
    fn other_networks_in_the_slice_and_other_families_are_left_alone() {
        // A second network on the bridge with "subnet": "10.244.2.128/25".
        let shared = ["10.244.2.1/24", "10.244.2.129/25", "fd00:10:244:2::1/64"];
        assert_eq!(change(&shared), GatewayChange::default());
        // An IPv4-only network does not touch the bridge's IPv6 addresses.
        let v4_only = GatewayChange::between(
            &nets(&["10.244.2.1/24", "fd00:10:244:1::1/64"]),
            &nets(&["10.244.2.1/24"]),
            &nets(&["10.244.2.0/24"]),
        );
        assert_eq!(v4_only, GatewayChange::default());
    }
}
