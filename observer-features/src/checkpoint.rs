//! Persistent checkpoints (cargo feature `checkpoint`): the listener's position in Postgres.
//!
//! A position is a snapshot pair plus a pk inside that window (see `change_log.rs`), so a crash
//! or restart resumes exactly after the last completed event and never skips a transaction that
//! committed late. Every save is fenced by an epoch taken when the listener was claimed: an
//! instance that lost its claim cannot move the checkpoint any more.

use observer_core::change_log::Position;
use observer_core::schema::TableName;
use observer_core::store::{
    explain_missing, parse_snapshot, CheckpointStore, Progress, StoreError,
};
use tokio_postgres::Transaction;

/// Checkpoints in `<schema>.observer_checkpoints`.
pub struct PostgresCheckpointStore {
    load: String,
    claim: String,
    save: String,
}

impl PostgresCheckpointStore {
    pub fn new(table: &TableName) -> PostgresCheckpointStore {
        let t = table.sql();
        PostgresCheckpointStore {
            load: format!("SELECT window_lo::text, window_hi::text, after_pk FROM {t} WHERE listener_id = $1"),
            claim: format!(
                "INSERT INTO {t} (listener_id, window_lo, window_hi, after_pk, owner, epoch, heartbeat_at)
                 VALUES ($1, $2::text::pg_snapshot, $3::text::pg_snapshot, $4, $5, 1, now())
                 ON CONFLICT (listener_id) DO UPDATE
                    SET epoch = {t}.epoch + 1, owner = EXCLUDED.owner, heartbeat_at = now(), updated_at = now()
                 RETURNING epoch"
            ),
            save: format!(
                "UPDATE {t} SET window_lo = $3::text::pg_snapshot, window_hi = $4::text::pg_snapshot, after_pk = $5,
                        last_event_id = COALESCE($6, last_event_id), last_event_pk = COALESCE($7, last_event_pk),
                        last_event_at = COALESCE($8, last_event_at),
                        events_processed = events_processed + $9,
                        last_error = COALESCE($10, last_error), last_error_at = COALESCE($11, last_error_at),
                        heartbeat_at = now(), updated_at = now()
                 WHERE listener_id = $1 AND epoch = $2"
            ),
        }
    }
}

#[async_trait::async_trait]
impl CheckpointStore for PostgresCheckpointStore {
    async fn load(
        &self,
        client: &tokio_postgres::Client,
        listener: &str,
    ) -> Result<Option<Position>, StoreError> {
        let row = client
            .query_opt(self.load.as_str(), &[&listener])
            .await
            .map_err(explain_missing)?;
        let Some(row) = row else { return Ok(None) };
        let lo: String = row.get(0);
        let hi: String = row.get(1);
        Ok(Some(Position {
            lo: parse_snapshot(listener, &lo)?,
            hi: parse_snapshot(listener, &hi)?,
            after_pk: row.get(2),
        }))
    }

    async fn claim(
        &self,
        client: &tokio_postgres::Client,
        listener: &str,
        owner: &str,
        start: &Position,
    ) -> Result<i64, StoreError> {
        let row = client
            .query_one(
                self.claim.as_str(),
                &[
                    &listener,
                    &start.lo.to_string(),
                    &start.hi.to_string(),
                    &start.after_pk,
                    &owner,
                ],
            )
            .await
            .map_err(explain_missing)?;
        Ok(row.get(0))
    }

    async fn save(
        &self,
        tx: &Transaction<'_>,
        listener: &str,
        epoch: i64,
        pos: &Position,
        progress: &Progress,
    ) -> Result<(), StoreError> {
        let (id, pk, at) = match progress.last_event {
            Some((id, pk, at)) => (Some(id), Some(pk), Some(at)),
            None => (None, None, None),
        };
        let (err, err_at) = match &progress.last_error {
            Some((e, at)) => (Some(e.as_str()), Some(*at)),
            None => (None, None),
        };
        // events_processed is cumulative across runs: add what this run completed since the last save.
        let delta = progress.events - progress.saved_events;
        let n = tx
            .execute(
                self.save.as_str(),
                &[
                    &listener,
                    &epoch,
                    &pos.lo.to_string(),
                    &pos.hi.to_string(),
                    &pos.after_pk,
                    &id,
                    &pk,
                    &at,
                    &delta,
                    &err,
                    &err_at,
                ],
            )
            .await
            .map_err(explain_missing)?;
        if n == 0 {
            return Err(StoreError::Fenced {
                listener: listener.to_string(),
                epoch,
            });
        }
        Ok(())
    }
}
