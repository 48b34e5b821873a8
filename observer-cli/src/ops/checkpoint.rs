//! `checkpoint show|set`: read or move a listener's position.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{ArgGroup, Args, Subcommand};
use observer_core::change_log::{ChangeLog, ChangeRow, Position, ReadLimits, Snapshot};
use uuid::Uuid;

use super::{checkpoints, db_err, or_dash, print_json, require_migrated};
use crate::app::App;

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// The stored checkpoint row of the listener.
    Show {
        /// Default: `[listener] id` of the config.
        #[arg(long)]
        listener: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Move the listener's position (bumps the epoch, so a running instance is fenced).
    Set(SetArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("to").required(true).args(["event_id", "beginning", "now"])))]
pub struct SetArgs {
    /// Delivery resumes at this event: it and every change written by its transaction or later
    /// ones are delivered again.
    #[arg(long, value_name = "UUID")]
    event_id: Option<Uuid>,
    /// Deliver every row of the change log again.
    #[arg(long)]
    beginning: bool,
    /// Skip everything committed so far: only later changes are delivered.
    #[arg(long)]
    now: bool,
    /// Default: `[listener] id` of the config.
    #[arg(long)]
    listener: Option<String>,
    /// Apply the change (without it, only show what would be written).
    #[arg(long)]
    yes: bool,
    /// Set it even though a daemon is active on the listener (it is then fenced and stops).
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Option<&Path>, cmd: CheckpointCommand) -> Result<ExitCode> {
    let app = App::load(config)?;
    let client = app.connect().await?;
    require_migrated(&client, &app.objects).await?;
    match cmd {
        CheckpointCommand::Show { listener, json } => {
            let listener = listener.unwrap_or_else(|| app.config.listener.id.clone());
            let Some(row) = checkpoints(&client, &app.objects, Some(&listener))
                .await?
                .into_iter()
                .next()
            else {
                bail!("no checkpoint for listener {listener}: the daemon has not run with features.checkpoint on");
            };
            if json {
                print_json(&row)?;
            } else {
                println!("listener          {}", row.listener);
                println!("window_lo         {}", row.window_lo);
                println!("window_hi         {}", row.window_hi);
                println!("after_pk          {}", row.after_pk);
                println!("epoch             {}", row.epoch);
                println!("owner             {}", or_dash(&row.owner));
                println!(
                    "heartbeat_at      {} ({})",
                    or_dash(&row.heartbeat_at.map(|t| t.to_rfc3339())),
                    row.state()
                );
                println!("last_event_id     {}", or_dash(&row.last_event_id));
                println!("last_event_pk     {}", or_dash(&row.last_event_pk));
                println!(
                    "last_event_at     {}",
                    or_dash(&row.last_event_at.map(|t| t.to_rfc3339()))
                );
                println!("events_processed  {}", row.events_processed);
                println!("last_error        {}", or_dash(&row.last_error));
                println!("updated_at        {}", row.updated_at.to_rfc3339());
            }
            Ok(ExitCode::SUCCESS)
        }
        CheckpointCommand::Set(a) => set(&app, &client, a).await,
    }
}

async fn set(app: &App, client: &tokio_postgres::Client, a: SetArgs) -> Result<ExitCode> {
    let listener = a
        .listener
        .clone()
        .unwrap_or_else(|| app.config.listener.id.clone());
    let current = checkpoints(client, &app.objects, Some(&listener))
        .await?
        .into_iter()
        .next();
    if let Some(c) = &current {
        if c.alive() && !a.force {
            bail!(
                "listener {listener} is active (owner {}, holding the listener lock): the running daemon \
                 would overwrite the checkpoint. Stop it first, or pass --force to fence it",
                or_dash(&c.owner)
            );
        }
    }
    let now = ChangeLog::current_snapshot(client).await?;
    let (pos, what) = if let Some(id) = a.event_id {
        let log = ChangeLog::new(app.objects.change_log.clone())
            .with_limits(ReadLimits::from_config(&app.config.listener));
        match log.read_event(client, id).await.map_err(db_err)? {
            Some(ChangeRow::Event(e)) => (
                Position::replay_from(e.txid, now),
                format!("event {id} (pk {}, txid {})", e.pk, e.txid),
            ),
            Some(ChangeRow::Poison { reason, .. }) => {
                bail!("event {id} is a poison row ({reason}): its transaction id is unknown; pick another event")
            }
            None => bail!("no event {id} in {}", app.objects.change_log),
        }
    } else if a.beginning {
        (
            Position {
                lo: Snapshot {
                    xmin: 1,
                    xmax: 1,
                    xip: vec![],
                },
                hi: now,
                after_pk: 0,
            },
            "the beginning of the change log".into(),
        )
    } else {
        (
            Position::at(now),
            "now (everything committed so far is skipped)".into(),
        )
    };
    let plan = serde_json::json!({
        "listener": listener, "to": what, "window_lo": pos.lo.to_string(), "window_hi": pos.hi.to_string(),
        "after_pk": pos.after_pk, "previous": current.as_ref().map(|c| serde_json::json!({
            "window_lo": c.window_lo, "window_hi": c.window_hi, "after_pk": c.after_pk, "epoch": c.epoch })),
    });
    if !a.yes {
        if a.json {
            print_json(&serde_json::json!({ "applied": false, "plan": plan }))?;
        } else {
            println!(
                "would set the checkpoint of {listener} to {what}: window {} .. {} after pk {}",
                pos.lo, pos.hi, pos.after_pk
            );
            println!("nothing changed: pass --yes to apply");
        }
        return Ok(ExitCode::FAILURE);
    }
    let owner = format!("checkpoint set ({})", std::process::id());
    let sql = format!(
        "INSERT INTO {t} (listener_id, window_lo, window_hi, after_pk, owner, epoch)
         VALUES ($1, $2::text::pg_snapshot, $3::text::pg_snapshot, $4, $5, 1)
         ON CONFLICT (listener_id) DO UPDATE
            SET window_lo = EXCLUDED.window_lo, window_hi = EXCLUDED.window_hi, after_pk = EXCLUDED.after_pk,
                owner = EXCLUDED.owner, epoch = {t}.epoch + 1, updated_at = now()
         RETURNING epoch",
        t = app.objects.checkpoints.sql()
    );
    let epoch: i64 = client
        .query_one(
            &sql,
            &[
                &listener,
                &pos.lo.to_string(),
                &pos.hi.to_string(),
                &pos.after_pk,
                &owner,
            ],
        )
        .await
        .map_err(db_err)?
        .get(0);
    if a.json {
        print_json(&serde_json::json!({ "applied": true, "epoch": epoch, "plan": plan }))?;
    } else {
        println!(
            "checkpoint of {listener} set to {what}: window {} .. {} after pk {} (epoch {epoch})",
            pos.lo, pos.hi, pos.after_pk
        );
    }
    Ok(ExitCode::SUCCESS)
}
