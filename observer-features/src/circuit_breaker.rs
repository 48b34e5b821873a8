//! `circuit_breaker` (cargo feature `circuit_breaker`): one breaker per destination
//! (`ObserverAction::destination`: a webhook's `host:port`, `postgres`, `log`, or
//! `observer/index`), so a failing receiver stops being hammered while every other destination
//! keeps its full speed.
//!
//! The engine is `failsafe`'s `StateMachine` with two policies joined by `or_else`:
//! * the failure rate (an exponentially weighted moving average over `window_secs`) above
//!   `failure_rate`, once `min_requests` attempts fell in the window and the breaker has been
//!   closed for a whole window;
//! * `min_requests` consecutive failures (so a destination that is simply down opens the breaker
//!   quickly, even right after it closed).
//!
//! Open periods start at `open_ms` and double after every failed probe up to `max_open_ms` (our
//! own backoff iterator: `failsafe`'s only counts whole seconds).
//!
//! A failure is an attempt that ended `Retry` (timeouts, connection errors, 408/429/5xx);
//! `Delivered` and `Permanent` (a 4xx: the destination is up and answering) are successes.
//! Deliveries answered by layers below without running (deferred, duplicate) count as neither.
//!
//! While open a delivery is answered `Deferred{after_ms: until the half-open probe, reason:
//! "breaker_open"}`: not executed, not counted as an attempt, never dead-lettered for it. When
//! the open period ends one probe at a time is let through (half-open); its success closes the
//! breaker, its failure opens it again for a longer period.
//!
//! The state of every breaker is exported as `observer_breaker_state{destination}` (0 closed,
//! 1 half-open, 2 open) and every opening counted in `observer_breaker_opened_total`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use failsafe::failure_policy::{
    consecutive_failures, success_rate_over_time_window, ConsecutiveFailures, FailurePolicy,
    OrElse, SuccessRateOverTimeWindow,
};
use failsafe::{Instrument, StateMachine};
use observer_core::action::{Attempt, AttemptResult};
use observer_core::config::CircuitBreakerConfig;
use observer_core::executor::{call_rest, BoxError, Dispatch, DispatchResult};
use observer_core::metrics::{Metrics, BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPEN};
use tower::Layer;

/// How long a delivery waits while another one is the half-open probe.
const PROBE_BUSY_MS: u64 = 200;

/// What one destination's breaker knows besides `failsafe`'s state machine: the open period's
/// end (for `after_ms`), the probe in flight, and the exported series.
struct Info {
    destination: Arc<str>,
    state: AtomicI64,
    open_until: Mutex<Option<Instant>>,
    /// The longest delay the policies handed out since the last opening (see `Backoff`).
    pending: Mutex<Option<Duration>>,
    last_delay: Mutex<Duration>,
    probe: AtomicBool,
    gauge: prometheus::IntGauge,
    opened: prometheus::IntCounter,
}

/// Exponential open periods: `start`, doubled after each failed probe, capped at `max`. Each
/// delay handed to the state machine is also noted in `Info::pending`, so the instrument knows
/// how long this opening lasts.
#[derive(Clone)]
struct Backoff {
    next: Duration,
    max: Duration,
    info: Arc<Info>,
}

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let mut p = self.info.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p = Some(p.map_or(d, |x| x.max(d)));
        Some(d)
    }
}

#[derive(Clone)]
struct Instr(Arc<Info>);

