//! Reading the change log in snapshot windows, as PgQ does.
//!
//! A naive `pk > last_pk` cursor skips rows of transactions that commit after a later-numbered
//! row became visible. Instead we keep two snapshots, `lo` and `hi`: the window is every row
//! whose `txid` is visible in `hi` and not in `lo`. A transaction still open at `hi` joins the
//! window in which it commits, and an unrelated open transaction delays nobody (it is simply in
//! `xip` of both). Windows follow commit order; inside one, rows are ordered by pk, which row
//! locks make commit order for changes of one row. A big window is read in pages by pk, so
//! catch-up after downtime stays cheap.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::event::{ChangeEvent, Operation};
use crate::schema::TableName;

/// A Postgres `pg_snapshot`: transactions below `xmin` are finished, `xip` were in progress,
/// `xmax` and above had not started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Whether `txid` had committed (or aborted) when the snapshot was taken.
    pub fn is_visible(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && !self.xip.contains(&txid))
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        let xip: Vec<String> = self.xip.iter().map(|x| x.to_string()).collect();
        f.write_str(&xip.join(","))
    }
}

/// Text that is not a `pg_snapshot`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid snapshot `{0}`: expected xmin:xmax:xip,…")]
pub struct SnapshotParseError(pub String);

impl FromStr for Snapshot {
    type Err = SnapshotParseError;
    fn from_str(s: &str) -> Result<Snapshot, SnapshotParseError> {
        let err = || SnapshotParseError(s.to_string());
        let mut parts = s.splitn(3, ':');
        let xmin = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        let xmax = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        let xip_text = parts.next().ok_or_else(err)?;
        let mut xip = Vec::new();
        for x in xip_text.split(',').filter(|x| !x.is_empty()) {
            xip.push(x.parse().map_err(|_| err())?);
        }
        if xmin > xmax {
            return Err(err());
        }
        Ok(Snapshot { xmin, xmax, xip })
    }
}

/// A position in the change log: every row of windows before (`lo`, `hi`) is done, and inside
/// that window every row with pk ≤ `after_pk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub lo: Snapshot,
    pub hi: Snapshot,
    pub after_pk: i64,
}

impl Position {
    /// The position at the start of an empty window at `snap` ("everything visible in snap is done").
    pub fn at(snap: Snapshot) -> Position {
        Position {
            lo: snap.clone(),
            hi: snap,
            after_pk: 0,
        }
    }

    /// A position from which every row written by transaction `txid` or a later-started one is
    /// read again (used by `checkpoint set --event-id`). Rows of later transactions can have lower
    /// pks than the event, so the window is read from its start, not from the event's pk.
    pub fn replay_from(txid: u64, now: Snapshot) -> Position {
        Position {
            lo: Snapshot {
                xmin: txid,
                xmax: txid,
                xip: vec![],
            },
            hi: now,
            after_pk: 0,
        }
    }
}

/// One row as read: a decoded event, or the reason it cannot be one (a poison row).
#[derive(Debug, Clone)]
pub enum ChangeRow {
    Event(ChangeEvent),
    Poison {
        pk: i64,
        event_id: Option<Uuid>,
        raw: serde_json::Value,
        reason: String,
    },
}

impl ChangeRow {
    pub fn pk(&self) -> i64 {
        match self {
            ChangeRow::Event(e) => e.pk,
            ChangeRow::Poison { pk, .. } => *pk,
        }
    }
}

/// The current snapshot as its three parts, so no text parsing can fail.
const SNAPSHOT_SQL: &str = "SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text,
        ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x ORDER BY x)
 FROM pg_current_snapshot() s";

fn snapshot_from_row(row: &Row) -> Snapshot {
    let num = |t: String| t.parse::<u64>().unwrap_or(0);
    let xip: Vec<String> = row.get(2);
    Snapshot {
        xmin: num(row.get(0)),
        xmax: num(row.get(1)),
        xip: xip.into_iter().map(num).collect(),
    }
}

