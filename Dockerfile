# Weft's image: weft-controller, weft-agent and the `weft` CNI plugin (which
# the agent installs on each node), plus `nft` for the agent's masquerade
# table and a static busybox for the install-cni init container. It also
# carries the static kubectl plugin at /usr/local/bin/kubectl-weft, e.g.
#   docker create --name w <image> && docker cp w:/usr/local/bin/kubectl-weft . && docker rm w
#
#   docker build -t <registry>/weft:<version> .
#
# Offline, packaging/build-image.sh builds the same layout with buildah from
# binaries built on the machine: both run packaging/build-binaries.sh and
# packaging/assemble-rootfs.sh.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables busybox-static \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The commit the binaries report; the build context carries no .git:
# docker build --build-arg WEFT_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG WEFT_COMMIT=unknown
# The caches keep the crates and the target directory between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    packaging/build-binaries.sh /out \
 && packaging/assemble-rootfs.sh /rootfs /out

FROM scratch
COPY --from=build /rootfs /
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/bin
LABEL org.opencontainers.image.title="weft" \
      org.opencontainers.image.description="Weft pod network: weft-controller, weft-agent and the weft CNI plugin" \
      org.opencontainers.image.licenses="Apache-2.0"
CMD ["/usr/local/bin/weft-agent"]
