//! `dedup` (cargo feature `dedup`): the same delivery — keyed on its idempotency key, a UUIDv5
//! of (event id, observer, action index), so duplicate change-log rows carrying one event id
//! share it — never runs twice within `[dedup] window_secs`, across restarts and instances
//! (Redis backend) or within this process (memory backend).
//!
//! It must never *lose* a delivery, so it claims before running and confirms after:
//!
//! * claim: `<prefix>:dedup:<key>` is set to `claim:<instance token>` with a lease (the
//!   dispatch's action timeouts plus a margin) only if absent: `SET … NX PX … GET`, one plain
//!   command that also answers what the key held (Redis 7.0 and later; an older server, which
//!   refuses `NX` with `GET`, is sent the same logic as a Lua script). A key
//!   holding `done` answers [`AttemptResult::Duplicate`]; a key claimed by another instance
//!   answers `Deferred{reason: "claimed_elsewhere"}` (asking again every second until it is
//!   `done` or its lease ends); a key claimed with our
//!   own token (a retry of ours whose release was lost) is ours.
//! * confirm: `Delivered` (and `ConditionFalse`, also final) sets the key to `done` for the
//!   window. Anything else — a retryable failure, a deferral by an inner layer, a permanent
//!   failure (it becomes a dead letter that `dlq retry` must be able to run again through this
//!   same stack) — deletes the claim if it is still ours, so the next attempt can claim again.
//! * every claim and confirmation of one dispatch, and of dispatches arriving in the same
//!   scheduler tick, go to Redis in one pipelined round trip (a small batching task).
//! * Redis unreachable: `on_unavailable = "process"` runs the actions anyway (counted in
//!   `observer_dedup_unavailable_total{action="processed"}`), `"wait"` defers them
//!   (`reason = "dedup_wait"`, counted as `waited`). Logged once per outage.
//!
//! Within one process a key is also held in a local in-flight set, so two dispatches of one key
//! (two change-log rows with one event id) never run side by side even though they share the
//! instance token.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use observer_core::action::{Attempt, AttemptResult, RedisHandle};
use observer_core::config::{DedupBackend, DedupConfig, OnUnavailable};
use observer_core::executor::{call_rest, BoxError, Dispatch, DispatchResult};
use observer_core::metrics::Metrics;
use tokio::sync::{mpsc, oneshot};
use tower::Layer;

/// Added to the action timeouts to form a claim's lease.
const LEASE_MARGIN_MS: u64 = 5_000;
/// The timeout assumed for an action that states none (sql, log).
const DEFAULT_ACTION_TIMEOUT_MS: u64 = 30_000;
/// How long a delivery waits when another dispatch of this process holds its key.
const LOCAL_BUSY_MS: u64 = 100;
/// Longest wait before asking again about a key another instance holds.
const HELD_RECHECK_MS: u64 = 1_000;
/// How long `on_unavailable = "wait"` defers before asking Redis again.
const WAIT_RETRY_MS: u64 = 1_000;
/// Pipelines sent before the oldest one has answered.
const PIPELINES_IN_FLIGHT: usize = 8;

/// Confirmations (done or release) sent and not yet answered; a dispatch waits for room beyond.
const CONFIRMS_PENDING: usize = 4_096;

/// Most operations sent in one pipeline.
const MAX_BATCH_OPS: usize = 2_048;

/// Claims the key unless it is `done` or claimed by someone else. Returns -1 claimed (or
/// re-claimed with our token), -2 done, else the remaining lease of the foreign claim in ms.
const CLAIM_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return -1
end
if v == 'done' then return -2 end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return -1
end
local t = redis.call('PTTL', KEYS[1])
if t < 0 then t = 0 end
return t
";

/// Deletes the key only while it still holds our claim.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// What the store said about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Claimed,
    Done,
    /// Claimed elsewhere for this many more ms.
    Held(u64),
}

#[derive(Debug)]
enum Op {
    Claim { key: Arc<str>, lease_ms: u64 },
    Done { key: Arc<str> },
    Release { key: Arc<str> },
}

