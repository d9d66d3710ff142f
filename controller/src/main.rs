//! weft-controller binary.
fn main() {}
