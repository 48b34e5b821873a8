//! The seam every layer wraps: an executor takes one event and the deliveries due for it, makes
//! one attempt of each, and returns how each attempt ended.
//!
//! It is a `tower::Service<Dispatch>`, so layers are ordinary `tower::Layer`s composed with
//! `ServiceBuilder` in one place (the daemon's stack builder). Retries are deliberately *not*
//! inside the executor: the run loop reads each attempt's result and schedules the next one on
//! a timer, so no layer ever sleeps while holding a concurrency slot, and a layer that defers
//! work (a breaker, a rate limit) only has to say so in its result.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use uuid::Uuid;

use crate::action::{ActionContext, Attempt, AttemptResult};
use crate::event::ChangeEvent;
use crate::observer::Observer;
use crate::path::Scope;

/// The error type of executors: infrastructure trouble that says nothing about the deliveries
/// (they are attempted again later, without counting an attempt).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One action of one observer for one event.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub observer: Arc<Observer>,
    pub action_index: usize,
    /// Stable across retries, crash replays and manual retries.
    pub idempotency_key: Arc<str>,
    /// The number of the attempt this dispatch makes (1-based).
    pub attempt: u32,
}

/// One event and the deliveries due for it now.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub event: Arc<ChangeEvent>,
    pub deliveries: Vec<Delivery>,
}

/// One attempt per delivery, in the order of `Dispatch::deliveries`.
pub type DispatchResult = Vec<Attempt>;

/// The namespace of idempotency keys (UUIDv5), fixed forever: changing it would change every key.
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2b7e_8d3a_4c59_9e02_5b1d_7a4f_3c81);

/// The idempotency key of (event, observer, action index): a UUIDv5, so it is opaque, fixed-length
/// and safe in any header, yet the same every time it is derived.
pub fn idempotency_key(event_id: Uuid, observer: &str, action_index: usize) -> String {
    key_uuid(event_id, observer, action_index)
        .hyphenated()
        .to_string()
}

/// [`idempotency_key`] as the run loop keeps it, without the intermediate `String`.
pub fn idempotency_key_arc(event_id: Uuid, observer: &str, action_index: usize) -> Arc<str> {
    let mut buf = Uuid::encode_buffer();
    Arc::from(
        &*key_uuid(event_id, observer, action_index)
            .hyphenated()
            .encode_lower(&mut buf),
    )
}

/// The UUIDv5 of `{event_id}/{observer}/{action_index}` (the event id hyphenated, lower case),
/// its name written without `format!` (this runs for every delivery).
fn key_uuid(event_id: Uuid, observer: &str, action_index: usize) -> Uuid {
    let mut name = Vec::with_capacity(36 + 2 + observer.len() + 20);
    let mut buf = Uuid::encode_buffer();
    name.extend_from_slice(event_id.hyphenated().encode_lower(&mut buf).as_bytes());
    name.push(b'/');
    name.extend_from_slice(observer.as_bytes());
    name.push(b'/');
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = action_index;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    name.extend_from_slice(&digits[i..]);
    // What `Uuid::new_v5` computes (RFC 9562, 5.5).
    use sha1::Digest;
    let mut hash = sha1::Sha1::new();
    hash.update(KEY_NAMESPACE.as_bytes());
    hash.update(&name);
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// The core executor: attempts each delivery's action once, in order.
#[derive(Clone)]
pub struct CoreExecutor {
    ctx: ActionContext,
}

impl CoreExecutor {
    pub fn new(ctx: ActionContext) -> CoreExecutor {
        CoreExecutor { ctx }
    }
}

impl tower::Service<Dispatch> for CoreExecutor {
    type Response = DispatchResult;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<DispatchResult, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let ctx = self.ctx.clone();
        Box::pin(async move {
            let mut out = Vec::with_capacity(dispatch.deliveries.len());
            // Enrichment runs once per observer of the dispatch; its actions share the results.
            let mut lookups: Vec<(Arc<Observer>, Lookup)> = Vec::new();
            for d in &dispatch.deliveries {
                let lookup = if d.observer.enrich.is_empty() {
                    None
                } else {
                    let i = match lookups
                        .iter()
                        .position(|(o, _)| Arc::ptr_eq(o, &d.observer))
                    {
                        Some(i) => i,
                        None => {
                            // Boxed: enrichment is rare, its future large.
                            let l = Box::pin(Lookup::run(&ctx, &dispatch.event, &d.observer)).await;
                            lookups.push((d.observer.clone(), l));
                            lookups.len() - 1
                        }
                    };
                    Some(&lookups[i].1)
                };
                let enrich = match lookup {
                    None => None,
                    Some(Lookup::Ready(results)) => Some(results),
                    Some(Lookup::ConditionFalse) => {
                        out.push(Attempt::answered(
                            d.attempt,
                            AttemptResult::ConditionFalse,
                            None,
                        ));
                        continue;
                    }
                    Some(Lookup::Failed {
                        at,
                        duration_ms,
                        error,
                        permanent,
                    }) => {
                        out.push(Attempt {
                            attempt: d.attempt,
                            at: *at,
                            duration_ms: *duration_ms,
                            status: None,
                            error: Some(error.clone()),
                            result: if *permanent {
                                AttemptResult::Permanent
                            } else {
                                AttemptResult::Retry { after_ms: None }
                            },
                        });
                        continue;
                    }
                };
                let scope = Scope {
                    event: &dispatch.event,
                    observer: Some(&d.observer.name),
                    idempotency_key: Some(&d.idempotency_key),
                    enrich,
                };
                let attempt = match d.observer.actions.get(d.action_index) {
                    Some(a) => a.action.attempt(&ctx, &scope, d.attempt).await,
                    None => Attempt {
                        attempt: d.attempt,
                        at: chrono::Utc::now(),
                        duration_ms: 0,
                        status: None,
                        error: Some(format!(
                            "observer `{}` has no action {}",
                            d.observer.name, d.action_index
                        )),
                        result: AttemptResult::Permanent,
                    },
                };
                out.push(attempt);
            }
            Ok(out)
        })
    }
}

