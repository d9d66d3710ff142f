//! What the daemons report at `/status`, and what `kubectl weft` reads:
//! one JSON document per daemon, read-only, with no secrets. The daemons
//! build these types and serialise them; the CLI deserialises them, so a
//! field a newer daemon adds is ignored by an older CLI and a field an
//! older daemon lacks takes its default (every collection and optional
//! field is `#[serde(default)]`).
//!
//! Times are RFC 3339 strings in UTC; durations are whole milliseconds.

use serde::{Deserialize, Serialize};

/// The version every Weft binary was built at, for `/status` and the
/// `weft_build_info` metric.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit the binary was built from: the `WEFT_COMMIT` environment
/// variable at build time (the Dockerfile and `packaging/` set it), or
/// `unknown` for a plain `cargo build`.
pub const COMMIT: &str = match option_env!("WEFT_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// Version and commit of one running binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    /// The crate version, e.g. `0.1.0`.
    pub version: String,
    /// The commit, or `unknown`.
    pub commit: String,
}

impl Build {
    /// This binary's build.
    pub fn current() -> Self {
        Build {
            version: VERSION.to_string(),
            commit: COMMIT.to_string(),
        }
    }
}

/// An agent's `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The agent binary's build.
    pub build: Build,
    /// The Node this agent runs for.
    pub node: String,
    /// The backend it programs: `vxlan`, `host-gw` or `direct`.
    pub backend: String,
    /// The node's own slices (one per family), as CIDR text.
    #[serde(default)]
    pub slices: Vec<String>,
    /// The MTU the agent gives pods.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The underlay device and the address published as the public IP.
    #[serde(default)]
    pub underlay: Option<Underlay>,
    /// The VTEP MAC published (vxlan only).
    #[serde(default)]
    pub vtep_mac: Option<String>,
    /// Whether `/readyz` answers 200, and if not, why.
    pub readiness: Readiness,
    /// What the agent made of every peer it knows.
    #[serde(default)]
    pub peers: Peers,
    /// The last reconcile of the overlay, once one ran.
    #[serde(default)]
    pub last_reconcile: Option<Reconcile>,
    /// NetworkPolicy enforcement.
    #[serde(default)]
    pub policy: Option<PolicyStatus>,
    /// The plugin's address store on this node.
    #[serde(default)]
    pub ipam: Option<IpamStatus>,
    /// The kernel check, only when asked for with `?check=kernel`.
    #[serde(default)]
    pub kernel: Option<KernelCheck>,
    /// Weft's kernel state, only when asked for with `?check=dump`.
    #[serde(default)]
    pub dump: Option<KernelDump>,
}

/// The device the overlay runs over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Underlay {
    /// Interface name, e.g. `eth0`.
    pub device: String,
    /// The address published as `weft.dev/public-ip`.
    pub address: String,
}

/// Readiness and its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// What `/readyz` answers.
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The peers one agent knows, by what it made of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peers {
    /// Names of the peers whose entries the agent programs.
    #[serde(default)]
    pub accepted: Vec<String>,
    /// Peers the screen rejected: they get no kernel entries.
    #[serde(default)]
    pub rejected: Vec<RejectedPeer>,
    /// Peers whose entries the kernel refused, or whose slice another
    /// owner's route holds, waiting for a retry.
    #[serde(default)]
    pub held: Vec<HeldPeer>,
}

/// A peer the screen rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedPeer {
    /// The peer's Node.
    pub node: String,
    /// The annotation or field at fault, e.g. `weft.dev/public-ip`.
    pub field: String,
    /// Why, in words, e.g. "public IP 10.0.0.5 is also claimed by node b".
    pub reason: String,
}

/// A peer whose entries are held back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldPeer {
    /// The peer's Node.
    pub node: String,
    /// Why, e.g. the kernel's refusal or the conflicting route.
    pub reason: String,
    /// Milliseconds until the next attempt; none when every reconcile
    /// retries.
    #[serde(default)]
    pub retry_in_ms: Option<u64>,
}

/// One reconcile of the overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reconcile {
    /// When it finished (RFC 3339).
    pub at: String,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// `ok`, or the error.
    pub result: String,
    /// How many kernel entries the last full resync had to repair.
    #[serde(default)]
    pub repaired_at_last_resync: u64,
}

/// NetworkPolicy enforcement on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Whether the agent enforces NetworkPolicy.
    pub enabled: bool,
    /// The last sync of the policy table (when, how it ended).
    #[serde(default)]
    pub last_sync: Option<LastRun>,
    /// Pods isolated for ingress on this node.
    #[serde(default)]
    pub isolated_ingress: u64,
    /// Pods isolated for egress on this node.
    #[serde(default)]
    pub isolated_egress: u64,
    /// Policies the agent could not enforce.
    #[serde(default)]
    pub refused: Vec<RefusedPolicy>,
    /// A fingerprint of the plan the table enforces: equal fingerprints
    /// on two nodes (or from `trace`) mean the same plan.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// When something last ran and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRun {
    /// When (RFC 3339).
    pub at: String,
    /// `ok`, or the error.
    pub result: String,
}

