//! Reading the change log in snapshot windows, as PgQ does.
//!
//! A naive `pk > last_pk` cursor skips rows of transactions that commit after a later-numbered
//! row became visible. Instead we keep two snapshots, `lo` and `hi`: the window is every row
//! whose `txid` is visible in `hi` and not in `lo`. A transaction still open at `hi` joins the
//! window in which it commits, and an unrelated open transaction delays nobody (it is simply in
//! `xip` of both). Windows follow commit order; inside one, rows are ordered by pk, which row
//! locks make commit order for changes of one row. A big window is read in pages by pk, so
//! catch-up after downtime stays cheap.
//!
//! What one read brings into memory is bounded in bytes as well as in rows ([`ReadLimits`]): the
//! server measures each row's images before sending them, leaves out the images of a row over
//! `max_row_bytes` (it becomes a poison row, dead-lettered with its event id and pk), and ends a
//! read once the rows it holds reach `max_batch_bytes`.

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

/// What one read may bring into memory, in bytes of the images' uncompressed jsonb (see
/// [`ROW_BYTES`]): `[listener] max_row_bytes` and `max_batch_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// A row whose images are larger is not read: it becomes a poison row.
    pub max_row_bytes: i64,
    /// A window read ends with the row that brings what it holds to this (at least one row).
    pub max_batch_bytes: i64,
}

impl ReadLimits {
    pub fn from_config(l: &crate::config::ListenerConfig) -> ReadLimits {
        ReadLimits {
            max_row_bytes: l.max_row_bytes,
            max_batch_bytes: l.max_batch_bytes,
        }
    }
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits::from_config(&crate::config::ListenerConfig::default())
    }
}

/// One read of a window: its rows in pk order, and whether it ended because the rows reached
/// `max_batch_bytes` (the window may then hold more than a short page suggests).
#[derive(Debug, Clone)]
pub struct Page {
    pub rows: Vec<ChangeRow>,
    pub budget_reached: bool,
}

/// The daemon's reader: one connection, statements prepared once (one round trip per query).
pub struct WindowReader {
    client: tokio_postgres::Client,
    select: tokio_postgres::Statement,
    snapshot: tokio_postgres::Statement,
    quiet: tokio_postgres::Statement,
    limits: ReadLimits,
}

impl WindowReader {
    /// Whether no writer of the change log is committing right now, then the snapshot, in one
    /// round trip (pipelined, and in that order: a writer that has finished committing is in
    /// the snapshot; see [`crate::schema::WakeLocks`]).
    pub async fn quiet_snapshot(&self) -> Result<(bool, Snapshot), tokio_postgres::Error> {
        let (quiet, snap) = futures::join!(
            self.client.query_one(&self.quiet, &[]),
            self.client.query_one(&self.snapshot, &[])
        );
        Ok((quiet?.get(0), snapshot_from_row(&snap?)))
    }

    /// The rest of window (`lo`, `hi`) after `after_pk`, in pk order, through one cursor: the
    /// query runs (and sorts) once and [`WindowCursor::next_page`] fetches from it. Paging a
    /// large window with one LIMIT query per page re-scanned and re-sorted what was left of it
    /// every time: 145 ms for the first page of a 100,000-row window, falling page by page.
    /// The byte budget holds for each page of `page` rows (one fetch each); a page that reaches
    /// it ends the cursor ([`Page::budget_reached`]) and leaves the rest of the window for the
    /// next read.
    pub async fn rest(
        &mut self,
        lo: &Snapshot,
        hi: &Snapshot,
        after_pk: i64,
        page: i64,
    ) -> Result<WindowCursor<'_>, tokio_postgres::Error> {
        let (lo_xmax, xip, hi_xmax, hi_text) = window_params(lo, hi);
        let limits = self.limits;
        let tx = self.client.transaction().await?;
        let portal = tx
            .bind(
                &self.select,
                &[
                    &lo_xmax,
                    &xip,
                    &hi_xmax,
                    &hi_text,
                    &after_pk,
                    &i64::MAX,
                    &limits.max_row_bytes,
                    &limits.max_batch_bytes,
                    &page,
                ],
            )
            .await?;
        Ok(WindowCursor {
            tx,
            portal,
            limits,
            page,
        })
    }

    /// Up to `limit` rows of window (`lo`, `hi`) with pk above `after_pk`, in pk order, ending
    /// early at the byte budget.
    pub async fn read(
        &self,
        lo: &Snapshot,
        hi: &Snapshot,
        after_pk: i64,
        limit: i64,
    ) -> Result<Page, tokio_postgres::Error> {
        let (lo_xmax, xip, hi_xmax, hi_text) = window_params(lo, hi);
        let rows = self
            .client
            .query(
                &self.select,
                &[
                    &lo_xmax,
                    &xip,
                    &hi_xmax,
                    &hi_text,
                    &after_pk,
                    &limit,
                    &self.limits.max_row_bytes,
                    &self.limits.max_batch_bytes,
                    &limit,
                ],
            )
            .await?;
        Ok(page(&rows, self.limits))
    }
}

