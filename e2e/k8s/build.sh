#!/usr/bin/env bash
# Builds the Kubernetes binaries the e2e harness runs from their published Go
# modules, into a cache outside the repository keyed by version, and prints that
# cache directory on stdout (logs go to stderr).
#
# Usage: build.sh [COMPONENT...]   (default: every component below)
# The namespace-node tests need only kube-apiserver and etcd; the real-node tests
# (kubelet + containerd per node) also the controllers, kubelet, kube-proxy and
# CoreDNS; `make conformance` also e2e.test and agnhost. Each binary is built once and
# moved into the cache on its own, so asking for more later builds only the
# missing ones.
#
# A warm cache returns at once. Parallel callers (several `cargo test` binaries)
# serialise on a lock, so the binaries are built once.
#
# Environment:
#   WEFT_E2E_CACHE  cache root (default /var/cache/weft-e2e)
#   GO              go binary (default: `go` on PATH, else /usr/local/go/bin/go)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The versions are the ones pinned in the go.mod files beside this script.
module_version() {
  awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$here/$1/go.mod"
}
k8s_version="$(module_version kubernetes k8s.io/kubernetes)"
etcd_version="$(module_version etcd go.etcd.io/etcd/server/v3)"
[[ -n "$k8s_version" && -n "$etcd_version" ]] || { echo "build.sh: cannot read versions from go.mod files in $here" >&2; exit 1; }

k8s_minor="${k8s_version#v1.}"; k8s_minor="${k8s_minor%%.*}"
k8s_ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$k8s_minor \
 -X k8s.io/component-base/version.gitTreeState=clean"

# One line per binary: name, module directory (beside this script), package, ldflags.
# Adding kubelet, kube-scheduler or kube-controller-manager is one more line here;
# -mod=mod lets go add the extra requirements to go.mod/go.sum on first build.
components=(
  "kube-apiserver          kubernetes k8s.io/kubernetes/cmd/kube-apiserver          $k8s_ldflags"
  "etcd                    etcd       go.etcd.io/etcd/server/v3                     -s -w"
  "kube-controller-manager kubernetes k8s.io/kubernetes/cmd/kube-controller-manager $k8s_ldflags"
  "kube-scheduler          kubernetes k8s.io/kubernetes/cmd/kube-scheduler          $k8s_ldflags"
  "kubelet                 kubernetes k8s.io/kubernetes/cmd/kubelet                 $k8s_ldflags"
  "kube-proxy              kubernetes k8s.io/kubernetes/cmd/kube-proxy              $k8s_ldflags"
  # The upstream network e2e tests, trimmed (kubernetes/netsuite, a test
  # binary), and the server their pods run, for `make conformance`.
  "e2e.test                kubernetes weft.local/e2e/kubernetes/netsuite            $k8s_ldflags"
  "agnhost                 kubernetes k8s.io/kubernetes/test/images/agnhost         $k8s_ldflags"
  # The server of the Conntrack test for kubernetes#74839 (its own image).
  "regression-issue-74839  kubernetes k8s.io/kubernetes/test/images/regression-issue-74839 $k8s_ldflags"
  # kubeadm's CoreDNS for this Kubernetes release (coredns/go.mod).
  "coredns                 coredns    weft.local/e2e/coredns                        -s -w"
)

cache_root="${WEFT_E2E_CACHE:-/var/cache/weft-e2e}"
cache="$cache_root/k8s-$k8s_version-etcd-$etcd_version"

# The components asked for, checked against the list above.
wanted=("$@")
if [[ ${#wanted[@]} -eq 0 ]]; then
  for line in "${components[@]}"; do wanted+=("${line%% *}"); done
fi
for name in "${wanted[@]}"; do
  known=no
  for line in "${components[@]}"; do [[ "${line%% *}" == "$name" ]] && known=yes; done
  [[ $known == yes ]] || { echo "build.sh: unknown component '$name'; known: $(printf '%s ' "${components[@]%% *}")" >&2; exit 2; }
done

# scripts/go-build-cached builds each missing binary once (under a lock, moved
# into the cache only when complete) and returns at once for a present one.
# -mod=mod lets go add a new component's requirements to go.mod/go.sum.
export GOFLAGS="${GOFLAGS:--mod=mod}"
for line in "${components[@]}"; do
  read -r name dir package ldflags <<<"$line"
  [[ " ${wanted[*]} " == *" $name "* ]] || continue
  "$here/../../scripts/go-build-cached" "$here/$dir" "$package" "$cache/$name" "$ldflags"
done
echo "$cache"
