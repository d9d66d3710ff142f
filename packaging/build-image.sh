#!/usr/bin/env bash
# Builds Weft's image offline with buildah from binaries built on this
# machine — the same layout as the Dockerfile (both run assemble-rootfs.sh) —
# and writes it as an OCI archive that `ctr images import`, `podman load` and
# `skopeo copy oci-archive:…` accept. Prints the archive's path on stdout
# (logs go to stderr). Needs root for buildah; installs buildah, nftables and
# busybox-static with apt-get when missing.
#
# Environment:
#   WEFT_IMAGE         image reference written into the archive
#                      (default localhost/weft:<workspace version>, what the chart uses)
#   WEFT_IMAGE_ARCHIVE output path (default target/image/weft.oci.tar)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"

version="$(awk -F'"' '/^\[workspace.package\]/ { in_package = 1 } in_package && $1 ~ /^version *= */ { print $2; exit }' Cargo.toml)"
[[ -n "$version" ]] || { echo "build-image.sh: cannot read the workspace version from Cargo.toml" >&2; exit 1; }
image="${WEFT_IMAGE:-localhost/weft:$version}"
archive="${WEFT_IMAGE_ARCHIVE:-$repo/target/image/weft.oci.tar}"

missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v nft >/dev/null || missing+=(nftables)
# busybox-static replaces a dynamically linked busybox.
if ! command -v busybox >/dev/null || ldd "$(command -v busybox)" >/dev/null 2>&1; then
  missing+=(busybox-static)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "build-image.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

start=$SECONDS
work="$(mktemp -d /tmp/weft-image.XXXXXX)"
# A throwaway store and network config dir, so nothing lands in
# /var/lib/containers or /etc/cni (where buildah would put its cni.lock).
storage=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
mkdir -p "$work/cni-plugins"
cat >"$work/containers.conf" <<CONF
[network]
network_backend = "cni"
network_config_dir = "$work/cni"
cni_plugin_dirs = ["$work/cni-plugins"]
CONF
export CONTAINERS_CONF="$work/containers.conf"
# buildah has no option for its blob-info cache, which it always keeps under
# /var/lib/containers/cache: remove it afterwards unless it was there before.
blob_cache=/var/lib/containers/cache
[[ -e /var/lib/containers ]] && had_containers_dir=1 || had_containers_dir=""
[[ -e "$blob_cache" ]] && had_blob_cache=1 || had_blob_cache=""
container=""
cleanup() {
  [[ -z "$container" ]] || buildah "${storage[@]}" rm "$container" >/dev/null 2>&1 || true
  rm -rf "$work"
  [[ -n "$had_blob_cache" ]] || rm -rf "$blob_cache"
  [[ -n "$had_containers_dir" ]] || rmdir /var/lib/containers 2>/dev/null || true
}
trap cleanup EXIT

echo "build-image.sh: building release binaries ..." >&2
packaging/build-binaries.sh "$work/bin"
packaging/assemble-rootfs.sh "$work/rootfs" "$work/bin"

container="$(buildah "${storage[@]}" from scratch)"
buildah "${storage[@]}" copy --quiet "$container" "$work/rootfs" / >/dev/null
buildah "${storage[@]}" config \
  --env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/bin \
  --cmd '["/usr/local/bin/weft-agent"]' \
  --label org.opencontainers.image.title=weft \
  --label org.opencontainers.image.description="Weft pod network: weft-controller, weft-agent and the weft CNI plugin" \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  "$container"
mkdir -p "$(dirname "$archive")"
# Written beside the archive and renamed over it: a reader (or a parallel
# build) never sees half an archive.
buildah "${storage[@]}" commit --quiet --format oci --disable-compression=false \
  "$container" "oci-archive:$work/weft.oci.tar:$image" >/dev/null
mv -f "$work/weft.oci.tar" "$archive.$$.tmp"
mv -f "$archive.$$.tmp" "$archive"

size=$(stat -c %s "$archive")
echo "build-image.sh: $image written to $archive ($((size / 1024)) KiB) in $((SECONDS - start)) s" >&2
echo "$archive"
