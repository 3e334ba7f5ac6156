# switchyard: one binary, every role (route, load, ingest, compare, rollout, flags, plan, demo, health).
# Build:  docker build -t switchyard .
# Run:    docker run --rm switchyard demo
#
# Base images: a tag moves, a digest does not. Pin both by digest for a
# reproducible build, with the digests your registry or mirror serves, e.g.
#   docker buildx imagetools inspect rust:1.95-slim-bookworm     # prints its digest
#   docker build \
#     --build-arg RUST_IMAGE=rust:1.95-slim-bookworm@sha256:<digest> \
#     --build-arg RUNTIME_IMAGE=debian:bookworm-slim@sha256:<digest> \
#     -t switchyard .
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bin switchyard \
 && strip target/release/switchyard

# The runtime holds the binary, its TLS libraries and CAs, and nothing else:
# no shell tools, no HTTP client (the health check is `switchyard health`).
FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 switchyard \
 && useradd --system --uid 10001 --gid switchyard --home-dir /var/lib/switchyard --create-home switchyard \
 && mkdir -p /etc/switchyard /var/lib/switchyard/offline \
 && chown -R switchyard:switchyard /var/lib/switchyard
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config/switchyard.toml /etc/switchyard/switchyard.toml
COPY flags /etc/switchyard/flags
ENV SWITCHYARD_CONFIG=/etc/switchyard/switchyard.toml \
    SWITCHYARD_FLAGS_DIR=/etc/switchyard/flags \
    SWITCHYARD_OFFLINE_DIR=/var/lib/switchyard/offline \
    SWITCHYARD_LOG_JSON=true
USER 10001:10001
WORKDIR /var/lib/switchyard
# The router's ingest port and admin port. Other roles: set their admin
# address with SWITCHYARD_ADMIN_LISTEN (not --admin-listen), which the health
# check reads too, so it probes the port the role serves.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/switchyard", "health", "--quiet"]
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["route"]
