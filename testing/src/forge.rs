//! Forged frames, for tests of what a hostile pod can do: with the default
//! container capability NET_RAW a pod writes any Ethernet frame it likes on
//! its interface, whatever addresses its kernel gave it.
//!
//! The builders return bytes with correct lengths and checksums, so a frame
//! is refused only for what it claims, never for being malformed: [`ipv4`]
//! and [`ipv6`] packets carrying [`udp`], [`tcp`] or [`icmpv6_echo`],
//! framed by [`Ethernet`] (optionally 802.1Q-tagged), and [`vxlan`] for an
//! inner frame inside an outer UDP datagram. [`PacketSocket`] sends frames
//! from inside a named network namespace and captures what arrives there.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    bind, recvfrom, send, setsockopt, socket, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag,
    SockProtocol, SockType, SockaddrLike,
};
use nix::sys::time::TimeVal;

/// An Ethernet (MAC) address.
pub type Mac = [u8; 6];

/// The broadcast MAC address.
pub const BROADCAST: Mac = [0xff; 6];

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;

/// IP protocol number of TCP.
pub const PROTOCOL_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTOCOL_UDP: u8 = 17;
/// IP protocol (next header) number of ICMPv6.
pub const PROTOCOL_ICMPV6: u8 = 58;

/// The TCP SYN flag.
pub const SYN: u8 = 0x02;
/// The TCP RST flag.
pub const RST: u8 = 0x04;
/// The TCP ACK flag; `SYN | ACK` is a handshake's answer.
pub const ACK: u8 = 0x10;

/// Parses `aa:bb:cc:dd:ee:ff`, as `ip -j link` prints an address.
pub fn parse_mac(text: &str) -> Result<Mac> {
    let mut mac = [0u8; 6];
    let mut octets = text.split(':');
    for octet in &mut mac {
        let part = octets
            .next()
            .with_context(|| format!("MAC address {text:?} has fewer than six octets"))?;
        *octet = u8::from_str_radix(part, 16)
            .with_context(|| format!("MAC address {text:?} has a non-hex octet {part:?}"))?;
    }
    ensure!(
        octets.next().is_none(),
        "MAC address {text:?} has more than six octets"
    );
    Ok(mac)
}

/// The Ethernet header a frame goes out with.
#[derive(Clone, Copy, Debug)]
pub struct Ethernet {
    /// Where the frame is addressed.
    pub destination: Mac,
    /// Whom it claims to come from.
    pub source: Mac,
    /// An 802.1Q tag with this VLAN ID (priority 0); `Some(0)` is a
    /// priority-tagged frame, which Linux takes as untagged.
    pub vlan: Option<u16>,
}

