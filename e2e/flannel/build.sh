#!/usr/bin/env bash
# Builds flanneld, the peer the agent's benchmarks are measured beside
# (agent/benches/overlay/flannel.rs), from its published Go module into a cache
# outside the repository keyed by version, and prints the binary's path on
# stdout (logs go to stderr).
#
# flannel's go.mod has no replace directives, but its main package is the
# module root, so it is built inside a copy of the downloaded module with that
# module's own go.mod/go.sum (-mod=readonly).
#
# Two backends become empty packages in the copy (go refuses build overlays on
# files in the module cache, hence the copy); the benchmarks use vxlan:
# - tencentvpc: the Go module proxy refuses the Tencent Cloud SDK version
#   flannel pins (403, "not available"), and only this backend imports it;
# - udp: it needs cgo on amd64, and go-build-cached builds with CGO_ENABLED=0.
#
# A warm cache returns at once; parallel callers serialise on a lock in
# scripts/go-build-cached, so the binary is built once.
#
# Environment:
#   FLANNEL_VERSION  module version (default below)
#   WEFT_E2E_CACHE   cache root (default /var/cache/weft-e2e)
#   GO               go binary (default: `go` on PATH, else /usr/local/go/bin/go)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module=github.com/flannel-io/flannel
version="${FLANNEL_VERSION:-v0.28.10}"
cache_root="${WEFT_E2E_CACHE:-/var/cache/weft-e2e}"
output="$cache_root/flannel-$version/flanneld"

if [[ ! -x "$output" ]]; then
  module_dir="$("$here/../../scripts/go-module-dir" "$module@$version")"
  source_dir="$(mktemp -d)"
  trap 'rm -rf "$source_dir"' EXIT
  cp -R "$module_dir/." "$source_dir"
  chmod -R u+w "$source_dir"
  for backend in tencentvpc udp; do
    rm -f "$source_dir/pkg/backend/$backend"/*.go
    echo "package $backend" >"$source_dir/pkg/backend/$backend/$backend.go"
  done
  GOFLAGS="-mod=readonly -buildvcs=false" \
    "$here/../../scripts/go-build-cached" "$source_dir" . "$output" \
    "-s -w -X $module/pkg/version.Version=$version"
fi
echo "$output"