/// Decodes the rows of a window read (whose last column is the running byte count).
fn page(rows: &[Row], limits: ReadLimits) -> Page {
    let budget_reached = rows
        .last()
        .and_then(|r| r.try_get::<_, i64>(PAGE_BYTES_COLUMN).ok())
        .is_some_and(|read| read >= limits.max_batch_bytes);
    Page {
        rows: rows
            .iter()
            .map(|r| decode_row(r, limits.max_row_bytes))
            .collect(),
        budget_reached,
    }
}

/// An open cursor over the rest of a window (see [`WindowReader::rest`]). Every row of the
/// window is committed, so the cursor's own snapshot sees all of them.
pub struct WindowCursor<'a> {
    tx: tokio_postgres::Transaction<'a>,
    portal: tokio_postgres::Portal,
    limits: ReadLimits,
    /// The rows of a page: each fetch takes exactly one page, so the budget holds for each.
    page: i64,
}

impl WindowCursor<'_> {
    /// The next page of rows; fewer (or none) at the window's end or where a page reached the
    /// byte budget (the cursor ends there).
    pub async fn next_page(&self) -> Result<Page, tokio_postgres::Error> {
        let n = i32::try_from(self.page).unwrap_or(i32::MAX);
        let rows = self.tx.query_portal(&self.portal, n).await?;
        Ok(page(&rows, self.limits))
    }

    /// Closes the cursor and its (read-only) transaction.
    pub async fn finish(self) -> Result<(), tokio_postgres::Error> {
        self.tx.commit().await
    }
}

/// The change-log table and the queries over it.
#[derive(Debug, Clone)]
pub struct ChangeLog {
    table: TableName,
    select: String,
    limits: ReadLimits,
}

/// The columns we read, each cast so that an unexpected column type in an existing table can
/// still be read (and judged per row) rather than failing the whole batch.
///
/// Free text (`object_type`, `object_id`, `modification_type` and the images as JSON text) is
/// read as bytes: in a `SQL_ASCII` database Postgres stores any bytes, and sending text that is
/// not valid UTF-8 to a UTF-8 client fails the whole query, so one such row would stop the
/// reader for good. As bytes, [`decode`] judges each row on its own (a dead letter naming the
/// column). In every other server encoding `convert_to(…, 'UTF8')` is the usual conversion.
///
/// They are read from a subquery that selects [`RAW_COLUMNS`] and [`ROW_BYTES`] as `row_bytes`;
/// the images of a row over `max_row_bytes` (the `{max}` parameter) are not converted or sent,
/// and `row_bytes` follows as the eleventh column.
fn columns(max: &str, encoding: TextEncoding) -> String {
    let text = |expr: &str| match encoding {
        TextEncoding::Unknown => format!(
            "CASE WHEN current_setting('server_encoding') = 'SQL_ASCII' \
             THEN convert_to({expr}, 'SQL_ASCII') ELSE convert_to({expr}, 'UTF8') END"
        ),
        TextEncoding::SqlAscii => format!("convert_to({expr}, 'SQL_ASCII')"),
        // The server converts text to the client's encoding (UTF-8) as it sends it.
        TextEncoding::Checked => expr.to_string(),
    };
    let image = |col: &str| {
        text(&format!(
            "(CASE WHEN row_bytes > {max} THEN NULL ELSE {col} END)::jsonb::text"
        ))
    };
    format!(
        "pk_entity_change_log, id::text, created_at, {} AS object_type, {} AS object_id, \
         {} AS modification_type, {} AS object_data, {} AS object_data_before, tenant_id::text, \
         txid::text, row_bytes",
        text("object_type::text"),
        text("object_id::text"),
        text("modification_type::text"),
        image("object_data"),
        image("object_data_before"),
    )
}

