//! The `weft.dev/*` annotations Weft keeps on Node objects, and their formats.
//!
//! Pod CIDR annotations hold one CIDR in its usual text form
//! (`10.244.3.0/24`, `fd00:10:0:3::/64`). The controller always writes them,
//! even when `spec.podCIDRs` carries the same slice, so that
//! `kubectl get nodes -o custom-columns=NAME:.metadata.name,CIDR:.metadata.annotations.weft\.dev/pod-cidr`
//! shows every node's slice, and so an IPv6 slice can be recorded on a node
//! whose immutable `spec.podCIDRs` was set single-stack.

use crate::cidr::IpFamily;

/// The node's IPv4 pod CIDR slice.
pub const POD_CIDR: &str = "weft.dev/pod-cidr";

/// The node's IPv6 pod CIDR slice (dual-stack clusters only).
pub const POD_CIDR_V6: &str = "weft.dev/pod-cidr-v6";

/// The pod CIDR annotation key for `family`.
pub fn pod_cidr_key(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => POD_CIDR,
        IpFamily::V6 => POD_CIDR_V6,
    }
}

/// The backend the node's agent runs: `vxlan`, `host-gw` or `direct`.
/// Written by the agent.
pub const BACKEND_TYPE: &str = "weft.dev/backend-type";

/// Backend parameters peers need, as JSON: `{"vtepMAC":"0a:58:0a:f4:01:00"}`
/// for a node with a VXLAN device ([`BackendData`]). Written by the agent;
/// it is also where the agent restores its VTEP MAC from after a restart.
pub const BACKEND_DATA: &str = "weft.dev/backend-data";

/// The underlay address peers send tunnel packets and host-gw traffic to.
/// Written by the agent.
pub const PUBLIC_IP: &str = "weft.dev/public-ip";

/// Set by an operator to make the agent publish this address as
/// [`PUBLIC_IP`] instead of the node's own (e.g. a node behind NAT).
pub const PUBLIC_IP_OVERWRITE: &str = "weft.dev/public-ip-overwrite";

/// The JSON value of [`BACKEND_DATA`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendData {
    /// The MAC of the node's `weft.1` device, `aa:bb:cc:dd:ee:ff`; absent
    /// for host-gw nodes.
    #[serde(rename = "vtepMAC", default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<crate::agent::peer::VtepMac>,
}
