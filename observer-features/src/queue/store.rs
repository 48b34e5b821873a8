//! The queue's store: one Redis stream per queue, worked off by the consumer group `workers`.
//!
//! Keys (under `[redis] key_prefix`):
//! * `queue:<name>:jobs` — the stream. An entry is a job; it is deleted once done, so the
//!   stream's length is the queue's depth.
//! * `queue:<name>:key:<idempotency key>` — the enqueue marker (value: the entry id), set in the
//!   same script as the XADD, so an event replayed after a crash never enqueues its job twice.
//! * `queue:<name>:attempts` — a hash: idempotency key → attempts started, so a job taken over
//!   from a dead worker continues its count and a job that kills every worker still ends.
//!
//! Why a stream and a group rather than a list: an entry read with XREADGROUP stays in the
//! group's pending list until XACK, so a worker that dies between reading and finishing loses
//! nothing; XAUTOCLAIM hands its jobs to another worker once they have been idle longer than the
//! visibility timeout. A live worker keeps its jobs by touching them (a fenced XCLAIM … JUSTID).

use std::collections::HashMap;
use std::time::Duration;

use observer_core::action::RedisHandle;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};

/// The consumer group every worker reads through.
pub const GROUP: &str = "workers";

/// Redis trouble, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QueueError(pub String);

impl QueueError {
    fn redis(what: &str, server: &str, e: impl std::fmt::Display) -> QueueError {
        QueueError(format!("Redis at {server}: {what}: {e}"))
    }
}

/// A job to enqueue: one delivery of one event.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub queue: String,
    pub idempotency_key: String,
    pub observer: String,
    pub action_index: usize,
    pub event_id: String,
    /// The event as JSON (`ChangeEvent`).
    pub event: String,
}

/// A job read from a stream.
#[derive(Debug, Clone)]
pub struct Job {
    /// The stream entry id (`<ms>-<seq>`).
    pub id: String,
    pub idempotency_key: String,
    pub observer: String,
    pub action_index: usize,
    pub event_id: String,
    pub event: String,
}

impl Job {
    /// When it was enqueued (the entry id's milliseconds).
    pub fn enqueued_ms(&self) -> Option<i64> {
        entry_ms(&self.id)
    }

    /// Reads an entry; `Err` names what is missing (a poison job: dead-lettered, not retried).
    pub fn from_entry(e: &StreamId) -> Result<Job, String> {
        let field = |name: &str| -> Result<String, String> {
            match e.map.get(name) {
                Some(v) => redis::from_redis_value::<String>(v.clone())
                    .map_err(|_| format!("job {}: field `{name}` is not text", e.id)),
                None => Err(format!("job {}: no field `{name}`", e.id)),
            }
        };
        Ok(Job {
            id: e.id.clone(),
            idempotency_key: field("key")?,
            observer: field("observer")?,
            action_index: field("action")?
                .parse()
                .map_err(|_| format!("job {}: field `action` is not an index", e.id))?,
            event_id: field("event_id").unwrap_or_default(),
            event: field("event")?,
        })
    }
}

/// The milliseconds part of a stream entry id.
pub fn entry_ms(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

/// Enqueues unless the marker says this key was enqueued already: returns `{1, id}` for a new
/// job, `{0, id}` (the earlier entry) otherwise. One script, so a crash cannot leave a marker
/// without its job or a job without its marker.
const ENQUEUE_LUA: &str = r#"
local seen = redis.call('GET', KEYS[2])
if seen then return {0, seen} end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('SET', KEYS[2], id, 'EX', ARGV[1])
return {1, id}
"#;

/// `queue retry`: enqueues again whatever the marker says, points the marker at the new entry
/// and starts the attempt count over.
const REQUEUE_LUA: &str = r#"
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('SET', KEYS[2], id, 'EX', ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[2])
return id
"#;

/// Resets a job's idle time, but only while `consumer` still owns it: a worker that was paused
/// past the visibility timeout must not take its job back from the worker that claimed it.
const TOUCH_LUA: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"#;

static ENQUEUE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(ENQUEUE_LUA));
static REQUEUE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REQUEUE_LUA));
static TOUCH: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(TOUCH_LUA));

