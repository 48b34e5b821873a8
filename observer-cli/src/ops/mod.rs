//! The operator commands: `status`, `metrics`, `debug-event`, `dlq …`, `checkpoint …`, `replay`, `cleanup`, `search`.
//!
//! Each command is one file. They share what is here: reading a checkpoint row, turning
//! "relation does not exist" into "run `migrate`", compiling the observers and building the
//! executor stack exactly as the daemon does.

pub mod checkpoint;
pub mod cleanup;
pub mod debug_event;
pub mod dlq;
pub mod metrics;
pub mod queue;
pub mod replay;
pub mod search;
pub mod status;

use anyhow::{anyhow, Result};
use chrono::{DateTime, Utc};
use observer_core::action::ActionContext;
use observer_core::action::Secrets;
use observer_core::change_log::{Position, Snapshot};
use observer_core::executor::BoxExecutor;
use observer_core::observer::Observers;
use observer_core::printable;
use observer_core::schema::Objects;
use observer_core::store::explain_missing;
use uuid::Uuid;

use crate::app::App;
use crate::stack;

/// A database error, with "run `migrate`" when our tables are missing.
pub fn db_err(e: tokio_postgres::Error) -> anyhow::Error {
    anyhow::Error::new(explain_missing(e))
}

/// One row of `observer_checkpoints`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointRow {
    pub listener: String,
    pub owner: Option<String>,
    pub epoch: i64,
    pub window_lo: String,
    pub window_hi: String,
    pub after_pk: i64,
    pub last_event_id: Option<Uuid>,
    pub last_event_pk: Option<i64>,
    pub last_event_at: Option<DateTime<Utc>>,
    pub events_processed: i64,
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// Seconds since the heartbeat, by the database's clock.
    pub heartbeat_age_secs: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Whether a daemon leads the listener right now: it holds the listener's advisory lock (an
    /// active daemon does, for its whole life; a stopped or crashed one cannot: the lock dies
    /// with its session), or, with the `failover` layer, an unexpired lease.
    pub active: bool,
}

impl CheckpointRow {
    /// Whether a daemon is active on this listener (it holds the listener lock).
    pub fn alive(&self) -> bool {
        self.active
    }

    /// The stored position.
    pub fn position(&self) -> Result<Position> {
        let parse = |t: &str| -> Result<Snapshot> {
            t.parse().map_err(|e| {
                anyhow!(
                    "stored checkpoint of `{}` is unreadable: {e}",
                    self.listener
                )
            })
        };
        Ok(Position {
            lo: parse(&self.window_lo)?,
            hi: parse(&self.window_hi)?,
            after_pk: self.after_pk,
        })
    }

    /// "running" or "stopped (last heartbeat Ns ago)".
    pub fn state(&self) -> String {
        match self.heartbeat_age_secs {
            _ if self.alive() => "running".into(),
            Some(a) => format!(
                "stopped (last heartbeat {}s ago)",
                a.max(0.0).round() as i64
            ),
            None => "stopped (no heartbeat recorded)".into(),
        }
    }
}

/// The checkpoint rows, of one listener or all (ordered by listener id).
pub async fn checkpoints(
    client: &tokio_postgres::Client,
    objects: &Objects,
    listener: Option<&str>,
) -> Result<Vec<CheckpointRow>> {
    // A lease table exists once `migrate` of a build with the failover layer has run.
    let leased = if has_table(client, &objects.leases).await? {
        format!(
            " OR EXISTS (SELECT 1 FROM {} f WHERE f.listener_id = c.listener_id
                         AND f.holder IS NOT NULL AND f.expires_at > now())",
            objects.leases.sql()
        )
    } else {
        String::new()
    };
    let sql = format!(
        "SELECT listener_id, owner, epoch, window_lo::text, window_hi::text, after_pk, last_event_id,
                last_event_pk, last_event_at, events_processed, heartbeat_at,
                EXTRACT(EPOCH FROM now() - heartbeat_at)::float8, last_error, last_error_at, created_at, updated_at,
                EXISTS (SELECT 1 FROM pg_locks l
                        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
                          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                          AND ((l.classid::int8 << 32) | l.objid::int8)
                              = hashtextextended('fraiseql_observers:' || listener_id, 0)){leased}
         FROM {} c WHERE $1::text IS NULL OR listener_id = $1 ORDER BY listener_id",
        objects.checkpoints.sql()
    );
    let rows = client.query(&sql, &[&listener]).await.map_err(db_err)?;
    Ok(rows
        .iter()
        .map(|r| CheckpointRow {
            listener: r.get(0),
            owner: r.get(1),
            epoch: r.get(2),
            window_lo: r.get(3),
            window_hi: r.get(4),
            after_pk: r.get(5),
            last_event_id: r.get(6),
            last_event_pk: r.get(7),
            last_event_at: r.get(8),
            events_processed: r.get(9),
            heartbeat_at: r.get(10),
            heartbeat_age_secs: r.get(11),
            last_error: r.get(12),
            last_error_at: r.get(13),
            created_at: r.get(14),
            updated_at: r.get(15),
            active: r.get(16),
        })
        .collect())
}