fn window_params(lo: &Snapshot, hi: &Snapshot) -> (String, Vec<String>, String, String) {
    (
        lo.xmax.to_string(),
        lo.xip.iter().map(|x| x.to_string()).collect(),
        hi.xmax.to_string(),
        hi.to_string(),
    )
}

/// The daemon's reader: one connection, statements prepared once (one round trip per query).
pub struct WindowReader {
    client: tokio_postgres::Client,
    select: tokio_postgres::Statement,
    snapshot: tokio_postgres::Statement,
}

impl WindowReader {
    /// The database's current snapshot.
    pub async fn snapshot(&self) -> Result<Snapshot, tokio_postgres::Error> {
        Ok(snapshot_from_row(
            &self.client.query_one(&self.snapshot, &[]).await?,
        ))
    }

    /// Up to `limit` rows of window (`lo`, `hi`) with pk above `after_pk`, in pk order.
    pub async fn read(
        &self,
        lo: &Snapshot,
        hi: &Snapshot,
        after_pk: i64,
        limit: i64,
    ) -> Result<Vec<ChangeRow>, tokio_postgres::Error> {
        let (lo_xmax, xip, hi_xmax, hi_text) = window_params(lo, hi);
        let rows = self
            .client
            .query(
                &self.select,
                &[&lo_xmax, &xip, &hi_xmax, &hi_text, &after_pk, &limit],
            )
            .await?;
        Ok(rows.iter().map(decode_row).collect())
    }
}

/// The change-log table and the queries over it.
#[derive(Debug, Clone)]
pub struct ChangeLog {
    table: TableName,
    select: String,
}

/// The columns we read, each cast so that an unexpected column type in an existing table can
/// still be read (and judged per row) rather than failing the whole batch.
const COLUMNS: &str = "pk_entity_change_log, id::text, created_at, object_type::text, object_id::text, \
     modification_type::text, object_data::jsonb, object_data_before::jsonb, tenant_id::text, txid::text";

/// Longest `object_id` accepted; longer ones are poison (they key per-entity ordering).
const MAX_OBJECT_ID: usize = 1024;

impl ChangeLog {
    pub fn new(table: TableName) -> ChangeLog {
        let select = format!(
            "SELECT {COLUMNS} FROM {t}
             WHERE (txid >= $1::text::xid8 OR txid = ANY($2::text[]::xid8[]))
               AND txid < $3::text::xid8
               AND pg_visible_in_snapshot(txid, $4::text::pg_snapshot)
               AND pk_entity_change_log > $5
             ORDER BY pk_entity_change_log LIMIT $6",
            t = table.sql()
        );
        ChangeLog { table, select }
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The database's current snapshot.
    pub async fn current_snapshot(
        client: &impl GenericClient,
    ) -> Result<Snapshot, tokio_postgres::Error> {
        Ok(snapshot_from_row(
            &client.query_one(SNAPSHOT_SQL, &[]).await?,
        ))
    }

    /// A reader holding `client` with the window and snapshot queries prepared once.
    pub async fn reader(
        &self,
        client: tokio_postgres::Client,
    ) -> Result<WindowReader, tokio_postgres::Error> {
        // A generic plan of the window query could walk the pk index from the window's start
        // through the whole table; custom plans always use the txid index for the window bounds.
        client
            .batch_execute("SET plan_cache_mode = force_custom_plan")
            .await?;
        let select = client.prepare(&self.select).await?;
        let snapshot = client.prepare(SNAPSHOT_SQL).await?;
        Ok(WindowReader {
            client,
            select,
            snapshot,
        })
    }

    /// Up to `limit` rows of window (`lo`, `hi`) with pk above `after_pk`, in pk order.
    pub async fn read_window(
        &self,
        client: &impl GenericClient,
        lo: &Snapshot,
        hi: &Snapshot,
        after_pk: i64,
        limit: i64,
    ) -> Result<Vec<ChangeRow>, tokio_postgres::Error> {
        let (lo_xmax, xip, hi_xmax, hi_text) = window_params(lo, hi);
        let rows = client
            .query(
                &self.select,
                &[&lo_xmax, &xip, &hi_xmax, &hi_text, &after_pk, &limit],
            )
            .await?;
        Ok(rows.iter().map(decode_row).collect())
    }

    /// Rows by pk range or time range, in pk order (replay and debugging), whatever their window.
    pub async fn read_range(
        &self,
        client: &impl GenericClient,
        after_pk: i64,
        to_pk: Option<i64>,
        from_time: Option<DateTime<Utc>>,
        to_time: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<ChangeRow>, tokio_postgres::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {t}
             WHERE pk_entity_change_log > $1
               AND ($2::bigint IS NULL OR pk_entity_change_log <= $2)
               AND ($3::timestamptz IS NULL OR created_at >= $3)
               AND ($4::timestamptz IS NULL OR created_at < $4)
             ORDER BY pk_entity_change_log LIMIT $5",
            t = self.table.sql()
        );
        let rows = client
            .query(&sql, &[&after_pk, &to_pk, &from_time, &to_time, &limit])
            .await?;
        Ok(rows.iter().map(decode_row).collect())
    }

