//! `observer-bench`: the end-to-end benchmark of the `fraiseql-observers` release binary.
//!
//! Real Postgres, the real daemon process, an in-process HTTP sink. Phases:
//!
//! 1. setup: scratch database, `migrate`, an `orders` table, `capture add orders --entity Order`,
//!    the daemon started with one webhook observer pointing at the sink (checkpoints on,
//!    `[action_log] record = "all"`), warmed up until one event is delivered;
//! 2. throughput: N events inserted through the capture trigger as fast as Postgres allows;
//!    events/s = N / (last first-delivery − first insert);
//! 3. latency: one single-row INSERT per event at a fixed offered rate; commit-to-delivery
//!    latency = sink arrival − the moment the INSERT (autocommit) returned;
//! 4. idle probe: single inserts 100 ms apart (shows the NOTIFY wake-up, not polling);
//! 5. optional soak: the offered rate for S seconds, RSS sampled every 10 s.
//!
//! The daemon's RSS is sampled from /proc/<pid>/status every second throughout. The report is
//! printed as text and optionally written as JSON. This is a benchmark, not a test: it fails
//! only when the setup fails or events are lost.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "observer-bench",
    about = "End-to-end benchmark of fraiseql-observers (release binary, real Postgres)."
)]
struct Args {
    /// Events for the throughput phase.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Offered rate (events/s) of the latency and soak phases.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Duration of the fixed-rate latency phase, seconds.
    #[arg(long, default_value_t = 20)]
    latency_secs: u64,
    /// Soak phase duration in seconds (0 = no soak).
    #[arg(long, default_value_t = 0)]
    soak_secs: u64,
    /// Single inserts of the idle-latency probe (100 ms apart).
    #[arg(long, default_value_t = 50)]
    idle_probes: u64,
    /// Rows per INSERT statement in the throughput phase.
    #[arg(long, default_value_t = 1_000)]
    rows_per_stmt: u64,
    /// INSERT statements per transaction in the throughput phase.
    #[arg(long, default_value_t = 5)]
    stmts_per_tx: u64,
    /// Connections the paced (latency, idle, soak) phases insert through; each insert is its own
    /// autocommit statement, so more connections let Postgres group commits.
    #[arg(long, default_value_t = 16)]
    paced_conns: u64,
    /// Parallel inserting connections in the throughput phase.
    #[arg(long, default_value_t = 2)]
    insert_conns: u64,
    /// Admin connection URL (a scratch database is created next to it).
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The daemon binary (default: `fraiseql-observers` next to this executable).
    #[arg(long)]
    daemon_bin: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Keep the scratch database and work directory (for inspection).
    #[arg(long)]
    keep: bool,
    /// Give up on a phase when no delivery arrives for this many seconds.
    #[arg(long, default_value_t = 60)]
    stall_secs: u64,
    /// The sink waits this long before answering each request (a slow receiver).
    #[arg(long, default_value_t = 0)]
    sink_delay_ms: u64,
    /// Batch the webhook: `batch = { max_events = N, max_wait_ms = --batch-wait-ms }` (0 = one
    /// request per delivery). Batches form from deliveries in flight together, so this needs
    /// `--feature concurrent`.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    batch: u32,
    /// `max_wait_ms` of `--batch` (1..=60000, as the daemon accepts).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    batch_wait_ms: u32,
    /// Switch on a layer (`OBSERVER__FEATURES__<NAME>=true`); repeatable.
    #[arg(long = "feature")]
    features: Vec<String>,
    /// Extra environment for the daemon, `KEY=VALUE`; repeatable.
    #[arg(long = "env")]
    envs: Vec<String>,
    /// `[action_log] record` of the daemon (`all`, `failures`, `none`).
    #[arg(long, default_value = "all")]
    record: String,
    /// Pause between phases, seconds (the daemon finishes recording the previous phase's
    /// deliveries and Postgres its background work; see docs/benchmarks.md).
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// Do not run CHECKPOINT after the throughput phase (without it, the flush of that phase's
    /// dirty pages can land in the latency phase and stall every commit, the bench's own too).
    #[arg(long)]
    no_checkpoint_between: bool,
    /// Throughput phase as a backlog: the daemon is paused (SIGSTOP) while the events are
    /// inserted and resumed (SIGCONT) once they are all committed, so the drain rate (resume →
    /// last delivery) is the daemon's alone, not shared with the inserting load.
    #[arg(long)]
    backlog: bool,
    /// Skip the fixed-rate latency phase.
    #[arg(long)]
    skip_latency: bool,
    /// Skip the idle probe.
    #[arg(long)]
    skip_idle: bool,
    /// Run only the sink, on this loopback port, until killed (for scripts/bench-nats.sh): POST
    /// anywhere is a delivery (answered 204 after --sink-delay-ms); `GET /count` answers the
    /// deliveries seen so far. No database, no daemon.
    #[arg(long, value_name = "PORT")]
    serve_sink: Option<u16>,
}

/// Sends `kill -SIG pid` (STOP or CONT).
fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .with_context(|| format!("kill -{sig} {pid}"))?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid}: {status}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The sink
// ---------------------------------------------------------------------------------------------

/// One request seen by the sink: arrival time, event id (uuid as u128), order id (`data.id`).
#[derive(Clone, Copy)]
struct Rec {
    at: Instant,
    event: u128,
    order: i64,
}

