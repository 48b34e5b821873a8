//! The audit trail of `features.search`: one row per completed event in `observer_audit`, with
//! the observers it matched (none, for an event no observer wanted) and every action's outcome
//! and attempts, so an operator can answer "what happened to order 42 yesterday?".
//!
//! The row is built in memory when the event completes and written by the run loop's writer
//! task in the same batched transaction as the action log and the checkpoint (never on the
//! dispatch path, and never after the checkpoint has moved past the event). `migrate` installs
//! the table with a GIN full-text index over [`TSVECTOR`]; `fraiseql-observers search` queries
//! it, and the `search` layer's Elasticsearch indexer tails it by `id`
//! (observer-features/src/search.rs). Retention follows `[retention] action_log_days`, and
//! never deletes a row the indexer has not indexed yet (observer-core/src/retention.rs).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::event::ChangeEvent;
use crate::schema::Objects;
use crate::store::NewActionLog;

/// The outcome recorded for an event that matched no observer.
pub const NO_MATCH: &str = "no_match";

/// Every outcome a row can carry, as `--outcome` accepts them (`failed` is an alias of
/// `dead_lettered`).
pub const OUTCOMES: [&str; 5] = [
    "delivered",
    "dead_lettered",
    "duplicate",
    "condition_false",
    NO_MATCH,
];

/// The full-text expression the GIN index is built on. A query must use this text exactly for
/// the planner to use the index. `simple` keeps ids and numbers as they are (no stemming, no
/// stop words): `42` finds `42`.
pub const TSVECTOR: &str = "(to_tsvector('simple'::regconfig, search_text) || jsonb_to_tsvector('simple'::regconfig, coalesce(data, '{}'::jsonb), '[\"string\", \"numeric\"]'::jsonb))";

/// What `migrate` adds for the audit trail (appended to [`Objects::migration`]).
pub fn migration(objects: &Objects) -> Vec<String> {
    let audit = objects.audit.sql();
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {audit} (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                listener_id TEXT NOT NULL,
                event_id UUID NOT NULL,
                change_log_pk BIGINT NOT NULL,
                entity TEXT NOT NULL,
                entity_id TEXT,
                operation TEXT NOT NULL,
                tenant_id UUID,
                event_at TIMESTAMPTZ NOT NULL,
                finished_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                observers TEXT[] NOT NULL,
                outcomes TEXT[] NOT NULL,
                actions JSONB NOT NULL,
                data JSONB,
                search_text TEXT NOT NULL
            )"
        ),
        format!("CREATE INDEX IF NOT EXISTS observer_audit_search_idx ON {audit} USING gin ({TSVECTOR})"),
        format!("CREATE INDEX IF NOT EXISTS observer_audit_entity_idx ON {audit} (entity_id, finished_at)"),
        format!("CREATE INDEX IF NOT EXISTS observer_audit_finished_idx ON {audit} (finished_at)"),
        format!("CREATE INDEX IF NOT EXISTS observer_audit_listener_idx ON {audit} (listener_id, id)"),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                listener_id TEXT PRIMARY KEY,
                backend TEXT NOT NULL,
                target TEXT,
                indexed_id BIGINT NOT NULL DEFAULT 0,
                documents BIGINT NOT NULL DEFAULT 0,
                indexed_at TIMESTAMPTZ,
                last_error TEXT,
                last_error_at TIMESTAMPTZ,
                updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
            objects.search_index.sql()
        ),
    ]
}

/// One event's audit row, about to be written.
#[derive(Debug, Clone)]
pub struct NewAudit {
    pub event: Arc<ChangeEvent>,
    /// The observers the event matched, in configuration order.
    pub observers: Vec<String>,
    /// Each action's final outcome with its attempts.
    pub actions: Vec<NewActionLog>,
}

