//! IP addresses on links.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use nix::errno::Errno;

use super::{errno_of, Netlink, NetlinkError, Outcome};

/// An address assigned to a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Index of the link carrying the address.
    pub link_index: u32,
    /// The address with its prefix length.
    pub address: IpNet,
}

impl Address {
    fn from_message(message: AddressMessage) -> Option<Self> {
        // IFA_LOCAL is the interface's own address on point-to-point links,
        // where IFA_ADDRESS is the peer; on broadcast links both are equal
        // and IPv6 only sends IFA_ADDRESS.
        let mut address = None;
        let mut local = None;
        for attribute in message.attributes {
            match attribute {
                AddressAttribute::Address(ip) => address = Some(ip),
                AddressAttribute::Local(ip) => local = Some(ip),
                _ => {}
            }
        }
        let ip: IpAddr = local.or(address)?;
        Some(Self {
            link_index: message.header.index,
            address: IpNet::new(ip, message.header.prefix_len).ok()?,
        })
    }
}

impl Netlink {
    /// Adds `address` to the link unless it is already there. IPv6
    /// addresses skip duplicate address detection (`nodad`): the address
    /// comes from IPAM, and a tentative address would make the first
    /// packets and routes through it fail.
    pub async fn ensure_address(
        &self,
        link_index: u32,
        address: IpNet,
    ) -> Result<Outcome, NetlinkError> {
        let mut request =
            self.handle
                .address()
                .add(link_index, address.addr(), address.prefix_len());
        if address.addr().is_ipv6() {
            let message = request.message_mut();
            message.header.flags |= AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => Ok(Outcome::Created),
            Err(error) if errno_of(&error) == Some(Errno::EEXIST) => Ok(Outcome::AlreadyPresent),
            Err(error) => Err(self.error(
                "adding address",
                format!("{address} to link index {link_index}"),
                error,
            )),
        }
    }

    /// The addresses in the namespace, or only those of one link.
    pub async fn addresses(&self, link_index: Option<u32>) -> Result<Vec<Address>, NetlinkError> {
        let mut request = self.handle.address().get();
        if let Some(index) = link_index {
            request = request.set_link_index_filter(index);
        }
        let messages: Vec<AddressMessage> = request
            .execute()
            .try_collect()
            .await
            .map_err(|error| self.error("listing addresses", "", error))?;
        Ok(messages
            .into_iter()
            .filter_map(Address::from_message)
            .collect())
    }
}