/// What the store answered: one verdict per operation, or why it could not answer.
type Answer = Result<Vec<Verdict>, String>;

struct Request {
    ops: Vec<Op>,
    reply: Reply,
}

/// Where the batching task sends a request's answer.
enum Reply {
    /// To a dispatch waiting for it (a claim).
    Wait(oneshot::Sender<Answer>),
    /// To a continuation run when it comes (a confirmation: nothing waits for it, so it needs
    /// no task of its own).
    Then(Box<dyn FnOnce(Answer) + Send + Sync>),
}

impl Reply {
    fn send(self, answer: Answer) {
        match self {
            Reply::Wait(tx) => {
                let _ = tx.send(answer);
            }
            Reply::Then(f) => f(answer),
        }
    }
}

/// Process-wide dedup state (lives in the daemon's `LayerState`, so a reload keeps it).
pub struct DedupState {
    cfg: DedupConfig,
    /// `claim:<random uuid>`: this process's claims.
    token: Arc<str>,
    metrics: Arc<Metrics>,
    memory: Mutex<MemoryStore>,
    /// Keys some dispatch of this process is running now.
    local: Mutex<HashSet<Arc<str>>>,
    batcher: tokio::sync::OnceCell<mpsc::Sender<Request>>,
    /// Redis is failing (logged once per outage).
    down: AtomicBool,
    /// One permit per confirmation in flight: it is sent after the dispatch has returned, so it
    /// no longer holds the dispatch's in-flight slot for a Redis round trip (that round trip
    /// was a third of a dispatch's time in a drain, docs/benchmarks.md); [`DedupState::settle`]
    /// waits for them at shutdown.
    confirms: Arc<tokio::sync::Semaphore>,
}

impl DedupState {
    pub fn new(cfg: &DedupConfig, metrics: Arc<Metrics>) -> Arc<DedupState> {
        Arc::new(DedupState {
            cfg: cfg.clone(),
            token: format!("claim:{}", uuid::Uuid::new_v4()).into(),
            metrics,
            memory: Mutex::new(MemoryStore::new(cfg.memory_max_keys.max(1))),
            local: Mutex::new(HashSet::new()),
            batcher: tokio::sync::OnceCell::new(),
            down: AtomicBool::new(false),
            confirms: Arc::new(tokio::sync::Semaphore::new(CONFIRMS_PENDING)),
        })
    }

    /// Waits (at most `within`) until every confirmation sent has been answered: called at
    /// shutdown, after the last dispatch, so a `done` mark is not lost with the process. False
    /// when some were still unanswered at the deadline (their claims then end with their lease).
    pub async fn settle(&self, within: Duration) -> bool {
        let all = self.confirms.acquire_many(CONFIRMS_PENDING as u32);
        matches!(tokio::time::timeout(within, all).await, Ok(Ok(_)))
    }

    /// Runs `ops` against the chosen store; one verdict per op (`Claimed` for non-claims).
    async fn store(&self, redis: Option<&RedisHandle>, ops: Vec<Op>) -> Answer {
        let Some(redis) = redis else {
            return Ok(self.memory_ops(ops));
        };
        let (reply, rx) = oneshot::channel();
        self.batcher(redis)
            .await
            .send(Request {
                ops,
                reply: Reply::Wait(reply),
            })
            .await
            .map_err(|_| "the dedup batching task stopped".to_string())?;
        let r = rx
            .await
            .map_err(|_| "the dedup batching task dropped a request".to_string())?;
        self.note(&redis.server, &r);
        r
    }

    /// Runs `ops` against the chosen store and hands the answer to `then`, without waiting
    /// for it (beyond room in the batching task's queue).
    async fn store_then(
        self: &Arc<Self>,
        redis: Option<&RedisHandle>,
        ops: Vec<Op>,
        then: impl FnOnce(Answer) + Send + Sync + 'static,
    ) {
        let Some(redis) = redis else {
            then(Ok(self.memory_ops(ops)));
            return;
        };
        let (state, server) = (self.clone(), redis.server.clone());
        let reply = Reply::Then(Box::new(move |r: Answer| {
            state.note(&server, &r);
            then(r);
        }));
        let tx = self.batcher(redis).await;
        if let Err(mpsc::error::SendError(req)) = tx.send(Request { ops, reply }).await {
            req.reply
                .send(Err("the dedup batching task stopped".to_string()));
        }
    }

