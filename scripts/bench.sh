#!/usr/bin/env bash
# End-to-end benchmark of fraiseql-observers: builds the daemon and the bench in release mode,
# then runs the bench against Postgres on 127.0.0.1:5432 (override with BENCH_DATABASE_URL).
#
#   scripts/bench.sh [--events N] [--rate R] [--soak-secs S] [--json-out FILE] [other observer-bench flags]
#
# See docs/benchmarks.md for what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p observer-cli -p observer-bench
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
target_dir="${target_dir:-target}"
exec "$target_dir/release/observer-bench" --daemon-bin "$target_dir/release/fraiseql-observers" "$@"
