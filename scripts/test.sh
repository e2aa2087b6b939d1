#!/usr/bin/env bash
# The whole test suite against the real servers: starts RabbitMQ and Elasticsearch when
# they are not running (installing them when missing), installs what tests/ops.rs and
# tests/examples.rs need when missing (promtool and prometheus, the examples' Python
# venv and npm packages: scripts/ops.sh), runs every test target, and stops what it
# started, even when a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

if scripts/services.sh running; then
  echo "[test] services already running; leaving them running afterwards"
else
  trap 'scripts/services.sh stop' EXIT
  scripts/services.sh start
fi
scripts/ops.sh install
cargo test --all-targets "$@"
