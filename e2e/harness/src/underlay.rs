//! The underlay network: namespaces, veths, bridges and addresses, made with
//! iproute2 inside the run's own namespaces only.
//!
//! Layout (all in namespaces; nothing in the root namespace):
//! ```text
//!   node-0 ──┐                                 ┌── node-2 (routed)
//!   node-1 ──┤ bridge seg-main    bridge seg-routed ├── …
//!   outside ─┤  172.31.1.0/24      172.31.2.0/24    │
//!            └──── router (.1 on both, forwarding) ─┘
//! ```
//! The bridges live in the `fabric` namespace. Every node and the outside
//! namespace have a default route via the router address of their segment.
//! A dual-stack cluster gives each segment an IPv6 subnet too (ULA,
//! `fd00:172:31:1::/64` and `fd00:172:31:2::/64`), with the same host numbers
//! and an IPv6 default route via the router's `::1`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weft_testing::run;

/// What to check first when `ip` cannot run or fails unexpectedly.
const IPROUTE2_HINT: &str = "running ip (is iproute2 installed?)";

/// The addresses of one underlay segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentAddressing {
    /// The segment's subnet.
    pub(crate) subnet: Ipv4Net,
    /// The segment's IPv6 subnet, used in dual-stack clusters only.
    pub(crate) subnet_v6: Ipv6Net,
    /// The bridge in the fabric namespace.
    pub(crate) bridge: &'static str,
    /// The router's interface name (in the router namespace) on this segment.
    pub(crate) router_link: &'static str,
}

impl SegmentAddressing {
    /// The router's address on this segment, every member's default gateway.
    pub(crate) fn gateway(&self) -> Ipv4Addr {
        self.host(1)
    }

    /// The address `host` (counted from the network address) with the prefix.
    pub(crate) fn host(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + host)
    }

    pub(crate) fn with_prefix(&self, address: Ipv4Addr) -> Ipv4Net {
        Ipv4Net::new(address, self.subnet.prefix_len()).expect("prefix of a valid subnet")
    }

    /// The router's IPv6 address on this segment.
    pub(crate) fn gateway_v6(&self) -> Ipv6Addr {
        self.host_v6(1)
    }

    /// The IPv6 address with the same host number as [`Self::host`]: host
    /// 10 is `…::a`.
    pub(crate) fn host_v6(&self, host: u32) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.subnet_v6.network()) + u128::from(host))
    }

    /// `address` with the IPv6 subnet's prefix.
    pub(crate) fn with_prefix_v6(&self, address: Ipv6Addr) -> Ipv6Net {
        Ipv6Net::new(address, self.subnet_v6.prefix_len()).expect("prefix of a valid subnet")
    }

    /// The addresses of host number `host`: IPv4, and IPv6 too with `dual_stack`.
    pub(crate) fn host_addresses(&self, host: u32, dual_stack: bool) -> Vec<IpNet> {
        let mut addresses = vec![IpNet::V4(self.with_prefix(self.host(host)))];
        if dual_stack {
            addresses.push(IpNet::V6(self.with_prefix_v6(self.host_v6(host))));
        }
        addresses
    }
}

/// Runs `ip` with `args`; the error carries the command line and its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).context(IPROUTE2_HINT)?;
    Ok(())
}

/// Names of all network namespaces `ip netns` knows.
pub(crate) fn list_netns() -> Result<Vec<String>> {
    let listing = run(Command::new("ip").args(["netns", "list"])).context(IPROUTE2_HINT)?;
    // Lines look like "name" or "name (id: 3)".
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Creates a namespace with its loopback up (the apiserver forwarder listens
/// on 127.0.0.1 in node namespaces; pods expect a working `lo` too).
pub(crate) fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Kills every process inside a namespace, then deletes it. Deleting alone
/// would only unmount its name while the processes keep it alive. A
/// namespace that is gone by then (another cleanup removed it first) is no
/// error.
pub(crate) fn delete_netns_with_processes(name: &str) -> Result<()> {
    let output = Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .with_context(|| format!("listing processes in namespace {name}"))?;
    for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // Gone already is fine: it may have been one of our process groups.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    match ip(&["netns", "delete", name]) {
        Err(_) if !Path::new("/run/netns").join(name).exists() => Ok(()),
        result => result.with_context(|| format!("deleting namespace {name}")),
    }
}

/// Writes a sysctl inside a namespace (`/proc/sys/net` is per namespace).
pub(crate) fn set_sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "sh",
        "-c",
        &format!("echo {value} > {path}"),
    ]))
    .with_context(|| format!("setting {key}={value} in namespace {netns}"))?;
    Ok(())
}