impl Ethernet {
    /// The frame of `ethertype` carrying `payload`.
    pub fn frame(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(18 + payload.len());
        frame.extend_from_slice(&self.destination);
        frame.extend_from_slice(&self.source);
        if let Some(vlan) = self.vlan {
            frame.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            frame.extend_from_slice(&(vlan & 0x0fff).to_be_bytes());
        }
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// The frame carrying the IP `packet`, with the EtherType its version
    /// nibble calls for.
    pub fn ip(&self, packet: &[u8]) -> Vec<u8> {
        let ethertype = match packet.first().map(|byte| byte >> 4) {
            Some(6) => ETHERTYPE_IPV6,
            _ => ETHERTYPE_IPV4,
        };
        self.frame(ethertype, packet)
    }
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo-header UDP, TCP and ICMPv6 checksums cover (RFC 768,
/// RFC 8200 section 8.1).
fn pseudo_header(source: IpAddr, destination: IpAddr, protocol: u8, length: usize) -> Vec<u8> {
    let mut header = Vec::with_capacity(40);
    match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            header.extend_from_slice(&source.octets());
            header.extend_from_slice(&destination.octets());
            header.extend_from_slice(&[0, protocol]);
            header.extend_from_slice(&(length as u16).to_be_bytes());
        }
        (source, destination) => {
            header.extend_from_slice(&v6(source).octets());
            header.extend_from_slice(&v6(destination).octets());
            header.extend_from_slice(&(length as u32).to_be_bytes());
            header.extend_from_slice(&[0, 0, 0, protocol]);
        }
    }
    header
}

fn v6(address: IpAddr) -> Ipv6Addr {
    match address {
        IpAddr::V6(address) => address,
        IpAddr::V4(address) => panic!("{address} in an IPv6 packet: mixed address families"),
    }
}

/// An IPv4 packet from `source` to `destination` carrying `payload` of
/// `protocol`: no options, TTL 64, don't-fragment, header checksum set.
pub fn ipv4(source: Ipv4Addr, destination: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(20 + payload.len());
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    let sum = checksum(&[&packet]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// An IPv6 packet from `source` to `destination` carrying `payload` whose
/// type is `next_header`: no extension headers, hop limit 64.
pub fn ipv6(source: Ipv6Addr, destination: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(40 + payload.len());
    packet.extend_from_slice(&[0x60, 0, 0, 0]);
    packet.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    packet.extend_from_slice(&[next_header, 64]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    packet.extend_from_slice(payload);
    packet
}

/// The IP packet (of the addresses' family) carrying `segment` of
/// `protocol`, whose checksum field at `checksum_at` is filled in over the
/// pseudo-header; a UDP checksum of zero is sent as 0xffff (zero means
/// "none").
fn transport(
    source: IpAddr,
    destination: IpAddr,
    protocol: u8,
    mut segment: Vec<u8>,
    checksum_at: usize,
) -> Vec<u8> {
    let pseudo = pseudo_header(source, destination, protocol, segment.len());
    let mut sum = checksum(&[&pseudo, &segment]);
    if sum == 0 && protocol == PROTOCOL_UDP {
        sum = 0xffff;
    }
    segment[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            ipv4(source, destination, protocol, &segment)
        }
        (source, destination) => ipv6(v6(source), v6(destination), protocol, &segment),
    }
}

/// An IP packet carrying a UDP datagram from `source` to `destination`.
///
/// # Panics
/// When the two addresses are of different families.
pub fn udp(source: SocketAddr, destination: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&source.port().to_be_bytes());
    datagram.extend_from_slice(&destination.port().to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    transport(source.ip(), destination.ip(), PROTOCOL_UDP, datagram, 6)
}

/// An IP packet carrying a TCP segment from `source` to `destination` with
/// `flags` ([`SYN`], `SYN | ACK`, [`ACK`], …), sequence number `sequence`
/// and acknowledgement number `acknowledgement`: no options, a 64 KiB
/// window. A forged "reply" is a segment with the replier's addresses.
///
/// # Panics
/// When the two addresses are of different families.
pub fn tcp(
    source: SocketAddr,
    destination: SocketAddr,
    flags: u8,
    sequence: u32,
    acknowledgement: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut segment = Vec::with_capacity(20 + payload.len());
    segment.extend_from_slice(&source.port().to_be_bytes());
    segment.extend_from_slice(&destination.port().to_be_bytes());
    segment.extend_from_slice(&sequence.to_be_bytes());
    segment.extend_from_slice(&acknowledgement.to_be_bytes());
    segment.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    segment.extend_from_slice(payload);
    transport(source.ip(), destination.ip(), PROTOCOL_TCP, segment, 16)
}

/// An IPv6 packet carrying an ICMPv6 echo request.
pub fn icmpv6_echo(
    source: Ipv6Addr,
    destination: Ipv6Addr,
    identifier: u16,
    sequence: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut message = vec![128, 0, 0, 0];
    message.extend_from_slice(&identifier.to_be_bytes());
    message.extend_from_slice(&sequence.to_be_bytes());
    message.extend_from_slice(payload);
    transport(
        source.into(),
        destination.into(),
        PROTOCOL_ICMPV6,
        message,
        2,
    )
}

/// The payload of a VXLAN datagram (RFC 7348): the header with VNI `vni`
/// and the `inner` Ethernet frame. Wrap it with [`udp`] to the VXLAN port.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(8 + inner.len());
    payload.extend_from_slice(&[0x08, 0, 0, 0]);
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    payload
}

/// A raw packet socket (AF_PACKET, SOCK_RAW) on one interface of a network
/// namespace: it sends frames exactly as given and receives every frame the
/// interface sees, both ways.
#[derive(Debug)]
pub struct PacketSocket {
    socket: OwnedFd,
    place: String,
}

/// One frame a [`PacketSocket`] received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The frame, from the destination MAC on; an 802.1Q tag the driver
    /// took off is not in it (veth leaves tags in place).
    pub frame: Vec<u8>,
    /// Whether the namespace sent it rather than received it.
    pub outgoing: bool,
}

impl PacketSocket {
    /// Opens the socket on `interface` inside the network namespace at
    /// `netns` (e.g. `/var/run/netns/<name>`). The namespace is entered on
    /// a thread of its own, so no caller's thread (a tokio worker) ever
    /// changes namespace; the socket stays in the namespace it was made in.
    pub fn open(netns: impl AsRef<Path>, interface: &str) -> Result<Self> {
        let netns = netns.as_ref();
        let place = format!("{} in {}", interface, netns.display());
        let socket = in_netns(netns, || {
            let index = nix::net::if_::if_nametoindex(interface)
                .with_context(|| format!("no interface {interface} in {}", netns.display()))?;
            let socket = socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
            .context("opening an AF_PACKET socket (needs CAP_NET_RAW)")?;
            bind(socket.as_raw_fd(), &link_address(index)?)
                .with_context(|| format!("binding the packet socket to {interface}"))?;
            Ok(socket)
        })?;
        Ok(Self { socket, place })
    }

