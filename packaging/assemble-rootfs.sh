#!/usr/bin/env bash
# Lays out the root filesystem of Weft's image in ROOTFS: the three binaries,
# `nft` (the agent's masquerade table) and a static busybox (the init
# container's sh/cp/mv), each dynamic executable with exactly the shared
# libraries `ldd` names. Both image builds run this one script — the
# Dockerfile in its Debian builder stage, packaging/build-image.sh on the
# host — so the two images have the same layout:
#
#   /usr/local/bin/weft-controller, /usr/local/bin/weft-agent
#   /usr/local/bin/weft             the CNI plugin, statically linked: the agent
#                                   copies it onto hosts whose libc is unknown
#   /usr/local/bin/kubectl-weft     the kubectl plugin, statically linked, for
#                                   operators to copy out of the image
#   /usr/sbin/nft                   + its libraries under /lib*, /usr/lib*
#   /bin/busybox, /bin/{sh,cp,mv,rm,cat,ls}
#
# Usage: assemble-rootfs.sh ROOTFS BINDIR   (BINDIR as build-binaries.sh fills it)
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: $0 ROOTFS BINDIR" >&2; exit 2; }
rootfs="$1"
controller="$2/weft-controller" agent="$2/weft-agent" plugin="$2/weft"
kubectl_weft="$2/kubectl-weft"

nft="$(command -v nft || true)"
busybox="$(command -v busybox || true)"
[[ -n "$nft" ]] || { echo "assemble-rootfs.sh: nft not found: apt-get install nftables" >&2; exit 1; }
[[ -n "$busybox" ]] || { echo "assemble-rootfs.sh: busybox not found: apt-get install busybox-static" >&2; exit 1; }
# A dynamic busybox would pull in its own libraries for no gain.
if ldd "$busybox" >/dev/null 2>&1; then
  echo "assemble-rootfs.sh: $busybox is dynamically linked: apt-get install busybox-static" >&2
  exit 1
fi
# The plugin runs on the host, not in the image: it must not depend on the
# image's libc.
if ldd "$plugin" >/dev/null 2>&1; then
  echo "assemble-rootfs.sh: $plugin is dynamically linked: build it with packaging/build-binaries.sh" >&2
  exit 1
fi
# The kubectl plugin runs wherever an operator copies it.
if ldd "$kubectl_weft" >/dev/null 2>&1; then
  echo "assemble-rootfs.sh: $kubectl_weft is dynamically linked: build it with packaging/build-binaries.sh" >&2
  exit 1
fi

# Copies FILE to the same path under the rootfs, following symlinks.
place() {
  install -D -m "${2:-0755}" "$1" "$rootfs$1"
}

# Copies the shared libraries and loader a dynamic executable needs.
place_libraries() {
  local library
  # ldd lines: "libx.so.1 => /lib/.../libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
  for library in $(ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    [[ -e "$rootfs$library" ]] || place "$library" 0644
  done
}

mkdir -p "$rootfs"
# Stripped: symbols are a quarter of each binary, and a panic still reports
# its message and source location without them.
install -D -s -m 0755 "$controller" "$rootfs/usr/local/bin/weft-controller"
install -D -s -m 0755 "$agent" "$rootfs/usr/local/bin/weft-agent"
install -D -s -m 0755 "$plugin" "$rootfs/usr/local/bin/weft"
install -D -s -m 0755 "$kubectl_weft" "$rootfs/usr/local/bin/kubectl-weft"
install -D -m 0755 "$nft" "$rootfs/usr/sbin/nft"
install -D -m 0755 "$busybox" "$rootfs/bin/busybox"
for applet in sh cp mv rm cat ls; do
  ln -sf busybox "$rootfs/bin/$applet"
done

for executable in "$controller" "$agent" "$nft"; do
  place_libraries "$executable"
done
# The loader must be executable.
find "$rootfs" -name 'ld-linux*.so*' -exec chmod 0755 {} +