impl Instrument for Instr {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        let info = &self.0;
        let delay = {
            let pending = info
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let mut last = info.last_delay.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = pending {
                *last = p;
            }
            *last
        };
        *info.open_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + delay);
        info.state.store(BREAKER_OPEN, Ordering::Relaxed);
        info.gauge.set(BREAKER_OPEN);
        info.opened.inc();
        tracing::warn!(destination = %info.destination, open_ms = delay.as_millis() as u64, "circuit breaker opened: deliveries to this destination wait");
    }

    fn on_half_open(&self) {
        self.0.state.store(BREAKER_HALF_OPEN, Ordering::Relaxed);
        self.0.gauge.set(BREAKER_HALF_OPEN);
        tracing::info!(destination = %self.0.destination, "circuit breaker half-open: probing");
    }

    fn on_closed(&self) {
        let was = self.0.state.swap(BREAKER_CLOSED, Ordering::Relaxed);
        *self.0.open_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.0.gauge.set(BREAKER_CLOSED);
        if was != BREAKER_CLOSED {
            tracing::info!(destination = %self.0.destination, "circuit breaker closed: destination recovered");
        }
    }
}

type Policy = OrElse<SuccessRateOverTimeWindow<Backoff>, ConsecutiveFailures<Backoff>>;

struct Breaker {
    sm: StateMachine<Policy, Instr>,
    info: Arc<Info>,
}

/// Every destination's breaker (process-wide, kept across reloads).
pub struct BreakerState {
    cfg: CircuitBreakerConfig,
    metrics: Arc<Metrics>,
    breakers: Mutex<HashMap<Arc<str>, Arc<Breaker>>>,
}

/// A breaker's state by name, for `status` and logs.
pub fn state_name(code: i64) -> &'static str {
    match code {
        BREAKER_OPEN => "open",
        BREAKER_HALF_OPEN => "half_open",
        _ => "closed",
    }
}

impl BreakerState {
    pub fn new(cfg: &CircuitBreakerConfig, metrics: Arc<Metrics>) -> Arc<BreakerState> {
        Arc::new(BreakerState {
            cfg: cfg.clone(),
            metrics,
            breakers: Mutex::new(HashMap::new()),
        })
    }

