//! Forwarding-database entries of a VXLAN device: which underlay address
//! the frames for a MAC are tunnelled to (`bridge fdb … self permanent dst`).

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;
use nix::errno::Errno;

use super::{errno_of, Netlink, NetlinkError, Removal};

/// A permanent FDB entry with a remote, on a VXLAN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbRemote {
    /// The VXLAN device.
    pub link_index: u32,
    /// The destination MAC.
    pub mac: [u8; 6],
    /// The underlay address frames for `mac` are sent to.
    pub remote: IpAddr,
}

impl FdbRemote {
    fn to_message(self) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = self.link_index;
        message.header.state = NeighbourState::Permanent;
        // NTF_SELF: the entry belongs to the VXLAN device itself, not to a
        // bridge it could be a port of.
        message.header.flags = NeighbourFlags::Own;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(self.mac.to_vec()));
        message
            .attributes
            .push(NeighbourAttribute::Destination(match self.remote {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        message
    }

    /// Reads an entry with a remote; entries without one (the device's own
    /// and multicast addresses) are not Weft's and give `None`.
    fn from_message(message: NeighbourMessage) -> Option<Self> {
        let mut mac = None;
        let mut remote = None;
        for attribute in message.attributes {
            match attribute {
                NeighbourAttribute::LinkLayerAddress(bytes) => mac = bytes.try_into().ok(),
                NeighbourAttribute::Destination(address) => remote = remote_of(address),
                _ => {}
            }
        }
        Some(Self {
            link_index: message.header.ifindex,
            mac: mac?,
            remote: remote?,
        })
    }
}

/// The remote of an FDB entry. Bridge-family messages carry NDA_DST as raw
/// bytes (the parser only knows the family of the message, AF_BRIDGE), so the
/// address family comes from the length.
fn remote_of(address: NeighbourAddress) -> Option<IpAddr> {
    match address {
        NeighbourAddress::Inet(v4) => Some(v4.into()),
        NeighbourAddress::Inet6(v6) => Some(v6.into()),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

impl std::fmt::Display for FdbRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.mac;
        write!(
            f,
            "fdb {a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x} dst {} dev #{} self permanent",
            self.remote, self.link_index
        )
    }
}

impl Netlink {
    /// Creates the entry, or points an existing entry for the same MAC at
    /// the new remote in place (`bridge fdb replace`).
    pub async fn replace_fdb(&self, entry: &FdbRemote) -> Result<(), NetlinkError> {
        let mut request = self
            .handle
            .neighbours()
            .add_bridge(entry.link_index, &entry.mac);
        *request.message_mut() = entry.to_message();
        request
            .replace()
            .execute()
            .await
            .map_err(|error| self.error("replacing", entry, error))
    }

    /// Deletes the remote `entry.remote` of `entry.mac`; other remotes of the
    /// same MAC stay.
    pub async fn delete_fdb(&self, entry: &FdbRemote) -> Result<Removal, NetlinkError> {
        match self
            .handle
            .neighbours()
            .del(entry.to_message())
            .execute()
            .await
        {
            Ok(()) => Ok(Removal::Removed),
            Err(error) if errno_of(&error) == Some(Errno::ENOENT) => Ok(Removal::AlreadyGone),
            Err(error) => Err(self.error("deleting", entry, error)),
        }
    }

    /// The FDB entries with a remote on one device.
    pub async fn fdb_remotes(&self, link_index: u32) -> Result<Vec<FdbRemote>, NetlinkError> {
        let messages: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(|error| self.error("listing fdb entries of link index", link_index, error))?;
        Ok(messages
            .into_iter()
            .filter(|message| message.header.ifindex == link_index)
            .filter_map(FdbRemote::from_message)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip() {
        let entry = FdbRemote {
            link_index: 9,
            mac: [0x0a, 0x58, 1, 2, 3, 4],
            remote: "172.31.0.11".parse().unwrap(),
        };
        assert_eq!(FdbRemote::from_message(entry.to_message()), Some(entry));
        // As a dump delivers it: NDA_DST as raw bytes under AF_BRIDGE.
        assert_eq!(
            remote_of(NeighbourAddress::Other(vec![172, 31, 0, 11])),
            Some(entry.remote)
        );
        assert_eq!(remote_of(NeighbourAddress::Other(vec![1, 2])), None);
        assert_eq!(
            entry.to_string(),
            "fdb 0a:58:01:02:03:04 dst 172.31.0.11 dev #9 self permanent"
        );
    }
}
