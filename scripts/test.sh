#!/usr/bin/env bash
# The whole test suite against the real servers: starts RabbitMQ and Elasticsearch when
# they are not running (installing them when missing), then a real Kuzzle 2 on that
# Elasticsearch for tests/kuzzle.rs (scripts/kuzzle.sh: npm ci the first time), installs
# what tests/ops.rs and tests/examples.rs need when missing (promtool and prometheus, the
# examples' Python venv and npm packages: scripts/ops.sh), runs every test target but
# tests/cluster.rs; then starts the local cluster (scripts/cluster.sh: three RabbitMQ and
# three Elasticsearch nodes) for tests/cluster.rs and says how long that part took.
# Stops what it started, even when a test fails.
#
# ENGINE=opensearch runs the suite on OpenSearch, without tests/kuzzle.rs (Kuzzle 2
# speaks to Elasticsearch only); the cluster is Elasticsearch's either way.
# CLUSTER=0 leaves out the cluster part (e.g. with a filter that selects no cluster test).
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
scripts/ops.sh install
cargo test "${targets[@]}" "$@"

[ "${CLUSTER:-1}" != 0 ] || { echo "[test] CLUSTER=0: tests/cluster.rs is not run"; exit 0; }
t0=$SECONDS
if scripts/cluster.sh running; then
  echo "[test] the local cluster is already running; leaving it running afterwards"
else
  started+=(scripts/cluster.sh)
  scripts/cluster.sh start
fi
status=0
cargo test --test cluster "$@" || status=$?
echo "[test] the cluster part (start-up included) took $((SECONDS - t0)) s"
exit "$status"
