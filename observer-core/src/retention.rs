//! The retention policy (`[retention]`): deletes what nobody needs any more, in small batches.
//!
//! * Change-log rows older than `change_log_days` go only once *every* listener with a
//!   checkpoint has processed them: a row is processed by a listener when its `txid` is below the
//!   `xmin` of that listener's `window_lo` (everything below it was visible, hence read, when the
//!   window started). With no checkpoint at all nothing proves a row was processed, so the
//!   change log is left alone. A row whose poison dead letter is still pending is kept too (a
//!   row too large to read is retried from the change log).
//! * Action-log rows older than `action_log_days` (by `finished_at`), and audit-trail rows
//!   (`observer_audit`) of the same age — but never one the search indexer has not indexed yet
//!   (its listener's watermark in `observer_search_index` is below the row's id).
//! * Dead letters only once resolved, `dead_letter_days` after `resolved_at`; pending ones are
//!   never deleted by retention.
//!
//! Each table is deleted from in batches of `batch_size` with a short pause between them, so a
//! pass never holds long locks. Used by `cleanup` and by the daemon's periodic pass.

use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use crate::change_log::Snapshot;
use crate::config::RetentionConfig;
use crate::schema::Objects;

/// The pause between two delete batches.
const PAUSE: Duration = Duration::from_millis(50);

/// What one pass deleted (or, in a dry run, would delete), per table.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RetentionReport {
    pub dry_run: bool,
    pub change_log: u64,
    pub action_log: u64,
    /// Audit-trail rows (`features.search`), by the same age as the action log.
    pub audit: u64,
    pub dead_letters: u64,
    /// The txid below which every listener has processed the change log (`None` when there is
    /// no checkpoint or change-log retention is off).
    pub change_log_horizon: Option<u64>,
    /// Why change-log rows were kept regardless of age, when they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_log_note: Option<String>,
}

