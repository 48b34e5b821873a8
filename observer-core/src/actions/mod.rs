//! Actions beyond the three in `action.rs`, one module each (their config struct, compilation
//! and one attempt), plus the HTTP status policy the HTTP actions share.

pub mod cache;
pub mod email;
pub mod http_policy;
pub mod redis_publish;
pub mod slack;
pub mod webhook_batch;

/// Whether a Redis error may go away by itself (connection trouble, a server that is loading or
/// failing over) rather than being a problem with the command (a wrong type, a bad argument).
pub(crate) fn redis_transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
}

/// The outcome of a failed Redis command: retried when transient, else permanent.
pub(crate) fn redis_failure(what: &str, e: &redis::RedisError) -> crate::action::Outcome {
    let result = if redis_transient(e) {
        crate::action::AttemptResult::Retry { after_ms: None }
    } else {
        crate::action::AttemptResult::Permanent
    };
    (result, None, Some(format!("{what}: {e}")))
}

/// The Redis handle, or the permanent failure of an action that needs one and has none.
pub(crate) fn redis_of(
    ctx: &crate::action::ActionContext,
    kind: &str,
) -> Result<crate::action::RedisHandle, crate::action::Outcome> {
    ctx.redis.clone().ok_or_else(|| {
        crate::action::permanent(format!(
            "a `{kind}` action needs a Redis server, and none is configured: set [redis] url or REDIS_URL"
        ))
    })
}
