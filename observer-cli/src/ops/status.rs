//! `status`: is the listener running, where is it, how far behind, what is in the DLQ.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use chrono::Utc;
use clap::Args;
use observer_core::change_log::ChangeLog;

use super::{
    checkpoints, db_err, group, metrics, or_dash, print_json, require_migrated, shown,
    CheckpointRow, Instance, Lease,
};
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
    /// The failover lease (absent when the listener never ran with `features.failover`).
    lease: Option<Lease>,
    /// Every registered instance of the listener group (empty without the failover layer).
    instances: Vec<Instance>,
    /// The live in-process figures of the daemon's metrics endpoint (`[metrics] listen`), for
    /// the listener that endpoint serves; `reachable: false` with the reason when it does not
    /// answer. Absent for other listeners.
    #[serde(skip_serializing_if = "Option::is_none")]
    live: Option<serde_json::Value>,
    /// The audit trail and, with a cluster backend, its indexer (`ops/search.rs`).
    search: serde_json::Value,
    /// The `queue` layer's job queues, read from Redis (`reachable: false` with the reason when
    /// it does not answer); absent when no queue is configured or found.
    #[serde(skip_serializing_if = "Option::is_none")]
    queues: Option<serde_json::Value>,
    /// The `nats` layer's stream, consumers and workers (`reachable: false` with the reason
    /// when the server does not answer); absent unless `features.nats` is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    nats: Option<serde_json::Value>,
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
    let (serves, live) = live_status(&app).await;
    let target = serves.unwrap_or_else(|| app.config.listener.id.clone());
    if let Some(s) = out.iter_mut().find(|s| s.listener == target) {
        s.live = Some(live);
    } else if let Some(s) = out
        .iter_mut()
        .find(|s| s.listener == app.config.listener.id)
    {
        let url = live["url"].clone();
        s.live = Some(serde_json::json!({
            "url": url,
            "reachable": true,
            "error": format!("the metrics endpoint at {} serves listener `{target}`, not this one", url.as_str().unwrap_or("?")),
        }));
    }
    let queues = super::queue::status_section(&app).await;
    if let Some(s) = out
        .iter_mut()
        .find(|s| s.listener == app.config.listener.id)
    {
        s.queues = queues;
        s.nats = nats_section(&app.config).await;
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
    let (lease, instances) = group(client, &app.objects, &row.listener)
        .await?
        .unwrap_or_default();
    let search = super::search::status_of(client, app, &row.listener).await?;
    Ok(ListenerStatus {
        lease,
        instances,
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
        live: None,
        search,
        queues: None,
        nats: None,
    })
}

/// Scrapes the configured metrics endpoint: (the listener it serves, per `/health`; the live
/// figures or why there are none). Never fails: `status` works without the endpoint.
async fn live_status(app: &App) -> (Option<String>, serde_json::Value) {
    use serde_json::json;
    let url = match metrics::default_url(&app.config.metrics.listen) {
        Ok(u) => u,
        Err(e) => return (None, json!({"reachable": false, "error": format!("{e:#}")})),
    };
    let timeout = std::time::Duration::from_secs(2);
    let text = match metrics::fetch(&url, timeout).await {
        Ok(t) => t,
        Err(e) => {
            return (
                None,
                json!({"url": url, "reachable": false, "error": format!("metrics endpoint not reachable at {url}"), "detail": format!("{e:#}")}),
            )
        }
    };
    let families = match metrics::parse(&text) {
        Ok(f) => f,
        Err(e) => {
            return (
                None,
                json!({"url": url, "reachable": true, "error": format!("{url} served an unreadable exposition: {e}")}),
            )
        }
    };
    let health_url = format!("{}/health", url.trim_end_matches("/metrics"));
    let serves = metrics::fetch(&health_url, timeout)
        .await
        .ok()
        .and_then(|h| serde_json::from_str::<serde_json::Value>(&h).ok())
        .and_then(|h| h["listener"].as_str().map(str::to_string));
    let mut live = metrics::live_figures(&families);
    live["url"] = json!(url);
    live["reachable"] = json!(true);
    (serves, live)
}

fn print_text(s: &ListenerStatus) {
    print_listener(s);
    if let Some(q) = &s.queues {
        super::queue::print_status(q);
    }
    if let Some(n) = &s.nats {
        print_nats(n);
    }
}

/// The stream's depth, each partition consumer's counts and the workers that answer.
async fn nats_section(cfg: &observer_core::config::Config) -> Option<serde_json::Value> {
    if !cfg.features.nats {
        return None;
    }
    #[cfg(feature = "nats")]
    {
        match observer_features::nats::stream::stats(&cfg.nats).await {
            Ok(s) => Some(serde_json::json!({"reachable": true, "stream": s})),
            Err(e) => Some(serde_json::json!({"reachable": false, "error": e.to_string()})),
        }
    }
    #[cfg(not(feature = "nats"))]
    None
}

