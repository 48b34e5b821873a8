//! The change event: one decoded row of the change-log table.
//!
//! Everything downstream (matcher, conditions, templates, actions) sees events through this type.
//! Decoding from a database row lives in `change_log.rs`; this file only knows the shape.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The kind of change a change-log row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Custom,
}

impl Operation {
    /// Parses the `modification_type` column (case-insensitive); `None` for anything else.
    pub fn parse(s: &str) -> Option<Operation> {
        match s.trim().to_ascii_uppercase().as_str() {
            "INSERT" => Some(Operation::Insert),
            "UPDATE" => Some(Operation::Update),
            "DELETE" => Some(Operation::Delete),
            "CUSTOM" => Some(Operation::Custom),
            _ => None,
        }
    }

    /// The canonical upper-case name, as written in the change log and in webhook bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "INSERT",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Custom => "CUSTOM",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change, as read from the change-log table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// `pk_entity_change_log`: order within a snapshot window.
    pub pk: i64,
    /// `id`: the event id, stable across replays; the root of every idempotency key.
    pub id: Uuid,
    /// `created_at`.
    pub created_at: DateTime<Utc>,
    /// `object_type`: the entity name, e.g. `Order`.
    pub entity: String,
    /// `object_id` read as text; `None` only for `CUSTOM` events.
    pub entity_id: Option<String>,
    /// `modification_type`.
    pub operation: Operation,
    /// `object_data`: the after-image (None for DELETE).
    pub data: Option<Value>,
    /// `object_data_before`: the before-image when captured.
    pub before: Option<Value>,
    /// `tenant_id`.
    pub tenant_id: Option<Uuid>,
    /// `txid`: the writing transaction (xid8).
    pub txid: u64,
}

impl ChangeEvent {
    /// The key that orders deliveries: events with the same key start their actions in commit order.
    pub fn ordering_key(&self) -> (String, Option<String>) {
        (self.entity.clone(), self.entity_id.clone())
    }

    /// The default webhook body of the design brief.
    pub fn envelope(&self, observer: &str) -> Value {
        serde_json::json!({
            "event_id": self.id,
            "entity": self.entity,
            "entity_id": self.entity_id,
            "operation": self.operation.as_str(),
            "data": self.data,
            "before": self.before,
            "tenant_id": self.tenant_id,
            "created_at": self.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "observer": observer,
        })
    }
}
