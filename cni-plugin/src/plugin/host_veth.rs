//! The host end of a pod's veth pair: a name derived from the attachment,
//! so DEL and GC find it without the pod's namespace, and an alias that
//! records its owner, so Weft never deletes a device it did not make.

use super::unregister::delete_link_unlisted;
use crate::cni::{Attachment, CniError, ErrorCode};
use weft_core::netlink::{Link, Netlink, NetlinkError, Removal};

/// Prefix of every host veth name.
const NAME_PREFIX: &str = "veth";
/// Hex digits of the hash in the name: "veth" + 11 = 15 bytes, the most an
/// interface name may have. 44 bits keep collisions between the pods of one
/// node negligible.
const HASH_DIGITS: usize = 11;
/// Prefix of the owner alias; followed by `<network>:<container>:<ifname>`.
const ALIAS_PREFIX: &str = "weft:";
/// The kernel rejects aliases of IFALIASZ (256) bytes or more.
const MAX_ALIAS_LEN: usize = 255;

/// The host end of one attachment's veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HostVeth {
    /// Interface name, `veth` + 11 hex digits.
    pub name: String,
    /// Owner alias, `weft:<network>:<container>:<ifname>`.
    pub alias: String,
}

impl HostVeth {
    /// The host veth of `attachment` on network `network`. The network is
    /// part of the key so two networks attaching one container never share
    /// a device.
    pub fn of(network: &str, attachment: &Attachment) -> Self {
        let key = format!(
            "{network}:{}:{}",
            attachment.container_id, attachment.ifname
        );
        let hash = fnv1a64(key.as_bytes());
        let hex = format!("{hash:016x}");
        Self {
            name: format!("{NAME_PREFIX}{}", &hex[..HASH_DIGITS]),
            alias: format!("{ALIAS_PREFIX}{key}"),
        }
    }

    /// The alias prefix shared by every host veth of `network`, for GC.
    pub fn network_alias_prefix(network: &str) -> String {
        format!("{ALIAS_PREFIX}{network}:")
    }

    /// Whether `alias` marks a host veth of Weft, of any network.
    pub fn is_weft_alias(alias: Option<&str>) -> bool {
        alias.is_some_and(|alias| alias.starts_with(ALIAS_PREFIX))
    }

    /// Refuses attachments whose owner alias the kernel would reject, before
    /// anything is changed.
    pub fn check_alias_fits(&self) -> Result<(), CniError> {
        if self.alias.len() <= MAX_ALIAS_LEN {
            return Ok(());
        }
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!(
                "CNI_CONTAINERID, CNI_IFNAME and the network name together are {} bytes, more than the {} weft can record on the host interface: use a shorter container ID or network name",
                self.alias.len() - ALIAS_PREFIX.len(),
                MAX_ALIAS_LEN - ALIAS_PREFIX.len()
            ),
        ))
    }

    /// The hardware address the device is created with: locally
    /// administered, unicast, and derived from the owner like the name, so
    /// ADD knows it without asking the kernel and a repeated ADD gets the
    /// same one.
    pub fn mac(&self) -> [u8; 6] {
        let [_, _, first, rest @ ..] = fnv1a64(self.alias.as_bytes()).to_be_bytes();
        let [second, third, fourth, fifth, sixth] = rest;
        [(first & 0xfc) | 0x02, second, third, fourth, fifth, sixth]
    }

    /// Whether `link` (found under this name) is this attachment's device.
    /// A link without alias counts as ours: an ADD killed between creating
    /// the pair and setting the alias leaves exactly that.
    pub fn owns(&self, link: &Link) -> bool {
        link.alias
            .as_deref()
            .is_none_or(|alias| alias == self.alias)
    }

    /// Deletes the device (and so the pod end) if it exists and is ours; a
    /// device of another owner under this name is left alone. `node` is the
    /// socket of the plugin's own namespace, where the deletion is made.
    ///
    /// Returns once the pair is unlisted, without waiting the further 12–30
    /// ms the kernel takes to free it.
    pub async fn remove(&self, node: &Netlink) -> Result<Removal, NetlinkError> {
        match node.link_by_name(&self.name).await? {
            Some(link) if self.owns(&link) => delete_link_unlisted(link.index),
            Some(link) => {
                tracing::warn!(
                    name = %self.name,
                    alias = ?link.alias,
                    "host interface belongs to another attachment; leaving it"
                );
                Ok(Removal::AlreadyGone)
            }
            None => Ok(Removal::AlreadyGone),
        }
    }
}

/// 64-bit FNV-1a: tiny, stable across releases and platforms (the name must
/// never change for an existing attachment), and good enough to spread
/// short keys.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(id: &str, ifname: &str) -> Attachment {
        Attachment::new(id, ifname).unwrap()
    }

    #[test]
    fn name_is_stable_and_fits_ifnamsiz() {
        let veth = HostVeth::of("weft", &attachment("abc123", "eth0"));
        assert_eq!(veth, HostVeth::of("weft", &attachment("abc123", "eth0")));
        assert_eq!(veth.name.len(), 15);
        assert!(veth.name.starts_with("veth"));
        assert_eq!(veth.alias, "weft:weft:abc123:eth0");
        // Pinned: a change would orphan the devices of running pods.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn every_part_of_the_key_changes_the_name() {
        let base = HostVeth::of("weft", &attachment("abc123", "eth0"));
        for other in [
            HostVeth::of("other", &attachment("abc123", "eth0")),
            HostVeth::of("weft", &attachment("abc124", "eth0")),
            HostVeth::of("weft", &attachment("abc123", "eth1")),
        ] {
            assert_ne!(base.name, other.name);
        }
    }

    #[test]
    fn mac_is_stable_unicast_and_locally_administered() {
        let veth = HostVeth::of("weft", &attachment("abc123", "eth0"));
        let mac = veth.mac();
        assert_eq!(
            mac,
            HostVeth::of("weft", &attachment("abc123", "eth0")).mac()
        );
        assert_eq!(mac[0] & 0x03, 0x02, "{mac:02x?}");
        assert_ne!(
            mac,
            HostVeth::of("weft", &attachment("abc124", "eth0")).mac()
        );
    }

    #[test]
    fn ownership_follows_the_alias() {
        let veth = HostVeth::of("weft", &attachment("abc123", "eth0"));
        let mut link = Link {
            index: 5,
            name: veth.name.clone(),
            kind: Some("veth".into()),
            mtu: 1500,
            up: true,
            mac: None,
            controller: None,
            alias: None,
            peer_index: None,
        };
        assert!(veth.owns(&link));
        link.alias = Some(veth.alias.clone());
        assert!(veth.owns(&link));
        link.alias = Some("weft:weft:someone-else:eth0".into());
        assert!(!veth.owns(&link));
        assert!(HostVeth::is_weft_alias(link.alias.as_deref()));
        assert!(!HostVeth::is_weft_alias(Some("uplink")));
        assert!(!HostVeth::is_weft_alias(None));
    }

    #[test]
    fn overlong_alias_is_refused_naming_the_variables() {
        let long_id = "a".repeat(300);
        let veth = HostVeth::of("weft", &attachment(&long_id, "eth0"));
        let err = veth.check_alias_fits().unwrap_err();
        assert_eq!(err.code, 4);
        assert!(err.msg.contains("CNI_CONTAINERID"), "{}", err.msg);
    }
}