/// A NetworkPolicy the agent refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedPolicy {
    /// `namespace/name`.
    pub policy: String,
    /// The field at fault.
    pub field: String,
    /// Why.
    pub reason: String,
}

/// The plugin's address store on this node, as the agent reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamStatus {
    /// How many addresses the store holds.
    pub allocated: u64,
    /// Addresses the store holds that no Pod on this node has, past the
    /// grace period: leak suspects.
    #[serde(default)]
    pub leak_suspects: Vec<String>,
}

/// What `?check=kernel` found: the plan the agent would apply now,
/// without applying it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelCheck {
    /// Entries the desired state has and the kernel lacks, e.g.
    /// `route 10.244.2.0/24 via 10.244.2.0 dev weft.1`.
    #[serde(default)]
    pub missing: Vec<String>,
    /// Entries the kernel holds that the desired state does not.
    #[serde(default)]
    pub excess: Vec<String>,
    /// Weft's nft tables whose contents differ from what the agent wrote.
    #[serde(default)]
    pub tables_changed: Vec<String>,
    /// With `&peer=<node>`: the entries this node must hold to reach that
    /// peer's pods, each with whether the kernel holds it (what
    /// `kubectl weft trace` shows as the path).
    #[serde(default)]
    pub peer: Option<PeerEntries>,
}

/// The kernel entries one node must hold for one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntries {
    /// The peer's Node.
    pub node: String,
    /// What the agent made of the peer: `accepted`, `rejected`, `held` or
    /// `unknown` (no such Node seen). Only an accepted peer has entries.
    pub state: String,
    /// Why the peer is not accepted, when it is not.
    #[serde(default)]
    pub reason: Option<String>,
    /// The entries, in the words of [`KernelCheck::missing`].
    #[serde(default)]
    pub entries: Vec<EntryCheck>,
}

/// One kernel entry and whether the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryCheck {
    /// The entry, e.g. `route 10.244.2.0/24 via 10.244.2.0 dev weft.1`.
    pub entry: String,
    /// Whether the kernel holds it exactly.
    pub held: bool,
}

/// What `?check=dump` returns: Weft's part of the node's kernel state as
/// the agent reads it, for bug reports (`kubectl weft bundle`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDump {
    /// Weft's links (overlay device, bridge, pod veths), one line each.
    #[serde(default)]
    pub links: Vec<String>,
    /// Every route in the main table of both families, and Weft's return
    /// routes (`table 8787`), one line each.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Weft's policy-routing rules (`proto 87`) of both families, one
    /// line each.
    #[serde(default)]
    pub rules: Vec<String>,
    /// The neighbour entries on Weft's devices.
    #[serde(default)]
    pub neighbours: Vec<String>,
    /// The FDB entries on the overlay device.
    #[serde(default)]
    pub fdb: Vec<String>,
    /// Weft's nftables tables by name (`inet weft`, `inet weft-policy`,
    /// `inet weft-guard`, ...), as `nft list table` prints them; a table
    /// that is absent is left out.
    #[serde(default)]
    pub tables: std::collections::BTreeMap<String, String>,
    /// What could not be read, if anything, and why.
    #[serde(default)]
    pub errors: Vec<String>,
}

impl KernelCheck {
    /// Whether the kernel holds exactly what the agent wants.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.excess.is_empty() && self.tables_changed.is_empty()
    }
}

/// The controller's `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerStatus {
    /// The controller binary's build.
    pub build: Build,
    /// This replica's identity in the leader Lease
    /// (`<pod name or hostname>-<pid>`).
    pub identity: String,
    /// Whether this replica leads.
    pub leading: bool,
    /// The holder of the leader Lease, as this replica last saw it.
    #[serde(default)]
    pub leader: Option<String>,
    /// Per family: the cluster CIDR and how many slices are used and free.
    #[serde(default)]
    pub families: Vec<FamilyUsage>,
    /// Nodes the controller will not touch, and why.
    #[serde(default)]
    pub untouched: Vec<UntouchedNode>,
}

/// Slice use of one family's cluster CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyUsage {
    /// The cluster CIDR.
    pub cluster_cidr: String,
    /// Slices held by Nodes.
    pub used: u64,
    /// Slices still free.
    pub free: u64,
}

/// A Node the controller leaves alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UntouchedNode {
    /// The Node.
    pub node: String,
    /// Why, e.g. "annotation disagrees with spec.podCIDR".
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_with_unknown_and_missing_fields_still_reads() {
        let text = r#"{
            "build": {"version": "9.9.9", "commit": "abc"},
            "node": "n1", "backend": "vxlan",
            "readiness": {"ready": true},
            "somethingNewer": 1
        }"#;
        let status: AgentStatus = serde_json::from_str(text).unwrap();
        assert_eq!(status.node, "n1");
        assert!(status.peers.accepted.is_empty());
        assert!(status.kernel.is_none());
    }

    #[test]
    fn a_kernel_check_is_clean_only_when_nothing_differs() {
        assert!(KernelCheck::default().is_clean());
        let drift = KernelCheck {
            missing: vec!["route 10.244.2.0/24".into()],
            ..KernelCheck::default()
        };
        assert!(!drift.is_clean());
    }
}