/// The queues of one Redis server and key prefix.
#[derive(Clone)]
pub struct JobQueue {
    redis: RedisHandle,
    marker_ttl_secs: u64,
}

/// One consumer of a queue's group, as `XINFO CONSUMERS` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsumerStats {
    pub name: String,
    pub pending: usize,
    pub idle_ms: usize,
}

/// A queue's numbers, read from Redis.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStats {
    pub queue: String,
    /// Jobs in the stream: waiting, running or waiting to retry.
    pub depth: usize,
    /// Of those, read by a worker and not yet finished.
    pub pending: usize,
    /// Not yet read by any worker.
    pub waiting: usize,
    /// Age of the oldest job, in seconds (0 when the queue is empty).
    pub oldest_age_secs: f64,
    /// Jobs that have begun at least one attempt (running, waiting to retry, or taken over:
    /// their attempt count is kept in Redis).
    pub started: usize,
    pub consumers: Vec<ConsumerStats>,
}

/// One job as `queue list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRow {
    pub id: String,
    pub idempotency_key: String,
    pub observer: String,
    pub action_index: usize,
    pub event_id: String,
    pub age_secs: f64,
    /// The consumer working on it, if a worker has read it.
    pub consumer: Option<String>,
    pub times_delivered: Option<usize>,
    pub idle_ms: Option<usize>,
    pub attempts: i64,
}

impl JobQueue {
    pub fn new(redis: RedisHandle, marker_ttl_secs: u64) -> JobQueue {
        JobQueue {
            redis,
            marker_ttl_secs,
        }
    }

    /// `host:port` of the server, for messages.
    pub fn server(&self) -> &str {
        &self.redis.server
    }

    pub fn stream_key(&self, queue: &str) -> String {
        self.redis.key(&format!("queue:{queue}:jobs"))
    }

    fn marker_key(&self, queue: &str, key: &str) -> String {
        self.redis.key(&format!("queue:{queue}:key:{key}"))
    }

    fn attempts_key(&self, queue: &str) -> String {
        self.redis.key(&format!("queue:{queue}:attempts"))
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, QueueError> {
        self.redis.conn().await.map_err(QueueError)
    }

    /// Runs `f` against the shared connection within `[redis] timeout_ms`.
    async fn query<T: redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, QueueError> {
        let mut conn = self.conn().await?;
        match tokio::time::timeout(self.redis.timeout, cmd.query_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(QueueError::redis(what, &self.redis.server, e)),
            Err(_) => Err(QueueError::redis(what, &self.redis.server, "timed out")),
        }
    }

    fn fields(job: &NewJob) -> [(&'static str, String); 5] {
        [
            ("key", job.idempotency_key.clone()),
            ("observer", job.observer.clone()),
            ("action", job.action_index.to_string()),
            ("event_id", job.event_id.clone()),
            ("event", job.event.clone()),
        ]
    }

    /// Enqueues each job unless its idempotency key already was: `(true, id)` for a new entry,
    /// `(false, id)` for the earlier one. All or nothing for the caller: on `Err` it enqueues
    /// them all again later (a job that did get in is then answered from its marker).
    pub async fn enqueue(&self, jobs: &[NewJob]) -> Result<Vec<(bool, String)>, QueueError> {
        let conn = self.conn().await?;
        let calls = jobs.iter().map(|job| {
            let mut inv = ENQUEUE.prepare_invoke();
            inv.key(self.stream_key(&job.queue))
                .key(self.marker_key(&job.queue, &job.idempotency_key))
                .arg(self.marker_ttl_secs);
            for (k, v) in Self::fields(job) {
                inv.arg(k).arg(v);
            }
            let mut conn = conn.clone();
            async move { inv.invoke_async::<(i64, String)>(&mut conn).await }
        });
        let all = futures::future::join_all(calls);
        let out = match tokio::time::timeout(self.redis.timeout, all).await {
            Ok(v) => v,
            Err(_) => {
                return Err(QueueError::redis(
                    "enqueue",
                    &self.redis.server,
                    "timed out",
                ))
            }
        };
        out.into_iter()
            .map(|r| {
                r.map(|(new, id)| (new == 1, id))
                    .map_err(|e| QueueError::redis("enqueue", &self.redis.server, e))
            })
            .collect()
    }

    /// `queue retry`: enqueues `job` again although its key was enqueued before; the new entry id.
    pub async fn requeue(&self, job: &NewJob) -> Result<String, QueueError> {
        let mut conn = self.conn().await?;
        let mut inv = REQUEUE.prepare_invoke();
        inv.key(self.stream_key(&job.queue))
            .key(self.marker_key(&job.queue, &job.idempotency_key))
            .key(self.attempts_key(&job.queue))
            .arg(self.marker_ttl_secs)
            .arg(&job.idempotency_key);
        for (k, v) in Self::fields(job) {
            inv.arg(k).arg(v);
        }
        match tokio::time::timeout(self.redis.timeout, inv.invoke_async::<String>(&mut conn)).await
        {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(e)) => Err(QueueError::redis("requeue", &self.redis.server, e)),
            Err(_) => Err(QueueError::redis(
                "requeue",
                &self.redis.server,
                "timed out",
            )),
        }
    }

    /// Creates the group (reading from the stream's start) unless it exists.
    pub async fn ensure_group(&self, queue: &str) -> Result<(), QueueError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(self.stream_key(queue))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self.query::<()>("XGROUP CREATE", &cmd).await {
            Err(e) if e.0.contains("BUSYGROUP") => Ok(()),
            r => r,
        }
    }