    /// Sends `frame` as it is.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let sent = send(self.socket.as_raw_fd(), frame, MsgFlags::empty())
            .with_context(|| format!("sending a {}-byte frame on {}", frame.len(), self.place))?;
        ensure!(
            sent == frame.len(),
            "{} took {sent} of {} bytes",
            self.place,
            frame.len()
        );
        Ok(())
    }

    /// The next frame, or `None` when none comes within `wait`.
    pub fn receive(&self, wait: Duration) -> Result<Option<Received>> {
        let wait = TimeVal::new(
            wait.as_secs() as _,
            wait.subsec_micros().max(u32::from(wait.is_zero())) as _,
        );
        setsockopt(&self.socket, sockopt::ReceiveTimeout, &wait)
            .with_context(|| format!("setting a receive timeout on {}", self.place))?;
        let mut buffer = vec![0u8; 65536];
        match recvfrom::<LinkAddr>(self.socket.as_raw_fd(), &mut buffer) {
            Ok((length, from)) => {
                buffer.truncate(length);
                Ok(Some(Received {
                    frame: buffer,
                    outgoing: from.is_some_and(|from| from.pkttype() == nix::libc::PACKET_OUTGOING),
                }))
            }
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(None),
            Err(errno) => bail!("receiving on {}: {errno}", self.place),
        }
    }
}