    /// The batching task's queue, starting the task on first use.
    async fn batcher(&self, redis: &RedisHandle) -> &mpsc::Sender<Request> {
        self.batcher
            .get_or_init(|| async {
                spawn_batcher(redis.clone(), self.token.clone(), self.cfg.window_secs)
            })
            .await
    }

    /// Logs the start and the end of an outage, once each.
    fn note(&self, server: &str, r: &Answer) {
        match r {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(server = %server, "dedup: Redis answers again");
                }
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    let doing = match self.cfg.on_unavailable {
                        OnUnavailable::Process => "running actions without dedup",
                        OnUnavailable::Wait => "deferring actions until it answers",
                    };
                    tracing::warn!(error = %e, "dedup: Redis unreachable; {doing} (logged once per outage)");
                }
            }
        }
    }

    fn memory_ops(&self, ops: Vec<Op>) -> Vec<Verdict> {
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let window = Duration::from_secs(self.cfg.window_secs);
        ops.into_iter()
            .map(|op| match op {
                Op::Claim { key, .. } => m.claim(key.to_string(), now),
                Op::Done { key } => {
                    m.put(key.to_string(), Entry::Done(now + window));
                    Verdict::Claimed
                }
                Op::Release { key } => {
                    m.remove(&key);
                    Verdict::Claimed
                }
            })
            .collect()
    }

    /// Takes the keys this process is not already running; `false` where another dispatch is.
    fn take_local(&self, keys: &[Arc<str>]) -> Vec<bool> {
        let mut l = self.local.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter().map(|k| l.insert(k.clone())).collect()
    }

    fn release_local(&self, keys: &[Arc<str>], taken: &[bool]) {
        let mut l = self.local.lock().unwrap_or_else(|p| p.into_inner());
        for (k, t) in keys.iter().zip(taken) {
            if *t {
                l.remove(k);
            }
        }
    }
}

/// Starts the task that batches store operations into pipelines.
fn spawn_batcher(redis: RedisHandle, token: Arc<str>, window_secs: u64) -> mpsc::Sender<Request> {
    let (tx, mut rx) = mpsc::channel::<Request>(4_096);
    let inflight = Arc::new(tokio::sync::Semaphore::new(PIPELINES_IN_FLIGHT));
    let lua = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // Let the dispatches started in this tick enqueue theirs, then take them all.
            tokio::task::yield_now().await;
            let mut reqs = vec![first];
            let mut n = reqs[0].ops.len();
            while n < MAX_BATCH_OPS {
                match rx.try_recv() {
                    Ok(r) => {
                        n += r.ops.len();
                        reqs.push(r);
                    }
                    Err(_) => break,
                }
            }
            // Several pipelines in flight on the multiplexed connection: waiting for each reply
            // before sending the next batch made this task the throughput ceiling. Safe because
            // the operations of one key are issued one after another by the dispatch that holds
            // it (claim, then done or release), never in two batches at once.
            let Ok(permit) = inflight.clone().acquire_owned().await else {
                break;
            };
            let (redis, token, lua) = (redis.clone(), token.clone(), lua.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match run_pipeline(&redis, &token, window_secs, &reqs, &lua).await {
                    Ok(mut values) => {
                        for r in reqs {
                            let rest = values.split_off(r.ops.len().min(values.len()));
                            let mine = std::mem::replace(&mut values, rest);
                            r.reply.send(Ok(mine));
                        }
                    }
                    Err(e) => {
                        for r in reqs {
                            r.reply.send(Err(e.clone()));
                        }
                    }
                }
            });
        }
    });
    tx
}

