#!/usr/bin/env bash
# Builds the image's three binaries in release mode and copies them into
# DEST: weft-controller and weft-agent (run inside the image, against its
# libc) and the CNI plugin `weft`, built statically by build-plugin.sh. Used
# by the Dockerfile and by packaging/build-image.sh, so both images hold the
# same binaries. Also the kubectl plugin `kubectl-weft`, built statically by
# build-static.sh, which the image carries for operators to copy out.
#
# Usage: build-binaries.sh DEST
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 DEST" >&2; exit 2; }
dest="$1"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --locked -q -p weft-controller -p weft-agent
plugin="$(packaging/build-plugin.sh)"
kubectl_weft="$(packaging/build-static.sh kubectl-weft kubectl-weft)"

mkdir -p "$dest"
cp target/release/weft-controller target/release/weft-agent "$plugin" "$kubectl_weft" "$dest/"
