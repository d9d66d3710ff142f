//! The netlink layer: links, addresses and routes of one network namespace.
//!
//! A [`Netlink`] is "the rtnetlink socket of namespace X". A netlink socket
//! belongs for its whole life to the namespace it was *created* in, so the
//! socket for another namespace is created by a thread that steps into it
//! for that one system call and straight back ([`Netns::run_here`]); the
//! connection is then driven on the caller's tokio runtime. No task ever
//! runs while a thread is in another namespace.
//!
//! Every operation is idempotent where the kernel allows it: "already there"
//! (EEXIST) and "already gone" (ENODEV, ENOENT, ESRCH) are returned as
//! [`Outcome`] / [`Removal`] values, decided on the errno, never on message
//! text. Each object kind lives in its own file (`link`, `address`, `route`,
//! `rule`, `vxlan`, `neigh`, `fdb`), each adding an `impl Netlink` block.

mod address;
mod fdb;
mod link;
mod neigh;
mod route;
mod rule;
#[cfg(test)]
mod tests;
mod vxlan;

use std::fmt;
use std::os::fd::{FromRawFd, IntoRawFd};

use nix::errno::Errno;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};

use crate::netns::{Netns, NetnsError};

pub use address::Address;
pub use fdb::FdbRemote;
pub use link::{Link, VethPair};
pub use neigh::PermanentNeighbour;
pub use netlink_packet_route::route::{RouteProtocol, RouteScope, RouteType};
pub use route::Route;
pub use rule::{FwMark, Rule};
pub use vxlan::{VxlanAttributes, VxlanChange, VxlanLink, VxlanSettings};

/// The routing protocol number on every route and rule Weft installs
/// (`proto 87` in `ip route` and `ip rule`; 87 is ASCII `W`). It is how the agent tells its routes from
/// everyone else's: a dump filtered on it is exactly what Weft owns, so
/// stale routes of an earlier run are found and foreign routes are never
/// touched. Not assigned in iproute2's `rt_protos` list.
pub const ROUTE_PROTOCOL: u8 = 87;

/// The rtnetlink socket of one network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    namespace: String,
}

/// What an idempotent "make it exist" operation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The object was created (or changed) by this call.
    Created,
    /// An identical object was already there; nothing changed.
    AlreadyPresent,
}

/// What an idempotent removal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The object existed and was removed by this call.
    Removed,
    /// The object did not exist.
    AlreadyGone,
}

/// Why a netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The rtnetlink socket could not be created.
    #[error("opening an rtnetlink socket in {namespace}: {source}")]
    Socket {
        /// Which namespace the socket was for.
        namespace: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The target namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The kernel refused a request.
    #[error("{operation} {object} in {namespace}: {errno}")]
    Kernel {
        /// What was being done, e.g. "creating veth pair".
        operation: &'static str,
        /// Which object, e.g. "weft.1" or "route 0.0.0.0/0 via 10.1.0.1".
        object: String,
        /// Which namespace.
        namespace: String,
        /// The kernel's errno.
        errno: Errno,
    },
    /// The request never got a kernel answer or the answer was not
    /// understood (connection closed, unexpected message).
    #[error("{operation} {object} in {namespace}: {detail}")]
    Protocol {
        /// What was being done.
        operation: &'static str,
        /// Which object.
        object: String,
        /// Which namespace.
        namespace: String,
        /// What went wrong.
        detail: String,
    },
}

impl NetlinkError {
    /// The kernel errno behind this error, if the kernel refused a request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// The errno inside an rtnetlink error, if the kernel sent one.
fn errno_of(error: &rtnetlink::Error) -> Option<Errno> {
    match error {
        rtnetlink::Error::NetlinkError(message) => {
            message.code.map(|code| Errno::from_raw(-code.get()))
        }
        _ => None,
    }
}

impl Netlink {
    /// The rtnetlink socket of the namespace the calling thread is in.
    ///
    /// Must be called from within a tokio runtime, which drives the
    /// connection.
    pub fn current() -> Result<Self, NetlinkError> {
        let namespace = "the current network namespace".to_string();
        let socket = Socket::new(NETLINK_ROUTE).map_err(|source| NetlinkError::Socket {
            namespace: namespace.clone(),
            source,
        })?;
        Ok(Self::connect(socket, namespace))
    }

    /// The rtnetlink socket of `netns`, created inside it by the calling
    /// thread.
    ///
    /// Must be called from within a tokio runtime, which drives the
    /// connection.
    pub fn in_netns(netns: &Netns) -> Result<Self, NetlinkError> {
        let namespace = format!("network namespace {}", netns.path().display());
        let socket = netns
            .run_here(|| Socket::new(NETLINK_ROUTE))?
            .map_err(|source| NetlinkError::Socket {
                namespace: namespace.clone(),
                source,
            })?;
        Ok(Self::connect(socket, namespace))
    }

    // rtnetlink takes a socket made elsewhere only as a raw descriptor.
    #[allow(unsafe_code)]
    fn connect(socket: Socket, namespace: String) -> Self {
        // SAFETY: the descriptor comes straight from a socket we own and give
        // up here, so the TokioSocket becomes its only owner. Registering it
        // with the reactor only needs a runtime context, which both
        // constructors require of their caller.
        let socket = unsafe { TokioSocket::from_raw_fd(socket.into_raw_fd()) };
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        tokio::spawn(connection);
        Self { handle, namespace }
    }

    /// Which namespace this socket belongs to (for messages).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Wraps an rtnetlink failure with what was being done to which object.
    fn error(
        &self,
        operation: &'static str,
        object: impl fmt::Display,
        error: rtnetlink::Error,
    ) -> NetlinkError {
        match errno_of(&error) {
            Some(errno) => NetlinkError::Kernel {
                operation,
                object: object.to_string(),
                namespace: self.namespace.clone(),
                errno,
            },
            None => NetlinkError::Protocol {
                operation,
                object: object.to_string(),
                namespace: self.namespace.clone(),
                detail: error.to_string(),
            },
        }
    }
}
