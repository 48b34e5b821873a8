//! `search`: the audit trail of the `search` layer — every completed event, the observers it
//! matched and each action's outcome and attempts — answered from `observer_audit` (the
//! embedded default) or from the Elasticsearch/OpenSearch cluster of `[search] backend =
//! "elasticsearch"`. Also what `migrate --search` installs in the cluster and the `search`
//! part of `status`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, NaiveDate, Utc};
use clap::Args;
use observer_core::audit::{AuditQuery, AuditRecord, OUTCOMES};
use observer_core::config::SearchBackend;
use serde_json::{json, Value};

use super::{db_err, print_json, require_migrated, shown};
use crate::app::App;

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Words to find in the entity, entity id, operation, observers, action types, outcomes,
    /// errors and event data (`"a phrase"`, `-word`, `or`); "" lists what the filters admit.
    text: String,
    /// Only events of this entity (case-insensitive), e.g. `order`.
    #[arg(long)]
    entity: Option<String>,
    /// Only events completed since: a duration back from now (`90s`, `30m`, `1h`, `2d`, `1w`),
    /// a day (`2026-12-01`, UTC midnight) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Only events with an action of this outcome: delivered, dead_lettered (or `failed`),
    /// duplicate, condition_false, or no_match (no observer matched).
    #[arg(long)]
    outcome: Option<String>,
    /// Only events of this listener (default: every listener).
    #[arg(long)]
    listener: Option<String>,
    /// At most this many events, newest first (1..=10000).
    #[arg(long, default_value_t = 50)]
    limit: i64,
    /// One JSON array instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Option<&Path>, args: SearchArgs) -> Result<ExitCode> {
    let app = App::load(config)?;
    let problems = app.config.search.problems();
    if let Some((key, message)) = problems.first() {
        bail!("invalid settings: {key}: {message}");
    }
    let query = query(&args, Utc::now())?;
    let records = match app.config.search.backend {
        SearchBackend::Postgres => {
            let client = app.connect().await?;
            require_migrated(&client, &app.objects).await?;
            observer_core::audit::search_postgres(&client, &app.objects, &query)
                .await
                .map_err(db_err)?
        }
        SearchBackend::Elasticsearch => search_cluster(&app, &query).await?,
    };
    if !app.config.features.search && records.is_empty() {
        eprintln!("note: features.search is off in this configuration: a daemon run with it records no audit trail");
    }
    if args.json {
        print_json(&records)?;
    } else {
        print_text(&records);
    }
    Ok(ExitCode::SUCCESS)
}

/// The query of `args`, with `--since` read relative to `now`.
fn query(args: &SearchArgs, now: DateTime<Utc>) -> Result<AuditQuery> {
    if !(1..=10_000).contains(&args.limit) {
        bail!("--limit {}: expected 1..=10000", args.limit);
    }
    let outcome = match args.outcome.as_deref() {
        None => None,
        Some("failed") => Some("dead_lettered".to_string()),
        Some(o) if OUTCOMES.contains(&o) => Some(o.to_string()),
        Some(o) => bail!(
            "--outcome {o:?}: expected one of {}, or failed",
            OUTCOMES.join(", ")
        ),
    };
    let since = match &args.since {
        Some(s) => Some(parse_since(s, now).map_err(|m| anyhow!("--since {s:?}: {m}"))?),
        None => None,
    };
    Ok(AuditQuery {
        text: args.text.clone(),
        entity: args.entity.clone(),
        since,
        outcome,
        listener: args.listener.clone(),
        limit: args.limit,
    })
}

/// `90s`, `30m`, `1h`, `2d`, `1w` back from `now`; `2026-12-01` (UTC midnight); RFC 3339.
fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let t = s.trim();
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return d
            .and_hms_opt(0, 0, 0)
            .map(|n| n.and_utc())
            .ok_or_else(|| "not a day".to_string());
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(t) {
        return Ok(at.with_timezone(&Utc));
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("a duration needs a unit: s, m, h, d or w")?;
    let (n, unit) = t.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| "expected a duration like 1h, a day like 2026-12-01, or an RFC 3339 time")?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("unknown unit `{unit}`: expected s, m, h, d or w")),
    };
    n.checked_mul(secs)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .and_then(chrono::Duration::try_seconds)
        .map(|d| now - d)
        .ok_or_else(|| "the duration is longer than 100 years".to_string())
}

