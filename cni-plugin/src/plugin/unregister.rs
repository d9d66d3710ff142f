//! Deleting a link without waiting for the kernel to free it.
//!
//! A link deletion has two halves. Under the RTNL lock the kernel unlists
//! the device (and a veth's peer with it): its name and index disappear,
//! bridge ports, addresses and routes go, and an `RTM_DELLINK` notification
//! is sent. Then, after dropping the lock, the deleting task waits in
//! `netdev_run_todo` for an RCU barrier before the memory is freed. That
//! second half takes 12–30 ms on a HZ=250 kernel and nobody can observe its
//! end, yet a plain netlink request only returns after it.
//!
//! [`delete_link_unlisted`] hands the request to a detached process and
//! returns as soon as the kernel announces the link gone (about 0.5 ms),
//! leaving that process to sit out the barrier. The detached process is a
//! grandchild, so the caller has no child left to reap; init does. Where no
//! process can be started (a pid limit), the caller deletes and waits
//! itself, as a plain request would.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe2, read, ForkResult};
use rtnetlink::packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, SocketAddr};

use weft_core::netlink::{NetlinkError, Removal};

/// Multicast group of link notifications (`RTMGRP_LINK`).
const LINK_GROUP: u32 = 1;
/// `RTM_DELLINK`.
const DELLINK: u16 = 17;
/// `NLMSG_ERROR`, which also carries the acknowledgement of success.
const NLMSG_ERROR: u16 = 2;
/// Size of `struct nlmsghdr`.
const HEADER_LEN: usize = 16;
/// Offset of `ifi_index` in `struct ifinfomsg`.
const IFINFO_INDEX: usize = 4;
/// Descriptor the detached process reports its answer on.
const REPORT_FD: RawFd = 3;
/// Lowest descriptor the detached process parks its inherited ones on.
const SPARE_FD: RawFd = 10;

const NAMESPACE: &str = "the current network namespace";

/// Deletes link `index` of the calling thread's network namespace and
/// returns once the kernel has unlisted it (and a veth's peer), without
/// waiting for the kernel to free the device.
///
/// Forks, which is safe from any thread: the forked processes only make
/// raw system calls on memory prepared beforehand.
pub fn delete_link_unlisted(index: u32) -> Result<Removal, NetlinkError> {
    let socket_error = |source: std::io::Error| NetlinkError::Socket {
        namespace: NAMESPACE.into(),
        source,
    };
    let errno_error = |source: Errno| socket_error(source.into());
    // Subscribed before the request leaves, so the notification cannot be
    // missed.
    let mut monitor = Socket::new(NETLINK_ROUTE).map_err(socket_error)?;
    monitor
        .bind(&SocketAddr::new(0, LINK_GROUP))
        .map_err(socket_error)?;
    let devnull = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(socket_error)?;
    let (report_read, report_write) = pipe2(OFlag::O_CLOEXEC).map_err(errno_error)?;
    let request = delete_request(index);

    // SAFETY: the child only calls fork and _exit, and the grandchild only
    // makes async-signal-safe system calls on memory prepared before the
    // fork, so neither touches a lock another thread may hold.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            // SAFETY: as above.
            if let Ok(ForkResult::Child) = unsafe { fork() } {
                detached_delete(&request, devnull.as_raw_fd(), report_write.as_raw_fd());
            }
            // SAFETY: _exit skips atexit handlers and buffers that belong to
            // the parent.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => loop {
            match waitpid(child, None) {
                Err(Errno::EINTR) => continue,
                // ECHILD: SIGCHLD is ignored, so the kernel reaped it.
                Ok(_) | Err(Errno::ECHILD) => break,
                Err(errno) => return Err(errno_error(errno)),
            }
        },
        // No process to spare (a pid limit): delete and wait here instead.
        Err(_) => {
            // SAFETY: raw system calls on a buffer we own.
            let errno = unsafe { send_and_await_ack(&request) };
            return removal_of(errno);
        }
    }
    drop(report_write);
    await_unlisting(&monitor, &report_read, index)
}

