#!/usr/bin/env bash
# The Debian package, tested by installing it on this machine (as root): builds it
# (scripts/package.sh), installs it with dpkg, runs the installed binary the way the
# installed unit says (its ExecStart, its User=, its EnvironmentFile, the installed
# configuration) against the running test servers until one mUpdate is answered, with
# systemd's notify socket played by this script; checks the man pages render, the
# completions load in bash, zsh and fish, the unit verifies and its
# `systemd-analyze security` exposure; upgrades to a later revision keeping the edited
# conffiles; removes it (conffiles kept, edits intact) and purges it (nothing left).
#
# systemd isn't PID 1 here, so the unit is never started by systemd: its sandboxing
# (ProtectSystem=, SystemCallFilter=, ...) is checked by `systemd-analyze` only, not
# enforced on the run. What runs is the unit's command, user and environment.
#
# Needs RabbitMQ and the engine on their test ports (scripts/services.sh start);
# scripts/test.sh runs it after the cargo tests. Installs zsh and fish when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

PKG=mupdate-worker
UNIT=/usr/lib/systemd/system/$PKG.service
ES=${ENGINE_URL:-http://127.0.0.1:9200}
# Below which `systemd-analyze security` calls the unit's exposure acceptable (0 = fully
# sandboxed, 10 = not at all; systemd's "OK" band ends at 3.9). The unit rates 1.1 on
# systemd 252; a lost hardening line costs 0.1 to 0.5 or more.
MAX_EXPOSURE=${MAX_EXPOSURE:-1.5}

log() { echo "[package-test] $*"; }
fail() { echo "[package-test] FAIL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "must run as root (dpkg -i)"

# What the package may leave on the system: nothing once purged.
leftovers() {
  find /etc /usr /var/lib/systemd /var/lib/dpkg/info -name "*$PKG*" 2>/dev/null | sort
  getent passwd "$PKG" || true
  getent group "$PKG" || true
}

run=$(mktemp -d /tmp/package-test.XXXXXX)
chmod 755 "$run"
suffix=$RANDOM$RANDOM
queue=pkgtest-$suffix
index=pkgtest$suffix
worker_pid=
cleanup() {
  if [ -n "$worker_pid" ] && kill -0 "$worker_pid" 2>/dev/null; then kill -9 "$worker_pid" || true; fi
  [ -n "${tracer_pid:-}" ] && kill -9 "$tracer_pid" 2>/dev/null || true
  [ -n "${notify_pid:-}" ] && kill "$notify_pid" 2>/dev/null || true
  # Only what this run installed: a package found installed before it is never touched.
  if [ -n "${installed_here:-}" ]; then dpkg --purge "$PKG" >/dev/null 2>&1 || true; fi
  for q in "$queue" "$queue.replies" "$queue.dead"; do
    scripts/services.sh rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  scripts/services.sh rabbitmqctl -q eval \
    "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$queue.dlx\">>), false, <<\"package-test\">>)." >/dev/null 2>&1 || true
  curl -s -XDELETE "$ES/%26$index.c" >/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT

if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q 'install ok'; then
  fail "$PKG is already installed here: remove it first (dpkg --purge $PKG)"
fi
[ -z "$(leftovers)" ] || fail "left from an earlier install: $(leftovers | tr '\n' ' ')"

deb=$(scripts/package.sh)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
log "built $deb ($(du -k "$deb" | cut -f1) KiB, $(dpkg-deb -c "$deb" | grep -vc '/$') files)"
dpkg-deb -c "$deb" | awk '$6 !~ /\/$/ {print "  " $3 "\t" $6}'

# --- install ----------------------------------------------------------------------
installed_here=1
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >/dev/null
dpkg-query -W -f='${Status}\n' "$PKG" | grep -q 'install ok installed' || fail "not installed"
getent passwd "$PKG" >/dev/null || fail "the package made no $PKG user"
[ "$(stat -c '%U:%G %a' /etc/$PKG/config.toml)" = "root:$PKG 640" ] ||
  fail "config.toml is $(stat -c '%U:%G %a' /etc/$PKG/config.toml), not root:$PKG 640"
for f in /etc/$PKG/config.toml /etc/$PKG/rules.toml /etc/default/$PKG; do
  grep -qx "$f" /var/lib/dpkg/info/$PKG.conffiles || fail "$f is not a conffile"
done
cmp -s config/default.toml /etc/$PKG/config.toml || fail "config.toml is not config/default.toml"
log "installed: /usr/bin/$PKG, user $PKG, conffiles root:$PKG 640"

# --- version ----------------------------------------------------------------------
commit=$(git rev-parse --short=12 HEAD)
shown=$(/usr/bin/$PKG --version)
[[ "$shown" == "$PKG $version (commit $commit"* ]] || fail "--version says '$shown', not $version and $commit"
log "--version: $shown"

# --- man pages --------------------------------------------------------------------
for page in /usr/share/man/man1/$PKG*.1.gz; do
  warnings=$(man --warnings -l "$page" 2>&1 >/dev/null || true)
  [ -z "$warnings" ] || fail "man -l $page warns: $warnings"
done
rendered=$(MANWIDTH=80 man -l /usr/share/man/man1/$PKG.1.gz 2>/dev/null | col -b)
for heading in NAME SYNOPSIS OPTIONS SUBCOMMANDS FILES ENVIRONMENT SIGNALS "EXIT STATUS" VERSION; do
  grep -q "^$heading" <<<"$rendered" || fail "the man page has no $heading section"
done
grep -q "$version" <<<"$rendered" || fail "the man page doesn't name version $version"
# Read whole before it is searched: `grep -q` leaves at the first match, and under
# pipefail the SIGPIPE of a `man` still writing failed the check (seen in CI).
send_page=$(MANWIDTH=80 man -l /usr/share/man/man1/$PKG-send.1.gz 2>/dev/null | col -b)
grep -q -- '--index' <<<"$send_page" || fail "mupdate-worker-send(1) doesn't document --index"
man -w $PKG >/dev/null 2>&1 || fail "man can't find $PKG(1) on its path"
log "man pages: $(ls /usr/share/man/man1/$PKG*.1.gz | wc -l) render without warnings"

# --- completions ------------------------------------------------------------------
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}
command -v zsh >/dev/null && command -v fish >/dev/null || apt_install zsh fish
bash_words=$(bash -c "source /usr/share/bash-completion/completions/$PKG
  COMP_WORDS=($PKG se); COMP_CWORD=1; COMP_LINE='$PKG se'; COMP_POINT=\${#COMP_LINE}
  _${PKG//-/__} $PKG se $PKG; echo \"\${COMPREPLY[*]}\"")
[[ " $bash_words " == *" send "* ]] || fail "bash completes '$PKG se' to '$bash_words', not send"
zsh -fc "autoload -Uz compinit && compinit -u -D && fpath=(/usr/share/zsh/vendor-completions \$fpath) &&
  autoload -Uz _$PKG && whence -w _$PKG" | grep -q function || fail "zsh doesn't load _$PKG"
head -1 /usr/share/zsh/vendor-completions/_$PKG | grep -qx "#compdef $PKG" || fail "_$PKG is not bound to $PKG"
fish_words=$(fish --no-config -c "source /usr/share/fish/vendor_completions.d/$PKG.fish; complete -C '$PKG requeue-'")
grep -q '^requeue-dead' <<<"$fish_words" || fail "fish completes '$PKG requeue-' to '$fish_words'"
log "completions: bash and fish complete subcommands, zsh loads them bound to $PKG"

# --- the unit ---------------------------------------------------------------------
verify=$(systemd-analyze verify "$UNIT" 2>&1) || fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify warns: $verify"
security=$(systemd-analyze security --offline=true --no-pager "$UNIT" 2>&1) ||
  fail "systemd-analyze security: $security"
exposure=$(sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p' <<<"$security")
[ -n "$exposure" ] || fail "no exposure level in: $security"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' ||
  fail "exposure $exposure is above $MAX_EXPOSURE: $(grep '✗' <<<"$security")"
grep -q '^Type=notify$' "$UNIT" || fail "the unit is not Type=notify"
log "unit: verifies; systemd-analyze security: $(grep 'Overall exposure' <<<"$security" | sed 's/.*: //')"

# --- the installed worker, run as the unit runs it ----------------------------------
# The operator's edits: the environment file points the worker at this test's queues,
# the configuration at a free metrics port. Both are kept by the upgrade and removal
# below, and gone after the purge.
cat >>/etc/default/$PKG <<EOF
MUPDATE__AMQP__REQUEST_QUEUE=$queue
MUPDATE__AMQP__REPLY_QUEUE=$queue.replies
MUPDATE__AMQP__DEAD_LETTER_EXCHANGE=$queue.dlx
MUPDATE__AMQP__DEAD_LETTER_QUEUE=$queue.dead
EOF
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -i "s/^listen = \"127.0.0.1:9464\"/listen = \"127.0.0.1:$port\"  # edited by package-test/" /etc/$PKG/config.toml
grep -q 'edited by package-test' /etc/$PKG/config.toml || fail "metrics.listen not found in config.toml"

user=$(sed -n 's/^User=//p' "$UNIT")
exec_start=$(sed -n 's/^ExecStart=//p' "$UNIT")
env_file=$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$UNIT")
[ "$env_file" = /etc/default/$PKG ] || fail "the unit reads its environment from '$env_file'"
# systemd's notify socket: every datagram the worker sends, one a line.
python3 - "$run/notify" "$run/notified" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
import os; os.chmod(sys.argv[1], 0o777)
with open(sys.argv[2], "a", buffering=1) as out:
    while True:
        out.write(s.recv(4096).decode().replace("\n", " ").strip() + "\n")
PY
notify_pid=$!
for _ in $(seq 50); do [ -S "$run/notify" ] && break; sleep 0.1; done
# setpriv execs the command as the user (no session process in between, as under
# systemd), traced by strace: every system call it makes, and every socket family it
# opens, is held against the unit's SystemCallFilter= and RestrictAddressFamilies= below.
command -v strace >/dev/null || apt_install strace
setpriv=$(command -v setpriv)
install -o "$user" -m 600 /dev/null "$run/syscalls"
# shellcheck disable=SC2086 # ExecStart's words, as systemd splits them.
env -i PATH=/usr/bin:/bin NOTIFY_SOCKET="$run/notify" $(grep -E '^[A-Z_]+=' "$env_file") \
  "$setpriv" --reuid="$user" --regid="$user" --init-groups -- \
  "$(command -v strace)" -f -qq -o "$run/syscalls" $exec_start >"$run/worker.log" 2>&1 &
tracer_pid=$!
for _ in $(seq 50); do worker_pid=$(pgrep -P "$tracer_pid" -x $PKG || true); [ -n "$worker_pid" ] && break; sleep 0.1; done
[ -n "$worker_pid" ] || fail "the worker didn't start: $(cat "$run/worker.log")"
for _ in $(seq 300); do grep -q 'READY=1' "$run/notified" 2>/dev/null && break; sleep 0.1; done
grep -q 'READY=1' "$run/notified" 2>/dev/null || fail "no READY=1 within 30 s: $(cat "$run/worker.log")"
grep -q "READY=1 STATUS=consuming $queue" "$run/notified" || fail "READY=1 without the status: $(cat "$run/notified")"
[ "$(ps -o user= -p "$worker_pid")" = "$user" ] ||
  fail "the worker doesn't run as $user"

curl -sf -XPUT "$ES/%26$index.c" >/dev/null
curl -sf -XPUT -H 'content-type: application/json' "$ES/%26$index.c/_doc/p1?refresh=true" \
  -d '{"price": 1, "name": "chair"}' >/dev/null
reply=$(echo '{"_id": "p1", "body": {"price": 10}}' |
  env -i PATH=/usr/bin:/bin $(grep -E '^[A-Z_]+=' "$env_file") \
    /usr/bin/$PKG --config /etc/$PKG/config.toml send --index "$index" --collection c \
    --documents - --refresh wait_for) || fail "send failed: $reply; $(cat "$run/worker.log")"
grep -q '"status":200' <<<"$reply" || fail "the reply is not 200: $reply"
stored=$(curl -sf "$ES/%26$index.c/_doc/p1")
grep -q '"price":10' <<<"$stored" || fail "the document was not updated: $stored"
curl -sf "http://127.0.0.1:$port/readyz" | grep -q ready || fail "/readyz on the edited port is not ready"
log "installed worker: READY=1 once consuming, one mUpdate answered 200 and applied"

# A reload (ExecReload=) in the traced run: SIGHUP, answered without a restart.
kill -HUP "$worker_pid"
for _ in $(seq 50); do grep -q 'SIGHUP' "$run/worker.log" && break; sleep 0.1; done
grep -q 'SIGHUP' "$run/worker.log" || fail "no SIGHUP handling logged: $(cat "$run/worker.log")"
kill -TERM "$worker_pid"
for _ in $(seq 400); do kill -0 "$tracer_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$tracer_pid" 2>/dev/null && fail "the worker didn't stop within 40 s of SIGTERM"
wait "$tracer_pid" && code=0 || code=$?
worker_pid=
[ "$code" = 0 ] || fail "the worker exited $code on SIGTERM: $(tail -5 "$run/worker.log")"
grep -q 'STOPPING=1 EXTEND_TIMEOUT_USEC=' "$run/notified" || fail "no STOPPING=1 with its bound: $(cat "$run/notified")"
log "SIGTERM: STOPPING=1, exit 0 ($(tr '\n' '|' <"$run/notified"))"

# The system calls the worker made, from its start to its exit, against the unit's
# filter: the allowed list less the denied (systemd-analyze expands the @groups).
expand() {
  local group entry
  for group; do
    systemd-analyze syscall-filter --no-pager "$group" | awk 'NR > 1 && NF == 1 && $1 !~ /^#/ {print $1}' |
      while read -r entry; do
        case $entry in @*) expand "$entry" ;; *) echo "$entry" ;; esac
      done
  done | sort -u
}
filters=$(sed -n 's/^SystemCallFilter=//p' "$UNIT")
allow_groups=$(grep -v '^~' <<<"$filters" | tr ' ' '\n' | grep .)
deny_groups=$(grep '^~' <<<"$filters" | sed 's/^~//' | tr ' ' '\n' | grep .)
# shellcheck disable=SC2086
comm -23 <(expand $allow_groups) <(expand $deny_groups) >"$run/allowed"
sed -n 's/^[0-9]* *\([a-z_0-9]*\)(.*/\1/p' "$run/syscalls" | sort -u >"$run/used"
[ -s "$run/used" ] || fail "strace recorded no system call"
refused=$(comm -23 "$run/used" "$run/allowed")
[ -z "$refused" ] || fail "the worker calls what SystemCallFilter= refuses: $(echo $refused)"
families=$(sed -n 's/.*socket(\(AF_[A-Z0-9]*\).*/\1/p' "$run/syscalls" | sort -u | tr '\n' ' ')
allowed_families=" $(sed -n 's/^RestrictAddressFamilies=//p' "$UNIT") "
for family in $families; do
  [[ "$allowed_families" == *" $family "* ]] || fail "the worker opens $family sockets, not in RestrictAddressFamilies="
done
# MemoryDenyWriteExecute=: no mapping both writable and executable, no memory made
# executable after the fact, no executable shared memory (what systemd refuses).
if grep -E 'mmap\(.*PROT_WRITE\|PROT_EXEC|mmap\(.*PROT_EXEC\|PROT_WRITE|mprotect\(.*PROT_EXEC|shmat\(.*SHM_EXEC' "$run/syscalls"; then
  fail "the worker maps memory writable and executable (MemoryDenyWriteExecute=)"
fi
# ProtectSystem=strict, ProtectHome=, ProcSubset=pid: no file opened for writing outside
# /dev, nothing under /home, /root or /run/user, nothing in /proc but processes.
if grep -E 'open(at)?\(.*"[^"]*".*O_(WRONLY|RDWR|CREAT)' "$run/syscalls" | grep -vE '"/dev/(null|urandom|random)"'; then
  fail "the worker opens a file for writing (ProtectSystem=strict)"
fi
# One read is known: mimalloc, the worker's allocator, reads
# /proc/sys/vm/overcommit_memory once at start; where ProcSubset=pid hides it, it assumes
# overcommit (right for the kernel's default, 0, and for 1; docs/src/install.md says what
# to set on a host with 2).
if grep -E '"/(home|root|run/user)/|"/proc/(sys|meminfo|cpuinfo|stat|loadavg)' "$run/syscalls" |
  grep -vE 'open(at)?\((AT_FDCWD, )?"/proc/sys/vm/overcommit_memory", O_RDONLY'; then
  fail "the worker reads what ProtectHome= or ProcSubset=pid hides"
fi
log "the worker's $(wc -l <"$run/used") system calls are all in SystemCallFilter=, its sockets ($families) in RestrictAddressFamilies="

# --- upgrade: a later revision keeps the edits ------------------------------------
# Revision 2 is this package repacked with both an edited config.toml (the operator's
# edit wins: --force-confold, as apt -o Dpkg::Options::=--force-confold) and a new
# rules.toml (not edited here, so dpkg installs the new one, keeping the old file's
# owner and mode); the postinst gives a freshly written conffile to the service's group
# before it restarts the worker.
systemctl enable $PKG >/dev/null 2>&1 || fail "systemctl enable $PKG"
[ -L /etc/systemd/system/multi-user.target.wants/$PKG.service ] || fail "enable made no symlink"
edited=$(sha256sum /etc/$PKG/config.toml /etc/default/$PKG)
dpkg-deb -R "$deb" "$run/v2"
echo "# revision 2" >>"$run/v2/etc/$PKG/config.toml"
echo "# revision 2" >>"$run/v2/etc/$PKG/rules.toml"
sed -i "s/^Version: .*/Version: $version-2/" "$run/v2/DEBIAN/control"
(cd "$run/v2" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | xargs -0 md5sum >DEBIAN/md5sums)
deb2=$run/${PKG}_$version-2.deb
dpkg-deb -b --root-owner-group "$run/v2" "$deb2" >/dev/null
DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold "$deb2" >/dev/null
dpkg-query -W -f='${Version}' "$PKG" | grep -qx "$version-2" || fail "not upgraded to $version-2"
[ "$(sha256sum /etc/$PKG/config.toml /etc/default/$PKG)" = "$edited" ] || fail "the upgrade lost the edits"
grep -q '# revision 2' /etc/$PKG/rules.toml || fail "the unedited rules.toml was not upgraded"
[ "$(stat -c '%U:%G %a' /etc/$PKG/rules.toml)" = "root:$PKG 640" ] ||
  fail "the upgraded rules.toml is $(stat -c '%U:%G %a' /etc/$PKG/rules.toml)"
postinst=/var/lib/dpkg/info/$PKG.postinst
[ "$(grep -n 'chown root:' "$postinst" | head -1 | cut -d: -f1)" -lt "$(grep -n 'deb-systemd-invoke try-restart' "$postinst" | head -1 | cut -d: -f1)" ] ||
  fail "the postinst restarts the worker before its configuration is readable"
[ -L /etc/systemd/system/multi-user.target.wants/$PKG.service ] || fail "the upgrade disabled the unit"
log "upgrade to $version-2: edits kept, the new rules.toml root:$PKG 640, unit still enabled"

# --- remove: conffiles stay, with their edits ---------------------------------------
dpkg -r "$PKG" >/dev/null
[ ! -e /usr/bin/$PKG ] && [ ! -e "$UNIT" ] || fail "dpkg -r left the binary or the unit"
[ "$(sha256sum /etc/$PKG/config.toml /etc/default/$PKG)" = "$edited" ] || fail "dpkg -r lost the edits"
dpkg-query -W -f='${Status}' "$PKG" | grep -q 'config-files' || fail "not in config-files state"
log "dpkg -r: binary and unit gone, edited conffiles kept"

# --- purge: nothing left ------------------------------------------------------------
dpkg --purge "$PKG" >/dev/null
left=$(leftovers)
[ -z "$left" ] || fail "dpkg --purge left: $left"
log "dpkg --purge: nothing left (files, unit symlinks, user, group)"

# --- purge with an operator's file: the user and group stay with it ------------------
# A TLS key the operator gave to the service's group must not be left to a GID a later
# group gets: the purge keeps the user and group while a file in /etc/mupdate-worker
# still names them.
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >/dev/null
install -o root -g "$PKG" -m 640 /dev/null /etc/$PKG/client.key
dpkg --purge "$PKG" >/dev/null 2>&1
getent group "$PKG" >/dev/null || fail "the purge removed the group while /etc/$PKG/client.key is its"
[ "$(stat -c %G /etc/$PKG/client.key)" = "$PKG" ] || fail "client.key lost its group"
rm -r /etc/$PKG
userdel "$PKG"
getent group "$PKG" >/dev/null && groupdel "$PKG"
left=$(leftovers)
[ -z "$left" ] || fail "left after the second purge: $left"
log "dpkg --purge beside an operator's file: the user and group stay with it"
log "ok"
