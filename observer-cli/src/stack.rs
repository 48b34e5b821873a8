//! The executor stack, built in one place from the enabled features. Read `build` top to
//! bottom: the outermost layer first, the core executor last.
//!
//! Layers keep their state (breaker windows, dedup memory, rate-limit buckets) in
//! [`LayerState`], created once per process, so a reload that rebuilds the stack keeps it.

use std::sync::Arc;

use anyhow::{bail, Result};
use observer_core::action::ActionContext;
use observer_core::config::Config;
use observer_core::enrich::{LookupCache, NoCache};
use observer_core::executor::{BoxExecutor, CoreExecutor};
use observer_core::metrics::Metrics;
use tower::ServiceBuilder;

/// The layers this binary was built with (their cargo features).
pub const BUILT: &[(&str, bool)] = &[
    ("checkpoint", cfg!(feature = "checkpoint")),
    ("concurrent", cfg!(feature = "concurrent")),
    ("dedup", cfg!(feature = "dedup")),
    ("circuit_breaker", cfg!(feature = "circuit_breaker")),
    ("rate_limit", cfg!(feature = "rate_limit")),
    ("metrics", cfg!(feature = "metrics")),
    ("caching", cfg!(feature = "caching")),
    ("failover", cfg!(feature = "failover")),
    ("search", cfg!(feature = "search")),
    ("queue", cfg!(feature = "queue")),
    ("nats", cfg!(feature = "nats")),
];

/// Fails when config switches on a layer this binary was built without.
pub fn check_features(cfg: &Config) -> Result<()> {
    for name in cfg.features.enabled() {
        let built = BUILT.iter().any(|(n, on)| *n == name && *on);
        if !built {
            bail!(
                "features.{name} is on, but this binary was built without the `{name}` layer (cargo feature `{name}`): \
                 use a build that includes it, or set OBSERVER__FEATURES__{}=false",
                name.to_ascii_uppercase()
            );
        }
    }
    let f = &cfg.features;
    if f.failover && !f.checkpoint {
        bail!("features.failover is on but features.checkpoint is off: a standby that takes over resumes from the checkpoint, \
               so without one it would skip what the old leader had not finished. Set features.checkpoint = true (the default)");
    }
    if f.dedup
        && cfg.dedup.backend == observer_core::config::DedupBackend::Redis
        && cfg.redis.url.is_none()
    {
        bail!("dedup.backend is `redis` but no Redis is configured: set [redis] url (or REDIS_URL), or use backend = \"auto\" / \"memory\"");
    }
    if f.rate_limit && cfg.rate_limit.shared && cfg.redis.url.is_none() {
        bail!("rate_limit.shared is on but no Redis is configured: set [redis] url (or REDIS_URL), or set rate_limit.shared = false");
    }
    if f.queue && cfg.redis.url.is_none() {
        bail!("features.queue is on but no Redis is configured: the job queue lives in Redis. Set [redis] url (or REDIS_URL), or set features.queue = false");
    }
    if cfg.features.caching && cfg.redis.url.is_none() {
        bail!(
            "features.caching is on, but redis.url is not set: the lookup cache lives in Redis. \
             Set [redis] url (or OBSERVER__REDIS__URL / REDIS_URL), or set features.caching = false"
        );
    }
    Ok(())
}

/// Where enrichment lookups are cached: Redis when the `caching` layer is on, else nowhere
/// (`NoCache`, the roll-back setting).
pub fn lookup_cache(
    cfg: &Config,
    redis: Option<&observer_core::action::RedisHandle>,
) -> Arc<dyn LookupCache> {
    match redis {
        #[cfg(feature = "caching")]
        Some(r) if cfg.features.caching => Arc::new(
            observer_features::caching::RedisLookupCache::new(r.clone(), cfg.caching.cache_misses),
        ),
        _ => {
            let _ = (cfg, redis);
            Arc::new(NoCache)
        }
    }
}

/// How this process becomes the one active instance of its listener: the `failover` layer's
/// lease when it is on, else the core's advisory lock.
pub fn leadership(
    cfg: &Config,
    host: &str,
    objects: &observer_core::schema::Objects,
    pg: &tokio_postgres::Config,
    tls: &observer_core::tls::PgTls,
    metrics: &Arc<Metrics>,
) -> Arc<dyn observer_core::leadership::Leadership> {
    #[cfg(feature = "failover")]
    if cfg.features.failover {
        return Arc::new(observer_features::failover::LeaseLeadership::new(
            &cfg.listener.id,
            host,
            &cfg.failover,
            objects,
            pg.clone(),
            tls.clone(),
            metrics.clone(),
        ));
    }
    let _ = (host, objects, pg, tls, metrics);
    Arc::new(observer_core::leadership::AdvisoryLock::new(
        &cfg.listener.id,
    ))
}

