# syntax=docker/dockerfile:1
# Halyard MQTT broker: multi-stage build (Rust builder, Debian slim runtime).
#
#   docker build -t halyard .
#   docker run --read-only -p 1883:1883 -p 8080:8080 -v halyard-data:/data halyard
#
# The runtime writes only to /data (the redb store), so `--read-only` works. Ports:
# 1883 MQTT, 8883 MQTT over TLS, 8083 MQTT over WebSocket (when configured), 8080 HTTP
# (metrics, probes, admin API, status page).

FROM rust:1-slim-bookworm AS builder
WORKDIR /src
# Manifests first, so that dependency downloads are cached across source changes.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p halyard \
    && cp target/release/halyard /usr/local/bin/halyard \
    && strip /usr/local/bin/halyard || true

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
EXPOSE 1883 8883 8083 8080
# The HTTP token comes from the environment (HALYARD_HTTP_TOKEN) or http.token_file; the
# broker refuses a non-loopback HTTP listener without one.
ENTRYPOINT ["/usr/local/bin/halyard"]
CMD ["serve", "--config", "/etc/halyard/halyard.toml"]