/// How text columns reach us, by the server's encoding (`SHOW server_encoding`, fixed for the
/// life of a database).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoding {
    /// Not known yet: the query asks the server for every row (the cold paths).
    Unknown,
    /// `SQL_ASCII`: any bytes may be stored, so text is read as its bytes, unconverted.
    SqlAscii,
    /// Any other encoding: stored text is valid in it and the server converts it to UTF-8.
    Checked,
}

impl TextEncoding {
    /// The encoding of the database `client` is connected to.
    pub async fn of(client: &impl GenericClient) -> Result<TextEncoding, tokio_postgres::Error> {
        let row = client
            .query_one("SELECT current_setting('server_encoding')", &[])
            .await?;
        Ok(if row.get::<_, String>(0) == "SQL_ASCII" {
            TextEncoding::SqlAscii
        } else {
            TextEncoding::Checked
        })
    }
}

/// What the subqueries of [`columns`] select from the change log.
const RAW_COLUMNS: &str = "pk_entity_change_log, id, created_at, object_type, object_id, \
     modification_type, object_data, object_data_before, tenant_id, txid";

/// The uncompressed size of one image column (int4, 0 for NULL).
macro_rules! image_bytes {
    ($column:literal) => {
        concat!("coalesce(pg_column_size(", $column, "::jsonb #> '{}'), 0)")
    };
}

/// The size of a row's images as the daemon would hold them: the uncompressed jsonb of
/// `object_data` plus `object_data_before`, in bytes. `x #> '{}'` is the whole value,
/// decompressed (or fetched from TOAST) but not converted, so `pg_column_size` of it is the
/// uncompressed size where `pg_column_size(x)` would say what compression left: 10 MiB of `x`
/// stores in 240 kB. About 1 µs per ordinary row (100,000 rows of ~450 bytes), where the text
/// conversion of the same images costs ~5 µs (measured here). Decoded, the images take about 1
/// (strings) to 5 (arrays of small numbers) times this size in the daemon's memory, where their
/// JSON text can be 35 times smaller than that.
pub const ROW_BYTES: &str = concat!(
    "(",
    image_bytes!("object_data"),
    "::bigint + ",
    image_bytes!("object_data_before"),
    "::bigint)"
);

/// The `object_data` part of [`ROW_BYTES`].
const DATA_BYTES: &str = image_bytes!("object_data");

/// The `object_data_before` part of [`ROW_BYTES`].
const BEFORE_BYTES: &str = image_bytes!("object_data_before");

/// The column of a window read holding the running byte count of the row's page (after
/// `row_bytes`).
const PAGE_BYTES_COLUMN: usize = 11;

/// The reader session's settings, sent once when it connects.
///
/// * `plan_cache_mode = force_custom_plan`: a generic plan of the window query could walk the pk
///   index from the window's start through the whole table; custom plans always use the txid
///   index for the window bounds.
/// * `max_parallel_workers_per_gather = 0`: a window is read through the txid index and holds
///   what was written since the last read, so parallel workers cannot pay for themselves. Without
///   statistics on the change log (autovacuum off, or a table growing faster than it analyzes)
///   the planner estimated thousands of rows for a window and launched two workers for every
///   read: in a soak at 1.3 million rows a 120-row read took 29.9 ms instead of 0.36 ms, and
///   forking and tearing down the workers kept Postgres busy in the kernel (45 % of the
///   machine's CPU samples, load 3.5 at 1,000 events/s).
pub const READER_SESSION_SQL: &str =
    "SET plan_cache_mode = force_custom_plan; SET max_parallel_workers_per_gather = 0";

/// Longest `object_id` accepted; longer ones are poison (they key per-entity ordering).
const MAX_OBJECT_ID: usize = 1024;

