# syntax=docker/dockerfile:1
# order-service container image: build with the locked dependency set, run the
# static-enough binary on a distroless base as a non-root user, with no shell.
#
#   docker build -t order-service .
#   docker run -p 127.0.0.1:50051:50051 -e ORDERS_ALLOW_UNAUTHENTICATED=true order-service
#
# (published on the host's loopback only: without --auth-tokens-file or
# --tls-client-ca every caller is `anonymous`; serve other hosts only with one.)
#
# BuildKit cache mounts keep the crates.io downloads and the compiled
# dependencies between builds: a change to src/ recompiles the two workspace
# crates, not every dependency. The base images are named by tag: pin them by
# digest (`name:tag@sha256:…`, from `docker buildx imagetools inspect`) in the
# registry you build from.

FROM rust:1.95-slim-bookworm AS build
# make: the server's allocator (jemalloc) is built from C source (bookworm's
# make, pinned as the base image is).
RUN apt-get update && apt-get install -y --no-install-recommends make=4.3-4.1 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY .cargo .cargo
COPY proto proto
COPY migrations migrations
COPY src src
COPY client client
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin order-service \
    && mkdir -p /out/data \
    && cp target/release/order-service /out/order-service

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="order-service" \
      org.opencontainers.image.description="gRPC order service whose one promise is that an order is placed exactly once" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"
COPY --from=build /out/order-service /usr/local/bin/order-service
# A writable place for the embedded SQLite file when no DATABASE_URL is given.
COPY --from=build --chown=65532:65532 /out/data /data
ENV ORDERS_LISTEN=0.0.0.0:50051 \
    ORDERS_HEALTH_LISTEN=0.0.0.0:8081 \
    ORDERS_METRICS_LISTEN=0.0.0.0:9464 \
    ORDERS_LOG_FORMAT=json \
    DATABASE_URL=sqlite:///data/orders.db
EXPOSE 50051 8081 9464
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/order-service"]
