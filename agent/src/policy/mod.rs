//! NetworkPolicy: what the agent keeps of Pods, Namespaces and
//! NetworkPolicies ([`model`], [`selector`]) and what a node enforces for
//! the pods on it ([`compile`]), kept up to date by [`watch`].

pub mod compile;
pub mod enforce;
pub mod model;
pub mod nft;
pub mod selector;
pub mod watch;
