//! `dlq stats|list|show|retry|retry-all|purge`: the dead-letter queue.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use observer_core::change_log::{ChangeLog, ChangeRow, ReadLimits};
use observer_core::config::RetentionConfig;
use observer_core::event::ChangeEvent;
use observer_core::executor::BoxExecutor;
use observer_core::observer::Observers;
use observer_core::redeliver::{self, Outcome};
use serde_json::{json, Value};

use super::{db_err, executor, observers, print_json, require_migrated, shown};
use crate::app::App;

const RETRY_HELP: &str = "\
Retry semantics: the dead letter's event is delivered again with the CURRENT config's observer of \
the same name and the same action index (so a corrected URL or secret is used), through the same \
executor stack as the daemon (without the queue layer: a dead-lettered job runs in this process) and with the stored idempotency key (the one of the original \
delivery). The action's retry policy applies in this process: up to max_attempts attempts with its \
backoff between them, honouring Retry-After. On success the row becomes `resolved` (resolved_at set), \
manual_retries is incremented, the new attempts are appended to `attempts`, and a `delivered` row is \
written to the action log. On failure it stays `pending` with manual_retries incremented, the \
attempts appended and last_error updated. If the observer or action no longer exists, the row is \
reported and left untouched. A poison-event row (no observer) re-reads its change-log row: if it \
now decodes, it is delivered to every observer that matches (resolved when all deliveries \
succeed, or when none matches); if it is still poison, the reason is shown and it stays pending.";

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Counts by status, by observer and reason, and the age of the oldest pending entry.
    Stats(JsonArg),
    /// List dead letters (newest last).
    List(ListArgs),
    /// Everything about one dead letter: the action as stored, the attempts and the event.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Deliver one dead letter again; exit 1 if it still fails.
    #[command(after_help = RETRY_HELP)]
    Retry {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Retry every pending dead letter (of one observer); exit 1 if any still fails.
    #[command(after_help = RETRY_HELP)]
    RetryAll {
        #[arg(long)]
        observer: Option<String>,
        /// List what would be retried; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters (default: resolved ones).
    Purge(PurgeArgs),
}

#[derive(Debug, Args)]
pub struct JsonArg {
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    Pending,
    Resolved,
    All,
}

impl StatusFilter {
    fn statuses(self) -> Vec<&'static str> {
        match self {
            StatusFilter::Pending => vec!["pending"],
            StatusFilter::Resolved => vec!["resolved"],
            StatusFilter::All => vec!["pending", "resolved"],
        }
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    observer: Option<String>,
    #[arg(long, value_enum, default_value = "pending")]
    status: StatusFilter,
    #[arg(long, default_value_t = 50)]
    limit: i64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[arg(long)]
    observer: Option<String>,
    #[arg(long, value_enum, default_value = "resolved")]
    status: StatusFilter,
    /// Only entries created more than DAYS days ago (0..=36500).
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(0..=i64::from(RetentionConfig::MAX_DAYS)))]
    older_than: Option<u32>,
    /// Required when pending (undelivered) entries would be deleted.
    #[arg(long)]
    yes: bool,
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Option<&Path>, cmd: DlqCommand) -> Result<ExitCode> {
    let app = App::load(config)?;
    let mut client = app.connect().await?;
    require_migrated(&client, &app.objects).await?;
    match cmd {
        DlqCommand::Stats(a) => stats(&app, &client, a.json).await,
        DlqCommand::List(a) => list(&app, &client, a).await,
        DlqCommand::Show { id, json } => show(&app, &client, id, json).await,
        DlqCommand::Retry { id, json } => {
            let observers = observers(&app)?;
            let mut exec = executor(&app)?;
            let r = retry_one(&app, &mut client, &observers, &mut exec, id).await?;
            if json {
                print_json(&r)?;
            } else {
                println!("dead letter #{id}: {}", shown(&r.describe()));
            }
            Ok(if r.status == "delivered" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        DlqCommand::RetryAll {
            observer,
            dry_run,
            json,
        } => retry_all(&app, &mut client, observer, dry_run, json).await,
        DlqCommand::Purge(a) => purge(&app, &client, a).await,
    }
}

async fn stats(app: &App, client: &tokio_postgres::Client, json: bool) -> Result<ExitCode> {
    let t = app.objects.dead_letters.sql();
    let by_status = client
        .query(
            &format!("SELECT status, count(*) FROM {t} GROUP BY status ORDER BY status"),
            &[],
        )
        .await
        .map_err(db_err)?;
    let mut pending = 0i64;
    let mut resolved = 0i64;
    for r in &by_status {
        match r.get::<_, String>(0).as_str() {
            "pending" => pending = r.get(1),
            _ => resolved = r.get(1),
        }
    }
    let groups: Vec<Value> = client
        .query(
            &format!(
                "SELECT observer, reason, count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'resolved')
                 FROM {t} GROUP BY observer, reason ORDER BY observer NULLS FIRST, reason"
            ),
            &[],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| {
            json!({"observer": r.get::<_, Option<String>>(0), "reason": r.get::<_, String>(1),
                   "pending": r.get::<_, i64>(2), "resolved": r.get::<_, i64>(3)})
        })
        .collect();
    let oldest = client
        .query_one(
            &format!("SELECT min(created_at), EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM {t} WHERE status = 'pending'"),
            &[],
        )
        .await
        .map_err(db_err)?;
    let oldest_at: Option<chrono::DateTime<chrono::Utc>> = oldest.get(0);
    let oldest_age: Option<f64> = oldest.get(1);
    if json {
        print_json(&json!({
            "pending": pending, "resolved": resolved, "total": pending + resolved,
            "by_observer_reason": groups,
            "oldest_pending_at": oldest_at, "oldest_pending_age_secs": oldest_age,
        }))?;
    } else {
        println!("dead letters: {pending} pending, {resolved} resolved");
        match oldest_age {
            Some(a) => println!("oldest pending: {:.0}s old", a),
            None => println!("oldest pending: -"),
        }
        if !groups.is_empty() {
            println!(
                "{:<32} {:<20} {:>8} {:>8}",
                "OBSERVER", "REASON", "PENDING", "RESOLVED"
            );
            for g in &groups {
                println!(
                    "{:<32} {:<20} {:>8} {:>8}",
                    shown(g["observer"].as_str().unwrap_or("(poison event)")),
                    shown(g["reason"].as_str().unwrap_or("-")),
                    g["pending"].to_string(),
                    g["resolved"].to_string()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(app: &App, client: &tokio_postgres::Client, a: ListArgs) -> Result<ExitCode> {
    let sql = format!(
        "SELECT id, created_at, status, observer, action_index, action_type, reason, event_id, change_log_pk,
                last_error, jsonb_array_length(attempts), manual_retries
         FROM {} WHERE ($1::text IS NULL OR observer = $1) AND status = ANY($2) ORDER BY id LIMIT $3",
        app.objects.dead_letters.sql()
    );
    let rows = client
        .query(&sql, &[&a.observer, &a.status.statuses(), &a.limit.max(0)])
        .await
        .map_err(db_err)?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, i64>(0), "created_at": r.get::<_, chrono::DateTime<chrono::Utc>>(1),
                "status": r.get::<_, String>(2), "observer": r.get::<_, Option<String>>(3),
                "action_index": r.get::<_, Option<i32>>(4), "action_type": r.get::<_, Option<String>>(5),
                "reason": r.get::<_, String>(6), "event_id": r.get::<_, Option<uuid::Uuid>>(7),
                "change_log_pk": r.get::<_, i64>(8), "last_error": r.get::<_, String>(9),
                "attempts": r.get::<_, i32>(10), "manual_retries": r.get::<_, i32>(11),
            })
        })
        .collect();
    if a.json {
        print_json(&json!({ "dead_letters": items }))?;
    } else if items.is_empty() {
        println!("no dead letters match");
    } else {
        println!(
            "{:>6} {:<9} {:<24} {:<18} {:<36} {:>4}  LAST ERROR",
            "ID", "STATUS", "OBSERVER/ACTION", "REASON", "EVENT", "TRY"
        );
        for i in &items {
            let who = match i["observer"].as_str() {
                Some(o) => format!("{}[{}]", shown(o), i["action_index"]),
                None => "(poison event)".into(),
            };
            println!(
                "{:>6} {:<9} {:<24} {:<18} {:<36} {:>4}  {}",
                i["id"].to_string(),
                shown(i["status"].as_str().unwrap_or("-")),
                who,
                shown(i["reason"].as_str().unwrap_or("-")),
                i["event_id"].as_str().unwrap_or("-"),
                i["attempts"].to_string(),
                shown(i["last_error"].as_str().unwrap_or("-"))
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(app: &App, client: &tokio_postgres::Client, id: i64, json: bool) -> Result<ExitCode> {
    let sql = format!(
        "SELECT to_jsonb(d) FROM {} d WHERE id = $1",
        app.objects.dead_letters.sql()
    );
    let Some(row) = client.query_opt(&sql, &[&id]).await.map_err(db_err)? else {
        bail!("no dead letter #{id} in {}", app.objects.dead_letters);
    };
    // Printed as stored: action configs keep their `${env:…}` references unresolved and their
    // literal values redacted. Text from the event or the error is escaped.
    let v: Value = row.get(0);
    if json {
        print_json(&v)?;
    } else if let Value::Object(m) = &v {
        for (k, val) in m {
            match val {
                Value::Object(_) | Value::Array(_) => {
                    println!("{k}:");
                    for line in serde_json::to_string_pretty(val)?.lines() {
                        println!("  {}", shown(line));
                    }
                }
                Value::String(s) => println!("{k}: {}", shown(s)),
                other => println!("{k}: {other}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What one retry did.
#[derive(Debug, serde::Serialize)]
pub struct RetryReport {
    pub id: i64,
    /// `delivered`, `failed` or `skipped`.
    pub status: &'static str,
    pub message: String,
    pub attempts: Vec<observer_core::action::Attempt>,
}

impl RetryReport {
    fn describe(&self) -> String {
        format!("{}: {}", self.status, self.message)
    }
    fn skipped(id: i64, message: String) -> RetryReport {
        RetryReport {
            id,
            status: "skipped",
            message,
            attempts: vec![],
        }
    }
}

/// Retries dead letter `id` (see RETRY_HELP), holding its row lock while delivering so two
/// retries of one row cannot run at once.
pub async fn retry_one(
    app: &App,
    client: &mut tokio_postgres::Client,
    observers: &Observers,
    exec: &mut BoxExecutor,
    id: i64,
) -> Result<RetryReport> {
    let objects = app.objects.clone();
    let limits = ReadLimits::from_config(&app.config.listener);
    let tx = client.transaction().await?;
    let sql = format!(
        "SELECT listener_id, event, observer, action_index, change_log_pk, status, jsonb_array_length(attempts)
         FROM {} WHERE id = $1 FOR UPDATE SKIP LOCKED",
        objects.dead_letters.sql()
    );
    let Some(row) = tx.query_opt(&sql, &[&id]).await.map_err(db_err)? else {
        let exists: bool = tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE id = $1)",
                    objects.dead_letters.sql()
                ),
                &[&id],
            )
            .await?
            .get(0);
        return Ok(RetryReport::skipped(
            id,
            if exists {
                "being retried by another process".into()
            } else {
                format!("no dead letter #{id}")
            },
        ));
    };
    let listener: String = row.get(0);
    let event: Value = row.get(1);
    let observer: Option<String> = row.get(2);
    let action_index: Option<i32> = row.get(3);
    let pk: i64 = row.get(4);
    let status: String = row.get(5);
    let prior = row.get::<_, i32>(6).max(0) as u32;
    if status != "pending" {
        return Ok(RetryReport::skipped(id, format!("already {status}")));
    }
    let mut results = Vec::new();
    match observer {
        Some(name) => {
            let event: ChangeEvent = match serde_json::from_value(event) {
                Ok(e) => e,
                Err(e) => {
                    return Ok(RetryReport::skipped(
                        id,
                        format!("the stored event cannot be read: {e}"),
                    ))
                }
            };
            let Some(obs) = observers.get(&name) else {
                return Ok(RetryReport::skipped(
                    id,
                    format!("observer `{name}` is no longer in the config (or disabled)"),
                ));
            };
            let index = action_index.unwrap_or(-1);
            if index < 0 || index as usize >= obs.actions.len() {
                return Ok(RetryReport::skipped(
                    id,
                    format!("observer `{name}` has no action {index} any more"),
                ));
            }
            let r = redeliver::deliver(
                exec,
                Arc::new(event),
                obs.clone(),
                index as usize,
                prior + 1,
            )
            .await
            .map_err(|e| anyhow!("dead letter #{id}: {e}"))?;
            results.push(r);
        }
        None => {
            // Read within the configured limits: a row dead-lettered for its size stays pending
            // ("still poison") until `listener.max_row_bytes` is raised to admit it.
            let log = ChangeLog::new(objects.change_log.clone()).with_limits(limits);
            let event = match log.read_pk(&tx, pk).await.map_err(db_err)? {
                None => {
                    return Ok(RetryReport::skipped(
                        id,
                        format!("change-log row {pk} no longer exists"),
                    ))
                }
                Some(ChangeRow::Poison { reason, .. }) => {
                    return Ok(RetryReport::skipped(
                        id,
                        format!("change-log row {pk} is still poison: {reason}"),
                    ))
                }
                Some(ChangeRow::Event(e)) => Arc::new(e),
            };
            let mut n = prior + 1;
            for (obs, index) in redeliver::deliveries_for(observers, &event, None) {
                let r = redeliver::deliver(exec, event.clone(), obs, index, n)
                    .await
                    .map_err(|e| anyhow!("dead letter #{id}: {e}"))?;
                n += r.attempts.len() as u32;
                results.push(r);
            }
        }
    }
    let attempts: Vec<_> = results.iter().flat_map(|r| r.attempts.clone()).collect();
    let failures: Vec<String> = results
        .iter()
        .filter(|r| r.outcome != Outcome::Delivered)
        .map(|r| {
            format!(
                "{}[{}]: {}",
                r.observer.name,
                r.action_index,
                r.last_error().unwrap_or_default()
            )
        })
        .collect();
    let last_error = (!failures.is_empty()).then(|| failures.join("; "));
    for r in results.iter().filter(|r| r.outcome == Outcome::Delivered) {
        redeliver::insert_action_log(&tx, &objects, &listener, &r.action_log())
            .await
            .map_err(db_err)?;
    }
    redeliver::record_dead_letter_retry(&tx, &objects, id, &attempts, last_error.as_deref())
        .await
        .map_err(db_err)?;
    tx.commit().await?;
    let n = attempts.len();
    Ok(match last_error {
        None if results.is_empty() => RetryReport {
            id,
            status: "delivered",
            message: "the event decodes now and no observer matches it: resolved".into(),
            attempts,
        },
        None => RetryReport {
            id,
            status: "delivered",
            message: format!("delivered after {n} attempt(s); resolved"),
            attempts,
        },
        Some(e) => RetryReport {
            id,
            status: "failed",
            message: format!("still failing after {n} attempt(s): {e}"),
            attempts,
        },
    })
}

async fn retry_all(
    app: &App,
    client: &mut tokio_postgres::Client,
    observer: Option<String>,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode> {
    let t = app.objects.dead_letters.sql();
    let observers = observers(app)?;
    let max_id: Option<i64> = client
        .query_one(&format!("SELECT max(id) FROM {t}"), &[])
        .await
        .map_err(db_err)?
        .get(0);
    let Some(max_id) = max_id else {
        if json {
            print_json(
                &json!({"dry_run": dry_run, "retried": 0, "delivered": 0, "still_failing": 0, "skipped": 0, "rows": []}),
            )?;
        } else {
            println!("the dead-letter queue is empty");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let page_sql = format!(
        "SELECT id, observer, action_index, event_id FROM {t}
         WHERE status = 'pending' AND ($1::text IS NULL OR observer = $1) AND id > $2 AND id <= $3
         ORDER BY id LIMIT 500"
    );
    let mut exec = if dry_run { None } else { Some(executor(app)?) };
    let (mut seen, mut delivered, mut failed, mut skipped) = (0u64, 0u64, 0u64, 0u64);
    let mut rows_out = Vec::new();
    let mut after = 0i64;
    loop {
        let page = client
            .query(&page_sql, &[&observer, &after, &max_id])
            .await
            .map_err(db_err)?;
        if page.is_empty() {
            break;
        }
        for r in &page {
            let id: i64 = r.get(0);
            after = id;
            seen += 1;
            let name: Option<String> = r.get(1);
            let index: Option<i32> = r.get(2);
            match exec.as_mut() {
                None => {
                    let plan = match &name {
                        Some(n) => match observers.get(n) {
                            Some(o)
                                if index
                                    .is_some_and(|i| i >= 0 && (i as usize) < o.actions.len()) =>
                            {
                                "would retry"
                            }
                            Some(_) => "would skip: the action no longer exists",
                            None => "would skip: the observer is no longer in the config",
                        },
                        None => "would re-read the poison change-log row",
                    };
                    rows_out.push(json!({"id": id, "observer": name, "action_index": index,
                                         "event_id": r.get::<_, Option<uuid::Uuid>>(3), "plan": plan}));
                }
                Some(exec) => {
                    let rep = match retry_one(app, client, &observers, exec, id).await {
                        Ok(rep) => rep,
                        Err(e) => RetryReport {
                            id,
                            status: "failed",
                            message: format!("{e:#}"),
                            attempts: vec![],
                        },
                    };
                    match rep.status {
                        "delivered" => delivered += 1,
                        "failed" => failed += 1,
                        _ => skipped += 1,
                    }
                    if !json {
                        println!("dead letter #{id}: {}", shown(&rep.describe()));
                    }
                    rows_out.push(json!({"id": id, "status": rep.status, "message": rep.message}));
                }
            }
            if seen.is_multiple_of(100) {
                eprintln!("… {seen} dead letters processed ({delivered} delivered, {failed} still failing, {skipped} skipped)");
            }
        }
    }
    if dry_run {
        if json {
            print_json(&json!({"dry_run": true, "would_retry": seen, "rows": rows_out}))?;
        } else {
            for r in &rows_out {
                let who = match r["observer"].as_str() {
                    Some(o) => format!("{}[{}]", shown(o), r["action_index"]),
                    None => "(poison event)".into(),
                };
                println!("#{} {who}: {}", r["id"], r["plan"].as_str().unwrap_or(""));
            }
            println!("dry run: {seen} pending dead letter(s) would be retried; nothing changed");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let retried = delivered + failed;
    if json {
        print_json(
            &json!({"dry_run": false, "retried": retried, "delivered": delivered,
                           "still_failing": failed, "skipped": skipped, "rows": rows_out}),
        )?;
    } else {
        println!(
            "retried {retried}: {delivered} delivered, {failed} still failing; {skipped} skipped"
        );
    }
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn purge(app: &App, client: &tokio_postgres::Client, a: PurgeArgs) -> Result<ExitCode> {
    if a.status != StatusFilter::Resolved && !a.yes {
        bail!("purging pending dead letters deletes undelivered work: pass --yes to confirm");
    }
    let sql = format!(
        "DELETE FROM {} WHERE status = ANY($1) AND ($2::text IS NULL OR observer = $2)
           AND ($3::int IS NULL OR created_at < now() - make_interval(days => $3))",
        app.objects.dead_letters.sql()
    );
    // The parser already holds it to 0..=MAX_DAYS; converted without a cast all the same, so a
    // count that does not fit an int4 can never wrap into "every row".
    let days = match a.older_than.map(i32::try_from).transpose() {
        Ok(d) => d,
        Err(_) => bail!(
            "--older-than: expected 0..={} days",
            RetentionConfig::MAX_DAYS
        ),
    };
    let n = client
        .execute(&sql, &[&a.status.statuses(), &a.observer, &days])
        .await
        .map_err(db_err)?;
    if a.json {
        print_json(&json!({"deleted": n}))?;
    } else {
        println!("deleted {n} dead letter(s)");
    }
    Ok(ExitCode::SUCCESS)
}
