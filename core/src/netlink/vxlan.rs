//! VXLAN devices: create, compare with the wanted settings, reuse or
//! recreate; and the addresses on them.

use std::fmt;
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::link::{InfoData, InfoVxlan, LinkInfo, LinkMessage};
use nix::errno::Errno;
use rtnetlink::LinkVxlan;

use super::{errno_of, Link, Netlink, NetlinkError, Removal};

/// The settings of a VXLAN device that Weft cares about. A device whose
/// settings differ from the wanted ones cannot be changed in place (the
/// kernel refuses most VXLAN attribute changes) and is recreated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSettings {
    /// Device name.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Local tunnel address: the node's underlay address.
    pub local: IpAddr,
    /// Index of the underlay link the tunnel is bound to.
    pub underlay_index: u32,
    /// Hardware address; kept stable so peers' entries stay valid.
    pub mac: [u8; 6],
    /// MTU; changed in place when it is the only difference.
    pub mtu: u32,
}

impl fmt::Display for VxlanSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.mac;
        write!(
            f,
            "vxlan {} id {} dstport {} local {} dev #{} address {a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x} mtu {} nolearning",
            self.name, self.vni, self.port, self.local, self.underlay_index, self.mtu
        )
    }
}

/// What [`Netlink::ensure_vxlan`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VxlanChange {
    /// There was no device; it was created.
    Created,
    /// A device with the same settings was reused untouched.
    Reused,
    /// Only the MTU or the up state differed and was changed in place.
    Adjusted,
    /// A device with different settings (or of another kind) was deleted
    /// and created anew.
    Recreated,
}

/// A VXLAN device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanLink {
    /// The generic link data.
    pub link: Link,
    /// Its VXLAN settings, `None` when the link is not a VXLAN device.
    pub vxlan: Option<VxlanAttributes>,
}

/// The VXLAN attributes read back from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanAttributes {
    /// VXLAN network identifier.
    pub vni: Option<u32>,
    /// UDP destination port.
    pub port: Option<u16>,
    /// Local tunnel address.
    pub local: Option<IpAddr>,
    /// Underlay link index.
    pub underlay_index: Option<u32>,
    /// Whether the device learns remote MACs from received packets.
    pub learning: Option<bool>,
}

impl VxlanAttributes {
    fn from_message(message: &LinkMessage) -> Option<Self> {
        let infos = message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                netlink_packet_route::link::LinkAttribute::LinkInfo(infos) => Some(infos),
                _ => None,
            })?;
        let data = infos.iter().find_map(|info| match info {
            LinkInfo::Data(InfoData::Vxlan(data)) => Some(data),
            _ => None,
        })?;
        let mut attributes = VxlanAttributes::default();
        for item in data {
            match item {
                InfoVxlan::Id(vni) => attributes.vni = Some(*vni),
                InfoVxlan::Port(port) => attributes.port = Some(*port),
                InfoVxlan::Local(ip) => attributes.local = Some((*ip).into()),
                InfoVxlan::Local6(ip) => attributes.local = Some((*ip).into()),
                InfoVxlan::Link(index) => attributes.underlay_index = Some(*index),
                InfoVxlan::Learning(on) => attributes.learning = Some(*on),
                _ => {}
            }
        }
        Some(attributes)
    }

    /// Whether these attributes are exactly the wanted ones (MTU and up
    /// state aside, which can change in place).
    pub fn matches(&self, wanted: &VxlanSettings) -> bool {
        self.vni == Some(wanted.vni)
            && self.port == Some(wanted.port)
            && self.local == Some(wanted.local)
            && self.underlay_index == Some(wanted.underlay_index)
            && self.learning == Some(false)
    }
}