/// The enrichment of one observer for one dispatch.
enum Lookup {
    /// The results; the condition (if it reads them) holds.
    Ready(crate::enrich::Results),
    /// The condition, evaluated over the results, is false: no action runs.
    ConditionFalse,
    /// A lookup failed: every delivery of the observer fails this attempt (retryable, or
    /// permanent when the outbound guard refused the lookup's destination).
    Failed {
        at: chrono::DateTime<chrono::Utc>,
        duration_ms: u64,
        error: String,
        permanent: bool,
    },
}

impl Lookup {
    async fn run(ctx: &ActionContext, event: &ChangeEvent, observer: &Observer) -> Lookup {
        let at = chrono::Utc::now();
        let started = std::time::Instant::now();
        match crate::enrich::run(&observer.enrich, ctx, event, &observer.name).await {
            Err(e) => Lookup::Failed {
                at,
                duration_ms: started.elapsed().as_millis() as u64,
                error: e.message,
                permanent: e.permanent,
            },
            Ok(results) => {
                let holds = match (&observer.condition, observer.condition_at_delivery) {
                    (Some(c), true) => c.evaluate(&Scope {
                        event,
                        observer: Some(&observer.name),
                        idempotency_key: None,
                        enrich: Some(&results),
                    }),
                    _ => true,
                };
                if holds {
                    Lookup::Ready(results)
                } else {
                    Lookup::ConditionFalse
                }
            }
        }
    }
}

/// For layers that answer some deliveries themselves (a breaker, a rate limit, dedup): calls
/// `inner` (already ready) with the deliveries `decided` leaves open (`None`) and merges its
/// answers back into delivery order. When every delivery is decided, `inner` is not called.
pub async fn call_rest<S>(
    mut inner: S,
    dispatch: Dispatch,
    decided: Vec<Option<Attempt>>,
) -> Result<DispatchResult, BoxError>
where
    S: tower::Service<Dispatch, Response = DispatchResult, Error = BoxError>,
{
    if decided.len() != dispatch.deliveries.len() {
        return Err("layer decided a different number of deliveries than it was given".into());
    }
    let open: Vec<Delivery> = dispatch
        .deliveries
        .iter()
        .zip(&decided)
        .filter(|(_, d)| d.is_none())
        .map(|(d, _)| d.clone())
        .collect();
    let mut answers = if open.is_empty() {
        Vec::new().into_iter()
    } else {
        let n = open.len();
        let out = inner
            .call(Dispatch {
                event: dispatch.event,
                deliveries: open,
            })
            .await?;
        if out.len() != n {
            return Err("executor returned the wrong number of results".into());
        }
        out.into_iter()
    };
    decided
        .into_iter()
        .map(|d| match d {
            Some(a) => Ok(a),
            None => answers
                .next()
                .ok_or_else(|| BoxError::from("executor returned too few results")),
        })
        .collect()
}

/// The boxed executor stack the run loop drives.
pub type BoxExecutor = tower::util::BoxService<Dispatch, DispatchResult, BoxError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        let id = Uuid::parse_str("0b7c4c36-3c1c-4a4e-9d43-4f5b8a9c1d2e").unwrap();
        for (obs, i) in [
            ("orders", 0usize),
            ("orders", 7),
            ("ö/x", 12),
            ("", usize::MAX),
        ] {
            let spelled = Uuid::new_v5(&KEY_NAMESPACE, format!("{id}/{obs}/{i}").as_bytes());
            assert_eq!(idempotency_key(id, obs, i), spelled.to_string());
            assert_eq!(&*idempotency_key_arc(id, obs, i), spelled.to_string());
        }
        let a = idempotency_key(id, "orders", 0);
        assert_eq!(a, idempotency_key(id, "orders", 0));
        assert_ne!(a, idempotency_key(id, "orders", 1));
        assert_ne!(a, idempotency_key(id, "orders2", 0));
        assert_eq!(a.len(), 36);
    }
}
