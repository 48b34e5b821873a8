//! `rate_limit` (cargo feature `rate_limit`): per destination (`ObserverAction::destination`) a
//! request rate (`per_second`) and an in-flight cap (`max_concurrent`), from
//! `[rate_limit.destinations."<destination>"]` or `[rate_limit.default]`.
//!
//! * Rate, local (default): a token bucket per destination holding at most one second's worth
//!   of tokens (`max(1, per_second)`), refilled continuously at `per_second`.
//! * Rate, `shared = true` with `[redis]`: GCRA (the generic cell rate algorithm) in one atomic
//!   Lua script per delivery, keyed `<prefix>:rate:<destination>`. The key holds the theoretical
//!   arrival time (TAT, ms, on Redis's own clock so instances' clocks do not matter); a request
//!   is allowed when `now >= TAT - tau` (tau = the burst tolerance, the same one second's worth
//!   as the local bucket) and then moves TAT to `max(TAT, now) + 1000/per_second`; otherwise the
//!   script answers how many ms until it would be allowed. Every instance shares the key, so the
//!   cap is cluster-wide. All checks of one dispatch go in one pipeline. If Redis cannot be
//!   reached the local bucket is used instead (logged once per outage), so delivery goes on at
//!   this instance's rate.
//! * In flight: a counter per destination in this process; `max_concurrent` is per process.
//!
//! Excess is answered `Deferred{after_ms: until a token is due, reason: "rate_limited"}`: put
//! back, not an attempt, never dropped.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use observer_core::action::{Attempt, AttemptResult, RedisHandle};
use observer_core::config::{DestinationLimit, RateLimitConfig};
use observer_core::executor::{call_rest, BoxError, Dispatch, DispatchResult};
use tower::Layer;

/// How long a delivery waits when its destination is at `max_concurrent`.
const BUSY_MS: u64 = 25;

/// GCRA. KEYS[1] the destination's key; ARGV[1] emission interval (ms, may be fractional),
/// ARGV[2] burst tolerance (ms). Returns 0 when allowed, else ms until it would be.
const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tau
if now < allow_at then return math.max(1, math.ceil(allow_at - now)) end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1000)
return 0
";

/// Bucket count at which idle (refilled) buckets are forgotten.
const PRUNE_AT: usize = 1_024;

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Process-wide rate-limit state (kept across reloads).
pub struct RateState {
    cfg: RateLimitConfig,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
    in_flight: Arc<Mutex<HashMap<Arc<str>, u32>>>,
    down: AtomicBool,
}

impl RateState {
    pub fn new(cfg: &RateLimitConfig) -> Arc<RateState> {
        Arc::new(RateState {
            cfg: cfg.clone(),
            buckets: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            down: AtomicBool::new(false),
        })
    }

    fn limit(&self, destination: &str) -> &DestinationLimit {
        self.cfg
            .destinations
            .get(destination)
            .unwrap_or(&self.cfg.default)
    }

    /// Takes a local token: `None` when allowed, else ms until one is due.
    fn take_local(&self, destination: &Arc<str>, per_second: f64) -> Option<u64> {
        let burst = per_second.max(1.0);
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= PRUNE_AT && !map.contains_key(destination) {
            // A bucket idle long enough to have refilled is the same as a new one: forget it, so
            // destinations rendered from event data (a host per tenant) cannot grow this map
            // without bound.
            map.retain(|d, b| {
                let rate = self.limit(d).per_second.max(f64::MIN_POSITIVE);
                b.tokens + now.duration_since(b.last).as_secs_f64() * rate < rate.max(1.0)
            });
        }
        let b = map.entry(destination.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * per_second).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            None
        } else {
            Some((((1.0 - b.tokens) / per_second) * 1000.0).ceil().max(1.0) as u64)
        }
    }

    /// Reserves an in-flight slot unless the destination is at its cap.
    fn reserve(&self, destination: &Arc<str>, cap: u32) -> Option<Slot> {
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(destination.clone()).or_insert(0);
        if cap > 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            map: self.in_flight.clone(),
            destination: destination.clone(),
        })
    }
}

/// One in-flight request to a destination; released on drop, however the dispatch ends.
struct Slot {
    map: Arc<Mutex<HashMap<Arc<str>, u32>>>,
    destination: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.destination) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.destination);
            }
        }
    }
}

/// Asks Redis for one GCRA verdict per `(destination, per_second)`, in one pipeline.
async fn take_shared(
    redis: &RedisHandle,
    asks: &[(Arc<str>, f64)],
) -> Result<Vec<Option<u64>>, String> {
    let mut pipe = redis::pipe();
    for (dest, per_second) in asks {
        let interval = 1000.0 / per_second;
        let tau = interval * (per_second.max(1.0) - 1.0);
        pipe.cmd("EVAL")
            .arg(GCRA_LUA)
            .arg(1)
            .arg(redis.key(&format!("rate:{dest}")))
            .arg(format!("{interval:.6}"))
            .arg(format!("{tau:.6}"));
    }
    let values: Vec<i64> = redis.query_pipeline(&pipe).await?;
    if values.len() != asks.len() {
        return Err(format!(
            "Redis at {} answered the wrong number of replies",
            redis.server
        ));
    }
    Ok(values
        .into_iter()
        .map(|v| if v <= 0 { None } else { Some(v as u64) })
        .collect())
}