fn print_nats(n: &serde_json::Value) {
    if n["reachable"] != true {
        println!(
            "  nats: unreachable: {}",
            n["error"].as_str().unwrap_or("?")
        );
        return;
    }
    let s = &n["stream"];
    println!(
        "  nats: stream {} on {}: {} events waiting ({} bytes)",
        s["stream"].as_str().unwrap_or("?"),
        s["server"].as_str().unwrap_or("?"),
        s["messages"],
        s["bytes"]
    );
    let consumers = s["consumers"].as_array().cloned().unwrap_or_default();
    let busy: Vec<&serde_json::Value> = consumers
        .iter()
        .filter(|c| c["pending"] != 0 || c["ack_pending"] != 0 || c["redelivered"] != 0)
        .collect();
    println!(
        "    consumers: {} (pending / ack pending / redelivered shown for those not idle: {})",
        consumers.len(),
        busy.len()
    );
    for c in busy {
        println!(
            "      {}: pending {}, ack pending {}, redelivered {}, pulls waiting {}",
            c["name"].as_str().unwrap_or("?"),
            c["pending"],
            c["ack_pending"],
            c["redelivered"],
            c["waiting"]
        );
    }
    let workers = s["workers"].as_array().cloned().unwrap_or_default();
    println!("    workers answering: {}", workers.len());
    for w in workers {
        println!(
            "      {}: up {} s, {} acknowledged",
            w["name"].as_str().unwrap_or("?"),
            w["up_secs"],
            w["acked"]
        );
    }
}

fn print_listener(s: &ListenerStatus) {
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
            "last error    {} (at {})",
            shown(e),
            or_dash(&at.map(|t| t.to_rfc3339()))
        ),
        (None, _) => println!("last error    -"),
    }
    print_group(s);
    super::search::print_status(&s.search);
    if let Some(live) = &s.live {
        print_live(live);
    }
}

fn print_group(s: &ListenerStatus) {
    let Some(lease) = &s.lease else {
        return;
    };
    let held = match (lease.held, &lease.holder_name, lease.expires_in_secs) {
        (true, Some(h), Some(e)) => format!("held by {}, expires in {e:.1}s", shown(h)),
        (false, _, _) if lease.holder.is_none() => "vacant (handed back)".to_string(),
        (false, h, e) => format!(
            "expired {:.1}s ago (last holder {})",
            -e.unwrap_or(0.0),
            shown(h.as_deref().unwrap_or("-"))
        ),
        (true, h, _) => format!("held by {}", shown(h.as_deref().unwrap_or("-"))),
    };
    println!("lease         token {}, {held}", lease.token);
    println!("instances     {}", s.instances.len());
    for i in &s.instances {
        let mark = if i.leads { "*" } else { " " };
        let lease = match (&i.lease_expires_at, i.leads) {
            (Some(at), true) => format!("  lease until {}", at.to_rfc3339()),
            _ => String::new(),
        };
        println!(
            "  {mark} {}:{}  {:<8} since {}  heartbeat {:.1}s ago{lease}",
            shown(&i.host),
            i.pid,
            i.role,
            i.since.to_rfc3339(),
            i.heartbeat_age_secs
        );
    }
}

fn print_live(live: &serde_json::Value) {
    let url = live["url"].as_str().unwrap_or("?");
    if let Some(e) = live["error"].as_str() {
        println!("live          {}", shown(e));
        return;
    }
    let num = |k: &str| match &live[k] {
        serde_json::Value::Number(n) => metrics::fmt_value(n.as_f64().unwrap_or(f64::NAN)),
        _ => "-".into(),
    };
    let active = match live["listener_active"].as_bool() {
        Some(true) => "active",
        Some(false) => "standing by",
        None => "-",
    };
    println!("live          from {url}: {active}");
    println!(
        "in flight     {} dispatches, lag {}s ({} events read, not done), dlq {}",
        num("in_flight"),
        num("lag_seconds"),
        num("lag_events"),
        num("dlq_size")
    );
    let breakers: Vec<String> = live["breakers"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(d, st)| format!("{} {}", shown(d), shown(st.as_str().unwrap_or("?"))))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "breakers      {}",
        if breakers.is_empty() {
            "-".to_string()
        } else {
            breakers.join(", ")
        }
    );
    println!(
        "dedup         {} skipped (rate {})",
        num("dedup_skips"),
        num("dedup_rate")
    );
    println!("cache         hit rate {}", num("cache_hit_rate"));
}