/// Runs the operations of `reqs` in one pipeline; one verdict per operation, in order. Claims
/// are `SET … NX PX … GET` until a server refuses that form, then (for this process) the Lua
/// script `lua` says so.
async fn run_pipeline(
    redis: &RedisHandle,
    token: &str,
    window_secs: u64,
    reqs: &[Request],
    lua: &AtomicBool,
) -> Result<Vec<Verdict>, String> {
    if !lua.load(Ordering::Relaxed) {
        match pipeline(redis, token, window_secs, reqs, false).await {
            Err(PipelineError::SetGetRefused(e)) => {
                tracing::info!(server = %redis.server, error = %e,
                    "dedup: this Redis refuses SET with both NX and GET (before 7.0); claiming with a Lua script");
                lua.store(true, Ordering::Relaxed);
            }
            Err(PipelineError::Other(e)) => return Err(e),
            Ok(v) => return Ok(v),
        }
    }
    pipeline(redis, token, window_secs, reqs, true)
        .await
        .map_err(|e| match e {
            PipelineError::SetGetRefused(e) | PipelineError::Other(e) => e,
        })
}

enum PipelineError {
    /// The server answered a `SET … NX … GET` with an error: it predates that form.
    SetGetRefused(String),
    Other(String),
}

async fn pipeline(
    redis: &RedisHandle,
    token: &str,
    window_secs: u64,
    reqs: &[Request],
    lua: bool,
) -> Result<Vec<Verdict>, PipelineError> {
    // EVALSHA, with the scripts (re)loaded at the head of each pipeline that uses them: Redis
    // hashes a script once per pipeline instead of once per EVAL (10 µs per EVAL call against
    // 3 for a SET, measured with INFO commandstats), and a flushed script cache or a restarted
    // Redis cannot fail the pipeline with NOSCRIPT.
    static CLAIM: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(CLAIM_LUA));
    static RELEASE: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(RELEASE_LUA));
    let other = PipelineError::Other;
    let mut pipe = redis::pipe();
    // Each command's error comes back in its place (the `SET … GET` a server before 7.0 refuses
    // is told apart from the others); without this the pipeline failed as a whole.
    pipe.ignore_errors();
    let ops = || reqs.iter().flat_map(|r| &r.ops);
    if lua && ops().any(|op| matches!(op, Op::Claim { .. })) {
        pipe.cmd("SCRIPT").arg("LOAD").arg(CLAIM_LUA).ignore();
    }
    if ops().any(|op| matches!(op, Op::Release { .. })) {
        pipe.cmd("SCRIPT").arg("LOAD").arg(RELEASE_LUA).ignore();
    }
    let mut kinds = Vec::new();
    let mut keys = Vec::new();
    for op in ops() {
        match op {
            Op::Claim { key, lease_ms } => {
                let key = dedup_key(redis, key);
                if lua {
                    pipe.cmd("EVALSHA")
                        .arg(CLAIM.get_hash())
                        .arg(1)
                        .arg(&key)
                        .arg(token)
                        .arg(*lease_ms);
                } else {
                    pipe.cmd("SET")
                        .arg(&key)
                        .arg(token)
                        .arg("NX")
                        .arg("PX")
                        .arg(*lease_ms)
                        .arg("GET");
                }
                kinds.push(Some(*lease_ms));
                keys.push(key);
            }
            Op::Done { key } => {
                pipe.cmd("SET")
                    .arg(dedup_key(redis, key))
                    .arg("done")
                    .arg("EX")
                    .arg(window_secs);
                kinds.push(None);
                keys.push(String::new());
            }
            Op::Release { key } => {
                pipe.cmd("EVALSHA")
                    .arg(RELEASE.get_hash())
                    .arg(1)
                    .arg(dedup_key(redis, key))
                    .arg(token);
                kinds.push(None);
                keys.push(String::new());
            }
        }
    }
    let values: Vec<redis::Value> = redis.query_pipeline(&pipe).await.map_err(other)?;
    if values.len() != kinds.len() {
        return Err(other(format!(
            "Redis at {} answered {} replies to {} commands",
            redis.server,
            values.len(),
            kinds.len()
        )));
    }
    // Claims a `SET … GET` found holding a claim: ours (extend its lease) or another's (ask how
    // long it has left). Both are rare: a retry whose release was lost, another instance.
    let mut follow = redis::pipe();
    let mut followed = Vec::new();
    let mut verdicts = Vec::with_capacity(values.len());
    for (i, (v, claim)) in values.into_iter().zip(&kinds).enumerate() {
        let Some(lease_ms) = claim else {
            verdicts.push(match v {
                redis::Value::ServerError(e) => {
                    return Err(other(format!("Redis at {}: {e:?}", redis.server)))
                }
                _ => Verdict::Claimed,
            });
            continue;
        };
        let verdict = match (lua, v) {
            (true, redis::Value::Int(-1)) => Verdict::Claimed,
            (true, redis::Value::Int(-2)) => Verdict::Done,
            (true, redis::Value::Int(t)) if t >= 0 => Verdict::Held(t as u64),
            (false, redis::Value::Nil) => Verdict::Claimed,
            (false, redis::Value::ServerError(e)) => {
                let text = format!("{e:?}");
                return Err(if text.to_ascii_lowercase().contains("syntax") {
                    PipelineError::SetGetRefused(text)
                } else {
                    other(format!("Redis at {}: {text}", redis.server))
                });
            }
            (false, redis::Value::BulkString(held)) if held == b"done" => Verdict::Done,
            (false, redis::Value::BulkString(held)) => {
                if held == token.as_bytes() {
                    follow.cmd("PEXPIRE").arg(&keys[i]).arg(*lease_ms);
                } else {
                    follow.cmd("PTTL").arg(&keys[i]);
                }
                followed.push((i, held == token.as_bytes()));
                Verdict::Claimed
            }
            (_, other_reply) => {
                return Err(other(format!(
                    "unexpected dedup claim reply from Redis: {other_reply:?}"
                )))
            }
        };
        verdicts.push(verdict);
    }
    if !followed.is_empty() {
        let values: Vec<redis::Value> = redis.query_pipeline(&follow).await.map_err(other)?;
        for ((i, ours), v) in followed.into_iter().zip(values) {
            verdicts[i] = match (ours, v) {
                (true, _) => Verdict::Claimed,
                (false, redis::Value::Int(t)) => Verdict::Held(t.max(0) as u64),
                (false, other_reply) => {
                    return Err(other(format!(
                        "unexpected PTTL reply from Redis: {other_reply:?}"
                    )))
                }
            };
        }
    }
    Ok(verdicts)
}

