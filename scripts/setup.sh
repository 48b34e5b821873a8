#!/usr/bin/env bash
# Brings up what fraiseql-observers needs on this machine, idempotently:
#   Postgres on 127.0.0.1:5432 reachable as user `postgres`, Redis on 127.0.0.1:6379 and NATS
#   with JetStream on 127.0.0.1:4222 (each installed from Debian's packages and started on
#   loopback when missing; a running server is reused). Redis is needed by the dedup, caching
#   and shared rate-limit layers and their tests. The `nats` layer's tests start private
#   nats-servers of their own (own port, own store), so only the binary is ensured here
#   (`ensure_nats_binary`); a server on 4222 is brought up only when SETUP_NATS=1 (the README's
#   scale-out walk-through), and a running one is reused. SETUP_BENCH=1 also ensures what the
#   benchmark scripts need beyond that: wrk (Debian's package), for their same-run ceiling.
# Safe to run any number of times. Prints what it did.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

PGHOST_ADDR=127.0.0.1
PGPORT_NUM=5432

pg_ok() { psql -h "$PGHOST_ADDR" -p "$PGPORT_NUM" -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

ensure_postgres() {
  if pg_ok; then log "postgres: reachable on $PGHOST_ADDR:$PGPORT_NUM"; return; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "postgres: not installed; installing Debian's postgresql package"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null
  fi
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$version" ]; then
    log "postgres: no cluster found; creating one"
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    as_root pg_createcluster "$version" main
  fi
  local conf=/etc/postgresql/$version/main
  # Loopback only; trust for loopback so the project's scripts and tests can connect as postgres.
  if ! grep -q '^# fraiseql-observers loopback trust' "$conf/pg_hba.conf"; then
    log "postgres: allowing trust authentication on loopback for the test/dev cluster"
    as_root sh -c "tmp=\$(mktemp); { echo '# fraiseql-observers loopback trust'; \
      echo 'host all all 127.0.0.1/32 trust'; echo 'host all all ::1/128 trust'; \
      echo 'local all postgres trust'; cat '$conf/pg_hba.conf'; } > \$tmp && \
      cat \$tmp > '$conf/pg_hba.conf' && rm -f \$tmp"
  fi
  if ! grep -q "^listen_addresses" "$conf/postgresql.conf"; then
    as_root sh -c "echo \"listen_addresses = 'localhost'\" >> '$conf/postgresql.conf'"
  fi
  log "postgres: starting cluster $version/main"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
    || as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload 2>/dev/null || true
  for _ in $(seq 1 50); do pg_ok && break; sleep 0.2; done
  pg_ok || { log "postgres: still unreachable on $PGHOST_ADDR:$PGPORT_NUM"; exit 1; }
  log "postgres: ready"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  if port_open 6379; then log "redis: reachable on 127.0.0.1:6379"; return; fi
  if ! command -v redis-server >/dev/null 2>&1; then
    log "redis: not installed; installing Debian's redis-server package"
    apt_install redis-server
  fi
  log "redis: starting on 127.0.0.1:6379 (no persistence)"
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes >/dev/null
  for _ in $(seq 1 50); do port_open 6379 && break; sleep 0.1; done
  port_open 6379 || { log "redis: still unreachable on 127.0.0.1:6379"; exit 1; }
  log "redis: ready"
}

# wrk, for the benchmarks' same-run ceiling (scripts/bench-*.sh); starts nothing.
ensure_wrk() {
  if command -v wrk >/dev/null 2>&1; then log "wrk: installed"; return; fi
  log "wrk: not installed; installing Debian's wrk package"
  apt_install wrk
  command -v wrk >/dev/null 2>&1 || { log "wrk: still missing after the install"; exit 1; }
  log "wrk: ready"
}

# The nats-server binary, for the tests' private servers; starts nothing.
ensure_nats_binary() {
  if command -v nats-server >/dev/null 2>&1; then log "nats-server: installed"; return; fi
  log "nats-server: not installed; installing Debian's nats-server package"
  apt_install nats-server
  # The package may start its own service; only on its default port, which we leave alone.
  command -v nats-server >/dev/null 2>&1 || { log "nats-server: still missing after the install"; exit 1; }
  log "nats-server: ready"
}

ensure_nats() {
  if port_open 4222; then log "nats: reachable on 127.0.0.1:4222"; return; fi
  ensure_nats_binary
  log "nats: starting with JetStream on 127.0.0.1:4222"
  nohup nats-server -a 127.0.0.1 -p 4222 -js >/tmp/fraiseql-observers-nats.log 2>&1 &
  for _ in $(seq 1 50); do port_open 4222 && break; sleep 0.1; done
  port_open 4222 || { log "nats: still unreachable on 127.0.0.1:4222"; exit 1; }
  log "nats: ready"
}

# The SMTP server of the email-action tests: aiosmtpd in a venv under target/ (the tests also
# make it themselves when it is missing).
ensure_aiosmtpd() {
  local venv
  venv="$(cd "$(dirname "$0")/.." && pwd)/target/aiosmtpd-venv"
  if "$venv/bin/python" -c 'import aiosmtpd' >/dev/null 2>&1; then
    log "aiosmtpd: present in $venv"; return
  fi
  if ! python3 -m venv --help >/dev/null 2>&1; then
    log "aiosmtpd: python3 venv missing; installing Debian's python3-venv"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  log "aiosmtpd: installing into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet aiosmtpd==1.4.6
  log "aiosmtpd: ready"
}

# osmem-server, an in-memory OpenSearch-compatible server, for the contract test of the search
# layer's _bulk/_search/_count calls (tests/tests/search_cluster.rs): a static binary shipped in
# a Python wheel, installed into a venv under target/. An emulator, not proof against a cluster.
ensure_osmem() {
  local venv
  venv="$(cd "$(dirname "$0")/.." && pwd)/target/osmem-venv"
  if "$venv/bin/python" -c 'import osmem_server' >/dev/null 2>&1; then
    log "osmem-server: present in $venv"; return
  fi
  if ! python3 -m venv --help >/dev/null 2>&1; then
    log "osmem-server: python3 venv missing; installing Debian's python3-venv"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  log "osmem-server: installing into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet osmem-server==0.1.6
  log "osmem-server: ready"
}

# promtool checks config/prometheus-alerts.yml in tests/tests/metrics_files.rs. It comes with
# Debian's prometheus package; the server that package ships is not started (a temporary
# policy-rc.d refuses service starts during the install when the machine has none).
ensure_promtool() {
  if command -v promtool >/dev/null 2>&1; then log "promtool: present"; return; fi
  log "promtool: not installed; installing Debian's prometheus package (server not started)"
  local policy=/usr/sbin/policy-rc.d made=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    made=1
  fi
  local rc=0
  { as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || rc=$?
  if [ "$made" = 1 ]; then as_root rm -f "$policy"; fi
  [ "$rc" = 0 ] || { log "promtool: installing Debian's prometheus package failed ($rc)"; exit 1; }
  command -v promtool >/dev/null 2>&1 || { log "promtool: still missing after the install"; exit 1; }
  log "promtool: ready"
}

ensure_postgres
ensure_redis
ensure_aiosmtpd
ensure_osmem
ensure_promtool
ensure_nats_binary
if [ "${SETUP_NATS:-0}" = 1 ]; then ensure_nats; fi
if [ "${SETUP_BENCH:-0}" = 1 ]; then ensure_wrk; fi
