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

    /// The default webhook body of the design brief, as a JSON value.
    pub fn envelope(&self, observer: &str) -> Value {
        serde_json::to_value(self.envelope_ref(observer, None))
            .expect("an envelope serializes: its keys are strings")
    }

    /// The default webhook body serialized straight from the event (no value tree, no copy of
    /// `data`), with `idempotency_key` added when given: the per-delivery form of
    /// [`ChangeEvent::envelope`], byte for byte the same keys in the same order.
    pub fn envelope_json(&self, observer: &str, idempotency_key: Option<&str>) -> String {
        let bytes = self.envelope_bytes(observer, idempotency_key);
        // serde_json writes UTF-8 only.
        String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// [`ChangeEvent::envelope_json`] as the bytes of a request body (not checked again as UTF-8:
    /// the per-event webhook sends bytes).
    pub fn envelope_bytes(&self, observer: &str, idempotency_key: Option<&str>) -> Vec<u8> {
        // Sized from the last envelope rendered: envelopes of one workload are of a size, and
        // growing a fresh buffer from serde_json's 128 bytes reallocated it several times per
        // event (the allocator was a sixth of the daemon's CPU, docs/benchmarks.md).
        static LAST_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(256);
        let hint = LAST_LEN.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::with_capacity(hint.min(1 << 20));
        serde_json::to_writer(&mut out, &self.envelope_ref(observer, idempotency_key))
            .expect("an envelope serializes: its keys are strings");
        LAST_LEN.store(out.len() + 64, std::sync::atomic::Ordering::Relaxed);
        out
    }

    fn envelope_ref<'a>(&'a self, observer: &'a str, key: Option<&'a str>) -> Envelope<'a> {
        Envelope {
            before: &self.before,
            created_at: crate::timestamp::Rfc3339::new(
                &self.created_at,
                crate::timestamp::Fraction::Micros,
            ),
            data: &self.data,
            entity: &self.entity,
            entity_id: &self.entity_id,
            event_id: &self.id,
            idempotency_key: key,
            observer,
            operation: self.operation.as_str(),
            tenant_id: &self.tenant_id,
        }
    }
}

/// The envelope's fields in the order a JSON object value keeps them (sorted), so the direct
/// and the value form write the same bytes.
#[derive(Serialize)]
struct Envelope<'a> {
    before: &'a Option<Value>,
    created_at: crate::timestamp::Rfc3339,
    data: &'a Option<Value>,
    entity: &'a str,
    entity_id: &'a Option<String>,
    event_id: &'a Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    observer: &'a str,
    operation: &'static str,
    tenant_id: &'a Option<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_envelope_writes_the_value_forms_bytes() {
        let e = ChangeEvent {
            pk: 7,
            id: Uuid::from_u128(42),
            created_at: DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
            entity: "Order".into(),
            entity_id: Some("[\"9\"]".into()),
            operation: Operation::Update,
            data: Some(
                serde_json::json!({"id": 9, "note": "a \"quote\" \u{e9}", "z": [1, {"b": null}]}),
            ),
            before: None,
            tenant_id: Some(Uuid::from_u128(3)),
            txid: 1,
        };
        assert_eq!(e.envelope_json("o", None), e.envelope("o").to_string());
        let mut with_key = e.envelope("o");
        with_key
            .as_object_mut()
            .unwrap()
            .insert("idempotency_key".into(), "k-1".into());
        assert_eq!(e.envelope_json("o", Some("k-1")), with_key.to_string());
    }
}
