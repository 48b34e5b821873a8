#!/usr/bin/env bash
# The whole test suite: brings up what it needs, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  # nextest does not run doc tests; run them separately (fast).
  cargo test --workspace --doc --quiet
else
  cargo test --workspace --no-fail-fast
fi
