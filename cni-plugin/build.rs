//! Links `weft` as a position-dependent executable.
//!
//! A runtime starts the plugin once per verb, so start-up is most of an
//! ADD's cost. As a PIE the binary carries ~16,000 relative relocations that
//! the dynamic loader applies on every start (about a third of an ADD);
//! linked at a fixed address it needs none. Shared libraries and the stack
//! stay randomized.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bin=weft=-no-pie");
}
