//! The database objects the daemon reads and writes, and `migrate`, which installs them
//! idempotently: the change-log table (or the columns an existing one lacks), its NOTIFY trigger,
//! the capture trigger function, and our bookkeeping tables (checkpoints, dead letters, action
//! log). All of it runs in one transaction under an advisory lock, so two concurrent `migrate`s
//! cannot interleave and a failure leaves nothing half-installed.

use tokio_postgres::GenericClient;

/// A validated `schema.table` name. Both parts are quoted wherever they reach SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

/// A name that cannot be used as a Postgres identifier here.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid table name `{name}`: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: String,
}

fn valid_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && s.len() <= 63
}

/// `"name"` with embedded quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl TableName {
    /// Parses `table` or `schema.table` (schema defaults to `public`).
    pub fn parse(name: &str) -> Result<TableName, NameError> {
        let err = |reason: &str| NameError {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = name.split('.').collect();
        let (schema, table) = match parts.as_slice() {
            [t] => ("public", *t),
            [s, t] => (*s, *t),
            _ => return Err(err("expected `table` or `schema.table`")),
        };
        if !valid_ident(schema) || !valid_ident(table) {
            return Err(err("each part must be letters, digits, `_` or `$`, start with a letter or `_`, at most 63 bytes"));
        }
        Ok(TableName {
            schema: schema.to_string(),
            table: table.to_string(),
        })
    }

    /// The quoted `"schema"."table"`.
    pub fn sql(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// Another table in the same schema.
    pub fn sibling(&self, table: &str) -> TableName {
        TableName {
            schema: self.schema.clone(),
            table: table.to_string(),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// The advisory locks of the wake-up protocol (see [`NOTIFY_FUNCTION_QUERY`]), two-key
/// form (`objsubid` 2), so they never collide with the one-key listener and migration locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeLocks {
    /// From the channel name, so daemons on different channels do not wait on each other.
    pub key: i32,
}

impl WakeLocks {
    /// Held by the one committing writer that sends the NOTIFY ("FQO1").
    pub const NOTIFYING_CLASS: i32 = 0x4651_4f31;
    /// Held (shared) by every writer while it commits ("FQO2").
    pub const COMMITTING_CLASS: i32 = 0x4651_4f32;

    pub fn for_channel(channel: &str) -> WakeLocks {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut h: u32 = 0x811c_9dc5;
        for b in channel.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        WakeLocks { key: h as i32 }
    }

    /// The transaction-local setting that marks "this transaction has queued its wake-up".
    fn setting(&self) -> String {
        format!("fraiseql_observers.wake_{:08x}", self.key as u32)
    }

    /// True when no writer is committing right now: takes and at once releases the
    /// `committing` lock exclusively (never waits). Run it before taking the snapshot.
    pub fn quiet_sql(&self) -> String {
        format!(
            "SELECT CASE WHEN pg_try_advisory_lock({c}, {k}) THEN pg_advisory_unlock({c}, {k}) ELSE false END",
            c = WakeLocks::COMMITTING_CLASS,
            k = self.key
        )
    }
}

/// The names of every object we own, derived from the change-log table's name.
#[derive(Debug, Clone)]
pub struct Objects {
    pub change_log: TableName,
    pub checkpoints: TableName,
    pub dead_letters: TableName,
    pub action_log: TableName,
    /// The failover layer's leases (one row per listener) and instance registry.
    pub leases: TableName,
    pub instances: TableName,
    /// The audit trail of `features.search`: one row per completed event, with the observers it
    /// matched and every action's attempts (observer-core/src/audit.rs).
    pub audit: TableName,
    /// The search indexer's durable watermark, one row per listener (observer-features/src/search.rs).
    pub search_index: TableName,
    /// The NOTIFY channel.
    pub channel: String,
}

impl Objects {
    pub fn new(change_log: TableName, channel: &str) -> Objects {
        Objects {
            checkpoints: change_log.sibling("observer_checkpoints"),
            dead_letters: change_log.sibling("observer_dead_letters"),
            action_log: change_log.sibling("observer_action_log"),
            leases: change_log.sibling("observer_leases"),
            instances: change_log.sibling("observer_instances"),
            audit: change_log.sibling("observer_audit"),
            search_index: change_log.sibling("observer_search_index"),
            change_log,
            channel: channel.to_string(),
        }
    }

    /// The capture trigger function (one per schema of the change log).
    pub fn capture_function(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.change_log.schema),
            quote_ident("fraiseql_observers_capture")
        )
    }

    fn notify_function(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.change_log.schema),
            quote_ident("fraiseql_observers_notify")
        )
    }

    fn first_write_function(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.change_log.schema),
            quote_ident("fraiseql_observers_first_write")
        )
    }

    /// The advisory locks of the wake-up protocol on this channel.
    pub fn wake_locks(&self) -> WakeLocks {
        WakeLocks::for_channel(&self.channel)
    }

    /// True for the first change-log row a transaction writes, false after: the notify trigger
    /// is queued once per transaction, not once per row (a transaction-local setting, so a
    /// rolled-back savepoint forgets it together with the trigger event it queued).
    fn first_write_function_sql(&self) -> String {
        let setting = self.wake_locks().setting();
        format!(
            "CREATE OR REPLACE FUNCTION {}() RETURNS boolean LANGUAGE plpgsql AS $fn$
             BEGIN
                 IF current_setting('{setting}', true) = '1' THEN RETURN false; END IF;
                 PERFORM set_config('{setting}', '1', true);
                 RETURN true;
             END $fn$",
            self.first_write_function()
        )
    }

    /// The commit-time half of the wake-up (its statement is rendered by the server, see
    /// [`NOTIFY_FUNCTION_QUERY`]). A NOTIFY makes every notifying commit in the
    /// database wait for the one before it (Postgres serialises them on one lock, held through
    /// the WAL flush, so commits stop sharing flushes): with a NOTIFY on every statement, 16
    /// clients doing single-row INSERTs into a captured table reached 2,100 a second against
    /// 4,488 with no wake-up at all (docs/benchmarks.md, "The write path"). So only one committing transaction at
    /// a time notifies: it holds the `notifying` lock until its commit ends. Every writer holds
    /// the `committing` lock (shared) from here until its commit ends, and the reader, after a
    /// notification, keeps looking while any writer still holds it. A writer that skips the
    /// NOTIFY therefore has its rows read either because they are visible by the time the
    /// reader looks (the notifier's commit ended after this writer took `committing`) or
    /// because the reader sees it still committing and looks again shortly.
    async fn notify_function_sql(
        &self,
        client: &impl GenericClient,
    ) -> Result<String, tokio_postgres::Error> {
        let key = self.wake_locks().key;
        client
            .query_one(
                NOTIFY_FUNCTION_QUERY,
                &[
                    &self.change_log.schema,
                    &WakeLocks::COMMITTING_CLASS,
                    &key,
                    &WakeLocks::NOTIFYING_CLASS,
                    &self.channel,
                ],
            )
            .await
            .map(|row| row.get(0))
    }

    /// Every statement `migrate` runs, in order.
    pub fn migration(&self) -> Vec<MigrationStep> {
        let cl = self.change_log.sql();
        let schema = quote_ident(&self.change_log.schema);
        let idx = |suffix: &str| quote_ident(&format!("{}_{}", self.change_log.table, suffix));
        let sql = [
            format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
            format!(
                "CREATE TABLE IF NOT EXISTS {cl} (
                    pk_entity_change_log BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    id UUID NOT NULL DEFAULT gen_random_uuid(),
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    object_type TEXT NOT NULL,
                    object_id TEXT,
                    modification_type TEXT NOT NULL,
                    object_data JSONB,
                    object_data_before JSONB,
                    tenant_id UUID,
                    txid xid8 NOT NULL DEFAULT pg_current_xact_id()
                )"
            ),
            // An existing table (e.g. FraiseQL's core.tb_entity_change_log) keeps its columns and
            // rows; we only add what we read and it lacks.
            format!("ALTER TABLE {cl} ADD COLUMN IF NOT EXISTS id UUID NOT NULL DEFAULT gen_random_uuid()"),
            format!("ALTER TABLE {cl} ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now()"),
            format!("ALTER TABLE {cl} ADD COLUMN IF NOT EXISTS object_data_before JSONB"),
            format!("ALTER TABLE {cl} ADD COLUMN IF NOT EXISTS tenant_id UUID"),
            format!("ALTER TABLE {cl} ADD COLUMN IF NOT EXISTS txid xid8 NOT NULL DEFAULT pg_current_xact_id()"),
            format!("CREATE INDEX IF NOT EXISTS {} ON {cl} (txid)", idx("txid_idx")),
            format!("CREATE INDEX IF NOT EXISTS {} ON {cl} (id)", idx("id_idx")),
            format!("CREATE INDEX IF NOT EXISTS {} ON {cl} (created_at)", idx("created_at_idx")),
            // The wake-up (see `wake_sql`): a deferred trigger, queued once per transaction
            // that writes the change log, whoever writes it.
            self.first_write_function_sql(),
        ];
        let after_notify_function = [
            format!("DROP TRIGGER IF EXISTS fraiseql_observers_notify ON {cl}"),
            format!(
                "CREATE CONSTRAINT TRIGGER fraiseql_observers_notify AFTER INSERT ON {cl}
                 DEFERRABLE INITIALLY DEFERRED
                 FOR EACH ROW WHEN ({}()) EXECUTE FUNCTION {}()",
                self.first_write_function(),
                self.notify_function()
            ),
            self.capture_function_sql(),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    listener_id TEXT PRIMARY KEY,
                    window_lo pg_snapshot NOT NULL,
                    window_hi pg_snapshot NOT NULL,
                    after_pk BIGINT NOT NULL DEFAULT 0,
                    last_event_id UUID,
                    last_event_pk BIGINT,
                    last_event_at TIMESTAMPTZ,
                    events_processed BIGINT NOT NULL DEFAULT 0,
                    owner TEXT,
                    epoch BIGINT NOT NULL DEFAULT 0,
                    heartbeat_at TIMESTAMPTZ,
                    last_error TEXT,
                    last_error_at TIMESTAMPTZ,
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )",
                self.checkpoints.sql()
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    listener_id TEXT NOT NULL,
                    event_id UUID,
                    change_log_pk BIGINT NOT NULL,
                    event JSONB NOT NULL,
                    observer TEXT,
                    action_index INT,
                    action_type TEXT,
                    action JSONB,
                    idempotency_key TEXT,
                    reason TEXT NOT NULL,
                    last_error TEXT NOT NULL,
                    attempts JSONB NOT NULL DEFAULT '[]',
                    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'resolved')),
                    manual_retries INT NOT NULL DEFAULT 0,
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    resolved_at TIMESTAMPTZ
                )",
                self.dead_letters.sql()
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS observer_dead_letters_status_idx ON {} (status, observer, id)",
                self.dead_letters.sql()
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS observer_dead_letters_event_idx ON {} (event_id)",
                self.dead_letters.sql()
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    listener_id TEXT NOT NULL,
                    event_id UUID NOT NULL,
                    change_log_pk BIGINT NOT NULL,
                    observer TEXT NOT NULL,
                    action_index INT NOT NULL,
                    action_type TEXT NOT NULL,
                    idempotency_key TEXT NOT NULL,
                    outcome TEXT NOT NULL,
                    attempts JSONB NOT NULL,
                    finished_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )",
                self.action_log.sql()
            ),
            // The action log takes a row per action per event, so each index on it is paid
            // per delivery: a btree on the random event id cost Postgres about 2.5 µs a row
            // and one on `finished_at` about 1.2 µs, of some 8 µs in all (docs/benchmarks.md).
            // `debug-event` finds an event's rows by its change-log pk (which grows with the
            // log, so its index is appended to), and retention's range of old rows is a BRIN
            // on `finished_at` (rows are written in time order). The btrees of earlier
            // versions are dropped.
            format!(
                "CREATE INDEX IF NOT EXISTS observer_action_log_change_log_pk_idx ON {} (change_log_pk)",
                self.action_log.sql()
            ),
            format!(
                "DROP INDEX IF EXISTS {}",
                self.action_log
                    .sibling("observer_action_log_event_idx")
                    .sql()
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS observer_action_log_finished_brin ON {} USING brin (finished_at)",
                self.action_log.sql()
            ),
            format!(
                "DROP INDEX IF EXISTS {}",
                self.action_log
                    .sibling("observer_action_log_finished_idx")
                    .sql()
            ),
            // The failover layer (observer-features/src/failover.rs): who leads each listener,
            // under which fencing token, until when; and every instance of the group.
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    listener_id TEXT PRIMARY KEY,
                    token BIGINT NOT NULL DEFAULT 0,
                    holder UUID,
                    holder_name TEXT,
                    backend_pid INT,
                    backend_start TIMESTAMPTZ,
                    acquired_at TIMESTAMPTZ,
                    renewed_at TIMESTAMPTZ,
                    expires_at TIMESTAMPTZ,
                    lease_ms BIGINT
                )",
                self.leases.sql()
            ),
            // Makes `token` a key column: a takeover (which changes it) conflicts with the
            // writer's FOR KEY SHARE fence, a renewal (which does not) conflicts with nothing.
            format!(
                "CREATE UNIQUE INDEX IF NOT EXISTS observer_leases_token_key ON {} (listener_id, token)",
                self.leases.sql()
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    listener_id TEXT NOT NULL,
                    instance_id UUID NOT NULL,
                    host TEXT NOT NULL,
                    pid INT NOT NULL,
                    role TEXT NOT NULL CHECK (role IN ('leader', 'standby')),
                    role_since TIMESTAMPTZ NOT NULL DEFAULT now(),
                    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    lease_expires_at TIMESTAMPTZ,
                    PRIMARY KEY (listener_id, instance_id)
                )",
                self.instances.sql()
            ),
        ];
        let after_notify_function = after_notify_function
            .into_iter()
            .chain(crate::audit::migration(self));
        sql.into_iter()
            .map(MigrationStep::Sql)
            .chain(std::iter::once(MigrationStep::NotifyFunction))
            .chain(after_notify_function.map(MigrationStep::Sql))
            .collect()
    }

    /// The statement-level capture function. Trigger arguments: entity name, tenant column
    /// (or ''), then the primary-key columns. One change-log row per changed business row, written
    /// by one INSERT … SELECT over the transition table (so one NOTIFY per statement).
    fn capture_function_sql(&self) -> String {
        let cl = self.change_log.sql();
        format!(
            r#"CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    entity text := TG_ARGV[0];
    tenant_col text := TG_ARGV[1];
    id_expr_n text;
    id_expr_o text;
    join_cond text := '';
    tenant_n text := 'NULL::uuid';
    tenant_o text := 'NULL::uuid';
    cols text[] := '{{}}';
    i int;
BEGIN
    FOR i IN 2 .. TG_NARGS - 1 LOOP
        cols := cols || TG_ARGV[i];
        IF join_cond <> '' THEN join_cond := join_cond || ' AND '; END IF;
        join_cond := join_cond || format('o.%1$I IS NOT DISTINCT FROM n.%1$I', TG_ARGV[i]);
    END LOOP;
    IF array_length(cols, 1) = 1 THEN
        id_expr_n := format('n.%I::text', cols[1]);
        id_expr_o := format('o.%I::text', cols[1]);
    ELSE
        id_expr_n := 'jsonb_build_array(' || (SELECT string_agg(format('n.%I', c), ', ') FROM unnest(cols) c) || ')::text';
        id_expr_o := 'jsonb_build_array(' || (SELECT string_agg(format('o.%I', c), ', ') FROM unnest(cols) c) || ')::text';
    END IF;
    IF tenant_col <> '' THEN
        tenant_n := format('n.%I', tenant_col);
        tenant_o := format('o.%I', tenant_col);
    END IF;
    IF TG_OP = 'INSERT' THEN
        EXECUTE format('INSERT INTO {cl} (object_type, object_id, modification_type, object_data, tenant_id)
                        SELECT $1, %s, ''INSERT'', to_jsonb(n), %s FROM fraiseql_new n', id_expr_n, tenant_n)
            USING entity;
    ELSIF TG_OP = 'UPDATE' THEN
        EXECUTE format('INSERT INTO {cl} (object_type, object_id, modification_type, object_data, object_data_before, tenant_id)
                        SELECT $1, %s, ''UPDATE'', to_jsonb(n), to_jsonb(o), %s
                        FROM fraiseql_new n LEFT JOIN fraiseql_old o ON %s', id_expr_n, tenant_n, join_cond)
            USING entity;
    ELSIF TG_OP = 'DELETE' THEN
        EXECUTE format('INSERT INTO {cl} (object_type, object_id, modification_type, object_data_before, tenant_id)
                        SELECT $1, %s, ''DELETE'', to_jsonb(o), %s FROM fraiseql_old o', id_expr_o, tenant_o)
            USING entity;
    END IF;
    RETURN NULL;
END $fn$"#,
            func = self.capture_function(),
        )
    }
}

/// One statement of `migrate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationStep {
    /// Fixed text: our own SQL around names that were validated and quoted; no values.
    Sql(String),
    /// The NOTIFY function, whose body holds a value (the channel): rendered by the server with
    /// [`NOTIFY_FUNCTION_QUERY`].
    NotifyFunction,
}

/// Renders the NOTIFY function's `CREATE` statement on the server. `format()` quotes the
/// channel with `%L` (`quote_literal`, which writes an `E'…'` literal when the value holds a
/// backslash) and then the whole body with `%L` again, so the statement means the same whatever
/// `standard_conforming_strings` is, and no value can close a dollar-quoted body. The channel
/// is also held to identifier characters by the config check; this is the second wall.
/// Parameters: the schema, the `committing` lock class, the channel's lock key, the
/// `notifying` lock class, the channel.
pub const NOTIFY_FUNCTION_QUERY: &str = "SELECT format(
    'CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql AS %L',
    $1::text, 'fraiseql_observers_notify',
    format('BEGIN
                PERFORM pg_advisory_xact_lock_shared(%s, %s);
                IF pg_try_advisory_xact_lock(%s, %s) THEN
                    PERFORM pg_notify(%L, TG_TABLE_SCHEMA || ''.'' || TG_TABLE_NAME);
                END IF;
                RETURN NULL;
            END', $2::int, $3::int, $4::int, $3::int, $5::text))";

/// Quotes each value as a SQL literal on the server (`quote_literal`), joined with `, `: the
/// trigger arguments of `capture add`. Quoting on our side would depend on the session's
/// `standard_conforming_strings` (with it off, `\'` ends a literal early).
const QUOTE_LITERALS_QUERY: &str =
    "SELECT coalesce(string_agg(quote_literal(a), ', ' ORDER BY n), '')
     FROM unnest($1::text[]) WITH ORDINALITY AS t(a, n)";

/// Installs every object; safe to run any number of times, and concurrently.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    objects: &Objects,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    // Serialises concurrent migrations (CREATE … IF NOT EXISTS races otherwise).
    tx.execute("SELECT pg_advisory_xact_lock(7414082901)", &[])
        .await?;
    for step in objects.migration() {
        let stmt = match step {
            MigrationStep::Sql(stmt) => stmt,
            MigrationStep::NotifyFunction => objects.notify_function_sql(&tx).await?,
        };
        tx.batch_execute(&stmt).await?;
    }
    tx.commit().await
}

/// A capture trigger attached to a business table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Capture {
    pub table: String,
    pub entity: String,
    pub id_columns: Vec<String>,
    pub tenant_column: Option<String>,
}