/// Whether `table` exists.
pub async fn has_table(
    client: &tokio_postgres::Client,
    table: &observer_core::schema::TableName,
) -> Result<bool> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.sql()])
        .await
        .map_err(db_err)?
        .get(0))
}

/// The failover lease of a listener, as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lease {
    pub token: i64,
    /// The instance id of the holder; none when the lease was handed back.
    pub holder: Option<Uuid>,
    pub holder_name: Option<String>,
    pub acquired_at: Option<DateTime<Utc>>,
    pub renewed_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Seconds until expiry by the database's clock (negative once expired).
    pub expires_in_secs: Option<f64>,
    pub lease_ms: Option<i64>,
    /// Held and not expired.
    pub held: bool,
}

/// One instance of a listener group (`observer_instances`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Instance {
    pub instance_id: Uuid,
    pub host: String,
    pub pid: i32,
    /// `leader`, `standby`, or `gone` (no heartbeat for longer than a lease: killed, or
    /// stopped without deregistering).
    pub role: String,
    /// Whether it holds the unexpired lease now.
    pub leads: bool,
    pub since: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub heartbeat_age_secs: f64,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// The lease and the registered instances of `listener`; `None` when the failover tables do
/// not exist (not migrated by a build with the layer).
pub async fn group(
    client: &tokio_postgres::Client,
    objects: &Objects,
    listener: &str,
) -> Result<Option<(Option<Lease>, Vec<Instance>)>> {
    if !has_table(client, &objects.leases).await? || !has_table(client, &objects.instances).await? {
        return Ok(None);
    }
    let lease = client
        .query_opt(
            &format!(
                "SELECT token, holder, holder_name, acquired_at, renewed_at, expires_at,
                        EXTRACT(EPOCH FROM expires_at - now())::float8, lease_ms,
                        holder IS NOT NULL AND expires_at > now()
                 FROM {} WHERE listener_id = $1",
                objects.leases.sql()
            ),
            &[&listener],
        )
        .await
        .map_err(db_err)?
        .map(|r| Lease {
            token: r.get(0),
            holder: r.get(1),
            holder_name: r.get(2),
            acquired_at: r.get(3),
            renewed_at: r.get(4),
            expires_at: r.get(5),
            expires_in_secs: r.get(6),
            lease_ms: r.get(7),
            held: r.get::<_, Option<bool>>(8).unwrap_or(false),
        });
    let stale_after = lease
        .as_ref()
        .and_then(|l| l.lease_ms)
        .unwrap_or(5_000)
        .max(1_000) as f64
        / 1000.0;
    let rows = client
        .query(
            &format!(
                "SELECT instance_id, host, pid, role, role_since, started_at, heartbeat_at,
                        EXTRACT(EPOCH FROM now() - heartbeat_at)::float8, lease_expires_at
                 FROM {} WHERE listener_id = $1 ORDER BY started_at, instance_id",
                objects.instances.sql()
            ),
            &[&listener],
        )
        .await
        .map_err(db_err)?;
    let instances = rows
        .iter()
        .map(|r| {
            let id: Uuid = r.get(0);
            let age: f64 = r.get::<_, Option<f64>>(7).unwrap_or(f64::INFINITY);
            let leads = lease
                .as_ref()
                .is_some_and(|l| l.held && l.holder == Some(id));
            let role: String = r.get(3);
            Instance {
                instance_id: id,
                host: r.get(1),
                pid: r.get(2),
                role: if leads {
                    "leader".into()
                } else if age > stale_after {
                    "gone".into()
                } else if role == "leader" {
                    // Its lease was lost or handed back and it has not stood by again yet.
                    "standby".into()
                } else {
                    role
                },
                leads,
                since: r.get(4),
                started_at: r.get(5),
                heartbeat_at: r.get(6),
                heartbeat_age_secs: age,
                lease_expires_at: r.get(8),
            }
        })
        .collect();
    Ok(Some((lease, instances)))
}

