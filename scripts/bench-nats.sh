#!/usr/bin/env bash
# Benchmark of the `nats` layer (docs/scaling.md): release build, a private nats-server -js on a
# free port (its own store, removed at exit; the server on 4222 is never touched), a database
# of its own on the local Postgres, and the benchmark's own loopback HTTP sink
# (`observer-bench --serve-sink`, hyper on one thread) that answers 204 after an optional delay.
#
#   scripts/bench-nats.sh [EVENTS]          # default 20000
#
# Prints, with the load average at the start and at the end:
#   1. publisher only: change log -> JetStream acknowledged, events/s (no workers);
#   2. end to end (change log -> publisher -> stream -> workers -> sink) with 1, 2 and 4
#      workers, against the fast sink and a 20 ms sink, events/s;
#   3. wrk's requests/s (-t1 -c64) against the fast sink in the same run, and each fast-sink
#      figure as a ratio to it (figures move between runs; compare ratios). scripts/setup.sh
#      brings up Postgres and installs nats-server and wrk when they are missing.
# On a 2-core machine the workers, the publisher, nats-server, Postgres and the sink share the
# CPU: the 20 ms sink is the test of scaling (throughput should grow with workers until
# partitions x 20 ms or the CPU binds).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"
case "$N" in ""|*[!0-9]*|0) echo "bench-nats: EVENTS must be a positive whole number, got '$N'" >&2; exit 2 ;; esac
PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
SETUP_BENCH=1 scripts/setup.sh
cargo build --release --quiet -p observer-cli -p observer-bench
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
BIN="${target_dir:-target}/release/fraiseql-observers"
SINK="${target_dir:-target}/release/observer-bench"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work="$(mktemp -d)"
db="obs_bench_nats_$$"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
[ -n "${BENCH_KEEP:-}" ] && trap - EXIT

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
nport="$(free_port)"; mport="$(free_port)"
nats-server -a 127.0.0.1 -p "$nport" -m "$mport" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$mport/jsz" >/dev/null && break; sleep 0.1; done


psql "$PG/postgres" -qc "CREATE DATABASE $db" >/dev/null
sport="$(free_port)"
config() { # $1 = sink port
  cat <<TOML
[database]
url = "$PG/$db"
[listener]
id = "bench"
start_from = "beginning"
[features]
nats = true
concurrent = true
[concurrent]
max_in_flight = 256
[action_log]
record = "failures"
[nats]
url = "nats://127.0.0.1:$nport"
partitions = 64
[outbound]
allow = ["127.0.0.0/8"]
[[observers]]
name = "bench"
entity = "Order"
  [[observers.actions]]
  type = "webhook"
  url = "http://127.0.0.1:$1/hook"
TOML
}
config "$sport" >"$work/c.toml"
"$BIN" --config "$work/c.toml" migrate >/dev/null
psql "$PG/$db" -qc "INSERT INTO tb_entity_change_log (object_type, object_id, modification_type, object_data)
  SELECT 'Order', i::text, 'INSERT', jsonb_build_object('id', i, 'status', 'new') FROM generate_series(1, $N) i" >/dev/null

stream_seq() { # last sequence of stream $1
  curl -sf "http://127.0.0.1:$mport/jsz?accounts=true&streams=true" | python3 -c "
import json,sys
d=json.load(sys.stdin); n=0
for a in d.get('account_details',[]):
  for s in a.get('stream_detail',[]):
    if s['name']==sys.argv[1]: n=s['state']['last_seq']
print(n)" "$1"
}
elapsed() { python3 -c "import time; print(f'{time.time()-$1:.2f}')"; }
now() { python3 -c 'import time; print(time.time())'; }

run_env() { # stream and listener of their own per run, so each starts from an empty stream
  # (max_bytes: the server reserves it per stream; seven streams of the default would not fit.)
  echo "OBSERVER__NATS__STREAM=$1 OBSERVER__NATS__SUBJECT_PREFIX=p$1 OBSERVER__NATS__CONSUMER_PREFIX=c$1 OBSERVER__LISTENER__ID=l$1 OBSERVER__NATS__MAX_BYTES=268435456"
}

# Waits until `$1` (a command printing a number) reaches $2; fails naming $3 when the number
# has not moved for 60 s (a stuck run is an error, not a hang).
wait_until() {
  local last=-1 since; since="$(date +%s)"
  while :; do
    local v; v="$($1)"
    [ "$v" -ge "$2" ] && return 0
    if [ "$v" != "$last" ]; then last="$v"; since="$(date +%s)"; fi
    if [ $(( $(date +%s) - since )) -ge 60 ]; then
      echo "bench-nats: $3 stalled at $v of $2 for 60 s; logs in $work (kept)" >&2
      trap - EXIT; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; exit 1
    fi
    sleep 0.2
  done
}
delivered() { echo $(( $(curl -sf "http://127.0.0.1:$sport/count") - base )); }
pubonly_seq() { stream_seq PUBONLY; }

