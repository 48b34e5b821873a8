//! Delivering one action of one event in this process, with the action's own retry policy:
//! what `dlq retry` and `replay` share.
//!
//! The daemon schedules retries on timers so one failing destination never blocks others; an
//! operator command works through one delivery at a time, so here the wait between attempts is
//! an ordinary sleep (`runloop::next_delay`, honouring `Retry-After`). The dispatch goes through
//! the same executor stack the daemon builds and carries the same idempotency key
//! (`executor::idempotency_key`), so a receiver that saw the original delivery can deduplicate.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::GenericClient;
use tower::{Service, ServiceExt};

use crate::action::{Attempt, AttemptResult};
use crate::event::ChangeEvent;
use crate::executor::{idempotency_key, BoxError, BoxExecutor, Delivery, Dispatch};
use crate::observer::{Observer, Observers};
use crate::runloop::next_delay;
use crate::schema::Objects;
use crate::store::{NewActionLog, NewDeadLetter};

/// How an in-process delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Delivered,
    /// Every attempt the policy allows failed with a retryable error.
    RetriesExhausted,
    /// An attempt failed in a way retrying cannot fix.
    PermanentFailure,
}

impl Outcome {
    /// The dead-letter `reason` the daemon writes for this outcome (`None` when delivered).
    pub fn dead_letter_reason(self) -> Option<&'static str> {
        match self {
            Outcome::Delivered => None,
            Outcome::RetriesExhausted => Some("retries_exhausted"),
            Outcome::PermanentFailure => Some("permanent_failure"),
        }
    }
}

/// One delivery worked off in-process: its attempts and how it ended.
#[derive(Debug, Clone)]
pub struct Redelivery {
    pub event: Arc<ChangeEvent>,
    pub observer: Arc<Observer>,
    pub action_index: usize,
    pub idempotency_key: String,
    pub attempts: Vec<Attempt>,
    pub outcome: Outcome,
}

impl Redelivery {
    /// The error of the last attempt, if it failed.
    pub fn last_error(&self) -> Option<String> {
        if self.outcome == Outcome::Delivered {
            return None;
        }
        Some(
            self.attempts
                .last()
                .and_then(|a| a.error.clone())
                .unwrap_or_else(|| "failed".into()),
        )
    }

    /// The action-log row the daemon would write for this outcome.
    pub fn action_log(&self) -> NewActionLog {
        NewActionLog {
            event_id: self.event.id,
            change_log_pk: self.event.pk,
            observer: self.observer.name.clone(),
            action_index: self.action_index as i32,
            action_type: self.kind(),
            idempotency_key: self.idempotency_key.clone(),
            outcome: if self.outcome == Outcome::Delivered {
                "delivered"
            } else {
                "dead_lettered"
            },
            attempts: self.attempts.clone(),
        }
    }

    /// The dead letter the daemon would write for this outcome (`None` when delivered).
    pub fn dead_letter(&self) -> Option<NewDeadLetter> {
        let reason = self.outcome.dead_letter_reason()?;
        Some(NewDeadLetter {
            event_id: Some(self.event.id),
            change_log_pk: self.event.pk,
            event: serde_json::to_value(&*self.event).unwrap_or(serde_json::Value::Null),
            observer: Some(self.observer.name.clone()),
            action_index: Some(self.action_index as i32),
            action_type: Some(self.kind().to_string()),
            action: self
                .observer
                .actions
                .get(self.action_index)
                .map(|a| a.config.clone()),
            idempotency_key: Some(self.idempotency_key.clone()),
            reason,
            last_error: self.last_error().unwrap_or_default(),
            attempts: self.attempts.clone(),
        })
    }

    fn kind(&self) -> &'static str {
        self.observer
            .actions
            .get(self.action_index)
            .map(|a| a.action.kind())
            .unwrap_or("unknown")
    }
}

/// The (observer, action index) pairs an event's deliveries are made of, in the daemon's order,
/// restricted to observer `only` when given.
pub fn deliveries_for(
    observers: &Observers,
    event: &ChangeEvent,
    only: Option<&str>,
) -> Vec<(Arc<Observer>, usize)> {
    observers
        .matching(event)
        .filter(|o| only.is_none_or(|n| o.name == n))
        .flat_map(|o| (0..o.actions.len()).map(move |i| (o.clone(), i)))
        .collect()
}

