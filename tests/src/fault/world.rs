//! What every fault scenario stands on: a scratch database (migrated, with a captured `orders`
//! table), the real daemon as a child process that can be killed and started again, an
//! inserting client that survives a database restart, the accounting of what the receiver got
//! against what the change log holds, and process sampling (RSS, open descriptors).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use uuid::Uuid;

use super::sink::{Delivery, Sink};

/// Where the harness finds its binary, its database server and its scratch space.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The `fraiseql-observers` binary under test.
    pub bin: PathBuf,
    /// An admin URL of the shared Postgres (CREATE/DROP DATABASE).
    pub admin_url: String,
    /// The shared Redis (only key prefixes of our own are used there).
    pub redis_url: String,
    /// Scratch directory root.
    pub work: PathBuf,
    /// Seed of every random choice (kill moments, fault rolls).
    pub seed: u64,
}

/// Prints a progress line on stderr.
pub fn say(msg: impl AsRef<str>) {
    eprintln!(
        "[fault {}] {}",
        chrono::Utc::now().format("%H:%M:%S"),
        msg.as_ref()
    );
}

/// Connects (tagging the session so connection counts can leave the harness out).
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let tagged = if url.contains('?') {
        format!("{url}&application_name=observer-fault")
    } else {
        format!("{url}?application_name=observer-fault")
    };
    let (client, conn) = tokio_postgres::connect(&tagged, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A scratch database: migrated, `orders` captured as entity `Order`. Dropped by [`Scratch::drop_db`].
pub struct Scratch {
    pub name: String,
    pub url: String,
    pub admin_url: String,
    pub dir: PathBuf,
    pub bin: PathBuf,
}

impl Scratch {
    pub async fn create(setup: &Setup, admin_url: &str, tag: &str) -> Result<Scratch> {
        let name = format!(
            "obs_fault_{tag}_{}_{}",
            std::process::id(),
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let admin = connect(admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        let url = crate::url_with_db(admin_url, &name);
        let dir = setup.work.join(&name);
        std::fs::create_dir_all(&dir)?;
        let s = Scratch {
            name,
            url,
            admin_url: admin_url.to_string(),
            dir,
            bin: setup.bin.clone(),
        };
        s.cli(&["migrate"]).await?;
        connect(&s.url)
            .await?
            .batch_execute(
                "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, \
                 total numeric(12,2) NOT NULL, status text NOT NULL)",
            )
            .await?;
        s.cli(&["capture", "add", "orders", "--entity", "Order"])
            .await?;
        Ok(s)
    }

    /// Runs the CLI against this database with a config holding only `[database]` plus `extra`.
    pub async fn cli_with(&self, extra: &str, args: &[&str]) -> Result<std::process::Output> {
        let cfg = self.dir.join(format!(
            "cli-{}.toml",
            &Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::write(
            &cfg,
            format!("[database]\nurl = \"{}\"\n{extra}\n", self.url),
        )?;
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new(&self.bin)
                .arg("--config")
                .arg(&cfg)
                .args(args)
                .env("RUST_LOG", "warn")
                .env_remove("DATABASE_URL")
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .map_err(|_| anyhow!("`{}` took over 120 s", args.join(" ")))??;
        Ok(out)
    }

    /// Runs the CLI; an error (with its output) when it exits non-zero.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self.cli_with("", args).await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("`fraiseql-observers {}` failed: {text}", args.join(" "));
        }
        Ok(text)
    }

    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        connect(&self.url).await
    }

    /// Every `Order` event id in the change log.
    pub async fn order_events(&self) -> Result<Vec<Uuid>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT id FROM tb_entity_change_log WHERE object_type = 'Order'",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, Uuid>(0)).collect())
    }

    /// Event ids the checkpoint of `listener` does not cover (all when it has no row).
    pub async fn uncovered(&self, listener: &str) -> Result<Vec<Uuid>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT r.id FROM tb_entity_change_log r
                 WHERE NOT EXISTS (
                     SELECT 1 FROM observer_checkpoints c
                     WHERE c.listener_id = $1
                       AND (pg_visible_in_snapshot(r.txid, c.window_lo)
                            OR (pg_visible_in_snapshot(r.txid, c.window_hi)
                                AND r.pk_entity_change_log <= c.after_pk)))",
                &[&listener],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, Uuid>(0)).collect())
    }

    /// Pending dead letters.
    pub async fn pending_dead_letters(&self) -> Result<i64> {
        let c = self.client().await?;
        Ok(c.query_one(
            "SELECT count(*) FROM observer_dead_letters WHERE status = 'pending'",
            &[],
        )
        .await?
        .get(0))
    }

    /// Server connections to this database other than the harness's own.
    pub async fn daemon_connections(&self) -> Result<i64> {
        let c = self.client().await?;
        Ok(c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name <> 'observer-fault'",
            &[],
        )
        .await?
        .get(0))
    }

    pub async fn drop_db(&self) {
        match connect(&self.admin_url).await {
            Ok(admin) => {
                if let Err(e) = admin
                    .batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        self.name
                    ))
                    .await
                {
                    say(format!("could not drop {}: {e}", self.name));
                }
            }
            Err(e) => say(format!("could not drop {}: {e:#}", self.name)),
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon process
// ---------------------------------------------------------------------------------------------

