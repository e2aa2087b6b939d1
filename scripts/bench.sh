#!/usr/bin/env bash
# Runs the throughput benchmark (benches/throughput/) on the local services, starting
# them first when they are not running (they are left running: others may use them).
#
#   scripts/bench.sh [--rounds 3] [--scenarios S1,S2,S3,S4,L] [--out target/bench] [--publish]
#   scripts/bench.sh --soak 600 [--rate R] [--publish]
#
# Writes target/bench/ (JSON, Markdown, PNG); --publish copies the charts to
# docs/src/bench/, which the book's benchmarks chapter (docs/src/benchmarks.md) shows.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/services.sh running || scripts/services.sh start
exec cargo bench --bench throughput -- "$@"
