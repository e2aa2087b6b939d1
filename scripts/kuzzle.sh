#!/usr/bin/env bash
# A real Kuzzle 2 (kuzzle/, from npm) with its Redis, on loopback, on the Elasticsearch
# of scripts/services.sh (which must be running): what tests/kuzzle.rs compares against.
#
#   scripts/kuzzle.sh start|stop|status|running
#
# start: installs redis-server from Debian when missing, runs `npm ci` in kuzzle/ when
# node_modules is missing or older than the lock file, starts Redis on 127.0.0.1:6399
# and Kuzzle on http://127.0.0.1:7512, waits until Kuzzle answers and says how long it
# took. Idempotent: what already answers is left alone. stop ends only what start
# started, by the pid files under .services/kuzzle/. running exits 0 when Kuzzle answers.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
APP=$root/kuzzle
STATE=${MUPDATE_SERVICES_DIR:-$root/.services}/kuzzle
REDIS_PORT=6399      # kuzzle/.kuzzlerc names the same ports
KUZZLE_PORT=7512
ES_URL=http://127.0.0.1:9200

log() { printf '[kuzzle] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

redis_up() { timeout 2 bash -c "</dev/tcp/127.0.0.1/$REDIS_PORT" 2>/dev/null; }
kuzzle_up() { curl -fsS -m 2 "http://127.0.0.1:$KUZZLE_PORT/_healthcheck" >/dev/null 2>&1; }

# A pid file's process, when it is still the one we started (its command line holds $2).
live_pid() {
  local file=$1 what=$2 pid
  [ -f "$file" ] || return 1
  pid=$(cat "$file")
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$what" || return 1
  echo "$pid"
}

install_redis() {
  command -v redis-server >/dev/null && return
  [ "$(id -u)" = 0 ] || die "redis-server is missing; run as root to install it"
  log "installing redis-server from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}

# npm ci when node_modules is missing or older than package.json / package-lock.json
# (npm writes node_modules/.package-lock.json at each install).
install_kuzzle() {
  command -v npm >/dev/null || die "node and npm are needed"
  local stamp=$APP/node_modules/.package-lock.json
  if [ -f "$stamp" ] && [ ! "$APP/package-lock.json" -nt "$stamp" ] && [ ! "$APP/package.json" -nt "$stamp" ]; then
    return
  fi
  log "npm ci in kuzzle/ (native modules are compiled: a few minutes the first time)"
  local t0=$SECONDS
  # Node's headers come with the machine's nodejs package: node-gyp needs no download.
  [ -f /usr/include/node/node.h ] && export npm_config_nodedir=/usr
  (cd "$APP" && npm ci --no-audit --no-fund --loglevel=error) >&2
  log "npm ci took $((SECONDS - t0)) s"
}

start_redis() {
  if redis_up; then log "redis already listening on $REDIS_PORT"; return; fi
  install_redis
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
    --pidfile "$STATE/redis.pid" --dir "$STATE" --logfile "$STATE/redis.log" \
    --save '' --appendonly no
  for _ in $(seq 50); do redis_up && return; sleep 0.1; done
  die "redis did not start (see $STATE/redis.log)"
}

start_kuzzle() {
  if kuzzle_up; then log "kuzzle already answers on $KUZZLE_PORT"; return; fi
  curl -fsS -m 5 "$ES_URL/_cluster/health" >/dev/null 2>&1 ||
    die "Elasticsearch does not answer on $ES_URL: scripts/services.sh start first"
  install_kuzzle
  start_redis
  log "starting kuzzle"
  local t0 pid
  t0=$(date +%s%N)
  # NODE_ENV=production: the answers a deployed Kuzzle gives (no stack traces).
  (cd "$APP" && exec env NODE_ENV=production setsid node start.js) >"$STATE/kuzzle.log" 2>&1 &
  pid=$!
  echo "$pid" >"$STATE/kuzzle.pid"
  until kuzzle_up; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$STATE/kuzzle.log" >&2
      die "kuzzle exited (log: $STATE/kuzzle.log)"
    fi
    [ $(( ($(date +%s%N) - t0) / 1000000000 )) -lt 120 ] || die "kuzzle did not answer in 120 s"
    sleep 0.2
  done
  log "kuzzle $(node -p "require('$APP/node_modules/kuzzle/package.json').version") ready in $(( ($(date +%s%N) - t0) / 1000000 )) ms on http://127.0.0.1:$KUZZLE_PORT"
}

stop_one() {
  local name=$1 file=$2 what=$3 pid
  if ! pid=$(live_pid "$file" "$what"); then
    log "$name: not started by this script"
    rm -f "$file"
    return
  fi
  log "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

do_start() {
  mkdir -p "$STATE"
  start_kuzzle
}

do_stop() {
  stop_one kuzzle "$STATE/kuzzle.pid" start.js
  stop_one redis "$STATE/redis.pid" redis-server
}

do_status() {
  if redis_up; then echo "redis: up on 127.0.0.1:$REDIS_PORT"; else echo "redis: down"; fi
  if kuzzle_up; then echo "kuzzle: up on http://127.0.0.1:$KUZZLE_PORT"; else echo "kuzzle: down"; fi
}

case "${1:-}" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  running) kuzzle_up ;;
  *) echo "usage: $0 start|stop|status|running" >&2; exit 2 ;;
esac
