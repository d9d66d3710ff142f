//! What Weft's two long-running daemons (`weft-controller` and
//! `weft-agent`) share beside their work: how settings are layered
//! ([`config`]), the settings both declare, the cluster CIDRs and slice sizes
//! ([`slices`]), process set-up ([`process`]) and the `/healthz`, `/readyz`,
//! `/metrics` endpoint ([`serve`]).
//!
//! A crate of its own rather than part of `weft-core` so the CNI
//! plugin, which runs once per pod start, never builds an HTTP stack.

pub mod config;
pub mod process;
pub mod serve;
pub mod slices;