/// The serialized `RTM_DELLINK` request for `index`, asking for an ack.
fn delete_request(index: u32) -> Vec<u8> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)),
    );
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// Runs in the detached grandchild: leaves the caller's session and stdio
/// (a runtime reads the plugin's stdout until every copy is closed), sends
/// the request, reports the kernel's answer and exits.
fn detached_delete(request: &[u8], devnull: RawFd, report: RawFd) -> ! {
    // SAFETY: plain system calls on descriptors this process owns and on
    // buffers that live until _exit; no allocation, no locks.
    unsafe {
        libc::setsid();
        // Above every descriptor about to be overwritten, whatever numbers
        // the parent happened to get.
        let report = libc::fcntl(report, libc::F_DUPFD, SPARE_FD);
        let devnull = libc::fcntl(devnull, libc::F_DUPFD, SPARE_FD);
        for stdio in 0..3 {
            libc::dup2(devnull, stdio);
        }
        libc::dup2(report, REPORT_FD);
        libc::syscall(libc::SYS_close_range, REPORT_FD + 1, libc::c_uint::MAX, 0);
        let errno = send_and_await_ack(request);
        let bytes = errno.to_ne_bytes();
        libc::write(REPORT_FD, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(0)
    }
}

/// Sends `request` on a new rtnetlink socket and returns the errno of the
/// kernel's answer (0 for success).
///
/// # Safety
/// Only raw system calls on a stack buffer: safe after fork.
unsafe fn send_and_await_ack(request: &[u8]) -> i32 {
    let last_errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: see the function's contract.
    unsafe {
        let socket = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_ROUTE as libc::c_int,
        );
        if socket < 0 {
            return last_errno();
        }
        if libc::send(socket, request.as_ptr().cast(), request.len(), 0) < 0 {
            return last_errno();
        }
        let mut answer = [0u8; 512];
        loop {
            let received = libc::recv(socket, answer.as_mut_ptr().cast(), answer.len(), 0);
            if received < 0 {
                if last_errno() == libc::EINTR {
                    continue;
                }
                return last_errno();
            }
            let received = received as usize;
            if received >= HEADER_LEN + 4
                && u16::from_ne_bytes([answer[4], answer[5]]) == NLMSG_ERROR
            {
                let code = [
                    answer[HEADER_LEN],
                    answer[HEADER_LEN + 1],
                    answer[HEADER_LEN + 2],
                    answer[HEADER_LEN + 3],
                ];
                return -i32::from_ne_bytes(code);
            }
        }
    }
}

/// Waits for the kernel's `RTM_DELLINK` of `index`, or for the detached
/// process's answer if that comes first (an error, or success when
/// notifications were lost to a full socket buffer).
fn await_unlisting(
    monitor: &Socket,
    report: &OwnedFd,
    index: u32,
) -> Result<Removal, NetlinkError> {
    let mut watching = true;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let mut fds = vec![PollFd::new(report.as_fd(), PollFlags::POLLIN)];
        if watching {
            fds.push(PollFd::new(monitor.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(kernel_error(errno)),
            Ok(_) => {}
        }
        let report_ready = fds[0].any().unwrap_or(false);
        let monitor_ready = watching && fds[1].any().unwrap_or(false);
        if monitor_ready {
            match recv(monitor.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
                Ok(length) if announces_deletion(&buffer[..length], index) => {
                    return Ok(Removal::Removed)
                }
                Ok(_) | Err(Errno::EINTR) => {}
                // ENOBUFS: notifications were dropped; the answer still comes.
                Err(_) => watching = false,
            }
        }
        if report_ready {
            return read_report(report);
        }
    }
}

/// Whether a datagram of link notifications contains the deletion of
/// `index`.
fn announces_deletion(mut datagram: &[u8], index: u32) -> bool {
    while let Ok(message) = NetlinkBuffer::new_checked(datagram) {
        let length = (message.length() as usize).max(HEADER_LEN);
        let payload = message.payload();
        if message.message_type() == DELLINK && payload.len() >= IFINFO_INDEX + 4 {
            let field = [
                payload[IFINFO_INDEX],
                payload[IFINFO_INDEX + 1],
                payload[IFINFO_INDEX + 2],
                payload[IFINFO_INDEX + 3],
            ];
            if i32::from_ne_bytes(field) == index as i32 {
                return true;
            }
        }
        // Messages in a datagram are 4-byte aligned.
        let next = length.next_multiple_of(4);
        if next >= datagram.len() {
            break;
        }
        datagram = &datagram[next..];
    }
    false
}

/// The detached process's answer: the request's errno.
fn read_report(report: &OwnedFd) -> Result<Removal, NetlinkError> {
    let mut bytes = [0u8; 4];
    let length = loop {
        match read(report, &mut bytes) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(kernel_error)?,
        }
    };
    if length != bytes.len() {
        return Err(NetlinkError::Protocol {
            operation: "deleting link",
            object: "in a detached process".into(),
            namespace: NAMESPACE.into(),
            detail: "the process exited without reporting the kernel's answer".into(),
        });
    }
    removal_of(i32::from_ne_bytes(bytes))
}

