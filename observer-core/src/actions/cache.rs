//! `type = "cache"`: invalidates entries of the enrichment cache, which lives under
//! `<redis.key_prefix>:cache:` (the namespace the `caching` layer writes `enrich` results to).
//!
//! `keys` are rendered and `UNLINK`ed in one command; `patterns` are rendered and matched with
//! `SCAN … MATCH <prefix>:cache:<pattern> COUNT <scan_count>` (never `KEYS`, which blocks the
//! server), each page of matches `UNLINK`ed as it arrives. Only a pattern's own text is a glob:
//! values from the event are escaped (`Target::Glob`), so `user:{{ data.id }}` with an id of `*`
//! removes `user:*` and nothing else. Removed keys are counted into
//! `observer_cache_evictions_total`. A key that does not exist is not an error. Connection
//! trouble is retried (unlinking again is harmless).

use serde::{Deserialize, Serialize};

use crate::action::{permanent, ActionContext, AttemptResult, CompiledAction, Outcome};
use crate::actions::{redis_failure, redis_of};
use crate::config::RetryConfig;
use crate::path::Scope;
use crate::template::{Target, Template};

/// `type = "cache"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Cache keys to remove (text templates), e.g. `user:{{ data.id }}`.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Glob patterns (text templates) of cache keys to remove, e.g. `user:*`.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// `COUNT` hint of each `SCAN` step.
    #[serde(default = "scan_count")]
    pub scan_count: u64,
    #[serde(default)]
    pub retry: RetryConfig,
}

fn scan_count() -> u64 {
    500
}

#[derive(Debug)]
pub struct Cache {
    keys: Vec<Template>,
    patterns: Vec<Template>,
    scan_count: u64,
}

pub(crate) fn compile(
    c: &CacheConfig,
    issue: &mut dyn FnMut(&str, String),
) -> Option<CompiledAction> {
    if c.keys.is_empty() && c.patterns.is_empty() {
        issue(
            "keys",
            "a cache action needs `keys`, `patterns` or both".into(),
        );
    }
    if c.scan_count == 0 || c.scan_count > 100_000 {
        issue(
            "scan_count",
            format!("{} is out of range: expected 1..=100000", c.scan_count),
        );
    }
    let mut ok = true;
    let mut parse = |field: &str, list: &[String], target: Target| {
        let mut out = Vec::new();
        for (i, src) in list.iter().enumerate() {
            if src.trim().is_empty() {
                issue(&format!("{field}[{i}]"), "is empty".into());
                ok = false;
                continue;
            }
            match Template::parse(src, target) {
                Ok(t) => out.push(t),
                Err(e) => {
                    issue(&format!("{field}[{i}]"), e.to_string());
                    ok = false;
                }
            }
        }
        out
    };
    let keys = parse("keys", &c.keys, Target::Text);
    let patterns = parse("patterns", &c.patterns, Target::Glob);
    ok.then_some(CompiledAction::Cache(Cache {
        keys,
        patterns,
        scan_count: c.scan_count,
    }))
}

/// `s` with the glob metacharacters of Redis `MATCH` escaped, so a prefix matches literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    crate::template::glob_escape(s, &mut out);
    out
}

/// Keys unlinked per `UNLINK` command.
const UNLINK_BATCH: usize = 1_000;

impl Cache {
    pub(crate) async fn invalidate(&self, ctx: &ActionContext, scope: &Scope<'_>) -> Outcome {
        let redis = match redis_of(ctx, "cache") {
            Ok(r) => r,
            Err(o) => return o,
        };
        let base = redis.key("cache:");
        let mut keys = Vec::with_capacity(self.keys.len());
        for t in &self.keys {
            match t.render(scope) {
                Ok(k) if !k.is_empty() => keys.push(format!("{base}{k}")),
                Ok(_) => return permanent(format!("key template `{}` rendered empty", t.source())),
                Err(e) => return permanent(format!("key template `{}`: {e}", t.source())),
            }
        }
        let mut patterns = Vec::with_capacity(self.patterns.len());
        for t in &self.patterns {
            match t.render(scope) {
                Ok(p) if !p.is_empty() => patterns.push(format!("{}{p}", glob_escape(&base))),
                Ok(_) => {
                    return permanent(format!("pattern template `{}` rendered empty", t.source()))
                }
                Err(e) => return permanent(format!("pattern template `{}`: {e}", t.source())),
            }
        }
        let mut conn = match redis.conn().await {
            Ok(c) => c,
            Err(e) => return (AttemptResult::Retry { after_ms: None }, None, Some(e)),
        };
        let timeout = redis.timeout;
        let timed_out = || {
            (
                AttemptResult::Retry { after_ms: None },
                None,
                Some(format!(
                    "Redis at {} did not answer within {} ms",
                    redis.server,
                    timeout.as_millis()
                )),
            )
        };
        let mut removed: u64 = 0;
        for chunk in keys.chunks(UNLINK_BATCH) {
            let mut cmd = redis::cmd("UNLINK");
            cmd.arg(chunk);
            match tokio::time::timeout(timeout, cmd.query_async::<u64>(&mut conn)).await {
                Ok(Ok(n)) => removed += n,
                Ok(Err(e)) => return self.failed(ctx, removed, redis_failure("UNLINK", &e)),
                Err(_) => return self.failed(ctx, removed, timed_out()),
            }
        }
        for pattern in &patterns {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(self.scan_count);
                let run = cmd.query_async::<(u64, Vec<String>)>(&mut conn);
                let (next, found) = match tokio::time::timeout(timeout, run).await {
                    Ok(Ok(page)) => page,
                    Ok(Err(e)) => return self.failed(ctx, removed, redis_failure("SCAN", &e)),
                    Err(_) => return self.failed(ctx, removed, timed_out()),
                };
                for chunk in found.chunks(UNLINK_BATCH) {
                    let mut cmd = redis::cmd("UNLINK");
                    cmd.arg(chunk);
                    match tokio::time::timeout(timeout, cmd.query_async::<u64>(&mut conn)).await {
                        Ok(Ok(n)) => removed += n,
                        Ok(Err(e)) => {
                            return self.failed(ctx, removed, redis_failure("UNLINK", &e))
                        }
                        Err(_) => return self.failed(ctx, removed, timed_out()),
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        ctx.metrics.cache_evictions.inc_by(removed);
        (AttemptResult::Delivered, None, None)
    }

    /// Counts what was removed before a failure (those keys are gone either way).
    fn failed(&self, ctx: &ActionContext, removed: u64, outcome: Outcome) -> Outcome {
        ctx.metrics.cache_evictions.inc_by(removed);
        outcome
    }
}

impl Cache {
    /// The templates this action renders (checked for `enrich.<name>` references at load).
    pub fn templates(&self) -> Vec<&Template> {
        self.keys.iter().chain(self.patterns.iter()).collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_globs_are_escaped() {
        assert_eq!(super::glob_escape("a*b?[c]\\:"), "a\\*b\\?\\[c\\]\\\\:");
    }
}
