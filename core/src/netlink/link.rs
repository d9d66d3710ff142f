//! Links: lookup, veth pairs, link settings (up, MTU, alias) and removal.

use std::os::fd::{AsFd, AsRawFd};

use futures::TryStreamExt;
use netlink_packet_route::link::{
    AfSpecInet, AfSpecUnspec, InetDevConf, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags,
    LinkInfo, LinkMessage,
};
use nix::errno::Errno;
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::{errno_of, Netlink, NetlinkError, Outcome, Removal};
use crate::netns::Netns;

/// What the kernel reports about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Device kind ("bridge", "veth", "vxlan", …); `None` for physical
    /// devices and loopback.
    pub kind: Option<String>,
    /// MTU in bytes.
    pub mtu: u32,
    /// Whether the link is administratively up.
    pub up: bool,
    /// Hardware address, if the link has one.
    pub mac: Option<Vec<u8>>,
    /// Index of the bridge (or other controller) this link is attached to.
    pub controller: Option<u32>,
    /// The link's alias (`ip link set … alias`), used to mark ownership.
    pub alias: Option<String>,
    /// For a veth end, the index of the other end in that end's namespace
    /// (`IFLA_LINK`); for stacked devices, the lower device's.
    pub peer_index: Option<u32>,
}

impl Link {
    fn from_message(message: LinkMessage) -> Self {
        let mut link = Link {
            index: message.header.index,
            name: String::new(),
            kind: None,
            mtu: 0,
            up: message.header.flags.contains(LinkFlags::Up),
            mac: None,
            controller: None,
            alias: None,
            peer_index: None,
        };
        for attribute in message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                LinkAttribute::Address(mac) => link.mac = Some(mac),
                LinkAttribute::Controller(index) => link.controller = Some(index),
                LinkAttribute::IfAlias(alias) => link.alias = Some(alias),
                LinkAttribute::Link(index) => link.peer_index = Some(index),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// The hardware address as `aa:bb:cc:dd:ee:ff`, or an empty string.
    pub fn mac_text(&self) -> String {
        self.mac
            .iter()
            .flatten()
            .map(|byte| format!("{byte:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// A veth pair to create: one end here, the other directly inside another
/// namespace under its final name, so no half-configured device ever shows
/// up in the target namespace under a temporary name.
#[derive(Debug, Clone, Copy)]
pub struct VethPair<'a> {
    /// Name of the end that stays in this namespace.
    pub name: &'a str,
    /// Name of the end created in `peer_netns`.
    pub peer_name: &'a str,
    /// Namespace the peer end is created in.
    pub peer_netns: &'a Netns,
    /// Hardware address for the local end; the kernel picks a random one
    /// when `None`.
    pub mac: Option<&'a [u8]>,
    /// Hardware address for the peer end; the kernel picks a random one
    /// when `None`.
    pub peer_mac: Option<&'a [u8]>,
    /// MTU of both ends.
    pub mtu: u32,
}

impl Netlink {
    /// Looks a link up by name; `None` if there is no such link.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let request = self.handle.link().get().match_name(name).execute();
        self.single_link(request, "looking up link", name).await
    }

    /// Looks a link up by index; `None` if there is no such link.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let request = self.handle.link().get().match_index(index).execute();
        self.single_link(request, "looking up link index", index)
            .await
    }

    async fn single_link(
        &self,
        request: impl futures::Stream<Item = Result<LinkMessage, rtnetlink::Error>>,
        operation: &'static str,
        object: impl std::fmt::Display,
    ) -> Result<Option<Link>, NetlinkError> {
        futures::pin_mut!(request);
        match request.try_next().await {
            Ok(message) => Ok(message.map(Link::from_message)),
            Err(error) if errno_of(&error) == Some(Errno::ENODEV) => Ok(None),
            Err(error) => Err(self.error(operation, object, error)),
        }
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(Link::from_message)
            .try_collect()
            .await
            .map_err(|error| self.error("listing links", "", error))
    }

    /// Creates a veth pair with `pair.mtu` on both ends, the local end up,
    /// the peer created (still down) inside `pair.peer_netns` as
    /// `pair.peer_name`.
    ///
    /// [`Outcome::AlreadyPresent`] means a link with one of the two names
    /// already exists (here or in the peer namespace) and nothing was
    /// created.
    pub async fn create_veth(&self, pair: &VethPair<'_>) -> Result<Outcome, NetlinkError> {
        // The peer cannot be brought up in the same request: the kernel opens
        // it before the two ends are linked and veth_open() then fails with
        // ENOTCONN. The caller sets it up from inside its namespace.
        let mut peer = LinkUnspec::new_with_name(pair.peer_name)
            .mtu(pair.mtu)
            .setns_by_fd(pair.peer_netns.as_fd().as_raw_fd());
        if let Some(mac) = pair.peer_mac {
            peer = peer.address(mac.to_vec());
        }
        let peer = peer.build();
        let mut local = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(pair.name)
            .mtu(pair.mtu)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)));
        if let Some(mac) = pair.mac {
            local = local.address(mac.to_vec());
        }
        match self.handle.link().add(local.build()).execute().await {
            Ok(()) => Ok(Outcome::Created),
            Err(error) if errno_of(&error) == Some(Errno::EEXIST) => Ok(Outcome::AlreadyPresent),
            Err(error) => Err(self.error(
                "creating veth pair",
                format!(
                    "{} <-> {} ({})",
                    pair.name,
                    pair.peer_name,
                    pair.peer_netns.path().display()
                ),
                error,
            )),
        }
    }

    /// Sets a link administratively up.
    pub async fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let change = LinkUnspec::new_with_index(index).up().build();
        self.set_link(change, "setting up link index", index).await
    }

    /// Sets a link's MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let change = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.set_link(change, "setting the MTU of link index", index)
            .await
    }

    /// Sets a link's alias (`ip link set … alias …`), which Weft uses to
    /// record who owns a device.
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<(), NetlinkError> {
        let mut change = LinkUnspec::new_with_index(index).build();
        change
            .attributes
            .push(LinkAttribute::IfAlias(alias.to_string()));
        self.set_link(change, "setting the alias of link index", index)
            .await
    }

    /// Turns on IPv4 `src_valid_mark` for one link: the reverse-path check
    /// of a packet arriving on it then carries the packet's firewall mark,
    /// so it meets policy-routing rules that match on the mark. Set over
    /// netlink (`IFLA_AF_SPEC`) rather than through `/proc/sys`, which a container that is
    /// not privileged sees read-only; only this one setting is sent.
    pub async fn set_src_valid_mark(&self, index: u32) -> Result<(), NetlinkError> {
        let mut conf = InetDevConf::default();
        conf.src_vmark = 1;
        let mut change = LinkUnspec::new_with_index(index).build();
        change
            .attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
                AfSpecInet::DevConfRequest(conf),
            ])]));
        self.set_link(change, "turning on src_valid_mark of link index", index)
            .await
    }

    /// Whether IPv4 `src_valid_mark` is on for a link, as its dump says.
    pub async fn src_valid_mark(&self, index: u32) -> Result<bool, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let message = links
            .try_next()
            .await
            .map_err(|error| self.error("reading link index", index, error))?;
        Ok(message
            .into_iter()
            .flat_map(|m| m.attributes)
            .any(|attribute| {
                matches!(attribute, LinkAttribute::AfSpecUnspec(specs) if specs.iter().any(|spec| {
                    matches!(spec, AfSpecUnspec::Inet(inet) if inet.iter().any(|conf| {
                        matches!(conf, AfSpecInet::DevConf(conf) if conf.src_vmark == 1)
                    }))
                }))
            }))
    }

    async fn set_link(
        &self,
        change: LinkMessage,
        operation: &'static str,
        object: impl std::fmt::Display,
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(change)
            .execute()
            .await
            .map_err(|error| self.error(operation, object, error))
    }

    /// Deletes a link by index.
    pub async fn delete_link(&self, index: u32) -> Result<Removal, NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(Removal::Removed),
            Err(error) if is_gone(&error) => Ok(Removal::AlreadyGone),
            Err(error) => Err(self.error("deleting link index", index, error)),
        }
    }

    /// Deletes a link by name.
    pub async fn delete_link_by_name(&self, name: &str) -> Result<Removal, NetlinkError> {
        let message = LinkUnspec::new_with_name(name).build();
        match self.handle.link().del_with_message(message).execute().await {
            Ok(()) => Ok(Removal::Removed),
            Err(error) if is_gone(&error) => Ok(Removal::AlreadyGone),
            Err(error) => Err(self.error("deleting link", name, error)),
        }
    }
}

/// A link that is not there answers ENODEV; some kernels answer ENOENT when
/// looking it up by name.
fn is_gone(error: &rtnetlink::Error) -> bool {
    matches!(errno_of(error), Some(Errno::ENODEV | Errno::ENOENT))
}