/// `<prefix>:dedup:<key>`.
fn dedup_key(redis: &RedisHandle, key: &str) -> String {
    let mut k = String::with_capacity(redis.prefix.len() + 7 + key.len());
    k.push_str(&redis.prefix);
    k.push_str(":dedup:");
    k.push_str(key);
    k
}

/// Keys a dispatch of this process holds while its confirmation is on its way: released from
/// the in-flight set (and the confirmation's permit given back) when dropped.
struct HeldKeys {
    state: Arc<DedupState>,
    keys: Vec<Arc<str>>,
    local: Vec<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for HeldKeys {
    fn drop(&mut self) {
        self.state.release_local(&self.keys, &self.local);
    }
}

/// The memory backend: claims and `done` marks with expiry, at most `max` keys (oldest first out).
struct MemoryStore {
    max: usize,
    map: HashMap<String, (Entry, u64)>,
    order: VecDeque<(String, u64)>,
    seq: u64,
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    Claimed,
    Done(Instant),
}

impl MemoryStore {
    fn new(max: usize) -> MemoryStore {
        MemoryStore {
            max,
            map: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
        }
    }

    fn claim(&mut self, key: String, now: Instant) -> Verdict {
        match self.map.get(&key).map(|(e, _)| *e) {
            Some(Entry::Done(until)) if until > now => Verdict::Done,
            // The memory store is this process only: a live claim is ours (the local in-flight
            // set already keeps two dispatches of one key apart).
            _ => {
                self.put(key, Entry::Claimed);
                Verdict::Claimed
            }
        }
    }