/// The window query (see [`ChangeLog::window_sql`] for its parameters), its text columns read
/// as `encoding` says.
///
/// At a window's start (`$5` = 0) the pk condition folds away in the custom plan. Left in as
/// `pk > 0`, it let the planner AND a scan of the whole pk index with the txid range (its
/// estimate of `pk > 0` lags a growing table): 10 ms per read at 120,000 rows instead of 0.2 ms,
/// and p50 commit-to-delivery rose from 3.5 to 16 ms at 1,000/s.
///
/// The sort key is `pk + 0` so that the pk index cannot serve the ORDER BY: the planner
/// overestimates the rows of a txid range past its statistics (10,093 estimated, 120 read,
/// auto_explain in a soak at 355,000 rows) and, with ORDER BY pk LIMIT, walked the pk index from
/// the table's first row filtering on txid: 120–200 ms per read, the soak's lag growing with the
/// table. Every read is the txid range (bitmap) and one sort of the window's rows: its cost
/// follows the window, never the table.
///
/// The byte budget holds per page of `$9` rows (the rows one fetch of the cursor returns), so
/// one cursor can read a whole window of any size: every level above the sort streams in its
/// order. `cum` is the running size of the images (the two int4 sizes summed apart so the totals
/// stay int8 rather than numeric); `page_bytes` is `cum` less its value at the end of the
/// previous page (a running max over the rows before, which only the last row of each page
/// feeds), so it counts the row's own page up to and including the row; a row is cut, with every
/// row after it, once its page already held `$8` bytes before it. The outer query converts the
/// images of the rows kept, so nothing past the budget (or over `$7`) is converted or sent.
///
/// The budget used to hold for a cursor as a whole: a drain of 300,000 small rows (8 MiB of
/// images are ~60,000 of them) then re-ran the window's scan and sort from each cut, twice (a
/// page read, then a new cursor), and Postgres spent 12 µs of CPU per row read instead of 4
/// (docs/benchmarks.md).
fn window_query(table: &TableName, encoding: TextEncoding) -> String {
    format!(
        "SELECT {columns}, page_bytes FROM (
             SELECT *, bool_or(page_bytes - row_bytes >= $8::bigint)
                           OVER (ORDER BY ord ROWS UNBOUNDED PRECEDING) AS cut
             FROM (
                 SELECT *, cum - coalesce(max(CASE WHEN rn % $9::bigint = 0 THEN cum END)
                           OVER (ORDER BY ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                           AS page_bytes
                 FROM (
                     SELECT *, row_number() OVER w AS rn, sum(d) OVER w + sum(b) OVER w AS cum,
                            d::bigint + b::bigint AS row_bytes
                     FROM (
                         SELECT {RAW_COLUMNS}, pk_entity_change_log + 0 AS ord,
                                {DATA_BYTES} AS d, {BEFORE_BYTES} AS b
                         FROM {t}
                         WHERE (txid >= $1::text::xid8 OR txid = ANY($2::text[]::xid8[]))
                           AND txid < $3::text::xid8
                           AND pg_visible_in_snapshot(txid, $4::text::pg_snapshot)
                           AND (pk_entity_change_log > $5 OR $5 = 0)
                     ) s
                     WINDOW w AS (ORDER BY ord ROWS UNBOUNDED PRECEDING)
                     ORDER BY ord LIMIT $6
                 ) r
             ) p
         ) c
         WHERE NOT cut
         ORDER BY ord",
        columns = columns("$7::bigint", encoding),
        t = table.sql()
    )
}

impl ChangeLog {
    /// The queries over `table`, reading rows within the default [`ReadLimits`] (see
    /// [`ChangeLog::with_limits`]).
    pub fn new(table: TableName) -> ChangeLog {
        ChangeLog {
            select: window_query(&table, TextEncoding::Unknown),
            table,
            limits: ReadLimits::default(),
        }
    }

    /// The same queries reading rows within `limits` (`[listener] max_row_bytes` and
    /// `max_batch_bytes`).
    pub fn with_limits(mut self, limits: ReadLimits) -> ChangeLog {
        self.limits = limits;
        self
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The window query the reader prepares: `$1` the window's low xmax, `$2` its xip list,
    /// `$3` the high xmax, `$4` the high snapshot, `$5` the pk to continue after (0 at the
    /// window's start), `$6` the row limit, `$7` `max_row_bytes`, `$8` `max_batch_bytes`, `$9`
    /// the rows of a page (the budget holds per page). The columns are those of [`decode_row`],
    /// then `row_bytes` and the running `page_bytes`.
    pub fn window_sql(&self) -> &str {
        &self.select
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
        wake: crate::schema::WakeLocks,
    ) -> Result<WindowReader, tokio_postgres::Error> {
        client.batch_execute(READER_SESSION_SQL).await?;
        let encoding = TextEncoding::of(&client).await?;
        let select = client.prepare(&window_query(&self.table, encoding)).await?;
        let snapshot = client.prepare(SNAPSHOT_SQL).await?;
        let quiet = client.prepare(&wake.quiet_sql()).await?;
        Ok(WindowReader {
            client,
            select,
            snapshot,
            quiet,
            limits: self.limits,
        })
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
            "SELECT {columns} FROM (
                 SELECT {RAW_COLUMNS}, {ROW_BYTES} AS row_bytes FROM {t}
                 WHERE pk_entity_change_log > $1
                   AND ($2::bigint IS NULL OR pk_entity_change_log <= $2)
                   AND ($3::timestamptz IS NULL OR created_at >= $3)
                   AND ($4::timestamptz IS NULL OR created_at < $4)
                 ORDER BY pk_entity_change_log LIMIT $5
             ) r ORDER BY pk_entity_change_log",
            columns = columns("$6::bigint", TextEncoding::Unknown),
            t = self.table.sql()
        );
        let max = self.limits.max_row_bytes;
        let rows = client
            .query(
                &sql,
                &[&after_pk, &to_pk, &from_time, &to_time, &limit, &max],
            )
            .await?;
        Ok(rows.iter().map(|r| decode_row(r, max)).collect())
    }

    /// The newest `n` rows, newest first.
    pub async fn read_latest(
        &self,
        client: &impl GenericClient,
        n: i64,
    ) -> Result<Vec<ChangeRow>, tokio_postgres::Error> {
        let sql = format!(
            "SELECT {columns} FROM (
                 SELECT {RAW_COLUMNS}, {ROW_BYTES} AS row_bytes FROM {t}
                 ORDER BY pk_entity_change_log DESC LIMIT $1
             ) r ORDER BY pk_entity_change_log DESC",
            columns = columns("$2::bigint", TextEncoding::Unknown),
            t = self.table.sql()
        );
        let max = self.limits.max_row_bytes;
        Ok(client
            .query(&sql, &[&n, &max])
            .await?
            .iter()
            .map(|r| decode_row(r, max))
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
            "SELECT {columns} FROM (
                 SELECT {RAW_COLUMNS}, {ROW_BYTES} AS row_bytes FROM {t}
                 WHERE {condition} ORDER BY pk_entity_change_log LIMIT 1
             ) r",
            columns = columns("$2::bigint", TextEncoding::Unknown),
            t = self.table.sql()
        );
        let max = self.limits.max_row_bytes;
        Ok(client
            .query_opt(&sql, &[param, &max])
            .await?
            .as_ref()
            .map(|r| decode_row(r, max)))
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