    /// The newest `n` rows, newest first.
    pub async fn read_latest(
        &self,
        client: &impl GenericClient,
        n: i64,
    ) -> Result<Vec<ChangeRow>, tokio_postgres::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {t} ORDER BY pk_entity_change_log DESC LIMIT $1",
            t = self.table.sql()
        );
        Ok(client
            .query(&sql, &[&n])
            .await?
            .iter()
            .map(decode_row)
            .collect())
    }

    /// The row with event id `id` (the first, should an application have written it twice).
    pub async fn read_event(
        &self,
        client: &impl GenericClient,
        id: Uuid,
    ) -> Result<Option<ChangeRow>, tokio_postgres::Error> {
        self.read_one(client, "id = $1", &id).await
    }

    /// The row with change-log pk `pk`.
    pub async fn read_pk(
        &self,
        client: &impl GenericClient,
        pk: i64,
    ) -> Result<Option<ChangeRow>, tokio_postgres::Error> {
        self.read_one(client, "pk_entity_change_log = $1", &pk)
            .await
    }

    async fn read_one(
        &self,
        client: &impl GenericClient,
        condition: &str,
        param: &(dyn tokio_postgres::types::ToSql + Sync),
    ) -> Result<Option<ChangeRow>, tokio_postgres::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {t} WHERE {condition} ORDER BY pk_entity_change_log LIMIT 1",
            t = self.table.sql()
        );
        Ok(client
            .query_opt(&sql, &[param])
            .await?
            .as_ref()
            .map(decode_row))
    }

    /// Rows not yet done at `pos`, and the age of the oldest of them.
    pub async fn backlog(
        &self,
        client: &impl GenericClient,
        pos: &Position,
    ) -> Result<(i64, Option<DateTime<Utc>>), tokio_postgres::Error> {
        let sql = format!(
            "SELECT count(*), min(created_at) FROM {t}
             WHERE (txid >= $1::text::xid8 OR txid = ANY($2::text[]::xid8[]))
               AND NOT (pg_visible_in_snapshot(txid, $3::text::pg_snapshot) AND pk_entity_change_log <= $4)",
            t = self.table.sql()
        );
        let xip: Vec<String> = pos.lo.xip.iter().map(|x| x.to_string()).collect();
        let row = client
            .query_one(
                &sql,
                &[
                    &pos.lo.xmax.to_string(),
                    &xip,
                    &pos.hi.to_string(),
                    &pos.after_pk,
                ],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }
}

