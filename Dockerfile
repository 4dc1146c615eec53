# syntax=docker/dockerfile:1
# Images of toolgate-operator and toolgate-proxy: `make images` builds both targets
#   docker build --target toolgate-operator -t ghcr.io/toolgate/toolgate-operator:<version> .
#   docker build --target toolgate-proxy    -t ghcr.io/toolgate/toolgate-proxy:<version> .
# The binaries come from the same cargo command as `make build` (a test keeps them equal);
# the final stages are distroless (glibc, no shell, no package manager) and run as the
# non-root user 65532, which the chart's and the sidecar's securityContexts also require.

# The toolchain of rust-toolchain.toml (`make images` passes it).
ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds (BuildKit/podman).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --workspace --bins \
    && mkdir -p /out \
    && cp target/release/toolgate-operator target/release/toolgate-proxy target/release/toolgate /out/

# glibc of Debian 12, like the build stage; tag :nonroot runs as 65532:65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532

FROM runtime AS toolgate-operator
LABEL org.opencontainers.image.title="toolgate-operator" \
      org.opencontainers.image.description="toolgate operator: McpPolicy controller, sidecar-injecting admission webhook, policy distribution" \
      org.opencontainers.image.source="https://github.com/toolgate/toolgate" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/toolgate-operator /usr/local/bin/toolgate-operator
# The HTTPS port (webhook, policy stream) and the admin port (metrics, probes).
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/toolgate-operator"]

FROM runtime AS toolgate-proxy
LABEL org.opencontainers.image.title="toolgate-proxy" \
      org.opencontainers.image.description="toolgate sidecar / standalone MCP proxy enforcing toolgate policies" \
      org.opencontainers.image.source="https://github.com/toolgate/toolgate" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/toolgate-proxy /usr/local/bin/toolgate-proxy
# The CLI too, for `kubectl exec ... -- toolgate validate` style checks inside the pod.
COPY --from=build /out/toolgate /usr/local/bin/toolgate
EXPOSE 15080 15090
ENTRYPOINT ["/usr/local/bin/toolgate-proxy"]
