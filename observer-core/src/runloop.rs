//! The daemon's hot path: read → match → execute → record → checkpoint.
//!
//! * A reader task walks the change log in snapshot windows (see `change_log.rs`), woken by
//!   LISTEN/NOTIFY with a polling fallback, and hands batches over a bounded channel, so the next
//!   batch is read while the current one is delivered.
//! * The loop matches each event, then dispatches its deliveries through the executor stack,
//!   starting a new dispatch whenever the stack says it is ready (`poll_ready`), so the stack's
//!   concurrency limit is the only throttle.
//! * A failed attempt is put on a timer (`DelayQueue`), not slept on; only later events of the
//!   same (entity, entity id) wait behind it, so per-entity order holds and nothing else does.
//! * A delivery that exhausts its attempts, or fails permanently, becomes a dead letter. An event
//!   is complete when all its deliveries are delivered or dead-lettered; the checkpoint is the
//!   contiguous completion watermark and is written in the same transaction as the outcomes.
//! * Any database failure ends this run with an error; the supervisor (`supervise`) starts a
//!   fresh run from the durable checkpoint after a backoff, so nothing is lost and replays carry
//!   the same idempotency keys.
//!
//! Shutdown order: stop reading, stop starting dispatches, wait for in-flight ones (bounded by
//! `shutdown_timeout_ms`), hand back what is still retrying (it stays after the checkpoint and is
//! delivered on the next start), flush, exit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use foldhash::HashMap;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tower::{Service, ServiceExt};

use crate::action::{Attempt, AttemptResult};
use crate::audit::NewAudit;
use crate::change_log::{ChangeLog, ChangeRow, Position, ReadLimits, Snapshot};
use crate::config::{Backoff, Config, RetryConfig, StartFrom};
use crate::event::ChangeEvent;
use crate::executor::{
    idempotency_key_arc, BoxError, BoxExecutor, Delivery, Dispatch, DispatchResult,
};
use crate::leadership::{Leadership, Session, Term};
use crate::observer::Observers;
use crate::schema::Objects;
use crate::store::{CheckpointStore, NewActionLog, NewDeadLetter, Progress, Recorder, StoreError};

/// Why a run ended early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {}", crate::pg_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("the LISTEN connection (which holds the listener lock) was lost")]
    ListenLost,
    /// Another instance leads the listener now (or this one could no longer prove it does).
    #[error("lost the leadership of the listener: {0}")]
    LeaseLost(String),
    #[error(transparent)]
    Leadership(crate::leadership::LeadershipError),
    #[error("change-log reader stopped: {0}")]
    Reader(String),
    /// A task of the run (writer, dispatch, executor) failed in a way that ends the run.
    #[error("{0}")]
    Task(String),
}

impl From<crate::leadership::LeadershipError> for RunError {
    fn from(e: crate::leadership::LeadershipError) -> RunError {
        use crate::leadership::LeadershipError as L;
        match e {
            // Missing tables or grants stop the daemon, whichever part found them.
            L::Store(s) => RunError::Store(s),
            L::Db(d) => RunError::Db(d),
            L::SessionLost => RunError::ListenLost,
            other => RunError::Leadership(other),
        }
    }
}

impl RunError {
    /// True when the run ended because another instance took the listener over.
    fn is_lost_leadership(&self) -> bool {
        matches!(
            self,
            RunError::LeaseLost(_)
                | RunError::Store(StoreError::LeaseLost { .. } | StoreError::Fenced { .. })
        )
    }

    /// True when the database could not be reached at all (as opposed to failing mid-run).
    fn is_unreachable(&self) -> bool {
        match self {
            RunError::Db(e) => crate::error_chain(e).contains("error connecting"),
            RunError::Store(StoreError::Pool(_)) => true,
            _ => false,
        }
    }
}

/// Everything a run needs; built by the daemon.
pub struct RunContext {
    /// `host:port/dbname`, for messages.
    pub database: String,
    pub config: Arc<Config>,
    /// The observers; a reload (SIGHUP) sends new ones, taken for events read after it.
    pub observers: tokio::sync::watch::Receiver<Arc<Observers>>,
    pub objects: Arc<Objects>,
    pub pg_config: tokio_postgres::Config,
    /// The connector for every connection (TLS only when `sslmode=require`).
    pub tls: crate::tls::PgTls,
    pub checkpoint: Option<Arc<dyn CheckpointStore>>,
    /// How this process becomes the one active instance of the listener.
    pub leadership: Arc<dyn Leadership>,
    /// Identifies this process in the checkpoint row (`host:pid`).
    pub owner: String,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Runs until `shutdown`, restarting a failed run from the checkpoint with capped backoff.
pub async fn supervise(
    ctx: &RunContext,
    make_executor: &(dyn Fn() -> BoxExecutor + Send + Sync),
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut delay = FIRST_RESTART_DELAY;
    // Where the last run got to. With checkpoints on the store is the truth; with them off this
    // is what keeps a restart after a database error from jumping to the tail and losing events.
    let mut resume: Option<Position> = None;
    loop {
        let started = Instant::now();
        let processed_before = ctx.metrics.events_processed.get();
        match run(ctx, make_executor, shutdown.clone(), &mut resume).await {
            Ok(()) => return Ok(()),
            Err(RunError::Store(e @ (StoreError::NotMigrated(_) | StoreError::Privileges(_)))) => {
                return Err(e.into())
            }
            Err(e) if e.is_lost_leadership() && !shutdown.is_cancelled() => {
                // Not a failure to back off from: another instance leads now, and this one
                // goes straight back to standing by.
                tracing::warn!(listener = %ctx.config.listener.id, error = %e,
                    "this instance no longer leads the listener; going back to standby");
                delay = FIRST_RESTART_DELAY;
            }
            Err(e) => {
                if shutdown.is_cancelled() {
                    return Err(e);
                }
                let progressed = ctx.metrics.events_processed.get() > processed_before;
                delay = restart_delay(delay, progressed, started.elapsed());
                if e.is_unreachable() {
                    tracing::warn!(database = %ctx.database, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "cannot connect to the database at {}; waiting and retrying", ctx.database);
                } else {
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "run failed; restarting from the checkpoint");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = next_restart_delay(delay);
            }
        }
    }
}

/// The first wait after a failure, and where the backoff starts over.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(500);

/// The longest wait between restarts. A connection attempt costs the server next to nothing,
/// and the wait is time the daemon stays behind after the database is back: with a 30 s cap
/// the `pg-restart` fault scenario took 11.4 s from "database up" to the next delivery after a
/// 20 s outage (the backoff had reached 16 s). Kafka clients cap reconnects at 1 s by default.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(4);

/// The backoff's next step: double, up to [`MAX_RESTART_DELAY`].
fn next_restart_delay(delay: Duration) -> Duration {
    (delay * 2).min(MAX_RESTART_DELAY)
}

/// The wait before restarting a run that failed, given the wait of the previous restart.
///
/// The backoff exists so a run that keeps failing (the database unreachable, the same error at
/// the same place) does not spin. A run that completed work, or lasted over a minute, was not
/// such a loop: the next restart starts over at the first delay. (Before this, only the minute
/// counted, so a daemon that had waited for the database at start and then delivered for a few
/// seconds waited up to 8 s — up to the cap after more failures — to reconnect after the next
/// database restart; found by the `pg-restart` fault scenario.)
fn restart_delay(previous: Duration, progressed: bool, ran_for: Duration) -> Duration {
    if progressed || ran_for > Duration::from_secs(60) {
        FIRST_RESTART_DELAY
    } else {
        previous
    }
}

/// One item for the loop: read from the change log (with the position that completing it
/// reaches), or taken from a message stream (with what to do once its outcomes are durable).
pub enum Item {
    Row(ChangeRow, Position),
    /// A window was drained: completing everything before it reaches `Position::at(hi)`.
    WindowEnd(Position),
    /// An event from a message stream (`run --role worker`): matched and executed like a row;
    /// `Settle` is called once its outcomes (action log, dead letters) are durable.
    Message(ChangeEvent, Box<dyn Settle>),
    /// A message that is not run but dead-lettered at once (it cannot be decoded, or it was
    /// delivered more often than allowed), then settled like a completed one.
    Refused {
        event_id: Option<uuid::Uuid>,
        pk: i64,
        raw: serde_json::Value,
        reason: &'static str,
        error: String,
        settle: Box<dyn Settle>,
    },
}

/// What a message source does with a message once the loop is done with it.
pub trait Settle: Send {
    /// Called once the message's outcomes are durable: acknowledge it. A `Settle` dropped
    /// without this call (the run ended first) is not done: its message must be delivered again.
    fn done(self: Box<Self>);
}

/// The LISTEN connection: holds the listener lock and wakes the reader on NOTIFY.
struct ListenConnection {
    client: tokio_postgres::Client,
    lost: CancellationToken,
    _task: tokio::task::JoinHandle<()>,
}

async fn listen_connection(
    ctx: &RunContext,
    wake: Arc<Notify>,
) -> Result<ListenConnection, RunError> {
    let (client, mut connection) = ctx.pg_config.connect(ctx.tls.clone()).await?;
    let lost = CancellationToken::new();
    let lost2 = lost.clone();
    let task = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => wake.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed");
                    break;
                }
            }
        }
        lost2.cancel();
    });
    Ok(ListenConnection {
        client,
        lost,
        _task: task,
    })
}

