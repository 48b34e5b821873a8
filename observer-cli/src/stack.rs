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
    ("caching", cfg!(feature = "caching")),
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

/// Process-wide state of the layers (see the module comment).
pub struct LayerState {
    pub metrics: Arc<Metrics>,
}

impl LayerState {
    pub fn new(_cfg: &Config, metrics: Arc<Metrics>) -> LayerState {
        LayerState { metrics }
    }
}

/// The executor every dispatch goes through.
pub fn build(cfg: &Config, ctx: ActionContext, _state: &LayerState) -> BoxExecutor {
    let f = &cfg.features;
    // Without `concurrent`, one dispatch at a time. Retries wait on timers outside the stack,
    // so a failing destination never holds a slot either way.
    let (limit, timeout) = concurrent(cfg);
    let stack = ServiceBuilder::new()
        .concurrency_limit(limit)
        .option_layer(timeout.filter(|_| f.concurrent))
        .service(CoreExecutor::new(ctx));
    BoxExecutor::new(stack)
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
