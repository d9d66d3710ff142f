//! Routes: add, replace, delete and dump, with table, protocol, scope,
//! type (unicast or one that rejects: unreachable, blackhole, …), on-link
//! flag, gateway and output interface.

use std::fmt;
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::AddressFamily;
use nix::errno::Errno;

use crate::ip::IpFamily;

use super::{errno_of, Netlink, NetlinkError, Outcome, Removal};

/// A route: unicast, or one that rejects what it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix (`0.0.0.0/0` / `::/0` for a default route).
    pub destination: IpNet,
    /// Next hop, of the destination's family.
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub output_interface: Option<u32>,
    /// Routing table id (254 is `main`).
    pub table: u32,
    /// Who owns the route (`proto` in `ip route`); the agent uses its own
    /// number so that it only ever touches routes it made.
    pub protocol: RouteProtocol,
    /// Route scope.
    pub scope: RouteScope,
    /// The route type: [`RouteType::Unicast`], or one of the types that end
    /// a packet here ([`RouteType::Unreachable`], [`RouteType::BlackHole`],
    /// [`RouteType::Prohibit`], [`RouteType::Throw`]), which have no
    /// gateway or output interface.
    pub kind: RouteType,
    /// Whether the gateway is reachable on the interface without a
    /// connected route (`onlink`), as overlay routes need.
    pub onlink: bool,
}

impl Route {
    /// The `main` routing table.
    pub const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

    /// A unicast route to `destination` in the main table, protocol `boot`
    /// (what `ip route add` uses), universe scope, no gateway or interface
    /// yet.
    pub fn new(destination: IpNet) -> Self {
        Self {
            destination,
            gateway: None,
            output_interface: None,
            table: Self::MAIN_TABLE,
            protocol: RouteProtocol::Boot,
            scope: RouteScope::Universe,
            kind: RouteType::Unicast,
            onlink: false,
        }
    }

    /// A default route of `gateway`'s family via `gateway`.
    pub fn default_via(gateway: IpAddr) -> Self {
        let destination = match gateway {
            IpAddr::V4(_) => IpNet::V4(Default::default()),
            IpAddr::V6(_) => IpNet::V6(Default::default()),
        };
        Self {
            gateway: Some(gateway),
            ..Self::new(destination)
        }
    }

    fn to_message(&self) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = match self.destination {
            IpNet::V4(_) => AddressFamily::Inet,
            IpNet::V6(_) => AddressFamily::Inet6,
        };
        message.header.destination_prefix_length = self.destination.prefix_len();
        // The header only holds 8 bits; RTA_TABLE carries any id and wins.
        message.header.table = u8::try_from(self.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        message.header.protocol = self.protocol;
        message.header.scope = self.scope;
        message.header.kind = self.kind;
        if self.onlink {
            message.header.flags.insert(RouteFlags::Onlink);
        }
        message.attributes.push(RouteAttribute::Table(self.table));
        if self.destination.prefix_len() > 0 {
            message
                .attributes
                .push(RouteAttribute::Destination(self.destination.addr().into()));
        }
        if let Some(gateway) = self.gateway {
            message
                .attributes
                .push(RouteAttribute::Gateway(gateway.into()));
        }
        if let Some(index) = self.output_interface {
            message.attributes.push(RouteAttribute::Oif(index));
        }
        message
    }

    /// Reads a unicast or rejecting route (see [`Route::kind`]); `None` for
    /// the types only the local table holds (local, broadcast, …) and for
    /// multipath routes, which Weft does not make.
    fn from_message(message: RouteMessage) -> Option<Self> {
        let kind = message.header.kind;
        if !matches!(
            kind,
            RouteType::Unicast
                | RouteType::Unreachable
                | RouteType::BlackHole
                | RouteType::Prohibit
                | RouteType::Throw
        ) {
            return None;
        }
        let mut destination = None;
        let mut gateway = None;
        let mut output_interface = None;
        let mut table = u32::from(message.header.table);
        for attribute in message.attributes {
            match attribute {
                RouteAttribute::Destination(address) => destination = ip_of(address),
                RouteAttribute::Gateway(address) => gateway = ip_of(address),
                RouteAttribute::Oif(index) => output_interface = Some(index),
                RouteAttribute::Table(id) => table = id,
                RouteAttribute::MultiPath(_) => return None,
                _ => {}
            }
        }
        let prefix_len = message.header.destination_prefix_length;
        let destination = match (destination, message.header.address_family) {
            (Some(address), _) => IpNet::new(address, prefix_len).ok()?,
            (None, AddressFamily::Inet) => IpNet::V4(Default::default()),
            (None, AddressFamily::Inet6) => IpNet::V6(Default::default()),
            (None, _) => return None,
        };
        Some(Self {
            destination,
            gateway,
            output_interface,
            table,
            protocol: message.header.protocol,
            scope: message.header.scope,
            kind,
            onlink: message.header.flags.contains(RouteFlags::Onlink),
        })
    }
}