fn print_text(records: &[AuditRecord]) {
    for r in records {
        println!(
            "{}  {} {}  {}  event {}  (listener {}, pk {})",
            r.finished_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            shown(&r.entity),
            shown(r.entity_id.as_deref().unwrap_or("-")),
            r.operation,
            r.event_id,
            shown(&r.listener),
            r.change_log_pk
        );
        let actions = r.actions.as_array().cloned().unwrap_or_default();
        if actions.is_empty() {
            println!("    no observer matched");
        }
        for a in &actions {
            let n = a["attempts"].as_array().map_or(0, Vec::len);
            let error = a["error"]
                .as_str()
                .map(|e| format!("  last error: {}", shown(e)))
                .unwrap_or_default();
            println!(
                "    {} {}#{}  {}  {n} attempt{}{error}",
                shown(a["observer"].as_str().unwrap_or("?")),
                a["action_type"].as_str().unwrap_or("?"),
                a["action_index"],
                a["outcome"].as_str().unwrap_or("?"),
                if n == 1 { "" } else { "s" },
            );
        }
    }
    println!(
        "{} event{}",
        records.len(),
        if records.len() == 1 { "" } else { "s" }
    );
}

#[cfg(feature = "search")]
fn cluster(app: &App) -> Result<observer_features::search::Cluster> {
    Ok(observer_features::search::Cluster::from_config(
        &app.config.search,
    )?)
}

#[cfg(feature = "search")]
async fn search_cluster(app: &App, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
    Ok(cluster(app)?.search(q).await?)
}

#[cfg(not(feature = "search"))]
async fn search_cluster(_app: &App, _q: &AuditQuery) -> Result<Vec<AuditRecord>> {
    bail!("search.backend is `elasticsearch`, but this binary was built without the `search` layer (cargo feature `search`)")
}

/// `migrate --search`: installs the index template in the configured cluster.
#[cfg(feature = "search")]
pub async fn install_template(app: &App) -> Result<String> {
    if app.config.search.backend != SearchBackend::Elasticsearch {
        return Ok("search.backend is `postgres`: the full-text index is part of `migrate` itself; nothing to install in a cluster".into());
    }
    let c = cluster(app)?;
    c.install_template().await?;
    Ok(format!(
        "installed index template `{}` (indices {}-YYYY.MM.DD) at {}",
        c.prefix(),
        c.prefix(),
        c.url()
    ))
}

#[cfg(not(feature = "search"))]
pub async fn install_template(_app: &App) -> Result<String> {
    bail!("--search: this binary was built without the `search` layer (cargo feature `search`)")
}

/// The `search` part of `status` for `listener`: the backend, the audit rows, and for a
/// cluster the indexer's watermark, lag and last error (from `observer_search_index`) and the
/// documents the cluster holds (`_count`, or why it could not be asked).
pub async fn status_of(
    client: &tokio_postgres::Client,
    app: &App,
    listener: &str,
) -> Result<Value> {
    let cfg = &app.config.search;
    let present: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&app.objects.audit.sql()],
        )
        .await
        .map_err(db_err)?
        .get(0);
    if !present {
        return Ok(json!({
            "enabled": app.config.features.search,
            "error": format!("{} is missing: run `fraiseql-observers migrate`", app.objects.audit),
        }));
    }
    let audit = client
        .query_one(
            &format!(
                "SELECT count(*), max(id), max(finished_at) FROM {} WHERE listener_id = $1",
                app.objects.audit.sql()
            ),
            &[&listener],
        )
        .await
        .map_err(db_err)?;
    let rows: i64 = audit.get(0);
    let last_id: Option<i64> = audit.get(1);
    let last_at: Option<DateTime<Utc>> = audit.get(2);
    let backend = match cfg.backend {
        SearchBackend::Postgres => "postgres",
        SearchBackend::Elasticsearch => "elasticsearch",
    };
    let mut out = json!({
        "enabled": app.config.features.search,
        "backend": backend,
        "audit_rows": rows,
        "last_audit_id": last_id,
        "last_recorded_at": last_at,
    });
    if cfg.backend == SearchBackend::Elasticsearch {
        let wm = client
            .query_opt(
                &format!(
                    "SELECT indexed_id, documents, indexed_at, last_error, last_error_at, target FROM {} WHERE listener_id = $1",
                    app.objects.search_index.sql()
                ),
                &[&listener],
            )
            .await
            .map_err(db_err)?;
        let indexed_id: i64 = wm.as_ref().map_or(0, |r| r.get(0));
        let lag = client
            .query_one(
                &format!(
                    "SELECT count(*), min(finished_at) FROM {} WHERE listener_id = $1 AND id > $2",
                    app.objects.audit.sql()
                ),
                &[&listener, &indexed_id],
            )
            .await
            .map_err(db_err)?;
        let oldest: Option<DateTime<Utc>> = lag.get(1);
        out["indexer"] = json!({
            "started": wm.is_some(),
            "target": wm.as_ref().and_then(|r| r.get::<_, Option<String>>(5)),
            "watermark": indexed_id,
            "documents_indexed": wm.as_ref().map_or(0, |r| r.get::<_, i64>(1)),
            "indexed_at": wm.as_ref().and_then(|r| r.get::<_, Option<DateTime<Utc>>>(2)),
            "lag_rows": lag.get::<_, i64>(0),
            "lag_seconds": oldest.map(|t| ((Utc::now() - t).num_milliseconds() as f64 / 1000.0).max(0.0)).unwrap_or(0.0),
            "last_error": wm.as_ref().and_then(|r| r.get::<_, Option<String>>(3)),
            "last_error_at": wm.as_ref().and_then(|r| r.get::<_, Option<DateTime<Utc>>>(4)),
        });
        out["cluster"] = cluster_count(app, listener).await;
    }
    Ok(out)
}

