//! The job workers: each queue is worked off by up to `workers` jobs at once in this process.
//!
//! Per queue, one reader takes new jobs (XREADGROUP, on a connection of its own) and, every
//! `visibility_timeout / 4`, takes over jobs idle longer than the visibility timeout (XAUTOCLAIM)
//! — those of a worker that died. Each job runs the observer's action through the executor stack
//! below the queue layer, with the action's own retry policy (`runloop::next_delay`); while it
//! runs or waits to retry, its task touches the entry every third of the visibility timeout so
//! nobody takes it over. Attempts are counted in Redis, so a job taken over keeps its count.
//!
//! A job is finished only after its outcome is durable: the writer task writes the action-log
//! rows and any dead letter to Postgres, then acknowledges and deletes the entries. A crash in
//! between runs the job again (at least once, same idempotency key), never loses it.
//!
//! Shutdown: stop reading, let running jobs finish within the drain deadline, then abandon the
//! rest: they stay pending and another worker (or this one, restarted) takes them over after the
//! visibility timeout.

use std::sync::Arc;
use std::time::Duration;

use observer_core::action::{Attempt, AttemptResult};
use observer_core::config::RecordMode;
use observer_core::event::ChangeEvent;
use observer_core::executor::{BoxExecutor, Delivery, Dispatch};
use observer_core::observer::{Observer, Observers};
use observer_core::runloop::next_delay;
use observer_core::schema::Objects;
use observer_core::store::{NewActionLog, NewDeadLetter, Recorder};
use redis::streams::StreamId;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use super::metrics::QueueMetrics;
use super::store::{Job, JobQueue};

/// How long one blocking read waits for new jobs.
const READ_BLOCK: Duration = Duration::from_millis(1_000);

/// Everything the workers of this process share.
pub struct Workers {
    pub queue: JobQueue,
    pub metrics: Arc<QueueMetrics>,
    /// Counts dead letters with the rest of the process's (`observer_dead_letters_total`).
    pub core_metrics: Arc<observer_core::metrics::Metrics>,
    pub observers: watch::Receiver<Arc<Observers>>,
    /// Builds the executor stack below the queue layer.
    pub executor: Arc<dyn Fn() -> BoxExecutor + Send + Sync>,
    pub pool: deadpool_postgres::Pool,
    pub objects: Arc<Objects>,
    /// The listener id the action-log rows and dead letters are written under.
    pub listener: String,
    pub record: RecordMode,
    /// This process's consumer name in the group (`host:pid`).
    pub consumer: String,
    pub visibility: Duration,
    /// How long shutdown waits for running jobs.
    pub drain: Duration,
}

/// What a finished job (or a failed attempt of a running one) leaves to record.
struct Finished {
    log: Option<NewActionLog>,
    dead: Option<NewDeadLetter>,
    /// `(entry id, idempotency key)` to acknowledge once the rest is durable.
    ack: Option<(String, String)>,
}

impl Workers {
    /// Works off `queues` (name, jobs at once) until `shutdown`.
    pub async fn run(self: Arc<Self>, queues: Vec<(String, usize)>, shutdown: CancellationToken) {
        let mut all = JoinSet::new();
        for (name, n) in queues {
            if n == 0 {
                continue;
            }
            self.metrics.init_queue(&name);
            tracing::info!(queue = %name, workers = n, consumer = %self.consumer, "job workers started");
            all.spawn(self.clone().work_queue(name, n, shutdown.clone()));
        }
        while all.join_next().await.is_some() {}
    }

