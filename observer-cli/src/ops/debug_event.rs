//! `debug-event`: why an event did (not) trigger each observer, and what became of its actions.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use observer_core::change_log::{ChangeLog, ChangeRow, Position, ReadLimits};
use observer_core::event::ChangeEvent;
use observer_core::executor::idempotency_key;
use observer_core::observer::{MatchVerdict, Observers};
use uuid::Uuid;

use super::{checkpoints, db_err, observers_for_inspection, print_json, require_migrated, shown};
use crate::app::App;

#[derive(Debug, Args)]
pub struct DebugEventArgs {
    /// The event id (`id` of the change-log row).
    #[arg(required_unless_present = "history", conflicts_with = "history")]
    event_id: Option<Uuid>,
    /// Instead of one event, the newest N events of the change log.
    #[arg(long, value_name = "N")]
    history: Option<i64>,
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct EventReport {
    change_log_pk: i64,
    event_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<ChangeEvent>,
    /// Set for a row that cannot be decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    poison: Option<Poison>,
    /// Whether the listener's checkpoint is past this row (`None` without a checkpoint).
    processed: Option<bool>,
    observers: Vec<ObserverReport>,
    /// Action-log rows of observers/actions not in the current config.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    other_outcomes: Vec<serde_json::Value>,
    dead_letters: Vec<serde_json::Value>,
}

#[derive(Debug, serde::Serialize)]
struct Poison {
    reason: String,
    raw: serde_json::Value,
}

#[derive(Debug, serde::Serialize)]
struct ObserverReport {
    observer: String,
    verdict: MatchVerdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    condition: Option<String>,
    actions: Vec<ActionReport>,
}

#[derive(Debug, serde::Serialize)]
struct ActionReport {
    index: usize,
    #[serde(rename = "type")]
    kind: String,
    idempotency_key: String,
    /// `delivered`, `dead_lettered`, `not processed yet (after the checkpoint)` or `no outcome recorded`.
    status: String,
    outcomes: Vec<serde_json::Value>,
}

pub async fn run(config: Option<&Path>, args: DebugEventArgs) -> Result<ExitCode> {
    let app = App::load(config)?;
    let client = app.connect().await?;
    require_migrated(&client, &app.objects).await?;
    let observers = observers_for_inspection(&app)?;
    let log = ChangeLog::new(app.objects.change_log.clone())
        .with_limits(ReadLimits::from_config(&app.config.listener));
    let rows = match (args.event_id, args.history) {
        (Some(id), _) => match log.read_event(&client, id).await.map_err(db_err)? {
            Some(r) => vec![r],
            None => bail!("no event {id} in {}", app.objects.change_log),
        },
        (None, Some(n)) => log.read_latest(&client, n.max(0)).await.map_err(db_err)?,
        (None, None) => bail!("give an event id or --history N"),
    };
    let listener = app.config.listener.id.clone();
    let position = match checkpoints(&client, &app.objects, Some(&listener))
        .await?
        .into_iter()
        .next()
    {
        Some(c) => Some(c.position()?),
        None => None,
    };
    let mut reports = Vec::new();
    for row in rows {
        reports.push(report(&client, &app, &observers, position.as_ref(), row).await?);
    }
    if args.json {
        if args.event_id.is_some() {
            print_json(&reports[0])?;
        } else {
            print_json(&serde_json::json!({ "listener": listener, "events": reports }))?;
        }
    } else {
        if reports.is_empty() {
            println!("the change log {} is empty", app.objects.change_log);
        }
        for (i, r) in reports.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print_text(r, position.is_some(), &listener);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `pos` is past the row of transaction `txid` with pk `pk`.
fn is_done(pos: &Position, txid: u64, pk: i64) -> bool {
    pos.lo.is_visible(txid) || (pos.hi.is_visible(txid) && pk <= pos.after_pk)
}

async fn report(
    client: &tokio_postgres::Client,
    app: &App,
    observers: &Observers,
    position: Option<&Position>,
    row: ChangeRow,
) -> Result<EventReport> {
    let dl_sql = format!(
        "SELECT jsonb_build_object('id', id, 'status', status, 'observer', observer, 'action_index', action_index,
                'reason', reason, 'last_error', last_error, 'attempts', attempts, 'manual_retries', manual_retries,
                'idempotency_key', idempotency_key, 'created_at', created_at, 'resolved_at', resolved_at)
         FROM {} WHERE change_log_pk = $1 OR event_id = $2 ORDER BY id",
        app.objects.dead_letters.sql()
    );
    let event = match row {
        ChangeRow::Event(e) => e,
        ChangeRow::Poison {
            pk,
            event_id,
            raw,
            reason,
        } => {
            let dead = client
                .query(&dl_sql, &[&pk, &event_id])
                .await
                .map_err(db_err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            return Ok(EventReport {
                change_log_pk: pk,
                event_id,
                event: None,
                poison: Some(Poison { reason, raw }),
                processed: None,
                observers: vec![],
                other_outcomes: vec![],
                dead_letters: dead,
            });
        }
    };
    let processed = position.map(|p| is_done(p, event.txid, event.pk));
    let log_sql = format!(
        "SELECT observer, action_index, jsonb_build_object('id', id, 'listener', listener_id, 'observer', observer,
                'action_index', action_index, 'type', action_type, 'outcome', outcome, 'attempts', attempts,
                'idempotency_key', idempotency_key, 'finished_at', finished_at)
         FROM {} WHERE change_log_pk = $1 AND event_id = $2 ORDER BY id",
        app.objects.action_log.sql()
    );
    let mut logged: Vec<(String, i32, serde_json::Value, bool)> = client
        .query(&log_sql, &[&event.pk, &event.id])
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), false))
        .collect();
    let mut reports = Vec::new();
    for o in &observers.list {
        let verdict = o.verdict(&event);
        let mut actions = Vec::new();
        if verdict.scheduled() {
            for (i, a) in o.actions.iter().enumerate() {
                let mut outcomes = Vec::new();
                for l in logged
                    .iter_mut()
                    .filter(|l| l.0 == o.name && l.1 == i as i32)
                {
                    l.3 = true;
                    outcomes.push(l.2.clone());
                }
                let status = match outcomes
                    .last()
                    .and_then(|v| v.get("outcome"))
                    .and_then(|v| v.as_str())
                {
                    Some(s) => s.to_string(),
                    None if processed == Some(false) => {
                        "not processed yet (after the checkpoint)".into()
                    }
                    None => "no outcome recorded".into(),
                };
                actions.push(ActionReport {
                    index: i,
                    kind: a.action.kind().into(),
                    idempotency_key: idempotency_key(event.id, &o.name, i),
                    status,
                    outcomes,
                });
            }
        }
        reports.push(ObserverReport {
            observer: o.name.clone(),
            condition: o.condition.as_ref().map(|c| c.source().to_string()),
            verdict,
            actions,
        });
    }
    let dead = client
        .query(&dl_sql, &[&event.pk, &Some(event.id)])
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(EventReport {
        change_log_pk: event.pk,
        event_id: Some(event.id),
        processed,
        observers: reports,
        other_outcomes: logged.into_iter().filter(|l| !l.3).map(|l| l.2).collect(),
        dead_letters: dead,
        event: Some(event),
        poison: None,
    })
}

