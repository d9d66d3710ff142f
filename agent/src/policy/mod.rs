//! NetworkPolicy for the pods on this node, in one nftables table.
//!
//! - [`watch`] keeps compact records of Pods, Namespaces and NetworkPolicies
//!   ([`model`]; label selectors in [`selector`]).
//! - [`model::screen_pod_addresses`] keeps only the pod addresses that lie
//!   in the slices of the pod's node and no other pod claims.
//! - [`compile`] turns them into this node's plan: per isolated pod and
//!   direction, an allow set of non-overlapping (peer range, protocol, port
//!   range) entries. The model and compiler live in the `weft-policy` crate,
//!   with no data plane, so `kubectl weft trace` runs the same code.
//! - [`nft`] writes the plan into the `inet weft-policy` table, whole or
//!   element by element, and reads its drop counters.
//! - [`enforce`] is the task that runs them: it compiles on every change,
//!   applies with its own backoff (a policy failure never holds up routes)
//!   and records the policy metrics.
//! - The table watch ([`crate::nft_watch`]) has [`nft`] restore the table
//!   moments after anyone else changes or deletes it.

pub mod enforce;
pub mod nft;
pub mod watch;

pub use weft_policy::{compile, model, selector};
