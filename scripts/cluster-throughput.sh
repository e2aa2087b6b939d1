#!/usr/bin/env bash
# usage: scripts/cluster-throughput.sh [ROUNDS]      (LOADGEN, N, DOCS, WINDOW_PER_WORKER)
#
# Requests per second through 1, 2 and 3 worker processes on the local cluster
# (`scripts/cluster.sh start` first), and the CPU time each process spends per request,
# measured with the load generator of ../shared/loadgen (an instrument kept outside the
# project: build it with ../shared/loadgen/run.sh, or point LOADGEN at it).
#
# Per run: k release-built workers, worker j connected to broker node j, all three
# engine nodes listed, on one quorum request queue; `loadgen drive` publishes N
# requests of DOCS documents (1 and 10 by default) through the queue's leader node with
# 64 × k outstanding and checks every reply. CPU seconds of each node, worker and the
# driver come from /proc (utime + stime) before and after. A warm-up run per DOCS (the
# JVMs compile their hot paths: the first runs cost the engine several times more CPU)
# is left out; then rounds interleave k = 1, 2, 3.
# Prints one JSON line per run on stderr, then a Markdown table of the medians.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
LOADGEN=${LOADGEN:-/tmp/loadgen/loadgen}
N=${N:-5000}
DOCS=${DOCS:-1 10}
WINDOW_PER_WORKER=${WINDOW_PER_WORKER:-64}
STATE=${MUPDATE_SERVICES_DIR:-$PWD/.services}/cluster
ES=http://127.0.0.1:9201
ES_ALL=http://127.0.0.1:9201,http://127.0.0.1:9202,http://127.0.0.1:9203
QUEUE=mupdate.cluster-bench
TICKS=$(getconf CLK_TCK)

