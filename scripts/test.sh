#!/usr/bin/env bash
# The whole test suite: brings up what it needs, checks the dependency policy, then runs every test of the workspace
# (unit tests, and end-to-end tests against real Postgres and real HTTP receivers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Dependency policy (deny.toml): licences, bans, sources; advisories when github.com is reachable.
scripts/audit.sh --offline-ok
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
