#!/usr/bin/env bash
# Builds one binary of the workspace as it ships outside the image's libc
# and prints its path on stdout: release, linked statically and non-PIE
# (crt-static alone would ask for a static PIE, which relocation-model=static
# rules out). Used for the CNI plugin `weft`, which the agent copies onto
# every node, and the kubectl plugin `kubectl-weft`, which operators copy
# onto workstations: nobody knows either's libc. An explicit --target keeps
# these flags off build scripts and proc macros and puts the result in a
# target dir of its own, so the other release builds stay cached and the
# static builds share their dependencies.
#
# Usage: build-static.sh PACKAGE BINARY
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 PACKAGE BINARY" >&2; exit 2; }
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"

host_triple="$(rustc -vV | awk '/^host:/ { print $2 }')"
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --release --locked -q -p "$1" --target "$host_triple" >&2
echo "$PWD/target/$host_triple/release/$2"
