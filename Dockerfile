# Multi-stage: build with the Rust toolchain, run on a slim Debian as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
# No .git in the image's context: the commit `--version` names is passed in
# (docker build --build-arg MUPDATE_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .).
ARG MUPDATE_GIT_COMMIT=unknown
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY vendor ./vendor
# The targets Cargo.toml declares must exist for any build (the benchmark, the
# simulation's test), though only the binary is built.
COPY benches ./benches
COPY tests ./tests
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
