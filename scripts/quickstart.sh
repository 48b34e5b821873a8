#!/usr/bin/env bash
# Quickstart: brings up Postgres, creates the demo database with an `orders` table captured as
# entity `Order`, starts a local webhook sink and the daemon on config/quickstart.toml, writes a
# few sample changes, and shows the deliveries as they arrive. Ctrl-C stops everything.
# QUICKSTART_EXIT_AFTER=1 exits once the sample deliveries have arrived (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build -q -p observer-cli --bin fraiseql-observers
BIN=target/debug/fraiseql-observers
CFG=config/quickstart.toml
DB=fraiseql_observers_demo
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q)

# The demo database belongs to the quickstart: it is made afresh on every run.
"${PSQL[@]}" -d postgres -c "drop database if exists $DB with (force)" -c "create database $DB"
"${PSQL[@]}" -d "$DB" -c "create table orders (
    id bigint generated always as identity primary key,
    customer_email text not null,
    status text not null default 'new',
    total numeric not null,
    currency text not null default 'EUR')"
"$BIN" -c "$CFG" migrate
"$BIN" -c "$CFG" capture add orders --entity Order

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

SINK_OUT=$(mktemp)
"$BIN" listen --port 8787 --secret "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" > >(tee "$SINK_OUT") &
pids+=($!)
"$BIN" -c "$CFG" run &
pids+=($!)

# Wait until the daemon has claimed its listener (it starts at the tail of the change log).
for _ in $(seq 1 100); do
  "${PSQL[@]}" -d "$DB" -tAc "select 1 from observer_checkpoints where listener_id = 'quickstart'
      and heartbeat_at > now() - interval '30 seconds'" 2>/dev/null | grep -q 1 && break
  sleep 0.2
done

echo "quickstart: writing sample changes to orders" >&2
"${PSQL[@]}" -d "$DB" <<'SQL'
insert into orders (customer_email, total) values ('ada@example.com', 42), ('grace@example.com', 250);
update orders set status = 'paid' where customer_email = 'grace@example.com' and status = 'new';
delete from orders where customer_email = 'ada@example.com';
SQL

if [ "${QUICKSTART_EXIT_AFTER:-0}" = 1 ]; then
  for _ in $(seq 1 100); do
    [ "$(grep -c 'POST /hooks/orders' "$SINK_OUT" || true)" -ge 4 ] && break
    sleep 0.1
  done
  n=$(grep -c 'POST /hooks/orders' "$SINK_OUT" || true)
  echo "quickstart: $n deliveries received" >&2
  [ "$n" -ge 4 ] || exit 1
  exit 0
fi
echo "quickstart: deliveries appear above; write to the orders table of database $DB to see more; Ctrl-C to stop" >&2
wait