/// Process-wide state of the layers (see the module comment).
pub struct LayerState {
    /// For layers and endpoints that report on the stack (the metrics endpoint).
    #[allow(dead_code)]
    pub metrics: Arc<Metrics>,
    #[cfg(feature = "dedup")]
    pub dedup: Arc<observer_features::dedup::DedupState>,
    #[cfg(feature = "circuit_breaker")]
    pub breakers: Arc<observer_features::circuit_breaker::BreakerState>,
    #[cfg(feature = "rate_limit")]
    pub rate: Arc<observer_features::rate_limit::RateState>,
    /// The `observer_queue_*` series (registered once per process).
    #[cfg(feature = "queue")]
    pub queue: Arc<observer_features::queue::QueueMetrics>,
    /// The `observer_nats_*` series (registered once per process).
    #[cfg(feature = "nats")]
    pub nats: Arc<observer_features::nats::NatsMetrics>,
}

impl LayerState {
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> LayerState {
        let _ = cfg;
        LayerState {
            #[cfg(feature = "dedup")]
            dedup: observer_features::dedup::DedupState::new(&cfg.dedup, metrics.clone()),
            #[cfg(feature = "circuit_breaker")]
            breakers: observer_features::circuit_breaker::BreakerState::new(
                &cfg.circuit_breaker,
                metrics.clone(),
            ),
            #[cfg(feature = "rate_limit")]
            rate: observer_features::rate_limit::RateState::new(&cfg.rate_limit),
            #[cfg(feature = "queue")]
            queue: Arc::new(
                observer_features::queue::QueueMetrics::register(&metrics.registry)
                    .expect("the queue series are registered once per process"),
            ),
            #[cfg(feature = "nats")]
            nats: Arc::new(
                observer_features::nats::NatsMetrics::register(&metrics.registry)
                    .expect("the nats series are registered once per process"),
            ),
            metrics,
        }
    }

    /// At shutdown, after the last dispatch: waits (up to 5 s) for what the layers still send
    /// on their own (dedup's confirmations), so it is not lost with the process.
    pub async fn settle(&self) {
        #[cfg(feature = "dedup")]
        if !self.dedup.settle(std::time::Duration::from_secs(5)).await {
            tracing::warn!(
                "dedup confirmations still unanswered after 5 s; those claims end with their lease"
            );
        }
    }

    /// Each destination's breaker state (`closed`, `half_open`, `open`) as this process sees
    /// it; empty when the layer is off or not built. Other processes read the same through the
    /// `observer_breaker_state` series of the metrics endpoint.
    #[allow(dead_code)] // for the metrics endpoint and `status`, which live in other branches
    pub fn breaker_states(&self) -> Vec<(String, &'static str)> {
        #[cfg(feature = "circuit_breaker")]
        return self.breakers.states();
        #[cfg(not(feature = "circuit_breaker"))]
        Vec::new()
    }
}

/// The executor every dispatch goes through.
pub fn build(cfg: &Config, ctx: ActionContext, state: &LayerState) -> BoxExecutor {
    let f = &cfg.features;
    // Without `concurrent`, one dispatch at a time. Retries wait on timers outside the stack,
    // so a failing destination never holds a slot either way.
    let (limit, timeout) = concurrent(cfg);
    let stack = ServiceBuilder::new()
        .concurrency_limit(limit)
        // Queued observers' deliveries become jobs here; the workers run them through the
        // layers below (`build_inline`).
        .option_layer(queue(cfg, &ctx, state))
        // A destination whose breaker is open is answered before anything else is spent on it.
        .option_layer(circuit_breaker(cfg, state))
        // Then its rate and in-flight cap, so excess waits without touching the dedup store.
        .option_layer(rate_limit(cfg, &ctx, state))
        // Claims only what is about to run; confirms or releases after the result.
        .option_layer(dedup(cfg, &ctx, state))
        .option_layer(timeout.filter(|_| f.concurrent))
        .service(CoreExecutor::new(ctx));
    BoxExecutor::new(stack)
}

