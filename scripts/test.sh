#!/usr/bin/env bash
# First the book, which needs no server, so that a broken one fails early
# (scripts/book.sh: builds docs/ with mdbook, installing it when missing, and runs
# tests/book.rs, its configuration keys and links).
#
# Then the whole test suite against the real servers: starts RabbitMQ and Elasticsearch
# when they are not running (installing them when missing), then a real Kuzzle 2 on that
# Elasticsearch for tests/kuzzle.rs (scripts/kuzzle.sh: npm ci the first time), installs
# what tests/ops.rs and tests/examples.rs need when missing (promtool and prometheus, the
# examples' Python venv and npm packages: scripts/ops.sh), runs every test target but
# tests/cluster.rs; then the Debian package (scripts/package-test.sh: built, installed
# with dpkg, its worker run against the servers, upgraded, removed, purged; PACKAGE=0
# leaves it out); then starts the local cluster (scripts/cluster.sh: three RabbitMQ and
# three Elasticsearch nodes) for tests/cluster.rs and says how long that part took.
# Stops what it started, even when a test fails.
#
# ENGINE=opensearch runs the suite on OpenSearch, without tests/kuzzle.rs (Kuzzle 2
# speaks to Elasticsearch only); the cluster is Elasticsearch's either way.
# CLUSTER=0 leaves out the cluster part (e.g. with a filter that selects no cluster test).
#
# Then the engine matrix (scripts/conformance.sh): each other engine of services.sh
# (Elasticsearch 7, 8, 9, OpenSearch 2, 3, less the one the suite ran on) in turn on
# port 9210, the conformance subset against it, one line per engine. MATRIX=0 leaves it
# out; MATRIX_ENGINES="elasticsearch-7 opensearch-3" chooses the engines.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/book.sh

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

# Every target but the cluster's, which runs on its own below.
targets=(--lib --bins --benches)
skip=cluster
if [ "${ENGINE:-elasticsearch}" = elasticsearch ]; then
  if scripts/kuzzle.sh running; then
    echo "[test] kuzzle already running; leaving it running afterwards"
  else
    started+=(scripts/kuzzle.sh)
    scripts/kuzzle.sh start
  fi
else
  echo "[test] ENGINE=$ENGINE: Kuzzle 2 needs Elasticsearch; tests/kuzzle.rs is not run"
  skip="cluster kuzzle"
fi
for t in tests/*.rs; do
  name=$(basename "$t" .rs)
  case " $skip " in *" $name "*) ;; *) targets+=(--test "$name") ;; esac
done
# The deterministic simulation (tests/simulation/, no server): it prints the seeds it ran.
targets+=(--test simulation)
scripts/ops.sh install
cargo test "${targets[@]}" "$@"
# The Debian package, built, installed here, run against the servers, removed and purged.
if [ "${PACKAGE:-1}" = 0 ]; then
  echo "[test] PACKAGE=0: the Debian package is not tested"
else
  t0=$SECONDS
  scripts/package-test.sh
  echo "[test] the package test took $((SECONDS - t0)) s"
fi

status=0
if [ "${MATRIX:-1}" = 0 ]; then
  echo "[test] MATRIX=0: the engine matrix is not run"
else
  case "${ENGINE:-elasticsearch}" in
    elasticsearch) main_engine=elasticsearch-8 ;;
    opensearch) main_engine=opensearch-2 ;;
    *) main_engine=$ENGINE ;;
  esac
  read -r -a matrix <<<"${MATRIX_ENGINES:-elasticsearch-7 elasticsearch-8 elasticsearch-9 opensearch-2 opensearch-3}"
  others=()
  for e in "${matrix[@]}"; do [ "$e" = "$main_engine" ] || others+=("$e"); done
  t0=$SECONDS
  if [ ${#others[@]} -gt 0 ]; then scripts/conformance.sh "${others[@]}" || status=1; fi
  echo "[test] the engine matrix took $((SECONDS - t0)) s"
fi

[ "${CLUSTER:-1}" != 0 ] || { echo "[test] CLUSTER=0: tests/cluster.rs is not run"; exit "$status"; }
t0=$SECONDS
if scripts/cluster.sh running; then
  echo "[test] the local cluster is already running; leaving it running afterwards"
else
  started+=(scripts/cluster.sh)
  scripts/cluster.sh start
fi
cargo test --test cluster "$@" || status=1
echo "[test] the cluster part (start-up included) took $((SECONDS - t0)) s"
exit "$status"
