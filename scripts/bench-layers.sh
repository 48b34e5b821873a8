#!/usr/bin/env bash
# The layer matrix of the end-to-end benchmark: events/s and commit-to-delivery p50/p99 with each
# layer on, and with all of them, against a fast sink and a sink that adds 20 ms per request.
# Each layer's phase is the default (checkpoint + concurrent) plus that layer; the sequential
# phases switch `concurrent` off; the drain phases insert the events while the daemon is paused
# and give its rate on the committed backlog. Before every fast-sink phase, wrk -t1 -c64 measures the
# bench's own sink (the same code, `observer-bench --serve-sink`) for 3 s, and the phase's
# events/s is printed as a ratio to it, with the load average at the phase's start.
# Needs Postgres and Redis, and wrk (scripts/setup.sh with SETUP_BENCH=1, run here). Writes one
# JSON report per run under target/bench-layers/ and prints a summary table. See
# docs/benchmarks.md.
#
#   scripts/bench-layers.sh [--events N] [--latency-secs S] [--only REGEX]
#
# --only runs the phases whose name matches the (extended) regular expression, e.g.
# --only '^(checkpoint|search|queue)' for the search and queue figures beside their baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
events=100000
latency_secs=10
only=
while [ $# -gt 0 ]; do
  case "$1" in
    --events) events="$2"; shift 2 ;;
    --latency-secs) latency_secs="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -n "$only" ]; then
  # grep exits 2 on a bad expression; say so instead of skipping every phase.
  rc=0; grep -Eq -- "$only" <<<"" 2>/dev/null || rc=$?
  if [ "$rc" -gt 1 ]; then echo "--only: not a valid extended regular expression: $only" >&2; exit 2; fi
fi
SETUP_BENCH=1 scripts/setup.sh
cargo build --release --quiet -p observer-cli -p observer-bench
bin=target/release
out=target/bench-layers
mkdir -p "$out"
redis="REDIS_URL=redis://127.0.0.1:6379"
prefix="OBSERVER__REDIS__KEY_PREFIX=bench-$$"
# A limit far above what the sink can take, so the layer's cost shows, not its throttling.
rate="OBSERVER__RATE_LIMIT__DEFAULT__PER_SECOND=1000000 OBSERVER__RATE_LIMIT__DEFAULT__MAX_CONCURRENT=0"