/// Why `capture add` refused.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("table `{0}` does not exist")]
    NoTable(String),
    #[error("table `{0}` has no primary key: pass --id-column to name the column(s) that identify a row")]
    NoPrimaryKey(String),
    #[error("table `{table}` has no column `{column}`")]
    NoColumn { table: String, column: String },
    #[error("the capture function is not installed: run `fraiseql-observers migrate` first")]
    NotMigrated,
    #[error("--entity {0:?}: expected a name that is not empty and holds no control characters (every change-log row of such an entity would be a dead letter)")]
    BadEntity(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

const TRIGGERS: [(&str, &str, &str); 3] = [
    (
        "fraiseql_observers_capture_ins",
        "INSERT",
        "REFERENCING NEW TABLE AS fraiseql_new",
    ),
    (
        "fraiseql_observers_capture_upd",
        "UPDATE",
        "REFERENCING OLD TABLE AS fraiseql_old NEW TABLE AS fraiseql_new",
    ),
    (
        "fraiseql_observers_capture_del",
        "DELETE",
        "REFERENCING OLD TABLE AS fraiseql_old",
    ),
];

/// Attaches (or re-attaches) the capture triggers to `table`.
pub async fn capture_add(
    client: &mut tokio_postgres::Client,
    objects: &Objects,
    table: &str,
    entity: &str,
    id_columns: &[String],
    tenant_column: Option<&str>,
) -> Result<Capture, CaptureError> {
    let name = TableName::parse(table)?;
    if entity.trim().is_empty() || entity.contains(char::is_control) {
        return Err(CaptureError::BadEntity(entity.to_string()));
    }
    let tx = client.transaction().await?;
    let oid: Option<u32> = tx
        .query_opt("SELECT to_regclass($1)::oid", &[&name.sql()])
        .await?
        .and_then(|r| r.get::<_, Option<u32>>(0));
    let oid = oid.ok_or_else(|| CaptureError::NoTable(name.to_string()))?;
    let installed: bool = tx
        .query_one(
            "SELECT to_regprocedure($1) IS NOT NULL",
            &[&format!("{}()", objects.capture_function())],
        )
        .await?
        .get(0);
    if !installed {
        return Err(CaptureError::NotMigrated);
    }
    let columns: Vec<(String, String)> = tx
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ids: Vec<String> = if id_columns.is_empty() {
        let pk: Vec<String> = tx
            .query(
                "SELECT a.attname::text FROM pg_index i
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pk.is_empty() {
            return Err(CaptureError::NoPrimaryKey(name.to_string()));
        }
        pk
    } else {
        id_columns.to_vec()
    };
    for c in &ids {
        if !columns.iter().any(|(n, _)| n == c) {
            return Err(CaptureError::NoColumn {
                table: name.to_string(),
                column: c.clone(),
            });
        }
    }
    // tenant_id is captured only from a uuid column, so a bad value can never abort the
    // business transaction with a cast error.
    let tenant = match tenant_column {
        Some(t) => {
            if !columns.iter().any(|(n, ty)| n == t && ty == "uuid") {
                return Err(CaptureError::NoColumn {
                    table: name.to_string(),
                    column: format!("{t} (of type uuid)"),
                });
            }
            Some(t.to_string())
        }
        None => columns
            .iter()
            .find(|(n, ty)| n == "tenant_id" && ty == "uuid")
            .map(|(n, _)| n.clone()),
    };
    let mut args = vec![entity.to_string(), tenant.clone().unwrap_or_default()];
    args.extend(ids.iter().cloned());
    let args: String = tx.query_one(QUOTE_LITERALS_QUERY, &[&args]).await?.get(0);
    for (trigger, op, referencing) in TRIGGERS {
        tx.batch_execute(&format!(
            "DROP TRIGGER IF EXISTS {trigger} ON {}",
            name.sql()
        ))
        .await?;
        tx.batch_execute(&format!(
            "CREATE TRIGGER {trigger} AFTER {op} ON {} {referencing}
             FOR EACH STATEMENT EXECUTE FUNCTION {}({args})",
            name.sql(),
            objects.capture_function()
        ))
        .await?;
    }
    tx.commit().await?;
    Ok(Capture {
        table: name.to_string(),
        entity: entity.to_string(),
        id_columns: ids,
        tenant_column: tenant,
    })
}

/// Removes the capture triggers from `table`; returns whether any were there.
pub async fn capture_remove(
    client: &mut tokio_postgres::Client,
    table: &str,
) -> Result<bool, CaptureError> {
    let name = TableName::parse(table)?;
    let tx = client.transaction().await?;
    let exists: bool = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name.sql()])
        .await?
        .get(0);
    if !exists {
        return Err(CaptureError::NoTable(name.to_string()));
    }
    let mut found = false;
    for (trigger, _, _) in TRIGGERS {
        let n: i64 = tx
            .query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2",
                &[&name.sql(), &trigger],
            )
            .await?
            .get(0);
        found |= n > 0;
        tx.batch_execute(&format!(
            "DROP TRIGGER IF EXISTS {trigger} ON {}",
            name.sql()
        ))
        .await?;
    }
    tx.commit().await?;
    Ok(found)
}

