//! Forwarding: how a publisher process (`run --role publisher`) hands every change event to
//! another system instead of running observers' actions.
//!
//! The run loop is not told anything new. A publisher runs it with one built-in observer,
//! [`PUBLISHER_OBSERVER`], that matches every event and whose single action is
//! [`CompiledAction::Forward`](crate::action::CompiledAction::Forward). The loop's guarantees
//! then carry over unchanged: the checkpoint moves past an event only after its "action"
//! completed — after the other side durably accepted it; a failed hand-over is retried on a
//! timer without blocking unrelated events; events of one (entity, entity id) are handed over
//! in commit order (the observer is ordered per entity).
//!
//! What implements [`Forwarder`] lives elsewhere (the `nats` layer of observer-features).

use std::collections::HashSet;
use std::sync::Arc;

use crate::action::{AttemptResult, CompiledAction};
use crate::config::{Backoff, RetryConfig};
use crate::event::{ChangeEvent, Operation};
use crate::observer::{Observer, ObserverAction, Observers};

/// The name of the publisher's one observer (in the action log, metrics and dead letters).
pub const PUBLISHER_OBSERVER: &str = "nats-publisher";

/// Why a hand-over failed.
#[derive(Debug, Clone)]
pub struct ForwardError {
    pub message: String,
    /// True when trying again cannot help (the event is too large for the destination): the
    /// event is dead-lettered. Anything else is retried until it succeeds.
    pub permanent: bool,
}

/// Something that durably accepts change events.
#[async_trait::async_trait]
pub trait Forwarder: Send + Sync + std::fmt::Debug {
    /// Hands `event` over; `Ok` only once the destination has acknowledged it durably.
    async fn forward(&self, event: &ChangeEvent) -> Result<(), ForwardError>;
    /// Where events go, for logs and per-destination layers (`nats://host:port/stream`).
    fn destination(&self) -> String;
}

/// The action of the publisher's observer.
#[derive(Debug, Clone)]
pub struct Forward {
    pub to: Arc<dyn Forwarder>,
}

impl Forward {
    pub(crate) async fn send(&self, event: &ChangeEvent) -> crate::action::Outcome {
        match self.to.forward(event).await {
            Ok(()) => (AttemptResult::Delivered, None, None),
            Err(e) if e.permanent => (AttemptResult::Permanent, None, Some(e.message)),
            Err(e) => (
                AttemptResult::Retry { after_ms: None },
                None,
                Some(e.message),
            ),
        }
    }
}

/// How a failed hand-over is retried: for as long as it takes (a destination that is down
/// holds the checkpoint where it is; nothing is dead-lettered for an outage), backing off from
/// 100 ms to 2 s.
pub fn forward_retry() -> RetryConfig {
    RetryConfig {
        max_attempts: u32::MAX,
        backoff: Backoff::Exponential,
        initial_ms: 100,
        max_ms: 2_000,
        ..RetryConfig::default()
    }
}

/// The publisher's observers: [`PUBLISHER_OBSERVER`] alone, matching every entity and every
/// operation, ordered per (entity, entity id), forwarding to `to`.
pub fn forwarding_observers(to: Arc<dyn Forwarder>) -> Observers {
    let destination: Arc<str> = to.destination().into();
    let observer = Observer {
        name: PUBLISHER_OBSERVER.to_string(),
        entity: None,
        events: HashSet::from([
            Operation::Insert,
            Operation::Update,
            Operation::Delete,
            Operation::Custom,
        ]),
        condition: None,
        condition_at_delivery: false,
        enrich: Vec::new(),
        ordered: true,
        queue: None,
        actions: vec![ObserverAction {
            action: CompiledAction::Forward(Forward { to }),
            retry: forward_retry(),
            config: serde_json::json!({ "type": "forward", "to": destination.as_ref() }),
            destination,
        }],
    };
    Observers {
        list: vec![Arc::new(observer)],
    }
}
