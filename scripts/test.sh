#!/usr/bin/env bash
# The whole test suite against the real servers: starts RabbitMQ and Elasticsearch when
# they are not running (installing them when missing), then a real Kuzzle 2 on that
# Elasticsearch for tests/kuzzle.rs (scripts/kuzzle.sh: npm ci the first time), runs
# every test target, and stops what it started, even when a test fails.
#
# ENGINE=opensearch runs the suite on OpenSearch, without tests/kuzzle.rs (Kuzzle 2
# speaks to Elasticsearch only).
set -euo pipefail
cd "$(dirname "$0")/.."

started=()
cleanup() {
  local i
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do "${started[$i]}" stop || true; done
}
trap cleanup EXIT

if scripts/services.sh running; then
  echo "[test] services already running; leaving them running afterwards"
else
  started+=(scripts/services.sh)
  scripts/services.sh start
fi

targets=(--all-targets)
if [ "${ENGINE:-elasticsearch}" = elasticsearch ]; then
  if scripts/kuzzle.sh running; then
    echo "[test] kuzzle already running; leaving it running afterwards"
  else
    started+=(scripts/kuzzle.sh)
    scripts/kuzzle.sh start
  fi
else
  echo "[test] ENGINE=$ENGINE: Kuzzle 2 needs Elasticsearch; tests/kuzzle.rs is not run"
  targets=(--lib --bins --benches)
  for t in tests/*.rs; do
    [ "$(basename "$t" .rs)" = kuzzle ] || targets+=(--test "$(basename "$t" .rs)")
  done
fi
cargo test "${targets[@]}" "$@"
