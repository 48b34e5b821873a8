//! `concurrent`: many dispatches in flight (`[concurrent] max_in_flight`), each bounded by
//! `action_timeout_ms`.
//!
//! Ordering is not this layer's business: the run loop only hands the stack units whose
//! (observer, entity, entity id) has nothing earlier in progress, so raising the limit lets
//! unrelated entities run in parallel while one entity's actions still start in commit order.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use observer_core::action::{Attempt, AttemptResult};
use observer_core::config::ConcurrentConfig;
use observer_core::executor::{BoxError, Dispatch, DispatchResult};
use tower::limit::ConcurrencyLimitLayer;
use tower::Layer;

/// The two layers of `concurrent`, outermost first.
pub fn layers(cfg: &ConcurrentConfig) -> (ConcurrencyLimitLayer, ActionTimeoutLayer) {
    (
        ConcurrencyLimitLayer::new(cfg.max_in_flight.max(1)),
        ActionTimeoutLayer {
            timeout: Duration::from_millis(cfg.action_timeout_ms.max(1)),
        },
    )
}

/// Abandons a dispatch that runs past the timeout and reports each of its deliveries as a
/// retryable timeout, so a hung destination holds a slot for at most this long.
#[derive(Clone, Debug)]
pub struct ActionTimeoutLayer {
    timeout: Duration,
}

impl<S> Layer<S> for ActionTimeoutLayer {
    type Service = ActionTimeout<S>;
    fn layer(&self, inner: S) -> ActionTimeout<S> {
        ActionTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ActionTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> tower::Service<Dispatch> for ActionTimeout<S>
where
    S: tower::Service<Dispatch, Response = DispatchResult, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = DispatchResult;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<DispatchResult, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let attempts: Vec<u32> = dispatch.deliveries.iter().map(|d| d.attempt).collect();
        let timeout = self.timeout;
        let fut = self.inner.call(dispatch);
        Box::pin(async move {
            let started = Instant::now();
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Ok(attempts
                    .into_iter()
                    .map(|n| Attempt {
                        duration_ms: started.elapsed().as_millis() as u64,
                        ..Attempt::answered(
                            n,
                            AttemptResult::Retry { after_ms: None },
                            Some(format!(
                                "timed out after {} ms ([concurrent] action_timeout_ms)",
                                timeout.as_millis()
                            )),
                        )
                    })
                    .collect()),
            }
        })
    }
}
