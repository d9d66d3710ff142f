//! NetworkPolicy: what the agent keeps of Pods, Namespaces and
//! NetworkPolicies ([`model`], [`selector`]) and what a node enforces for
//! the pods on it ([`compile`]).

pub mod compile;
pub mod model;
pub mod selector;