/// A delivery and the attempts made so far.
struct DeliveryState {
    delivery: Delivery,
    attempts: Vec<Attempt>,
}

/// One observer's part of an event: the unit that per-entity ordering schedules.
struct Unit {
    /// `(observer, entity, entity id)` for `ordering = "entity"` observers, else `None`.
    key: Option<UnitKey>,
    remaining: usize,
}

type UnitKey = (Arc<str>, String, Option<String>);

/// An event being worked on.
struct EventState {
    event: Arc<ChangeEvent>,
    units: Vec<Unit>,
    remaining: usize,
    /// With the audit trail on: the observers matched and each finished action, kept until the
    /// event completes.
    audit: Option<(Vec<String>, Vec<NewActionLog>)>,
}

/// Deliveries of one unit that are due now.
struct Work {
    seq: u64,
    unit: usize,
    states: Vec<DeliveryState>,
}

/// The loop's scheduling state: events in progress, per-key queues, work due now.
#[derive(Default)]
struct Sched {
    events: HashMap<u64, EventState>,
    /// Keys with a unit in progress → units of that key waiting their turn.
    busy: HashMap<UnitKey, VecDeque<(u64, usize)>>,
    waiting: HashMap<(u64, usize), Vec<DeliveryState>>,
    ready: VecDeque<Work>,
}

impl Sched {
    /// Queues a unit: due now unless an earlier unit of its key is still in progress.
    fn admit(&mut self, seq: u64, unit: usize, key: Option<UnitKey>, states: Vec<DeliveryState>) {
        if let Some(key) = key {
            match self.busy.get_mut(&key) {
                Some(queue) => {
                    queue.push_back((seq, unit));
                    self.waiting.insert((seq, unit), states);
                    return;
                }
                None => {
                    self.busy.insert(key, VecDeque::new());
                }
            }
        }
        self.ready.push_back(Work { seq, unit, states });
    }

    /// A unit is done: the next unit of its key becomes due. True when its event is complete.
    fn unit_done(&mut self, seq: u64, unit: usize) -> bool {
        let Some(ev) = self.events.get_mut(&seq) else {
            return false;
        };
        if let Some(key) = ev.units.get(unit).and_then(|u| u.key.clone()) {
            let next = self.busy.get_mut(&key).and_then(|q| q.pop_front());
            match next.and_then(|n| self.waiting.remove(&n).map(|s| (n, s))) {
                Some(((n, u), states)) => self.ready.push_back(Work {
                    seq: n,
                    unit: u,
                    states,
                }),
                None => {
                    self.busy.remove(&key);
                }
            }
        }
        ev.remaining == 0
    }
}

/// The completion watermark: items in read order; the front ones that are done advance it.
type EventMark = (uuid::Uuid, i64, chrono::DateTime<Utc>);

#[derive(Default)]
struct Tracker {
    /// (sequence, position reached when done — None for messages, done, the event it is — None
    /// for markers).
    slots: VecDeque<(u64, Option<Position>, bool, Option<EventMark>)>,
    /// Messages in progress: settled (in any order, not only at the watermark) once done and
    /// recorded.
    settles: HashMap<u64, Box<dyn Settle>>,
    /// Done messages waiting for their outcomes to be written.
    settled: Vec<Box<dyn Settle>>,
    next_seq: u64,
    watermark: Option<Position>,
    completed_events: i64,
    last_event: Option<EventMark>,
}

impl Tracker {
    fn push(
        &mut self,
        pos: Option<Position>,
        event: Option<EventMark>,
        settle: Option<Box<dyn Settle>>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots.push_back((seq, pos, false, event));
        if let Some(s) = settle {
            self.settles.insert(seq, s);
        }
        seq
    }

    fn complete(&mut self, seq: u64) {
        if let Some(s) = self.settles.remove(&seq) {
            self.settled.push(s);
        }
        if let Some(front) = self.slots.front().map(|s| s.0) {
            if let Some(slot) = seq
                .checked_sub(front)
                .and_then(|i| self.slots.get_mut(i as usize))
            {
                slot.2 = true;
            }
        }
        while matches!(self.slots.front(), Some(s) if s.2) {
            if let Some((_, pos, _, ev)) = self.slots.pop_front() {
                if pos.is_some() {
                    self.watermark = pos;
                }
                if ev.is_some() {
                    self.completed_events += 1;
                    self.last_event = ev;
                }
            }
        }
    }

    fn pending(&self) -> usize {
        self.slots.len()
    }
}

