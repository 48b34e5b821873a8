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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tower::{Service, ServiceExt};

use crate::action::{Attempt, AttemptResult};
use crate::change_log::{ChangeLog, ChangeRow, Position, Snapshot};
use crate::config::{Backoff, Config, RetryConfig, StartFrom};
use crate::event::ChangeEvent;
use crate::executor::{idempotency_key, BoxError, BoxExecutor, Delivery, Dispatch, DispatchResult};
use crate::observer::Observers;
use crate::schema::Objects;
use crate::store::{CheckpointStore, NewActionLog, NewDeadLetter, Progress, Recorder, StoreError};

/// Why a run ended early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {}", crate::error_chain(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("the LISTEN connection (which holds the listener lock) was lost")]
    ListenLost,
    #[error("change-log reader stopped: {0}")]
    Reader(String),
    /// A task of the run (writer, dispatch, executor) failed in a way that ends the run.
    #[error("{0}")]
    Task(String),
}

impl RunError {
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
    pub observers: Arc<Observers>,
    pub objects: Arc<Objects>,
    pub pg_config: tokio_postgres::Config,
    /// The connector for every connection (TLS only when `sslmode=require`).
    pub tls: crate::tls::PgTls,
    pub checkpoint: Option<Arc<dyn CheckpointStore>>,
    /// Identifies this process in the checkpoint row (`host:pid`).
    pub owner: String,
}