#[derive(Default)]
struct SinkState {
    delay_ms: u64,
    /// Keep a `Rec` per delivery (the bench's own phases read them); off for `--serve-sink`.
    keep_recs: bool,
    recs: Mutex<Vec<Rec>>,
    /// Deliveries seen (events; a request that could not be parsed counts one).
    total: AtomicU64,
    /// HTTP requests seen.
    requests: AtomicU64,
    unparsed: AtomicU64,
}

impl SinkState {
    fn take(&self) -> Vec<Rec> {
        std::mem::take(&mut *self.recs.lock().unwrap())
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from >= hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Skips `:` and whitespace after a key.
fn skip_colon(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i] == b':' || b[i].is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// The uuid after the key at `k` (`"event_id"`), as a u128.
fn uuid_after(b: &[u8], k: usize) -> Option<u128> {
    let mut i = skip_colon(b, k + 10);
    if b.get(i) != Some(&b'"') {
        return None;
    }
    i += 1;
    let mut id: u128 = 0;
    let mut n = 0;
    while i < b.len() && b[i] != b'"' {
        let c = b[i];
        if c != b'-' {
            id = (id << 4) | (c as char).to_digit(16)? as u128;
            n += 1;
        }
        i += 1;
    }
    (n == 32).then_some(id)
}

/// The integer `id` inside the `"data"` object at `d`.
fn data_id_after(b: &[u8], d: usize) -> Option<i64> {
    let k = find(b, b"\"id\"", d + 6)?;
    let mut i = skip_colon(b, k + 4);
    let mut v: i64 = 0;
    let mut digits = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        v = v * 10 + (b[i] - b'0') as i64;
        digits += 1;
        i += 1;
    }
    (digits > 0).then_some(v)
}

/// Parses only what the bench needs from a body: `event_id` and `data.id` of its envelope, or
/// of each envelope of an array (a batched webhook). The n-th `"event_id"` key belongs with the
/// n-th `"data"` key: the bench's rows have neither key inside them. A byte scan, not a JSON
/// parse, so recording costs next to nothing. None when the body is not what the bench sends.
fn parse_envelopes(b: &[u8]) -> Option<Vec<(u128, i64)>> {
    let mut out = Vec::new();
    let (mut e, mut d) = (0, 0);
    while let (Some(ek), Some(dk)) = (find(b, b"\"event_id\"", e), find(b, b"\"data\"", d)) {
        out.push((uuid_after(b, ek)?, data_id_after(b, dk)?));
        e = ek + 10;
        d = dk + 6;
    }
    (!out.is_empty()).then_some(out)
}

async fn hook(State(s): State<Arc<SinkState>>, body: Bytes) -> StatusCode {
    let at = Instant::now();
    if s.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(s.delay_ms)).await;
    }
    // One envelope, or an array of them (a batched webhook).
    let n = match parse_envelopes(&body) {
        Some(found) if !s.keep_recs => found.len() as u64,
        Some(found) => {
            let n = found.len() as u64;
            s.recs
                .lock()
                .unwrap()
                .extend(
                    found
                        .into_iter()
                        .map(|(event, order)| Rec { at, event, order }),
                );
            n
        }
        None => {
            s.unparsed.fetch_add(1, Ordering::Relaxed);
            0
        }
    };
    s.requests.fetch_add(1, Ordering::Relaxed);
    s.total.fetch_add(n.max(1), Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

async fn count(State(s): State<Arc<SinkState>>) -> String {
    s.total.load(Ordering::Relaxed).to_string()
}

fn sink_app(state: Arc<SinkState>) -> axum::Router {
    axum::Router::new()
        .route("/count", axum::routing::get(count))
        .fallback(hook)
        .with_state(state)
}

/// `--serve-sink PORT`: the sink alone, on the calling thread's 1-worker runtime, until killed.
fn serve_sink(port: u16, delay_ms: u64) -> Result<()> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("binding the sink to 127.0.0.1:{port}"))?;
    listener.set_nonblocking(true)?;
    let state = Arc::new(SinkState {
        delay_ms,
        ..SinkState::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, sink_app(state))
            .await
            .context("serving the sink")
    })
}

/// Starts the sink on its own 1-worker runtime; returns its port.
fn start_sink(state: Arc<SinkState>) -> Result<u16> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
    std_listener.set_nonblocking(true)?;
    let port = std_listener.local_addr()?.port();
    std::thread::Builder::new()
        .name("sink".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("sink-worker")
                .enable_all()
                .build()
                .expect("sink runtime");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).expect("sink listener");
                if let Err(e) = axum::serve(listener, sink_app(state)).await {
                    eprintln!("sink failed: {e}");
                }
            });
        })?;
    Ok(port)
}

// ---------------------------------------------------------------------------------------------
// Machine, daemon process, memory sampling
// ---------------------------------------------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn machine() -> Value {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .unwrap_or_default();
    json!({ "nproc": nproc, "cpu_model": model, "kernel": kernel, "mem_total_kb": mem_total })
}

fn git_commit() -> String {
    let out = Command::new("git").args(["rev-parse", "HEAD"]).output();
    let head = out
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    match head {
        Some(h) if dirty => format!("{h} (with uncommitted changes)"),
        Some(h) => h,
        None => "unknown".into(),
    }
}

fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Per-process CPU time (user+system) in clock ticks, from /proc/<pid>/stat.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state(0) ... utime(11) stime(12).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Total CPU ticks of all Postgres backends (approximate: every process named `postgres`).
fn postgres_ticks() -> u64 {
    let mut total = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "postgres" {
                total += cpu_ticks(pid).unwrap_or(0);
            }
        }
    }
    total
}

const TICKS_PER_SEC: f64 = 100.0;

struct Sample {
    t: f64,
    phase: String,
    rss_kb: u64,
}

struct Sampler {
    samples: Mutex<Vec<Sample>>,
    phase: Mutex<String>,
}

fn spawn_sampler(pid: u32, start: Instant) -> Arc<Sampler> {
    let s = Arc::new(Sampler {
        samples: Mutex::new(Vec::new()),
        phase: Mutex::new("setup".into()),
    });
    let s2 = s.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(kb) = rss_kb(pid) else { break };
            let phase = s2.phase.lock().unwrap().clone();
            s2.samples.lock().unwrap().push(Sample {
                t: start.elapsed().as_secs_f64(),
                phase,
                rss_kb: kb,
            });
        }
    });
    s
}

impl Sampler {
    fn set_phase(&self, p: &str) {
        *self.phase.lock().unwrap() = p.into();
    }
    fn phase_stats(&self, phase: &str) -> Value {
        let s = self.samples.lock().unwrap();
        let v: Vec<u64> = s
            .iter()
            .filter(|x| x.phase == phase)
            .map(|x| x.rss_kb)
            .collect();
        if v.is_empty() {
            return Value::Null;
        }
        json!({ "start_kb": v[0], "peak_kb": v.iter().max(), "end_kb": v[v.len() - 1], "samples": v.len() })
    }
}