fn print_text(r: &EventReport, has_checkpoint: bool, listener: &str) {
    match (&r.event, &r.poison) {
        (Some(e), _) => println!(
            "event {} (pk {}): {} {} {} at {}",
            e.id,
            e.pk,
            e.operation,
            shown(&e.entity),
            shown(e.entity_id.as_deref().unwrap_or("-")),
            e.created_at.to_rfc3339()
        ),
        (None, Some(p)) => {
            println!(
                "change-log row pk {} (event {}): POISON — {}",
                r.change_log_pk,
                r.event_id
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "?".into()),
                shown(&p.reason)
            );
            println!("  raw: {}", shown(&p.raw.to_string()));
        }
        (None, None) => {}
    }
    match r.processed {
        Some(true) => println!("  checkpoint of `{listener}`: processed"),
        Some(false) => {
            println!("  checkpoint of `{listener}`: not processed yet (after the checkpoint)")
        }
        None if r.poison.is_none() && !has_checkpoint => {
            println!("  no checkpoint for listener `{listener}`")
        }
        None => {}
    }
    for o in &r.observers {
        let why = match o.verdict {
            MatchVerdict::Matched => "matched".to_string(),
            MatchVerdict::ConditionAtDelivery => format!(
                "matched on entity and operation; condition needs enrichment; evaluated at delivery ({})",
                o.condition.as_deref().unwrap_or("")
            ),
            MatchVerdict::OtherEntity => "not matched: other entity".into(),
            MatchVerdict::OtherOperation => "not matched: other operation".into(),
            MatchVerdict::ConditionFalse => {
                format!(
                    "not matched: condition false ({})",
                    o.condition.as_deref().unwrap_or("")
                )
            }
        };
        println!("  observer {}: {}", o.observer, shown(&why));
        for a in &o.actions {
            println!(
                "    action {} ({}) key {}: {}",
                a.index, a.kind, a.idempotency_key, a.status
            );
            for out in &a.outcomes {
                for at in out
                    .get("attempts")
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                {
                    println!(
                        "      attempt {} at {} status {} {}{}",
                        at.get("attempt").unwrap_or(&serde_json::Value::Null),
                        at.get("at").and_then(|v| v.as_str()).unwrap_or("-"),
                        at.get("status")
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "-".into()),
                        at.get("result").and_then(|v| v.as_str()).unwrap_or("-"),
                        at.get("error")
                            .and_then(|v| v.as_str())
                            .map(|e| format!(": {}", shown(e)))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    for o in &r.other_outcomes {
        println!(
            "  recorded outcome of an observer/action not in the config: {}",
            shown(&o.to_string())
        );
    }
    for d in &r.dead_letters {
        println!(
            "  dead letter #{} [{}] {} {}: {}",
            d.get("id").unwrap_or(&serde_json::Value::Null),
            d.get("status").and_then(|v| v.as_str()).unwrap_or("-"),
            shown(
                d.get("observer")
                    .and_then(|v| v.as_str())
                    .unwrap_or("(poison event)")
            ),
            shown(d.get("reason").and_then(|v| v.as_str()).unwrap_or("-")),
            shown(d.get("last_error").and_then(|v| v.as_str()).unwrap_or("-"))
        );
    }
}
