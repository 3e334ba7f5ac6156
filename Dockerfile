# switchyard: one binary, every role (route, load, ingest, compare, rollout, flags, plan, demo).
# Build:  docker build -t switchyard .
# Run:    docker run --rm switchyard demo

FROM rust:1.95-slim-bookworm AS build
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

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
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
# The router's ingest port and admin port; other roles set --admin-listen.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["route"]