struct Daemon {
    child: Child,
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// SIGTERM, then wait (up to 40 s) for a clean exit.
    fn stop(&mut self) -> Result<String> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Ok(format!("already exited: {st}"));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(format!("{st}"));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok("did not exit within 40 s of SIGTERM; killed".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Postgres helpers
// ---------------------------------------------------------------------------------------------

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn redact(url: &str) -> String {
    // postgres://user:pass@host → postgres://user:***@host
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if url[s + 3..at].contains(':') => {
            let colon = s + 3 + url[s + 3..at].find(':').unwrap();
            format!("{}***{}", &url[..colon + 1], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// The admin URL with its database replaced by `db`.
fn with_db(url: &str, db: &str) -> Result<String> {
    let scheme_end = url
        .find("://")
        .ok_or_else(|| anyhow!("BENCH_DATABASE_URL must be a postgres:// URL"))?
        + 3;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let host_part_end = base[scheme_end..]
        .find('/')
        .map(|p| p + scheme_end)
        .unwrap_or(base.len());
    Ok(format!("{}/{}{}", &base[..host_part_end], db, query))
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn lat_summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = if ms.is_empty() {
        f64::NAN
    } else {
        ms.iter().sum::<f64>() / ms.len() as f64
    };
    json!({
        "count": ms.len(),
        "p50_ms": r3(pct(&ms, 50.0)),
        "p90_ms": r3(pct(&ms, 90.0)),
        "p99_ms": r3(pct(&ms, 99.0)),
        "max_ms": r3(ms.last().copied().unwrap_or(f64::NAN)),
        "min_ms": r3(ms.first().copied().unwrap_or(f64::NAN)),
        "mean_ms": r3(mean),
    })
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Waits until `expected` distinct event ids have arrived (or no delivery for `stall`).
async fn wait_delivered(sink: &SinkState, expected: u64, stall: Duration) -> bool {
    let mut last_total = sink.total.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        let total = sink.total.load(Ordering::Relaxed);
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        }
        if total >= expected {
            let distinct = {
                let recs = sink.recs.lock().unwrap();
                recs.iter().map(|r| r.event).collect::<HashSet<_>>().len() as u64
            };
            if distinct >= expected {
                return true;
            }
        }
        if last_change.elapsed() > stall {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Delivery accounting of one phase: distinct events, duplicates, first arrival per event.
struct Accounting {
    distinct: usize,
    duplicates: usize,
    first_by_event: HashMap<u128, (Instant, i64)>,
}

fn account(recs: &[Rec]) -> Accounting {
    let mut first_by_event: HashMap<u128, (Instant, i64)> = HashMap::with_capacity(recs.len());
    let mut duplicates = 0;
    for r in recs {
        match first_by_event.get_mut(&r.event) {
            Some(e) => {
                duplicates += 1;
                if r.at < e.0 {
                    e.0 = r.at;
                }
            }
            None => {
                first_by_event.insert(r.event, (r.at, r.order));
            }
        }
    }
    Accounting {
        distinct: first_by_event.len(),
        duplicates,
        first_by_event,
    }
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

struct Bench {
    args: Args,
    db_url: String,
    sink: Arc<SinkState>,
    sampler: Arc<Sampler>,
    daemon_pid: u32,
}

impl Bench {
    fn phase_start(&self, name: &str) -> (String, u64, u64) {
        self.sampler.set_phase(name);
        let la = loadavg();
        eprintln!("[bench] phase {name} (loadavg {la})");
        (
            la,
            cpu_ticks(self.daemon_pid).unwrap_or(0),
            postgres_ticks(),
        )
    }

    fn cpu_since(&self, d0: u64, p0: u64, secs: f64) -> Value {
        let d = cpu_ticks(self.daemon_pid).unwrap_or(0).saturating_sub(d0) as f64 / TICKS_PER_SEC;
        let p = postgres_ticks().saturating_sub(p0) as f64 / TICKS_PER_SEC;
        json!({
            "daemon_cpu_s": r3(d),
            "daemon_cores": r3(d / secs),
            "postgres_cpu_s": r3(p),
            "postgres_cores": r3(p / secs),
        })
    }

    async fn throughput(&self) -> Result<Value> {
        let (la, d0, p0) = self.phase_start("throughput");
        let a = &self.args;
        self.sink.take();
        self.sink.total.store(0, Ordering::Relaxed);
        let requests0 = self.sink.requests.load(Ordering::Relaxed);
        let n = a.events;
        let conns = a.insert_conns.max(1);
        let mut clients = Vec::new();
        for _ in 0..conns {
            clients.push(connect(&self.db_url).await?);
        }
        let per_tx = a.rows_per_stmt * a.stmts_per_tx;
        if a.backlog {
            signal(self.daemon_pid, "STOP")?;
        }
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (c, client) in clients.into_iter().enumerate() {
            // Connection c takes transactions c, c+conns, c+2*conns, ... of the id range 1..=n.
            let (rows, per_stmt) = (a.rows_per_stmt, per_tx);
            tasks.push(tokio::spawn(async move {
                let mut client = client;
                let stmt = client
                    .prepare("INSERT INTO orders (customer, total, status) SELECT 'bench-' || g, (g % 997)::numeric, 'new' FROM generate_series($1::bigint, $2::bigint) g")
                    .await?;
                let mut lo = 1 + c as u64 * per_stmt;
                while lo <= n {
                    let hi_tx = (lo + per_stmt - 1).min(n);
                    let tx = client.transaction().await?;
                    let mut s = lo;
                    while s <= hi_tx {
                        let e = (s + rows - 1).min(hi_tx);
                        tx.execute(&stmt, &[&(s as i64), &(e as i64)]).await?;
                        s = e + 1;
                    }
                    tx.commit().await?;
                    lo += conns * per_stmt;
                }
                Ok::<Instant, anyhow::Error>(Instant::now())
            }));
        }
        let mut insert_end = Ok(t0);
        for t in tasks {
            insert_end = match (insert_end, t.await) {
                (Ok(end), Ok(Ok(t))) => Ok(end.max(t)),
                (Err(e), _) | (_, Ok(Err(e))) => Err(e),
                (_, Err(e)) => Err(e.into()),
            };
        }
        // Resumed whatever happened: a paused daemon would not even stop on SIGTERM.
        let resumed = if a.backlog {
            let r = Instant::now();
            signal(self.daemon_pid, "CONT")?;
            Some(r)
        } else {
            None
        };
        let insert_s = (insert_end? - t0).as_secs_f64();
        eprintln!("[bench]   inserted {n} rows in {insert_s:.2} s; waiting for deliveries");
        let complete = wait_delivered(&self.sink, n, Duration::from_secs(a.stall_secs)).await;
        let wait_end = Instant::now();
        let recs = self.sink.take();
        let acc = account(&recs);
        let first = acc.first_by_event.values().map(|v| v.0).min();
        let last = acc.first_by_event.values().map(|v| v.0).max();
        let (e2e_s, delivery_s, first_s) = match (first, last) {
            (Some(f), Some(l)) => (
                (l - t0).as_secs_f64(),
                (l - f).as_secs_f64(),
                (f - t0).as_secs_f64(),
            ),
            _ => (f64::NAN, f64::NAN, f64::NAN),
        };
        // Delivery timeline per second since the first insert.
        let mut per_sec: Vec<u64> = Vec::new();
        for v in acc.first_by_event.values() {
            let s = (v.0 - t0).as_secs() as usize;
            if per_sec.len() <= s {
                per_sec.resize(s + 1, 0);
            }
            per_sec[s] += 1;
        }
        let secs = (wait_end - t0).as_secs_f64();
        let drain_s = match (resumed, last) {
            (Some(r), Some(l)) => Some((l - r).as_secs_f64()),
            _ => None,
        };
        Ok(json!({
            "loadavg_at_start": la,
            "backlog": a.backlog,
            "resume_to_last_delivery_s": drain_s.map(r3),
            "drain_events_per_s": drain_s.map(|d| (acc.distinct as f64 / d).round()),
            "events": n,
            "insert_connections": conns,
            "rows_per_statement": a.rows_per_stmt,
            "statements_per_transaction": a.stmts_per_tx,
            "insert_seconds": r3(insert_s),
            "insert_rows_per_s": (n as f64 / insert_s).round(),
            "first_delivery_after_s": r3(first_s),
            "first_insert_to_last_delivery_s": r3(e2e_s),
            "events_per_s": (acc.distinct as f64 / e2e_s).round(),
            "delivery_window_events_per_s": (acc.distinct as f64 / delivery_s).round(),
            "delivered_distinct": acc.distinct,
            "deliveries": recs.len(),
            "http_requests": self.sink.requests.load(Ordering::Relaxed) - requests0,
            "duplicates": acc.duplicates,
            "missing": n as i64 - acc.distinct as i64,
            "complete": complete,
            "deliveries_per_second_timeline": per_sec,
            "cpu": self.cpu_since(d0, p0, secs),
            "rss": self.sampler.phase_stats("throughput"),
        }))
    }

    /// Paced single-row inserts: `count` events at `rate`/s; commit-to-delivery latency.
    async fn paced(&self, phase: &str, rate: f64, count: u64) -> Result<Value> {
        /// Inserts in flight at most (64 per connection of the default 16).
        const PACED_MAX_OUTSTANDING: usize = 1024;
        let (la, d0, p0) = self.phase_start(phase);
        self.sink.take();
        self.sink.total.store(0, Ordering::Relaxed);
        // Each insert is its own task on one of a few connections, so a slow INSERT round trip
        // (a busy machine) does not lower the offered rate.
        let mut conns = Vec::new();
        for _ in 0..self.args.paced_conns.max(1) {
            let c = connect(&self.db_url).await?;
            let stmt = c.prepare("INSERT INTO orders (customer, total, status) VALUES ('paced', 1, 'new') RETURNING id").await?;
            conns.push(Arc::new((c, stmt)));
        }
        let mut commits: HashMap<i64, Instant> = HashMap::with_capacity(count as usize);
        let mut insert_ms: Vec<f64> = Vec::with_capacity(count as usize);
        let mut tasks = tokio::task::JoinSet::new();
        let interval = Duration::from_secs_f64(1.0 / rate);
        let t0 = Instant::now();
        let mut behind = 0u64;
        for i in 0..count {
            let due = t0 + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep_until(due.into()).await;
            } else if now - due > Duration::from_millis(5) {
                behind += 1;
            }
            // A machine that cannot take the offered rate: wait for an insert to finish rather
            // than queue tasks without bound (a 10-minute soak above the machine's rate grew
            // the bench to 6.6 GiB). Those inserts start late and count as behind.
            while tasks.len() >= PACED_MAX_OUTSTANDING {
                if let Some(r) = tasks.join_next().await {
                    let (id, s, done): (i64, Instant, Instant) = r??;
                    insert_ms.push((done - s).as_secs_f64() * 1e3);
                    commits.insert(id, done);
                }
            }
            let conn = conns[(i % conns.len() as u64) as usize].clone();
            tasks.spawn(async move {
                let s = Instant::now();
                let row = conn.0.query_one(&conn.1, &[]).await?;
                let done = Instant::now();
                Ok::<_, tokio_postgres::Error>((row.get::<_, i64>(0), s, done))
            });
            while let Some(r) = tasks.try_join_next() {
                let (id, s, done) = r??;
                insert_ms.push((done - s).as_secs_f64() * 1e3);
                commits.insert(id, done);
            }
        }
        while let Some(r) = tasks.join_next().await {
            let (id, s, done) = r??;
            insert_ms.push((done - s).as_secs_f64() * 1e3);
            commits.insert(id, done);
        }
        let offered_s = (Instant::now() - t0).as_secs_f64();
        let complete =
            wait_delivered(&self.sink, count, Duration::from_secs(self.args.stall_secs)).await;
        let secs = (Instant::now() - t0).as_secs_f64();
        let recs = self.sink.take();
        let acc = account(&recs);
        let mut lat = Vec::with_capacity(count as usize);
        let mut before_commit_returned = 0u64;
        let mut unmatched = 0u64;
        for (at, order) in acc.first_by_event.values() {
            match commits.get(order) {
                Some(c) => {
                    if at < c {
                        // Delivered before the client saw COMMIT return: latency ~0 (clock is one Instant).
                        before_commit_returned += 1;
                        lat.push(-((*c - *at).as_secs_f64() * 1e3));
                    } else {
                        lat.push((*at - *c).as_secs_f64() * 1e3);
                    }
                }
                None => unmatched += 1,
            }
        }
        Ok(json!({
            "loadavg_at_start": la,
            "offered_rate_per_s": rate,
            "events": count,
            "achieved_insert_rate_per_s": (count as f64 / offered_s).round(),
            "inserts_late_over_5ms": behind,
            "insert_connections": self.args.paced_conns,
            "insert_roundtrip": lat_summary(insert_ms),
            "commit_to_delivery": lat_summary(lat),
            "delivered_before_commit_returned": before_commit_returned,
            "delivered_distinct": acc.distinct,
            "duplicates": acc.duplicates,
            "missing": count as i64 - acc.distinct as i64,
            "unmatched_order_ids": unmatched,
            "complete": complete,
            "cpu": self.cpu_since(d0, p0, secs),
            "rss": self.sampler.phase_stats(phase),
        }))
    }

    async fn soak(&self) -> Result<Value> {
        let a = &self.args;
        let count = a.rate * a.soak_secs;
        let start_sample = self.sampler.samples.lock().unwrap().len();
        let mut v = self.paced("soak", a.rate as f64, count).await?;
        // RSS every 10 s of the soak (from the 1 s samples).
        let samples = self.sampler.samples.lock().unwrap();
        let soak: Vec<&Sample> = samples[start_sample..]
            .iter()
            .filter(|s| s.phase == "soak")
            .collect();
        let every10: Vec<(f64, u64)> = soak
            .iter()
            .step_by(10)
            .map(|s| (r3(s.t), s.rss_kb))
            .collect();
        let third = every10.len() / 3;
        let (flat, first_max, last_max) = if third >= 1 {
            let first_max = every10[..third].iter().map(|x| x.1).max().unwrap();
            let last_max = every10[every10.len() - third..]
                .iter()
                .map(|x| x.1)
                .max()
                .unwrap();
            // Flat: the last third's peak within 5 % (or 2 MiB) of the first third's.
            let flat = last_max <= first_max + (first_max / 20).max(2048);
            (Some(flat), first_max, last_max)
        } else {
            (None, 0, 0)
        };
        v["rss_every_10s"] = json!(every10
            .iter()
            .map(|x| json!({"t_s": x.0, "rss_kb": x.1}))
            .collect::<Vec<_>>());
        v["rss_first_third_max_kb"] = json!(first_max);
        v["rss_last_third_max_kb"] = json!(last_max);
        v["rss_flat"] = json!(flat);
        Ok(v)
    }
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn run_cmd(bin: &PathBuf, config: &PathBuf, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}{}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(port) = args.serve_sink {
        return serve_sink(port, args.sink_delay_ms);
    }
    // The bench's own client side: 1 worker is plenty for the inserting connections and keeps
    // the bench off the daemon's cores as much as possible.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(real_main(args))
}

async fn real_main(args: Args) -> Result<()> {
    let started_at = chrono::Utc::now();
    let clock = Instant::now();
    let daemon_bin = match &args.daemon_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("fraiseql-observers"),
    };
    if !daemon_bin.exists() {
        bail!("daemon binary {} not found (build it with `cargo build --release -p observer-cli`, or pass --daemon-bin)", daemon_bin.display());
    }

    let db = format!(
        "observer_bench_{}_{}",
        std::process::id(),
        started_at.format("%H%M%S")
    );
    let admin = connect(&args.database_url).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .context("creating the scratch database")?;
    let db_url = with_db(&args.database_url, &db)?;
    let workdir = std::env::temp_dir().join(&db);
    std::fs::create_dir_all(&workdir)?;

    let mut daemon: Option<Daemon> = None;
    let result = run_all(
        &args,
        &daemon_bin,
        &db_url,
        &workdir,
        &mut daemon,
        started_at,
        clock,
    )
    .await;

    // Cleanup, whatever happened.
    let mut stop_status = None;
    if let Some(d) = daemon.as_mut() {
        eprintln!("[bench] stopping the daemon (SIGTERM)");
        stop_status = Some(d.stop().unwrap_or_else(|e| format!("{e}")));
    }
    if args.keep {
        eprintln!("[bench] kept database {db} and {}", workdir.display());
    } else {
        if let Err(e) = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
        {
            eprintln!("[bench] could not drop {db}: {e}");
        }
        let _ = std::fs::remove_dir_all(&workdir);
    }

    let mut report = result?;
    report["daemon_exit_after_sigterm"] = json!(stop_status);
    print_report(&report);
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("[bench] wrote {}", p.display());
    }
    let lost = ["throughput", "latency", "idle", "soak"]
        .iter()
        .filter_map(|k| report["phases"][k]["missing"].as_i64())
        .any(|m| m > 0);
    if lost {
        bail!("some events were not delivered (see `missing` above)");
    }
    Ok(())
}

async fn run_all(
    args: &Args,
    bin: &PathBuf,
    db_url: &str,
    workdir: &std::path::Path,
    daemon_slot: &mut Option<Daemon>,
    started_at: chrono::DateTime<chrono::Utc>,
    clock: Instant,
) -> Result<Value> {
    let sink = Arc::new(SinkState {
        delay_ms: args.sink_delay_ms,
        keep_recs: true,
        ..SinkState::default()
    });
    let port = start_sink(sink.clone())?;
    let config = workdir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"# written by observer-bench
[database]
url = "{db_url}"

[listener]
id = "bench"

# The sink listens on loopback, which the outbound guard refuses unless admitted.
[outbound]
allow = ["127.0.0.1/32"]

[features]
checkpoint = true

[action_log]
record = "{record}"

[[observers]]
name = "bench-sink"
entity = "Order"
events = ["INSERT"]
{queue}

  [[observers.actions]]
  type = "webhook"
  url = "http://127.0.0.1:{port}/hook"
{batch}"#,
            record = args.record,
            // With `--feature queue` every delivery is a job: enqueued in the event path and
            // worked off by the daemon's job workers (`[queue] workers`), so the sink counts
            // events that went through the whole queue.
            queue = if args.features.iter().any(|f| f == "queue") {
                "queue = true"
            } else {
                ""
            },
            batch = if args.batch > 0 {
                format!(
                    "  batch = {{ max_events = {}, max_wait_ms = {} }}\n",
                    args.batch, args.batch_wait_ms
                )
            } else {
                String::new()
            }
        ),
    )?;
    let config_text = std::fs::read_to_string(&config)?;
    eprintln!("[bench] migrate: {}", run_cmd(bin, &config, &["migrate"])?);
    let client = connect(db_url).await?;
    client
        .batch_execute(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric(12,2) NOT NULL, \
             status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    eprintln!(
        "[bench] capture: {}",
        run_cmd(
            bin,
            &config,
            &["capture", "add", "orders", "--entity", "Order"]
        )?
    );

    let log_path = workdir.join("daemon.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(bin);
    for f in &args.features {
        cmd.env(
            format!("OBSERVER__FEATURES__{}", f.to_ascii_uppercase()),
            "true",
        );
    }
    for kv in &args.envs {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {kv}: expected KEY=VALUE"))?;
        cmd.env(k, v);
    }
    let child = cmd
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the daemon")?;
    let pid = child.id();
    *daemon_slot = Some(Daemon { child });
    let sampler = spawn_sampler(pid, clock);

    // Warm up: insert one row at a time until one is delivered (the daemon starts at the tail).
    let warm_t0 = Instant::now();
    loop {
        if let Some(d) = daemon_slot.as_mut() {
            if let Some(st) = d.child.try_wait()? {
                bail!(
                    "the daemon exited during startup ({st}); log: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
        }
        client
            .execute(
                "INSERT INTO orders (customer, total, status) VALUES ('warmup', 0, 'new')",
                &[],
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if sink.total.load(Ordering::Relaxed) > 0 {
            break;
        }
        if warm_t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "no delivery within 30 s of starting the daemon; log: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
    }
    // Let stragglers of the warm-up arrive, then start clean.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sink.take();
    let warmup_s = warm_t0.elapsed().as_secs_f64();

    let bench = Bench {
        args: args.clone(),
        db_url: db_url.to_string(),
        sink: sink.clone(),
        sampler: sampler.clone(),
        daemon_pid: pid,
    };
    let mut phases = serde_json::Map::new();
    let throughput = bench.throughput().await?;
    phases.insert("throughput".into(), throughput);
    // Let the daemon flush and settle between phases.
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    if !args.no_checkpoint_between {
        match client.batch_execute("CHECKPOINT").await {
            Ok(()) => eprintln!("[bench] CHECKPOINT after the throughput phase"),
            Err(e) => eprintln!("[bench] CHECKPOINT failed ({e}); going on without it"),
        }
    }
    if !args.skip_latency {
        let latency = bench
            .paced("latency", args.rate as f64, args.rate * args.latency_secs)
            .await?;
        phases.insert("latency".into(), latency);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if !args.skip_idle {
        let idle = bench.paced("idle", 10.0, args.idle_probes).await?;
        phases.insert("idle".into(), idle);
    }
    if args.soak_secs > 0 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let soak = bench.soak().await?;
        phases.insert("soak".into(), soak);
    }
    sampler.set_phase("end");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let rss = {
        let s = sampler.samples.lock().unwrap();
        let v: Vec<u64> = s.iter().map(|x| x.rss_kb).collect();
        json!({
            "start_kb": v.first(),
            "peak_kb": v.iter().max(),
            "end_kb": v.last(),
            "samples": v.len(),
        })
    };
    let daemon_log_warnings = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(20)
        .map(String::from)
        .collect::<Vec<_>>();
    let change_log_rows: i64 = client
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);

    Ok(json!({
        "date": started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "git_commit": git_commit(),
        "machine": machine(),
        "daemon_binary": bin.display().to_string(),
        "daemon_config": config_text,
        "features": args.features,
        "daemon_env": args.envs,
        "sink_delay_ms": args.sink_delay_ms,
        "warmup_seconds": r3(warmup_s),
        "orders_rows_total": change_log_rows,
        "sink_unparsed_requests": sink.unparsed.load(Ordering::Relaxed),
        "sink_requests": sink.requests.load(Ordering::Relaxed),
        "webhook_batch": args.batch,
        "checkpoint_between_phases": !args.no_checkpoint_between,
        "action_log_record": args.record,
        "rss": rss,
        "phases": Value::Object(phases),
        "daemon_log_warnings": daemon_log_warnings,
        "total_seconds": r3(clock.elapsed().as_secs_f64()),
    }))
}

fn kb(v: &Value) -> String {
    v.as_u64()
        .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "-".into())
}

fn print_report(r: &Value) {
    let m = &r["machine"];
    println!("fraiseql-observers end-to-end benchmark");
    println!("  date      {}", r["date"].as_str().unwrap_or("?"));
    println!("  commit    {}", r["git_commit"].as_str().unwrap_or("?"));
    println!(
        "  machine   {} x {} | kernel {} | {} kB RAM",
        m["nproc"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["mem_total_kb"].as_str().unwrap_or("?")
    );
    let features: Vec<&str> = r["features"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!(
        "  config    one webhook observer → in-process sink (204 after {} ms); checkpoint{}{}; action_log record={}; webhook batch {}",
        r["sink_delay_ms"],
        if features.is_empty() { "" } else { " + " },
        features.join(" + "),
        r["action_log_record"].as_str().unwrap_or("?"),
        match r["webhook_batch"].as_u64() {
            Some(n) if n > 0 => format!("≤ {n} events/request"),
            _ => "off".into(),
        }
    );

    let p = &r["phases"];
    let t = &p["throughput"];
    if !t.is_null() {
        println!();
        println!(
            "throughput (loadavg at start {})",
            t["loadavg_at_start"].as_str().unwrap_or("?")
        );
        println!("  events                       {}", t["events"]);
        println!(
            "  inserts alone                {} s  ({} rows/s; {} conns, {} rows/stmt, {} stmts/tx)",
            t["insert_seconds"],
            t["insert_rows_per_s"],
            t["insert_connections"],
            t["rows_per_statement"],
            t["statements_per_transaction"]
        );
        println!(
            "  first insert → last delivery {} s",
            t["first_insert_to_last_delivery_s"]
        );
        if t["backlog"].as_bool() == Some(true) {
            println!(
                "  backlog: the daemon was paused during the inserts; resume → last delivery {} s",
                t["resume_to_last_delivery_s"]
            );
            println!("  DRAIN EVENTS/S               {}", t["drain_events_per_s"]);
        } else {
            println!("  EVENTS/S (end to end)        {}", t["events_per_s"]);
        }
        println!(
            "  events/s (first→last delivery) {}",
            t["delivery_window_events_per_s"]
        );
        println!(
            "  delivered distinct / dupes / missing  {} / {} / {}  (in {} HTTP requests)",
            t["delivered_distinct"], t["duplicates"], t["missing"], t["http_requests"]
        );
        println!(
            "  CPU: daemon {} cores, postgres {} cores (avg over the phase)",
            t["cpu"]["daemon_cores"], t["cpu"]["postgres_cores"]
        );
        println!(
            "  daemon RSS: start {}, peak {}, end {}",
            kb(&t["rss"]["start_kb"]),
            kb(&t["rss"]["peak_kb"]),
            kb(&t["rss"]["end_kb"])
        );
    }
    for (key, title) in [
        ("latency", "latency at fixed rate"),
        ("idle", "idle latency probe (100 ms apart)"),
        ("soak", "soak"),
    ] {
        let l = &p[key];
        if l.is_null() {
            continue;
        }
        let c = &l["commit_to_delivery"];
        println!();
        println!(
            "{title} (loadavg at start {})",
            l["loadavg_at_start"].as_str().unwrap_or("?")
        );
        println!(
            "  offered {} /s, achieved {} /s, {} events",
            l["offered_rate_per_s"], l["achieved_insert_rate_per_s"], l["events"]
        );
        println!(
            "  commit→delivery ms: p50 {}  p90 {}  p99 {}  max {}  (n={})",
            c["p50_ms"], c["p90_ms"], c["p99_ms"], c["max_ms"], c["count"]
        );
        println!(
            "  insert round trip ms: p50 {}  p99 {}",
            l["insert_roundtrip"]["p50_ms"], l["insert_roundtrip"]["p99_ms"]
        );
        println!(
            "  delivered distinct / dupes / missing  {} / {} / {}",
            l["delivered_distinct"], l["duplicates"], l["missing"]
        );
        println!(
            "  CPU: daemon {} cores, postgres {} cores",
            l["cpu"]["daemon_cores"], l["cpu"]["postgres_cores"]
        );
        println!(
            "  daemon RSS: start {}, peak {}, end {}",
            kb(&l["rss"]["start_kb"]),
            kb(&l["rss"]["peak_kb"]),
            kb(&l["rss"]["end_kb"])
        );
        if key == "soak" {
            println!(
                "  RSS first-third max {}, last-third max {} → flat: {}",
                kb(&l["rss_first_third_max_kb"]),
                kb(&l["rss_last_third_max_kb"]),
                l["rss_flat"]
            );
        }
    }
    println!();
    println!(
        "daemon RSS over the whole run: start {}, peak {}, end {} ({} samples, 1/s)",
        kb(&r["rss"]["start_kb"]),
        kb(&r["rss"]["peak_kb"]),
        kb(&r["rss"]["end_kb"]),
        r["rss"]["samples"]
    );
    println!(
        "daemon exit after SIGTERM: {}",
        r["daemon_exit_after_sigterm"].as_str().unwrap_or("?")
    );
    if let Some(w) = r["daemon_log_warnings"].as_array() {
        if !w.is_empty() {
            println!("daemon warnings/errors ({}):", w.len());
            for l in w {
                println!("  {}", l.as_str().unwrap_or(""));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_envelope_fields() {
        let b = br#"{"before":null,"created_at":"x","data":{"customer":"c","id":42,"total":1},"entity":"Order","entity_id":"42","event_id":"0191e7a2-0000-7000-8000-00000000000a","observer":"o"}"#;
        let v = parse_envelopes(b).unwrap();
        assert_eq!(v, [(0x0191e7a2_0000_7000_8000_00000000000a, 42)]);
        // A batch: an array of envelopes, in either key order.
        let b = br#"[{"data":{"id":1},"event_id":"0191e7a2-0000-7000-8000-000000000001"},{"event_id":"0191e7a2-0000-7000-8000-000000000002","data":{"id":2}}]"#;
        let v = parse_envelopes(b).unwrap();
        assert_eq!(
            v,
            [
                (0x0191e7a2_0000_7000_8000_000000000001, 1),
                (0x0191e7a2_0000_7000_8000_000000000002, 2)
            ]
        );
        assert!(parse_envelopes(b"not json").is_none());
    }

    #[test]
    fn replaces_the_database() {
        assert_eq!(
            with_db("postgres://postgres@127.0.0.1:5432/postgres", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_db("postgres://u:p@h/db?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_db("postgres://h:5432", "x").unwrap(),
            "postgres://h:5432/x"
        );
    }
}