/// The fabric namespace with one bridge per segment.
pub(crate) fn create_fabric(fabric: &str, segments: &[SegmentAddressing], mtu: u32) -> Result<()> {
    add_netns(fabric)?;
    let mtu = mtu.to_string();
    for segment in segments {
        ip(&[
            "-n",
            fabric,
            "link",
            "add",
            segment.bridge,
            "mtu",
            &mtu,
            "type",
            "bridge",
        ])?;
        ip(&["-n", fabric, "link", "set", segment.bridge, "up"])?;
    }
    Ok(())
}

/// Connects namespace `netns` to a segment's bridge: a veth named `inner`
/// inside `netns` with `addresses`, its peer `port` plugged into the bridge
/// in `fabric`. The pair is created in the fabric namespace with the peer
/// placed directly in `netns`, so it never appears in the root namespace.
/// IPv6 addresses skip duplicate address detection, the link-local one
/// too: the harness hands out each once, and while an address is tentative
/// (a second) it cannot be bound, and neighbour discovery over the link
/// stalls, so the first packets of a fresh cluster went unanswered.
pub(crate) fn attach(
    fabric: &str,
    segment: &SegmentAddressing,
    port: &str,
    netns: &str,
    inner: &str,
    addresses: &[IpNet],
    mtu: u32,
) -> Result<()> {
    let mtu = mtu.to_string();
    ip(&[
        "-n", fabric, "link", "add", port, "mtu", &mtu, "type", "veth", "peer", "name", inner,
        "mtu", &mtu, "netns", netns,
    ])
    .with_context(|| format!("creating the underlay veth of {netns}"))?;
    ip(&[
        "-n",
        fabric,
        "link",
        "set",
        port,
        "master",
        segment.bridge,
        "up",
    ])?;
    for address in addresses {
        let text = address.to_string();
        let mut args = vec!["-n", netns, "addr", "add", &text, "dev", inner];
        if matches!(address, IpNet::V6(_)) {
            args.push("nodad");
        }
        ip(&args)?;
    }
    if addresses
        .iter()
        .any(|address| matches!(address, IpNet::V6(_)))
    {
        // Before the link is up, when the kernel gives it its link-local address.
        set_sysctl(netns, &format!("net.ipv6.conf.{inner}.accept_dad"), "0")?;
    }
    ip(&["-n", netns, "link", "set", inner, "up"])
}

/// Gives a namespace its default route via the segment's router, and with
/// `dual_stack` its IPv6 default route too.
pub(crate) fn default_route(
    netns: &str,
    segment: &SegmentAddressing,
    dual_stack: bool,
) -> Result<()> {
    ip(&[
        "-n",
        netns,
        "route",
        "add",
        "default",
        "via",
        &segment.gateway().to_string(),
    ])?;
    if dual_stack {
        ip(&[
            "-n",
            netns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &segment.gateway_v6().to_string(),
        ])?;
    }
    Ok(())
}

/// The router namespace: one leg on every segment, forwarding on (for IPv6
/// too with `dual_stack`).
pub(crate) fn create_router(
    router: &str,
    fabric: &str,
    segments: &[SegmentAddressing],
    mtu: u32,
    dual_stack: bool,
) -> Result<()> {
    add_netns(router)?;
    for segment in segments {
        let port = format!("rt-{}", segment.router_link);
        attach(
            fabric,
            segment,
            &port,
            router,
            segment.router_link,
            &segment.host_addresses(1, dual_stack),
            mtu,
        )?;
    }
    set_sysctl(router, "net.ipv4.ip_forward", "1")?;
    if dual_stack {
        set_sysctl(router, "net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_share_the_ipv4_host_numbers() {
        let segment = SegmentAddressing {
            subnet: "172.31.1.0/24".parse().unwrap(),
            subnet_v6: "fd00:172:31:1::/64".parse().unwrap(),
            bridge: "seg-main",
            router_link: "main",
        };
        assert_eq!(
            segment.gateway_v6(),
            "fd00:172:31:1::1".parse::<Ipv6Addr>().unwrap()
        );
        let addresses: Vec<String> = segment
            .host_addresses(10, true)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["172.31.1.10/24", "fd00:172:31:1::a/64"]);
        assert_eq!(segment.host_addresses(10, false).len(), 1);
    }
}
