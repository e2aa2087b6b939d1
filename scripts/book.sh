#!/usr/bin/env bash
# Builds the book (docs/: the README's chapters, mdbook) into docs/book/ and checks it:
# any mdbook warning or error fails, then tests/book.rs checks that the configuration
# chapter covers config/default.toml and that every relative link of the README and the
# book resolves. Installs mdbook when missing or another version: the version pinned in
# scripts/versions.env, from crates.io, without its `serve` and `watch` features (only
# `build` is used). Needs no server; scripts/test.sh runs it first.
#
#   scripts/book.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

source scripts/versions.env

log() { echo "[book] $*"; }
die() { echo "[book] $*" >&2; exit 1; }

install_mdbook() {
  if [ "$(mdbook --version 2>/dev/null || true)" = "mdbook v$MDBOOK_VERSION" ]; then
    return
  fi
  log "installing mdbook $MDBOOK_VERSION (cargo install)"
  cargo install mdbook --locked --version "$MDBOOK_VERSION" --no-default-features --features search
}

# mdbook reports problems (a missing include, a bad SUMMARY entry) as WARN or ERROR lines
# and may still exit 0: either fails the build.
build_book() {
  local out
  out=$(mdbook build docs 2>&1) || { echo "$out" >&2; die "mdbook build failed"; }
  if grep -E '\b(WARN|ERROR)\b' <<<"$out" >&2; then
    die "mdbook warned: the book is not clean"
  fi
  log "built docs/book/"
}

check_book() {
  cargo test --test book
}

install_mdbook
build_book
check_book
