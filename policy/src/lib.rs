//! NetworkPolicy as Weft reads and compiles it, with no data plane: the
//! agent enforces what [`compile`] plans, and `kubectl weft trace` asks the
//! same code why one pod can or cannot reach another.
//!
//! - [`model`] keeps compact records of Pods, Namespaces and
//!   NetworkPolicies; [`model::screen_pod_addresses`] keeps only the pod
//!   addresses that lie in the slices of the pod's node and no other pod
//!   claims.
//! - [`selector`] matches label selectors.
//! - [`compile`] turns them into one node's plan: per isolated pod and
//!   direction, an allow set of non-overlapping (peer range, protocol, port
//!   range) entries; [`compile::PolicyPlan::fingerprint`] names a plan the
//!   same way in every process and build.
//! - [`explain`] judges one packet as the nodes at its two ends would,
//!   naming the policies, rules, peers and ports behind the verdict.

pub mod compile;
pub mod explain;
pub mod model;
pub mod selector;
