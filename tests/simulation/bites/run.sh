#!/usr/bin/env bash
# Puts back each bug of this folder in turn (git apply), runs the simulation until a
# seed fails (fixed seeds first, from 0), prints the seed and what failed, and takes the
# bug out again. Usage: tests/simulation/bites/run.sh [NAME.patch ...]
set -euo pipefail
cd "$(dirname "$0")/../../.."
patches=("$@")
[ ${#patches[@]} -gt 0 ] || patches=(tests/simulation/bites/*.patch)
for patch in "${patches[@]}"; do
  git apply "$patch"
  out=$(cargo test -q --test simulation -- --seeds 20000 2>&1 || true)
  git apply -R "$patch"
  echo "$(basename "$patch"): $(grep -m1 -E 'FAILED|passed' <<<"$out" | cut -c1-300)"
done
