#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input for a bounded time: conditions, templates, the config
# loader and the change-log row decoder (observer-core/tests/fuzz.rs, proptest on the stable
# toolchain; docs/reliability.md says why not cargo-fuzz).
#
#   scripts/fuzz.sh               # 60 s per target
#   scripts/fuzz.sh --secs 10     # N seconds per target
#   scripts/fuzz.sh --cases 1024  # cases per round (a round is one seed; default 256)
#
# Each target keeps running rounds with fresh seeds until its time is up, in a debug build
# (overflow checks on) with the address space capped at 4 GiB, so a case that tries to allocate
# without bound fails instead of taking the machine down. Prints cases run and time per target;
# exits non-zero on the first failure, which proptest shrinks and saves under
# observer-core/tests/ (fuzz.regressions, replayed first on every later run; commit it with
# the fix).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=60
cases=256
while [ $# -gt 0 ]; do
  case "$1" in
    --secs) secs="$2"; shift 2 ;;
    --cases) cases="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "fuzz.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

cargo test -p observer-core --test fuzz --no-run >/dev/null 2>&1 \
  || cargo test -p observer-core --test fuzz --no-run
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "fuzz.sh: $secs s per target, $cases cases per round" >&2
set +e
(
  ulimit -v $((4 * 1024 * 1024))
  FUZZ_SECS="$secs" PROPTEST_CASES="$cases" RUST_BACKTRACE=0 \
    cargo test -q -p observer-core --test fuzz -- --test-threads 1 --nocapture
) >"$log" 2>&1
rc=$?
set -e
grep -oE 'fuzz target .*|panicked.*|failed after.*|minimal failing input.*|test result.*' "$log" || true
if [ $rc -ne 0 ]; then
  echo "fuzz.sh: FAILED (full output below)" >&2
  cat "$log" >&2
  exit $rc
fi
echo "fuzz.sh: all targets passed" >&2
