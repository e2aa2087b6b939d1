# Multi-stage: build with the Rust toolchain, run on a slim Debian as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY vendor ./vendor
COPY benches ./benches
COPY config ./config
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home mupdate
COPY --from=build /src/target/release/mupdate-worker /usr/local/bin/mupdate-worker
USER mupdate
ENTRYPOINT ["mupdate-worker"]
CMD ["run"]