/// Every table carrying our capture trigger, with its entity and id columns.
pub async fn capture_list(
    client: &impl GenericClient,
) -> Result<Vec<Capture>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text || '.' || c.relname::text, t.tgargs, t.tgnargs::int
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE t.tgname = 'fraiseql_observers_capture_ins' ORDER BY 1",
            &[],
        )
        .await?;
    let mut out = Vec::new();
    for r in rows {
        let table: String = r.get(0);
        let raw: Vec<u8> = r.get(1);
        // tgargs is the arguments, each NUL-terminated.
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        let n: i32 = r.get(2);
        let args: Vec<String> = args.into_iter().take(n.max(0) as usize).collect();
        if args.len() < 3 {
            continue;
        }
        out.push(Capture {
            table,
            entity: args[0].clone(),
            tenant_column: Some(args[1].clone()).filter(|t| !t.is_empty()),
            id_columns: args[2..].to_vec(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(
            TableName::parse("tb_x").unwrap().sql(),
            "\"public\".\"tb_x\""
        );
        assert_eq!(
            TableName::parse("core.tb_entity_change_log")
                .unwrap()
                .schema,
            "core"
        );
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("x;drop table y").is_err());
        assert!(TableName::parse("").is_err());
        assert!(TableName::parse("1abc").is_err());
    }
}