# name | sink delay ms | record | flags
runs=(
  "default (checkpoint + concurrent)|0|all|"
  "checkpoint, sequential|0|all|--env OBSERVER__FEATURES__CONCURRENT=false"
  "dedup|0|all|--feature dedup --env $redis --env $prefix-a"
  "metrics|0|all|--feature metrics --env OBSERVER__METRICS__LISTEN=127.0.0.1:0"
  "circuit_breaker|0|all|--feature circuit_breaker"
  "rate_limit|0|all|--feature rate_limit $(for kv in $rate; do printf -- '--env %s ' "$kv"; done)"
  "target set|0|all|--feature concurrent --feature dedup --feature metrics --env $redis --env $prefix-b --env OBSERVER__METRICS__LISTEN=127.0.0.1:0"
  "target set, record=failures|0|failures|--feature concurrent --feature dedup --feature metrics --env $redis --env $prefix-c --env OBSERVER__METRICS__LISTEN=127.0.0.1:0"
  "default, drain|0|all|--backlog --skip-latency"
  "target set, drain|0|all|--backlog --skip-latency --feature concurrent --feature dedup --feature metrics --env $redis --env $prefix-g --env OBSERVER__METRICS__LISTEN=127.0.0.1:0"
  "all layers|0|all|--feature concurrent --feature dedup --feature metrics --feature circuit_breaker --feature rate_limit --env $redis --env $prefix-d --env OBSERVER__METRICS__LISTEN=127.0.0.1:0 $(for kv in $rate; do printf -- '--env %s ' "$kv"; done)"
  "target set, batch 500|0|all|--feature concurrent --feature dedup --feature metrics --env $redis --env $prefix-f --env OBSERVER__METRICS__LISTEN=127.0.0.1:0 --env OBSERVER__CONCURRENT__MAX_IN_FLIGHT=1024 --batch 500"
  "search (postgres audit)|0|all|--feature search"
  "search, cluster unreachable|0|all|--feature search --env OBSERVER__SEARCH__BACKEND=elasticsearch --env OBSERVER__SEARCH__URL=http://127.0.0.1:9"
  "queue, sequential|0|all|--env OBSERVER__FEATURES__CONCURRENT=false --feature queue --env $redis --env $prefix-q --env OBSERVER__QUEUE__WORKERS=64 --env OBSERVER__QUEUE__DEDUP_TTL_SECS=600"
  "queue, concurrent|0|all|--feature queue --feature concurrent --env $redis --env $prefix-r --env OBSERVER__QUEUE__WORKERS=64 --env OBSERVER__QUEUE__DEDUP_TTL_SECS=600"
  "checkpoint, sequential, 20 ms sink|20|all|--env OBSERVER__FEATURES__CONCURRENT=false"
  "target set, 20 ms sink|20|all|--feature concurrent --feature dedup --feature metrics --env $redis --env $prefix-e --env OBSERVER__METRICS__LISTEN=127.0.0.1:0 --env OBSERVER__CONCURRENT__MAX_IN_FLIGHT=256"
)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sport="$(free_port)"
"$bin/observer-bench" --serve-sink "$sport" &
sink_pid=$!
trap 'kill $sink_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$sport/count" >/dev/null && break; sleep 0.1; done
ceiling() { wrk -t1 -c64 -d3s -s <(echo 'wrk.method="POST"; wrk.body="{}"') "http://127.0.0.1:$sport/hook" | awk '/Requests\/sec/ {printf "%d", $2}'; }

printf '%-36s %6s %9s %9s %6s %8s %8s %10s\n' "run" "load" "wrk/s" "events/s" "ratio" "p50 ms" "p99 ms" "peak RSS"
for r in "${runs[@]}"; do
  IFS='|' read -r name delay record flags <<<"$r"
  if [ -n "$only" ] && ! grep -Eq -- "$only" <<<"$name"; then continue; fi
  n=$events
  # The 20 ms sink without concurrency takes 20 ms per event: keep that run short.
  if [ "$delay" != 0 ] && [[ "$flags" == *CONCURRENT=false* ]]; then n=500; fi
  load="$(cut -d' ' -f1 /proc/loadavg)"
  wrk_rps=0
  if [ "$delay" = 0 ]; then wrk_rps="$(ceiling)"; fi
  file="$out/$(echo "$name" | tr ' ,=' '___').json"
  # shellcheck disable=SC2086
  if ! "$bin/observer-bench" --daemon-bin "$bin/fraiseql-observers" --events "$n" \
      --latency-secs "$latency_secs" --skip-idle --sink-delay-ms "$delay" --record "$record" \
      $flags --json-out "$file" >"$file.log" 2>&1; then
    echo "$name: FAILED (see $file.log)"; continue
  fi
  python3 - "$file" "$name" "$load" "$wrk_rps" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["phases"]["throughput"]; l = r["phases"].get("latency", {})
lat = l.get("commit_to_delivery") or {}
peak = (r["rss"]["peak_kb"] or 0) / 1024
# A drain phase (--backlog) reports the daemon's rate on the committed backlog.
eps = t.get("drain_events_per_s") or t.get("events_per_s", 0) or 0
wrk = int(sys.argv[4] or 0)
ratio = f'{eps / wrk:.3f}' if wrk else '-'
print(f'{sys.argv[2]:<36} {sys.argv[3]:>6} {wrk or "-":>9} {eps:>9} {ratio:>6} {lat.get("p50_ms", "-"):>8} {lat.get("p99_ms", "-"):>8} {peak:>8.1f} MiB')
EOF
done
