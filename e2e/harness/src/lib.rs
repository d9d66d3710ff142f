//! Test support for Weft: a real control plane and namespace nodes.
