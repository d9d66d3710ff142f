#!/usr/bin/env bash
# Renders the plain manifests and the chart's golden files from charts/weft
# with `helm template`:
#
#   manifests/weft.yaml                            default values, namespace kube-system
#   charts/weft/tests/golden/<case>.yaml           charts/weft/tests/<case>.values.yaml,
#                                                  namespace weft-system
#
# into OUT (default: the repository, i.e. update them in place). The
# packaging tests render into a temporary OUT and fail on any difference, so
# after changing the chart run this and review the diff.
#
# Environment:
#   HELM  helm binary (default: built and cached by packaging/build-helm.sh)
#
# Usage: render-manifests.sh [OUT]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m "${1:-$repo}")"
helm="${HELM:-$("$repo/packaging/build-helm.sh")}"
chart="$repo/charts/weft"

# Fixed release name: every object's name is fixed anyway (there is one pod
# network per cluster), and this keeps the output independent of it.
render() {
  "$helm" template weft "$chart" "$@"
}

mkdir -p "$out/manifests" "$out/charts/weft/tests/golden"
version="$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2 }' "$chart/Chart.yaml")"
{
  echo "# Weft $version, rendered from charts/weft with its default values by"
  echo "# packaging/render-manifests.sh: edit the chart, then run the script."
  echo "# Install: kubectl apply -f manifests/  (see docs/configuration.md for the settings)"
  render --namespace kube-system
} >"$out/manifests/weft.yaml"

for values in "$chart"/tests/*.values.yaml; do
  case_name="$(basename "$values" .values.yaml)"
  render --namespace weft-system --values "$values" >"$out/charts/weft/tests/golden/$case_name.yaml"
done
