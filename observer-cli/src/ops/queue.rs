//! `queue stats|list|retry|purge`: the job queues of the `queue` layer, read from Redis.
//!
//! Every subcommand needs the Redis of `[redis]`; when it cannot be reached the command says so
//! and exits non-zero. `retry` also needs the database: it moves dead-lettered jobs back into
//! their queue.

use std::path::Path;
use std::process::ExitCode;

#[cfg(feature = "queue")]
use anyhow::anyhow;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use super::shown;
#[cfg(feature = "queue")]
use super::{db_err, observers, print_json, require_migrated};
use crate::app::App;

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Per queue: depth, pending (running or retrying), waiting, oldest age, and each worker's
    /// pending jobs and idle time.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The oldest jobs of a queue, with the worker working on each.
    List {
        queue: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Move dead-lettered jobs of a queue back into it (the dead letters become `resolved`; a
    /// job that fails again is dead-lettered again).
    Retry(RetryArgs),
    /// Delete every job of a queue (running ones included). Their idempotency keys stay
    /// marked as enqueued, so a replay does not enqueue them again.
    Purge {
        queue: String,
        /// Required: the jobs are gone for good.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    queue: String,
    /// Only this dead letter (its `dlq list` id).
    #[arg(long)]
    id: Option<i64>,
    /// List what would be moved; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Option<&Path>, cmd: QueueCommand) -> Result<ExitCode> {
    let app = App::load(config)?;
    #[cfg(feature = "queue")]
    {
        let redis = app.redis()?.ok_or_else(|| {
            anyhow!("the job queues live in Redis, and no Redis is configured: set [redis] url (or REDIS_URL)")
        })?;
        let queue = observer_features::queue::JobQueue::new(redis, app.config.queue.dedup_ttl_secs);
        match cmd {
            QueueCommand::Stats { json } => stats(&app, &queue, json).await,
            QueueCommand::List {
                queue: q,
                limit,
                json,
            } => list(&queue, &q, limit, json).await,
            QueueCommand::Retry(a) => retry(&app, &queue, a).await,
            QueueCommand::Purge {
                queue: q,
                yes,
                json,
            } => {
                check_name(&q)?;
                if !yes {
                    bail!("`queue purge {q}` deletes every job of the queue for good: add --yes");
                }
                let n = queue.purge(&q).await?;
                if json {
                    print_json(&json!({"queue": q, "deleted": n}))?;
                } else {
                    println!("queue {}: deleted {n} job(s)", shown(&q));
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
    #[cfg(not(feature = "queue"))]
    {
        let _ = (app, cmd);
        bail!("this binary was built without the `queue` layer (cargo feature `queue`)")
    }
}

#[cfg(feature = "queue")]
fn check_name(q: &str) -> Result<()> {
    if !observer_core::config::valid_queue_name(q) {
        bail!("`{q}` is not a queue name: expected 1-64 letters, digits, `-`, `_` or `.`");
    }
    Ok(())
}

/// The figures of every queue: those the observers name and those found in Redis.
#[cfg(feature = "queue")]
async fn every_queue(
    app: &App,
    queue: &observer_features::queue::JobQueue,
) -> Result<Vec<observer_features::queue::QueueStats>, observer_features::queue::QueueError> {
    let mut names: Vec<String> = app
        .config
        .observers
        .iter()
        .filter_map(|o| o.queue.clone())
        .collect();
    names.extend(queue.discover().await?);
    names.sort();
    names.dedup();
    let mut all = Vec::new();
    for n in &names {
        all.push(queue.stats(n).await?);
    }
    Ok(all)
}

#[cfg(feature = "queue")]
async fn stats(
    app: &App,
    queue: &observer_features::queue::JobQueue,
    json: bool,
) -> Result<ExitCode> {
    let all = every_queue(app, queue).await?;
    if json {
        print_json(&json!({"redis": queue.server(), "queues": all}))?;
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!(
            "no job queue (no observer sets `queue`, and Redis at {} holds none)",
            queue.server()
        );
    }
    for s in &all {
        println!(
            "queue {}: depth {}, pending {}, waiting {}, started {}, oldest {:.1} s",
            shown(&s.queue),
            s.depth,
            s.pending,
            s.waiting,
            s.started,
            s.oldest_age_secs
        );
        for c in &s.consumers {
            println!(
                "  worker {}: {} pending, idle {:.1} s",
                shown(&c.name),
                c.pending,
                c.idle_ms as f64 / 1000.0
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "queue")]
async fn list(
    queue: &observer_features::queue::JobQueue,
    q: &str,
    limit: usize,
    json: bool,
) -> Result<ExitCode> {
    check_name(q)?;
    let rows = queue.list(q, limit.clamp(1, 10_000)).await?;
    if json {
        print_json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("queue {}: empty", shown(q));
    }
    for r in &rows {
        let owner = match (&r.consumer, r.idle_ms, r.times_delivered) {
            (Some(c), Some(idle), Some(n)) => format!(
                "worker {} (delivered {n}x, idle {:.1} s)",
                shown(c),
                idle as f64 / 1000.0
            ),
            _ => "waiting".into(),
        };
        println!(
            "{} {} action {} event {} key {} age {:.1} s attempts {} {}",
            r.id,
            shown(&r.observer),
            r.action_index,
            shown(&r.event_id),
            r.idempotency_key,
            r.age_secs,
            r.attempts,
            owner
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "queue")]
async fn retry(
    app: &App,
    queue: &observer_features::queue::JobQueue,
    a: RetryArgs,
) -> Result<ExitCode> {
    check_name(&a.queue)?;
    let observers = observers(app)?;
    let routed: Vec<String> = observers
        .list
        .iter()
        .filter(|o| o.queue.as_deref() == Some(a.queue.as_str()))
        .map(|o| o.name.clone())
        .collect();
    if routed.is_empty() {
        bail!(
            "no observer of the configuration routes to queue `{}`: its dead letters would have no queue to go back to (use `dlq retry` to deliver them inline)",
            a.queue
        );
    }
    let client = app.connect().await?;
    require_migrated(&client, &app.objects).await?;
    let sql = format!(
        "SELECT id, event, observer, action_index, idempotency_key, event_id::text
         FROM {} WHERE status = 'pending' AND observer = ANY($1) AND action_index IS NOT NULL
           AND idempotency_key IS NOT NULL AND ($2::bigint IS NULL OR id = $2) ORDER BY id",
        app.objects.dead_letters.sql()
    );
    let rows = client
        .query(&sql, &[&routed, &a.id])
        .await
        .map_err(db_err)?;
    if rows.is_empty() {
        if let Some(id) = a.id {
            bail!(
                "dead letter #{id} is not a pending dead letter of an observer routed to queue `{}`",
                a.queue
            );
        }
    }
    let mut moved = Vec::new();
    for r in &rows {
        let id: i64 = r.get(0);
        let event: serde_json::Value = r.get(1);
        let job = observer_features::queue::store::NewJob {
            queue: a.queue.clone(),
            idempotency_key: r.get(4),
            observer: r.get(2),
            action_index: r.get::<_, i32>(3).max(0) as usize,
            event_id: r.get::<_, Option<String>>(5).unwrap_or_default(),
            event: event.to_string(),
        };
        if a.dry_run {
            moved.push(json!({"dead_letter": id, "observer": job.observer, "job": null}));
            continue;
        }
        let entry = queue.requeue(&job).await?;
        observer_core::redeliver::record_dead_letter_retry(&client, &app.objects, id, &[], None)
            .await
            .map_err(db_err)?;
        moved.push(json!({"dead_letter": id, "observer": job.observer, "job": entry}));
    }
    if a.json {
        print_json(&json!({"queue": a.queue, "dry_run": a.dry_run, "moved": moved}))?;
    } else {
        for m in &moved {
            match m.get("job").and_then(|j| j.as_str()) {
                Some(j) => println!(
                    "dead letter #{}: back in queue {} as job {j}",
                    m["dead_letter"],
                    shown(&a.queue)
                ),
                None => println!(
                    "dead letter #{}: would go back to queue {}",
                    m["dead_letter"],
                    shown(&a.queue)
                ),
            }
        }
        if moved.is_empty() {
            println!(
                "queue {}: no pending dead letter to move back",
                shown(&a.queue)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `status`'s part: every queue's numbers, or why Redis did not answer; `None` when no queue
/// is configured and none was found (or the binary has no `queue` layer).
pub async fn status_section(app: &App) -> Option<serde_json::Value> {
    #[cfg(feature = "queue")]
    {
        let configured = app.config.observers.iter().any(|o| o.queue.is_some());
        let redis = match app.redis() {
            Ok(Some(r)) => r,
            Ok(None) if configured => {
                return Some(
                    json!({"reachable": false, "error": "no Redis is configured ([redis] url)"}),
                )
            }
            Ok(None) => return None,
            Err(e) => return Some(json!({"reachable": false, "error": format!("{e:#}")})),
        };
        let queue = observer_features::queue::JobQueue::new(redis, app.config.queue.dedup_ttl_secs);
        match every_queue(app, &queue).await {
            Ok(all) if all.is_empty() && !configured => None,
            Ok(all) => Some(json!({
                "reachable": true,
                "enabled": app.config.features.queue,
                "queues": all,
            })),
            Err(e) => Some(json!({"reachable": false, "error": e.to_string()})),
        }
    }
    #[cfg(not(feature = "queue"))]
    {
        let _ = app;
        None
    }
}

/// Prints `status`'s queue part.
pub fn print_status(q: &serde_json::Value) {
    if q["reachable"] != json!(true) {
        println!(
            "queues        unavailable: {}",
            shown(q["error"].as_str().unwrap_or("?"))
        );
        return;
    }
    if q["enabled"] == json!(false) {
        println!("queues        features.queue is off: new deliveries run inline; what is left below is worked off");
    }
    for s in q["queues"].as_array().into_iter().flatten() {
        println!(
            "queue {:<8}depth {}, pending {}, oldest {:.1} s, {} consumer(s) (stopped workers included until removed)",
            shown(s["queue"].as_str().unwrap_or("?")),
            s["depth"],
            s["pending"],
            s["oldest_age_secs"].as_f64().unwrap_or(0.0),
            s["consumers"].as_array().map(|c| c.len()).unwrap_or(0)
        );
    }
}
