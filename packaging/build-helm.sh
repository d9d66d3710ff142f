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

if [[ -x "$binary" ]]; then
  echo "$binary"
  exit 0
fi

go_bin="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[[ -x "$go_bin" ]] || { echo "build-helm.sh: no go toolchain found (set GO=/path/to/go)" >&2; exit 1; }

mkdir -p "$cache_root"
exec 9>"$cache_root/.build-helm-$helm_version.lock"
flock 9
# Another caller may have finished the build while this one waited for the lock.
if [[ -x "$binary" ]]; then
  echo "$binary"
  exit 0
fi

staging="$(mktemp -d "$cache_root/.staging.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

# The machine has two cores shared with other work.
export GOMAXPROCS="${GOMAXPROCS:-2}"
export GOFLAGS="${GOFLAGS:--mod=readonly}"
export CGO_ENABLED=0

start=$SECONDS
echo "build-helm.sh: building helm $helm_version ..." >&2
(cd "$here/helm" && "$go_bin" build -p 2 -trimpath -ldflags="$ldflags" -o "$staging/helm" helm.sh/helm/v3/cmd/helm)
chmod 755 "$staging"
rm -rf "$cache"
mv "$staging" "$cache"
trap - EXIT
echo "build-helm.sh: helm $helm_version ready in $cache after $((SECONDS - start)) s" >&2
echo "$binary"
