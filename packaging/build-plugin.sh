#!/usr/bin/env bash
# Builds the CNI plugin `weft` as it ships (static, non-PIE: see
# build-static.sh) and prints the binary's path on stdout. Used by
# build-binaries.sh (the image) and by the plugin's benchmark, so the
# figures are those of the shipped binary.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/build-static.sh" weft-cni weft
