//! `cache-hit-bench`: the latency of one enrichment cache hit, measured through the `caching`
//! layer's own Redis backend (`RedisLookupCache::get`: one `GET` on the shared multiplexed
//! connection plus parsing the JSON text), one lookup at a time, as the executor does it.
//!
//! It writes one document under a fresh key prefix, warms up, times N gets, prints p50/p90/p99/
//! max, and deletes its key. It fails if any get is not a hit with the stored value.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use observer_core::action::RedisHandle;
use observer_core::enrich::LookupCache;
use observer_features::caching::RedisLookupCache;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "cache-hit-bench",
    about = "Latency of enrichment cache hits (Redis GET + JSON parse)."
)]
struct Args {
    /// Timed lookups.
    #[arg(long, default_value_t = 10_000)]
    lookups: usize,
    /// Untimed lookups first (connection set-up, allocator warm-up).
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    #[arg(
        long,
        env = "BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.lookups == 0 {
        bail!("--lookups must be at least 1");
    }
    let prefix = format!("cache_bench_{}", std::process::id());
    let redis = RedisHandle::new(&args.redis_url, &prefix, Duration::from_secs(2))
        .map_err(anyhow::Error::msg)?;
    let cache = RedisLookupCache::new(redis.clone(), true);
    // A typical looked-up record: a user with a few fields and a small nested object.
    let doc = json!({
        "id": 7, "email": "ann@example.com", "name": "Ann Example", "vip": true,
        "tier": "gold", "created_at": "2025-03-01T10:00:00Z",
        "address": {"city": "Zürich", "country": "CH", "zip": "8001"},
        "tags": ["early-adopter", "newsletter"]
    });
    let key = "user:7";
    cache
        .put(key, &doc, Duration::from_secs(300))
        .await
        .map_err(anyhow::Error::msg)
        .context("storing the document")?;
    let result = async {
        for _ in 0..args.warmup {
            cache.get(key).await.map_err(anyhow::Error::msg)?;
        }
        let mut samples = Vec::with_capacity(args.lookups);
        let all = Instant::now();
        for _ in 0..args.lookups {
            let t = Instant::now();
            let got = cache.get(key).await.map_err(anyhow::Error::msg)?;
            samples.push(t.elapsed());
            if got.as_ref() != Some(&doc) {
                bail!("not a hit with the stored document: {got:?}");
            }
        }
        let total = all.elapsed();
        samples.sort();
        println!(
            "cache hits: {} lookups of a {}-byte document in {:.2} s ({:.0}/s, one at a time)",
            args.lookups,
            doc.to_string().len(),
            total.as_secs_f64(),
            args.lookups as f64 / total.as_secs_f64()
        );
        println!(
            "latency: p50 {}  p90 {}  p99 {}  max {}",
            us(percentile(&samples, 0.50)),
            us(percentile(&samples, 0.90)),
            us(percentile(&samples, 0.99)),
            us(*samples.last().expect("samples"))
        );
        let p99 = percentile(&samples, 0.99);
        println!(
            "target p99 < 1 ms: {}",
            if p99 < Duration::from_millis(1) {
                "met"
            } else {
                "MISSED"
            }
        );
        Ok(())
    }
    .await;
    // Clean up our key whatever happened.
    if let Ok(mut conn) = redis.conn().await {
        let _: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(cache.redis_key(key))
            .query_async(&mut conn)
            .await;
    }
    result
}
