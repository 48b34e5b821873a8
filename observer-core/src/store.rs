//! Our bookkeeping in Postgres: the checkpoint seam, the dead-letter queue and the action log.
//!
//! The run loop never writes these row by row on the hot path. Completed work accumulates in a
//! [`Recorder`], and one transaction per flush writes the action-log rows, the dead letters and
//! the new checkpoint together, so the checkpoint never moves past an event whose outcome is not
//! durably recorded.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, Type};
use tokio_postgres::Transaction;
use uuid::Uuid;

use crate::action::Attempt;
use crate::audit::NewAudit;
use crate::change_log::{Position, Snapshot};
use crate::config::RecordMode;
use crate::schema::Objects;

/// Errors of the bookkeeping store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {}", crate::pg_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("listener `{listener}` was claimed by another instance after us (our epoch {epoch}); stopping")]
    Fenced { listener: String, epoch: i64 },
    /// The failover lease of `listener` is held under a newer token than ours: every write of
    /// this instance is refused from now on.
    #[error("listener `{listener}`: our lease (token {token}) was taken over by another instance; write refused")]
    LeaseLost { listener: String, token: i64 },
    #[error("stored checkpoint of `{listener}` is unreadable: {message}")]
    Corrupt { listener: String, message: String },
    #[error("our tables are missing ({0}): run `fraiseql-observers migrate` first")]
    NotMigrated(String),
    #[error("the database role lacks what the daemon needs: {0}")]
    Privileges(String),
}

impl StoreError {
    /// The server is up but refuses the write while a condition lasts — disk full or other exhausted resource
    /// (SQLSTATE class 53), an I/O error (58), a read-only database (25006), a conflict (40), a
    /// lock or statement timeout (55P03, 57014). Starting the run again cannot help (it only
    /// redelivers what was already delivered); waiting and writing again can.
    pub fn is_write_refused(&self) -> bool {
        let StoreError::Db(e) = self else {
            return false;
        };
        let Some(code) = e.code() else {
            return false;
        };
        let c = code.code();
        ["53", "58", "40"].iter().any(|class| c.starts_with(class))
            || ["25006", "55P03", "57014"].contains(&c)
    }
}

/// What a checkpoint save records besides the position.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Events completed by this run.
    pub events: i64,
    /// Of those, how many the last successful save already counted.
    pub saved_events: i64,
    pub last_event: Option<(Uuid, i64, DateTime<Utc>)>,
    pub last_error: Option<(String, DateTime<Utc>)>,
}

/// Durable positions (cargo feature `checkpoint` provides the Postgres one).
#[async_trait::async_trait]
pub trait CheckpointStore: Send + Sync {
    /// The saved position of `listener`, if any.
    async fn load(
        &self,
        client: &tokio_postgres::Client,
        listener: &str,
    ) -> Result<Option<Position>, StoreError>;
    /// Claims the listener (bumps its epoch) and returns the epoch to fence later saves with.
    async fn claim(
        &self,
        client: &tokio_postgres::Client,
        listener: &str,
        owner: &str,
        start: &Position,
    ) -> Result<i64, StoreError>;
    /// Saves `pos` inside `tx`; fails with `Fenced` when another instance claimed the listener.
    async fn save(
        &self,
        tx: &Transaction<'_>,
        listener: &str,
        epoch: i64,
        pos: &Position,
        progress: &Progress,
    ) -> Result<(), StoreError>;
}

/// A dead letter about to be written.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub event_id: Option<Uuid>,
    pub change_log_pk: i64,
    pub event: Value,
    pub observer: Option<String>,
    pub action_index: Option<i32>,
    pub action_type: Option<String>,
    pub action: Option<Value>,
    pub idempotency_key: Option<String>,
    pub reason: &'static str,
    pub last_error: String,
    pub attempts: Vec<Attempt>,
}

/// An action outcome about to be written to the action log.
#[derive(Debug, Clone)]
pub struct NewActionLog {
    pub event_id: Uuid,
    pub change_log_pk: i64,
    pub observer: String,
    pub action_index: i32,
    pub action_type: &'static str,
    pub idempotency_key: String,
    pub outcome: &'static str,
    pub attempts: Vec<Attempt>,
}

