#!/usr/bin/env bash
# usage: scripts/cluster.sh start|stop|status|running | kill NODE | restart NODE
#        scripts/cluster.sh rabbitmqctl|rabbitmq-queues NODE ARGS…
#   NODE: rabbit1 rabbit2 rabbit3 es1 es2 es3
#
# A local cluster on 127.0.0.1, next to (not instead of) the single node of
# scripts/services.sh (5672/9200, untouched): three RabbitMQ nodes from Debian's package
# joined into one cluster, and three Elasticsearch nodes of the version in versions.env,
# installed by services.sh's functions.
#
#   rabbit1..3  rabbit-c1..3@localhost   AMQP 5701..5703   distribution 25701..25703
#   es1..3      es-c1..3                 HTTP 9201..9203   transport 9301..9303
#
# start    starts what isn't running, joins the RabbitMQ nodes to rabbit-c1, waits until
#          both clusters have three nodes; prints each node's start-up time and memory.
# stop     stops the nodes this script started (found by the pid files under
#          .services/cluster/, checked to be the same processes); keeps their data.
# status   each node: up or down, pid, memory (RSS), last start-up time; exit 1 unless
#          all six are up.
# running  exit 0 when all six nodes answer, quietly (for scripts/test.sh).
# kill     SIGKILL of one node, by its pid file.
# restart  starts that node again and waits until it rejoined its cluster.
#
# State (data, logs, pid files, the cluster's Erlang cookie) is under
# .services/cluster/; `rm -rf .services/cluster` after `stop` starts a fresh cluster.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# services.sh, sourced: its install functions (rabbit_install, engine_install,
# engine_user, engine_node_dirs, java_home), versions.env, log/die. Elasticsearch only.
export ENGINE=elasticsearch
# shellcheck source=services.sh
. "$here/services.sh"
log() { printf '[cluster] %s\n' "$*" >&2; }

CSTATE=$STATE/cluster
ES_NODE_HEAP=${ES_NODE_HEAP:-512m}
# Every wait is bounded by this many seconds (generous: a loaded 2-core machine).
WAIT=${CLUSTER_WAIT:-300}

# ---------------------------------------------------------------- helpers

# The pid in FILE when that process is alive and is ours: its environment holds
# NEEDLE (the pid file or config path it was started with), so a pid reused by another
# process is never signalled.
owned_pid() {
  local file=$1 needle=$2 pid
  [ -s "$file" ] || return 1
  pid=$(tr -dc 0-9 <"$file")
  [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 1
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "$needle" || return 1
  echo "$pid"
}

rss_mib() { awk '/^VmRSS:/ {printf "%d", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }

port_open() { timeout 5 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Runs "$@" until it succeeds, for at most WAIT seconds; WHAT names it in the error.
wait_until() {
  local what=$1 t0=$SECONDS
  shift
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - t0)) -lt "$WAIT" ] || die "$what: not within $WAIT s"
    sleep 1
  done
}

node_index() {
  case "$1" in
    rabbit[123] | es[123]) echo "${1: -1}" ;;
    *) die "unknown node '$1' (rabbit1..3, es1..3)" ;;
  esac
}

# ---------------------------------------------------------------- RabbitMQ nodes

# The environment of node I for rabbitmq-server and the CLI tools.
rabbit_node_env() {
  local i=$1 dir=$CSTATE/rabbit$1
  export RABBITMQ_NODENAME=rabbit-c$i@localhost
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$((5700 + i))
  export RABBITMQ_DIST_PORT=$((25700 + i))
  export RABBITMQ_MNESIA_BASE=$dir/mnesia
  export RABBITMQ_LOG_BASE=$dir/log
  export RABBITMQ_PID_FILE=$dir/rabbitmq.pid
  export RABBITMQ_CONFIG_FILE=$CSTATE/rabbitmq.conf
  export RABBITMQ_ENABLED_PLUGINS_FILE=$CSTATE/enabled_plugins
  # The CLI tools' own distribution ports: apart from the single node's 35672-35682.
  export RABBITMQ_CTL_DIST_PORT_MIN=35701 RABBITMQ_CTL_DIST_PORT_MAX=35730
  # epmd on loopback, shared with the single node; distribution on loopback only.
  export ERL_EPMD_ADDRESS=127.0.0.1
  export ERL_ZFLAGS='-kernel inet_dist_use_interface {127,0,0,1}'
}

