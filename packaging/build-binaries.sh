#!/usr/bin/env bash
# Builds the image's three binaries in release mode and copies them into
# DEST: weft-controller and weft-agent (run inside the image, against its
# libc) and the CNI plugin `weft`, linked statically because the agent copies
# it onto every node, whose libc nobody knows. Used by the Dockerfile and by
# packaging/build-image.sh, so both images hold the same binaries.
#
# Usage: build-binaries.sh DEST
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 DEST" >&2; exit 2; }
dest="$1"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --locked -q -p weft-controller -p weft-agent
# Non-PIE, as cni-plugin/build.rs links it (crt-static alone would ask for a
# static PIE, which that flag breaks). An explicit --target keeps these flags
# off build scripts and puts the result in a target dir of its own, so the
# other release builds stay cached.
host_triple="$(rustc -vV | awk '/^host:/ { print $2 }')"
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --release --locked -q -p weft-cni --target "$host_triple"

mkdir -p "$dest"
cp target/release/weft-controller target/release/weft-agent "target/$host_triple/release/weft" "$dest/"