/// One run: from the checkpoint (or `resume`, when there is no checkpoint store) until shutdown
/// or the first infrastructure failure. On return, `resume` holds the completion watermark.
pub async fn run(
    ctx: &RunContext,
    make_executor: &(dyn Fn() -> BoxExecutor + Send + Sync),
    shutdown: CancellationToken,
    resume: &mut Option<Position>,
) -> Result<(), RunError> {
    let cfg = &ctx.config;
    let metrics = ctx.metrics.clone();
    let listener = cfg.listener.id.as_str();
    let wake = Arc::new(Notify::new());
    let listen = listen_connection(ctx, wake.clone()).await?;
    let session = Session {
        client: &listen.client,
        lost: &listen.lost,
    };
    let term: Arc<dyn Term> = match ctx.leadership.acquire(session, &shutdown).await? {
        Some(term) => Arc::from(term),
        None => return Ok(()),
    };
    // Until the run ends, whichever way: 1 while this process leads.
    metrics.leader.set(1);
    let _not_leader = LeaderGauge(metrics.clone());
    listen
        .client
        .batch_execute(&format!(
            "LISTEN {}",
            crate::schema::quote_ident(&ctx.objects.channel)
        ))
        .await?;

    let book = ctx
        .pg_config
        .connect(ctx.tls.clone())
        .await
        .map(|(client, conn)| {
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::warn!(error = %e, "bookkeeping connection failed");
                }
            });
            client
        })?;

    let needs = crate::preflight::needs(&ctx.objects, cfg);
    for warning in crate::preflight::check(&book, &ctx.objects, &needs).await? {
        tracing::warn!("{warning}");
    }
    let saved = match &ctx.checkpoint {
        Some(store) => store.load(&book, listener).await?,
        None => resume.clone(),
    };
    let start = match saved {
        Some(p) => {
            tracing::info!(listener, position = %describe(&p), "resuming");
            p
        }
        None => {
            let snap = ChangeLog::current_snapshot(&book).await?;
            let p = match cfg.listener.start_from {
                StartFrom::Tail => Position::at(snap),
                StartFrom::Beginning => Position {
                    lo: Snapshot {
                        xmin: 1,
                        xmax: 1,
                        xip: vec![],
                    },
                    hi: snap,
                    after_pk: 0,
                },
            };
            tracing::info!(listener, start_from = ?cfg.listener.start_from, "no checkpoint; starting");
            p
        }
    };
    let epoch = match &ctx.checkpoint {
        Some(store) => Some(store.claim(&book, listener, &ctx.owner, &start).await?),
        None => None,
    };

    // Reader: prefetches at most two batches ahead.
    let (tx, mut rx) = mpsc::channel::<Result<Vec<Item>, String>>(2);
    let reader_stop = CancellationToken::new();
    let (reader_client, reader_conn) = ctx.pg_config.connect(ctx.tls.clone()).await?;
    let reader_conn = tokio::spawn(async move {
        if let Err(e) = reader_conn.await {
            tracing::warn!(error = %e, "reader connection failed");
        }
    });
    let _stop_reader_conn = AbortOnDrop(reader_conn);
    let window_reader = ChangeLog::new(ctx.objects.change_log.clone())
        .with_limits(ReadLimits::from_config(&cfg.listener))
        .reader(reader_client, ctx.objects.wake_locks())
        .await?;
    let reader = tokio::spawn(read_loop(
        window_reader,
        start.clone(),
        cfg.listener.batch_size,
        Duration::from_millis(cfg.listener.poll_interval_ms),
        wake,
        tx,
        reader_stop.clone(),
    ));
    let _stop_reader = reader_stop.clone().drop_guard();

    let (result, reached) = drive(Drive {
        cfg,
        objects: &ctx.objects,
        metrics: metrics.clone(),
        observers: ctx.observers.clone(),
        make_executor,
        shutdown,
        source_lost: listen.lost.clone(),
        term: term.clone(),
        book,
        checkpoint: ctx.checkpoint.clone().zip(epoch),
        start: Some(start),
        rx: &mut rx,
        stop_source: reader_stop.clone(),
    })
    .await;
    reader.abort();
    // Only after the last write: a standby that takes over from here resumes where we stopped.
    if !matches!(&result, Err(e) if e.is_lost_leadership()) {
        term.release().await;
    }
    *resume = reached;
    result
}

/// What one drive of the loop works on: where items come from, where outcomes go.
struct Drive<'a> {
    cfg: &'a Config,
    objects: &'a Arc<Objects>,
    metrics: Arc<crate::metrics::Metrics>,
    observers: tokio::sync::watch::Receiver<Arc<Observers>>,
    make_executor: &'a (dyn Fn() -> BoxExecutor + Send + Sync),
    shutdown: CancellationToken,
    /// Cancelled when the source of items is lost (the LISTEN connection): the run ends.
    source_lost: CancellationToken,
    term: Arc<dyn Term>,
    /// The writer's connection.
    book: tokio_postgres::Client,
    checkpoint: Option<(Arc<dyn CheckpointStore>, i64)>,
    /// The watermark to start from (the change log's position; `None` for messages).
    start: Option<Position>,
    rx: &'a mut mpsc::Receiver<Result<Vec<Item>, String>>,
    /// Cancelled when the loop stops taking items.
    stop_source: CancellationToken,
}

