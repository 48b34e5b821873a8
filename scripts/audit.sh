#!/usr/bin/env bash
# Dependency policy (deny.toml): licences, banned crates and sources always; RustSec advisories
# when the advisory database can be fetched (it lives on github.com).
#   scripts/audit.sh                    # everything; fails if advisories cannot be checked
#   scripts/audit.sh --offline-ok       # as above, but an unreachable advisory database is a
#                                       # loud warning instead of a failure (used by scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
offline_ok=0
[[ "${1:-}" == "--offline-ok" ]] && offline_ok=1

DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q "$DENY_VERSION"; then
  echo "audit: installing cargo-deny $DENY_VERSION from the Rust registry (once per machine)"
  cargo install cargo-deny --locked --version "$DENY_VERSION" --quiet
fi

cargo deny --all-features check licenses bans sources

db_dir="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
# A network that resolves github.com but never answers must not hang the suite.
rc=0
timeout 300 cargo deny --all-features check advisories 2>/tmp/fraiseql-audit-advisories.$$ || rc=$?
if [[ $rc == 0 ]]; then
  echo "audit: advisories ok"
else
  out="$(cat /tmp/fraiseql-audit-advisories.$$)"
  rm -f /tmp/fraiseql-audit-advisories.$$
  [[ $rc == 124 ]] && out="failed to fetch: timed out after 300 s"$'\n'"$out"
  if grep -qiE "failed to (fetch|clone|open)|unable to (fetch|clone)|could not (fetch|clone)|network|resolve|connect" <<<"$out" \
     && ! grep -q "error\[" <<<"$out"; then
    echo "audit: WARNING: RustSec advisories NOT checked: the advisory database could not be fetched" >&2
    echo "audit: (github.com/rustsec/advisory-db; cached copy: $db_dir)" >&2
    grep -iE "fetch|clone|connect|resolve" <<<"$out" | head -3 >&2 || true
    [[ $offline_ok == 1 ]] && exit 0
    exit 1
  fi
  echo "$out" >&2
  exit 1
fi
rm -f /tmp/fraiseql-audit-advisories.$$