/// Runs until `shutdown`, restarting a failed run from the checkpoint with capped backoff.
pub async fn supervise(
    ctx: &RunContext,
    make_executor: &(dyn Fn() -> BoxExecutor + Send + Sync),
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut delay = Duration::from_millis(500);
    // Where the last run got to. With checkpoints on the store is the truth; with them off this
    // is what keeps a restart after a database error from jumping to the tail and losing events.
    let mut resume: Option<Position> = None;
    loop {
        let started = Instant::now();
        match run(ctx, make_executor(), shutdown.clone(), &mut resume).await {
            Ok(()) => return Ok(()),
            Err(RunError::Store(e @ StoreError::NotMigrated(_))) => return Err(e.into()),
            Err(e) => {
                if shutdown.is_cancelled() {
                    return Err(e);
                }
                if started.elapsed() > Duration::from_secs(60) {
                    delay = Duration::from_millis(500);
                }
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
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One item read from the change log, with the position that completing it reaches.
enum Item {
    Row(ChangeRow, Position),
    /// A window was drained: completing everything before it reaches `Position::at(hi)`.
    WindowEnd(Position),
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

/// Takes the per-listener advisory lock, waiting as a standby while another process holds it.
async fn acquire_lock(
    conn: &ListenConnection,
    listener: &str,
    shutdown: &CancellationToken,
) -> Result<bool, RunError> {
    let mut announced = false;
    loop {
        let got: bool = conn
            .client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('fraiseql_observers:' || $1, 0))",
                &[&listener],
            )
            .await?
            .get(0);
        if got {
            if announced {
                tracing::info!(
                    listener,
                    "listener lock acquired; this instance is now active"
                );
            }
            return Ok(true);
        }
        if !announced {
            tracing::info!(
                listener,
                "listener is active in another process; standing by"
            );
            announced = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = conn.lost.cancelled() => return Err(RunError::ListenLost),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// A delivery and the attempts made so far.
struct DeliveryState {
    delivery: Delivery,
    attempts: Vec<Attempt>,
}

/// An event being worked on.
struct EventState {
    event: Arc<ChangeEvent>,
    key: (String, Option<String>),
    remaining: usize,
}

/// The completion watermark: items in read order; the front ones that are done advance it.
type EventMark = (uuid::Uuid, i64, chrono::DateTime<Utc>);

#[derive(Default)]
struct Tracker {
    /// (sequence, position reached when done, done, the event it is — None for markers).
    slots: VecDeque<(u64, Position, bool, Option<EventMark>)>,
    next_seq: u64,
    watermark: Option<Position>,
    completed_events: i64,
    last_event: Option<EventMark>,
}

impl Tracker {
    fn push(&mut self, pos: Position, event: Option<EventMark>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots.push_back((seq, pos, false, event));
        seq
    }

    fn complete(&mut self, seq: u64) {
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
                self.watermark = Some(pos);
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
    mut executor: BoxExecutor,
    shutdown: CancellationToken,
    resume: &mut Option<Position>,
) -> Result<(), RunError> {
    let cfg = &ctx.config;
    let listener = cfg.listener.id.as_str();
    let wake = Arc::new(Notify::new());
    let listen = listen_connection(ctx, wake.clone()).await?;
    if !acquire_lock(&listen, listener, &shutdown).await? {
        return Ok(());
    }
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

    check_tables(&book, &ctx.objects).await?;
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
        .reader(reader_client)
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

    let mut recorder = Recorder::new(ctx.objects.clone(), listener, cfg.action_log.record);
    let mut tracker = Tracker {
        watermark: Some(start),
        ..Tracker::default()
    };
    let mut sent_watermark: Option<Position> = None;
    let mut progress = Progress::default();
    // The writer records completed work and moves the checkpoint off the loop, so dispatching
    // never waits for a commit. One job at a time: while it is busy, work keeps accumulating here.
    let (jobs, job_rx) = mpsc::channel::<WriteJob>(1);
    let (writer_failed_tx, mut writer_failed) = tokio::sync::oneshot::channel::<StoreError>();
    let writer = tokio::spawn(write_loop(
        book,
        Recorder::new(ctx.objects.clone(), listener, cfg.action_log.record),
        ctx.checkpoint.clone().zip(epoch),
        listener.to_string(),
        job_rx,
        writer_failed_tx,
    ));
    let mut events: HashMap<u64, EventState> = HashMap::new();
    // Keys with an event in progress → events of that key waiting their turn.
    let mut busy: HashMap<(String, Option<String>), VecDeque<u64>> = HashMap::new();
    let mut waiting: HashMap<u64, Vec<DeliveryState>> = HashMap::new();
    let mut ready: VecDeque<(u64, Vec<DeliveryState>)> = VecDeque::new();
    let mut retries: DelayQueue<(u64, DeliveryState)> = DelayQueue::new();
    let mut inflight: JoinSet<(u64, Vec<DeliveryState>, Result<DispatchResult, BoxError>)> =
        JoinSet::new();
    let flush_every = Duration::from_millis(cfg.listener.flush_interval_ms.max(1));
    let mut flush_tick = tokio::time::interval(flush_every);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = Instant::now();
    let max_pending = cfg.listener.max_pending_events.max(1);

    let result: Result<(), RunError> = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = listen.lost.cancelled() => break Err(RunError::ListenLost),
            failed = &mut writer_failed => match failed {
                Ok(e) => break Err(e.into()),
                Err(_) => break Err(RunError::Task("the writer task ended unexpectedly".into())),
            },
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                let (seq, states, result) = match done {
                    Ok(v) => v,
                    Err(e) => break Err(RunError::Task(format!("dispatch task failed: {e}"))),
                };
                if on_result(seq, states, result, &mut events, &mut retries, &mut recorder, &mut progress) {
                    finish(seq, &mut events, &mut busy, &mut waiting, &mut ready, &mut tracker);
                }
            }
            Some(expired) = retries.next(), if !retries.is_empty() => {
                let (seq, state) = expired.into_inner();
                ready.push_back((seq, vec![state]));
            }
            r = executor.ready(), if !ready.is_empty() => {
                if let Err(e) = r {
                    break Err(RunError::Task(format!("executor failed: {e}")));
                }
                if let Some((seq, states)) = ready.pop_front() {
                    let Some(ev) = events.get(&seq) else { continue };
                    let dispatch = Dispatch { event: ev.event.clone(), deliveries: states.iter().map(|s| s.delivery.clone()).collect() };
                    let fut = executor.call(dispatch);
                    inflight.spawn(async move { (seq, states, fut.await) });
                }
            }
            batch = rx.recv(), if tracker.pending() < max_pending => {
                let items = match batch {
                    Some(Ok(items)) => items,
                    Some(Err(e)) => break Err(RunError::Reader(e)),
                    None => break Err(RunError::Reader("reader ended".into())),
                };
                for item in items {
                    accept(item, &ctx.observers, &mut tracker, &mut events, &mut busy, &mut waiting, &mut ready, &mut recorder, &mut progress);
                }
            }
            _ = flush_tick.tick() => {
                let moved = tracker.watermark != sent_watermark;
                if recorder.is_empty() && !moved && last_sent.elapsed() < Duration::from_secs(5) {
                    continue;
                }
                // Busy writer: keep accumulating; the next tick tries again.
                if let Ok(permit) = jobs.try_reserve() {
                    permit.send(write_job(&mut recorder, &tracker, &progress));
                    sent_watermark = tracker.watermark.clone();
                    last_sent = Instant::now();
                }
            }
        }
    };

    // Shutdown (or failure): stop reading, let in-flight dispatches finish within the deadline.
    reader_stop.cancel();
    reader.abort();
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
                if let Ok((seq, states, result)) = done {
                    if on_result(seq, states, result, &mut events, &mut retries, &mut recorder, &mut progress) {
                    finish(seq, &mut events, &mut busy, &mut waiting, &mut ready, &mut tracker);
                }
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
        .map(|p| p.send(write_job(&mut recorder, &tracker, &progress)))
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
    *resume = tracker.watermark.clone();
    result
}

/// Fails with `NotMigrated` when the change log or one of our tables is missing.
async fn check_tables(client: &tokio_postgres::Client, objects: &Objects) -> Result<(), RunError> {
    for t in [
        &objects.change_log,
        &objects.checkpoints,
        &objects.dead_letters,
        &objects.action_log,
    ] {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.sql()])
            .await?
            .get(0);
        if !exists {
            return Err(StoreError::NotMigrated(format!("table {t} does not exist")).into());
        }
    }
    Ok(())
}

fn describe(p: &Position) -> String {
    format!("window {} .. {} after pk {}", p.lo, p.hi, p.after_pk)
}

/// What the loop hands the writer: completed work, and the watermark it reaches.
struct WriteJob {
    work: crate::store::Recorded,
    watermark: Option<Position>,
    progress: Progress,
}

fn write_job(recorder: &mut Recorder, tracker: &Tracker, progress: &Progress) -> WriteJob {
    let mut progress = progress.clone();
    progress.events = tracker.completed_events;
    progress.last_event = tracker.last_event;
    WriteJob {
        work: recorder.take(),
        watermark: tracker.watermark.clone(),
        progress,
    }
}

/// Writes jobs in order: the action log, dead letters and the checkpoint in one transaction per
/// job. A failed write keeps its work and is retried (later jobs are merged into it); after five
/// failures in a row the run is ended (`failed`) and resumes from the durable checkpoint.
async fn write_loop(
    mut client: tokio_postgres::Client,
    mut pending: Recorder,
    checkpoint: Option<(Arc<dyn CheckpointStore>, i64)>,
    listener: String,
    mut jobs: mpsc::Receiver<WriteJob>,
    failed: tokio::sync::oneshot::Sender<StoreError>,
) {
    let mut saved_events = 0i64;
    let mut latest: Option<(Option<Position>, Progress)> = None;
    let mut failures = 0u32;
    loop {
        if latest.is_none() {
            let Some(job) = jobs.recv().await else { return };
            pending.absorb(job.work);
            latest = Some((job.watermark, job.progress));
        }
        // Merge anything queued meanwhile: one transaction for all of it.
        while let Ok(more) = jobs.try_recv() {
            pending.absorb(more.work);
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
        match pending.flush(&mut client, cp).await {
            Ok(()) => {
                saved_events = progress.events;
                latest = None;
                failures = 0;
            }
            Err(e @ StoreError::Fenced { .. }) => {
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
                tracing::warn!(error = %e, buffered = pending.buffered(), listener, "could not record completed work; keeping it and retrying");
                if failures >= 5 {
                    let _ = failed.send(e);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
            }
        }
    }
}

/// Takes one item from the reader into the loop's state.
#[allow(clippy::too_many_arguments)]
fn accept(
    item: Item,
    observers: &Observers,
    tracker: &mut Tracker,
    events: &mut HashMap<u64, EventState>,
    busy: &mut HashMap<(String, Option<String>), VecDeque<u64>>,
    waiting: &mut HashMap<u64, Vec<DeliveryState>>,
    ready: &mut VecDeque<(u64, Vec<DeliveryState>)>,
    recorder: &mut Recorder,
    progress: &mut Progress,
) {
    let (row, pos) = match item {
        Item::WindowEnd(pos) => {
            let seq = tracker.push(pos, None);
            tracker.complete(seq);
            return;
        }
        Item::Row(row, pos) => (row, pos),
    };
    let event = match row {
        ChangeRow::Poison {
            pk,
            event_id,
            raw,
            reason,
        } => {
            tracing::warn!(pk, %reason, "change-log row cannot be processed; dead-lettered");
            progress.last_error = Some((format!("change-log row {pk}: {reason}"), Utc::now()));
            recorder.dead_letter(NewDeadLetter {
                event_id,
                change_log_pk: pk,
                event: raw,
                observer: None,
                action_index: None,
                action_type: None,
                action: None,
                idempotency_key: None,
                reason: "poison_event",
                last_error: reason,
                attempts: vec![],
            });
            let seq = tracker.push(pos, None);
            tracker.complete(seq);
            return;
        }
        ChangeRow::Event(e) => Arc::new(e),
    };
    let seq = tracker.push(pos, Some((event.id, event.pk, event.created_at)));
    let mut states = Vec::new();
    for observer in observers.matching(&event) {
        for i in 0..observer.actions.len() {
            states.push(DeliveryState {
                delivery: Delivery {
                    observer: observer.clone(),
                    action_index: i,
                    idempotency_key: idempotency_key(event.id, &observer.name, i).into(),
                    attempt: 1,
                },
                attempts: Vec::new(),
            });
        }
    }
    if states.is_empty() {
        tracker.complete(seq);
        return;
    }
    let key = event.ordering_key();
    events.insert(
        seq,
        EventState {
            event,
            key: key.clone(),
            remaining: states.len(),
        },
    );
    match busy.get_mut(&key) {
        Some(queue) => {
            queue.push_back(seq);
            waiting.insert(seq, states);
        }
        None => {
            busy.insert(key, VecDeque::new());
            ready.push_back((seq, states));
        }
    }
}

/// Marks an event complete: releases the next event of its key and advances the watermark.
fn finish(
    seq: u64,
    events: &mut HashMap<u64, EventState>,
    busy: &mut HashMap<(String, Option<String>), VecDeque<u64>>,
    waiting: &mut HashMap<u64, Vec<DeliveryState>>,
    ready: &mut VecDeque<(u64, Vec<DeliveryState>)>,
    tracker: &mut Tracker,
) {
    if let Some(state) = events.remove(&seq) {
        let next = busy.get_mut(&state.key).and_then(|q| q.pop_front());
        match next.and_then(|n| waiting.remove(&n).map(|s| (n, s))) {
            Some((n, states)) => ready.push_back((n, states)),
            None => {
                busy.remove(&state.key);
            }
        }
    }
    tracker.complete(seq);
}

/// Handles the attempts of one dispatch: done, retry later, or dead letter. True when the
/// event has no delivery left.
#[allow(clippy::too_many_arguments)]
fn on_result(
    seq: u64,
    states: Vec<DeliveryState>,
    result: Result<DispatchResult, BoxError>,
    events: &mut HashMap<u64, EventState>,
    retries: &mut DelayQueue<(u64, DeliveryState)>,
    recorder: &mut Recorder,
    progress: &mut Progress,
) -> bool {
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
                retries.insert((seq, s), Duration::from_secs(1));
            }
            return false;
        }
    };
    let Some(ev) = events.get_mut(&seq) else {
        return false;
    };
    let event = ev.event.clone();
    let mut finished = 0usize;
    for (mut state, attempt) in states.into_iter().zip(attempts) {
        let observer = state.delivery.observer.clone();
        let index = state.delivery.action_index;
        let policy = &observer.actions[index].retry;
        let result = attempt.result.clone();
        let error = attempt.error.clone();
        state.attempts.push(attempt);
        let n = state.attempts.len() as u32;
        let outcome = match result {
            AttemptResult::Delivered => Some("delivered"),
            AttemptResult::Retry { after_ms } if n < policy.max_attempts => {
                let wait = next_delay(policy, n, after_ms);
                tracing::debug!(observer = %observer.name, event_id = %event.id, attempt = n, wait_ms = wait.as_millis() as u64, error = error.as_deref().unwrap_or(""), "attempt failed; retry scheduled");
                progress.last_error = error
                    .clone()
                    .map(|e| (format!("{}: {e}", observer.name), Utc::now()));
                state.delivery.attempt = n + 1;
                retries.insert((seq, state), wait);
                continue;
            }
            AttemptResult::Retry { .. } | AttemptResult::Permanent => None,
        };
        let key = state.delivery.idempotency_key.to_string();
        let kind = observer.actions[index].action.kind();
        if outcome.is_none() {
            let reason = if matches!(result, AttemptResult::Permanent) {
                "permanent_failure"
            } else {
                "retries_exhausted"
            };
            let last_error = error.unwrap_or_else(|| "failed".into());
            tracing::warn!(observer = %observer.name, event_id = %event.id, action = index, attempts = n, %reason, error = %last_error, "dead-lettered");
            progress.last_error = Some((format!("{}: {last_error}", observer.name), Utc::now()));
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
        recorder.action(NewActionLog {
            event_id: event.id,
            change_log_pk: event.pk,
            observer: observer.name.clone(),
            action_index: index as i32,
            action_type: kind,
            idempotency_key: key,
            outcome: outcome.unwrap_or("dead_lettered"),
            attempts: state.attempts,
        });
        finished += 1;
    }
    ev.remaining -= finished.min(ev.remaining);
    ev.remaining == 0
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

/// Walks the change log window by window, sending batches until stopped.
async fn read_loop(
    reader: crate::change_log::WindowReader,
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
        loop {
            // Read the current window to its end, a page at a time.
            loop {
                let rows = reader.read(&pos.lo, &pos.hi, pos.after_pk, batch).await.map_err(read_err)?;
                let full = rows.len() as i64 >= batch;
                for row in rows {
                    pos.after_pk = row.pk();
                    items.push(Item::Row(row, pos.clone()));
                }
                if !items.is_empty() {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        sent = tx.send(Ok(std::mem::take(&mut items))) => if sent.is_err() { return Ok(()) },
                    }
                }
                if !full {
                    break;
                }
            }
            // Drained: the next window starts when the snapshot moves; wait for news until it does.
            let mut next = reader.snapshot().await.map_err(snapshot_err)?;
            while next == pos.hi {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
                next = reader.snapshot().await.map_err(snapshot_err)?;
            }
            pos = Position { lo: pos.hi.clone(), hi: next, after_pk: 0 };
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
    fn delays_follow_the_policy() {
        let p = RetryConfig {
            max_attempts: 5,
            backoff: Backoff::Fixed,
            initial_ms: 100,
            max_ms: 1000,
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
    fn watermark_is_contiguous() {
        let snap: Snapshot = "5:5:".parse().unwrap();
        let mut t = Tracker::default();
        let a = t.push(
            Position {
                after_pk: 1,
                ..Position::at(snap.clone())
            },
            None,
        );
        let b = t.push(
            Position {
                after_pk: 2,
                ..Position::at(snap.clone())
            },
            None,
        );
        let c = t.push(
            Position {
                after_pk: 3,
                ..Position::at(snap)
            },
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