/// One change-log row as the database sent it: each column's bytes in the binary wire format
/// (`None` for SQL NULL), before anything is judged. Text columns (`id`, `object_type`,
/// `object_id`, `modification_type`, `tenant_id`, `txid`) are the text's bytes, which need not
/// be UTF-8 in a `SQL_ASCII` database; `created_at` is a `timestamptz` (8 bytes, microseconds
/// since 2000-01-01 UTC); the images are their JSON text.
///
/// Kept apart from [`tokio_postgres::Row`] so that [`decode`] is a pure function that can be
/// tested and fuzzed on arbitrary bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawRow<'a> {
    pub pk: i64,
    pub id: Option<&'a [u8]>,
    pub created_at: Option<&'a [u8]>,
    pub object_type: Option<&'a [u8]>,
    pub object_id: Option<&'a [u8]>,
    pub modification_type: Option<&'a [u8]>,
    pub object_data: Option<&'a [u8]>,
    pub object_data_before: Option<&'a [u8]>,
    pub tenant_id: Option<&'a [u8]>,
    pub txid: Option<&'a [u8]>,
}

/// A column's bytes whatever its type: decoding, and judging, is [`decode`]'s job.
struct ColumnBytes<'a>(&'a [u8]);

impl<'a> tokio_postgres::types::FromSql<'a> for ColumnBytes<'a> {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(ColumnBytes(raw))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// Decodes one row; anything that cannot be an event becomes a poison row with the reason. A
/// row whose `row_bytes` (column 10) is over `max_row_bytes` arrived without its images: a
/// poison row that says so, keeping everything else it has (event id, pk, entity, …).
fn decode_row(row: &Row, max_row_bytes: i64) -> ChangeRow {
    let mut unreadable = None;
    let mut col = |i: usize| match row.try_get::<_, Option<ColumnBytes>>(i) {
        Ok(v) => v.map(|b| b.0),
        Err(e) => {
            unreadable.get_or_insert_with(|| format!("column {}: {e}", row.columns()[i].name()));
            None
        }
    };
    let raw = RawRow {
        pk: row.try_get(0).unwrap_or(0),
        id: col(1),
        created_at: col(2),
        object_type: col(3),
        object_id: col(4),
        modification_type: col(5),
        object_data: col(6),
        object_data_before: col(7),
        tenant_id: col(8),
        txid: col(9),
    };
    if unreadable.is_none() {
        match row.try_get::<_, i64>(ROW_BYTES_COLUMN) {
            Ok(bytes) if bytes > max_row_bytes => return oversized(&raw, bytes, max_row_bytes),
            Ok(_) => {}
            Err(e) => unreadable = Some(format!("column row_bytes: {e}")),
        }
    }
    match unreadable {
        Some(reason) => ChangeRow::Poison {
            pk: raw.pk,
            event_id: None,
            raw: raw_json(&raw),
            reason,
        },
        None => decode(&raw),
    }
}

