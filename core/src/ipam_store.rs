//! The plugin's address store on disk, as far as a reader outside the
//! plugin needs to know it: where it is and what its files mean. The plugin
//! (`weft-cni`) writes it under its lock; the agent reads it without the
//! lock, to compare it with the Pods on its node.
//!
//! A store directory holds:
//! - one file per allocated address, named by the address
//!   ([`address_of`]), holding the owner record `<containerID>\n<ifname>`
//!   ([`parse_owner`]);
//! - [`LOCK_FILE`], held with `flock` for the whole of every operation;
//! - `last_reserved_ip.<n>` ([`LAST_RESERVED_PREFIX`]), the round-robin
//!   position of range `n`;
//! - `.tmp-*` ([`TEMP_PREFIX`]), a claim in progress or a killed one's
//!   leftover, never an allocation.
//!
//! An address file appears whole (the plugin links a complete temp file to
//! its name), so a reader without the lock sees each address either
//! allocated with its record or not at all; only the set of files may
//! change while it reads.

use std::net::IpAddr;

/// The store of the conflist the agent installs (network `weft`, default
/// `dataDir` `/var/lib/cni/networks`): `<dataDir>/<network name>`.
pub const STORE_DIR: &str = "/var/lib/cni/networks/weft";

/// The lock file every plugin operation holds.
pub const LOCK_FILE: &str = "lock";

/// The prefix of the round-robin markers, followed by the range's position.
pub const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";

/// The prefix of temp files: claims in progress, never allocations.
pub const TEMP_PREFIX: &str = ".tmp-";

/// The address a store file name allocates; `None` for the lock, the
/// markers, temp files and anything else.
pub fn address_of(file_name: &str) -> Option<IpAddr> {
    file_name.parse().ok()
}

/// The container ID and interface name of an owner record
/// `<containerID>\n<ifname>`, tolerating the `\r\n` and trailing newline
/// other host-local writers use. The parts are not checked against the CNI
/// spec's rules here: the plugin does that when it builds an owner.
pub fn parse_owner(record: &str) -> Option<(&str, &str)> {
    let (container_id, ifname) = record.split_once('\n')?;
    let container_id = container_id.strip_suffix('\r').unwrap_or(container_id);
    let ifname = ifname.trim_end_matches(['\r', '\n']);
    Some((container_id, ifname))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_address_names_are_allocations() {
        assert_eq!(
            address_of("10.244.1.5"),
            Some("10.244.1.5".parse().unwrap())
        );
        assert_eq!(address_of("fd00::5"), Some("fd00::5".parse().unwrap()));
        for other in [
            LOCK_FILE,
            "last_reserved_ip.0",
            ".tmp-claim-42",
            "10.244.1.",
        ] {
            assert_eq!(address_of(other), None, "{other}");
        }
    }

    #[test]
    fn owner_records_parse_with_either_line_ending() {
        assert_eq!(parse_owner("abc\neth0"), Some(("abc", "eth0")));
        assert_eq!(parse_owner("abc\r\neth0\r\n"), Some(("abc", "eth0")));
        assert_eq!(parse_owner("abc"), None);
    }
}