/// Delivers action `action_index` of `observer` for `event` through `executor`, making up to the
/// action's `max_attempts` attempts (numbered from `first_attempt`) with its backoff between them.
/// The idempotency key is the daemon's. An `Err` is infrastructure trouble before any attempt.
pub async fn deliver(
    executor: &mut BoxExecutor,
    event: Arc<ChangeEvent>,
    observer: Arc<Observer>,
    action_index: usize,
    first_attempt: u32,
) -> Result<Redelivery, BoxError> {
    let key = idempotency_key(event.id, &observer.name, action_index);
    let policy = match observer.actions.get(action_index) {
        Some(a) => a.retry.clone(),
        None => {
            return Err(format!("observer `{}` has no action {action_index}", observer.name).into())
        }
    };
    let mut attempts: Vec<Attempt> = Vec::new();
    let outcome = loop {
        let n = attempts.len() as u32 + 1;
        let dispatch = Dispatch {
            event: event.clone(),
            deliveries: vec![Delivery {
                observer: observer.clone(),
                action_index,
                idempotency_key: key.as_str().into(),
                attempt: first_attempt + n - 1,
            }],
        };
        let result = executor.ready().await?.call(dispatch).await?;
        let Some(attempt) = result.into_iter().next() else {
            return Err("executor returned no result".into());
        };
        let result = attempt.result.clone();
        if let AttemptResult::Deferred { after_ms, .. } = result {
            // Not an attempt (breaker open, rate limit): wait and ask again.
            tokio::time::sleep(Duration::from_millis(after_ms.clamp(1, 60_000))).await;
            continue;
        }
        attempts.push(attempt);
        match result {
            // Already delivered within the dedup window, or not wanted: nothing left to do.
            // Enqueued: the job queue owns it now (operator commands build the stack without
            // the queue layer, so this is only reached by callers that chose to enqueue).
            AttemptResult::Delivered
            | AttemptResult::Duplicate
            | AttemptResult::ConditionFalse
            | AttemptResult::Enqueued { .. } => break Outcome::Delivered,
            AttemptResult::Deferred { .. } => continue,
            AttemptResult::Permanent => break Outcome::PermanentFailure,
            AttemptResult::Retry { after_ms } if n < policy.max_attempts => {
                tokio::time::sleep(next_delay(&policy, n, after_ms)).await;
            }
            AttemptResult::Retry { .. } => break Outcome::RetriesExhausted,
        }
    };
    Ok(Redelivery {
        event,
        observer,
        action_index,
        idempotency_key: key,
        attempts,
        outcome,
    })
}

/// Inserts one action-log row (inside the caller's transaction, if it has one).
pub async fn insert_action_log(
    client: &impl GenericClient,
    objects: &Objects,
    listener: &str,
    row: &NewActionLog,
) -> Result<(), tokio_postgres::Error> {
    let sql = format!(
        "INSERT INTO {} (listener_id, event_id, change_log_pk, observer, action_index, action_type,
                         idempotency_key, outcome, attempts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        objects.action_log.sql()
    );
    let attempts = serde_json::to_value(&row.attempts).unwrap_or(serde_json::Value::Array(vec![]));
    client
        .execute(
            &sql,
            &[
                &listener,
                &row.event_id,
                &row.change_log_pk,
                &row.observer,
                &row.action_index,
                &row.action_type,
                &row.idempotency_key,
                &row.outcome,
                &attempts,
            ],
        )
        .await?;
    Ok(())
}

/// Records a manual retry of dead letter `id`: appends `attempts`, counts the retry, and either
/// resolves it or keeps it pending with the new last error.
pub async fn record_dead_letter_retry(
    client: &impl GenericClient,
    objects: &Objects,
    id: i64,
    attempts: &[Attempt],
    last_error: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    let sql = format!(
        "UPDATE {} SET attempts = attempts || $2::jsonb, manual_retries = manual_retries + 1,
                status = CASE WHEN $3::text IS NULL THEN 'resolved' ELSE 'pending' END,
                resolved_at = CASE WHEN $3::text IS NULL THEN now() ELSE NULL END,
                last_error = COALESCE($3, last_error), updated_at = now()
         WHERE id = $1",
        objects.dead_letters.sql()
    );
    let attempts = serde_json::to_value(attempts).unwrap_or(serde_json::Value::Array(vec![]));
    client.execute(&sql, &[&id, &attempts, &last_error]).await?;
    Ok(())
}