/// The column of every read holding the row's image size ([`ROW_BYTES`]).
const ROW_BYTES_COLUMN: usize = 10;

/// The poison row of a row over `max_row_bytes`: the server sent everything but the images.
/// Its dead letter names the event (id, pk, entity, entity id, txid, …) and `row_bytes`.
pub fn oversized(raw: &RawRow<'_>, bytes: i64, max_row_bytes: i64) -> ChangeRow {
    let event_id = raw
        .id
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|t| Uuid::parse_str(t).ok());
    let mut json = raw_json(&RawRow {
        object_data: None,
        object_data_before: None,
        ..*raw
    });
    if let serde_json::Value::Object(m) = &mut json {
        m.insert("row_bytes".into(), bytes.into());
    }
    ChangeRow::Poison {
        pk: raw.pk,
        event_id,
        raw: json,
        reason: format!(
            "the row's images (object_data + object_data_before) are {bytes} bytes \
             uncompressed, more than listener.max_row_bytes ({max_row_bytes}), so they were not \
             read; to deliver the event, raise listener.max_row_bytes and run `dlq retry`"
        ),
    }
}

/// Text of a text column; invalid UTF-8 is an error naming the column and the byte offset.
fn text_column(name: &str, bytes: Option<&[u8]>) -> Result<Option<String>, String> {
    match bytes {
        None => Ok(None),
        Some(b) => match std::str::from_utf8(b) {
            Ok(t) => Ok(Some(t.to_string())),
            Err(e) => Err(format!(
                "column {name} is not valid UTF-8 (invalid byte at offset {}); a SQL_ASCII \
                 database stores such bytes unchecked",
                e.valid_up_to()
            )),
        },
    }
}

/// A JSON image column. serde_json refuses nesting deeper than 128 levels, which also keeps
/// every later recursive walk over the value (clone, drop, serialise) shallow.
fn json_column(name: &str, bytes: Option<&[u8]>) -> Result<Option<serde_json::Value>, String> {
    let Some(text) = bytes else { return Ok(None) };
    serde_json::from_slice(text).map(Some).map_err(|e| {
        let e = e.to_string();
        if e.starts_with("recursion limit exceeded") {
            format!("column {name}: JSON nested more than 128 levels deep (the decoder's limit)")
        } else if std::str::from_utf8(text).is_err() {
            format!(
                "column {name} is not valid UTF-8 JSON ({e}); a SQL_ASCII database stores such \
                 bytes unchecked"
            )
        } else {
            format!("column {name}: {e}")
        }
    })
}