/// What the kernel's answer to the deletion means.
fn removal_of(errno: i32) -> Result<Removal, NetlinkError> {
    if errno == 0 {
        return Ok(Removal::Removed);
    }
    match Errno::from_raw(errno) {
        Errno::ENODEV | Errno::ENOENT => Ok(Removal::AlreadyGone),
        errno => Err(kernel_error(errno)),
    }
}

fn kernel_error(errno: Errno) -> NetlinkError {
    NetlinkError::Kernel {
        operation: "deleting link",
        object: "in a detached process".into(),
        namespace: NAMESPACE.into(),
        errno,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(message_type: u16, index: i32) -> Vec<u8> {
        const LENGTH: usize = HEADER_LEN + 16;
        let mut bytes = vec![0u8; LENGTH];
        bytes[..4].copy_from_slice(&(LENGTH as u32).to_ne_bytes());
        bytes[4..6].copy_from_slice(&message_type.to_ne_bytes());
        bytes[HEADER_LEN + IFINFO_INDEX..HEADER_LEN + IFINFO_INDEX + 4]
            .copy_from_slice(&index.to_ne_bytes());
        bytes
    }

    #[test]
    fn finds_the_deletion_of_its_index_among_other_notifications() {
        let mut datagram = notification(16, 7);
        datagram.extend(notification(DELLINK, 8));
        datagram.extend(notification(DELLINK, 7));
        assert!(announces_deletion(&datagram, 7));
        assert!(announces_deletion(&datagram, 8));
        assert!(!announces_deletion(&datagram, 9));
        assert!(!announces_deletion(&notification(16, 9), 9));
    }

    #[test]
    fn a_truncated_datagram_is_not_a_deletion() {
        let datagram = notification(DELLINK, 7);
        assert!(!announces_deletion(&datagram[..HEADER_LEN + 2], 7));
        assert!(!announces_deletion(&[], 7));
    }

    #[test]
    fn the_request_addresses_the_index_and_asks_for_an_ack() {
        let bytes = delete_request(42);
        let message = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(message.message_type(), DELLINK);
        assert_eq!(message.flags(), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(
            &message.payload()[IFINFO_INDEX..IFINFO_INDEX + 4],
            &42i32.to_ne_bytes()
        );
    }

    mod in_namespaces {
        use weft_core::netlink::{Netlink, Outcome, Removal, VethPair};
        use weft_core::netns::Netns;
        use weft_testing::TestNetns;

        use super::super::delete_link_unlisted;

        #[tokio::test(flavor = "current_thread")]
        async fn unlisted_delete_removes_both_ends_before_returning() {
            if !weft_testing::root_available("creating network namespaces") {
                return;
            }
            let node = TestNetns::create("unlist-node");
            let pod = TestNetns::create("unlist-pod");
            let (node_ns, pod_ns) = (
                Netns::open(node.path()).unwrap(),
                Netns::open(pod.path()).unwrap(),
            );
            let on_node = Netlink::in_netns(&node_ns).unwrap();
            let in_pod = Netlink::in_netns(&pod_ns).unwrap();
            let pair = VethPair {
                name: "wtunlist0",
                peer_name: "eth0",
                peer_netns: &pod_ns,
                mac: None,
                peer_mac: None,
                mtu: 1500,
            };
            assert_eq!(on_node.create_veth(&pair).await.unwrap(), Outcome::Created);
            let host = on_node.link_by_name("wtunlist0").await.unwrap().unwrap();

            let removal = node_ns
                .run_in(|| delete_link_unlisted(host.index))
                .unwrap()
                .unwrap();
            assert_eq!(removal, Removal::Removed);
            // Gone from both namespaces by the time the call returned, and the
            // name is free for a new pair at once.
            assert_eq!(on_node.link_by_index(host.index).await.unwrap(), None);
            assert_eq!(in_pod.link_by_name("eth0").await.unwrap(), None);
            assert_eq!(on_node.create_veth(&pair).await.unwrap(), Outcome::Created);

            let again = node_ns
                .run_in(|| delete_link_unlisted(host.index))
                .unwrap()
                .unwrap();
            assert_eq!(again, Removal::AlreadyGone);
        }
    }
}
