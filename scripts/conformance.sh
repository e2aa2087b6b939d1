#!/usr/bin/env bash
# usage: scripts/conformance.sh [ENGINE…]     (default: every engine of services.sh)
#
# The engine matrix: for each engine in turn, starts it beside the default services
# (scripts/services.sh with ENGINE and ENGINE_PORT, MATRIX_PORT: 9210, heap
# MATRIX_HEAP: 1g, as the main engine's), runs the conformance subset against it, stops
# it, and prints one line: engine, version, Java, result, seconds (start-up included).
# A summary table at the end; exit 1 when any engine failed.
#
# The conformance subset, existing tests pointed at the engine by MUPDATE_TEST_ES_URL:
#   tests/mupdate.rs   a test per row of SPEC sections 1-5: 200, 206 partial errors,
#                      whole-request errors, refresh wait_for, retryOnConflict and
#                      version conflicts, reply routing, v2, the kuzzle2 alias layout
#   tests/mupsert.rs   SPEC section 8
#   tests/actions.rs   every other write action (issue 21): create, createOrReplace,
#                      replace (guarded by _seq_no/_primary_term), delete, their m-forms
#   tests/services.rs  the engine is a real one and answers partial updates as relied on
#   tests/faults.rs    an_engine_outage_mid_stream_loses_nothing: the engine stopped and
#                      started again mid-stream (by services.sh, with the same ENGINE)
#
# RabbitMQ on 5672 must be running (scripts/services.sh start rabbitmq); the engine on
# 9200 is not touched.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

export ENGINE_PORT=${MATRIX_PORT:-9210}
export ES_HEAP=${MATRIX_HEAP:-1g}
export MUPDATE_TEST_ES_URL=http://127.0.0.1:$ENGINE_PORT
engines=("$@")
[ ${#engines[@]} -gt 0 ] || engines=(elasticsearch-7 elasticsearch-8 elasticsearch-9 opensearch-2 opensearch-3)

# Built once, before the first engine's clock starts.
cargo test --no-run --test mupdate --test mupsert --test actions --test services --test faults || exit 1

rows=()
failed=0
for engine in "${engines[@]}"; do
  export ENGINE=$engine
  info=$(scripts/services.sh engine-info) || { failed=1; rows+=("$engine ? ? error 0"); continue; }
  read -r name version java <<<"$info"
  # tests/services.rs checks that the engine it reaches is this version.
  export MUPDATE_TEST_ENGINE_VERSION=$version
  echo "[matrix] $name $version ($java) on $ENGINE_PORT"
  t0=$SECONDS
  result=passed
  if ! scripts/services.sh start engine; then
    result="failed-to-start"
  else
    # Under the tests' servers lock (tests/support: servers_lock), as the fault tests
    # take it: another checkout's suite restarts no shared server meanwhile. The fault
    # test below takes it itself.
    flock "${TMPDIR:-/tmp}/mupdate-worker-servers.lock" \
      cargo test --no-fail-fast --test mupdate --test mupsert --test actions --test services || result=failed
    cargo test --test faults an_engine_outage_mid_stream_loses_nothing -- --exact || result=failed
  fi
  scripts/services.sh stop engine
  took=$((SECONDS - t0))
  [ "$result" = passed ] || failed=1
  rows+=("$name $version $java $result $took")
  echo "[matrix] $name $version $java $result ${took}s"
done

echo "[matrix] engine version java result seconds"
for row in "${rows[@]}"; do echo "[matrix] $row"; done
exit "$failed"