/// Why a retention pass did not run, or failed.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// A day count Postgres cannot take (see [`RetentionConfig::MAX_DAYS`]); nothing was deleted.
    #[error("{key}: {days} is out of range: expected 0..={max} days", max = RetentionConfig::MAX_DAYS)]
    Days { key: &'static str, days: u32 },
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Applies `policy` once; `dry_run` counts without deleting. `audit` includes the audit trail
/// (the daemon passes `features.search`, so a daemon without the layer needs no grant on it). A day count over
/// [`RetentionConfig::MAX_DAYS`] is refused before anything is read or deleted.
pub async fn apply(
    client: &impl GenericClient,
    objects: &Objects,
    policy: &RetentionConfig,
    audit: bool,
    dry_run: bool,
) -> Result<RetentionReport, RetentionError> {
    // Checked here as well as in `Config::check`, so no caller can reach SQL with a count that
    // would wrap: `make_interval(days => …)` takes an int4.
    let mut days = [0i32; 3];
    for (slot, (key, d)) in days.iter_mut().zip(policy.days()) {
        *slot = i32::try_from(d)
            .ok()
            .filter(|_| d <= RetentionConfig::MAX_DAYS)
            .ok_or(RetentionError::Days { key, days: d })?;
    }
    let [change_log_days, action_log_days, dead_letter_days] = days;
    let mut report = RetentionReport {
        dry_run,
        ..RetentionReport::default()
    };
    let batch = policy.batch_size.max(1);

    if policy.change_log_days == 0 {
        report.change_log_note = Some("change_log_days = 0: the change log is kept forever".into());
    } else {
        let sql = format!(
            "SELECT listener_id, window_lo::text FROM {}",
            objects.checkpoints.sql()
        );
        let rows = client.query(&sql, &[]).await?;
        let mut horizon: Option<u64> = None;
        let mut unreadable = Vec::new();
        for r in &rows {
            let listener: String = r.get(0);
            let lo: String = r.get(1);
            match lo.parse::<Snapshot>() {
                Ok(s) => horizon = Some(horizon.map_or(s.xmin, |h| h.min(s.xmin))),
                Err(_) => unreadable.push(listener),
            }
        }
        if rows.is_empty() {
            report.change_log_note = Some(format!(
                "no listener has a checkpoint in {}: nothing proves a change-log row was processed, so none is deleted",
                objects.checkpoints
            ));
        } else if !unreadable.is_empty() {
            report.change_log_note = Some(format!(
                "unreadable checkpoint of listener(s) {}: the change log is kept",
                unreadable.join(", ")
            ));
        } else if let Some(h) = horizon {
            report.change_log_horizon = Some(h);
            // A row with a pending poison dead letter (no observer) is kept: for a row over
            // `listener.max_row_bytes` the dead letter holds everything but the images, which
            // only the change log has, and `dlq retry` reads them from there.
            let cond = format!(
                "created_at < now() - make_interval(days => $1) AND txid < $2::text::xid8
                 AND NOT EXISTS (SELECT 1 FROM {dl} d WHERE d.event_id = {cl}.id
                                 AND d.status = 'pending' AND d.observer IS NULL)",
                dl = objects.dead_letters.sql(),
                cl = objects.change_log.sql()
            );
            let days = change_log_days;
            let h = h.to_string();
            report.change_log = purge(
                client,
                &objects.change_log.sql(),
                "pk_entity_change_log",
                &cond,
                &[&days, &h],
                batch,
                dry_run,
            )
            .await?;
        }
    }

    if policy.action_log_days > 0 {
        let days = action_log_days;
        let cond = "finished_at < now() - make_interval(days => $1)";
        report.action_log = purge(
            client,
            &objects.action_log.sql(),
            "id",
            cond,
            &[&days],
            batch,
            dry_run,
        )
        .await?;
    }
    if audit && policy.action_log_days > 0 {
        let present: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&objects.audit.sql()],
            )
            .await?
            .get(0);
        if present {
            let days = action_log_days;
            let cond = format!(
                "finished_at < now() - make_interval(days => $1)
                 AND NOT EXISTS (SELECT 1 FROM {w} w WHERE w.listener_id = {a}.listener_id AND w.indexed_id < {a}.id)",
                w = objects.search_index.sql(),
                a = objects.audit.sql()
            );
            report.audit = purge(
                client,
                &objects.audit.sql(),
                "id",
                &cond,
                &[&days],
                batch,
                dry_run,
            )
            .await?;
        }
    }
    if policy.dead_letter_days > 0 {
        let days = dead_letter_days;
        let cond = "status = 'resolved' AND resolved_at < now() - make_interval(days => $1)";
        report.dead_letters = purge(
            client,
            &objects.dead_letters.sql(),
            "id",
            cond,
            &[&days],
            batch,
            dry_run,
        )
        .await?;
    }
    Ok(report)
}

/// Deletes the rows of `table` matching `cond` in batches (or counts them in a dry run).
async fn purge(
    client: &impl GenericClient,
    table: &str,
    key: &str,
    cond: &str,
    params: &[&(dyn ToSql + Sync)],
    batch: i64,
    dry_run: bool,
) -> Result<u64, tokio_postgres::Error> {
    if dry_run {
        let sql = format!("SELECT count(*) FROM {table} WHERE {cond}");
        let n: i64 = client.query_one(&sql, params).await?.get(0);
        return Ok(n as u64);
    }
    let n_param = params.len() + 1;
    let sql = format!(
        "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {cond} ORDER BY {key} LIMIT ${n_param})"
    );
    let mut all: Vec<&(dyn ToSql + Sync)> = params.to_vec();
    all.push(&batch);
    let mut total = 0u64;
    loop {
        let n = client.execute(&sql, &all).await?;
        total += n;
        if (n as i64) < batch {
            return Ok(total);
        }
        tokio::time::sleep(PAUSE).await;
    }
}
