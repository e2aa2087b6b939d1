#!/usr/bin/env bash
# Installs (when missing) what the operations files and the client examples need, and
# checks the alert rules:
#
#   scripts/ops.sh install [prometheus|examples|all]   # idempotent; all by default
#   scripts/ops.sh bin promtool|prometheus            # the binary's path (installed when missing)
#   scripts/ops.sh python                             # the examples' venv python (installed when missing)
#   scripts/ops.sh check                              # promtool check rules + test rules
#
# - promtool and prometheus: the ones on PATH when there are, else Debian's `prometheus`
#   package, fetched with `apt-get download` and unpacked under $CACHE: only its two
#   binaries are used, no system service is installed or started.
# - Python example: a venv under .services/examples/venv (python3 -m venv; Debian's
#   python3-venv is installed when venv is missing) with examples/python/requirements.txt.
# - Node example: `npm ci` in examples/node (package-lock.json); Debian's nodejs and npm
#   are installed when node or npm is missing.
#
# Installs run under a lock, so tests that ask at the same time don't collide.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
STATE=${MUPDATE_SERVICES_DIR:-$root/.services}
CACHE=${MUPDATE_CACHE_DIR:-/var/cache/mupdate-worker}
PROM_DIR=$CACHE/prometheus-deb
VENV=$STATE/examples/venv
NODE_DIR=$root/examples/node
PROM_LOCK=$CACHE/prometheus.lock
EXAMPLES_LOCK=$STATE/examples.lock

log() { printf '[ops] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Runs "$@" holding the lock file $1 (prometheus goes to the machine-wide cache, the
# examples' dependencies to this checkout).
locked() {
  local lock=$1
  shift
  mkdir -p "$(dirname "$lock")"
  (
    flock -w 600 9 || die "another install held $lock for 600 s"
    "$@"
  ) 9>"$lock"
}

apt_update_once() {
  [ -n "${APT_UPDATED:-}" ] && return
  apt-get update -qq
  APT_UPDATED=1
}

# ---------------------------------------------------------------- promtool, prometheus

prom_path() {
  local name=$1
  if command -v "$name" >/dev/null; then command -v "$name"; return; fi
  if [ -x "$PROM_DIR/usr/bin/$name" ]; then echo "$PROM_DIR/usr/bin/$name"; return; fi
  return 1
}

prom_install() {
  prom_path promtool >/dev/null && prom_path prometheus >/dev/null && return
  command -v apt-get >/dev/null || die "promtool and prometheus are not on PATH, and there is no apt-get to fetch Debian's prometheus package"
  [ "$(id -u)" = 0 ] || die "run as root (it updates apt's lists and writes $CACHE), or put promtool and prometheus on PATH"
  local t0=$SECONDS dl deb
  apt-cache show prometheus >/dev/null 2>&1 || apt_update_once
  dl=$(mktemp -d)
  # apt downloads as _apt when it can write there.
  chown _apt "$dl" 2>/dev/null || true
  log "fetching Debian's prometheus package (binaries only, no service)"
  (cd "$dl" && apt-get download -qq prometheus 2>/dev/null) || { apt_update_once; (cd "$dl" && apt-get download -qq prometheus); }
  deb=$(ls "$dl"/prometheus_*.deb)
  rm -rf "$PROM_DIR.tmp"
  mkdir -p "$PROM_DIR.tmp"
  dpkg-deb -x "$deb" "$PROM_DIR.tmp"
  rm -rf "$PROM_DIR"
  mv -T "$PROM_DIR.tmp" "$PROM_DIR"
  chmod -R a+rX "$PROM_DIR"
  rm -rf "$dl"
  log "$("$PROM_DIR/usr/bin/promtool" --version 2>&1 | head -n1) in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- examples

venv_install() {
  local req=$root/examples/python/requirements.txt stamp=$VENV/.requirements
  if [ -x "$VENV/bin/python" ] && cmp -s "$req" "$stamp"; then return; fi
  local t0=$SECONDS
  command -v python3 >/dev/null || die "python3 is needed for the Python example"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || die "python3 -m venv fails: install python3-venv"
    log "python3 -m venv fails: installing python3-venv"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
  log "python venv with $(tr '\n' ' ' <"$req")in $((SECONDS - t0)) s"
}

node_install() {
  local lock=$NODE_DIR/package-lock.json stamp=$NODE_DIR/node_modules/.package-lock.json
  # npm writes node_modules/.package-lock.json; it is newer than the lock once installed.
  if [ -f "$stamp" ] && [ "$stamp" -nt "$lock" ]; then return; fi
  local t0=$SECONDS
  if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || die "node (18 or later) and npm are needed for the Node example"
    log "installing nodejs and npm from Debian's packages"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  (cd "$NODE_DIR" && npm ci --silent --no-audit --no-fund >/dev/null)
  log "npm ci in examples/node in $((SECONDS - t0)) s"
}

examples_install() {
  venv_install
  node_install
}

# ---------------------------------------------------------------- main

case "${1:-}" in
  install)
    case "${2:-all}" in
      prometheus) locked "$PROM_LOCK" prom_install ;;
      examples) locked "$EXAMPLES_LOCK" examples_install ;;
      all) locked "$PROM_LOCK" prom_install; locked "$EXAMPLES_LOCK" examples_install ;;
      *) die "install what? prometheus, examples or all" ;;
    esac ;;
  bin)
    case "${2:-}" in promtool|prometheus) ;; *) die "bin promtool|prometheus" ;; esac
    prom_path "$2" >/dev/null || locked "$PROM_LOCK" prom_install
    prom_path "$2" ;;
  python)
    locked "$EXAMPLES_LOCK" venv_install
    echo "$VENV/bin/python" ;;
  check)
    promtool=$(prom_path promtool) || { locked "$PROM_LOCK" prom_install; promtool=$(prom_path promtool); }
    cd "$root/ops/prometheus"
    "$promtool" check rules alerts.yml
    "$promtool" test rules alerts_test.yml ;;
  *) echo "usage: $0 install [prometheus|examples|all] | bin promtool|prometheus | python | check" >&2; exit 2 ;;
esac
