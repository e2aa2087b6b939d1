#!/usr/bin/env bash
# The whole test suite against the real servers: starts RabbitMQ and Elasticsearch when
# they are not running (installing them when missing), runs every test target, and
# stops what it started, even when a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

if scripts/services.sh running; then
  echo "[test] services already running; leaving them running afterwards"
else
  trap 'scripts/services.sh stop' EXIT
  scripts/services.sh start
fi
cargo test --all-targets "$@"
