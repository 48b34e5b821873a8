//! The `caching` layer: enrichment lookup results kept in Redis with a TTL, so a burst of events
//! about the same user/account does not repeat the same lookup.
//!
//! It plugs into the core executor through [`observer_core::enrich::LookupCache`] (carried in
//! `ActionContext::cache`): the lookups happen inside the executor, so this is a store rather
//! than a `tower::Layer`. When the layer is off the daemon uses `NoCache`.
//!
//! Keys: `<[redis] key_prefix>:cache:<rendered key>`, the namespace the `cache` invalidation
//! action deletes from. Values: the result's JSON text, written with `SET … EX ttl`. Every Redis
//! failure is returned as an error; the caller counts it and runs the lookup uncached.

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
}

impl RedisLookupCache {
    pub fn new(redis: RedisHandle, cache_misses: bool) -> RedisLookupCache {
        RedisLookupCache {
            redis,
            cache_misses,
        }
    }

    /// The Redis key of a rendered lookup key.
    pub fn redis_key(&self, key: &str) -> String {
        self.redis.key(&format!("cache:{key}"))
    }
}

#[async_trait::async_trait]
impl LookupCache for RedisLookupCache {
    async fn get(&self, key: &str) -> Result<Option<Value>, String> {
        let mut conn = self.redis.conn().await?;
        let k = self.redis_key(key);
        let text: Option<String> = redis::cmd("GET")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("Redis GET at {}: {e}", self.redis.server))?;
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
        let mut conn = self.redis.conn().await?;
        let _: () = redis::cmd("SET")
            .arg(self.redis_key(key))
            .arg(value.to_string())
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("Redis SET at {}: {e}", self.redis.server))?;
        Ok(())
    }
}