impl NewAudit {
    /// The distinct outcomes of the actions (`no_match` when there were none).
    pub fn outcomes(&self) -> Vec<&'static str> {
        if self.actions.is_empty() {
            return vec![NO_MATCH];
        }
        let mut out: Vec<&'static str> = Vec::new();
        for a in &self.actions {
            if !out.contains(&a.outcome) {
                out.push(a.outcome);
            }
        }
        out
    }

    /// The actions as stored (`actions` column, the `actions` field of a search document).
    pub fn actions_json(&self) -> Value {
        Value::Array(
            self.actions
                .iter()
                .map(|a| {
                    let error = a.attempts.iter().rev().find_map(|t| t.error.clone());
                    json!({
                        "observer": a.observer,
                        "action_index": a.action_index,
                        "action_type": a.action_type,
                        "idempotency_key": a.idempotency_key,
                        "outcome": a.outcome,
                        "attempts": a.attempts,
                        "error": error,
                    })
                })
                .collect(),
        )
    }

    /// The words indexed besides the event data: entity, entity id, operation, observers, action
    /// types, outcomes, and every distinct error text.
    pub fn search_text(&self) -> String {
        let e = &self.event;
        let mut words: Vec<&str> = vec![&e.entity];
        if let Some(id) = &e.entity_id {
            words.push(id);
        }
        words.push(e.operation.as_str());
        words.extend(self.observers.iter().map(String::as_str));
        let outcomes = self.outcomes();
        for a in &self.actions {
            if !words.contains(&a.action_type) {
                words.push(a.action_type);
            }
        }
        words.extend(outcomes.iter().copied());
        let mut errors: Vec<&str> = Vec::new();
        for t in self.actions.iter().flat_map(|a| &a.attempts) {
            if let Some(err) = t.error.as_deref() {
                if !errors.contains(&err) {
                    errors.push(err);
                }
            }
        }
        words.extend(errors);
        words.join(" ")
    }

    /// The event data indexed and stored: the after-image, or the before-image of a DELETE.
    pub fn data(&self) -> Option<&Value> {
        self.event.data.as_ref().or(self.event.before.as_ref())
    }
}

/// The insert of one flush's audit rows (one statement, arrays of columns).
pub fn insert_sql(objects: &Objects) -> String {
    format!(
        "INSERT INTO {} (listener_id, event_id, change_log_pk, entity, entity_id, operation, tenant_id,
                         event_at, observers, outcomes, actions, data, search_text)
         SELECT $1, u.e, u.pk, u.ent, u.eid, u.op, u.t, u.at,
                ARRAY(SELECT jsonb_array_elements_text(u.obs)), ARRAY(SELECT jsonb_array_elements_text(u.outc)),
                u.act, u.d, u.st
         FROM unnest($2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::uuid[],
                     $8::timestamptz[], $9::jsonb[], $10::jsonb[], $11::jsonb[], $12::jsonb[], $13::text[])
              WITH ORDINALITY AS u(e, pk, ent, eid, op, t, at, obs, outc, act, d, st, n)
         ORDER BY u.n",
        objects.audit.sql()
    )
}

/// Writes `rows` inside `tx` (`include_data`: whether the event data is stored and indexed).
pub async fn insert(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    listener: &str,
    rows: &[NewAudit],
    include_data: bool,
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.event.id).collect();
    let pks: Vec<i64> = rows.iter().map(|r| r.event.pk).collect();
    let entities: Vec<&str> = rows.iter().map(|r| r.event.entity.as_str()).collect();
    let entity_ids: Vec<Option<&str>> = rows.iter().map(|r| r.event.entity_id.as_deref()).collect();
    let ops: Vec<&str> = rows.iter().map(|r| r.event.operation.as_str()).collect();
    let tenants: Vec<Option<Uuid>> = rows.iter().map(|r| r.event.tenant_id).collect();
    let at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.event.created_at).collect();
    let observers: Vec<Value> = rows.iter().map(|r| json!(r.observers)).collect();
    let outcomes: Vec<Value> = rows.iter().map(|r| json!(r.outcomes())).collect();
    let actions: Vec<Value> = rows.iter().map(NewAudit::actions_json).collect();
    let data: Vec<Option<&Value>> = rows
        .iter()
        .map(|r| if include_data { r.data() } else { None })
        .collect();
    let text: Vec<String> = rows.iter().map(NewAudit::search_text).collect();
    tx.execute(
        sql,
        &[
            &listener,
            &ids,
            &pks,
            &entities,
            &entity_ids,
            &ops,
            &tenants,
            &at,
            &observers,
            &outcomes,
            &actions,
            &data,
            &text,
        ],
    )
    .await?;
    Ok(())
}

