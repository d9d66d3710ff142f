//! TX checksum offload on `weft.1`, and which kernels need it off.
//!
//! Kernels before 5.7 corrupt the outer UDP checksum of VXLAN packets whose
//! inner packet was masqueraded with fully random ports (and, via NAT on the
//! path, in some later distribution kernels): the receiver drops them as
//! "UDP: bad checksum", which shows up as 63-second connection delays
//! through Services. Upstream fixed the netfilter side in 5.7 ("netfilter:
//! nat: never update the UDP checksum when it's 0"); Calico uses the same
//! 5.7 threshold for its automatic workaround. With `auto` the agent turns
//! tx checksumming off on `weft.1` on kernels older than 5.7 and leaves the
//! (faster) offload on for newer ones; `off` forces the workaround anywhere,
//! e.g. behind a NAT that still shows the symptom.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::libc;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::config::ChecksumOffload;

/// The first kernel release with the fix.
pub const FIXED_IN: (u32, u32) = (5, 7);

/// Whether a kernel release string (`uname -r`, e.g. `6.1.0-18-amd64`) is
/// older than [`FIXED_IN`]. Unparseable releases count as affected: turning
/// offload off only costs throughput, while leaving it on where broken
/// loses packets.
pub fn kernel_affected(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse::<u32>());
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) < FIXED_IN,
        _ => true,
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string())
}

/// Whether offload should be on for this policy on this kernel.
pub fn wanted_tx_checksum(policy: ChecksumOffload, release: &str) -> bool {
    match policy {
        ChecksumOffload::On => true,
        ChecksumOffload::Off => false,
        ChecksumOffload::Auto => !kernel_affected(release),
    }
}

// From <linux/ethtool.h>: get/set TX checksumming.
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Runs one ethtool value command on `device` in the calling thread's
/// network namespace.
// The ethtool ioctl has no safe wrapper in nix: the agent's one use of unsafe code.
#[allow(unsafe_code)]
fn ethtool(device: &str, cmd: u32, data: u32) -> io::Result<u32> {
    if device.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device name {device:?} too long"),
        ));
    }
    let socket: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: ifreq is plain old data, all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(device.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL reads ifr_name and the EthtoolValue that
    // ifru_data points to, and writes back into it; both outlive the call.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL as _, &mut request) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Whether tx checksum offload is on for `device`.
pub fn tx_checksum(device: &str) -> io::Result<bool> {
    ethtool(device, ETHTOOL_GTXCSUM, 0).map(|data| data != 0)
}

/// Turns tx checksum offload on `device` on or off (`ethtool -K dev tx …`).
pub fn set_tx_checksum(device: &str, on: bool) -> io::Result<()> {
    ethtool(device, ETHTOOL_STXCSUM, u32::from(on)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_5_7_are_affected() {
        assert!(kernel_affected("4.19.0-21-amd64"));
        assert!(kernel_affected("5.4.0-150-generic"));
        assert!(kernel_affected("5.6.19"));
        assert!(!kernel_affected("5.7.0"));
        assert!(!kernel_affected("6.18.44-fc-v669"));
        assert!(!kernel_affected("10.0"));
        assert!(kernel_affected("garbage"));
    }

    #[test]
    fn policy_overrides_auto() {
        assert!(!wanted_tx_checksum(ChecksumOffload::Auto, "5.4.0"));
        assert!(wanted_tx_checksum(ChecksumOffload::Auto, "6.1.0"));
        assert!(wanted_tx_checksum(ChecksumOffload::On, "5.4.0"));
        assert!(!wanted_tx_checksum(ChecksumOffload::Off, "6.1.0"));
    }
}
