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

# The commit every binary reports (`/status`, `weft_build_info`, `weft
# --version`): given by the caller (the Dockerfile's WEFT_COMMIT build
# argument, whose context has no .git), else read from git, marked -dirty
# when the tree has uncommitted changes.
if [[ -z "${WEFT_COMMIT:-}" ]] && commit="$(git rev-parse --short=12 HEAD 2>/dev/null)"; then
  [[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] || commit="$commit-dirty"
  WEFT_COMMIT="$commit"
fi
export WEFT_COMMIT="${WEFT_COMMIT:-unknown}"

cargo build --release --locked -q -p weft-controller -p weft-agent
plugin="$(packaging/build-plugin.sh)"
kubectl_weft="$(packaging/build-static.sh kubectl-weft kubectl-weft)"

mkdir -p "$dest"
cp target/release/weft-controller target/release/weft-agent "$plugin" "$kubectl_weft" "$dest/"
