//! The layer: deliveries of queued observers (`queue = …`) are enqueued instead of executed.
//!
//! The event's part of such a delivery is done once the job is durably in its stream: the layer
//! answers [`AttemptResult::Enqueued`] and the run loop records the outcome `enqueued`. When
//! Redis cannot take the job, the delivery is deferred (not counted as an attempt) and tried
//! again, so the checkpoint never moves past an event whose job is not in the queue. Every other
//! delivery goes to the inner stack untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use observer_core::action::{Attempt, AttemptResult};
use observer_core::executor::{call_rest, BoxError, Dispatch, DispatchResult};
use tower::Layer;

use super::metrics::QueueMetrics;
use super::store::{JobQueue, NewJob};

/// How long a delivery waits before enqueueing again after Redis failed.
const RETRY_ENQUEUE_MS: u64 = 1_000;

/// Wraps an executor so queued observers' deliveries become jobs.
#[derive(Clone)]
pub struct QueueLayer {
    queue: JobQueue,
    metrics: Arc<QueueMetrics>,
}

impl QueueLayer {
    pub fn new(queue: JobQueue, metrics: Arc<QueueMetrics>) -> QueueLayer {
        QueueLayer { queue, metrics }
    }
}

impl<S> Layer<S> for QueueLayer {
    type Service = Enqueue<S>;
    fn layer(&self, inner: S) -> Enqueue<S> {
        Enqueue {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`QueueLayer`] builds.
#[derive(Clone)]
pub struct Enqueue<S> {
    inner: S,
    layer: QueueLayer,
}

impl<S> tower::Service<Dispatch> for Enqueue<S>
where
    S: tower::Service<Dispatch, Response = DispatchResult, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = DispatchResult;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<DispatchResult, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        if dispatch
            .deliveries
            .iter()
            .all(|d| d.observer.queue.is_none())
        {
            return Box::pin(self.inner.call(dispatch));
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let event = serde_json::to_string(&*dispatch.event).map_err(|e| {
                BoxError::from(format!("serialising event {}: {e}", dispatch.event.id))
            })?;
            let queued: Vec<usize> = (0..dispatch.deliveries.len())
                .filter(|i| dispatch.deliveries[*i].observer.queue.is_some())
                .collect();
            let jobs: Vec<NewJob> = queued
                .iter()
                .map(|i| {
                    let d = &dispatch.deliveries[*i];
                    NewJob {
                        queue: d.observer.queue.as_deref().unwrap_or("default").to_string(),
                        idempotency_key: d.idempotency_key.to_string(),
                        observer: d.observer.name.clone(),
                        action_index: d.action_index,
                        event_id: dispatch.event.id.to_string(),
                        event: event.clone(),
                    }
                })
                .collect();
            let mut decided: Vec<Option<Attempt>> = vec![None; dispatch.deliveries.len()];
            match layer.queue.enqueue(&jobs).await {
                Ok(ids) => {
                    for ((i, job), (new, id)) in queued.iter().zip(&jobs).zip(ids) {
                        if new {
                            layer.metrics.count(&job.queue, "enqueued");
                        }
                        let note = (!new).then(|| "already enqueued by an earlier run".to_string());
                        decided[*i] = Some(Attempt::answered(
                            dispatch.deliveries[*i].attempt,
                            AttemptResult::Enqueued {
                                queue: job.queue.clone(),
                                job: id.clone(),
                            },
                            note,
                        ));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, event_id = %dispatch.event.id, "could not enqueue; trying again shortly");
                    for i in &queued {
                        decided[*i] = Some(Attempt::answered(
                            dispatch.deliveries[*i].attempt,
                            AttemptResult::Deferred {
                                after_ms: RETRY_ENQUEUE_MS,
                                reason: "queue_unavailable",
                            },
                            Some(e.to_string()),
                        ));
                    }
                }
            }
            call_rest(inner, dispatch, decided).await
        })
    }
}