    async fn work_queue(self: Arc<Self>, name: String, n: usize, shutdown: CancellationToken) {
        let (done_tx, done_rx) = mpsc::channel::<Finished>(n.max(1) * 4);
        let writer = tokio::spawn(self.clone().write_loop(name.clone(), done_rx));
        let slots = Arc::new(Semaphore::new(n));
        let mut jobs: JoinSet<()> = JoinSet::new();
        let claim_every = (self.visibility / 4).max(Duration::from_millis(50));
        let mut next_claim = tokio::time::Instant::now();
        let mut reader = None;
        let mut backoff = Duration::from_millis(200);
        'outer: loop {
            while jobs.try_join_next().is_some() {}
            let free = slots.available_permits();
            // Read in batches: while most slots are busy, wait for more of them to free up
            // rather than asking Redis for one job per finished one.
            if free == 0 || (free < n.div_ceil(4) && !jobs.is_empty()) {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = jobs.join_next() => continue,
                }
            }
            let step = async {
                let mut entries = Vec::new();
                if tokio::time::Instant::now() >= next_claim {
                    self.queue.ensure_group(&name).await?;
                    entries = self
                        .queue
                        .claim_stale(&name, &self.consumer, self.visibility, free)
                        .await?;
                    if !entries.is_empty() {
                        tracing::info!(queue = %name, jobs = entries.len(), "took over jobs whose worker stopped reporting");
                    }
                    next_claim = tokio::time::Instant::now() + claim_every;
                }
                if entries.is_empty() {
                    if reader.is_none() {
                        reader = Some(self.queue.reader(READ_BLOCK.min(claim_every)).await?);
                    }
                    if let Some(r) = reader.as_mut() {
                        entries = self.queue.read(r, &name, &self.consumer, free).await?;
                    }
                }
                Ok::<_, super::store::QueueError>(entries)
            };
            let entries = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                r = step => r,
            };
            match entries {
                Ok(entries) => {
                    backoff = Duration::from_millis(200);
                    for e in entries {
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            // Cannot happen (we read at most `free`); the entry stays pending
                            // and is taken over after the visibility timeout.
                            break;
                        };
                        let me = self.clone();
                        let done = done_tx.clone();
                        let name = name.clone();
                        jobs.spawn(async move {
                            me.work(&name, e, done).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => {
                    if e.0.contains("NOGROUP") {
                        // The stream was purged (its group with it): make it again.
                        next_claim = tokio::time::Instant::now();
                    } else {
                        tracing::warn!(queue = %name, error = %e, retry_in_ms = backoff.as_millis() as u64, "job queue unavailable");
                        reader = None;
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'outer,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(4));
                    }
                }
            }
        }
        // Shutdown: running jobs get the drain deadline; what is left stays pending in Redis.
        let deadline = tokio::time::sleep(self.drain);
        tokio::pin!(deadline);
        while !jobs.is_empty() {
            tokio::select! {
                _ = &mut deadline => {
                    tracing::warn!(queue = %name, running = jobs.len(), "drain deadline reached; unfinished jobs stay in the queue and are taken over after the visibility timeout");
                    jobs.abort_all();
                    while jobs.join_next().await.is_some() {}
                    break;
                }
                _ = jobs.join_next() => {}
            }
        }
        drop(done_tx);
        let _ = writer.await;
        tracing::info!(queue = %name, "job workers stopped");
    }

    /// Runs one job to its end (or until another worker takes it over), touching it meanwhile.
    async fn work(&self, queue: &str, entry: StreamId, done: mpsc::Sender<Finished>) {
        let id = entry.id.clone();
        let run = self.attempts(queue, entry, &done);
        tokio::pin!(run);
        let mut touch = tokio::time::interval((self.visibility / 3).max(Duration::from_millis(10)));
        touch.tick().await;
        let finished = loop {
            tokio::select! {
                f = &mut run => break Some(f),
                _ = touch.tick() => match self.queue.touch(queue, &self.consumer, &id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(queue, job = %id, "another worker took this job over (this one did not report in time); leaving it to that worker");
                        break None;
                    }
                    Err(e) => tracing::warn!(queue, job = %id, error = %e, "could not report on a running job"),
                },
            }
        };
        if let Some(f) = finished {
            let _ = done.send(f).await;
        }
    }

    /// The attempts of one job; what to record when it is over.
    async fn attempts(
        &self,
        queue: &str,
        entry: StreamId,
        done: &mpsc::Sender<Finished>,
    ) -> Finished {
        let job = match Job::from_entry(&entry) {
            Ok(j) => j,
            Err(why) => return self.poison(queue, &entry, None, why),
        };
        let event: ChangeEvent = match serde_json::from_str(&job.event) {
            Ok(e) => e,
            Err(e) => {
                let why = format!("job {}: the event does not decode: {e}", job.id);
                return self.poison(queue, &entry, Some(&job), why);
            }
        };
        let event = Arc::new(event);
        let observer = self.observers.borrow().get(&job.observer).cloned();
        let Some(observer) = observer.filter(|o| job.action_index < o.actions.len()) else {
            let why = format!(
                "observer `{}` (action {}) is not in this worker's configuration",
                job.observer, job.action_index
            );
            return self.poison(queue, &entry, Some(&job), why);
        };
        let action = &observer.actions[job.action_index];
        let policy = action.retry.clone();
        let kind = action.action.kind();
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut wait = Duration::from_millis(200);
        loop {
            let n = match self
                .queue
                .count_attempt(queue, &job.idempotency_key, 1)
                .await
            {
                Ok(n) => n.max(1) as u32,
                Err(e) => {
                    tracing::warn!(queue, job = %job.id, error = %e, "cannot count the attempt; waiting");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(4));
                    continue;
                }
            };
            if n > policy.max_attempts {
                // Earlier attempts ended with their worker (it died or hung mid-job).
                let error = format!(
                    "attempt {n} of at most {}: the earlier attempts never finished (their worker stopped mid-job)",
                    policy.max_attempts
                );
                return self.dead(
                    queue,
                    &job,
                    &event,
                    &observer,
                    kind,
                    attempts,
                    "retries_exhausted",
                    error,
                );
            }
            let dispatch = Dispatch {
                event: event.clone(),
                deliveries: vec![Delivery {
                    observer: observer.clone(),
                    action_index: job.action_index,
                    idempotency_key: job.idempotency_key.as_str().into(),
                    attempt: n,
                }],
            };
            let mut exec = (self.executor)();
            let result = match exec.ready().await {
                Ok(s) => s.call(dispatch).await,
                Err(e) => Err(e),
            };
            let attempt = match result.map(|mut v| (v.len() == 1).then(|| v.remove(0))) {
                Ok(Some(a)) => a,
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        _ => "executor returned the wrong number of results".into(),
                    };
                    tracing::warn!(queue, job = %job.id, error = %why, "job not attempted; trying again shortly");
                    let _ = self
                        .queue
                        .count_attempt(queue, &job.idempotency_key, -1)
                        .await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let result = attempt.result.clone();
            if let AttemptResult::Deferred { after_ms, .. } = result {
                let _ = self
                    .queue
                    .count_attempt(queue, &job.idempotency_key, -1)
                    .await;
                tokio::time::sleep(Duration::from_millis(after_ms.clamp(1, 60_000))).await;
                continue;
            }
            let error = attempt.error.clone();
            attempts.push(attempt.clone());
            let outcome = match result {
                AttemptResult::Delivered | AttemptResult::Enqueued { .. } => "delivered",
                AttemptResult::Duplicate => "duplicate",
                AttemptResult::ConditionFalse => "condition_false",
                AttemptResult::Retry { after_ms } if n < policy.max_attempts => {
                    self.metrics.count(queue, "failed");
                    self.metrics.count(queue, "retried");
                    let delay = next_delay(&policy, n, after_ms);
                    tracing::debug!(queue, job = %job.id, attempt = n, wait_ms = delay.as_millis() as u64, "job attempt failed; retry scheduled");
                    let row = self.log_row(
                        &job,
                        &event,
                        &observer,
                        kind,
                        "retry_scheduled",
                        vec![attempt],
                    );
                    let _ = done
                        .send(Finished {
                            log: Some(row),
                            dead: None,
                            ack: None,
                        })
                        .await;
                    tokio::time::sleep(delay).await;
                    continue;
                }
                AttemptResult::Permanent
                | AttemptResult::Retry { .. }
                | AttemptResult::Deferred { .. } => {
                    self.metrics.count(queue, "failed");
                    let reason = if matches!(result, AttemptResult::Permanent) {
                        "permanent_failure"
                    } else {
                        "retries_exhausted"
                    };
                    let e = error.unwrap_or_else(|| "failed".into());
                    return self.dead(queue, &job, &event, &observer, kind, attempts, reason, e);
                }
            };
            self.metrics.count(queue, "completed");
            return Finished {
                log: Some(self.log_row(&job, &event, &observer, kind, outcome, vec![attempt])),
                dead: None,
                ack: Some((job.id.clone(), job.idempotency_key.clone())),
            };
        }
    }

    fn log_row(
        &self,
        job: &Job,
        event: &ChangeEvent,
        observer: &Observer,
        kind: &'static str,
        outcome: &'static str,
        attempts: Vec<Attempt>,
    ) -> NewActionLog {
        NewActionLog {
            event_id: event.id,
            change_log_pk: event.pk,
            observer: observer.name.clone(),
            action_index: job.action_index as i32,
            action_type: kind,
            idempotency_key: job.idempotency_key.clone(),
            outcome,
            attempts,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dead(
        &self,
        queue: &str,
        job: &Job,
        event: &ChangeEvent,
        observer: &Observer,
        kind: &'static str,
        attempts: Vec<Attempt>,
        reason: &'static str,
        last_error: String,
    ) -> Finished {
        tracing::warn!(queue, job = %job.id, observer = %observer.name, event_id = %event.id, %reason, error = %last_error, "job dead-lettered");
        self.metrics.count(queue, "dead_lettered");
        self.core_metrics.dead_letters.inc();
        Finished {
            log: Some(self.log_row(
                job,
                event,
                observer,
                kind,
                "dead_lettered",
                attempts.last().cloned().into_iter().collect(),
            )),
            dead: Some(NewDeadLetter {
                event_id: Some(event.id),
                change_log_pk: event.pk,
                event: serde_json::to_value(event).unwrap_or(serde_json::Value::Null),
                observer: Some(observer.name.clone()),
                action_index: Some(job.action_index as i32),
                action_type: Some(kind.to_string()),
                action: observer
                    .actions
                    .get(job.action_index)
                    .map(|a| a.config.clone()),
                idempotency_key: Some(job.idempotency_key.clone()),
                reason,
                last_error,
                attempts,
            }),
            ack: Some((job.id.clone(), job.idempotency_key.clone())),
        }
    }

    /// A job that cannot run at all (unreadable, or its observer is gone): dead-lettered at
    /// once with what the entry held, so it can be inspected and retried once fixed.
    fn poison(&self, queue: &str, entry: &StreamId, job: Option<&Job>, why: String) -> Finished {
        tracing::warn!(queue, job = %entry.id, error = %why, "job cannot run; dead-lettered");
        self.metrics.count(queue, "dead_lettered");
        self.core_metrics.dead_letters.inc();
        let fields: serde_json::Map<String, serde_json::Value> = entry
            .map
            .iter()
            .map(|(k, v)| {
                let text = redis::from_redis_value::<String>(v.clone()).unwrap_or_default();
                (k.clone(), serde_json::Value::String(text))
            })
            .collect();
        let event: Option<serde_json::Value> =
            job.and_then(|j| serde_json::from_str(&j.event).ok());
        let event_id = job.and_then(|j| j.event_id.parse().ok());
        let pk = event
            .as_ref()
            .and_then(|e| e.get("pk"))
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        Finished {
            log: None,
            dead: Some(NewDeadLetter {
                event_id,
                change_log_pk: pk,
                event: event.unwrap_or(serde_json::Value::Object(fields)),
                observer: job.map(|j| j.observer.clone()),
                action_index: job.map(|j| j.action_index as i32),
                action_type: None,
                action: None,
                idempotency_key: job.map(|j| j.idempotency_key.clone()),
                reason: "poison_job",
                last_error: why,
                attempts: vec![],
            }),
            ack: Some((
                entry.id.clone(),
                job.map(|j| j.idempotency_key.clone()).unwrap_or_default(),
            )),
        }
    }

    /// Records finished work in batches: action log and dead letters in one transaction, then
    /// the acknowledgements. A failed write is retried (the jobs stay pending meanwhile).
    async fn write_loop(self: Arc<Self>, queue: String, mut rx: mpsc::Receiver<Finished>) {
        let mut recorder = Recorder::new(self.objects.clone(), &self.listener, self.record);
        let mut acks: Vec<(String, String)> = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < 1_000 {
                match rx.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
            for f in batch {
                if let Some(l) = f.log {
                    recorder.action(l);
                }
                if let Some(d) = f.dead {
                    recorder.dead_letter(d);
                }
                acks.extend(f.ack);
            }
            let mut wait = Duration::from_millis(100);
            loop {
                let written = async {
                    let mut client = self
                        .pool
                        .get()
                        .await
                        .map_err(|e| format!("database pool: {e}"))?;
                    recorder
                        .flush(&mut client, None, None)
                        .await
                        .map_err(|e| e.to_string())
                }
                .await;
                match written {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(queue = %queue, error = %e, buffered = recorder.buffered(), "could not record finished jobs; retrying (they stay in the queue until recorded)");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let mut wait = Duration::from_millis(100);
            for _ in 0..20 {
                match self.queue.complete(&queue, &acks).await {
                    Ok(()) => {
                        acks.clear();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(queue = %queue, error = %e, jobs = acks.len(), "could not acknowledge finished jobs; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
            if !acks.is_empty() {
                tracing::error!(queue = %queue, jobs = acks.len(), "finished jobs could not be acknowledged; they will run again after the visibility timeout (same idempotency keys)");
                acks.clear();
            }
        }
    }
}

/// Refreshes the depth, pending and oldest-age gauges of `queues` every `every` until `shutdown`.
pub async fn sample(
    queue: JobQueue,
    metrics: Arc<QueueMetrics>,
    queues: Vec<String>,
    every: Duration,
    shutdown: CancellationToken,
) {
    for q in &queues {
        metrics.init_queue(q);
    }
    loop {
        for q in &queues {
            match queue.stats(q).await {
                Ok(s) => metrics.observe(&s),
                Err(e) => tracing::debug!(queue = %q, error = %e, "queue gauges not refreshed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