fn ip_of(address: RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(ip.into()),
        RouteAddress::Inet6(ip) => Some(ip.into()),
        _ => None,
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind != RouteType::Unicast {
            write!(f, "{:?} ", self.kind)?;
        }
        write!(f, "route {}", self.destination)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(index) = self.output_interface {
            write!(f, " dev #{index}")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        write!(f, " table {} proto {}", self.table, u8::from(self.protocol))
    }
}

impl Netlink {
    /// Adds a route; [`Outcome::AlreadyPresent`] if a route with the same
    /// destination, table and metric already exists (it is left as it is).
    pub async fn add_route(&self, route: &Route) -> Result<Outcome, NetlinkError> {
        match self.handle.route().add(route.to_message()).execute().await {
            Ok(()) => Ok(Outcome::Created),
            Err(error) if errno_of(&error) == Some(Errno::EEXIST) => Ok(Outcome::AlreadyPresent),
            Err(error) => Err(self.error("adding", route, error)),
        }
    }

    /// Adds a route or replaces the one with the same destination, table
    /// and metric.
    pub async fn replace_route(&self, route: &Route) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(route.to_message())
            .replace()
            .execute()
            .await
            .map_err(|error| self.error("replacing", route, error))
    }

    /// Deletes a route matching destination, table, protocol and (when
    /// set) gateway and output interface, whatever its scope.
    pub async fn delete_route(&self, route: &Route) -> Result<Removal, NetlinkError> {
        let mut message = route.to_message();
        // "Nowhere" is the wildcard scope for deletion, as `ip route del`
        // sends: a route is found whatever scope the kernel gave it.
        message.header.scope = RouteScope::NoWhere;
        match self.handle.route().del(message).execute().await {
            Ok(()) => Ok(Removal::Removed),
            Err(error) if matches!(errno_of(&error), Some(Errno::ESRCH | Errno::ENOENT)) => {
                Ok(Removal::AlreadyGone)
            }
            Err(error) => Err(self.error("deleting", route, error)),
        }
    }

    /// The unicast and rejecting routes of one family in one table.
    pub async fn routes(&self, family: IpFamily, table: u32) -> Result<Vec<Route>, NetlinkError> {
        let mut filter = RouteMessage::default();
        filter.header.address_family = match family {
            IpFamily::V4 => AddressFamily::Inet,
            IpFamily::V6 => AddressFamily::Inet6,
        };
        let messages: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(|error| {
                self.error("listing routes", format!("{family:?} table {table}"), error)
            })?;
        Ok(messages
            .into_iter()
            .filter_map(Route::from_message)
            .filter(|route| route.table == table)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip_keeps_every_field() {
        let route = Route {
            gateway: Some("10.5.1.0".parse().unwrap()),
            output_interface: Some(7),
            table: 1000,
            protocol: RouteProtocol::Other(77),
            onlink: true,
            ..Route::new("10.5.1.0/24".parse().unwrap())
        };
        assert_eq!(Route::from_message(route.to_message()), Some(route));
    }

    #[test]
    fn rejecting_routes_round_trip_and_local_ones_are_skipped() {
        let unreachable = Route {
            kind: RouteType::Unreachable,
            protocol: RouteProtocol::Other(87),
            ..Route::new("fd00:10:244::/64".parse().unwrap())
        };
        assert_eq!(
            Route::from_message(unreachable.to_message()),
            Some(unreachable)
        );
        let local = Route {
            kind: RouteType::Local,
            ..Route::new("10.0.0.1/32".parse().unwrap())
        };
        assert_eq!(Route::from_message(local.to_message()), None);
    }

    #[test]
    fn default_route_has_no_destination_attribute() {
        let route = Route::default_via("fd00::1".parse().unwrap());
        let message = route.to_message();
        assert!(!message
            .attributes
            .iter()
            .any(|attribute| matches!(attribute, RouteAttribute::Destination(_))));
        assert_eq!(Route::from_message(message), Some(route));
    }
}