/// The loop itself: match → execute → record, for items from any source, until shutdown or
/// the first failure. Returns how it ended and the completion watermark reached.
async fn drive(d: Drive<'_>) -> (Result<(), RunError>, Option<Position>) {
    let Drive {
        cfg,
        objects,
        metrics,
        observers: mut live,
        make_executor,
        shutdown,
        source_lost,
        term,
        book,
        checkpoint,
        start,
        rx,
        stop_source,
    } = d;
    let listener = cfg.listener.id.as_str();
    let mut observers = live.borrow_and_update().clone();
    let mut live_open = true;
    let mut executor = make_executor();
    let term_lost = term.lost();
    let audit = cfg.features.search.then_some(crate::store::AuditMode {
        include_data: cfg.search.include_data,
    });
    let mut recorder =
        Recorder::new(objects.clone(), listener, cfg.action_log.record).with_audit(audit);
    let mut tracker = Tracker {
        watermark: start,
        ..Tracker::default()
    };
    let mut sent_watermark: Option<Position> = None;
    let mut progress = Progress::default();
    // The writer records completed work and moves the checkpoint off the loop, so dispatching
    // never waits for a commit. One job at a time: while it is busy, work keeps accumulating here.
    let (jobs, job_rx) = mpsc::channel::<WriteJob>(1);
    let (writer_failed_tx, mut writer_failed) = tokio::sync::oneshot::channel::<StoreError>();
    // Set while the writer cannot record completed work: reading pauses, so what would be
    // redelivered after a crash (and what is held in memory) stops growing.
    let writer_stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(
        writer_stalled.clone(),
        book,
        Recorder::new(objects.clone(), listener, cfg.action_log.record).with_audit(audit),
        checkpoint,
        term.clone(),
        listener.to_string(),
        job_rx,
        writer_failed_tx,
    ));
    let mut sched = Sched::default();
    let mut retries: DelayQueue<(u64, usize, DeliveryState)> = DelayQueue::new();
    let mut inflight: JoinSet<(Work, Result<DispatchResult, BoxError>)> = JoinSet::new();
    let flush_every = Duration::from_millis(cfg.listener.flush_interval_ms.max(1));
    let mut flush_tick = tokio::time::interval(flush_every);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = Instant::now();
    let max_pending = cfg.listener.max_pending_events.max(1);
    metrics.listener_active.set(1);

    let result: Result<(), RunError> = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = source_lost.cancelled() => break Err(RunError::ListenLost),
            _ = term_lost.cancelled() => break Err(RunError::LeaseLost(format!("term {} ended", term.token()))),
            failed = &mut writer_failed => match failed {
                Ok(e) => break Err(e.into()),
                Err(_) => break Err(RunError::Task("the writer task ended unexpectedly".into())),
            },
            // Before the work branches: under a backlog they are always ready, and a biased
            // select that served them first wrote no checkpoint until the backlog was gone
            // (a takeover after a pause redelivered a thousand events, the fault suite found).
            _ = flush_tick.tick() => {
                metrics.in_flight.set(inflight.len() as i64);
                observe_lag(&tracker, &metrics);
                let moved = tracker.watermark != sent_watermark;
                if recorder.is_empty() && !moved && tracker.settled.is_empty() && last_sent.elapsed() < Duration::from_secs(5) {
                    continue;
                }
                // Busy writer: keep accumulating; the next tick tries again.
                if let Ok(permit) = jobs.try_reserve() {
                    permit.send(write_job(&mut recorder, &mut tracker, &progress));
                    sent_watermark = tracker.watermark.clone();
                    last_sent = Instant::now();
                }
            }
            // A done message holds its partition until it is settled: it goes to the writer as
            // soon as the writer can take a job, not at the next tick (while the writer is busy,
            // completions gather for its next job).
            permit = jobs.reserve(), if !tracker.settled.is_empty() => {
                let Ok(permit) = permit else {
                    break Err(RunError::Task("the writer task ended unexpectedly".into()));
                };
                permit.send(write_job(&mut recorder, &mut tracker, &progress));
                sent_watermark = tracker.watermark.clone();
                last_sent = Instant::now();
            }
            // Every dispatch that has finished by now, not one per turn of the loop: under load
            // the turns themselves (each polls every branch above) cost as much as the work.
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                let mut done = Some(done);
                let mut failed = None;
                while let Some(d) = done.take().or_else(|| inflight.try_join_next()) {
                    match d {
                        Ok((work, result)) => on_result(work, result, &mut sched, &mut retries, &mut recorder, &mut progress, &mut tracker, &metrics),
                        Err(e) => {
                            failed = Some(RunError::Task(format!("dispatch task failed: {e}")));
                            break;
                        }
                    }
                }
                if let Some(e) = failed {
                    break Err(e);
                }
            }
            Some(expired) = retries.next(), if !retries.is_empty() => {
                let (seq, unit, state) = expired.into_inner();
                sched.ready.push_back(Work { seq, unit, states: vec![state] });
            }
            changed = live.changed(), if live_open => {
                if changed.is_err() {
                    live_open = false;
                } else {
                    // Events read from now on match the new observers; work in progress keeps the
                    // observers it started with. Layers keep their state across the rebuild.
                    observers = live.borrow_and_update().clone();
                    executor = make_executor();
                    tracing::info!(observers = observers.list.len(), "configuration reloaded");
                }
            }
            // Starts every due dispatch the stack takes now (its concurrency limit says when it
            // is full), not one per turn of the loop.
            r = executor.ready(), if !sched.ready.is_empty() => {
                let mut ready = Some(r.map(|_| ()));
                let mut failed = None;
                while !sched.ready.is_empty() {
                    let r = match ready.take() {
                        Some(r) => r,
                        None => match executor.ready().now_or_never() {
                            Some(r) => r.map(|_| ()),
                            None => break,
                        },
                    };
                    if let Err(e) = r {
                        failed = Some(RunError::Task(format!("executor failed: {e}")));
                        break;
                    }
                    // A process paused past its lease learns it here, before it starts anything.
                    if !term.holds() {
                        failed = Some(RunError::LeaseLost(format!("the lease of term {} could not be renewed in time", term.token())));
                        break;
                    }
                    let Some(work) = sched.ready.pop_front() else { break };
                    let Some(ev) = sched.events.get(&work.seq) else { continue };
                    let dispatch = Dispatch { event: ev.event.clone(), deliveries: work.states.iter().map(|s| s.delivery.clone()).collect() };
                    let fut = executor.call(dispatch);
                    let term = term.clone();
                    inflight.spawn(async move {
                        // A task that first runs after a pause past the lease sends nothing.
                        if !term.holds() {
                            return (work, Err(BoxError::from("the leadership was lost before the dispatch ran")));
                        }
                        (work, fut.await)
                    });
                }
                if let Some(e) = failed {
                    break Err(e);
                }
            }
            // Completed work waiting for the writer counts too: a writer slower than delivery
            // (the audit trail's full-text index, a slow disk) pauses reading instead of
            // piling records up in memory.
            batch = rx.recv(), if tracker.pending() < max_pending
                && recorder.buffered() < max_pending
                && !writer_stalled.load(std::sync::atomic::Ordering::Relaxed) => {
                let items = match batch {
                    Some(Ok(items)) => items,
                    Some(Err(e)) => break Err(RunError::Reader(e)),
                    None => break Err(RunError::Reader("reader ended".into())),
                };
                for item in items {
                    accept(item, &observers, &mut tracker, &mut sched, &mut recorder, &mut progress, &metrics);
                }
            }
        }
    };
    metrics.listener_active.set(0);

    // Shutdown (or failure): stop reading, let in-flight dispatches finish within the deadline —
    // unless another instance leads now: then nothing this run finishes could be recorded.
    stop_source.cancel();
    let lost_leadership = matches!(&result, Err(e) if e.is_lost_leadership());
    if lost_leadership {
        metrics.leader.set(0);
        inflight.abort_all();
    }
    let deadline = tokio::time::sleep(Duration::from_millis(cfg.listener.shutdown_timeout_ms));
    tokio::pin!(deadline);
    let in_flight_at_stop = inflight.len();
    while !inflight.is_empty() {
        tokio::select! {
            _ = &mut deadline => {
                tracing::warn!(in_flight = inflight.len(), "shutdown deadline reached; handing back unfinished deliveries");
                inflight.abort_all();
                break;
            }
            Some(done) = inflight.join_next() => {
                if let Ok((work, result)) = done {
                    on_result(work, result, &mut sched, &mut retries, &mut recorder, &mut progress, &mut tracker, &metrics);
                }
            }
        }
    }
    if in_flight_at_stop > 0 {
        tracing::info!(
            in_flight_at_stop,
            retrying = retries.len(),
            "in-flight work drained"
        );
    }
    // Whatever is still waiting or retrying stays after the checkpoint and is delivered next start.
    if jobs
        .reserve()
        .await
        .map(|p| p.send(write_job(&mut recorder, &mut tracker, &progress)))
        .is_err()
    {
        tracing::error!(
            "the writer is gone; unrecorded work will be redelivered on the next start"
        );
    }
    drop(jobs);
    match tokio::time::timeout(Duration::from_secs(15), writer).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "writer task failed"),
        Err(_) => tracing::error!(
            "final write timed out; unrecorded work will be redelivered on the next start"
        ),
    }
    if let Some(p) = &tracker.watermark {
        tracing::info!(listener, reached = %describe(p), "stopped");
    }
    (result, tracker.watermark)
}