/// `timestamptz` in the binary format: microseconds since 2000-01-01 00:00 UTC.
fn timestamp_column(bytes: Option<&[u8]>) -> Result<DateTime<Utc>, String> {
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
    let bytes = bytes.ok_or("created_at is NULL")?;
    let micros: [u8; 8] = bytes
        .try_into()
        .map_err(|_| format!("column created_at: {} bytes, expected 8", bytes.len()))?;
    match i64::from_be_bytes(micros) {
        i64::MAX => Err("created_at is 'infinity'".into()),
        i64::MIN => Err("created_at is '-infinity'".into()),
        t => t
            .checked_add(PG_EPOCH_MICROS)
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(|| "created_at is out of range".into()),
    }
}

/// The row for a dead letter: every column readable as far as it goes. Text that is not UTF-8
/// is shown with U+FFFD in place of the bad bytes; an image that is not valid JSON (too deep,
/// not UTF-8) is kept as its text.
pub fn raw_json(raw: &RawRow<'_>) -> serde_json::Value {
    use serde_json::Value;
    // NUL cannot be stored in the dead letter's jsonb column (Postgres text never holds one
    // either, but this must not be the reason a dead letter cannot be written).
    let lossy = |b: Option<&[u8]>| {
        b.map(|b| Value::String(String::from_utf8_lossy(b).replace('\0', "\u{FFFD}")))
            .unwrap_or(Value::Null)
    };
    let mut m = serde_json::Map::new();
    m.insert("pk_entity_change_log".into(), raw.pk.into());
    m.insert("id".into(), lossy(raw.id));
    m.insert(
        "created_at".into(),
        match timestamp_column(raw.created_at) {
            Ok(t) => Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            Err(_) if raw.created_at.is_none() => Value::Null,
            Err(e) => Value::String(e),
        },
    );
    m.insert("object_type".into(), lossy(raw.object_type));
    m.insert("object_id".into(), lossy(raw.object_id));
    m.insert("modification_type".into(), lossy(raw.modification_type));
    for (name, bytes) in [
        ("object_data", raw.object_data),
        ("object_data_before", raw.object_data_before),
    ] {
        let v = match json_column(name, bytes) {
            Ok(v) => v.unwrap_or(Value::Null),
            Err(_) => lossy(bytes),
        };
        m.insert(name.into(), v);
    }
    m.insert("tenant_id".into(), lossy(raw.tenant_id));
    m.insert("txid".into(), lossy(raw.txid));
    Value::Object(m)
}

