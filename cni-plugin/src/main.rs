//! The `weft` CNI plugin.
fn main() {}
