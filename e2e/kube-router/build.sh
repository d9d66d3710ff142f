#!/usr/bin/env bash
# Builds kube-router, the peer our NetworkPolicy enforcement is measured beside
# (only its network policy controller runs: --run-firewall
# --run-router=false --run-service-proxy=false), from its published Go module
# into a cache outside the repository keyed by version, and prints the
# binary's path on stdout (logs go to stderr).
#
# kube-router's go.mod has no replace directives and pins every dependency in
# its go.sum, so its main package (cmd/kube-router) is built in the downloaded
# module directory itself, read-only, with that module's own go.mod/go.sum
# (-mod=readonly): no copy, nothing stubbed.
#
# It builds with CGO_ENABLED=0 (go-build-cached's setting, and upstream's own
# release build): the firewall needs no cgo, it drives the kernel by exec'ing
# iptables, iptables-save, iptables-restore and ipset found on PATH at run
# time (ipset: Debian's `ipset` package).
#
# The version is stamped into pkg/version as upstream's Makefile does (with
# the module version instead of a git commit, and no build date, so two builds
# of one version are the same binary).
#
# A warm cache returns at once; parallel callers serialise on a lock in
# scripts/go-build-cached, so the binary is built once.
#
# Environment:
#   KUBE_ROUTER_VERSION  module version (default below; v2.1.0 is the only
#                        version the Go module proxy serves for /v2)
#   WEFT_E2E_CACHE       cache root (default /var/cache/weft-e2e)
#   GO                   go binary (default: `go` on PATH, else /usr/local/go/bin/go)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module=github.com/cloudnativelabs/kube-router/v2
version="${KUBE_ROUTER_VERSION:-v2.1.0}"
cache_root="${WEFT_E2E_CACHE:-/var/cache/weft-e2e}"
output="$cache_root/kube-router-$version/kube-router"

if [[ ! -x "$output" ]]; then
  module_dir="$("$here/../../scripts/go-module-dir" "$module@$version")"
  GOFLAGS="-mod=readonly -buildvcs=false" \
    "$here/../../scripts/go-build-cached" "$module_dir" ./cmd/kube-router "$output" \
    "-s -w -X $module/pkg/version.Version=$version"
fi
echo "$output"