#[cfg(feature = "search")]
async fn cluster_count(app: &App, listener: &str) -> Value {
    let c = match cluster(app) {
        Ok(c) => c,
        Err(e) => return json!({"reachable": false, "error": format!("{e:#}")}),
    };
    match c.count(Some(listener)).await {
        Ok(n) => json!({"url": c.url(), "reachable": true, "documents": n}),
        Err(e) => json!({"url": c.url(), "reachable": false, "error": e.to_string()}),
    }
}

#[cfg(not(feature = "search"))]
async fn cluster_count(_app: &App, _listener: &str) -> Value {
    json!({"reachable": false, "error": "this binary was built without the `search` layer"})
}

/// The text form of [`status_of`] (lines of the `status` report).
pub fn print_status(s: &Value) {
    if let Some(e) = s["error"].as_str() {
        println!("search        {}", shown(e));
        return;
    }
    println!(
        "search        {} ({}), {} audit rows, last at {}",
        s["backend"].as_str().unwrap_or("?"),
        if s["enabled"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
        s["audit_rows"],
        s["last_recorded_at"].as_str().unwrap_or("-")
    );
    let ix = &s["indexer"];
    if ix.is_object() {
        println!(
            "indexer       watermark {}, {} rows behind ({:.1}s), {} documents indexed",
            ix["watermark"],
            ix["lag_rows"],
            ix["lag_seconds"].as_f64().unwrap_or(0.0),
            ix["documents_indexed"]
        );
        match ix["last_error"].as_str() {
            Some(e) => println!(
                "indexer error {} (at {})",
                shown(e),
                ix["last_error_at"].as_str().unwrap_or("-")
            ),
            None => println!("indexer error -"),
        }
        let c = &s["cluster"];
        match c["documents"].as_u64() {
            Some(n) => println!(
                "cluster       {} holds {n} documents of this listener",
                c["url"].as_str().unwrap_or("?")
            ),
            None => println!(
                "cluster       {}",
                shown(c["error"].as_str().unwrap_or("unreachable"))
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn since_takes_durations_days_and_times() {
        let n = now();
        assert_eq!(
            parse_since("1h", n).unwrap(),
            n - chrono::Duration::hours(1)
        );
        assert_eq!(parse_since("2d", n).unwrap(), n - chrono::Duration::days(2));
        assert_eq!(
            parse_since("90s", n).unwrap(),
            n - chrono::Duration::seconds(90)
        );
        assert_eq!(
            parse_since("2026-12-01", n).unwrap().to_rfc3339(),
            "2026-12-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_since("2026-12-01T10:00:00+02:00", n)
                .unwrap()
                .to_rfc3339(),
            "2026-12-01T08:00:00+00:00"
        );
        for bad in [
            "",
            "1",
            "1y",
            "h",
            "yesterday",
            "99999999999w",
            "2026-13-01",
        ] {
            assert!(parse_since(bad, n).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn failed_means_dead_lettered_and_unknown_outcomes_are_named() {
        let mut a = SearchArgs {
            text: "42".into(),
            entity: None,
            since: None,
            outcome: Some("failed".into()),
            listener: None,
            limit: 10,
            json: false,
        };
        assert_eq!(
            query(&a, now()).unwrap().outcome.as_deref(),
            Some("dead_lettered")
        );
        a.outcome = Some("exploded".into());
        let e = query(&a, now()).unwrap_err().to_string();
        assert!(e.contains("exploded") && e.contains("no_match"), "{e}");
        a.outcome = None;
        a.limit = 0;
        assert!(query(&a, now()).is_err());
    }
}
