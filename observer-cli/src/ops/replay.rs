//! `replay`: a backfill in this process. Reads a range of the change log in pk order, runs every
//! matching action with its retry policy and the daemon's idempotency keys, and records outcomes
//! (action log, dead letters) like the daemon does. The checkpoint is not touched.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, Utc};
use clap::Args;
use observer_core::change_log::{ChangeLog, ChangeRow, ReadLimits};
use observer_core::redeliver::{self, Outcome};
use observer_core::store::Recorder;
use uuid::Uuid;

use super::{db_err, executor, observers, print_json, require_migrated};
use crate::app::App;

const PAGE: i64 = 1000;

#[derive(Debug, Args)]
#[command(
    after_help = "Rows are read in pk order from --from (inclusive) up to --to (inclusive for an event id, \
exclusive for a time), or up to the newest row when replay starts. Every action of every matching observer is \
executed with its retry policy and the same idempotency key as the daemon's delivery; failures are dead-lettered \
(retries_exhausted / permanent_failure). Poison rows are reported and skipped (the daemon dead-lettered them). \
The checkpoint is not changed."
)]
pub struct ReplayArgs {
    /// An RFC 3339 time (rows created at or after it) or an event UUID (from that event's row on).
    #[arg(long)]
    from: String,
    /// An RFC 3339 time (rows created before it) or an event UUID (up to and including its row).
    #[arg(long)]
    to: Option<String>,
    /// Only this observer.
    #[arg(long)]
    observer: Option<String>,
    /// Only count what would run.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

enum Bound {
    Time(DateTime<Utc>),
    Pk(i64),
}

async fn bound(
    log: &ChangeLog,
    client: &tokio_postgres::Client,
    text: &str,
    flag: &str,
) -> Result<Bound> {
    if let Ok(id) = Uuid::parse_str(text) {
        return match log.read_event(client, id).await.map_err(db_err)? {
            Some(r) => Ok(Bound::Pk(r.pk())),
            None => bail!("{flag}: no event {id} in {}", log.table()),
        };
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| Bound::Time(t.with_timezone(&Utc)))
        .map_err(|_| anyhow!("{flag}: `{text}` is neither an event UUID nor an RFC 3339 time"))
}

#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    dry_run: bool,
    events_read: u64,
    events_matched: u64,
    poison_skipped: u64,
    deliveries: u64,
    delivered: u64,
    dead_lettered: u64,
}

pub async fn run(config: Option<&Path>, a: ReplayArgs) -> Result<ExitCode> {
    let app = App::load(config)?;
    let mut client = app.connect().await?;
    require_migrated(&client, &app.objects).await?;
    let observers = observers(&app)?;
    if let Some(o) = &a.observer {
        if observers.get(o).is_none() {
            bail!("no enabled observer `{o}` in the configuration");
        }
    }
    let log = ChangeLog::new(app.objects.change_log.clone())
        .with_limits(ReadLimits::from_config(&app.config.listener));
    let (mut after_pk, from_time) = match bound(&log, &client, &a.from, "--from").await? {
        Bound::Pk(pk) => (pk - 1, None),
        Bound::Time(t) => (0, Some(t)),
    };
    let (mut to_pk, to_time) = match &a.to {
        Some(t) => match bound(&log, &client, t, "--to").await? {
            Bound::Pk(pk) => (Some(pk), None),
            Bound::Time(t) => (None, Some(t)),
        },
        None => (None, None),
    };
    if to_pk.is_none() {
        // Fix the end now, so a busy change log cannot keep the replay running forever.
        let sql = format!(
            "SELECT max(pk_entity_change_log) FROM {}",
            app.objects.change_log.sql()
        );
        to_pk = Some(
            client
                .query_one(&sql, &[])
                .await
                .map_err(db_err)?
                .get::<_, Option<i64>>(0)
                .unwrap_or(0),
        );
    }
    let mut exec = if a.dry_run {
        None
    } else {
        Some(executor(&app)?)
    };
    let mut recorder = Recorder::new(
        app.objects.clone(),
        &app.config.listener.id,
        app.config.action_log.record,
    );
    let mut s = Summary {
        dry_run: a.dry_run,
        ..Summary::default()
    };
    loop {
        let rows = log
            .read_range(&client, after_pk, to_pk, from_time, to_time, PAGE)
            .await
            .map_err(db_err)?;
        let Some(last) = rows.last() else { break };
        after_pk = last.pk();
        for row in rows {
            s.events_read += 1;
            if s.events_read.is_multiple_of(1000) {
                eprintln!(
                    "… {} events read, {} matched, {} delivered, {} dead-lettered",
                    s.events_read, s.events_matched, s.delivered, s.dead_lettered
                );
            }
            let event = match row {
                ChangeRow::Event(e) => std::sync::Arc::new(e),
                ChangeRow::Poison { pk, reason, .. } => {
                    s.poison_skipped += 1;
                    eprintln!(
                        "skipping poison change-log row {pk}: {}",
                        super::shown(&reason)
                    );
                    continue;
                }
            };
            let deliveries = redeliver::deliveries_for(&observers, &event, a.observer.as_deref());
            if deliveries.is_empty() {
                continue;
            }
            s.events_matched += 1;
            s.deliveries += deliveries.len() as u64;
            let Some(exec) = exec.as_mut() else { continue };
            for (obs, index) in deliveries {
                let r = redeliver::deliver(exec, event.clone(), obs, index, 1)
                    .await
                    .map_err(|e| anyhow!("event {}: {e}", event.id))?;
                if r.outcome == Outcome::Delivered {
                    s.delivered += 1;
                } else {
                    s.dead_lettered += 1;
                }
                if let Some(d) = r.dead_letter() {
                    recorder.dead_letter(d);
                }
                recorder.action(r.action_log());
            }
        }
        if !recorder.is_empty() {
            recorder.flush(&mut client, None, None).await?;
        }
    }
    if a.json {
        print_json(&s)?;
    } else if a.dry_run {
        println!(
            "dry run: {} events read, {} matched, {} deliveries would run; {} poison rows skipped",
            s.events_read, s.events_matched, s.deliveries, s.poison_skipped
        );
    } else {
        println!(
            "replayed {} events: {} matched, {} deliveries ({} delivered, {} dead-lettered); {} poison rows skipped",
            s.events_read, s.events_matched, s.deliveries, s.delivered, s.dead_lettered, s.poison_skipped
        );
    }
    Ok(ExitCode::SUCCESS)
}