log() { printf '[throughput] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -x "$LOADGEN" ] || die "no loadgen at $LOADGEN: build it with ../shared/loadgen/run.sh"
command -v jq >/dev/null || die "jq is needed"
scripts/cluster.sh running || die "the local cluster isn't up: scripts/cluster.sh start"
cargo build --release --quiet
BIN=target/release/mupdate-worker

amqp() { echo "amqp://guest:guest@127.0.0.1:$((5700 + $1))/%2f"; }

# CPU ticks (user + system) of a process: the fields after its name in /proc/PID/stat.
ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$1/stat" 2>/dev/null || echo 0; }

node_pids() {
  local i
  for i in 1 2 3; do cat "$STATE/rabbit$i/rabbitmq.pid"; echo; done
  for i in 1 2 3; do cat "$STATE/es$i/engine.pid"; echo; done
}

workers=()
start_workers() {
  local k=$1 j
  for ((j = 1; j <= k; j++)); do
    MUPDATE__AMQP__URL=$(amqp "$j") MUPDATE__STORAGE__URL=$ES_ALL \
      MUPDATE__AMQP__QUEUE_TYPE=quorum MUPDATE__AMQP__DELIVERY_LIMIT=10 \
      MUPDATE__AMQP__REQUEST_QUEUE=$QUEUE MUPDATE__AMQP__REPLY_QUEUE=$QUEUE.replies \
      MUPDATE__AMQP__DEAD_LETTER_EXCHANGE=$QUEUE.dlx MUPDATE__AMQP__DEAD_LETTER_QUEUE=$QUEUE.dead \
      MUPDATE__METRICS__LISTEN='' RUST_LOG=warn "$BIN" >/dev/null 2>>"target/cluster-throughput-workers.log" &
    workers+=($!)
    "$LOADGEN" ready -url "$(amqp 1)" -queue "$QUEUE" -consumers "$j" -wait 60s >/dev/null
  done
}

stop_workers() {
  local pid
  for pid in "${workers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${workers[@]}"; do wait "$pid" 2>/dev/null || true; done
  workers=()
}
trap stop_workers EXIT

# The request queue's leader: rabbit-c2@localhost → 2.
leader() {
  scripts/cluster.sh rabbitmqctl rabbit1 -q list_queues name leader --formatter json |
    jq -r --arg q "$QUEUE" '.[] | select(.name == $q) | .leader' | sed 's/rabbit-c\([0-9]\).*/\1/'
}

log "seeding &bench.docs: 20,000 documents, 3 shards, 1 replica"
curl -fsS -XDELETE "$ES/%26bench.docs" >/dev/null 2>&1 || true
curl -fsS -XPUT -H 'content-type: application/json' "$ES/%26bench.docs" \
  -d '{"settings": {"number_of_shards": 3, "number_of_replicas": 1}}' >/dev/null
"$LOADGEN" seed -es "$ES" -count 20000 >/dev/null
curl -fsS "$ES/_cluster/health/%26bench.docs?wait_for_status=green&timeout=60s" >/dev/null

log "warm-up: 3 workers, $N requests of each size"
start_workers 3
for docs in $DOCS; do
  "$LOADGEN" drive -url "$(amqp "$(leader)")" -queue "$QUEUE" -n "$N" -docs "$docs" \
    -window $((WINDOW_PER_WORKER * 3)) -wait 60s -consumers 3 >/dev/null
done
stop_workers

runs=$(mktemp)
for ((round = 1; round <= ROUNDS; round++)); do
  for k in 1 2 3; do
    start_workers "$k"
    lead=$(leader)
    for docs in $DOCS; do
      mapfile -t nodes < <(node_pids)
      pids=("${nodes[@]}" "${workers[@]}")
      before=()
      for pid in "${pids[@]}"; do before+=("$(ticks "$pid")"); done
      load=$(cut -d' ' -f1 /proc/loadavg)
      out=$("$LOADGEN" drive -url "$(amqp "$lead")" -queue "$QUEUE" -n "$N" -docs "$docs" \
        -window $((WINDOW_PER_WORKER * k)) -wait 60s -consumers "$k")
      cpu=()
      for i in "${!pids[@]}"; do
        cpu+=("$(echo "$(ticks "${pids[$i]}") ${before[$i]}" | awk -v t="$TICKS" '{printf "%.3f", ($1 - $2) / t}')")
      done
      worker_cpu=$(printf '%s\n' "${cpu[@]:6}" | awk '{s += $1} END {printf "%.3f", s}')
      line=$(echo "$out" | jq -c --argjson round "$round" --argjson k "$k" --argjson leader "$lead" \
        --arg load "$load" --argjson r1 "${cpu[0]}" --argjson r2 "${cpu[1]}" --argjson r3 "${cpu[2]}" \
        --argjson e1 "${cpu[3]}" --argjson e2 "${cpu[4]}" --argjson e3 "${cpu[5]}" --argjson w "$worker_cpu" \
        '{round: $round, workers: $k, docs, n, requests_per_s, p50_ms, p99_ms, bad, missing,
          loadavg: ($load | tonumber), leader: $leader, rabbit_cpu_s: [$r1, $r2, $r3],
          es_cpu_s: [$e1, $e2, $e3], worker_cpu_s: $w, driver_cpu_s: .cpu_s}')
      echo "$line" >&2
      echo "$line" >>"$runs"
      [ "$(echo "$line" | jq '.bad + .missing')" = 0 ] || die "bad or missing replies: $line"
    done
    stop_workers
  done
done

# Medians over the rounds; CPU per request in µs: the leader node, the two followers
# (together), the three engine nodes (together), the workers (together), the driver.
echo
echo "| workers | docs/request | requests/s | p50 / p99 ms | RabbitMQ leader µs/req | RabbitMQ followers µs/req | Elasticsearch (3 nodes) µs/req | workers µs/req | driver µs/req | load average |"
echo "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
jq -s -r '
  def median: sort | .[length / 2 | floor];
  def us($n): . * 1e6 / $n | round;
  group_by([.workers, .docs])[] |
  . as $g | $g[0] as $f |
  [ $f.workers, $f.docs,
    ($g | map(.requests_per_s) | median | round),
    "\($g | map(.p50_ms) | median | round) / \($g | map(.p99_ms) | median | round)",
    ($g | map(.rabbit_cpu_s[.leader - 1] | us($f.n)) | median),
    ($g | map((.rabbit_cpu_s | add) - .rabbit_cpu_s[.leader - 1] | us($f.n)) | median),
    ($g | map(.es_cpu_s | add | us($f.n)) | median),
    ($g | map(.worker_cpu_s | us($f.n)) | median),
    ($g | map(.driver_cpu_s | us($f.n)) | median),
    ($g | map(.loadavg) | median) ] |
  "| " + (map(tostring) | join(" | ")) + " |"' "$runs"
rm -f "$runs"
"$LOADGEN" clean -url "$(amqp 1)" -queues "$QUEUE,$QUEUE.replies,$QUEUE.dead" -es "$ES" -index bench >/dev/null || true