/// `fraiseql-observers run` as a child process; every start gets its own log file.
pub struct DaemonProc {
    bin: PathBuf,
    pub config_path: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub starts: u32,
    pub logs: Vec<PathBuf>,
}

impl DaemonProc {
    pub fn new(bin: &Path, dir: &Path, config: &str, env: &[(&str, &str)]) -> Result<DaemonProc> {
        let config_path = dir.join("daemon.toml");
        std::fs::write(&config_path, config)?;
        Ok(DaemonProc {
            bin: bin.to_path_buf(),
            config_path,
            dir: dir.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            starts: 0,
            logs: Vec::new(),
        })
    }

    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("daemon already running");
        }
        self.starts += 1;
        let log = self.dir.join(format!("daemon-{}.log", self.starts));
        let mut c = Command::new(&self.bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("OBSERVER__") || k == "DATABASE_URL" || k == "REDIS_URL" {
                c.env_remove(k);
            }
        }
        c.arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .env("RUST_LOG", "info,tokio_postgres=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        self.child = Some(c.spawn().context("starting the daemon")?);
        self.logs.push(log);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` when the running child has exited (it is then forgotten).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten();
        if st.is_some() {
            self.child = None;
        }
        st
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`, `TERM`) to the running child, without waiting.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().context("the daemon is not running")?;
        let st = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()?;
        if !st.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to `timeout`; SIGKILL after that. Returns how it ended.
    pub async fn stop(&mut self, timeout: Duration) -> String {
        let Some(mut c) = self.child.take() else {
            return "not running".into();
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return format!("{st}");
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return format!("no exit within {timeout:?} of SIGTERM; killed");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log of the current (or last) start.
    pub fn log(&self) -> String {
        self.logs
            .last()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// All logs of all starts, concatenated.
    pub fn all_logs(&self) -> String {
        self.logs
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the current log contains one of `needles`.
    pub async fn wait_log(&mut self, needles: &[&str], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if needles.iter().any(|n| log.contains(n)) {
                return Ok(());
            }
            if let Some(st) = self.exited() {
                bail!("the daemon exited ({st}) before logging {needles:?}; log:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("no {needles:?} in the daemon log within {timeout:?}; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Log lines at WARN or ERROR of every start (at most `max`).
    pub fn warnings(&self, max: usize) -> Vec<String> {
        self.all_logs()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(max)
            .map(String::from)
            .collect()
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Resident set of a process, kB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:")
}

/// The largest resident set the process has had (`VmHWM`), kB.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:")
}

/// Of the resident set, anonymous memory (the heap, stacks), kB.
pub fn rss_anon_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "RssAnon:")
}

/// Of the resident set, file-backed pages (the executable's code and read-only data, shared
/// libraries), kB. Bounded by the size of those mappings; it grows as code runs for the first
/// time (the kernel maps up to 64 KiB around each fault).
pub fn rss_file_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "RssFile:")
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Of a process's open descriptors, the TCP sockets connected to `port` on this host (its
/// HTTP connections to a sink; bounded by the client's pool, not a leak when they grow).
pub fn sockets_to_port(pid: u32, port: u16) -> Option<u64> {
    let mut inodes = std::collections::HashSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(n.to_string());
            }
        }
    }
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(rem), Some(inode)) = (cols.get(2), cols.get(9)) else {
                continue;
            };
            let rem_port = rem
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if rem_port == Some(port) && inodes.contains(*inode) {
                n += 1;
            }
        }
    }
    Some(n)
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// A free loopback TCP port.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One value of the daemon's `/metrics` (the sum over its label sets), `None` when unreachable.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let base = series.split('{').next().unwrap_or(series);
        if base == name {
            let v: f64 = value.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Inserting
// ---------------------------------------------------------------------------------------------

/// A background client inserting orders through the capture trigger; it reconnects when the
/// database goes away (a failed transaction is simply not an event).
pub struct Inserter {
    pub committed: Arc<AtomicU64>,
    pub failed_tx: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Inserter {
    /// Inserts `total` rows, `per_tx` per transaction; `rate` rows/s when `Some`, else flat out.
    pub fn spawn(url: &str, total: u64, per_tx: u64, rate: Option<f64>) -> Inserter {
        let committed = Arc::new(AtomicU64::new(0));
        let failed_tx = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, f2, s2, url) = (
            committed.clone(),
            failed_tx.clone(),
            stop.clone(),
            url.to_string(),
        );
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            let mut client: Option<tokio_postgres::Client> = None;
            while c2.load(Ordering::Relaxed) < total && !s2.load(Ordering::Relaxed) {
                let done = c2.load(Ordering::Relaxed);
                if let Some(r) = rate {
                    let due = t0 + Duration::from_secs_f64(done as f64 / r);
                    tokio::time::sleep_until(due.into()).await;
                }
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    match connect(&url).await {
                        Ok(c) => client = Some(c),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    }
                }
                let Some(c) = client.as_ref() else { continue };
                let n = per_tx.min(total - done) as i64;
                let r = tokio::time::timeout(
                    Duration::from_secs(30),
                    c.execute(
                        "INSERT INTO orders (customer, total, status) \
                         SELECT 'fault-' || g, (g % 97)::numeric, 'new' FROM generate_series(1, $1::bigint) g",
                        &[&n],
                    ),
                )
                .await;
                match r {
                    Ok(Ok(_)) => {
                        c2.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    _ => {
                        f2.fetch_add(1, Ordering::Relaxed);
                        client = None;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Inserter {
            committed,
            failed_tx,
            stop,
            task,
        }
    }

    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until every row is inserted (or `timeout`).
    pub async fn finish(self, timeout: Duration) -> Result<u64> {
        let committed = self.committed.clone();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            self.stop.store(true, Ordering::Relaxed);
            bail!(
                "inserting did not finish within {timeout:?} ({} rows committed)",
                committed.load(Ordering::Relaxed)
            );
        }
        Ok(committed.load(Ordering::Relaxed))
    }
}

// ---------------------------------------------------------------------------------------------
// Accounting
// ---------------------------------------------------------------------------------------------

/// Loss and duplicates of one run: what the change log holds against what the receiver accepted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Accounting {
    pub expected: usize,
    pub delivered_distinct: usize,
    pub lost: usize,
    pub lost_sample: Vec<String>,
    /// Accepted deliveries beyond the first of each key.
    pub duplicates: usize,
    pub duplicate_keys: usize,
    /// Every delivery carried the key derived from its event, with `webhook-id` equal to it.
    pub keys_consistent: bool,
    pub key_mismatches: usize,
    /// Accepted deliveries whose key belongs to no event of the change log.
    pub unknown_keys: usize,
}

/// Compares the accepted deliveries with the events (one webhook action at index 0 of
/// `observer` per event).
pub fn account(events: &[Uuid], observer: &str, deliveries: &[Delivery]) -> Accounting {
    let expected: HashMap<u128, u128> = events
        .iter()
        .map(|e| {
            let key = Uuid::parse_str(&observer_core::executor::idempotency_key(*e, observer, 0))
                .map(|u| u.as_u128())
                .unwrap_or(0);
            (key, e.as_u128())
        })
        .collect();
    let mut seen: HashMap<u128, u32> = HashMap::with_capacity(deliveries.len());
    let mut key_mismatches = 0;
    let mut unknown_keys = 0;
    for d in deliveries {
        *seen.entry(d.key).or_default() += 1;
        match expected.get(&d.key) {
            Some(ev) if *ev == d.event && d.webhook_id_matches => {}
            Some(_) => key_mismatches += 1,
            None => unknown_keys += 1,
        }
    }
    let lost: Vec<u128> = expected
        .iter()
        .filter(|(k, _)| !seen.contains_key(k))
        .map(|(_, e)| *e)
        .collect();
    let duplicates = seen.values().map(|n| (*n as usize).saturating_sub(1)).sum();
    let duplicate_keys = seen.values().filter(|n| **n > 1).count();
    Accounting {
        expected: expected.len(),
        delivered_distinct: seen.keys().filter(|k| expected.contains_key(k)).count(),
        lost: lost.len(),
        lost_sample: lost
            .iter()
            .take(5)
            .map(|e| Uuid::from_u128(*e).to_string())
            .collect(),
        duplicates,
        duplicate_keys,
        keys_consistent: key_mismatches == 0 && unknown_keys == 0,
        key_mismatches,
        unknown_keys,
    }
}

/// Keys delivered more than once, with the arrival times of each delivery.
pub fn duplicate_arrivals(deliveries: &[Delivery]) -> HashMap<u128, Vec<Instant>> {
    let mut by_key: HashMap<u128, Vec<Instant>> = HashMap::new();
    for d in deliveries {
        by_key.entry(d.key).or_default().push(d.at);
    }
    by_key.retain(|_, v| v.len() > 1);
    by_key
}

/// Waits until the receiver has accepted a delivery for every key of `events` (or no new
/// delivery for `stall`). Returns the seconds it took, `None` when it stalled.
pub async fn wait_all_delivered(
    sink: &Sink,
    events: &[Uuid],
    observer: &str,
    stall: Duration,
) -> Option<f64> {
    let t0 = Instant::now();
    let want: HashSet<u128> = events
        .iter()
        .filter_map(|e| {
            Uuid::parse_str(&observer_core::executor::idempotency_key(*e, observer, 0))
                .ok()
                .map(|u| u.as_u128())
        })
        .collect();
    let mut last_n = usize::MAX;
    let mut last_change = Instant::now();
    let mut checked = 0usize;
    let mut got: HashSet<u128> = HashSet::with_capacity(want.len());
    loop {
        let d = sink.deliveries();
        for x in &d[checked.min(d.len())..] {
            if want.contains(&x.key) {
                got.insert(x.key);
            }
        }
        checked = d.len();
        if got.len() == want.len() {
            return Some(t0.elapsed().as_secs_f64());
        }
        if d.len() != last_n {
            last_n = d.len();
            last_change = Instant::now();
        }
        if last_change.elapsed() > stall {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rounds to milliseconds for reports.
pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The outcome of one scenario: its figures, and the promises it checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub scenario: String,
    pub passed: bool,
    pub failures: Vec<String>,
    pub seconds: f64,
    pub loadavg_at_start: String,
    pub figures: Value,
}

impl Report {
    pub fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.into(),
            passed: true,
            failures: Vec::new(),
            seconds: 0.0,
            loadavg_at_start: loadavg(),
            figures: json!({}),
        }
    }

    /// Records a promise; a broken one fails the scenario.
    pub fn check(&mut self, ok: bool, promise: impl Into<String>) {
        if !ok {
            self.passed = false;
            self.failures.push(promise.into());
        }
    }

    pub fn set(&mut self, key: &str, v: impl serde::Serialize) {
        self.figures[key] = serde_json::to_value(v).unwrap_or(Value::Null);
    }
}