/// Everything a worker run needs (`run --role worker`): a run without a change log, a
/// checkpoint or a leadership — its items are messages, settled once their outcomes are written.
pub struct WorkContext {
    /// `host:port/dbname`, for messages.
    pub database: String,
    pub config: Arc<Config>,
    pub observers: tokio::sync::watch::Receiver<Arc<Observers>>,
    pub objects: Arc<Objects>,
    pub pg_config: tokio_postgres::Config,
    pub tls: crate::tls::PgTls,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Works off `items` until `shutdown`, starting a fresh run after a database failure (the
/// messages of the failed run that were not settled are delivered again by their source).
pub async fn supervise_work(
    ctx: &WorkContext,
    make_executor: &(dyn Fn() -> BoxExecutor + Send + Sync),
    items: &mut mpsc::Receiver<Result<Vec<Item>, String>>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut delay = FIRST_RESTART_DELAY;
    loop {
        let started = Instant::now();
        let processed_before = ctx.metrics.events_processed.get();
        match work(ctx, make_executor, items, shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(RunError::Store(e @ (StoreError::NotMigrated(_) | StoreError::Privileges(_)))) => {
                return Err(e.into())
            }
            Err(e) => {
                if shutdown.is_cancelled() {
                    return Err(e);
                }
                let progressed = ctx.metrics.events_processed.get() > processed_before;
                delay = restart_delay(delay, progressed, started.elapsed());
                tracing::error!(database = %ctx.database, error = %e, retry_in_ms = delay.as_millis() as u64, "worker run failed; restarting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = next_restart_delay(delay);
            }
        }
    }
}

/// One worker run: until shutdown or the first database failure.
async fn work(
    ctx: &WorkContext,
    make_executor: &(dyn Fn() -> BoxExecutor + Send + Sync),
    items: &mut mpsc::Receiver<Result<Vec<Item>, String>>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (book, conn) = ctx.pg_config.connect(ctx.tls.clone()).await?;
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "bookkeeping connection failed");
        }
    });
    let _stop_conn = AbortOnDrop(conn);
    let needs = crate::preflight::needs(&ctx.objects, &ctx.config);
    for warning in crate::preflight::check(&book, &ctx.objects, &needs).await? {
        tracing::warn!("{warning}");
    }
    let (result, _) = drive(Drive {
        cfg: &ctx.config,
        objects: &ctx.objects,
        metrics: ctx.metrics.clone(),
        observers: ctx.observers.clone(),
        make_executor,
        shutdown,
        source_lost: CancellationToken::new(),
        term: Arc::new(Unfenced::default()),
        book,
        checkpoint: None,
        start: None,
        rx: items,
        stop_source: CancellationToken::new(),
    })
    .await;
    result
}

/// The term of a worker: nothing to lead, nothing to fence (its messages are fenced by the
/// stream: a message is someone else's once its ack wait has passed, and is then run again).
#[derive(Default)]
struct Unfenced {
    never: CancellationToken,
}

#[async_trait::async_trait]
impl Term for Unfenced {
    fn token(&self) -> i64 {
        0
    }
    fn lost(&self) -> CancellationToken {
        self.never.clone()
    }
    fn holds(&self) -> bool {
        true
    }
    async fn fence(&self, _tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
        Ok(())
    }
    async fn release(&self) {}
}

/// Sets the `leader` gauge back to 0 when the run ends.
struct LeaderGauge(Arc<crate::metrics::Metrics>);

impl Drop for LeaderGauge {
    fn drop(&mut self) {
        self.0.leader.set(0);
    }
}

/// Fails with `NotMigrated` when the change log or one of our tables is missing.
fn describe(p: &Position) -> String {
    format!("window {} .. {} after pk {}", p.lo, p.hi, p.after_pk)
}

/// What the loop hands the writer: completed work, and the watermark it reaches.
struct WriteJob {
    work: crate::store::Recorded,
    watermark: Option<Position>,
    progress: Progress,
    /// Messages done: settled once this job (and all before it) is written.
    settles: Vec<Box<dyn Settle>>,
}

fn write_job(recorder: &mut Recorder, tracker: &mut Tracker, progress: &Progress) -> WriteJob {
    let mut progress = progress.clone();
    progress.events = tracker.completed_events;
    progress.last_event = tracker.last_event;
    WriteJob {
        work: recorder.take(),
        watermark: tracker.watermark.clone(),
        progress,
        settles: std::mem::take(&mut tracker.settled),
    }
}