impl Netlink {
    /// The link called `name` with its VXLAN attributes; `None` if there is
    /// no such link.
    pub async fn vxlan_by_name(&self, name: &str) -> Result<Option<VxlanLink>, NetlinkError> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(None);
        };
        let request = self.handle.link().get().match_index(link.index).execute();
        futures::pin_mut!(request);
        let message = match request.try_next().await {
            Ok(message) => message,
            Err(error) if errno_of(&error) == Some(Errno::ENODEV) => return Ok(None),
            Err(error) => return Err(self.error("reading vxlan attributes of", name, error)),
        };
        let vxlan = message.as_ref().and_then(VxlanAttributes::from_message);
        Ok(Some(VxlanLink { link, vxlan }))
    }

    /// Makes the VXLAN device `wanted.name` exist with exactly `wanted`
    /// settings, learning off, up. A device with equal settings is reused
    /// untouched (so its neighbours, FDB entries and routes survive an agent
    /// restart); a different one is replaced.
    pub async fn ensure_vxlan(
        &self,
        wanted: &VxlanSettings,
    ) -> Result<(Link, VxlanChange), NetlinkError> {
        let mut change = VxlanChange::Created;
        if let Some(existing) = self.vxlan_by_name(&wanted.name).await? {
            let same_settings = existing.link.kind.as_deref() == Some("vxlan")
                && existing.vxlan.as_ref().is_some_and(|v| v.matches(wanted))
                && existing.link.mac.as_deref() == Some(&wanted.mac[..]);
            if same_settings {
                return self.adjust_vxlan(existing.link, wanted).await;
            }
            self.delete_link(existing.link.index).await?;
            change = VxlanChange::Recreated;
        }
        let mut create = LinkVxlan::new(&wanted.name, wanted.vni)
            .port(wanted.port)
            .dev(wanted.underlay_index)
            .learning(false)
            .mtu(wanted.mtu)
            .address(wanted.mac.to_vec())
            .up();
        create = match wanted.local {
            IpAddr::V4(ip) => create.local(ip),
            IpAddr::V6(ip) => create.local6(ip),
        };
        self.handle
            .link()
            .add(create.build())
            .execute()
            .await
            .map_err(|error| self.error("creating", wanted, error))?;
        let link = self
            .link_by_name(&wanted.name)
            .await?
            .ok_or_else(|| NetlinkError::Kernel {
                operation: "looking up the vxlan device just created",
                object: wanted.name.clone(),
                namespace: self.namespace().to_string(),
                errno: Errno::ENODEV,
            })?;
        Ok((link, change))
    }

    async fn adjust_vxlan(
        &self,
        link: Link,
        wanted: &VxlanSettings,
    ) -> Result<(Link, VxlanChange), NetlinkError> {
        if link.mtu == wanted.mtu && link.up {
            return Ok((link, VxlanChange::Reused));
        }
        if link.mtu != wanted.mtu {
            self.set_mtu(link.index, wanted.mtu).await?;
        }
        if !link.up {
            self.set_up(link.index).await?;
        }
        Ok((
            Link {
                mtu: wanted.mtu,
                up: true,
                ..link
            },
            VxlanChange::Adjusted,
        ))
    }

    /// Makes `addresses` the only addresses on the link, whatever their
    /// family (IPv6 link-local addresses, which the kernel manages, are
    /// kept). Used for the VTEP addresses, which change when the node's
    /// slice does.
    pub async fn set_exact_addresses(
        &self,
        link_index: u32,
        addresses: &[IpNet],
    ) -> Result<(), NetlinkError> {
        for address in addresses {
            self.ensure_address(link_index, *address).await?;
        }
        for present in self.addresses(Some(link_index)).await? {
            let kernel_managed =
                matches!(present.address.addr(), IpAddr::V6(ip) if ip.is_unicast_link_local());
            if kernel_managed || addresses.contains(&present.address) {
                continue;
            }
            self.delete_address(link_index, present.address).await?;
        }
        Ok(())
    }

    /// Removes one address from a link; [`Removal::AlreadyGone`] if it was
    /// not there.
    pub async fn delete_address(
        &self,
        link_index: u32,
        address: IpNet,
    ) -> Result<Removal, NetlinkError> {
        let mut request =
            self.handle
                .address()
                .add(link_index, address.addr(), address.prefix_len());
        let message = request.message_mut().clone();
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(Removal::Removed),
            Err(error)
                if matches!(errno_of(&error), Some(Errno::EADDRNOTAVAIL | Errno::ENOENT)) =>
            {
                Ok(Removal::AlreadyGone)
            }
            Err(error) => Err(self.error(
                "deleting address",
                format!("{address} from link index {link_index}"),
                error,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> VxlanSettings {
        VxlanSettings {
            name: "weft.1".into(),
            vni: 1,
            port: 8472,
            local: "172.31.0.10".parse().unwrap(),
            underlay_index: 2,
            mac: [0x0a, 0x58, 0, 0, 0, 1],
            mtu: 1450,
        }
    }

    #[test]
    fn settings_match_only_when_every_tunnel_attribute_is_equal() {
        let same = VxlanAttributes {
            vni: Some(1),
            port: Some(8472),
            local: Some("172.31.0.10".parse().unwrap()),
            underlay_index: Some(2),
            learning: Some(false),
        };
        assert!(same.matches(&wanted()));
        let differing = [
            VxlanAttributes {
                vni: Some(2),
                ..same.clone()
            },
            VxlanAttributes {
                port: Some(4789),
                ..same.clone()
            },
            VxlanAttributes {
                local: Some("172.31.0.11".parse().unwrap()),
                ..same.clone()
            },
            VxlanAttributes {
                underlay_index: Some(3),
                ..same.clone()
            },
            VxlanAttributes {
                learning: Some(true),
                ..same.clone()
            },
            VxlanAttributes::default(),
        ];
        for attributes in differing {
            assert!(!attributes.matches(&wanted()), "{attributes:?}");
        }
    }

    #[test]
    fn settings_display_like_ip_link() {
        assert_eq!(
            wanted().to_string(),
            "vxlan weft.1 id 1 dstport 8472 local 172.31.0.10 dev #2 address 0a:58:00:00:00:01 mtu 1450 nolearning"
        );
    }
}