/// Fails with "run `migrate`" when our bookkeeping tables are not there.
pub async fn require_migrated(client: &tokio_postgres::Client, objects: &Objects) -> Result<()> {
    let sql = "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL AND to_regclass($3) IS NOT NULL";
    let ok: bool = client
        .query_one(
            sql,
            &[
                &objects.checkpoints.sql(),
                &objects.dead_letters.sql(),
                &objects.action_log.sql(),
            ],
        )
        .await?
        .get(0);
    if !ok {
        anyhow::bail!(
            "our tables are missing ({}, {}, {}): run `fraiseql-observers migrate` first",
            objects.checkpoints,
            objects.dead_letters,
            objects.action_log
        );
    }
    Ok(())
}

/// The configured observers, compiled as the daemon compiles them (secrets resolved).
pub fn observers(app: &App) -> Result<Observers> {
    compile(app, Secrets::Resolve)
}

/// The configured observers for matching and display only: secret references stay unresolved,
/// so inspecting needs no secret. Never execute these.
pub fn observers_for_inspection(app: &App) -> Result<Observers> {
    compile(app, Secrets::Unresolved)
}

fn compile(app: &App, secrets: Secrets) -> Result<Observers> {
    Observers::compile_with(&app.config, secrets).map_err(|issues| {
        let list: Vec<String> = issues.iter().map(|i| format!("  {i}")).collect();
        anyhow!(
            "invalid observers in the configuration:\n{}",
            list.join("\n")
        )
    })
}

/// The executor stack the daemon would build, without the queue layer: an operator command
/// delivers in this process (a queued job that was dead-lettered runs inline on `dlq retry`).
pub fn executor(app: &App) -> Result<BoxExecutor> {
    stack::check_features(&app.config)?;
    let pool = app.pool()?;
    let guard = std::sync::Arc::new(
        observer_core::outbound::Guard::new(&app.config.outbound.allow).map_err(|p| {
            let list: Vec<String> = p.iter().map(|(k, m)| format!("{k}: {m}")).collect();
            anyhow!("invalid settings: {}", list.join("; "))
        })?,
    );
    let http = ActionContext::http_client(guard.clone())
        .map_err(|e| anyhow!("building the HTTP client: {e}"))?;
    let webhook = observer_core::webhook_client::WebhookClient::new(
        guard.clone(),
        app.config.concurrent.max_in_flight,
    )
    .map_err(|e| anyhow!("building the webhook client: {e}"))?;
    let metrics = observer_core::metrics::Metrics::new();
    let state = stack::LayerState::new(&app.config, metrics.clone());
    let redis = app.redis()?;
    let ctx = ActionContext {
        http,
        webhook,
        pool,
        cache: stack::lookup_cache(&app.config, redis.as_ref()),
        redis,
        metrics,
        guard,
        max_response_bytes: app.config.outbound.max_response_bytes,
    };
    Ok(stack::build_inline(&app.config, ctx, &state))
}

/// Prints one JSON document, with the characters serde_json leaves raw in strings (C1
/// controls, DEL, line separators) escaped too: the same JSON, safe on a terminal.
pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    println!("{}", printable::escape_json(&text));
    Ok(())
}

/// `—` for a missing value in text output; a value is escaped ([`printable::escape`]).
pub fn or_dash<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| printable::escape(&x.to_string()).into_owned())
        .unwrap_or_else(|| "-".into())
}

/// Text from the database, an event or a receiver, escaped for a terminal line.
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    printable::escape(text)
}
