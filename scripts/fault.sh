#!/usr/bin/env bash
# The fault-injection suite of fraiseql-observers: builds the daemon and the harness in release
# mode, then runs the scenarios against the real binary, Postgres on 127.0.0.1:5432 (override
# with FAULT_DATABASE_URL), Redis on 127.0.0.1:6379 (FAULT_REDIS_URL; only a key prefix of its
# own), private Postgres/Redis servers for the scenarios that restart them, and an in-process
# receiver that records idempotency keys.
#
#   scripts/fault.sh [--short] [--json-out FILE] [--seed N] [SCENARIO...]
#
# Without --short the issue's sizes are used (100,000 events and ten kills, minutes of receiver
# outage, a one-hour soak: about 1 h 25 min in all). Scenarios: kill9 failover-kill9
# failover-term failover-stop failover-backends pg-restart redis-restart receiver-500
# receiver-hang receiver-close receiver-slow receiver-down dlq-write-fail soak.
# See docs/reliability.md. Exits non-zero when a scenario broke its promise.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p observer-cli --bin fraiseql-observers -p observer-tests --bin observer-fault
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
target_dir="${target_dir:-target}"
exec "$target_dir/release/observer-fault" --daemon-bin "$target_dir/release/fraiseql-observers" "$@"