    /// Every destination seen so far and its state (`closed`, `half_open`, `open`), sorted.
    pub fn states(&self) -> Vec<(String, &'static str)> {
        let map = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, &'static str)> = map
            .iter()
            .map(|(d, b)| {
                (
                    d.to_string(),
                    state_name(b.info.state.load(Ordering::Relaxed)),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn breaker(&self, destination: &Arc<str>) -> Arc<Breaker> {
        let mut map = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(destination) {
            return b.clone();
        }
        let c = &self.cfg;
        let info = Arc::new(Info {
            destination: destination.clone(),
            state: AtomicI64::new(BREAKER_CLOSED),
            open_until: Mutex::new(None),
            pending: Mutex::new(None),
            last_delay: Mutex::new(Duration::from_millis(c.open_ms.max(1))),
            probe: AtomicBool::new(false),
            gauge: self.metrics.breaker_state.with_label_values(&[destination]),
            opened: self
                .metrics
                .breaker_opened
                .with_label_values(&[destination]),
        });
        let backoff = Backoff {
            next: Duration::from_millis(c.open_ms.max(1)),
            max: Duration::from_millis(c.max_open_ms.max(c.open_ms).max(1)),
            info: info.clone(),
        };
        let required_success = (1.0 - c.failure_rate).clamp(0.0, 1.0);
        let policy = success_rate_over_time_window(
            required_success,
            c.min_requests.max(1),
            Duration::from_secs(c.window_secs.max(1)),
            backoff.clone(),
        )
        .or_else(consecutive_failures(c.min_requests.max(1), backoff));
        let sm = StateMachine::new(policy, Instr(info.clone()));
        let b = Arc::new(Breaker { sm, info });
        map.insert(destination.clone(), b.clone());
        b
    }
}

/// Releases the half-open probe slot however the dispatch ends (even if it is dropped).
struct ProbeGuard(Arc<Breaker>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.0.info.probe.store(false, Ordering::Release);
    }
}

#[derive(Clone)]
pub struct CircuitBreakerLayer {
    state: Arc<BreakerState>,
}

impl CircuitBreakerLayer {
    pub fn new(state: Arc<BreakerState>) -> CircuitBreakerLayer {
        CircuitBreakerLayer { state }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    state: Arc<BreakerState>,
}

impl<S> tower::Service<Dispatch> for CircuitBreaker<S>
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
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let n = dispatch.deliveries.len();
        let mut decided: Vec<Option<Attempt>> = vec![None; n];
        // The breaker of each delivery let through, to report its outcome to.
        let mut passed: Vec<Option<Arc<Breaker>>> = vec![None; n];
        let mut probes: Vec<ProbeGuard> = Vec::new();
        for (i, d) in dispatch.deliveries.iter().enumerate() {
            let Some(action) = d.observer.actions.get(d.action_index) else {
                continue; // the core executor reports the missing action
            };
            let b = self.state.breaker(&action.destination);
            let deferred = |after_ms: u64, note: &str| {
                Some(Attempt::answered(
                    d.attempt,
                    AttemptResult::Deferred {
                        after_ms,
                        reason: "breaker_open",
                    },
                    Some(format!("circuit breaker of {} {note}", action.destination)),
                ))
            };
            if !b.sm.is_call_permitted() {
                let until = *b.info.open_until.lock().unwrap_or_else(|e| e.into_inner());
                let left = until
                    .map(|u| u.saturating_duration_since(Instant::now()).as_millis() as u64)
                    .unwrap_or(0);
                decided[i] = deferred(left.max(1) + 1, "is open");
                continue;
            }
            if b.info.state.load(Ordering::Relaxed) == BREAKER_HALF_OPEN {
                if b.info
                    .probe
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    decided[i] = deferred(PROBE_BUSY_MS, "is half-open and probing");
                    continue;
                }
                probes.push(ProbeGuard(b.clone()));
            }
            passed[i] = Some(b);
        }
        Box::pin(async move {
            let result = call_rest(inner, dispatch, decided).await;
            if let Ok(attempts) = &result {
                for (b, a) in passed.iter().zip(attempts) {
                    let Some(b) = b else { continue };
                    match a.result {
                        AttemptResult::Retry { .. } => b.sm.on_error(),
                        AttemptResult::Delivered | AttemptResult::Permanent => b.sm.on_success(),
                        AttemptResult::Deferred { .. }
                        | AttemptResult::Duplicate
                        | AttemptResult::ConditionFalse
                        | AttemptResult::Enqueued { .. } => {}
                    }
                }
            }
            drop(probes);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            failure_rate: 0.5,
            window_secs: 30,
            min_requests: 3,
            open_ms: 100,
            max_open_ms: 400,
        }
    }

    #[test]
    fn consecutive_failures_open_then_probe_doubles_and_success_closes() {
        let metrics = Metrics::new();
        let st = BreakerState::new(&cfg(), metrics.clone());
        let d: Arc<str> = "127.0.0.1:9".into();
        let b = st.breaker(&d);
        for _ in 0..3 {
            assert!(b.sm.is_call_permitted());
            b.sm.on_error();
        }
        assert!(!b.sm.is_call_permitted());
        assert_eq!(st.states(), vec![(d.to_string(), "open")]);
        assert_eq!(metrics.breaker_state.with_label_values(&[&d]).get(), 2);
        assert_eq!(metrics.breaker_opened.with_label_values(&[&d]).get(), 1);
        let first = b.info.open_until.lock().unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(120));
        assert!(b.sm.is_call_permitted(), "half-open after open_ms");
        assert_eq!(st.states()[0].1, "half_open");
        let t = Instant::now();
        b.sm.on_error();
        let second = b.info.open_until.lock().unwrap().unwrap();
        let period = second.saturating_duration_since(t);
        assert!(
            period >= Duration::from_millis(150) && period <= Duration::from_millis(250),
            "second open period doubled: {period:?} (first ended {first:?})"
        );
        std::thread::sleep(Duration::from_millis(220));
        assert!(b.sm.is_call_permitted());
        b.sm.on_success();
        assert_eq!(st.states()[0].1, "closed");
        assert_eq!(metrics.breaker_state.with_label_values(&[&d]).get(), 0);
    }
}