# 1. Publisher only.
env $(run_env PUBONLY) "$BIN" --config "$work/c.toml" migrate --nats >/dev/null
t0="$(now)"
env $(run_env PUBONLY) "$BIN" --config "$work/c.toml" run --role publisher 2>"$work/pub.log" &
ppid=$!; pids+=($ppid)
wait_until pubonly_seq "$N" "the publisher-only run"
t="$(elapsed "$t0")"; kill "$ppid"; wait "$ppid" 2>/dev/null || true
echo "publisher only: $N events in $t s = $(python3 -c "print(round($N/$t))") events/s (change log -> JetStream acknowledged, incl. start-up)"

# 2. The single process (--role all) and end to end, against each sink.
wrk_rps=""
report() { # $1 label, $2 t0
  local t rate ratio=""
  t="$(elapsed "$2")"
  rate="$(python3 -c "print(round($N/$t))")"
  if [ "$delay" = 0 ] && [ -n "$wrk_rps" ]; then ratio=" ($(python3 -c "print(round($rate/$wrk_rps, 3))") of wrk)"; fi
  echo "$1, ${delay} ms sink (${cap#*=} in flight per process): $N events in $t s = $rate events/s$ratio (load $(cut -d' ' -f1 /proc/loadavg))"
}
for delay in 0 20; do
  # Against the 20 ms sink each process is held to 16 actions in flight (a worker's capacity,
  # as a real machine's would be), so what more workers add shows: with 256 in flight one worker
  # already holds every partition busy and the partitions x 20 ms bound is reached at once.
  if [ "$delay" = 20 ]; then cap="OBSERVER__CONCURRENT__MAX_IN_FLIGHT=16"; else cap="OBSERVER__CONCURRENT__MAX_IN_FLIGHT=256"; fi
  "$SINK" --serve-sink "$sport" --sink-delay-ms "$delay" &
  sink=$!; pids+=($sink)
  for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$sport/count" >/dev/null && break; sleep 0.1; done
  if [ "$delay" = 0 ]; then
    wrk_rps="$(wrk -t1 -c64 -d5s -s <(echo 'wrk.method="POST"; wrk.body="{}"') "http://127.0.0.1:$sport/hook" | awk '/Requests\/sec/ {print $2}')"
    echo "wrk -t1 -c64 against the fast sink: $wrk_rps requests/s"
  fi

  base="$(curl -sf "http://127.0.0.1:$sport/count")"
  t0="$(now)"
  env "$cap" OBSERVER__LISTENER__ID="single$delay" "$BIN" --config "$work/c.toml" run 2>"$work/single$delay.log" &
  spid=$!; pids+=($spid)
  wait_until delivered "$N" "the single process, ${delay} ms sink"
  report "single process (--role all)" "$t0"
  kill "$spid"; wait "$spid" 2>/dev/null || true

  for workers in 1 2 4; do
    name="E${delay}W${workers}"
    env $(run_env "$name") "$BIN" --config "$work/c.toml" migrate --nats >/dev/null
    base="$(curl -sf "http://127.0.0.1:$sport/count")"
    wp=()
    for i in $(seq 1 "$workers"); do
      env "$cap" $(run_env "$name") "$BIN" --config "$work/c.toml" run --role worker 2>"$work/$name-w$i.log" &
      wp+=($!); pids+=($!)
    done
    # Every worker pulling before the clock starts.
    for i in $(seq 1 "$workers"); do
      for _ in $(seq 1 300); do grep -q 'pulling from every partition' "$work/$name-w$i.log" && break; sleep 0.1; done
      grep -q 'pulling from every partition' "$work/$name-w$i.log" || { echo "bench-nats: worker $i of $name did not start; see $work/$name-w$i.log (kept)" >&2; trap - EXIT; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; exit 1; }
    done
    t0="$(now)"
    env $(run_env "$name") "$BIN" --config "$work/c.toml" run --role publisher 2>"$work/$name-p.log" &
    ppid=$!; pids+=($ppid)
    wait_until delivered "$N" "end to end with $workers worker(s), ${delay} ms sink"
    report "end to end, $workers worker(s)" "$t0"
    kill "$ppid" "${wp[@]}"; wait "$ppid" "${wp[@]}" 2>/dev/null || true
  done
  kill "$sink"; wait "$sink" 2>/dev/null || true
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
