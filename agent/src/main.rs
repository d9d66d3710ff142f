//! weft-agent binary.
fn main() {}
