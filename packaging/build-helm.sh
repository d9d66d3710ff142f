#!/usr/bin/env bash
# Builds the helm command from its published Go module (helm.sh/helm/v3, at
# the version pinned in helm/go.mod beside this script) into a cache outside
# the repository keyed by that version, and prints the binary's path on
# stdout (logs go to stderr).
#
# A warm cache returns at once. Parallel callers (several test binaries)
# serialise on a lock, so helm is built once.
#
# Environment:
#   WEFT_PACKAGING_CACHE  cache root (default /var/cache/weft-packaging)
#   GO                    go binary (default: `go` on PATH, else /usr/local/go/bin/go)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

module_version() {
  awk -v m="$1" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$here/helm/go.mod"
}
helm_version="$(module_version helm.sh/helm/v3)"
client_go_version="$(module_version k8s.io/client-go)"
[[ -n "$helm_version" && -n "$client_go_version" ]] || { echo "build-helm.sh: cannot read versions from $here/helm/go.mod" >&2; exit 1; }

# helm's own Makefile stamps its version and, from client-go v0.N, the
# Kubernetes version 1.N that `helm template` and `helm lint` assume when no
# cluster is asked; without it they would claim Kubernetes v1.20.
k8s_minor="${client_go_version#v0.}"; k8s_minor="${k8s_minor%%.*}"
ldflags="-s -w \
 -X helm.sh/helm/v3/internal/version.version=$helm_version \
 -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor \
 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor"

cache_root="${WEFT_PACKAGING_CACHE:-/var/cache/weft-packaging}"
cache="$cache_root/helm-$helm_version"
binary="$cache/helm"

"$here/../scripts/go-build-cached" "$here/helm" helm.sh/helm/v3/cmd/helm "$binary" "$ldflags"
echo "$binary"