    fn put(&mut self, key: String, e: Entry) {
        self.seq += 1;
        self.map.insert(key.clone(), (e, self.seq));
        self.order.push_back((key, self.seq));
        while self.map.len() > self.max {
            let Some((k, s)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|(_, cur)| *cur == s) {
                self.map.remove(&k);
            }
        }
        // Superseded order entries are skipped lazily; keep the queue from growing without bound.
        if self.order.len() > self.max.saturating_mul(2).max(64) {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|(_, cur)| cur == s));
        }
    }

    fn remove(&mut self, key: &str) {
        self.map.remove(key);
    }
}

/// The `dedup` layer. `redis` is the store when the backend resolves to Redis, else memory.
#[derive(Clone)]
pub struct DedupLayer {
    state: Arc<DedupState>,
    redis: Option<RedisHandle>,
    /// `[concurrent] action_timeout_ms` when that layer is on: it bounds a whole dispatch.
    dispatch_timeout_ms: Option<u64>,
}

impl DedupLayer {
    /// `redis` is `[redis]` (if configured); `backend` decides whether it is used.
    pub fn new(
        state: Arc<DedupState>,
        redis: Option<RedisHandle>,
        dispatch_timeout_ms: Option<u64>,
    ) -> DedupLayer {
        let redis = match state.cfg.backend {
            DedupBackend::Memory => None,
            DedupBackend::Auto | DedupBackend::Redis => redis,
        };
        DedupLayer {
            state,
            redis,
            dispatch_timeout_ms,
        }
    }

