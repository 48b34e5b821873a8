//! `status`: is the listener running, where is it, how far behind, what is in the DLQ.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use chrono::Utc;
use clap::Args;
use observer_core::change_log::ChangeLog;

use super::{checkpoints, db_err, or_dash, print_json, require_migrated, CheckpointRow};
use crate::app::App;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The listener to report on (default: `[listener] id` of the config).
    #[arg(long, conflicts_with = "all")]
    listener: Option<String>,
    /// Report on every listener with a checkpoint row.
    #[arg(long)]
    all: bool,
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct ListenerStatus {
    listener: String,
    owner: Option<String>,
    epoch: i64,
    state: String,
    alive: bool,
    heartbeat_at: Option<chrono::DateTime<Utc>>,
    position: Position,
    lag_events: i64,
    lag_seconds: f64,
    oldest_unprocessed_at: Option<chrono::DateTime<Utc>>,
    dead_letters: DeadLetterCounts,
    last_error: Option<String>,
    last_error_at: Option<chrono::DateTime<Utc>>,
}

#[derive(Debug, serde::Serialize)]
struct Position {
    window_lo: String,
    window_hi: String,
    after_pk: i64,
    last_event_id: Option<uuid::Uuid>,
    last_event_pk: Option<i64>,
    last_event_at: Option<chrono::DateTime<Utc>>,
    events_processed: i64,
}

#[derive(Debug, serde::Serialize)]
struct DeadLetterCounts {
    pending: i64,
    resolved: i64,
}

pub async fn run(config: Option<&Path>, args: StatusArgs) -> Result<ExitCode> {
    let app = App::load(config)?;
    let client = app.connect().await?;
    require_migrated(&client, &app.objects).await?;
    let listener = args
        .listener
        .clone()
        .unwrap_or_else(|| app.config.listener.id.clone());
    let rows = checkpoints(
        &client,
        &app.objects,
        (!args.all).then_some(listener.as_str()),
    )
    .await?;
    if rows.is_empty() {
        if args.all {
            bail!(
                "no checkpoint rows in {}: no daemon has run with features.checkpoint on",
                app.objects.checkpoints
            );
        }
        bail!("no checkpoint for listener {listener}: the daemon has not run with features.checkpoint on");
    }
    let log = ChangeLog::new(app.objects.change_log.clone());
    let mut out = Vec::new();
    for row in rows {
        out.push(status_of(&client, &app, &log, row).await?);
    }
    if args.json {
        if args.all {
            print_json(&serde_json::json!({ "listeners": out }))?;
        } else {
            print_json(&out[0])?;
        }
    } else {
        for (i, s) in out.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print_text(s);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn status_of(
    client: &tokio_postgres::Client,
    app: &App,
    log: &ChangeLog,
    row: CheckpointRow,
) -> Result<ListenerStatus> {
    let pos = row.position()?;
    let (lag_events, oldest) = log.backlog(client, &pos).await.map_err(db_err)?;
    let lag_seconds = oldest
        .map(|t| ((Utc::now() - t).num_milliseconds() as f64 / 1000.0).max(0.0))
        .unwrap_or(0.0);
    let sql = format!(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'resolved')
         FROM {} WHERE listener_id = $1",
        app.objects.dead_letters.sql()
    );
    let dl = client
        .query_one(&sql, &[&row.listener])
        .await
        .map_err(db_err)?;
    Ok(ListenerStatus {
        state: row.state(),
        alive: row.alive(),
        heartbeat_at: row.heartbeat_at,
        position: Position {
            window_lo: row.window_lo.clone(),
            window_hi: row.window_hi.clone(),
            after_pk: row.after_pk,
            last_event_id: row.last_event_id,
            last_event_pk: row.last_event_pk,
            last_event_at: row.last_event_at,
            events_processed: row.events_processed,
        },
        lag_events,
        lag_seconds,
        oldest_unprocessed_at: oldest,
        dead_letters: DeadLetterCounts {
            pending: dl.get(0),
            resolved: dl.get(1),
        },
        listener: row.listener,
        owner: row.owner,
        epoch: row.epoch,
        last_error: row.last_error,
        last_error_at: row.last_error_at,
    })
}

fn print_text(s: &ListenerStatus) {
    let p = &s.position;
    println!("listener      {}", s.listener);
    println!("state         {}", s.state);
    println!("owner         {} (epoch {})", or_dash(&s.owner), s.epoch);
    println!(
        "window        {} .. {} after pk {}",
        p.window_lo, p.window_hi, p.after_pk
    );
    println!(
        "last event    {} (pk {}, at {})",
        or_dash(&p.last_event_id),
        or_dash(&p.last_event_pk),
        or_dash(&p.last_event_at.map(|t| t.to_rfc3339()))
    );
    println!("processed     {} events", p.events_processed);
    println!(
        "lag           {} events, {:.1}s",
        s.lag_events, s.lag_seconds
    );
    println!(
        "dead letters  {} pending, {} resolved",
        s.dead_letters.pending, s.dead_letters.resolved
    );
    match (&s.last_error, &s.last_error_at) {
        (Some(e), at) => println!(
            "last error    {e} (at {})",
            or_dash(&at.map(|t| t.to_rfc3339()))
        ),
        (None, _) => println!("last error    -"),
    }
}
