#!/usr/bin/env bash
# Builds the CNI plugin `weft` as it ships and prints the binary's path on
# stdout: release, linked statically because the agent copies it onto every
# node, whose libc nobody knows, and non-PIE as cni-plugin/build.rs links it
# (crt-static alone would ask for a static PIE, which that flag breaks).
# An explicit --target keeps these flags off build scripts and proc macros
# and puts the result in a target dir of its own, so the other release
# builds stay cached. Used by build-binaries.sh (the image) and by the
# plugin's benchmark, so the figures are those of the shipped binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"

host_triple="$(rustc -vV | awk '/^host:/ { print $2 }')"
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --release --locked -q -p weft-cni --target "$host_triple" >&2
echo "$PWD/target/$host_triple/release/weft"