    /// `redis` or `memory`, for the start-up log.
    pub fn backend(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "memory"
        }
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;
    fn layer(&self, inner: S) -> Dedup<S> {
        Dedup {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Dedup<S> {
    inner: S,
    layer: DedupLayer,
}

/// How long a claim of this dispatch is leased: its actions' timeouts (run one after another)
/// capped by the dispatch timeout, plus a margin.
fn lease_ms(dispatch: &Dispatch, cap: Option<u64>) -> u64 {
    let sum: u64 = dispatch
        .deliveries
        .iter()
        .map(|d| {
            d.observer
                .actions
                .get(d.action_index)
                .and_then(|a| a.config.get("timeout_ms"))
                .and_then(|v| v.as_u64())
                .unwrap_or(DEFAULT_ACTION_TIMEOUT_MS)
        })
        .fold(0u64, |a, b| a.saturating_add(b));
    let run = match cap {
        Some(c) => sum.min(c),
        None => sum,
    };
    run.saturating_add(LEASE_MARGIN_MS)
}

impl<S> tower::Service<Dispatch> for Dedup<S>
where
    S: tower::Service<Dispatch, Response = DispatchResult, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = DispatchResult;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<DispatchResult, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let st = &layer.state;
            let redis = layer.redis.as_ref();
            let n = dispatch.deliveries.len();
            let keys: Vec<Arc<str>> = dispatch
                .deliveries
                .iter()
                .map(|d| d.idempotency_key.clone())
                .collect();
            let lease = lease_ms(&dispatch, layer.dispatch_timeout_ms);
            let mut decided: Vec<Option<Attempt>> = vec![None; n];
            let local = st.take_local(&keys);
            for (i, d) in dispatch.deliveries.iter().enumerate() {
                if !local[i] {
                    decided[i] = Some(Attempt::answered(
                        d.attempt,
                        AttemptResult::Deferred {
                            after_ms: LOCAL_BUSY_MS,
                            reason: "claimed_elsewhere",
                        },
                        Some(
                            "another dispatch of this process is running the same delivery".into(),
                        ),
                    ));
                }
            }
            let to_claim: Vec<usize> = (0..n).filter(|i| local[*i]).collect();
            // Which deliveries hold a store claim we must confirm or release afterwards.
            let mut claimed = vec![false; n];
            if !to_claim.is_empty() {
                let ops = to_claim
                    .iter()
                    .map(|i| Op::Claim {
                        key: keys[*i].clone(),
                        lease_ms: lease,
                    })
                    .collect();
                let mut skipped = 0u64;
                match st.store(redis, ops).await {
                    Ok(verdicts) => {
                        for (i, v) in to_claim.iter().zip(verdicts) {
                            let d = &dispatch.deliveries[*i];
                            match v {
                                Verdict::Claimed => claimed[*i] = true,
                                Verdict::Done => {
                                    skipped += 1;
                                    decided[*i] = Some(Attempt::answered(
                                        d.attempt,
                                        AttemptResult::Duplicate,
                                        Some(format!(
                                            "already delivered within the dedup window ({} s)",
                                            st.cfg.window_secs
                                        )),
                                    ));
                                }
                                Verdict::Held(ms) => {
                                    decided[*i] = Some(Attempt::answered(
                                        d.attempt,
                                        AttemptResult::Deferred {
                                            // Look again within a second: the holder usually
                                            // finishes long before its lease ends.
                                            after_ms: ms.clamp(50, HELD_RECHECK_MS),
                                            reason: "claimed_elsewhere",
                                        },
                                        Some("another instance is running this delivery".into()),
                                    ));
                                }
                            }
                        }
                    }
                    Err(_) => match st.cfg.on_unavailable {
                        OnUnavailable::Process => {
                            st.metrics
                                .dedup_unavailable
                                .with_label_values(&["processed"])
                                .inc_by(to_claim.len() as u64);
                        }
                        OnUnavailable::Wait => {
                            st.metrics
                                .dedup_unavailable
                                .with_label_values(&["waited"])
                                .inc_by(to_claim.len() as u64);
                            for i in &to_claim {
                                decided[*i] = Some(Attempt::answered(
                                    dispatch.deliveries[*i].attempt,
                                    AttemptResult::Deferred {
                                        after_ms: WAIT_RETRY_MS,
                                        reason: "dedup_wait",
                                    },
                                    Some("dedup store unreachable".into()),
                                ));
                            }
                        }
                    },
                }
                st.metrics.record_dedup(skipped, to_claim.len() as u64);
            }
            let result = call_rest(inner, dispatch, decided).await;
            // Confirm or release every claim we hold, whatever happened below us.
            let ops: Vec<Op> = (0..n)
                .filter(|i| claimed[*i])
                .map(|i| {
                    let key = keys[i].clone();
                    let fin = matches!(
                        result
                            .as_ref()
                            .ok()
                            .and_then(|r| r.get(i))
                            .map(|a| &a.result),
                        Some(AttemptResult::Delivered | AttemptResult::ConditionFalse)
                    );
                    if fin {
                        Op::Done { key }
                    } else {
                        Op::Release { key }
                    }
                })
                .collect();
            if ops.is_empty() {
                st.release_local(&keys, &local);
                return result;
            }
            // Confirmed after returning: the outcome does not wait for the round trip. The keys
            // stay held in this process until Redis has answered, so another dispatch of one of
            // them here waits (`claimed_elsewhere`) and then finds it `done`. A failure is logged
            // by `store` (once per outage); the claim then ends with its lease.
            let Ok(permit) = st.confirms.clone().acquire_owned().await else {
                let _ = st.store(redis, ops).await;
                st.release_local(&keys, &local);
                return result;
            };
            // Released when Redis has answered, or if the answer never comes (the batching task
            // gone): the continuation owns the guard either way.
            let held = HeldKeys {
                state: layer.state.clone(),
                keys,
                local,
                _permit: permit,
            };
            st.store_then(redis, ops, move |_| drop(held)).await;
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_claims_confirms_and_evicts_oldest() {
        let mut m = MemoryStore::new(2);
        let now = Instant::now();
        assert_eq!(m.claim("a".into(), now), Verdict::Claimed);
        m.put("a".into(), Entry::Done(now + Duration::from_secs(60)));
        assert_eq!(m.claim("a".into(), now), Verdict::Done);
        // Past the window it runs again.
        assert_eq!(
            m.claim("a".into(), now + Duration::from_secs(61)),
            Verdict::Claimed
        );
        m.put("a".into(), Entry::Done(now + Duration::from_secs(60)));
        m.put("b".into(), Entry::Done(now + Duration::from_secs(60)));
        m.put("c".into(), Entry::Done(now + Duration::from_secs(60)));
        assert_eq!(m.map.len(), 2);
        // `a` was the oldest and is gone; `b` and `c` remain.
        assert_eq!(m.claim("a".into(), now), Verdict::Claimed);
        assert_eq!(m.claim("c".into(), now), Verdict::Done);
        for i in 0..1000 {
            m.put(format!("k{i}"), Entry::Done(now));
        }
        assert!(m.order.len() <= 128, "order queue stays bounded");
    }

    #[test]
    fn released_claim_can_be_claimed_again() {
        let mut m = MemoryStore::new(10);
        let now = Instant::now();
        assert_eq!(m.claim("k".into(), now), Verdict::Claimed);
        m.remove("k");
        assert_eq!(m.claim("k".into(), now), Verdict::Claimed);
    }

    /// Both forms of the claim (`SET … NX PX … GET`, and the Lua script for servers before 7.0)
    /// answer alike against the real Redis: a fresh key is claimed, our own claim is ours again
    /// with its lease extended, another instance's claim is held with its time left, a `done`
    /// key is a duplicate, and a released key can be claimed again.
    #[tokio::test]
    async fn both_claim_forms_answer_alike_on_a_real_redis() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        for lua in [false, true] {
            let prefix = format!("dedup-test-{}", uuid::Uuid::new_v4());
            let redis = RedisHandle::new(&url, &prefix, Duration::from_secs(5)).expect("redis url");
            let run = |token: &'static str, ops: Vec<Op>| {
                let redis = redis.clone();
                async move {
                    let (reply, _rx) = oneshot::channel();
                    let reqs = [Request {
                        ops,
                        reply: Reply::Wait(reply),
                    }];
                    pipeline(&redis, token, 60, &reqs, lua)
                        .await
                        .unwrap_or_else(|_| panic!("pipeline (lua {lua})"))
                }
            };
            let claim = |key: &'static str, lease_ms: u64| Op::Claim {
                key: key.into(),
                lease_ms,
            };
            assert_eq!(
                run("claim:a", vec![claim("k1", 1_000), claim("k2", 1_000)]).await,
                [Verdict::Claimed, Verdict::Claimed],
                "lua {lua}"
            );
            // Ours again (a retry whose release was lost): the lease is extended.
            assert_eq!(
                run("claim:a", vec![claim("k1", 60_000)]).await,
                [Verdict::Claimed]
            );
            let mut c = redis.conn().await.expect("redis");
            let ttl: i64 = redis::cmd("PTTL")
                .arg(redis.key("dedup:k1"))
                .query_async(&mut c)
                .await
                .expect("PTTL");
            assert!(ttl > 50_000, "lease extended (lua {lua}): {ttl}");
            // Another instance's claim: held, for about what it has left.
            match run("claim:b", vec![claim("k1", 1_000)]).await[..] {
                [Verdict::Held(ms)] => assert!(ms > 50_000 && ms <= 60_000, "lua {lua}: {ms}"),
                ref v => panic!("lua {lua}: {v:?}"),
            }
            // Done: a duplicate for anyone. Released: claimable again.
            run(
                "claim:a",
                vec![
                    Op::Done { key: "k1".into() },
                    Op::Release { key: "k2".into() },
                ],
            )
            .await;
            assert_eq!(
                run("claim:b", vec![claim("k1", 1_000), claim("k2", 1_000)]).await,
                [Verdict::Done, Verdict::Claimed],
                "lua {lua}"
            );
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut c)
                .await
                .expect("KEYS");
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut c)
                    .await
                    .expect("DEL");
            }
        }
    }
}
