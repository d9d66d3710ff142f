//! NetworkPolicy for the pods on this node, in one nftables table.
//!
//! - [`watch`] keeps compact records of Pods, Namespaces and NetworkPolicies
//!   ([`model`]; label selectors in [`selector`]).
//! - [`compile`] turns them into this node's plan: per isolated pod and
//!   direction, an allow set of non-overlapping (peer range, protocol, port
//!   range) entries.
//! - [`nft`] writes the plan into the `inet weft-policy` table, whole or
//!   element by element, and reads its drop counters.
//! - [`enforce`] is the task that runs them: it compiles on every change,
//!   applies with its own backoff (a policy failure never holds up routes)
//!   and records the policy metrics.

pub mod compile;
pub mod enforce;
pub mod model;
pub mod nft;
pub mod selector;
pub mod watch;