/// Completed work moved out of one recorder, to be written by another (the run loop buffers,
/// its writer task writes).
#[derive(Debug, Default)]
pub struct Recorded {
    log: Vec<NewActionLog>,
    dead: Vec<NewDeadLetter>,
    audit: Vec<NewAudit>,
}

impl Recorded {
    pub fn is_empty(&self) -> bool {
        self.log.is_empty() && self.dead.is_empty() && self.audit.is_empty()
    }
}

/// Whether completed events are written to the audit trail (`features.search`), and with their
/// data or without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditMode {
    pub include_data: bool,
}

/// The columns of the action log's COPY, in its order.
const ACTION_LOG_TYPES: [Type; 9] = [
    Type::TEXT,
    Type::UUID,
    Type::INT8,
    Type::TEXT,
    Type::INT4,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
];

/// Buffers completed work and writes it with the checkpoint in one transaction.
pub struct Recorder {
    objects: Arc<Objects>,
    listener: String,
    record: RecordMode,
    log: Vec<NewActionLog>,
    dead: Vec<NewDeadLetter>,
    copy_log: String,
    insert_dead: String,
    audit_mode: Option<AuditMode>,
    audit: Vec<NewAudit>,
    insert_audit: String,
}

impl Recorder {
    pub fn new(objects: Arc<Objects>, listener: &str, record: RecordMode) -> Recorder {
        let copy_log = format!(
            "COPY {} (listener_id, event_id, change_log_pk, observer, action_index, action_type,
                      idempotency_key, outcome, attempts) FROM STDIN (FORMAT binary)",
            objects.action_log.sql()
        );
        let insert_dead = format!(
            "INSERT INTO {} (listener_id, event_id, change_log_pk, event, observer, action_index, action_type,
                             action, idempotency_key, reason, last_error, attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            objects.dead_letters.sql()
        );
        Recorder {
            insert_audit: crate::audit::insert_sql(&objects),
            objects,
            listener: listener.to_string(),
            record,
            log: Vec::new(),
            dead: Vec::new(),
            copy_log,
            insert_dead,
            audit_mode: None,
            audit: Vec::new(),
        }
    }

    /// Also records each completed event in the audit trail (`features.search`).
    pub fn with_audit(mut self, mode: Option<AuditMode>) -> Recorder {
        self.audit_mode = mode;
        self
    }

    /// True when completed events go to the audit trail: the run loop then keeps each event's
    /// outcomes until it completes.
    pub fn audits(&self) -> bool {
        self.audit_mode.is_some()
    }

    /// Buffers one completed event's audit row (dropped unless [`Recorder::audits`]).
    pub fn audit(&mut self, row: NewAudit) {
        if self.audit_mode.is_some() {
            self.audit.push(row);
        }
    }

    /// Buffers one action outcome (filtered by `[action_log] record`).
    pub fn action(&mut self, row: NewActionLog) {
        let keep = match self.record {
            RecordMode::All => true,
            RecordMode::Failures => row.outcome != "delivered" || row.attempts.len() > 1,
            RecordMode::None => false,
        };
        if keep {
            self.log.push(row);
        }
    }

    pub fn dead_letter(&mut self, row: NewDeadLetter) {
        self.dead.push(row);
    }

    /// Moves the buffered work out (the recorder is empty afterwards).
    pub fn take(&mut self) -> Recorded {
        Recorded {
            log: std::mem::take(&mut self.log),
            dead: std::mem::take(&mut self.dead),
            audit: std::mem::take(&mut self.audit),
        }
    }

    /// Adds work taken from another recorder (already filtered by its `record` mode).
    pub fn absorb(&mut self, r: Recorded) {
        self.log.extend(r.log);
        self.dead.extend(r.dead);
        self.audit.extend(r.audit);
    }

    pub fn is_empty(&self) -> bool {
        self.log.is_empty() && self.dead.is_empty() && self.audit.is_empty()
    }

    pub fn buffered(&self) -> usize {
        self.log.len() + self.dead.len() + self.audit.len()
    }

    /// Writes everything buffered (and the checkpoint, when given) in one transaction, fenced
    /// first by the leadership term when given; the buffer is cleared only after the commit
    /// succeeded.
    pub async fn flush(
        &mut self,
        client: &mut tokio_postgres::Client,
        checkpoint: Option<(&dyn CheckpointStore, i64, &Position, &Progress)>,
        fence: Option<&dyn crate::leadership::Term>,
    ) -> Result<(), StoreError> {
        let tx = client.transaction().await?;
        if let Some(term) = fence {
            term.fence(&tx).await?;
        }
        if !self.log.is_empty() {
            // COPY, not INSERT … unnest of arrays: the server reads each row as it arrives
            // instead of building and unpacking nine arrays per transaction (the writer's backend
            // spent much of its time faulting in and unmapping the arrays' memory).
            let sink = tx.copy_in(self.copy_log.as_str()).await?;
            let writer = BinaryCopyInWriter::new(sink, &ACTION_LOG_TYPES);
            futures::pin_mut!(writer);
            for r in &self.log {
                writer
                    .as_mut()
                    .write(&[
                        &self.listener,
                        &r.event_id,
                        &r.change_log_pk,
                        &r.observer,
                        &r.action_index,
                        &r.action_type,
                        &r.idempotency_key,
                        &r.outcome,
                        &Json(r.attempts.as_slice()),
                    ])
                    .await?;
            }
            writer.finish().await?;
        }
        for d in &self.dead {
            let attempts = serde_json::to_value(&d.attempts).unwrap_or(Value::Null);
            tx.execute(
                self.insert_dead.as_str(),
                &[
                    &self.listener,
                    &d.event_id,
                    &d.change_log_pk,
                    &d.event,
                    &d.observer,
                    &d.action_index,
                    &d.action_type,
                    &d.action,
                    &d.idempotency_key,
                    &d.reason,
                    &d.last_error,
                    &attempts,
                ],
            )
            .await?;
        }
        if !self.audit.is_empty() {
            let include_data = self.audit_mode.is_some_and(|m| m.include_data);
            crate::audit::insert(
                &tx,
                &self.insert_audit,
                &self.listener,
                &self.audit,
                include_data,
            )
            .await?;
        }
        if let Some((store, epoch, pos, progress)) = checkpoint {
            store
                .save(&tx, &self.listener, epoch, pos, progress)
                .await?;
        }
        tx.commit().await?;
        self.log.clear();
        self.dead.clear();
        self.audit.clear();
        Ok(())
    }

    pub fn objects(&self) -> &Objects {
        &self.objects
    }
}

