//! Permanent IP neighbours (ARP / NDP entries) on a link.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;
use nix::errno::Errno;

use super::{errno_of, Netlink, NetlinkError, Removal};

/// A permanent neighbour: an IP address on a link resolved to a MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermanentNeighbour {
    /// The link the entry lives on.
    pub link_index: u32,
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its MAC address.
    pub mac: [u8; 6],
}

impl PermanentNeighbour {
    fn from_message(message: NeighbourMessage) -> Option<Self> {
        if message.header.state != NeighbourState::Permanent {
            return None;
        }
        let mut ip = None;
        let mut mac = None;
        for attribute in message.attributes {
            match attribute {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(v4.into()),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(v6.into())
                }
                NeighbourAttribute::LinkLayerAddress(bytes) => mac = bytes.try_into().ok(),
                _ => {}
            }
        }
        Some(Self {
            link_index: message.header.ifindex,
            ip: ip?,
            mac: mac?,
        })
    }
}

impl std::fmt::Display for PermanentNeighbour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.mac;
        write!(
            f,
            "neighbour {} lladdr {a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x} dev #{} permanent",
            self.ip, self.link_index
        )
    }
}

fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

impl Netlink {
    /// Creates the neighbour, or updates the MAC of an existing entry for
    /// the same address in place (`ip neigh replace … nud permanent`).
    pub async fn replace_neighbour(
        &self,
        neighbour: &PermanentNeighbour,
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(neighbour.link_index, neighbour.ip)
            .link_layer_address(&neighbour.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|error| self.error("replacing", neighbour, error))
    }

    /// Deletes the entry for `neighbour.ip` on its link, whatever its MAC.
    pub async fn delete_neighbour(
        &self,
        neighbour: &PermanentNeighbour,
    ) -> Result<Removal, NetlinkError> {
        let mut message = NeighbourMessage::default();
        message.header.family = family_of(neighbour.ip);
        message.header.ifindex = neighbour.link_index;
        message
            .attributes
            .push(NeighbourAttribute::Destination(match neighbour.ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        match self.handle.neighbours().del(message).execute().await {
            Ok(()) => Ok(Removal::Removed),
            Err(error) if errno_of(&error) == Some(Errno::ENOENT) => Ok(Removal::AlreadyGone),
            Err(error) => Err(self.error("deleting", neighbour, error)),
        }
    }

    /// The permanent IPv4 and IPv6 neighbours on one link. Entries the
    /// kernel resolved itself (reachable, stale, …) are not listed: Weft
    /// only ever makes permanent ones.
    pub async fn permanent_neighbours(
        &self,
        link_index: u32,
    ) -> Result<Vec<PermanentNeighbour>, NetlinkError> {
        let mut found = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let messages: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(|error| self.error("listing neighbours", format!("{family:?}"), error))?;
            found.extend(
                messages
                    .into_iter()
                    .filter(|message| message.header.ifindex == link_index)
                    .filter_map(PermanentNeighbour::from_message),
            );
        }
        Ok(found)
    }
}