#[derive(Clone)]
pub struct RateLimitLayer {
    state: Arc<RateState>,
    /// Set when `shared = true` and `[redis]` is configured.
    redis: Option<RedisHandle>,
}

impl RateLimitLayer {
    pub fn new(state: Arc<RateState>, redis: Option<RedisHandle>) -> RateLimitLayer {
        let redis = redis.filter(|_| state.cfg.shared);
        RateLimitLayer { state, redis }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

fn limited(attempt: u32, after_ms: u64, note: String) -> Option<Attempt> {
    Some(Attempt::answered(
        attempt,
        AttemptResult::Deferred {
            after_ms,
            reason: "rate_limited",
        },
        Some(note),
    ))
}

impl<S> tower::Service<Dispatch> for RateLimit<S>
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
        let layer = self.layer.clone();
        Box::pin(async move {
            let st = &layer.state;
            let n = dispatch.deliveries.len();
            let mut decided: Vec<Option<Attempt>> = vec![None; n];
            let mut slots: Vec<Option<Slot>> = (0..n).map(|_| None).collect();
            // (delivery index, destination, per_second) still needing a token.
            let mut need: Vec<(usize, Arc<str>, f64)> = Vec::new();
            for (i, d) in dispatch.deliveries.iter().enumerate() {
                let Some(action) = d.observer.actions.get(d.action_index) else {
                    continue;
                };
                let dest = &action.destination;
                let lim = st.limit(dest);
                match st.reserve(dest, lim.max_concurrent) {
                    Some(s) => slots[i] = Some(s),
                    None => {
                        decided[i] = limited(
                            d.attempt,
                            BUSY_MS,
                            format!("{dest} has {} requests in flight", lim.max_concurrent),
                        );
                        continue;
                    }
                }
                if lim.per_second > 0.0 {
                    need.push((i, dest.clone(), lim.per_second));
                }
            }
            let mut waits: Vec<Option<u64>> = Vec::new();
            if let (Some(redis), false) = (&layer.redis, need.is_empty()) {
                let asks: Vec<(Arc<str>, f64)> =
                    need.iter().map(|(_, d, r)| (d.clone(), *r)).collect();
                match take_shared(redis, &asks).await {
                    Ok(w) => {
                        if st.down.swap(false, Ordering::Relaxed) {
                            tracing::info!(server = %redis.server, "rate_limit: Redis answers again; shared limits restored");
                        }
                        waits = w;
                    }
                    Err(e) => {
                        if !st.down.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "rate_limit: Redis unreachable; using this instance's local limits (logged once per outage)");
                        }
                    }
                }
            }
            if waits.len() != need.len() {
                waits = need.iter().map(|(_, d, r)| st.take_local(d, *r)).collect();
            }
            for ((i, dest, per_second), wait) in need.iter().zip(waits) {
                if let Some(ms) = wait {
                    slots[*i] = None;
                    decided[*i] = limited(
                        dispatch.deliveries[*i].attempt,
                        ms,
                        format!("{dest} is limited to {per_second}/s"),
                    );
                }
            }
            let result = call_rest(inner, dispatch, decided).await;
            drop(slots);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_second_of_burst_then_paces() {
        let st = RateState::new(&RateLimitConfig::default());
        let d: Arc<str> = "x:1".into();
        for _ in 0..10 {
            assert_eq!(st.take_local(&d, 10.0), None);
        }
        let w = st.take_local(&d, 10.0).expect("the 11th waits");
        assert!((1..=100).contains(&w), "{w}");
    }

    #[test]
    fn in_flight_cap_is_released_on_drop() {
        let st = RateState::new(&RateLimitConfig::default());
        let d: Arc<str> = "x:1".into();
        let a = st.reserve(&d, 2).unwrap();
        let _b = st.reserve(&d, 2).unwrap();
        assert!(st.reserve(&d, 2).is_none());
        drop(a);
        assert!(st.reserve(&d, 2).is_some());
        // 0 = no cap
        let many: Vec<_> = (0..100).map(|_| st.reserve(&d, 0).unwrap()).collect();
        assert_eq!(many.len(), 100);
        drop(many);
        drop(_b);
        // No slot left: the destination's entry is gone, not kept at zero.
        assert!(st.in_flight.lock().unwrap().is_empty());
    }

    #[test]
    fn refilled_buckets_are_forgotten_once_there_are_many() {
        let st = RateState::new(&RateLimitConfig::default()); // 100/s by default
        for i in 0..PRUNE_AT {
            let d: Arc<str> = format!("tenant-{i}.example:443").into();
            assert_eq!(st.take_local(&d, 100.0), None);
        }
        let busy: Arc<str> = "busy.example:443".into();
        assert!(st.buckets.lock().unwrap().len() == PRUNE_AT);
        // Every bucket refills (one token short of a hundred) within 10 ms at 100/s.
        std::thread::sleep(std::time::Duration::from_millis(30));
        for _ in 0..50 {
            st.take_local(&busy, 100.0);
        }
        let map = st.buckets.lock().unwrap();
        assert_eq!(map.len(), 1, "only the bucket in use is kept");
        assert!(map.contains_key(&busy));
    }
}