/// Parses a stored snapshot column.
pub fn parse_snapshot(listener: &str, text: &str) -> Result<Snapshot, StoreError> {
    text.parse().map_err(
        |e: crate::change_log::SnapshotParseError| StoreError::Corrupt {
            listener: listener.to_string(),
            message: e.to_string(),
        },
    )
}

/// Maps "relation does not exist" to a message that says what to do.
pub fn explain_missing(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(c) if *c == tokio_postgres::error::SqlState::UNDEFINED_TABLE => {
            StoreError::NotMigrated(
                e.as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_default(),
            )
        }
        _ => StoreError::Db(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real server error with `code` (from the shared test Postgres).
    async fn server_error(code: &str) -> tokio_postgres::Error {
        let url = std::env::var("TEST_DATABASE_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test Postgres");
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "DO $$ BEGIN RAISE EXCEPTION 'No space left on device (injected)' USING ERRCODE = '{code}'; END $$"
            ))
            .await
            .expect_err("the DO block raises")
    }

    // Regression (dlq-write-fail fault scenario): a full disk or read-only database made the
    // writer end the run after five failures, which redelivered everything after the checkpoint
    // every few seconds; and the log said only "database: db error".
    #[tokio::test]
    async fn a_refused_write_is_recognised_and_explained() {
        for code in ["53100", "25006", "58030", "40001"] {
            let e = StoreError::Db(server_error(code).await);
            assert!(
                e.is_write_refused(),
                "{code} refuses the write while a condition lasts"
            );
            let text = e.to_string();
            assert!(
                text.contains("No space left on device")
                    && text.contains(&format!("SQLSTATE {code}")),
                "{text}"
            );
        }
        let e = StoreError::Db(server_error("42P01").await);
        assert!(!e.is_write_refused());
    }
}