/// Writes jobs in order: the action log, dead letters and the checkpoint in one transaction per
/// job. A failed write keeps its work and is retried (later jobs are merged into it); after five
/// failures in a row the run is ended (`failed`) and resumes from the durable checkpoint —
/// unless the server refuses the write while a condition lasts ([`StoreError::is_write_refused`]: disk full,
/// read-only, …): then it keeps the work and retries (backing off to 5 s) for as long as that
/// lasts, with `stalled` set so the loop stops reading, and the checkpoint stays where it is.
#[allow(clippy::too_many_arguments)]
async fn write_loop(
    stalled: Arc<std::sync::atomic::AtomicBool>,
    mut client: tokio_postgres::Client,
    mut pending: Recorder,
    checkpoint: Option<(Arc<dyn CheckpointStore>, i64)>,
    term: Arc<dyn Term>,
    listener: String,
    mut jobs: mpsc::Receiver<WriteJob>,
    failed: tokio::sync::oneshot::Sender<StoreError>,
) {
    let mut saved_events = 0i64;
    let mut latest: Option<(Option<Position>, Progress)> = None;
    // Dropped unsettled if the run ends before they are written: delivered again.
    let mut settles: Vec<Box<dyn Settle>> = Vec::new();
    let mut failures = 0u32;
    loop {
        if latest.is_none() {
            let Some(job) = jobs.recv().await else { return };
            pending.absorb(job.work);
            settles.extend(job.settles);
            latest = Some((job.watermark, job.progress));
        }
        // Merge anything queued meanwhile: one transaction for all of it.
        while let Ok(more) = jobs.try_recv() {
            pending.absorb(more.work);
            settles.extend(more.settles);
            latest = Some((more.watermark, more.progress));
        }
        let Some((watermark, progress)) = &latest else {
            return;
        };
        let mut progress = progress.clone();
        progress.saved_events = saved_events;
        let cp = match (&checkpoint, watermark) {
            (Some((store, epoch)), Some(pos)) => Some((store.as_ref(), *epoch, pos, &progress)),
            _ => None,
        };
        match pending.flush(&mut client, cp, Some(term.as_ref())).await {
            Ok(()) => {
                saved_events = progress.events;
                latest = None;
                for s in settles.drain(..) {
                    s.done();
                }
                if failures > 0 {
                    tracing::info!(
                        failed_attempts = failures,
                        listener,
                        "recording completed work again"
                    );
                    stalled.store(false, std::sync::atomic::Ordering::Relaxed);
                }
                failures = 0;
            }
            Err(e @ (StoreError::Fenced { .. } | StoreError::LeaseLost { .. })) => {
                tracing::warn!(error = %e, buffered = pending.buffered(), listener,
                    "write refused: another instance leads the listener; what this instance did since is not recorded and will be done by the leader");
                let _ = failed.send(e);
                return;
            }
            Err(e) if client.is_closed() => {
                // The connection is gone: retrying on it cannot succeed; the run restarts and
                // the work after the checkpoint is redelivered.
                let _ = failed.send(e);
                return;
            }
            Err(e) => {
                failures += 1;
                let refused = e.is_write_refused();
                if refused {
                    stalled.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                tracing::warn!(error = %e, buffered = pending.buffered(), listener, failed_attempts = failures,
                    "could not record completed work (action log, dead letters, checkpoint); the checkpoint stays before it; {}",
                    if refused { "reading is paused until the database accepts the write" } else { "retrying (the run restarts after 5 failures in a row)" });
                if !refused && failures >= 5 {
                    let _ = failed.send(e);
                    return;
                }
                tokio::time::sleep(Duration::from_millis((200 * u64::from(failures)).min(5000)))
                    .await;
            }
        }
    }
}

/// Lag gauges: events read but not completed, and the age of the oldest of them.
fn observe_lag(tracker: &Tracker, metrics: &crate::metrics::Metrics) {
    metrics.lag_events.set(tracker.pending() as i64);
    let oldest = tracker.slots.iter().find_map(|s| s.3.map(|(_, _, at)| at));
    let age = oldest
        .map(|at| (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0)
        .unwrap_or(0.0);
    metrics.lag_seconds.set(age);
    if let Some((_, pk, _)) = tracker.last_event {
        metrics.checkpoint_pk.set(pk);
    }
    metrics.checkpoint_events.set(tracker.completed_events);
}

/// Takes one item from the reader into the loop's state.
fn accept(
    item: Item,
    observers: &Observers,
    tracker: &mut Tracker,
    sched: &mut Sched,
    recorder: &mut Recorder,
    progress: &mut Progress,
    metrics: &crate::metrics::Metrics,
) {
    let (row, pos, settle) = match item {
        Item::WindowEnd(pos) => {
            let seq = tracker.push(Some(pos), None, None);
            tracker.complete(seq);
            return;
        }
        Item::Row(row, pos) => (row, Some(pos), None),
        Item::Message(event, settle) => (ChangeRow::Event(event), None, Some(settle)),
        Item::Refused {
            event_id,
            pk,
            raw,
            reason,
            error,
            settle,
        } => {
            metrics.events_read.inc();
            let id = event_id.map(|i| i.to_string()).unwrap_or_default();
            tracing::warn!(event_id = %id, %reason, %error, "message not run; dead-lettered");
            progress.last_error = Some((format!("event {id}: {error}"), Utc::now()));
            refuse(recorder, metrics, event_id, pk, raw, reason, error);
            let seq = tracker.push(None, None, Some(settle));
            tracker.complete(seq);
            return;
        }
    };
    metrics.events_read.inc();
    let event = match row {
        ChangeRow::Poison {
            pk,
            event_id,
            raw,
            reason,
        } => {
            tracing::warn!(pk, %reason, "change-log row cannot be processed; dead-lettered");
            progress.last_error = Some((format!("change-log row {pk}: {reason}"), Utc::now()));
            refuse(recorder, metrics, event_id, pk, raw, "poison_event", reason);
            let seq = tracker.push(pos, None, settle);
            tracker.complete(seq);
            return;
        }
        ChangeRow::Event(e) => Arc::new(e),
    };
    let seq = tracker.push(pos, Some((event.id, event.pk, event.created_at)), settle);
    let mut units = Vec::new();
    let mut work = Vec::new();
    let mut total = 0;
    let mut matched = Vec::new();
    for observer in observers.matching(&event) {
        if recorder.audits() {
            matched.push(observer.name.clone());
        }
        let states: Vec<DeliveryState> = (0..observer.actions.len())
            .map(|i| DeliveryState {
                delivery: Delivery {
                    observer: observer.clone(),
                    action_index: i,
                    idempotency_key: idempotency_key_arc(event.id, &observer.name, i),
                    attempt: 1,
                },
                attempts: Vec::new(),
            })
            .collect();
        let key = observer.ordered.then(|| {
            (
                Arc::<str>::from(observer.name.as_str()),
                event.entity.clone(),
                event.entity_id.clone(),
            )
        });
        total += states.len();
        units.push(Unit {
            key: key.clone(),
            remaining: states.len(),
        });
        work.push((key, states));
    }
    if total == 0 {
        if recorder.audits() {
            recorder.audit(NewAudit {
                event,
                observers: matched,
                actions: Vec::new(),
            });
        }
        metrics.events_processed.inc();
        tracker.complete(seq);
        return;
    }
    metrics.events_matched.inc();
    sched.events.insert(
        seq,
        EventState {
            event,
            units,
            remaining: total,
            audit: recorder.audits().then(|| (matched, Vec::new())),
        },
    );
    for (unit, (key, states)) in work.into_iter().enumerate() {
        sched.admit(seq, unit, key, states);
    }
}

/// Dead-letters an event that is not run at all (no observer, no action).
fn refuse(
    recorder: &mut Recorder,
    metrics: &crate::metrics::Metrics,
    event_id: Option<uuid::Uuid>,
    pk: i64,
    raw: serde_json::Value,
    reason: &'static str,
    error: String,
) {
    metrics.dead_letters.inc();
    recorder.dead_letter(NewDeadLetter {
        event_id,
        change_log_pk: pk,
        event: raw,
        observer: None,
        action_index: None,
        action_type: None,
        action: None,
        idempotency_key: None,
        reason,
        last_error: error,
        attempts: vec![],
    });
}

/// Handles the attempts of one dispatch: done, deferred, retry later, or dead letter; releases
/// the unit's key and completes the event when nothing of it is left.
#[allow(clippy::too_many_arguments)]
fn on_result(
    work: Work,
    result: Result<DispatchResult, BoxError>,
    sched: &mut Sched,
    retries: &mut DelayQueue<(u64, usize, DeliveryState)>,
    recorder: &mut Recorder,
    progress: &mut Progress,
    tracker: &mut Tracker,
    metrics: &crate::metrics::Metrics,
) {
    let Work { seq, unit, states } = work;
    let attempts = match result {
        Ok(a) if a.len() == states.len() => a,
        Ok(_) | Err(_) => {
            let why = match result {
                Err(e) => e.to_string(),
                Ok(_) => "executor returned the wrong number of results".to_string(),
            };
            tracing::warn!(error = %why, "dispatch failed before attempting; retrying shortly");
            progress.last_error = Some((why, Utc::now()));
            for s in states {
                retries.insert((seq, unit, s), Duration::from_secs(1));
            }
            return;
        }
    };
    let Some(ev) = sched.events.get_mut(&seq) else {
        return;
    };
    let event = ev.event.clone();
    let mut finished = 0usize;
    for (mut state, attempt) in states.into_iter().zip(attempts) {
        let observer = state.delivery.observer.clone();
        let index = state.delivery.action_index;
        let policy = &observer.actions[index].retry;
        let kind = observer.actions[index].action.kind();
        let result = attempt.result.clone();
        if let AttemptResult::Deferred { after_ms, reason } = result {
            // Not an attempt: put back on its schedule without counting it.
            metrics.deferred.with_label_values(&[reason]).inc();
            retries.insert(
                (seq, unit, state),
                Duration::from_millis(after_ms.clamp(1, 3_600_000)),
            );
            continue;
        }
        let attempted = matches!(
            result,
            AttemptResult::Delivered | AttemptResult::Retry { .. } | AttemptResult::Permanent
        );
        if attempted {
            metrics
                .action_duration
                .with_label_values(&[observer.name.as_str(), kind])
                .observe(attempt.duration_ms as f64 / 1000.0);
        }
        if matches!(
            result,
            AttemptResult::Retry { .. } | AttemptResult::Permanent
        ) {
            metrics
                .actions_failed
                .with_label_values(&[observer.name.as_str(), kind])
                .inc();
        }
        let error = attempt.error.clone();
        state.attempts.push(attempt);
        let n = state
            .attempts
            .iter()
            .filter(|a| !matches!(a.result, AttemptResult::Deferred { .. }))
            .count() as u32;
        let outcome = match result {
            AttemptResult::Delivered => Some("delivered"),
            AttemptResult::Duplicate => Some("duplicate"),
            AttemptResult::ConditionFalse => Some("condition_false"),
            AttemptResult::Enqueued { .. } => Some("enqueued"),
            AttemptResult::Retry { after_ms } if n < policy.max_attempts => {
                let wait = next_delay(policy, n, after_ms);
                tracing::debug!(observer = %observer.name, event_id = %event.id, attempt = n, wait_ms = wait.as_millis() as u64, error = error.as_deref().unwrap_or(""), "attempt failed; retry scheduled");
                progress.last_error = error
                    .clone()
                    .map(|e| (format!("{}: {e}", observer.name), Utc::now()));
                metrics
                    .retries
                    .with_label_values(&[observer.name.as_str()])
                    .inc();
                state.delivery.attempt = n + 1;
                retries.insert((seq, unit, state), wait);
                continue;
            }
            AttemptResult::Retry { .. }
            | AttemptResult::Permanent
            | AttemptResult::Deferred { .. } => None,
        };
        let key = state.delivery.idempotency_key.to_string();
        if outcome.is_none() {
            let reason = if matches!(result, AttemptResult::Permanent) {
                "permanent_failure"
            } else {
                "retries_exhausted"
            };
            let last_error = error.unwrap_or_else(|| "failed".into());
            tracing::warn!(observer = %observer.name, event_id = %event.id, action = index, attempts = n, %reason, error = %last_error, "dead-lettered");
            progress.last_error = Some((format!("{}: {last_error}", observer.name), Utc::now()));
            metrics.dead_letters.inc();
            recorder.dead_letter(NewDeadLetter {
                event_id: Some(event.id),
                change_log_pk: event.pk,
                event: serde_json::to_value(&*event).unwrap_or(serde_json::Value::Null),
                observer: Some(observer.name.clone()),
                action_index: Some(index as i32),
                action_type: Some(kind.to_string()),
                action: Some(observer.actions[index].config.clone()),
                idempotency_key: Some(key.clone()),
                reason,
                last_error,
                attempts: state.attempts.clone(),
            });
        }
        let outcome = outcome.unwrap_or("dead_lettered");
        metrics
            .actions
            .with_label_values(&[observer.name.as_str(), kind, outcome])
            .inc();
        let row = NewActionLog {
            event_id: event.id,
            change_log_pk: event.pk,
            observer: observer.name.clone(),
            action_index: index as i32,
            action_type: kind,
            idempotency_key: key,
            outcome,
            attempts: state.attempts,
        };
        if let Some((_, actions)) = ev.audit.as_mut() {
            actions.push(row.clone());
        }
        recorder.action(row);
        finished += 1;
    }
    if finished == 0 {
        return;
    }
    ev.remaining -= finished.min(ev.remaining);
    let unit_left = match ev.units.get_mut(unit) {
        Some(u) => {
            u.remaining -= finished.min(u.remaining);
            u.remaining
        }
        None => 0,
    };
    if unit_left == 0 && sched.unit_done(seq, unit) {
        if let Some(done) = sched.events.remove(&seq) {
            if let Some((observers, actions)) = done.audit {
                recorder.audit(NewAudit {
                    event: done.event.clone(),
                    observers,
                    actions,
                });
            }
            metrics.events_processed.inc();
            let age = (Utc::now() - done.event.created_at)
                .num_milliseconds()
                .max(0);
            metrics.commit_to_done.observe(age as f64 / 1000.0);
        }
        tracker.complete(seq);
    }
}

/// The wait before attempt `n + 1`, honouring a receiver's `Retry-After` as a floor.
pub fn next_delay(policy: &RetryConfig, n: u32, retry_after_ms: Option<u64>) -> Duration {
    let base = match policy.backoff {
        Backoff::Fixed => policy.initial_ms,
        Backoff::Linear => policy.initial_ms.saturating_mul(n as u64),
        Backoff::Exponential => {
            let ceiling = policy
                .initial_ms
                .saturating_mul(1u64 << (n - 1).min(32))
                .min(policy.max_ms);
            // Full jitter, but never below half the step, so retries still spread out.
            let half = ceiling / 2;
            half + rand::random_range(0..=ceiling - half)
        }
    }
    .min(policy.max_ms);
    Duration::from_millis(base.max(retry_after_ms.unwrap_or(0)))
}

/// Aborts a task when dropped (so a run never leaves its connections behind).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How soon the reader looks again while a writer that did not notify is committing: from
/// 1 ms, doubling while it still is (a commit waiting on a synchronous standby can take long).
const BUSY_WAIT_MIN: Duration = Duration::from_millis(1);
const BUSY_WAIT_MAX: Duration = Duration::from_millis(32);

/// Sends `rows` (after whatever `items` holds) to the dispatcher, moving `pos` past them. False
/// when the run is stopping.
async fn hand_over(
    rows: Vec<crate::change_log::ChangeRow>,
    pos: &mut Position,
    items: &mut Vec<Item>,
    tx: &mpsc::Sender<Result<Vec<Item>, String>>,
    stop: &CancellationToken,
) -> bool {
    for row in rows {
        pos.after_pk = row.pk();
        items.push(Item::Row(row, pos.clone()));
    }
    if items.is_empty() {
        return true;
    }
    tokio::select! {
        _ = stop.cancelled() => false,
        sent = tx.send(Ok(std::mem::take(items))) => sent.is_ok(),
    }
}

/// Walks the change log window by window, sending batches until stopped.
async fn read_loop(
    mut reader: crate::change_log::WindowReader,
    start: Position,
    batch: i64,
    poll: Duration,
    wake: Arc<Notify>,
    tx: mpsc::Sender<Result<Vec<Item>, String>>,
    stop: CancellationToken,
) {
    let mut pos = start;
    let read_err =
        |e: tokio_postgres::Error| format!("reading the change log: {}", crate::error_chain(&e));
    let snapshot_err =
        |e: tokio_postgres::Error| format!("taking a snapshot: {}", crate::error_chain(&e));
    let outcome: Result<(), String> = async {
        // Items to hand over with the next send (a window end travels with the rows after it).
        let mut items: Vec<Item> = Vec::new();
        // The first look is at once: a writer may have been committing when the start snapshot
        // was taken, after the notification that would otherwise cover it.
        let mut wait = Duration::ZERO;
        let mut busy = false;
        loop {
            // Read the current window to its end, a page at a time: the first with one query
            // (a window is usually small), the rest of a large one through a cursor. A page
            // also ends at the byte budget (`max_batch_bytes`), and so does a cursor whose page
            // reaches it; a window of rows that large is
            // read with one query per page, `limit` rows at most: twice what fitted the budget
            // last time, so rows past the budget cost little to measure and skip, doubling back
            // to `batch` as rows get small again.
            let mut limit = batch;
            loop {
                let page = reader
                    .read(&pos.lo, &pos.hi, pos.after_pk, limit)
                    .await
                    .map_err(read_err)?;
                let (n, cut) = (page.rows.len() as i64, page.budget_reached);
                if !hand_over(page.rows, &mut pos, &mut items, &tx, &stop).await {
                    return Ok(());
                }
                if cut {
                    limit = (2 * n).clamp(1, batch);
                    continue;
                }
                if n < limit {
                    break;
                }
                if limit < batch {
                    limit = (2 * limit).min(batch);
                    continue;
                }
                let cursor = reader
                    .rest(&pos.lo, &pos.hi, pos.after_pk, batch)
                    .await
                    .map_err(read_err)?;
                let cut = loop {
                    let page = cursor.next_page().await.map_err(read_err)?;
                    let (n, cut) = (page.rows.len() as i64, page.budget_reached);
                    if !hand_over(page.rows, &mut pos, &mut items, &tx, &stop).await {
                        return Ok(());
                    }
                    if cut || n < batch {
                        break cut.then_some(n);
                    }
                };
                cursor.finish().await.map_err(read_err)?;
                match cut {
                    Some(n) => limit = (2 * n).clamp(1, batch),
                    None => break,
                }
            }
            // Drained: wait for news (a notification, the poll, or sooner while writers that
            // did not notify are committing), then read the window up to the new snapshot.
            let next = loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                let (quiet, next) = reader.quiet_snapshot().await.map_err(snapshot_err)?;
                let cap = poll.min(BUSY_WAIT_MAX);
                wait = match (quiet, busy) {
                    (true, _) => poll,
                    (false, false) => BUSY_WAIT_MIN.min(cap),
                    (false, true) => (wait * 2).min(cap),
                };
                busy = !quiet;
                if next != pos.hi {
                    break next;
                }
            };
            pos = Position {
                lo: pos.hi.clone(),
                hi: next,
                after_pk: 0,
            };
            items.push(Item::WindowEnd(Position::at(pos.lo.clone())));
        }
    }
    .await;
    if let Err(e) = outcome {
        let _ = tx.send(Err(e)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_completed_work_restarts_the_backoff() {
        let long_wait = Duration::from_secs(8);
        // Regression (pg-restart fault scenario): after waiting for the database at start, a
        // run that delivered for a few seconds and then lost the database waited 8 s.
        assert_eq!(
            restart_delay(long_wait, true, Duration::from_secs(2)),
            FIRST_RESTART_DELAY
        );
        assert_eq!(
            restart_delay(long_wait, false, Duration::from_secs(61)),
            FIRST_RESTART_DELAY
        );
        // A run that failed before doing anything keeps backing off.
        assert_eq!(
            restart_delay(long_wait, false, Duration::from_secs(2)),
            long_wait
        );
    }

    #[test]
    fn the_reconnect_backoff_doubles_up_to_four_seconds() {
        let mut d = FIRST_RESTART_DELAY;
        let mut seen = vec![d.as_millis()];
        for _ in 0..6 {
            d = next_restart_delay(d);
            seen.push(d.as_millis());
        }
        // Regression (pg-restart long form): capped at 30 s, the backoff reached 16 s during a
        // 20 s outage and the daemon delivered again 11.4 s after the database was back.
        assert_eq!(seen, [500, 1000, 2000, 4000, 4000, 4000, 4000]);
    }

    #[test]
    fn delays_follow_the_policy() {
        let p = RetryConfig {
            max_attempts: 5,
            backoff: Backoff::Fixed,
            initial_ms: 100,
            max_ms: 1000,
            ..RetryConfig::default()
        };
        assert_eq!(next_delay(&p, 3, None), Duration::from_millis(100));
        assert_eq!(next_delay(&p, 3, Some(700)), Duration::from_millis(700));
        let p = RetryConfig {
            backoff: Backoff::Linear,
            ..p
        };
        assert_eq!(next_delay(&p, 3, None), Duration::from_millis(300));
        assert_eq!(next_delay(&p, 30, None), Duration::from_millis(1000));
        let p = RetryConfig {
            backoff: Backoff::Exponential,
            ..p
        };
        for n in 1..10 {
            let d = next_delay(&p, n, None).as_millis() as u64;
            let ceiling = (100u64 << (n - 1)).min(1000);
            assert!(d >= ceiling / 2 && d <= ceiling, "n={n} d={d}");
        }
    }

    #[test]
    fn messages_settle_in_any_order_and_never_move_the_watermark() {
        struct Done(Arc<std::sync::Mutex<Vec<u8>>>, u8);
        impl Settle for Done {
            fn done(self: Box<Self>) {
                self.0.lock().unwrap().push(self.1);
            }
        }
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut t = Tracker::default();
        let a = t.push(None, None, Some(Box::new(Done(log.clone(), 1))));
        let b = t.push(None, None, Some(Box::new(Done(log.clone(), 2))));
        // The second is done first: it is settled at once (another partition does not wait
        // for a slow one), the first stays held.
        t.complete(b);
        assert_eq!(t.settled.len(), 1);
        for s in std::mem::take(&mut t.settled) {
            s.done();
        }
        assert_eq!(*log.lock().unwrap(), vec![2]);
        t.complete(a);
        assert_eq!(t.settled.len(), 1);
        assert!(
            t.watermark.is_none(),
            "messages carry no change-log position"
        );
        assert!(t.settles.is_empty());
    }

    #[test]
    fn watermark_is_contiguous() {
        let snap: Snapshot = "5:5:".parse().unwrap();
        let mut t = Tracker::default();
        let a = t.push(
            Some(Position {
                after_pk: 1,
                ..Position::at(snap.clone())
            }),
            None,
            None,
        );
        let b = t.push(
            Some(Position {
                after_pk: 2,
                ..Position::at(snap.clone())
            }),
            None,
            None,
        );
        let c = t.push(
            Some(Position {
                after_pk: 3,
                ..Position::at(snap)
            }),
            None,
            None,
        );
        t.complete(b);
        assert!(t.watermark.is_none());
        t.complete(a);
        assert_eq!(t.watermark.as_ref().map(|p| p.after_pk), Some(2));
        t.complete(c);
        assert_eq!(t.watermark.as_ref().map(|p| p.after_pk), Some(3));
        assert_eq!(t.pending(), 0);
    }
}