/// The columns [`AuditRecord::from_row`] reads, in order.
pub const COLUMNS: &str =
    "id, listener_id, event_id, change_log_pk, entity, entity_id, operation, tenant_id, \
     event_at, finished_at, observers, outcomes, actions, data, search_text";

/// One stored audit row, as `search` prints it and the indexer sends it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AuditRecord {
    pub audit_id: i64,
    pub listener: String,
    pub event_id: Uuid,
    pub change_log_pk: i64,
    pub entity: String,
    pub entity_id: Option<String>,
    pub operation: String,
    pub tenant_id: Option<Uuid>,
    pub event_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub observers: Vec<String>,
    pub outcomes: Vec<String>,
    pub actions: Value,
    pub data: Option<Value>,
    /// The indexed words besides the data ([`NewAudit::search_text`]).
    pub text: String,
}

impl AuditRecord {
    /// Reads a row selected with [`COLUMNS`].
    pub fn from_row(r: &tokio_postgres::Row) -> Result<AuditRecord, tokio_postgres::Error> {
        Ok(AuditRecord {
            audit_id: r.try_get(0)?,
            listener: r.try_get(1)?,
            event_id: r.try_get(2)?,
            change_log_pk: r.try_get(3)?,
            entity: r.try_get(4)?,
            entity_id: r.try_get(5)?,
            operation: r.try_get(6)?,
            tenant_id: r.try_get(7)?,
            event_at: r.try_get(8)?,
            finished_at: r.try_get(9)?,
            observers: r.try_get(10)?,
            outcomes: r.try_get(11)?,
            actions: r.try_get(12)?,
            data: r.try_get(13)?,
            text: r.try_get(14)?,
        })
    }

    /// The search document: the record plus `entity_key` (the entity lower-cased, for the
    /// case-insensitive `--entity` filter) and `data_text` (the data as JSON text, full-text
    /// indexed; `data` itself is stored but not indexed, so events whose data fields change type
    /// never conflict in the mapping).
    pub fn document(&self) -> Value {
        let mut doc = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut doc {
            m.insert("entity_key".into(), json!(self.entity.to_lowercase()));
            let data_text = self.data.as_ref().map(data_words);
            m.insert("data_text".into(), json!(data_text));
        }
        doc
    }

    /// Reads a document written by [`AuditRecord::document`] (extra fields are ignored).
    pub fn from_document(doc: &Value) -> Result<AuditRecord, serde_json::Error> {
        serde_json::from_value(doc.clone())
    }

    /// The document id in the search index: stable for a row, so sending it again overwrites
    /// the same document.
    pub fn document_id(&self) -> String {
        format!("{}:{}", self.listener, self.audit_id)
    }
}

/// What `fraiseql-observers search` asks, whichever backend answers.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Words to find (Postgres `websearch_to_tsquery` syntax: `"a phrase"`, `-word`, `or`);
    /// empty finds every row the filters admit. An exact entity id matches too.
    pub text: String,
    /// Entity name, compared case-insensitively.
    pub entity: Option<String>,
    /// Only rows whose event completed at or after this.
    pub since: Option<DateTime<Utc>>,
    /// Only rows with an action of this outcome (one of [`OUTCOMES`]).
    pub outcome: Option<String>,
    /// Only rows of this listener.
    pub listener: Option<String>,
    pub limit: i64,
}