/// The configuration a publisher (`run --role publisher`) runs the loop with: its one
/// observer only forwards, so the layers that guard destinations (dedup, breaker, rate limit,
/// queue) have nothing to do — the workers run them; the audit trail is the workers' too; and
/// the action log records only forwards that needed a retry (`failures`), unless it is off.
pub fn publisher_config(cfg: &Config) -> Config {
    let mut p = cfg.clone();
    let f = &mut p.features;
    (
        f.dedup,
        f.circuit_breaker,
        f.rate_limit,
        f.queue,
        f.search,
        f.caching,
    ) = (false, false, false, false, false, false);
    if p.action_log.record == observer_core::config::RecordMode::All {
        p.action_log.record = observer_core::config::RecordMode::Failures;
    }
    p
}

/// The publisher's executor: the core executor (whose only action forwards to JetStream) under
/// a concurrency limit of `nats.max_outstanding_acks`: that many publishes wait for their
/// acknowledgement at once, in place of one round trip per event.
pub fn build_publisher(cfg: &Config, ctx: ActionContext) -> BoxExecutor {
    let stack = ServiceBuilder::new()
        .concurrency_limit(cfg.nats.max_outstanding_acks.max(1))
        .service(CoreExecutor::new(ctx));
    BoxExecutor::new(stack)
}

/// The stack without the queue layer: what the job workers run jobs through, and what operator
/// commands (`dlq retry`, `replay`) deliver through, so a retried job runs inline.
pub fn build_inline(cfg: &Config, ctx: ActionContext, state: &LayerState) -> BoxExecutor {
    let mut inline = cfg.clone();
    inline.features.queue = false;
    build(&inline, ctx, state)
}

#[cfg(feature = "queue")]
fn queue(
    cfg: &Config,
    ctx: &ActionContext,
    state: &LayerState,
) -> Option<observer_features::queue::QueueLayer> {
    let redis = ctx.redis.clone().filter(|_| cfg.features.queue)?;
    Some(observer_features::queue::QueueLayer::new(
        observer_features::queue::JobQueue::new(redis, cfg.queue.dedup_ttl_secs),
        state.queue.clone(),
    ))
}

#[cfg(not(feature = "queue"))]
fn queue(
    _cfg: &Config,
    _ctx: &ActionContext,
    _state: &LayerState,
) -> Option<tower::layer::util::Identity> {
    None
}

#[cfg(feature = "concurrent")]
fn concurrent(
    cfg: &Config,
) -> (
    usize,
    Option<observer_features::concurrent::ActionTimeoutLayer>,
) {
    if !cfg.features.concurrent {
        return (1, None);
    }
    let (_, timeout) = observer_features::concurrent::layers(&cfg.concurrent);
    (cfg.concurrent.max_in_flight.max(1), Some(timeout))
}

#[cfg(not(feature = "concurrent"))]
fn concurrent(cfg: &Config) -> (usize, Option<tower::layer::util::Identity>) {
    let _ = cfg;
    (1, None)
}

#[cfg(feature = "dedup")]
fn dedup(
    cfg: &Config,
    ctx: &ActionContext,
    state: &LayerState,
) -> Option<observer_features::dedup::DedupLayer> {
    cfg.features.dedup.then(|| {
        observer_features::dedup::DedupLayer::new(
            state.dedup.clone(),
            ctx.redis.clone(),
            cfg.features
                .concurrent
                .then_some(cfg.concurrent.action_timeout_ms),
        )
    })
}

#[cfg(not(feature = "dedup"))]
fn dedup(
    _cfg: &Config,
    _ctx: &ActionContext,
    _state: &LayerState,
) -> Option<tower::layer::util::Identity> {
    None
}

#[cfg(feature = "circuit_breaker")]
fn circuit_breaker(
    cfg: &Config,
    state: &LayerState,
) -> Option<observer_features::circuit_breaker::CircuitBreakerLayer> {
    cfg.features.circuit_breaker.then(|| {
        observer_features::circuit_breaker::CircuitBreakerLayer::new(state.breakers.clone())
    })
}

#[cfg(not(feature = "circuit_breaker"))]
fn circuit_breaker(_cfg: &Config, _state: &LayerState) -> Option<tower::layer::util::Identity> {
    None
}

#[cfg(feature = "rate_limit")]
fn rate_limit(
    cfg: &Config,
    ctx: &ActionContext,
    state: &LayerState,
) -> Option<observer_features::rate_limit::RateLimitLayer> {
    cfg.features.rate_limit.then(|| {
        observer_features::rate_limit::RateLimitLayer::new(state.rate.clone(), ctx.redis.clone())
    })
}

#[cfg(not(feature = "rate_limit"))]
fn rate_limit(
    _cfg: &Config,
    _ctx: &ActionContext,
    _state: &LayerState,
) -> Option<tower::layer::util::Identity> {
    None
}
