//! Policy-routing rules (`ip rule`): add, delete and dump, with priority,
//! family, source prefix, firewall mark and mask, table and protocol.
//!
//! Only rules that send packets to a table (`lookup T`) are modelled: that
//! is all Weft makes. A rule of another action, or with a selector this
//! type has no field for (a destination, an interface, …), is left out of
//! a dump rather than misread, so it is never taken for one of Weft's.

use std::fmt;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::{RouteHeader, RouteProtocol};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;
use nix::errno::Errno;
use rtnetlink::IpVersion;

use crate::ip::IpFamily;

use super::{errno_of, Netlink, NetlinkError, Outcome, Removal};

/// A firewall mark a rule matches: `fwmark value/mask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FwMark {
    /// The bits that must be set, of those in `mask`.
    pub value: u32,
    /// The bits of the packet's mark that are compared.
    pub mask: u32,
}

/// A rule sending the packets it matches to one routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The family the rule applies to.
    pub family: IpFamily,
    /// Its priority (`pref` in `ip rule`): lower is asked first.
    pub priority: u32,
    /// The source prefix matched (`from`); `None` matches every source.
    pub source: Option<IpNet>,
    /// The firewall mark matched; `None` matches any mark.
    pub mark: Option<FwMark>,
    /// The table looked up (`lookup`).
    pub table: u32,
    /// Who owns the rule (`proto` in `ip rule`); the agent uses its own
    /// number so that it only ever touches rules it made.
    pub protocol: RouteProtocol,
}

impl Rule {
    fn to_message(self) -> RuleMessage {
        let mut message = RuleMessage::default();
        message.header.family = match self.family {
            IpFamily::V4 => AddressFamily::Inet,
            IpFamily::V6 => AddressFamily::Inet6,
        };
        message.header.action = RuleAction::ToTable;
        // The header only holds 8 bits; FRA_TABLE carries any id and wins.
        message.header.table = u8::try_from(self.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        message.attributes.push(RuleAttribute::Table(self.table));
        message
            .attributes
            .push(RuleAttribute::Priority(self.priority));
        if let Some(source) = self.source {
            message.header.src_len = source.prefix_len();
            message
                .attributes
                .push(RuleAttribute::Source(source.trunc().addr()));
        }
        if let Some(mark) = self.mark {
            message.attributes.push(RuleAttribute::FwMark(mark.value));
            message.attributes.push(RuleAttribute::FwMask(mark.mask));
        }
        message
            .attributes
            .push(RuleAttribute::Protocol(self.protocol));
        message
    }

    /// Reads a `lookup` rule; `None` for other actions and for selectors
    /// [`Rule`] does not model (see the module's documentation).
    fn from_message(message: RuleMessage) -> Option<Self> {
        if message.header.action != RuleAction::ToTable || message.header.dst_len != 0 {
            return None;
        }
        let family = match message.header.family {
            AddressFamily::Inet => IpFamily::V4,
            AddressFamily::Inet6 => IpFamily::V6,
            _ => return None,
        };
        let mut rule = Rule {
            family,
            priority: 0,
            source: None,
            mark: None,
            table: u32::from(message.header.table),
            protocol: RouteProtocol::Unspec,
        };
        let (mut mark, mut mask) = (None, None);
        for attribute in message.attributes {
            match attribute {
                RuleAttribute::Priority(priority) => rule.priority = priority,
                RuleAttribute::Table(table) => rule.table = table,
                RuleAttribute::Source(address) => {
                    rule.source = Some(IpNet::new(address, message.header.src_len).ok()?)
                }
                RuleAttribute::FwMark(value) => mark = Some(value),
                RuleAttribute::FwMask(value) => mask = Some(value),
                RuleAttribute::Protocol(protocol) => rule.protocol = protocol,
                // Suppressors only refine what the looked-up table answers.
                RuleAttribute::SuppressPrefixLen(_) | RuleAttribute::SuppressIfGroup(_) => {}
                _ => return None,
            }
        }
        // A mark without a mask compares every bit (`fwmark 0x1`).
        rule.mark = mark.map(|value| FwMark {
            value,
            mask: mask.unwrap_or(u32::MAX),
        });
        Some(rule)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rule pref {}", self.family, self.priority)?;
        if let Some(source) = self.source {
            write!(f, " from {source}")?;
        }
        if let Some(mark) = self.mark {
            write!(f, " fwmark {:#x}/{:#x}", mark.value, mark.mask)?;
        }
        write!(
            f,
            " lookup {} proto {}",
            self.table,
            u8::from(self.protocol)
        )
    }
}

impl Netlink {
    /// Adds a rule; [`Outcome::AlreadyPresent`] if an identical rule exists
    /// (the kernel compares every selector, the priority and the table).
    pub async fn add_rule(&self, rule: &Rule) -> Result<Outcome, NetlinkError> {
        let mut request = self.handle.rule().add();
        *request.message_mut() = rule.to_message();
        match request.execute().await {
            Ok(()) => Ok(Outcome::Created),
            Err(error) if errno_of(&error) == Some(Errno::EEXIST) => Ok(Outcome::AlreadyPresent),
            Err(error) => Err(self.error("adding", rule, error)),
        }
    }

    /// Deletes the rule matching every field of `rule`.
    pub async fn delete_rule(&self, rule: &Rule) -> Result<Removal, NetlinkError> {
        match self.handle.rule().del(rule.to_message()).execute().await {
            Ok(()) => Ok(Removal::Removed),
            Err(error) if matches!(errno_of(&error), Some(Errno::ENOENT | Errno::ESRCH)) => {
                Ok(Removal::AlreadyGone)
            }
            Err(error) => Err(self.error("deleting", rule, error)),
        }
    }

    /// The `lookup` rules of one family (see the module's documentation
    /// for what is left out).
    pub async fn rules(&self, family: IpFamily) -> Result<Vec<Rule>, NetlinkError> {
        let version = match family {
            IpFamily::V4 => IpVersion::V4,
            IpFamily::V6 => IpVersion::V6,
        };
        let messages: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(|error| self.error("listing rules", family, error))?;
        Ok(messages
            .into_iter()
            .filter_map(Rule::from_message)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> Rule {
        Rule {
            family: IpFamily::V4,
            priority: 87,
            source: Some("10.244.1.0/24".parse().unwrap()),
            mark: Some(FwMark {
                value: 0x1000_0000,
                mask: 0x1000_0000,
            }),
            table: 8787,
            protocol: RouteProtocol::Other(87),
        }
    }

    #[test]
    fn message_round_trip_keeps_every_field() {
        assert_eq!(Rule::from_message(rule().to_message()), Some(rule()));
        let plain = Rule {
            family: IpFamily::V6,
            source: None,
            mark: None,
            table: 100,
            ..rule()
        };
        assert_eq!(Rule::from_message(plain.to_message()), Some(plain));
    }

    #[test]
    fn other_actions_and_unmodelled_selectors_are_left_out() {
        let mut blackhole = rule().to_message();
        blackhole.header.action = RuleAction::Blackhole;
        assert_eq!(Rule::from_message(blackhole), None);
        let mut with_interface = rule().to_message();
        with_interface
            .attributes
            .push(RuleAttribute::Iifname("eth0".into()));
        assert_eq!(Rule::from_message(with_interface), None);
    }

    #[test]
    fn display_reads_like_ip_rule() {
        assert_eq!(
            rule().to_string(),
            "ipv4 rule pref 87 from 10.244.1.0/24 fwmark 0x10000000/0x10000000 lookup 8787 proto 87"
        );
    }
}
