#!/usr/bin/env bash
# Starts RabbitMQ and Elasticsearch on 127.0.0.1 (installing them when missing), then
# the worker with its defaults, in the foreground. Ctrl-C stops the worker; the
# services keep running (scripts/services.sh stop ends them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh start
cargo build --release --quiet
exec target/release/mupdate-worker "$@"