# Runs a RabbitMQ program of Debian's package (rabbitmq-server, rabbitmqctl,
# rabbitmq-queues) for node I as the rabbitmq user, with the cluster's own home: its
# .erlang.cookie is the cluster's cookie, apart from the rabbitmq user's
# ~/.erlang.cookie that the single node uses, and read by Erlang from the file (never on
# a command line). Not through /usr/sbin's wrappers: they set HOME to
# /var/lib/rabbitmq, so its cookie.
as_rabbit_node() {
  local i=$1 program=$2
  shift 2
  (
    rabbit_node_env "$i"
    cd "$CSTATE/home"
    exec runuser -u rabbitmq -- env HOME="$CSTATE/home" "/usr/lib/rabbitmq/bin/$program" "$@"
  )
}

# Files shared by the three nodes: the home with the cookie, the configuration, no
# plugins.
rabbit_cluster_files() {
  mkdir -p "$CSTATE/home"
  if [ ! -s "$CSTATE/home/.erlang.cookie" ]; then
    (umask 077 && head -c 30 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$CSTATE/home/.erlang.cookie")
  fi
  chmod 700 "$CSTATE/home"
  chmod 400 "$CSTATE/home/.erlang.cookie"
  echo '[].' >"$CSTATE/enabled_plugins"
  cat >"$CSTATE/rabbitmq.conf" <<'EOF'
# scripts/cluster.sh: three nodes on one machine, memory bounded.
# Publishers are blocked above 1 GiB per node (the default is 40% of the machine's RAM).
vm_memory_high_watermark.absolute = 1GiB
# Quorum queues keep their write-ahead log in memory until it rolls over (default 512 MB).
raft.wal_max_size_bytes = 64000000
EOF
  for i in 1 2 3; do mkdir -p "$CSTATE/rabbit$i/mnesia" "$CSTATE/rabbit$i/log"; done
  chown -R rabbitmq: "$CSTATE/home" "$CSTATE"/rabbit[123]
}

rabbit_node_ctl() {
  local i=$1
  shift
  as_rabbit_node "$i" rabbitmqctl -n "rabbit-c$i@localhost" "$@"
}

rabbit_node_pid() { (rabbit_node_env "$1" && owned_pid "$RABBITMQ_PID_FILE" "RABBITMQ_PID_FILE=$RABBITMQ_PID_FILE"); }

rabbit_node_launch() {
  local i=$1
  if rabbit_node_pid "$i" >/dev/null; then log "rabbit$i already running"; return; fi
  port_open $((5700 + i)) && die "port $((5700 + i)) is taken by a process this script didn't start"
  log "starting rabbit$i (rabbit-c$i@localhost, AMQP $((5700 + i)), distribution $((25700 + i)))"
  rm -f "$CSTATE/rabbit$i.startup"
  date +%s >"$CSTATE/rabbit$i.launched"
  as_rabbit_node "$i" rabbitmq-server -detached
}

# Waits until node I runs; records its start-up time (once per launch).
rabbit_node_await() {
  local i=$1
  wait_until "rabbit$i start-up" rabbit_node_ctl "$i" -q await_startup --timeout 10
  wait_until "rabbit$i AMQP port" port_open $((5700 + i))
  [ -s "$CSTATE/rabbit$i.startup" ] ||
    echo $(($(date +%s) - $(cat "$CSTATE/rabbit$i.launched"))) >"$CSTATE/rabbit$i.startup"
}

# Whether rabbit-cI@localhost runs in the cluster, as node J sees it.
rabbit_node_running_in() {
  rabbit_node_ctl "$2" -q cluster_status --formatter json 2>/dev/null |
    grep -o '"running_nodes":\[[^]]*\]' | grep -q "\"rabbit-c$1@localhost\""
}

rabbit_node_join() {
  local i=$1
  if rabbit_node_running_in "$i" 1; then return; fi
  log "joining rabbit$i to rabbit-c1@localhost"
  rabbit_node_ctl "$i" -q stop_app
  rabbit_node_ctl "$i" -q join_cluster rabbit-c1@localhost
  rabbit_node_ctl "$i" -q start_app
  wait_until "rabbit$i start-up after joining" rabbit_node_ctl "$i" -q await_startup --timeout 10
}

rabbit_node_stop() {
  local i=$1 pid
  pid=$(rabbit_node_pid "$i") || { log "rabbit$i: not running (or not started by this script)"; return 0; }
  log "stopping rabbit$i (pid $pid)"
  rabbit_node_ctl "$i" -q stop "$CSTATE/rabbit$i/rabbitmq.pid" >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  kill -9 "$pid" 2>/dev/null || true
}

rabbit_node_kill() {
  local i=$1 pid
  pid=$(rabbit_node_pid "$i") || die "rabbit$i is not running (or not started by this script)"
  log "SIGKILL rabbit$i (pid $pid)"
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

rabbit_node_restart() {
  local i=$1 t0=$SECONDS j
  rabbit_node_launch "$i"
  rabbit_node_await "$i"
  j=$((i % 3 + 1))
  wait_until "rabbit$i rejoining (as rabbit$j sees it)" rabbit_node_running_in "$i" "$j"
  log "rabbit$i rejoined the cluster in $((SECONDS - t0)) s"
}

rabbit_node_status() {
  local i=$1 pid
  if pid=$(rabbit_node_pid "$i"); then
    printf '%-8s up    pid %-7s %5s MiB  AMQP 127.0.0.1:%s  started in %ss\n' "rabbit$i" "$pid" \
      "$(rss_mib "$pid")" $((5700 + i)) "$(cat "$CSTATE/rabbit$i.startup" 2>/dev/null || echo '?')"
  else
    printf '%-8s down\n' "rabbit$i"
    return 1
  fi
}

# ---------------------------------------------------------------- Elasticsearch nodes

es_node_dir() { echo "$CSTATE/es$1"; }

es_node_pid() { owned_pid "$(es_node_dir "$1")/engine.pid" "ES_PATH_CONF=$(es_node_dir "$1")/config"; }

es_node_up() { curl -fsS "http://127.0.0.1:$((9200 + $1))/_cluster/health" >/dev/null 2>&1; }

es_node_config() {
  local i=$1 dir
  dir=$(es_node_dir "$i")
  # cluster.initial_master_nodes only bootstraps a cluster whose nodes have no data yet.
  local fresh=false
  [ -d "$dir/data/_state" ] || fresh=true
  engine_node_dirs "$dir"
  {
    echo "cluster.name: mupdate-cluster"
    echo "node.name: es-c$i"
    echo "network.host: 127.0.0.1"
    echo "http.port: $((9200 + i))"
    echo "transport.port: $((9300 + i))"
    echo "discovery.seed_hosts: [\"127.0.0.1:9301\", \"127.0.0.1:9302\", \"127.0.0.1:9303\"]"
    if $fresh; then echo "cluster.initial_master_nodes: [\"es-c1\", \"es-c2\", \"es-c3\"]"; fi
    echo "path.data: $dir/data"
    echo "path.logs: $dir/logs"
    echo "cluster.routing.allocation.disk.threshold_enabled: false"
    echo "xpack.security.enabled: false"
  } >"$dir/config/elasticsearch.yml"
  chown -R "$ES_USER": "$dir"
}

es_node_launch() {
  local i=$1 dir jh
  dir=$(es_node_dir "$i")
  if es_node_pid "$i" >/dev/null; then log "es$i already running"; return; fi
  port_open $((9200 + i)) && die "port $((9200 + i)) is taken by a process this script didn't start"
  es_node_config "$i"
  log "starting es$i (es-c$i, HTTP $((9200 + i)), transport $((9300 + i)), heap $ES_NODE_HEAP)"
  jh=$(java_home)
  rm -f "$dir/engine.pid"
  rm -f "$CSTATE/es$i.startup"
  date +%s >"$CSTATE/es$i.launched"
  # -d returns once the node runs; it joins the cluster after.
  runuser -u "$ES_USER" -- env "ES_JAVA_HOME=$jh" "ES_PATH_CONF=$dir/config" \
    "ES_JAVA_OPTS=-Xms$ES_NODE_HEAP -Xmx$ES_NODE_HEAP" \
    "$HOME_DIR/bin/elasticsearch" -d -p "$dir/engine.pid" >"$dir/start.out" 2>&1 ||
    { cat "$dir/start.out" >&2; die "es$i failed to start"; }
}

es_node_await() {
  local i=$1
  wait_until "es$i answering" es_node_up "$i"
  [ -s "$CSTATE/es$i.startup" ] ||
    echo $(($(date +%s) - $(cat "$CSTATE/es$i.launched"))) >"$CSTATE/es$i.startup"
}

# Launches node I and waits until it answers (run in the background, one per node).
es_node_start() {
  es_node_launch "$1"
  es_node_await "$1"
}

es_cluster_nodes() {
  curl -fsS "http://127.0.0.1:$((9200 + $1))/_cluster/health?wait_for_nodes=3&timeout=5s" |
    grep -q '"number_of_nodes":3,'
}

es_node_stop() {
  local i=$1 pid
  pid=$(es_node_pid "$i") || { log "es$i: not running (or not started by this script)"; return 0; }
  log "stopping es$i (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  kill -9 "$pid" 2>/dev/null || true
}

es_node_kill() {
  local i=$1 pid
  pid=$(es_node_pid "$i") || die "es$i is not running (or not started by this script)"
  log "SIGKILL es$i (pid $pid)"
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

es_node_restart() {
  local i=$1 t0=$SECONDS
  es_node_launch "$i"
  es_node_await "$i"
  wait_until "es$i rejoining" es_cluster_nodes "$i"
  log "es$i rejoined the cluster in $((SECONDS - t0)) s"
}

es_node_status() {
  local i=$1 pid
  if pid=$(es_node_pid "$i") && es_node_up "$i"; then
    printf '%-8s up    pid %-7s %5s MiB  HTTP 127.0.0.1:%s  started in %ss\n' "es$i" "$pid" \
      "$(rss_mib "$pid")" $((9200 + i)) "$(cat "$CSTATE/es$i.startup" 2>/dev/null || echo '?')"
  else
    printf '%-8s down\n' "es$i"
    return 1
  fi
}

# ---------------------------------------------------------------- the cluster

cluster_start() {
  rabbit_install
  engine_coords
  engine_install
  engine_user
  rabbit_cluster_files
  local t0=$SECONDS i pid
  # All nodes launched before any is awaited: a RabbitMQ node that was stopped while
  # its peers ran waits for them at boot; the JVMs start meanwhile.
  local es=() rabbit=()
  for i in 1 2 3; do rabbit_node_launch "$i"; done
  for i in 1 2 3; do es_node_start "$i" & es+=($!); done
  for i in 1 2 3; do rabbit_node_await "$i" & rabbit+=($!); done
  for pid in "${rabbit[@]}"; do wait "$pid" || die "a RabbitMQ node did not start"; done
  for i in 2 3; do rabbit_node_join "$i"; done
  wait_until "three RabbitMQ nodes running" rabbit_node_running_in 3 1
  log "RabbitMQ cluster of three nodes in $((SECONDS - t0)) s"
  for pid in "${es[@]}"; do wait "$pid" || die "an Elasticsearch node did not start"; done
  wait_until "three Elasticsearch nodes in the cluster" es_cluster_nodes 1
  curl -fsS "http://127.0.0.1:9201/_cluster/health?wait_for_status=green&timeout=${WAIT}s" >/dev/null ||
    log "warning: the Elasticsearch cluster is not green"
  log "cluster ready in $((SECONDS - t0)) s"
  cluster_status
}

cluster_stop() {
  local i
  for i in 1 2 3; do es_node_stop "$i" & done
  wait
  # RabbitMQ nodes one by one: the last one stopped is the first to boot next time,
  # and `start` launches all three before waiting for any.
  for i in 3 2 1; do rabbit_node_stop "$i"; done
}

cluster_status() {
  local i total=0 down=0 pid
  for i in 1 2 3; do rabbit_node_status "$i" || down=$((down + 1)); done
  for i in 1 2 3; do es_node_status "$i" || down=$((down + 1)); done
  for i in 1 2 3; do
    pid=$(rabbit_node_pid "$i") && total=$((total + $(rss_mib "$pid")))
    pid=$(es_node_pid "$i") && total=$((total + $(rss_mib "$pid")))
  done
  echo "memory (RSS) of the running nodes: $total MiB"
  for i in 1 2 3; do
    if rabbit_node_pid "$i" >/dev/null; then
      echo "rabbitmq running nodes: $(rabbit_node_ctl "$i" -q cluster_status --formatter json 2>/dev/null |
        grep -o '"running_nodes":\[[^]]*\]' | sed 's/"running_nodes"://')"
      break
    fi
  done
  for i in 1 2 3; do
    if es_node_up "$i"; then
      echo "elasticsearch: $(curl -fsS "http://127.0.0.1:$((9200 + i))/_cluster/health?filter_path=status,number_of_nodes")"
      break
    fi
  done
  [ "$down" = 0 ]
}

case "${1:-}" in
  start) cluster_start ;;
  stop) cluster_stop ;;
  status) cluster_status ;;
  running)
    for i in 1 2 3; do port_open $((5700 + i)) && es_node_up "$i" || exit 1; done ;;
  kill | restart)
    node=${2:-}
    i=$(node_index "$node")
    case "$1-$node" in
      kill-rabbit*) rabbit_node_kill "$i" ;;
      kill-es*) es_node_kill "$i" ;;
      restart-rabbit*) rabbit_node_restart "$i" ;;
      restart-es*) engine_coords && es_node_restart "$i" ;;
    esac ;;
  rabbitmqctl | rabbitmq-queues)
    # A CLI tool against one node, with the cluster's cookie: rabbitmqctl rabbit2 list_queues
    tool=$1 node=${2:-}
    i=$(node_index "$node")
    case "$node" in rabbit*) ;; *) die "$tool needs a RabbitMQ node" ;; esac
    shift 2
    as_rabbit_node "$i" "$tool" -n "rabbit-c$i@localhost" "$@" ;;
  *)
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2 ;;
esac