    /// A connection of its own for blocking reads (a blocked XREADGROUP would hold up every
    /// other command on the shared one).
    pub async fn reader(&self, block: Duration) -> Result<Reader, QueueError> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.redis.timeout))
            .set_response_timeout(Some(block + self.redis.timeout));
        let conn = tokio::time::timeout(
            self.redis.timeout * 2,
            self.redis
                .client()
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        .map_err(|_| QueueError::redis("connect", &self.redis.server, "timed out"))?
        .map_err(|e| QueueError::redis("connect", &self.redis.server, e))?;
        Ok(Reader { conn, block })
    }

    /// New jobs for `consumer`: up to `count`, waiting up to the reader's block time.
    pub async fn read(
        &self,
        reader: &mut Reader,
        queue: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<StreamId>, QueueError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(reader.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(self.stream_key(queue))
            .arg(">");
        let reply: Option<StreamReadReply> = cmd
            .query_async(&mut reader.conn)
            .await
            .map_err(|e| QueueError::redis("XREADGROUP", &self.redis.server, e))?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    /// Takes over up to `count` jobs idle longer than `min_idle` (their worker died or hangs).
    pub async fn claim_stale(
        &self,
        queue: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<StreamId>, QueueError> {
        let mut out = Vec::new();
        let mut cursor = "0-0".to_string();
        // A few rounds at most: XAUTOCLAIM scans `count * 10` pending entries per call.
        for _ in 0..8 {
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(self.stream_key(queue))
                .arg(GROUP)
                .arg(consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(count.max(1));
            let reply: StreamAutoClaimReply = self.query("XAUTOCLAIM", &cmd).await?;
            out.extend(reply.claimed);
            cursor = reply.next_stream_id;
            if cursor == "0-0" || out.len() >= count {
                break;
            }
        }
        Ok(out)
    }

    /// Keeps job `id` owned by `consumer`; false when another worker has taken it over.
    pub async fn touch(&self, queue: &str, consumer: &str, id: &str) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let mut inv = TOUCH.prepare_invoke();
        inv.key(self.stream_key(queue))
            .arg(GROUP)
            .arg(consumer)
            .arg(id);
        match tokio::time::timeout(self.redis.timeout, inv.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(n)) => Ok(n == 1),
            Ok(Err(e)) => Err(QueueError::redis("touch", &self.redis.server, e)),
            Err(_) => Err(QueueError::redis("touch", &self.redis.server, "timed out")),
        }
    }

    /// Counts one more attempt of `key`; the number of this attempt.
    pub async fn count_attempt(&self, queue: &str, key: &str, by: i64) -> Result<i64, QueueError> {
        let mut cmd = redis::cmd("HINCRBY");
        cmd.arg(self.attempts_key(queue)).arg(key).arg(by);
        self.query("HINCRBY", &cmd).await
    }

    /// Finishes jobs: acknowledged, deleted from the stream, their attempt counts dropped
    /// (the markers stay until their TTL, so a replay does not enqueue them again).
    pub async fn complete(&self, queue: &str, jobs: &[(String, String)]) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let stream = self.stream_key(queue);
        let mut pipe = redis::pipe();
        pipe.atomic();
        let ids: Vec<&str> = jobs.iter().map(|(id, _)| id.as_str()).collect();
        let keys: Vec<&str> = jobs.iter().map(|(_, k)| k.as_str()).collect();
        pipe.cmd("XACK").arg(&stream).arg(GROUP).arg(&ids).ignore();
        pipe.cmd("XDEL").arg(&stream).arg(&ids).ignore();
        pipe.cmd("HDEL")
            .arg(self.attempts_key(queue))
            .arg(&keys)
            .ignore();
        let mut conn = self.conn().await?;
        match tokio::time::timeout(self.redis.timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueueError::redis("XACK", &self.redis.server, e)),
            Err(_) => Err(QueueError::redis("XACK", &self.redis.server, "timed out")),
        }
    }

    /// The queues that have a stream on this server (under this prefix).
    pub async fn discover(&self) -> Result<Vec<String>, QueueError> {
        let pattern = self.redis.key("queue:*:jobs");
        let head = self.redis.key("queue:");
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(10_000)
                .arg("TYPE")
                .arg("stream");
            let (next, keys): (u64, Vec<String>) = self.query("SCAN", &cmd).await?;
            for k in keys {
                if let Some(name) = k
                    .strip_prefix(head.as_str())
                    .and_then(|r| r.strip_suffix(":jobs"))
                {
                    out.push(name.to_string());
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// A queue's depth, pending jobs, oldest age and consumers.
    pub async fn stats(&self, queue: &str) -> Result<QueueStats, QueueError> {
        let stream = self.stream_key(queue);
        let depth: usize = self.query("XLEN", redis::cmd("XLEN").arg(&stream)).await?;
        let first: redis::streams::StreamRangeReply = self
            .query(
                "XRANGE",
                redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        let now = chrono::Utc::now().timestamp_millis();
        let oldest_age_secs = first
            .ids
            .first()
            .and_then(|e| entry_ms(&e.id))
            .map(|ms| ((now - ms).max(0)) as f64 / 1000.0)
            .unwrap_or(0.0);
        let started: usize = self
            .query("HLEN", redis::cmd("HLEN").arg(self.attempts_key(queue)))
            .await?;
        let groups: Result<redis::streams::StreamInfoGroupsReply, _> = self
            .query(
                "XINFO GROUPS",
                redis::cmd("XINFO").arg("GROUPS").arg(&stream),
            )
            .await;
        let (pending, consumers) = match groups {
            Ok(g) if g.groups.iter().any(|g| g.name == GROUP) => {
                let pending = g
                    .groups
                    .iter()
                    .find(|g| g.name == GROUP)
                    .map(|g| g.pending)
                    .unwrap_or(0);
                let c: redis::streams::StreamInfoConsumersReply = self
                    .query(
                        "XINFO CONSUMERS",
                        redis::cmd("XINFO").arg("CONSUMERS").arg(&stream).arg(GROUP),
                    )
                    .await?;
                let consumers = c
                    .consumers
                    .into_iter()
                    .map(|c| ConsumerStats {
                        name: c.name,
                        pending: c.pending,
                        idle_ms: c.idle,
                    })
                    .collect();
                (pending, consumers)
            }
            // No stream yet, or no worker has created the group: nothing is pending.
            Ok(_) => (0, Vec::new()),
            Err(e) if e.0.contains("no such key") => (0, Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(QueueStats {
            queue: queue.to_string(),
            depth,
            pending,
            waiting: depth.saturating_sub(pending),
            oldest_age_secs,
            started: started.min(depth),
            consumers,
        })
    }

    /// The oldest `limit` jobs of a queue, with who works on them.
    pub async fn list(&self, queue: &str, limit: usize) -> Result<Vec<JobRow>, QueueError> {
        let stream = self.stream_key(queue);
        let range: redis::streams::StreamRangeReply = self
            .query(
                "XRANGE",
                redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit.max(1)),
            )
            .await?;
        let mut owners: HashMap<String, redis::streams::StreamPendingId> = HashMap::new();
        if let (Some(first), Some(last)) = (range.ids.first(), range.ids.last()) {
            let pending: Result<redis::streams::StreamPendingCountReply, _> = self
                .query(
                    "XPENDING",
                    redis::cmd("XPENDING")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg(&first.id)
                        .arg(&last.id)
                        .arg(limit.max(1)),
                )
                .await;
            match pending {
                Ok(p) => owners.extend(p.ids.into_iter().map(|p| (p.id.clone(), p))),
                Err(e) if e.0.contains("NOGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        let attempts: HashMap<String, i64> = self
            .query(
                "HGETALL",
                redis::cmd("HGETALL").arg(self.attempts_key(queue)),
            )
            .await?;
        let now = chrono::Utc::now().timestamp_millis();
        Ok(range
            .ids
            .iter()
            .map(|e| {
                let job = Job::from_entry(e).ok();
                let owner = owners.get(&e.id);
                let key = job
                    .as_ref()
                    .map(|j| j.idempotency_key.clone())
                    .unwrap_or_default();
                JobRow {
                    id: e.id.clone(),
                    attempts: attempts.get(&key).copied().unwrap_or(0),
                    idempotency_key: key,
                    observer: job.as_ref().map(|j| j.observer.clone()).unwrap_or_default(),
                    action_index: job.as_ref().map(|j| j.action_index).unwrap_or(0),
                    event_id: job.as_ref().map(|j| j.event_id.clone()).unwrap_or_default(),
                    age_secs: entry_ms(&e.id)
                        .map(|ms| (now - ms).max(0) as f64 / 1000.0)
                        .unwrap_or(0.0),
                    consumer: owner.map(|o| o.consumer.clone()),
                    times_delivered: owner.map(|o| o.times_delivered),
                    idle_ms: owner.map(|o| o.last_delivered_ms),
                }
            })
            .collect())
    }

    /// Deletes every job of a queue (and their attempt counts); the number deleted. The markers
    /// stay, so replaying the events does not enqueue the purged jobs again.
    pub async fn purge(&self, queue: &str) -> Result<usize, QueueError> {
        let stream = self.stream_key(queue);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XLEN")
            .arg(&stream)
            .cmd("DEL")
            .arg(&stream)
            .arg(self.attempts_key(queue))
            .ignore();
        let mut conn = self.conn().await?;
        let (n,): (usize,) =
            match tokio::time::timeout(self.redis.timeout, pipe.query_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(QueueError::redis("purge", &self.redis.server, e)),
                Err(_) => return Err(QueueError::redis("purge", &self.redis.server, "timed out")),
            };
        Ok(n)
    }
}

/// A dedicated connection for blocking reads.
pub struct Reader {
    conn: redis::aio::MultiplexedConnection,
    block: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1700000000123-4".into(),
            map: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        redis::Value::BulkString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_job_reads_back_from_its_entry() {
        let e = entry(&[
            ("key", "k"),
            ("observer", "o"),
            ("action", "2"),
            ("event_id", "e"),
            ("event", "{}"),
        ]);
        let j = Job::from_entry(&e).expect("a job");
        assert_eq!((j.observer.as_str(), j.action_index), ("o", 2));
        assert_eq!(j.enqueued_ms(), Some(1_700_000_000_123));
    }

    #[test]
    fn an_entry_missing_a_field_or_with_a_bad_index_names_it() {
        let e = entry(&[
            ("key", "k"),
            ("observer", "o"),
            ("action", "x"),
            ("event", "{}"),
        ]);
        let err = Job::from_entry(&e).unwrap_err();
        assert!(err.contains("`action` is not an index"), "{err}");
        let e = entry(&[("observer", "o")]);
        assert!(Job::from_entry(&e).unwrap_err().contains("no field `key`"));
        assert_eq!(entry_ms("nonsense"), None);
    }
}
