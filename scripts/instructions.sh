#!/usr/bin/env bash
# Instructions per request: the worker's CPU work on one-document mUpdate requests,
# counted by valgrind's callgrind while the load generator of ../shared/loadgen drives
# it against the services of scripts/services.sh. A count, not a time: the same build
# gives the same figure within about 1 % from run to run, where the benchmark's CPU
# times move by 10 % or more on this machine; what it can't see (cache misses, system
# calls, page faults) the benchmark still judges.
#
#   scripts/instructions.sh [BINARY...]      # default: target/release/mupdate-worker
#
# Each binary runs alone under callgrind on a fresh queue; 500 requests warm it up, then
# the counters are zeroed, N requests (3,000) are driven with WINDOW (64) outstanding,
# and the count of that part is divided by N. Prints one line per binary.
set -euo pipefail
cd "$(dirname "$0")/.."
LOADGEN=${LOADGEN:-/tmp/loadgen/loadgen}
N=${N:-3000}
WINDOW=${WINDOW:-64}
die() { echo "instructions: $*" >&2; exit 1; }
command -v valgrind >/dev/null || die "valgrind is missing (apt-get install valgrind)"
[ -x "$LOADGEN" ] || die "no loadgen at $LOADGEN: build it with ../shared/loadgen/run.sh"
scripts/services.sh status >/dev/null 2>&1 || die "the services are down: scripts/services.sh start"
if [ $# -eq 0 ]; then
    cargo build --release --bin mupdate-worker >&2
    set -- target/release/mupdate-worker
fi
"$LOADGEN" seed >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for binary in "$@"; do
    queue="instructions-$$-$RANDOM"
    MUPDATE__AMQP__REQUEST_QUEUE=$queue MUPDATE__METRICS__LISTEN=127.0.0.1:0 RUST_LOG=warn \
        valgrind --tool=callgrind --callgrind-out-file="$work/out.%p" "$binary" \
        >"$work/worker.log" 2>&1 &
    pid=$!
    # Up and consuming: under callgrind the start takes seconds.
    "$LOADGEN" drive -queue "$queue" -n 500 -docs 1 -window "$WINDOW" -wait 120s >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    "$LOADGEN" drive -queue "$queue" -n "$N" -docs 1 -window "$WINDOW" -wait 300s >/dev/null
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" || true
    total=$(callgrind_annotate "$work/out.$pid.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
    echo "$binary: $((total / N)) instructions per request ($N requests, $WINDOW outstanding)"
    "$LOADGEN" clean -queues "$queue" >/dev/null 2>&1 || true
    rm -f "$work"/out.*
done