/// For waiting on several sockets at once (`poll`).
impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Runs `work` on a thread of its own that has entered the network
/// namespace at `netns`, so the caller's thread (perhaps a tokio worker)
/// never changes namespace. What `work` opens stays in that namespace.
fn in_netns<T: Send>(netns: &Path, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = File::open(netns)
                    .with_context(|| format!("opening network namespace {}", netns.display()))?;
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering network namespace {}", netns.display()))?;
                work()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The `sockaddr_ll` that binds a packet socket to the interface with
/// index `index`, every protocol.
fn link_address(index: u32) -> Result<LinkAddr> {
    let address = nix::libc::sockaddr_ll {
        sll_family: AddressFamily::Packet as u16,
        sll_protocol: (nix::libc::ETH_P_ALL as u16).to_be(),
        sll_ifindex: index as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // nix has no constructor for a link-layer address, only this one from
    // the C struct.
    #[allow(unsafe_code)]
    // SAFETY: `address` is a whole, initialised sockaddr_ll and the length
    // given is its size.
    let link = unsafe {
        LinkAddr::from_raw(
            (&address as *const nix::libc::sockaddr_ll).cast(),
            Some(std::mem::size_of::<nix::libc::sockaddr_ll>() as u32),
        )
    };
    link.context("building the link-layer address to bind to")
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};
    use std::time::Instant;

    use super::*;
    use crate::{require_root, TestNetns};

    /// Whether `parts` (a packet with its checksum filled in, and its
    /// pseudo-header) sum to zero, as a receiver checks.
    fn verifies(parts: &[&[u8]]) -> bool {
        checksum(parts) == 0
    }

    #[test]
    fn the_ipv4_header_checksum_matches_a_known_header() {
        // The example header of the Wikipedia article on the IPv4 header
        // checksum (192.168.0.1 -> 192.168.0.199, UDP, 115 bytes, DF):
        // its checksum is 0xb861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&[&header]), 0xb861);
        let packet = ipv4(
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 199),
            PROTOCOL_UDP,
            &[0; 95],
        );
        assert!(verifies(&[&packet[..20]]));
        assert_eq!(u16::from_be_bytes([packet[2], packet[3]]), 115);
    }

    #[test]
    fn an_odd_length_is_padded_with_a_zero_byte() {
        assert_eq!(checksum(&[&[0x12, 0x34, 0x56]]), !0x6834);
    }

    #[test]
    fn transport_checksums_verify_over_their_pseudo_headers() {
        let v4 = |last| SocketAddr::from(([10, 244, 0, last], 7000 + u16::from(last)));
        let v6 = |last: u16| SocketAddr::from((Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last), 9));
        let cases = [
            (udp(v4(2), v4(3), b"odd"), PROTOCOL_UDP, 20),
            (tcp(v4(2), v4(3), SYN, 1, 0, b""), PROTOCOL_TCP, 20),
            (udp(v6(2), v6(3), b"even"), PROTOCOL_UDP, 40),
            (tcp(v6(2), v6(3), SYN | ACK, 7, 2, b"x"), PROTOCOL_TCP, 40),
            (
                icmpv6_echo(
                    "fe80::1".parse().unwrap(),
                    "fe80::2".parse().unwrap(),
                    1,
                    2,
                    b"ping",
                ),
                PROTOCOL_ICMPV6,
                40,
            ),
        ];
        for (packet, protocol, header) in cases {
            let (source, destination): (IpAddr, IpAddr) = if header == 20 {
                assert!(verifies(&[&packet[..20]]), "IPv4 header of {packet:x?}");
                (
                    <[u8; 4]>::try_from(&packet[12..16]).unwrap().into(),
                    <[u8; 4]>::try_from(&packet[16..20]).unwrap().into(),
                )
            } else {
                (
                    <[u8; 16]>::try_from(&packet[8..24]).unwrap().into(),
                    <[u8; 16]>::try_from(&packet[24..40]).unwrap().into(),
                )
            };
            let segment = &packet[header..];
            let pseudo = pseudo_header(source, destination, protocol, segment.len());
            assert!(verifies(&[&pseudo, segment]), "{packet:x?}");
        }
    }

    #[test]
    fn frames_carry_the_tag_and_the_ethertype() {
        let link = Ethernet {
            destination: BROADCAST,
            source: parse_mac("0a:58:0a:f4:00:02").unwrap(),
            vlan: Some(0),
        };
        let frame = link.ip(&ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 59, &[]));
        assert_eq!(&frame[12..18], &[0x81, 0x00, 0x00, 0x00, 0x86, 0xdd]);
        let inner = Ethernet { vlan: None, ..link }.frame(0x88b5, b"hi");
        let outer = vxlan(1, &inner);
        assert_eq!(&outer[..8], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&outer[8..], &inner[..]);
        assert!(parse_mac("0a:58:0a").is_err());
        assert!(parse_mac("0a:58:0a:f4:00:02:03").is_err());
        assert!(parse_mac("0a:58:0a:f4:00:zz").is_err());
    }

    /// Two namespaces joined by a veth pair, `a` at 10.9.0.1 and
    /// fd09::1, `b` at 10.9.0.2 and fd09::2; the MACs of `a`'s and
    /// `b`'s ends.
    fn pair(test: &str) -> Result<(TestNetns, TestNetns, Mac, Mac)> {
        let a = TestNetns::create(&format!("{test}-a"));
        let b = TestNetns::create(&format!("{test}-b"));
        a.run(&[
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name(),
        ])?;
        for (netns, last) in [(&a, 1), (&b, 2)] {
            netns.run(&[
                "ip",
                "addr",
                "add",
                &format!("10.9.0.{last}/24"),
                "dev",
                "eth0",
            ])?;
            netns.run(&[
                "ip",
                "addr",
                "add",
                &format!("fd09::{last}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            netns.run(&["ip", "link", "set", "eth0", "up"])?;
        }
        let mac = |netns: &TestNetns| -> Result<Mac> {
            let links = netns.json(&["ip", "-j", "link", "show", "eth0"])?;
            parse_mac(
                links[0]["address"]
                    .as_str()
                    .context("eth0 has no address")?,
            )
        };
        let (mac_a, mac_b) = (mac(&a)?, mac(&b)?);
        Ok((a, b, mac_a, mac_b))
    }

    /// `open` run inside `netns`.
    fn bound<T: Send>(
        netns: &TestNetns,
        open: impl FnOnce() -> std::io::Result<T> + Send,
    ) -> Result<T> {
        in_netns(Path::new(&netns.path()), || Ok(open()?))
    }

    #[test]
    fn forged_frames_reach_sockets_and_are_answered() -> Result<()> {
        require_root!("creating network namespaces");
        let (a, b, mac_a, mac_b) = pair("forge")?;
        let receiver = bound(&b, || UdpSocket::bind("[::]:4000"))?;
        receiver.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _listener = bound(&b, || TcpListener::bind("[::]:4001"))?;
        let forger = PacketSocket::open(a.path(), "eth0")?;
        let link = Ethernet {
            destination: mac_b,
            source: mac_a,
            vlan: None,
        };
        let from_a = |ip: &str, port| SocketAddr::new(ip.parse().unwrap(), port);

        // A UDP datagram over each family, and one priority-tagged: the
        // kernel delivers only what it finds well formed.
        let tagged = Ethernet {
            vlan: Some(0),
            ..link
        };
        for (frame, sent) in [
            (
                link.ip(&udp(from_a("10.9.0.1", 5), from_a("10.9.0.2", 4000), b"v4")),
                "v4",
            ),
            (
                link.ip(&udp(from_a("fd09::1", 5), from_a("fd09::2", 4000), b"v6")),
                "v6",
            ),
            (
                tagged.ip(&udp(
                    from_a("10.9.0.1", 5),
                    from_a("10.9.0.2", 4000),
                    b"vlan0",
                )),
                "vlan0",
            ),
        ] {
            forger.send(&frame)?;
            let mut buffer = [0u8; 16];
            let (length, _) = receiver
                .recv_from(&mut buffer)
                .with_context(|| format!("the forged {sent} datagram"))?;
            assert_eq!(&buffer[..length], sent.as_bytes());
        }

        // A SYN to a listening port is answered with a SYN-ACK, which `a`'s
        // capture sees arrive.
        let capture = PacketSocket::open(a.path(), "eth0")?;
        forger.send(&link.ip(&tcp(
            from_a("10.9.0.1", 5),
            from_a("10.9.0.2", 4001),
            SYN,
            100,
            0,
            b"",
        )))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let answered = loop {
            ensure!(Instant::now() < deadline, "no SYN-ACK within 5 s");
            let Some(received) = capture.receive(Duration::from_millis(200))? else {
                continue;
            };
            let frame = &received.frame;
            if !received.outgoing && frame.len() >= 54 && frame[12..14] == [0x08, 0x00] {
                let tcp = &frame[34..];
                if tcp[..2] == 4001u16.to_be_bytes() && tcp[13] == SYN | ACK {
                    break u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
                }
            }
        };
        assert_eq!(answered, 101, "the SYN-ACK acknowledges the SYN");

        // An ICMPv6 echo request is answered too.
        forger.send(&link.ip(&icmpv6_echo(
            "fd09::1".parse().unwrap(),
            "fd09::2".parse().unwrap(),
            7,
            1,
            b"ping",
        )))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            ensure!(Instant::now() < deadline, "no echo reply within 5 s");
            let Some(received) = capture.receive(Duration::from_millis(200))? else {
                continue;
            };
            let frame = &received.frame;
            if !received.outgoing
                && frame.len() >= 58
                && frame[12..14] == [0x86, 0xdd]
                && frame[20] == PROTOCOL_ICMPV6
                && frame[54] == 129
            {
                break;
            }
        }
        Ok(())
    }
}
