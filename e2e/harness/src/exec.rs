//! Running programs for the harness inside a network namespace by name, or
//! as a one-shot ping (to completion with their stderr in the error is
//! [`weft_testing::run`]); the end of a log for error messages; and the
//! architecture name that Node labels and image configs carry. It depends on
//! no other module of the crate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The path of the network namespace `ip netns` knows as `netns`, for `setns`
/// or `nsenter --net=`.
pub(crate) fn netns_path(netns: &str) -> PathBuf {
    Path::new("/var/run/netns").join(netns)
}

/// A command that runs `program` inside network namespace `netns`
/// (`ip netns exec`).
pub(crate) fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns]).arg(program);
    command
}

/// Whether one ICMP echo to `ip` from namespace `netns` is answered within a
/// second.
pub(crate) fn ping_from(netns: &str, ip: IpAddr) -> bool {
    command_in(netns, "ping")
        .args(["-c1", "-W1", "-q", &ip.to_string()])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// The last `lines` lines of a log.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The architecture as Kubernetes labels name it (Go's GOARCH).
pub(crate) fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Whether `program` is on the test host's `PATH`.
pub fn command_exists(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|output| output.status.success())
}