/// Judges one row: an event, or a poison row with the reason it cannot be one. Pure and total:
/// any bytes give one or the other, never a panic.
pub fn decode(raw: &RawRow<'_>) -> ChangeRow {
    let pk = raw.pk;
    let id_text = text_column("id", raw.id);
    let event_id = id_text
        .as_ref()
        .ok()
        .and_then(|t| t.as_deref())
        .and_then(|t| Uuid::parse_str(t).ok());
    let result = (|| -> Result<ChangeEvent, String> {
        let id = match id_text? {
            Some(t) => Uuid::parse_str(&t).map_err(|_| format!("id `{t}` is not a UUID"))?,
            None => return Err("id is NULL".into()),
        };
        let created_at = timestamp_column(raw.created_at)?;
        let entity = text_column("object_type", raw.object_type)?.ok_or("object_type is NULL")?;
        if entity.trim().is_empty() {
            return Err("object_type is empty".into());
        }
        let op_text = text_column("modification_type", raw.modification_type)?
            .ok_or("modification_type is NULL")?;
        let operation = Operation::parse(&op_text).ok_or_else(|| {
            format!(
                "unknown modification_type `{op_text}`: expected INSERT, UPDATE, DELETE or CUSTOM"
            )
        })?;
        let entity_id = text_column("object_id", raw.object_id)?;
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
        let tenant_id = match text_column("tenant_id", raw.tenant_id)? {
            Some(t) => {
                Some(Uuid::parse_str(&t).map_err(|_| format!("tenant_id `{t}` is not a UUID"))?)
            }
            None => None,
        };
        let txid_text = text_column("txid", raw.txid)?.ok_or("txid is NULL")?;
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
            data: json_column("object_data", raw.object_data)?,
            before: json_column("object_data_before", raw.object_data_before)?,
            tenant_id,
            txid,
        })
    })();
    match result {
        Ok(e) => ChangeRow::Event(e),
        Err(reason) => ChangeRow::Poison {
            pk,
            event_id,
            raw: raw_json(raw),
            reason,
        },
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

    const ID: &str = "8d6f2a52-54a4-4d40-9f6b-1f1d3c7a0b11";

    fn jsonb(text: &str) -> Vec<u8> {
        text.as_bytes().to_vec()
    }

    fn good<'a>(ts: &'a [u8], data: &'a [u8]) -> RawRow<'a> {
        RawRow {
            pk: 7,
            id: Some(ID.as_bytes()),
            created_at: Some(ts),
            object_type: Some(b"Order"),
            object_id: Some(b"42"),
            modification_type: Some(b"update"),
            object_data: Some(data),
            object_data_before: None,
            tenant_id: None,
            txid: Some(b"991"),
        }
    }

    fn poison(raw: &RawRow<'_>) -> (String, serde_json::Value) {
        match decode(raw) {
            ChangeRow::Poison { reason, raw, .. } => (reason, raw),
            ChangeRow::Event(e) => panic!("decoded: {e:?}"),
        }
    }

    #[test]
    fn decodes_a_good_row() {
        // 2024-01-01T00:00:00Z is 757,382,400 s after 2000-01-01.
        let ts = (757_382_400_i64 * 1_000_000).to_be_bytes();
        let data = jsonb(r#"{"status": "paid"}"#);
        let ChangeRow::Event(e) = decode(&good(&ts, &data)) else {
            panic!("poison")
        };
        assert_eq!(e.id.to_string(), ID);
        assert_eq!(e.created_at.to_rfc3339(), "2024-01-01T00:00:00+00:00");
        assert_eq!(e.operation, Operation::Update);
        assert_eq!(e.entity_id.as_deref(), Some("42"));
        assert_eq!(e.data, Some(serde_json::json!({"status": "paid"})));
        assert_eq!((e.pk, e.txid, e.before), (7, 991, None));
    }

    /// Regressions of the row decoder found by tests/fuzz.rs and the bad-row e2e test: each is a
    /// poison row with a reason that names the column, and a raw row that can be stored.
    #[test]
    fn bad_columns_are_poison_with_clear_reasons() {
        let ts = 0i64.to_be_bytes();
        let data = jsonb("{}");

        let mut r = good(&ts, &data);
        r.object_type = Some(b"Ord\xe9r\x00");
        let (reason, raw) = poison(&r);
        assert!(
            reason.contains("object_type is not valid UTF-8"),
            "{reason}"
        );
        assert_eq!(raw["object_type"], "Ord\u{FFFD}r\u{FFFD}", "{raw}");
        assert_eq!(raw["id"], ID);

        let deep = jsonb(&format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000)));
        let r = good(&ts, &deep);
        let (reason, raw) = poison(&r);
        assert!(
            reason.contains("object_data: JSON nested more than 128 levels"),
            "{reason}"
        );
        assert_eq!(raw["object_data"].as_str().map(str::len), Some(20_001));

        let bad_json = b"{\"s\": \"\xff\"}".to_vec();
        let (reason, _) = poison(&good(&ts, &bad_json));
        assert!(
            reason.contains("object_data is not valid UTF-8 JSON"),
            "{reason}"
        );

        let mut r = good(&ts, &data);
        r.created_at = None;
        assert_eq!(poison(&r).0, "created_at is NULL");
        let inf = i64::MAX.to_be_bytes();
        assert_eq!(poison(&good(&inf, &data)).0, "created_at is 'infinity'");
        let short = [0u8; 3];
        assert!(poison(&good(&short, &data)).0.contains("3 bytes"));

        let mut r = good(&ts, &data);
        r.modification_type = Some(b"TRUNCATE");
        assert!(poison(&r)
            .0
            .contains("unknown modification_type `TRUNCATE`"));
        let mut r = good(&ts, &data);
        r.object_data = Some(b"");
        assert!(poison(&r).0.contains("column object_data: EOF"));
    }
}