/// Decodes one row; anything that cannot be an event becomes a poison row with the reason.
fn decode_row(row: &Row) -> ChangeRow {
    let pk: i64 = row.try_get(0).unwrap_or(0);
    let text = |i: usize| -> Result<Option<String>, String> {
        row.try_get::<_, Option<String>>(i)
            .map_err(|e| format!("column {}: {e}", row.columns()[i].name()))
    };
    let json = |i: usize| -> Result<Option<serde_json::Value>, String> {
        row.try_get::<_, Option<serde_json::Value>>(i)
            .map_err(|e| format!("column {}: {e}", row.columns()[i].name()))
    };
    let id_text = text(1);
    let event_id = id_text
        .as_ref()
        .ok()
        .and_then(|t| t.as_deref())
        .and_then(|t| Uuid::parse_str(t).ok());
    let raw = || {
        let mut m = serde_json::Map::new();
        m.insert("pk_entity_change_log".into(), pk.into());
        for (i, name) in [
            (1, "id"),
            (3, "object_type"),
            (4, "object_id"),
            (5, "modification_type"),
            (8, "tenant_id"),
            (9, "txid"),
        ] {
            m.insert(
                name.into(),
                text(i)
                    .ok()
                    .flatten()
                    .map(serde_json::Value::String)
                    .unwrap_or(serde_json::Value::Null),
            );
        }
        for (i, name) in [(6, "object_data"), (7, "object_data_before")] {
            m.insert(
                name.into(),
                json(i).ok().flatten().unwrap_or(serde_json::Value::Null),
            );
        }
        serde_json::Value::Object(m)
    };
    let poison = |reason: String| ChangeRow::Poison {
        pk,
        event_id,
        raw: raw(),
        reason,
    };
    let result = (|| -> Result<ChangeEvent, String> {
        let id = match id_text? {
            Some(t) => Uuid::parse_str(&t).map_err(|_| format!("id `{t}` is not a UUID"))?,
            None => return Err("id is NULL".into()),
        };
        let created_at: DateTime<Utc> = row
            .try_get(2)
            .map_err(|e| format!("column created_at: {e}"))?;
        let entity = text(3)?.ok_or("object_type is NULL")?;
        if entity.trim().is_empty() {
            return Err("object_type is empty".into());
        }
        let op_text = text(5)?.ok_or("modification_type is NULL")?;
        let operation = Operation::parse(&op_text).ok_or_else(|| {
            format!(
                "unknown modification_type `{op_text}`: expected INSERT, UPDATE, DELETE or CUSTOM"
            )
        })?;
        let entity_id = text(4)?;
        match &entity_id {
            None if operation != Operation::Custom => {
                return Err(format!(
                    "object_id is NULL on a {operation} (only CUSTOM events may omit it)"
                ))
            }
            Some(id) if id.is_empty() => return Err("object_id is empty".into()),
            Some(id) if id.len() > MAX_OBJECT_ID => {
                return Err(format!(
                    "object_id is {} bytes long (at most {MAX_OBJECT_ID})",
                    id.len()
                ))
            }
            Some(id) if id.chars().any(|c| c.is_control()) => {
                return Err("object_id contains control characters".into())
            }
            _ => {}
        }
        let tenant_id = match text(8)? {
            Some(t) => {
                Some(Uuid::parse_str(&t).map_err(|_| format!("tenant_id `{t}` is not a UUID"))?)
            }
            None => None,
        };
        let txid_text = text(9)?.ok_or("txid is NULL")?;
        let txid = txid_text
            .parse::<u64>()
            .map_err(|_| format!("txid `{txid_text}` is not a transaction id"))?;
        Ok(ChangeEvent {
            pk,
            id,
            created_at,
            entity,
            entity_id,
            operation,
            data: json(6)?,
            before: json(7)?,
            tenant_id,
            txid,
        })
    })();
    match result {
        Ok(e) => ChangeRow::Event(e),
        Err(reason) => poison(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_text_round_trips_and_visibility() {
        let s: Snapshot = "10:20:12,15".parse().unwrap();
        assert_eq!(s.to_string(), "10:20:12,15");
        assert!(s.is_visible(9));
        assert!(s.is_visible(11));
        assert!(!s.is_visible(12));
        assert!(!s.is_visible(20));
        let e: Snapshot = "5:5:".parse().unwrap();
        assert!(e.xip.is_empty());
        assert!("x:1:".parse::<Snapshot>().is_err());
        assert!("9:5:".parse::<Snapshot>().is_err());
        assert!("1:5".parse::<Snapshot>().is_err());
    }
}
