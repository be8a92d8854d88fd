# Container image of the Nearpath gateway (with the `nearpath` client and the `edge-node` binary).
# README "Container image". CI does not build it (no Docker daemon there); a test checks that
# every file it copies from the repository exists and that hadolint finds nothing
# (gateway/cli/tests/packaging.rs; .hadolint.yaml says which rule is off and why).
#
#   docker build -t nearpath .
#   docker run --rm -p 127.0.0.1:8080:8080 -p 127.0.0.1:8081:8081 -p 127.0.0.1:4433:4433/udp \
#     nearpath demo --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:8081 --quic-listen 0.0.0.0:4433
#   docker run -d -v nearpath:/var/lib/nearpath -v /etc/nearpath:/etc/nearpath:ro \
#     -e NEARPATH_ADMIN__TOKEN -p 8080:8080 -p 127.0.0.1:8081:8081 -p 4433:4433/udp nearpath

# Build stage: the release binaries. nasm makes OpenH264 use its assembly (faster encoding);
# libopus and FFmpeg's libraries are linked (Opus audio, libx264/NVENC/VAAPI through libavcodec);
# clang is for bindgen, which generates the FFmpeg bindings.
FROM rust:1-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends nasm pkg-config libclang-dev clang libopus-dev \
       libavcodec-dev libavutil-dev libswscale-dev libavformat-dev libavfilter-dev libavdevice-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the build between image builds (BuildKit); the
# binaries are copied out of the cached target folder, which the next stage cannot see.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nearpath-gateway-cli -p nearpath-edge-node --bins \
    && mkdir -p /out \
    && cp target/release/gateway target/release/nearpath target/release/edge-node /out/

# Runtime stage: Debian slim (glibc, libstdc++, libopus and FFmpeg's libraries, which the
# binaries link), no compiler. NVENC needs the host's NVIDIA driver (--gpus with the NVIDIA
# container toolkit), VAAPI the host's /dev/dri.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libopus0 libavcodec59 libavutil57 \
       libswscale6 libavformat59 libavfilter8 libavdevice59 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /var/lib/nearpath --create-home \
       --shell /usr/sbin/nologin nearpath
COPY --from=builder /out/gateway /out/nearpath /out/edge-node /usr/local/bin/
COPY config/examples/gateway.toml config/examples/edge-node.toml /etc/nearpath/
COPY LICENSE NOTICE geo/data/NRO_LICENSE geo/data/CENTROIDS.md /usr/share/doc/nearpath/
# Inside a container the listeners must take connections from outside it: publish the admin
# port on a private address only (-p 127.0.0.1:8081:8081). The store lives in the volume.
ENV NEARPATH_HTTP__LISTEN=0.0.0.0:8080 \
    NEARPATH_ADMIN__LISTEN=0.0.0.0:8081 \
    NEARPATH_QUIC__LISTEN=0.0.0.0:4433 \
    NEARPATH_STORE__PATH=/var/lib/nearpath/nearpath-gateway.db
# By number (the `nearpath` user created above): a runtime that checks for a non-root user
# before starting (Kubernetes' runAsNonRoot) cannot resolve a name.
USER 10001:10001
WORKDIR /var/lib/nearpath
VOLUME ["/var/lib/nearpath"]
EXPOSE 8080/tcp 8081/tcp 4433/udp
ENTRYPOINT ["gateway"]
CMD ["run", "--config", "/etc/nearpath/gateway.toml"]
