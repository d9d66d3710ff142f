//! Running the `nft` command: the agent's masquerade table and the plugin's
//! hostPort table are both applied as `nft -f -` transactions, which the
//! kernel commits atomically or not at all.
//!
//! Everything here is blocking and acts in the network namespace of the
//! calling thread (the child process inherits it).

use std::io::Write;
use std::process::{Command, Stdio};

use crate::ip::IpFamily;
use crate::netlink::Removal;

/// The table of the plugin's hostPort mappings (`runtimeConfig.portMappings`),
/// family and name. The plugin creates it; the agent's uninstall deletes it.
pub const HOSTPORT_TABLE: &str = "inet weft-hostport";

/// nft's payload keyword for `family`'s header: `ip` or `ip6`.
pub fn header(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// nft's type for `family`'s addresses in a set: `ipv4_addr` or `ipv6_addr`.
pub fn address_type(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    }
}

/// The suffix that tells a per-family set or map apart: `v4` or `v6`.
pub fn suffix(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "v4",
        IpFamily::V6 => "v6",
    }
}

/// Why `nft` failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be run at all.
    #[error("running nft to {action}: {source} (install the nftables package)")]
    Spawn {
        /// What it was run for.
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `nft` ran and refused.
    #[error("nft failed to {action} ({status}): {stderr}")]
    Nft {
        /// What it was run for.
        action: &'static str,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

impl NftError {
    /// Whether the `nft` binary is not installed.
    pub fn is_missing_binary(&self) -> bool {
        matches!(self, NftError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Runs `nft args…`, feeding `stdin` when given, and returns its stdout.
/// `action` names the purpose in errors.
pub fn run(args: &[&str], stdin: Option<&str>, action: &'static str) -> Result<String, NftError> {
    let spawn_error = |source| NftError::Spawn { action, source };
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(NftError::Nft {
            action,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Applies `transaction` (an `nft -f` script) as one commit.
pub fn apply(transaction: &str, action: &'static str) -> Result<(), NftError> {
    run(&["-f", "-"], Some(transaction), action).map(drop)
}

/// `nft list table <table>` (`table` is family and name, `inet weft`), or
/// `None` when there is no such table.
pub fn list_table(
    table: &str,
    json: bool,
    action: &'static str,
) -> Result<Option<String>, NftError> {
    let mut args = Vec::with_capacity(5);
    if json {
        args.push("-j");
    }
    args.push("list");
    args.push("table");
    args.extend(table.split_whitespace());
    match run(&args, None, action) {
        Ok(listing) => Ok(Some(listing)),
        // Listing a missing table is the only failure of a working nft
        // here; a table we cannot list is one we cannot have made either.
        Err(NftError::Nft { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Deletes `table` if it is there, as one transaction that declares the
/// table first: a missing table is no error, and no error text has to be
/// matched.
pub fn delete_table(table: &str, action: &'static str) -> Result<Removal, NftError> {
    let existed = list_table(table, false, action)?.is_some();
    apply(&format!("table {table}\ndelete table {table}\n"), action)?;
    Ok(if existed {
        Removal::Removed
    } else {
        Removal::AlreadyGone
    })
}
