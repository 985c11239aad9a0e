# syntax=docker/dockerfile:1
# floodwall: multi-stage build, slim non-root runtime.
#
#   docker build -t floodwall .
#   mkdir conf && cp deploy/kubernetes/policy.yaml conf/policy.yaml   # or your own
#   docker run -p 8080:8080 -p 9090:9090 -v $PWD/conf:/etc/floodwall:ro floodwall
#
# The policy is read from /etc/floodwall/policy.yaml: mount a directory that
# holds it (or a Kubernetes ConfigMap; edits are reloaded live). For
# Prometheus and probes to reach the admin listener from outside the
# container, the policy must bind it to 0.0.0.0 (server.admin.listen), as
# deploy/kubernetes/policy.yaml does; the built-in HEALTHCHECK uses
# 127.0.0.1 and works either way. Build and run details: docs/operations.md.

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY policies ./policies
COPY benches ./benches
COPY examples ./examples
RUN cargo build --locked --release --bin floodwall && strip target/release/floodwall

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 floodwall \
 && useradd --system --uid 10001 --gid floodwall --no-create-home --shell /usr/sbin/nologin floodwall
COPY --from=build /src/target/release/floodwall /usr/local/bin/floodwall
COPY policies/default.yaml /etc/floodwall/policy.yaml
USER floodwall:floodwall
VOLUME ["/etc/floodwall"]
EXPOSE 8080 9090
# /health/live on the admin listener; `floodwall probe` needs no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["floodwall", "probe", "http://127.0.0.1:9090/health/live"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["floodwall"]
CMD ["run", "--config", "/etc/floodwall/policy.yaml", "--log-format", "json"]
