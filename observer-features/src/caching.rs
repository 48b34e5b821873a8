//! The `caching` layer: enrichment lookup results kept in Redis with a TTL, so a burst of events
//! about the same user/account does not repeat the same lookup.
//!
//! It plugs into the core executor through [`observer_core::enrich::LookupCache`] (carried in
//! `ActionContext::cache`): the lookups happen inside the executor, so this is a store rather
//! than a `tower::Layer`. When the layer is off the daemon uses `NoCache`.
//!
//! Keys: `<[redis] key_prefix>:cache:<rendered key>`, the namespace the `cache` invalidation
//! action deletes from. Values: the result's JSON text, written with `SET … EX ttl`. Every Redis
//! failure is returned as an error; the caller counts it and runs the lookup uncached. An outage
//! is logged once when it starts and once when Redis answers again, not once per lookup.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use observer_core::action::RedisHandle;
use observer_core::enrich::LookupCache;
use serde_json::Value;

/// The Redis backend of the lookup cache.
#[derive(Clone)]
pub struct RedisLookupCache {
    redis: RedisHandle,
    /// `[caching] cache_misses`: also store `null` ("not found").
    cache_misses: bool,
    /// Redis is failing (logged once per outage).
    down: Arc<AtomicBool>,
}

impl RedisLookupCache {
    pub fn new(redis: RedisHandle, cache_misses: bool) -> RedisLookupCache {
        RedisLookupCache {
            redis,
            cache_misses,
            down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Logs the start and the end of an outage, passing `r` through.
    fn note<T>(&self, r: Result<T, String>) -> Result<T, String> {
        match &r {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(server = %self.redis.server, "lookup cache available again");
                }
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "lookup cache unavailable; looking up uncached until Redis answers again (counted in observer_cache_errors_total)");
                }
            }
        }
        r
    }

    /// The Redis key of a rendered lookup key.
    pub fn redis_key(&self, key: &str) -> String {
        self.redis.key(&format!("cache:{key}"))
    }
}

#[async_trait::async_trait]
impl LookupCache for RedisLookupCache {
    async fn get(&self, key: &str) -> Result<Option<Value>, String> {
        let k = self.redis_key(key);
        let text: Option<String> = self.note(
            async {
                let mut conn = self.redis.conn().await?;
                redis::cmd("GET")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("Redis GET at {}: {e}", self.redis.server))
            }
            .await,
        )?;
        match text {
            None => Ok(None),
            Some(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| format!("cached value of `{k}` is not JSON ({e})")),
        }
    }

    async fn put(&self, key: &str, value: &Value, ttl: Duration) -> Result<(), String> {
        if value.is_null() && !self.cache_misses {
            return Ok(());
        }
        self.note(
            async {
                let mut conn = self.redis.conn().await?;
                redis::cmd("SET")
                    .arg(self.redis_key(key))
                    .arg(value.to_string())
                    .arg("EX")
                    .arg(ttl.as_secs().max(1))
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| format!("Redis SET at {}: {e}", self.redis.server))
            }
            .await,
        )
    }
}
