# syntax=docker/dockerfile:1
# Halyard MQTT broker: multi-stage build (Rust builder, Debian slim runtime).
#
#   docker build -t halyard .
#   docker run --read-only -p 1883:1883 -p 8080:8080 -v halyard-data:/data halyard
#
# The runtime writes only to /data (the redb store), so `--read-only` works. Ports, as
# deploy/halyard.toml configures them: 1883 MQTT, 8083 MQTT over WebSocket, 8080 HTTP
# (metrics, probes, admin API, status page). The admin API token comes from
# `-e HALYARD_HTTP_TOKEN=...` (or http.token_file); without one the broker generates a token
# at start-up and logs it once: `docker logs CONTAINER 2>&1 | grep token`.

# The version rust-toolchain.toml pins, so rustup downloads nothing more.
FROM rust:1.95.0-slim-bookworm AS builder
WORKDIR /src
# Dependencies first: this layer is rebuilt only when a manifest or the lock file changes,
# not on every source change.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY crates/halyard/Cargo.toml crates/halyard/
COPY crates/halyard-codec/Cargo.toml crates/halyard-codec/
COPY crates/halyard-core/Cargo.toml crates/halyard-core/
COPY crates/halyard-store/Cargo.toml crates/halyard-store/
COPY crates/halyard-server/Cargo.toml crates/halyard-server/
COPY crates/halyard-cluster/Cargo.toml crates/halyard-cluster/
COPY crates/halyard-bench/Cargo.toml crates/halyard-bench/
COPY crates/halyard-sim/Cargo.toml crates/halyard-sim/
COPY scripts/docker-stub-sources scripts/
RUN scripts/docker-stub-sources && cargo build --release --locked -p halyard
# Then the sources. Their files may be older than the stubs built above, so they are touched
# to make cargo rebuild the workspace's own crates. Any failing step fails the build.
COPY crates ./crates
RUN find crates -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p halyard \
    && cp target/release/halyard /usr/local/bin/halyard \
    && strip /usr/local/bin/halyard

FROM debian:bookworm-slim AS runtime
# A fixed, unprivileged uid/gid so volume permissions and `runAsNonRoot` are predictable.
RUN groupadd --system --gid 10001 halyard \
    && useradd --system --uid 10001 --gid halyard --home-dir /data --shell /usr/sbin/nologin halyard \
    && mkdir -p /data /etc/halyard \
    && chown halyard:halyard /data
COPY --from=builder /usr/local/bin/halyard /usr/local/bin/halyard
COPY deploy/halyard.toml /etc/halyard/halyard.toml
USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 1883 8083 8080
ENTRYPOINT ["/usr/local/bin/halyard"]
CMD ["serve", "--config", "/etc/halyard/halyard.toml"]