/// Answers `q` from `observer_audit`, newest first.
pub async fn search_postgres(
    client: &impl tokio_postgres::GenericClient,
    objects: &Objects,
    q: &AuditQuery,
) -> Result<Vec<AuditRecord>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM {} WHERE ($1 = '' OR {TSVECTOR} @@ websearch_to_tsquery('simple'::regconfig, $1) OR entity_id = $1)
           AND ($2::text IS NULL OR lower(entity) = lower($2))
           AND ($3::timestamptz IS NULL OR finished_at >= $3)
           AND ($4::text IS NULL OR $4 = ANY(outcomes))
           AND ($5::text IS NULL OR listener_id = $5)
         ORDER BY finished_at DESC, id DESC LIMIT $6",
        objects.audit.sql()
    );
    let text = q.text.trim();
    let rows = client
        .query(
            &sql,
            &[
                &text,
                &q.entity,
                &q.since,
                &q.outcome,
                &q.listener,
                &q.limit,
            ],
        )
        .await?;
    rows.iter().map(AuditRecord::from_row).collect()
}

/// The string and number leaves of `v`, space-separated (what Postgres' `jsonb_to_tsvector`
/// with `["string", "numeric"]` indexes).
pub fn data_words(v: &Value) -> String {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Number(n) => out.push(n.to_string()),
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(m) => m.values().for_each(|x| walk(x, out)),
            Value::Bool(_) | Value::Null => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{Attempt, AttemptResult};
    use crate::event::Operation;

    fn event() -> Arc<ChangeEvent> {
        Arc::new(ChangeEvent {
            pk: 7,
            id: Uuid::nil(),
            created_at: Utc::now(),
            entity: "Order".into(),
            entity_id: Some("42".into()),
            operation: Operation::Update,
            data: Some(json!({"status": "paid", "total": 120, "flag": true})),
            before: None,
            tenant_id: None,
            txid: 1,
        })
    }

    fn action(outcome: &'static str, error: Option<&str>) -> NewActionLog {
        NewActionLog {
            event_id: Uuid::nil(),
            change_log_pk: 7,
            observer: "paid-orders".into(),
            action_index: 0,
            action_type: "webhook",
            idempotency_key: "k".into(),
            outcome,
            attempts: vec![Attempt {
                attempt: 1,
                at: Utc::now(),
                duration_ms: 3,
                status: Some(500),
                error: error.map(str::to_string),
                result: AttemptResult::Permanent,
            }],
        }
    }

    #[test]
    fn an_event_without_observers_is_recorded_as_no_match() {
        let a = NewAudit {
            event: event(),
            observers: vec![],
            actions: vec![],
        };
        assert_eq!(a.outcomes(), vec![NO_MATCH]);
        assert_eq!(a.search_text(), "Order 42 UPDATE no_match");
    }

    #[test]
    fn the_indexed_text_names_observers_outcomes_and_errors_once() {
        let a = NewAudit {
            event: event(),
            observers: vec!["paid-orders".into()],
            actions: vec![
                action("dead_lettered", Some("HTTP 500 from receiver")),
                action("dead_lettered", Some("HTTP 500 from receiver")),
            ],
        };
        assert_eq!(a.outcomes(), vec!["dead_lettered"]);
        assert_eq!(
            a.search_text(),
            "Order 42 UPDATE paid-orders webhook dead_lettered HTTP 500 from receiver"
        );
        assert_eq!(a.actions_json()[0]["error"], "HTTP 500 from receiver");
    }

    #[test]
    fn data_words_are_the_string_and_number_leaves() {
        assert_eq!(
            data_words(&json!({"a": "x y", "b": [1, {"c": 2.5}], "d": true, "e": null})),
            "x y 1 2.5"
        );
    }
}
