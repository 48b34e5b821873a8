//! The configuration: structs that are also its documentation, and the layered loader
//! (built-in defaults → file → environment) built on the `config` crate.
//!
//! Every struct denies unknown fields, so a misspelt key is an error naming it rather than a
//! silently ignored setting. `docs/configuration.md` lists the same keys; a test checks that
//! every key here appears there.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::Operation;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub change_log: ChangeLogConfig,
    pub listener: ListenerConfig,
    pub features: FeaturesConfig,
    pub action_log: ActionLogConfig,
    pub retention: RetentionConfig,
    pub redis: RedisConfig,
    pub concurrent: ConcurrentConfig,
    pub dedup: DedupConfig,
    pub caching: CachingConfig,
    pub circuit_breaker: CircuitBreakerConfig,
    pub rate_limit: RateLimitConfig,
    pub metrics: MetricsConfig,
    pub failover: FailoverConfig,
    pub search: SearchConfig,
    pub runtime: RuntimeConfig,
    pub outbound: OutboundConfig,
    pub queue: QueueConfig,
    pub nats: NatsConfig,
    pub observers: Vec<ObserverConfig>,
}

/// `[queue]`: the `queue` layer's job workers (docs/architecture.md, "Job queue"). Which
/// observers are queued is said on each observer (`queue = true` or `queue = "name"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Jobs this process works on at once, per queue: the daemon's own worker pool, and a
    /// `run --role queue-worker` process's. 0: the daemon only enqueues (separate worker
    /// processes work the jobs off).
    pub workers: usize,
    /// Per-queue override of `workers`, by queue name: `{ media = 2 }`.
    pub per_queue: BTreeMap<String, usize>,
    /// A job whose worker has not reported for this long (it died, or hangs) is taken over by
    /// another worker. Workers report every third of it while a job runs or waits to retry.
    pub visibility_timeout_ms: u64,
    /// How long Redis remembers that an idempotency key was enqueued, so an event replayed after
    /// a crash does not enqueue its job twice.
    pub dedup_ttl_secs: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            workers: 4,
            per_queue: BTreeMap::new(),
            visibility_timeout_ms: 30_000,
            dedup_ttl_secs: 7 * 86_400,
        }
    }
}

impl QueueConfig {
    /// Jobs in flight at once for `queue` in one process.
    pub fn workers_for(&self, queue: &str) -> usize {
        self.per_queue.get(queue).copied().unwrap_or(self.workers)
    }
}

/// `[nats]`: the `nats` layer (docs/scaling.md): the JetStream stream a `run --role publisher`
/// process publishes change events to, and the consumers `run --role worker` processes work
/// them off from. `migrate --nats` creates or checks the stream and the consumers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// The server(s): `nats://host:port`, several separated by commas. Credentials may be given
    /// as `nats://user:password@host:port` (use `${env:NAME}` for the password); never logged.
    pub url: String,
    /// The stream's name.
    pub stream: String,
    /// Subjects are `<subject_prefix>.<entity>.<partition>`; the stream holds `<subject_prefix>.>`.
    pub subject_prefix: String,
    /// Partitions: events of one (entity, entity id) always go to the same one; at most one
    /// event per partition is worked on at a time across all workers. Fixed once the stream has
    /// messages (changing it would move entities between partitions mid-stream).
    pub partitions: u32,
    /// Copies of the stream in a NATS cluster (1 on a single server).
    pub replicas: usize,
    /// The stream refuses new events beyond this many waiting (-1: no limit); the publisher
    /// then retries, and the checkpoint waits. It never drops old ones (discard policy `new`).
    pub max_messages: i64,
    /// The same, in bytes (-1: no limit).
    pub max_bytes: i64,
    /// How long the stream remembers an event id (`Nats-Msg-Id`): a publisher that republishes
    /// after a crash or a takeover within this window stores nothing twice.
    pub duplicate_window_secs: u64,
    /// Publishes whose acknowledgement the publisher waits for at once.
    pub max_outstanding_acks: usize,
    /// How long the publisher waits for one acknowledgement before retrying the event.
    pub publish_timeout_ms: u64,
    /// The workers' durable consumers are `<consumer_prefix>-<partition>`.
    pub consumer_prefix: String,
    /// A delivery not acknowledged (nor reported in progress) for this long goes to another
    /// worker: the worker that had it died or hangs.
    pub ack_wait_ms: u64,
    /// Deliveries of one event that may end without completing (the worker died, hung or was
    /// stopped); the next delivery writes it to the dead-letter table (reason
    /// `max_deliver_exceeded`) instead of running it.
    pub max_deliver: i64,
    /// Redelivery backoff: the wait before the n-th redelivery (the last value repeats). Empty:
    /// `ack_wait_ms` each time. JetStream uses the first value in place of `ack_wait_ms`.
    pub backoff_ms: Vec<u64>,
    /// While an event's actions run, the worker tells the server it is still working on it this
    /// often, so a long action is not redelivered; below the ack wait.
    pub progress_interval_ms: u64,
    /// How long connecting to the server may take before it is an error.
    pub connect_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            stream: "OBSERVER_EVENTS".into(),
            subject_prefix: "observer".into(),
            partitions: 64,
            replicas: 1,
            max_messages: 10_000_000,
            max_bytes: 1 << 30,
            duplicate_window_secs: 300,
            max_outstanding_acks: 512,
            publish_timeout_ms: 5_000,
            consumer_prefix: "observer-worker".into(),
            ack_wait_ms: 30_000,
            max_deliver: 5,
            backoff_ms: Vec::new(),
            progress_interval_ms: 10_000,
            connect_timeout_ms: 5_000,
        }
    }
}

/// Whether `name` can name a JetStream stream or consumer: 1-64 letters, digits, `-` or `_`.
pub fn valid_nats_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// Whether `prefix` can start subjects: tokens of letters, digits, `-` or `_`, separated by dots.
pub fn valid_subject_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 128
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        })
}

impl Config {
    /// Observers that set `queue` while `features.queue` is off: their actions run inline (the
    /// roll-back setting). `validate` and `run` say so.
    pub fn queued_but_inline(&self) -> Vec<&str> {
        if self.features.queue {
            return Vec::new();
        }
        self.observers
            .iter()
            .filter(|o| o.queue.is_some() && o.enabled)
            .map(|o| o.name.as_str())
            .collect()
    }
}

/// Whether `name` can name a queue (it is part of Redis keys): 1-64 letters, digits, `-`, `_`, `.`.
pub fn valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// An observer's `queue`: `true` (the queue `default`), `false` (not queued) or a queue name.
fn queue_route<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Flag(bool),
        Name(String),
    }
    Ok(match Option::<Form>::deserialize(d)? {
        None | Some(Form::Flag(false)) => None,
        Some(Form::Flag(true)) => Some("default".into()),
        Some(Form::Name(n)) => Some(n),
    })
}

/// `[outbound]`: where actions and lookups may connect, and how much of an answer is read.
/// See docs/security.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Destinations admitted although their address is loopback, private, link-local or
    /// otherwise not public: CIDR ranges (`10.0.0.0/8`), addresses (`127.0.0.1`), exact host
    /// names (`hooks.internal`) or `*.domain` (`*.svc.cluster.local`). Empty: only public
    /// addresses. From the environment: a comma-separated list.
    #[serde(deserialize_with = "list_or_csv")]
    pub allow: Vec<String>,
    /// Largest response body an enrichment lookup reads; a larger one fails the lookup.
    pub max_response_bytes: usize,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            allow: Vec::new(),
            max_response_bytes: 4 * 1024 * 1024,
        }
    }
}

/// A list written as a TOML/YAML array, or as one comma-separated string (how an environment
/// variable carries a list).
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match Form::deserialize(d)? {
        Form::List(l) => l,
        Form::Csv(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// `[runtime]`: the process's async runtime.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// 0 (the default): automatic, see [`RuntimeConfig::threads`]. 1: everything on one thread
    /// (fastest when one dispatch runs at a time); more: a multi-threaded runtime with this many
    /// workers (for `concurrent` on a multi-core host).
    pub worker_threads: usize,
}

impl RuntimeConfig {
    /// The worker threads to start: `worker_threads` when set; automatically one while
    /// `concurrent` is off (one dispatch at a time gains nothing from threads but cross-thread
    /// wake-ups) or the host has two cores or fewer, and one per available core otherwise.
    ///
    /// On two cores, one thread delivered as much as two (end to end and draining a backlog)
    /// at less CPU, and in a 10-minute soak beside a busy Postgres it kept commit→delivery at
    /// p99 551 ms and the resident set at 44 MiB where two threads lagged to p99 14.7 s and
    /// 70 MiB (docs/benchmarks.md, "Hot path (issue 16) — 2026-12-06"). Hosts with more cores
    /// were not measured; they keep a thread per core.
    pub fn threads(&self, concurrent: bool, cores: usize) -> usize {
        match self.worker_threads {
            0 if concurrent && cores > 2 => cores.min(256),
            0 => 1,
            n => n,
        }
    }
}

/// `[database]`: where the change log and our own tables live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Postgres URL; `DATABASE_URL` overrides it. May be `${env:NAME}` or `${file:/path}`.
    pub url: String,
    /// Connections in the pool used for reads, bookkeeping and `sql` actions.
    pub pool_size: usize,
    /// How long one connection attempt may take.
    pub connect_timeout_ms: u64,
    /// Extra trusted CA certificates (PEM) for `sslmode=require`, e.g. a cloud provider's bundle.
    pub ca_file: Option<String>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            pool_size: 8,
            connect_timeout_ms: 5_000,
            ca_file: None,
        }
    }
}

/// `[change_log]`: the table the daemon tails.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangeLogConfig {
    /// `table` or `schema.table`; our bookkeeping tables are created in the same schema.
    pub table: String,
}

impl Default for ChangeLogConfig {
    fn default() -> Self {
        ChangeLogConfig {
            table: "tb_entity_change_log".into(),
        }
    }
}

/// Where a listener starts when it has no checkpoint yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// Only changes committed after the daemon starts.
    Tail,
    /// Every row already in the change log, then new ones.
    Beginning,
}

/// `[listener]`: how the change log is read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// Names the checkpoint and the listener group: two daemons with the same id never run at
    /// once (advisory lock, or the `failover` lease).
    pub id: String,
    /// The NOTIFY channel the change-log trigger signals on: an identifier (1–63 ASCII letters,
    /// digits or `_`, starting with a letter or `_`).
    pub channel: String,
    /// Rows read per query.
    pub batch_size: i64,
    /// A change-log row whose images (`object_data` + `object_data_before`, uncompressed jsonb)
    /// are larger is not read: it is dead-lettered as a poison event naming its size.
    pub max_row_bytes: i64,
    /// A read ends with the row that brings the images it holds to this many bytes (at least
    /// one row per read), so a window of large rows is read a few rows at a time.
    pub max_batch_bytes: i64,
    /// Fallback poll when no notification arrives.
    pub poll_interval_ms: u64,
    /// Where to begin when there is no checkpoint.
    pub start_from: StartFrom,
    /// Events read but not yet completed, and completed rows not yet written, before reading
    /// pauses (bounds memory).
    pub max_pending_events: usize,
    /// How long shutdown waits for in-flight actions before handing them back.
    pub shutdown_timeout_ms: u64,
    /// How often completed work, dead letters and the checkpoint are written (one transaction).
    pub flush_interval_ms: u64,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            id: "default".into(),
            channel: "fraiseql_observers".into(),
            batch_size: 1_000,
            max_row_bytes: 16 << 20,
            max_batch_bytes: 8 << 20,
            poll_interval_ms: 1_000,
            start_from: StartFrom::Tail,
            max_pending_events: 10_000,
            shutdown_timeout_ms: 30_000,
            flush_interval_ms: 50,
        }
    }
}

/// `[features]`: run-time switches for the layers. Every layer of the design has a key so a
/// config written for a fuller build still loads; switching on a layer this binary does not
/// contain is a start-up error naming it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeaturesConfig {
    /// Persist the position and resume after it (cargo feature `checkpoint`).
    pub checkpoint: bool,
    /// Many dispatches in flight, per-entity order kept (cargo feature `concurrent`). On by
    /// default: one dispatch at a time made the bare default several times slower (issue 16).
    pub concurrent: bool,
    pub dedup: bool,
    pub caching: bool,
    pub circuit_breaker: bool,
    pub rate_limit: bool,
    pub metrics: bool,
    pub failover: bool,
    pub search: bool,
    pub queue: bool,
    /// Scale-out over NATS JetStream: allows `run --role publisher` and `run --role worker`
    /// (cargo feature `nats`).
    pub nats: bool,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        FeaturesConfig {
            checkpoint: true,
            concurrent: true,
            dedup: false,
            caching: false,
            circuit_breaker: false,
            rate_limit: false,
            metrics: false,
            failover: false,
            search: false,
            queue: false,
            nats: false,
        }
    }
}

impl FeaturesConfig {
    /// The layers switched on, by name.
    pub fn enabled(&self) -> Vec<&'static str> {
        [
            ("checkpoint", self.checkpoint),
            ("concurrent", self.concurrent),
            ("dedup", self.dedup),
            ("caching", self.caching),
            ("circuit_breaker", self.circuit_breaker),
            ("rate_limit", self.rate_limit),
            ("metrics", self.metrics),
            ("failover", self.failover),
            ("search", self.search),
            ("queue", self.queue),
            ("nats", self.nats),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n)
        .collect()
    }
}

/// `[redis]`: the Redis server the `dedup`, `caching` and shared `rate_limit` layers and the
/// `redis_publish`/`cache` actions use. `REDIS_URL` overrides `url`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://…`; unset means no Redis. May be `${env:NAME}`.
    pub url: Option<String>,
    /// Prefix of every key this process writes, so several deployments can share one server.
    pub key_prefix: String,
    /// How long one connection attempt or one command may take.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            key_prefix: "fraiseql_observers".into(),
            timeout_ms: 2_000,
        }
    }
}

/// `[concurrent]`: settings of the `concurrent` layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConcurrentConfig {
    /// Dispatches (an event's due actions) in flight at once.
    pub max_in_flight: usize,
    /// A dispatch still running after this is abandoned and its actions retried (as a timeout).
    pub action_timeout_ms: u64,
}

impl Default for ConcurrentConfig {
    fn default() -> Self {
        ConcurrentConfig {
            // 64 until issue 16's second sitting: a soak whose dispatches each waited about
            // 19 ms for the CPU (as a remote receiver's round trip would) fell 18 s behind at
            // 4,800 events/s with the daemon at 0.3 cores; 256 kept up (p50 117 ms,
            // docs/benchmarks.md). A receiver that wants fewer sets `rate_limit`'s
            // `max_concurrent`.
            max_in_flight: 256,
            action_timeout_ms: 30_000,
        }
    }
}

/// Which store the `dedup` layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupBackend {
    /// Redis when `[redis] url` (or `REDIS_URL`) is set, else memory.
    Auto,
    Redis,
    /// This process only: survives no restart and is not shared between instances.
    Memory,
}

/// What `dedup` does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Run the actions anyway (receivers still get the idempotency key): availability first.
    Process,
    /// Defer the actions until Redis answers again: no duplicate, but delivery waits.
    Wait,
}

/// `[dedup]`: settings of the `dedup` layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// How long a delivered action is remembered.
    pub window_secs: u64,
    pub backend: DedupBackend,
    pub on_unavailable: OnUnavailable,
    /// Keys the memory backend keeps at most (oldest dropped first).
    pub memory_max_keys: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            window_secs: 300,
            backend: DedupBackend::Auto,
            on_unavailable: OnUnavailable::Process,
            memory_max_keys: 1_000_000,
        }
    }
}

/// `[caching]`: settings of the `caching` layer (the enrichment lookup cache).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CachingConfig {
    /// TTL of a cached lookup result when its `enrich` entry sets none.
    pub default_ttl_secs: u64,
    /// Cache lookups that found nothing (HTTP 404, no SQL row) too.
    pub cache_misses: bool,
}

impl Default for CachingConfig {
    fn default() -> Self {
        CachingConfig {
            default_ttl_secs: 60,
            cache_misses: true,
        }
    }
}

/// `[circuit_breaker]`: settings of the `circuit_breaker` layer, per destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Failure rate (0..1] over the window that opens the breaker.
    pub failure_rate: f64,
    /// The sliding window the rate is measured over.
    pub window_secs: u64,
    /// Attempts in the window before the rate counts.
    pub min_requests: u32,
    /// How long the breaker stays open before letting a probe through (half-open).
    pub open_ms: u64,
    /// The longest open period, as repeated failed probes back off.
    pub max_open_ms: u64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_rate: 0.5,
            window_secs: 30,
            min_requests: 10,
            open_ms: 5_000,
            max_open_ms: 60_000,
        }
    }
}

/// A limit for one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DestinationLimit {
    /// Requests per second; 0 = no rate limit.
    pub per_second: f64,
    /// Requests in flight at once; 0 = no cap.
    pub max_concurrent: u32,
}

impl Default for DestinationLimit {
    fn default() -> Self {
        DestinationLimit {
            per_second: 0.0,
            max_concurrent: 0,
        }
    }
}

/// `[rate_limit]`: settings of the `rate_limit` layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The limit of every destination not listed below.
    pub default: DestinationLimit,
    /// Per destination (`host:port`, or `observer/index` for non-HTTP actions).
    pub destinations: BTreeMap<String, DestinationLimit>,
    /// Share the per-second limits across every instance through Redis (a cluster-wide cap).
    pub shared: bool,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            default: DestinationLimit {
                per_second: 100.0,
                max_concurrent: 16,
            },
            destinations: BTreeMap::new(),
            shared: false,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint of the `metrics` layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of `/metrics`, `/health` and `/ready`.
    pub listen: String,
    /// `/ready` fails while the oldest unprocessed event is older than this.
    pub ready_max_lag_secs: u64,
    /// How often the DLQ size and backlog gauges are refreshed from the database.
    pub refresh_secs: u64,
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A request's headers must arrive within this of the connection opening or of the previous
    /// response, or the connection is closed (so also how long an idle keep-alive one is kept).
    pub header_read_timeout_ms: u64,
    /// A connection that moves no byte for this long in the middle of a request is closed.
    pub idle_timeout_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".into(),
            ready_max_lag_secs: 300,
            refresh_secs: 5,
            max_connections: 64,
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 30_000,
        }
    }
}

impl MetricsConfig {
    /// What one client may cost the endpoint (see [`crate::http_server`]).
    pub fn server_limits(&self) -> crate::http_server::ServerLimits {
        crate::http_server::ServerLimits {
            max_connections: self.max_connections,
            header_read_timeout: std::time::Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: std::time::Duration::from_millis(self.idle_timeout_ms),
        }
    }
}

/// `[failover]`: the leader lease of the `failover` layer (docs/architecture.md, "Failover").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    /// How long a lease lasts without renewal: the longest a stuck leader keeps the listener.
    pub lease_ms: u64,
    /// How often the leader renews its lease; 0 = a third of `lease_ms`.
    pub renew_ms: u64,
    /// How often a standby checks whether it can take over.
    pub poll_ms: u64,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            lease_ms: 5_000,
            renew_ms: 0,
            poll_ms: 250,
        }
    }
}

impl FailoverConfig {
    /// `renew_ms`, with 0 meaning a third of the lease.
    pub fn renew_every_ms(&self) -> u64 {
        if self.renew_ms == 0 {
            (self.lease_ms / 3).max(1)
        } else {
            self.renew_ms
        }
    }
}

/// Where the `search` layer's audit trail is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchBackend {
    /// The `observer_audit` table and its full-text index (nothing else to run).
    Postgres,
    /// An Elasticsearch (or OpenSearch) cluster, fed from `observer_audit` by the indexer.
    Elasticsearch,
}

/// `[search]`: the audit trail of the `search` layer (`features.search`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// `postgres` (the embedded default) or `elasticsearch`.
    pub backend: SearchBackend,
    /// Store and index each event's data (the after-image, the before-image of a DELETE).
    pub include_data: bool,
    /// Base URL of the cluster (`https://es.internal:9200`); may be `${env:NAME}`.
    pub url: Option<String>,
    /// Indices are `<index_prefix>-YYYY.MM.DD` (UTC day the event completed); the index
    /// template `migrate --search` installs is named after it.
    pub index_prefix: String,
    /// Basic-auth user (with `password`).
    pub username: Option<String>,
    /// Basic-auth password: a `${env:NAME}` or `${file:/path}` reference only.
    pub password: Option<String>,
    /// An API key (`Authorization: ApiKey …`): a `${env:NAME}` or `${file:/path}` reference only.
    pub api_key: Option<String>,
    /// Path of an extra CA certificate (PEM) trusted for the cluster's TLS, besides the
    /// system's roots.
    pub ca_file: Option<String>,
    /// Audit rows sent per `_bulk` request.
    pub batch_size: usize,
    /// How often the indexer looks for new audit rows when it has caught up.
    pub poll_interval_ms: u64,
    /// Timeout of one request to the cluster.
    pub request_timeout_ms: u64,
    /// Longest wait between two tries after a failure (doubling from 200 ms).
    pub max_backoff_ms: u64,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            backend: SearchBackend::Postgres,
            include_data: true,
            url: None,
            index_prefix: "fraiseql-observers".into(),
            username: None,
            password: None,
            api_key: None,
            ca_file: None,
            batch_size: 500,
            poll_interval_ms: 1_000,
            request_timeout_ms: 10_000,
            max_backoff_ms: 30_000,
        }
    }
}

impl SearchConfig {
    /// Problems with the `[search]` keys, each with its key (see [`Config::check`]).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut range = |key: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                out.push((
                    format!("search.{key}"),
                    format!("{v} is out of range: expected {lo}..={hi}"),
                ));
            }
        };
        range("batch_size", self.batch_size as u64, 1, 10_000);
        range("poll_interval_ms", self.poll_interval_ms, 10, 3_600_000);
        range("request_timeout_ms", self.request_timeout_ms, 100, 600_000);
        range("max_backoff_ms", self.max_backoff_ms, 200, 3_600_000);
        let p = &self.index_prefix;
        if p.is_empty()
            || p.len() > 200
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            || p.starts_with(['-', '_'])
        {
            out.push((
                "search.index_prefix".into(),
                format!("{p:?}: expected 1 to 200 lower-case letters, digits, `-` or `_`, not starting with `-` or `_` (an index name)"),
            ));
        }
        for (key, v) in [("password", &self.password), ("api_key", &self.api_key)] {
            if let Some(v) = v {
                let t = v.trim();
                if !(t.starts_with("${env:") || t.starts_with("${file:")) || !t.ends_with('}') {
                    out.push((
                        format!("search.{key}"),
                        "must be a `${env:NAME}` or `${file:/path}` reference: a credential is never written in the file".into(),
                    ));
                }
            }
        }
        if self.password.is_some() != self.username.is_some() {
            out.push((
                "search.username".into(),
                "username and password go together (basic auth)".into(),
            ));
        }
        if self.backend == SearchBackend::Elasticsearch && self.url.is_none() {
            out.push((
                "search.url".into(),
                "backend is `elasticsearch` but no url is set".into(),
            ));
        }
        out
    }
}

/// What the action log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordMode {
    /// Every action outcome (what `debug-event` shows).
    All,
    /// Only actions that needed a retry or were dead-lettered.
    Failures,
    /// Nothing.
    None,
}

/// `[action_log]`: the per-action outcome log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActionLogConfig {
    pub record: RecordMode,
}

impl Default for ActionLogConfig {
    fn default() -> Self {
        ActionLogConfig {
            record: RecordMode::All,
        }
    }
}

/// `[retention]`: how long processed rows are kept; 0 keeps them forever.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Processed change-log rows older than this are deleted (never unprocessed ones);
    /// 0..=[`RetentionConfig::MAX_DAYS`].
    pub change_log_days: u32,
    /// Action-log rows older than this are deleted; 0..=[`RetentionConfig::MAX_DAYS`].
    pub action_log_days: u32,
    /// Resolved dead letters older than this are deleted (pending ones are kept);
    /// 0..=[`RetentionConfig::MAX_DAYS`].
    pub dead_letter_days: u32,
    /// How often the daemon applies the policy; 0 turns the daemon's pass off (`cleanup` still works).
    pub interval_secs: u64,
    /// Rows deleted per statement, so no pass holds long locks.
    pub batch_size: i64,
}

impl RetentionConfig {
    /// The longest age a policy (or `dlq purge --older-than`) may name, in days: 100 years.
    /// Postgres takes the count as a 4-byte integer, so a larger one (read as `u32`) would
    /// otherwise wrap to a negative age and match every row.
    pub const MAX_DAYS: u32 = 36_500;

    /// The three day counts with their keys; each must be at most [`RetentionConfig::MAX_DAYS`].
    pub fn days(&self) -> [(&'static str, u32); 3] {
        [
            ("retention.change_log_days", self.change_log_days),
            ("retention.action_log_days", self.action_log_days),
            ("retention.dead_letter_days", self.dead_letter_days),
        ]
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            change_log_days: 7,
            action_log_days: 30,
            dead_letter_days: 30,
            interval_secs: 3_600,
            batch_size: 5_000,
        }
    }
}

/// One `[[observers]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObserverConfig {
    /// Unique; letters, digits, `-`, `_`, `.`; part of every idempotency key.
    pub name: String,
    /// Entity name (`object_type`) or `*`.
    pub entity: String,
    /// Operations to react to; default all four.
    #[serde(default = "all_operations")]
    pub events: Vec<OperationName>,
    /// Optional condition in the expression language.
    #[serde(default)]
    pub condition: Option<String>,
    /// Switch an observer off without deleting it.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `entity`: this observer's actions for one (entity, entity id) start in commit order and a
    /// retrying event holds back later ones of the same entity; `none`: no ordering at all.
    #[serde(default)]
    pub ordering: Ordering,
    /// Lookups whose results conditions and templates read as `enrich.<name>` (cached by the
    /// `caching` layer).
    #[serde(default)]
    pub enrich: Vec<EnrichConfig>,
    /// `queue` layer: `true` or a queue name makes every action of this observer a job on that
    /// queue (`true` is the queue `default`), worked off by the job workers instead of in the
    /// event path. Ignored (the actions run inline) while `features.queue` is off.
    #[serde(
        default,
        deserialize_with = "queue_route",
        skip_serializing_if = "Option::is_none"
    )]
    pub queue: Option<String>,
    pub actions: Vec<ActionConfig>,
}

/// Per-observer ordering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    #[default]
    Entity,
    None,
}

/// One enrichment lookup: exactly one of `http` or `sql`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// Read as `enrich.<name>`; letters, digits and `_`.
    pub name: String,
    /// Cache key template, e.g. `user:{{ data.user_id }}`.
    pub key: String,
    /// Cache TTL; default `[caching] default_ttl_secs`.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// GET this URL (a template); a JSON response body is the result, 404 is null.
    #[serde(default)]
    pub http: Option<String>,
    /// Run this query; its first row as a JSON object is the result, no row is null.
    #[serde(default)]
    pub sql: Option<String>,
    /// Parameters of `sql` (`$1`, `$2`, …) as text templates.
    #[serde(default)]
    pub params: Vec<String>,
    /// Per-lookup timeout.
    #[serde(default = "enrich_timeout")]
    pub timeout_ms: u64,
}

fn enrich_timeout() -> u64 {
    5_000
}

fn yes() -> bool {
    true
}

fn all_operations() -> Vec<OperationName> {
    [
        Operation::Insert,
        Operation::Update,
        Operation::Delete,
        Operation::Custom,
    ]
    .into_iter()
    .map(OperationName)
    .collect()
}

/// An operation as written in config: case-insensitive `insert`/`INSERT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OperationName(pub Operation);

impl<'de> Deserialize<'de> for OperationName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Operation::parse(&s).map(OperationName).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown event `{s}`: expected INSERT, UPDATE, DELETE or CUSTOM"
            ))
        })
    }
}

/// One action of an observer; `type` selects the kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ActionConfig {
    Webhook(WebhookConfig),
    Log(LogConfig),
    Sql(SqlConfig),
    Slack(SlackConfig),
    Email(EmailConfig),
    #[serde(rename = "redis_publish")]
    RedisPublish(RedisPublishConfig),
    Cache(CacheConfig),
}

pub use crate::actions::cache::CacheConfig;
pub use crate::actions::email::{EmailConfig, EmailTls};
pub use crate::actions::redis_publish::{RedisPublishConfig, RedisPublishMode};
pub use crate::actions::slack::SlackConfig;
pub use crate::actions::webhook_batch::BatchConfig;

impl ActionConfig {
    /// The `type` name.
    pub fn kind(&self) -> &'static str {
        match self {
            ActionConfig::Webhook(_) => "webhook",
            ActionConfig::Log(_) => "log",
            ActionConfig::Sql(_) => "sql",
            ActionConfig::Slack(_) => "slack",
            ActionConfig::Email(_) => "email",
            ActionConfig::RedisPublish(_) => "redis_publish",
            ActionConfig::Cache(_) => "cache",
        }
    }

    /// The retry policy of this action.
    pub fn retry(&self) -> RetryConfig {
        match self {
            ActionConfig::Webhook(w) => w.retry.clone(),
            ActionConfig::Sql(s) => s.retry.clone(),
            ActionConfig::Slack(s) => s.retry.clone(),
            ActionConfig::Email(e) => e.retry.clone(),
            ActionConfig::RedisPublish(r) => r.retry.clone(),
            ActionConfig::Cache(c) => c.retry.clone(),
            ActionConfig::Log(_) => RetryConfig {
                max_attempts: 1,
                ..RetryConfig::default()
            },
        }
    }
}

/// `type = "webhook"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Target URL; may hold placeholders (percent-encoded when rendered).
    pub url: String,
    /// HTTP method.
    #[serde(default = "post")]
    pub method: String,
    /// Extra headers; values may hold placeholders and `${env:NAME}` secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body template replacing the default envelope.
    #[serde(default)]
    pub body: Option<String>,
    /// Per-attempt timeout.
    #[serde(default = "webhook_timeout")]
    pub timeout_ms: u64,
    /// Standard Webhooks signing secret (`whsec_…` or raw); use `${env:NAME}` or `${file:/path}`.
    #[serde(default)]
    pub secret: Option<String>,
    /// More signing secrets, for rotation: every request is signed with `secret` and each of
    /// these (one `webhook-signature` value, space-separated), so receivers holding either the
    /// old or the new secret verify it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Send deliveries of this action that are in flight together as one request (a JSON array).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchConfig>,
}

fn post() -> String {
    "POST".into()
}

fn webhook_timeout() -> u64 {
    10_000
}

/// `type = "log"`: writes the event (or a rendered message) to the daemon's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Text template; default: a one-line summary of the event.
    #[serde(default)]
    pub message: Option<String>,
    /// `info`, `warn` or `debug`.
    #[serde(default = "info")]
    pub level: String,
}

fn info() -> String {
    "info".into()
}

/// `type = "sql"`: calls `function(event jsonb)` in the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// `name` or `schema.name` of a function taking one `jsonb` argument.
    pub function: String,
    #[serde(default)]
    pub retry: RetryConfig,
}

/// How waits between attempts grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    /// initial × 2^(n-1), capped, then a random wait between half of that and all of it.
    Exponential,
    /// initial × n, capped.
    Linear,
    /// initial every time.
    Fixed,
}

/// `retry = { … }` on an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub initial_ms: u64,
    pub max_ms: u64,
    /// HTTP statuses that are retried: codes (`503`) or classes (`"5xx"`).
    pub retry_on: Vec<StatusSpec>,
    /// HTTP statuses dead-lettered at once, even when `retry_on` lists them.
    pub dead_letter_on: Vec<StatusSpec>,
    /// Longest `Retry-After` honoured; a longer one is cut to this.
    pub retry_after_max_ms: u64,
    /// A response header which, when `true`, dead-letters the delivery at once; empty = off.
    pub abort_header: String,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            backoff: Backoff::Exponential,
            initial_ms: 200,
            max_ms: 30_000,
            retry_on: ["408", "429", "5xx"].map(StatusSpec::from).to_vec(),
            dead_letter_on: Vec::new(),
            retry_after_max_ms: 3_600_000,
            abort_header: "X-Observer-Abort".into(),
        }
    }
}

/// An HTTP status code or class in `retry_on` / `dead_letter_on`, as written: `503` or `"5xx"`.
/// Checked when observers are compiled (`crate::actions::http_policy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct StatusSpec(pub String);

impl From<&str> for StatusSpec {
    fn from(s: &str) -> Self {
        StatusSpec(s.to_string())
    }
}

impl<'de> Deserialize<'de> for StatusSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StatusSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an HTTP status code like 503 or a class like \"5xx\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StatusSpec, E> {
                Ok(StatusSpec(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StatusSpec, E> {
                Ok(StatusSpec(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StatusSpec, E> {
                Ok(StatusSpec(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl Config {
    /// Values that parse but cannot work (a zero poll interval would spin, a zero batch would
    /// never finish): each problem with its key and the accepted range. `validate` and `run` both
    /// refuse a config with any.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut extra: Vec<(String, String)> = Vec::new();
        let mut range = |key: &str, v: i128, lo: i128, hi: i128, unit: &str| {
            if v < lo || v > hi {
                out.push((
                    key.to_string(),
                    format!("{v} is out of range: expected {lo}..={hi}{unit}"),
                ));
            }
        };
        let l = &self.listener;
        range(
            "database.pool_size",
            self.database.pool_size as i128,
            1,
            1000,
            "",
        );
        range(
            "database.connect_timeout_ms",
            self.database.connect_timeout_ms as i128,
            1,
            600_000,
            " ms",
        );
        range("listener.batch_size", l.batch_size as i128, 1, 100_000, "");
        range(
            "listener.max_row_bytes",
            l.max_row_bytes as i128,
            1024,
            1 << 30,
            " bytes",
        );
        range(
            "listener.max_batch_bytes",
            l.max_batch_bytes as i128,
            1024,
            1 << 30,
            " bytes",
        );
        range(
            "listener.poll_interval_ms",
            l.poll_interval_ms as i128,
            10,
            3_600_000,
            " ms",
        );
        range(
            "listener.max_pending_events",
            l.max_pending_events as i128,
            1,
            10_000_000,
            "",
        );
        range(
            "listener.shutdown_timeout_ms",
            l.shutdown_timeout_ms as i128,
            0,
            3_600_000,
            " ms",
        );
        range(
            "listener.flush_interval_ms",
            l.flush_interval_ms as i128,
            1,
            60_000,
            " ms",
        );
        for (key, days) in self.retention.days() {
            range(
                key,
                days as i128,
                0,
                RetentionConfig::MAX_DAYS as i128,
                " days",
            );
        }
        range(
            "retention.batch_size",
            self.retention.batch_size as i128,
            1,
            1_000_000,
            "",
        );
        range(
            "runtime.worker_threads",
            self.runtime.worker_threads as i128,
            0,
            256,
            "",
        );
        let fo = &self.failover;
        range(
            "failover.lease_ms",
            fo.lease_ms as i128,
            500,
            600_000,
            " ms",
        );
        range(
            "failover.renew_ms",
            fo.renew_ms as i128,
            0,
            (fo.lease_ms / 2) as i128,
            " ms (0 = a third of lease_ms; at most half the lease, so one late renewal does not lose it)",
        );
        range(
            "failover.poll_ms",
            fo.poll_ms as i128,
            10,
            fo.lease_ms as i128,
            " ms (at most lease_ms)",
        );
        range(
            "redis.timeout_ms",
            self.redis.timeout_ms as i128,
            1,
            600_000,
            " ms",
        );
        let q = &self.queue;
        range("queue.workers", q.workers as i128, 0, 1024, "");
        for (name, n) in &q.per_queue {
            range(&format!("queue.per_queue.{name}"), *n as i128, 0, 1024, "");
        }
        range(
            "queue.visibility_timeout_ms",
            q.visibility_timeout_ms as i128,
            300,
            86_400_000,
            " ms",
        );
        range(
            "queue.dedup_ttl_secs",
            q.dedup_ttl_secs as i128,
            60,
            365 * 86_400,
            " s",
        );
        for name in q.per_queue.keys() {
            if !valid_queue_name(name) {
                extra.push((
                    format!("queue.per_queue.{name}"),
                    "is not a queue name: expected 1-64 letters, digits, `-`, `_` or `.`".into(),
                ));
            }
        }
        let n = &self.nats;
        range("nats.partitions", n.partitions as i128, 1, 4096, "");
        range("nats.replicas", n.replicas as i128, 1, 5, "");
        range(
            "nats.max_messages",
            n.max_messages as i128,
            -1,
            i64::MAX as i128,
            "",
        );
        range(
            "nats.max_bytes",
            n.max_bytes as i128,
            -1,
            i64::MAX as i128,
            " bytes",
        );
        range(
            "nats.duplicate_window_secs",
            n.duplicate_window_secs as i128,
            1,
            7 * 86_400,
            " s",
        );
        range(
            "nats.max_outstanding_acks",
            n.max_outstanding_acks as i128,
            1,
            65_536,
            "",
        );
        range(
            "nats.publish_timeout_ms",
            n.publish_timeout_ms as i128,
            10,
            600_000,
            " ms",
        );
        range(
            "nats.ack_wait_ms",
            n.ack_wait_ms as i128,
            100,
            86_400_000,
            " ms",
        );
        range("nats.max_deliver", n.max_deliver as i128, 1, 1_000_000, "");
        range(
            "nats.progress_interval_ms",
            n.progress_interval_ms as i128,
            10,
            86_400_000,
            " ms",
        );
        range(
            "nats.connect_timeout_ms",
            n.connect_timeout_ms as i128,
            1,
            600_000,
            " ms",
        );
        for (i, b) in n.backoff_ms.iter().enumerate() {
            range(
                &format!("nats.backoff_ms[{i}]"),
                *b as i128,
                100,
                86_400_000,
                " ms",
            );
        }
        if n.max_messages == 0 {
            extra.push((
                "nats.max_messages".into(),
                "0 would refuse every event: use -1 for no limit".into(),
            ));
        }
        if n.max_bytes == 0 {
            extra.push((
                "nats.max_bytes".into(),
                "0 would refuse every event: use -1 for no limit".into(),
            ));
        }
        let shortest_wait = n.backoff_ms.first().copied().unwrap_or(n.ack_wait_ms);
        if n.progress_interval_ms >= shortest_wait {
            extra.push((
                "nats.progress_interval_ms".into(),
                format!("{} ms is not below the ack wait ({shortest_wait} ms): a long action would be redelivered while it runs", n.progress_interval_ms),
            ));
        }
        if !valid_nats_name(&n.stream) {
            extra.push((
                "nats.stream".into(),
                "is not a stream name: expected 1-64 letters, digits, `-` or `_`".into(),
            ));
        }
        if !valid_nats_name(&n.consumer_prefix) || n.consumer_prefix.len() > 56 {
            extra.push((
                "nats.consumer_prefix".into(),
                "is not a consumer name prefix: expected 1-56 letters, digits, `-` or `_`".into(),
            ));
        }
        if !valid_subject_prefix(&n.subject_prefix) {
            extra.push(("nats.subject_prefix".into(), "is not a subject prefix: expected tokens of letters, digits, `-` or `_` separated by `.`".into()));
        }
        if n.url.trim().is_empty() {
            extra.push((
                "nats.url".into(),
                "is empty: expected nats://host:port".into(),
            ));
        }
        range(
            "concurrent.max_in_flight",
            self.concurrent.max_in_flight as i128,
            1,
            100_000,
            "",
        );
        range(
            "concurrent.action_timeout_ms",
            self.concurrent.action_timeout_ms as i128,
            1,
            3_600_000,
            " ms",
        );
        range(
            "dedup.window_secs",
            self.dedup.window_secs as i128,
            1,
            30 * 86_400,
            " s",
        );
        range(
            "dedup.memory_max_keys",
            self.dedup.memory_max_keys as i128,
            1,
            100_000_000,
            "",
        );
        range(
            "caching.default_ttl_secs",
            self.caching.default_ttl_secs as i128,
            1,
            30 * 86_400,
            " s",
        );
        let cb = &self.circuit_breaker;
        if !(cb.failure_rate > 0.0 && cb.failure_rate <= 1.0) {
            extra.push((
                "circuit_breaker.failure_rate".into(),
                format!(
                    "{} is out of range: expected a rate in (0, 1]",
                    cb.failure_rate
                ),
            ));
        }
        range(
            "circuit_breaker.window_secs",
            cb.window_secs as i128,
            1,
            3_600,
            " s",
        );
        range(
            "circuit_breaker.min_requests",
            cb.min_requests as i128,
            1,
            1_000_000,
            "",
        );
        range(
            "circuit_breaker.open_ms",
            cb.open_ms as i128,
            1,
            3_600_000,
            " ms",
        );
        range(
            "circuit_breaker.max_open_ms",
            cb.max_open_ms as i128,
            cb.open_ms as i128,
            3_600_000,
            " ms",
        );
        let rl = &self.rate_limit;
        for (key, lim) in std::iter::once(("rate_limit.default".to_string(), &rl.default)).chain(
            rl.destinations
                .iter()
                .map(|(d, l)| (format!("rate_limit.destinations.\"{d}\""), l)),
        ) {
            if !(lim.per_second >= 0.0 && lim.per_second <= 1_000_000.0) {
                extra.push((
                    format!("{key}.per_second"),
                    format!(
                        "{} is out of range: expected 0..=1000000 (0 = no limit)",
                        lim.per_second
                    ),
                ));
            }
        }
        if let Err(mut bad) = crate::outbound::Guard::new(&self.outbound.allow) {
            extra.append(&mut bad);
        }
        if !(1024..=1 << 30).contains(&self.outbound.max_response_bytes) {
            extra.push((
                "outbound.max_response_bytes".into(),
                format!(
                    "{} is out of range: expected 1024..=1073741824 bytes",
                    self.outbound.max_response_bytes
                ),
            ));
        }
        if self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            extra.push((
                "metrics.listen".into(),
                format!(
                    "`{}` is not an address like 127.0.0.1:9464",
                    self.metrics.listen
                ),
            ));
        }
        for (key, value, lo, hi, unit) in [
            (
                "metrics.max_connections",
                self.metrics.max_connections as i128,
                1,
                10_000,
                "",
            ),
            (
                "metrics.header_read_timeout_ms",
                self.metrics.header_read_timeout_ms as i128,
                100,
                600_000,
                " ms",
            ),
            (
                "metrics.idle_timeout_ms",
                self.metrics.idle_timeout_ms as i128,
                100,
                3_600_000,
                " ms",
            ),
        ] {
            if !(lo..=hi).contains(&value) {
                extra.push((
                    key.into(),
                    format!("{value} is out of range: expected {lo}..={hi}{unit}"),
                ));
            }
        }
        if !(1..=3600).contains(&self.metrics.refresh_secs) {
            extra.push((
                "metrics.refresh_secs".into(),
                format!(
                    "{} is out of range: expected 1..=3600 seconds",
                    self.metrics.refresh_secs
                ),
            ));
        }
        out.append(&mut extra);
        out.extend(self.search.problems());
        let id_ok = !l.id.is_empty()
            && l.id.len() <= 128
            && l.id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !id_ok {
            out.push((
                "listener.id".into(),
                format!(
                    "`{}`: expected 1-128 letters, digits, `-`, `_` or `.`",
                    l.id
                ),
            ));
        }
        if let Err(message) = check_channel(&l.channel) {
            out.push(("listener.channel".into(), message));
        }
        out
    }
}

/// `listener.channel` must be an identifier: 1–63 ASCII letters, digits or `_`, starting with a
/// letter or `_`. `migrate` installs it into a trigger function and the daemon `LISTEN`s on it;
/// nothing else is needed of a channel name, and nothing else can reach SQL from it.
pub fn check_channel(channel: &str) -> Result<(), String> {
    let mut chars = channel.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && channel.len() <= 63;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{channel:?}: expected 1-63 ASCII letters, digits or `_`, starting with a letter or `_` \
             (an identifier, like the default `fraiseql_observers`)"
        ))
    }
}

/// A configuration that could not be loaded: the file, the key and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{location}: {message}")]
    Secret { location: String, message: String },
}

/// Loads defaults, then `file` (TOML or YAML by extension), then `OBSERVER__SECTION__KEY`
/// environment variables, then `DATABASE_URL`.
pub fn load(file: Option<&FsPath>) -> Result<Config, ConfigError> {
    load_with_env(file, std::env::vars())
}

/// [`load`] with an explicit environment (tests).
pub fn load_with_env(
    file: Option<&FsPath>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let origin = file
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "(defaults)".into());
    let mut builder = config::Config::builder();
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|source| ConfigError::Read {
            path: f.to_path_buf(),
            source,
        })?;
        let format = match f.extension().and_then(|e| e.to_str()) {
            Some("yaml") | Some("yml") => config::FileFormat::Yaml,
            _ => config::FileFormat::Toml,
        };
        if format == config::FileFormat::Yaml {
            check_yaml_size(&text).map_err(|message| ConfigError::Invalid {
                path: f.display().to_string(),
                message,
            })?;
        }
        builder = builder.add_source(config::File::from_str(&text, format));
    }
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut database_url = None;
    let mut redis_url = None;
    for (k, v) in env {
        if let Some(rest) = k.strip_prefix("OBSERVER__") {
            let key = rest
                .split("__")
                .map(|p| p.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(".");
            check_env_key(&key).map_err(|message| ConfigError::Invalid {
                path: origin.clone(),
                message: format!("environment variable {k}: {message}"),
            })?;
            overrides.push((key, v));
        } else if k == "DATABASE_URL" {
            database_url = Some(v);
        } else if k == "REDIS_URL" {
            redis_url = Some(v);
        }
    }
    overrides.sort();
    for (key, value) in &overrides {
        builder = builder
            .set_override(key.as_str(), env_value(value))
            .map_err(|e| ConfigError::Invalid {
                path: origin.clone(),
                message: e.to_string(),
            })?;
    }
    if let Some(url) = database_url {
        builder = builder
            .set_override("database.url", url)
            .map_err(|e| ConfigError::Invalid {
                path: origin.clone(),
                message: e.to_string(),
            })?;
    }
    if let Some(url) = redis_url {
        builder = builder
            .set_override("redis.url", url)
            .map_err(|e| ConfigError::Invalid {
                path: origin.clone(),
                message: e.to_string(),
            })?;
    }
    let built = builder.build().map_err(|e| ConfigError::Invalid {
        path: origin.clone(),
        message: e.to_string(),
    })?;
    let cfg: Config = built.try_deserialize().map_err(|e| ConfigError::Invalid {
        path: origin.clone(),
        message: describe(e, &overrides),
    })?;
    Ok(cfg)
}

/// Highest array index an environment override may name (`OBSERVER__OBSERVERS[0]__ENABLED`). The
/// config crate grows an array up to the index it is given, so an unchecked index is an
/// allocation of any size.
pub const MAX_ENV_INDEX: usize = 1000;

/// An override key (`listener.batch_size`, `observers[0].enabled`): segments of letters, digits,
/// `_` and `-`, each optionally followed by array indexes up to [`MAX_ENV_INDEX`].
fn check_env_key(key: &str) -> Result<(), String> {
    let bad = |why: String| {
        Err(format!(
            "`{key}` is not a config key ({why}): expected SECTION__KEY with letters, digits and `_`, \
             optionally indexed like OBSERVERS[0]"
        ))
    };
    for segment in key.split('.') {
        let (name, mut rest) = segment.split_at(segment.find('[').unwrap_or(segment.len()));
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad(format!("bad segment `{segment}`"));
        }
        while !rest.is_empty() {
            let Some(close) = rest.find(']') else {
                return bad(format!("unclosed `[` in `{segment}`"));
            };
            let index = &rest[1..close];
            match index.parse::<usize>() {
                Ok(i) if i <= MAX_ENV_INDEX && !index.starts_with('+') => {}
                _ => return bad(format!("array index `{index}` is not 0..={MAX_ENV_INDEX}")),
            }
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return bad(format!("bad segment `{segment}`"));
            }
        }
    }
    Ok(())
}

/// Deepest nesting of YAML collections accepted in a config file; real configs need about 6.
pub const MAX_YAML_DEPTH: usize = 64;

/// Most YAML nodes a config file may stand for once aliases are expanded. YAML aliases are
/// copied by the loader, so ten lines of nested aliases (the "billion laughs") would otherwise
/// expand to a billion nodes.
pub const MAX_YAML_NODES: u64 = 1_000_000;

/// Walks the YAML events once (iteratively, so depth cannot overflow the stack) and refuses
/// input that is nested too deeply or expands to too many nodes, before the config crate builds
/// (recursively) the whole tree. Syntax errors are left for the config crate to report.
fn check_yaml_size(text: &str) -> Result<(), String> {
    use yaml_rust2::parser::{Event, Parser};
    // (anchor id, nodes so far) per open collection; the root accumulates into `total`.
    let mut open: Vec<(usize, u64)> = Vec::new();
    let mut anchored: std::collections::HashMap<usize, u64> = std::collections::HashMap::new();
    let mut total: u64 = 0;
    let mut parser = Parser::new_from_str(text);
    loop {
        let Ok((event, mark)) = parser.next_token() else {
            return Ok(());
        };
        let done = match event {
            Event::StreamEnd => return Ok(()),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if open.len() >= MAX_YAML_DEPTH {
                    return Err(format!(
                        "line {}: YAML nested more than {MAX_YAML_DEPTH} levels deep",
                        mark.line()
                    ));
                }
                open.push((anchor, 1));
                None
            }
            Event::SequenceEnd | Event::MappingEnd => open.pop().map(|(anchor, n)| {
                if anchor > 0 {
                    anchored.insert(anchor, n);
                }
                n
            }),
            Event::Scalar(_, _, anchor, _) => {
                if anchor > 0 {
                    anchored.insert(anchor, 1);
                }
                Some(1)
            }
            Event::Alias(id) => Some(anchored.get(&id).copied().unwrap_or(1)),
            _ => None,
        };
        if let Some(n) = done {
            let into = match open.last_mut() {
                Some((_, parent)) => parent,
                None => &mut total,
            };
            *into = into.saturating_add(n);
            if *into > MAX_YAML_NODES {
                return Err(format!(
                    "line {}: YAML expands to more than {MAX_YAML_NODES} values (aliases are copied where they are used)",
                    mark.line()
                ));
            }
        }
    }
}

/// Environment values are strings; booleans and integers are typed so `=true` works for bools.
fn env_value(v: &str) -> config::Value {
    if let Ok(b) = v.parse::<bool>() {
        return b.into();
    }
    if let Ok(i) = v.parse::<i64>() {
        return i.into();
    }
    v.to_string().into()
}

fn describe(e: config::ConfigError, overrides: &[(String, String)]) -> String {
    let msg = e.to_string();
    // Say where an environment override came from when the bad key was one of them.
    for (key, _) in overrides {
        let last = key.rsplit('.').next().unwrap_or(key);
        if msg.contains(&format!("`{key}`")) || msg.contains(&format!("`{last}`")) {
            let env = format!("OBSERVER__{}", key.replace('.', "__").to_ascii_uppercase());
            return format!("{msg} (set by environment variable {env})");
        }
    }
    msg
}

/// Largest `${file:…}` secret read (64 KiB, far above any key, token or URL): a
/// longer file, or one that never ends (`/dev/zero`, a FIFO someone keeps writing), is an error
/// rather than an unbounded read into memory.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// The text of a `${file:…}` secret: at most [`MAX_SECRET_FILE_BYTES`], UTF-8, trailing line
/// breaks removed. Errors name the file and never quote its contents.
fn read_secret_file(path: &str) -> Result<String, String> {
    use std::io::Read as _;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read secret file `{path}`: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read secret file `{path}`: {e}"))?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "secret file `{path}` is larger than {} KiB, the limit for a secret",
            MAX_SECRET_FILE_BYTES / 1024
        ));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| format!("secret file `{path}` is not UTF-8 text"))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// Resolves `${env:NAME}` and `${file:/path}` references in a config string. Text without a
/// reference is returned unchanged. The resolved value is never logged by this crate. Where the
/// result is a template (webhook URLs and headers), use `Template::parse_with_references`
/// instead, so a value is never read as template syntax.
pub fn resolve_secret(value: &str, location: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| ConfigError::Secret {
            location: location.to_string(),
            message: "unterminated `${` reference".into(),
        })?;
        let reference = &after[..end];
        let resolved = if let Some(name) = reference.strip_prefix("env:") {
            std::env::var(name).map_err(|_| ConfigError::Secret {
                location: location.to_string(),
                message: format!("environment variable `{name}` is not set"),
            })?
        } else if let Some(path) = reference.strip_prefix("file:") {
            read_secret_file(path).map_err(|message| ConfigError::Secret {
                location: location.to_string(),
                message,
            })?
        } else {
            return Err(ConfigError::Secret {
                location: location.to_string(),
                message: format!("unknown reference `${{{reference}}}`: expected `${{env:NAME}}` or `${{file:/path}}`"),
            });
        };
        out.push_str(&resolved);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("obs-cfg-{}-{}", std::process::id(), name));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn worker_threads_follow_concurrent_unless_set() {
        let auto = RuntimeConfig::default();
        assert_eq!(auto.threads(false, 8), 1);
        assert_eq!(auto.threads(true, 8), 8);
        assert_eq!(auto.threads(true, 3), 3);
        assert_eq!(auto.threads(true, 2), 1);
        assert_eq!(auto.threads(true, 0), 1);
        let set = RuntimeConfig { worker_threads: 3 };
        assert_eq!(set.threads(false, 8), 3);
        assert_eq!(set.threads(true, 2), 3);
    }

    #[test]
    fn defaults_file_and_env_layer_in_order() {
        let p = write(
            "a.toml",
            r#"
[listener]
id = "orders"
[[observers]]
name = "o1"
entity = "Order"
events = ["insert", "UPDATE"]
[[observers.actions]]
type = "webhook"
url = "http://127.0.0.1:1/x"
"#,
        );
        let env = vec![
            (
                "OBSERVER__FEATURES__CHECKPOINT".to_string(),
                "false".to_string(),
            ),
            (
                "OBSERVER__LISTENER__BATCH_SIZE".to_string(),
                "77".to_string(),
            ),
            (
                "DATABASE_URL".to_string(),
                "postgres://x@127.0.0.1/y".to_string(),
            ),
        ];
        let c = load_with_env(Some(&p), env).unwrap();
        assert_eq!(c.listener.id, "orders");
        assert_eq!(c.listener.batch_size, 77);
        assert!(!c.features.checkpoint);
        assert_eq!(c.database.url, "postgres://x@127.0.0.1/y");
        assert_eq!(c.observers[0].events.len(), 2);
        assert_eq!(c.retention.change_log_days, 7);
        match &c.observers[0].actions[0] {
            ActionConfig::Webhook(w) => assert_eq!(w.retry.max_attempts, 5),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn outbound_allow_from_file_or_env() {
        let p = write(
            "o.toml",
            "[outbound]\nallow = [\"10.0.0.0/8\", \"hooks.internal\"]\n",
        );
        let c = load_with_env(Some(&p), vec![]).unwrap();
        assert_eq!(c.outbound.allow, ["10.0.0.0/8", "hooks.internal"]);
        let c = load_with_env(
            Some(&p),
            vec![(
                "OBSERVER__OUTBOUND__ALLOW".into(),
                " 127.0.0.1/32, ::1 ,".into(),
            )],
        )
        .unwrap();
        assert_eq!(c.outbound.allow, ["127.0.0.1/32", "::1"]);
        let c = load_with_env(None, vec![("OBSERVER__OUTBOUND__ALLOW".into(), "".into())]).unwrap();
        assert!(c.outbound.allow.is_empty());
        assert_eq!(c.outbound.max_response_bytes, 4 * 1024 * 1024);
        let mut c = Config::default();
        c.outbound.allow = vec!["10.0.0.0/8".into(), "bad entry".into()];
        let problems = c.check();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "outbound.allow[1]");
        assert!(problems[0].1.contains("`bad entry`"), "{problems:?}");
    }

    #[test]
    fn bad_values_name_file_and_key() {
        let p = write("b.toml", "[listener]\nbatch_size = \"lots\"\n");
        let e = load_with_env(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("b.toml"), "{e}");
        assert!(e.contains("batch_size"), "{e}");
        let p = write("c.toml", "[listner]\nid = \"x\"\n");
        let e = load_with_env(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("listner"), "{e}");
        let e = load_with_env(
            None,
            vec![("OBSERVER__FEATURES__NOPE".into(), "true".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nope"), "{e}");
        assert!(e.contains("OBSERVER__FEATURES__NOPE"), "{e}");
    }

    #[test]
    fn ranges_are_checked_with_their_keys() {
        assert!(
            Config::default().check().is_empty(),
            "the defaults are valid"
        );
        let mut c = Config::default();
        c.listener.poll_interval_ms = 0;
        c.retention.batch_size = 0;
        c.listener.id = String::new();
        let keys: Vec<String> = c.check().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "listener.poll_interval_ms",
                "retention.batch_size",
                "listener.id"
            ]
        );

        // The failover lease: renewals at most half the lease, polls at most a lease.
        let mut c = Config::default();
        c.failover.renew_ms = 3_000;
        c.failover.poll_ms = 6_000;
        let problems = c.check();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["failover.renew_ms", "failover.poll_ms"],
            "{problems:?}"
        );
        assert!(problems[0].1.contains("expected 0..=2500"), "{problems:?}");
        let mut c = Config::default();
        c.failover.lease_ms = 100;
        let keys: Vec<String> = c.check().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys[0], "failover.lease_ms");
        assert_eq!(Config::default().failover.renew_every_ms(), 1_666);

        // Issue 18: the read limits, the day counts and the channel.
        let mut c = Config::default();
        c.listener.max_row_bytes = 0;
        c.listener.max_batch_bytes = i64::MAX;
        c.retention.dead_letter_days = u32::MAX;
        c.listener.channel = "a$fn$b".into();
        let problems = c.check();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "listener.max_row_bytes",
                "listener.max_batch_bytes",
                "retention.dead_letter_days",
                "listener.channel"
            ]
        );
        assert_eq!(
            problems[2].1,
            "4294967295 is out of range: expected 0..=36500 days"
        );
        assert!(
            problems[3].1.contains("ASCII letters, digits or `_`"),
            "{}",
            problems[3].1
        );
        for ok in ["fraiseql_observers", "_x", "Orders_1", &"c".repeat(63)] {
            assert_eq!(check_channel(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1a", "a-b", "a b", "a'b", "é", &"c".repeat(64)] {
            assert!(check_channel(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_resolve_from_env_and_files() {
        std::env::set_var("OBS_TEST_SECRET_X", "s3");
        assert_eq!(
            resolve_secret("a${env:OBS_TEST_SECRET_X}b", "k").unwrap(),
            "as3b"
        );
        let f = write("secret.txt", "from-file\n");
        assert_eq!(
            resolve_secret(&format!("${{file:{}}}", f.display()), "k").unwrap(),
            "from-file"
        );
        assert!(resolve_secret("${env:OBS_TEST_MISSING_Q}", "k")
            .unwrap_err()
            .to_string()
            .contains("OBS_TEST_MISSING_Q"));
        assert!(resolve_secret("${vault:x}", "k").is_err());
        assert!(resolve_secret("${env:X", "k").is_err());
    }

    /// Issue 18, item 10: a `${file:…}` secret is read up to 64 KiB; a longer file (or a device
    /// that never ends) is an error naming the file and the limit, not an unbounded read.
    #[test]
    fn secret_files_are_read_up_to_a_limit() {
        let limit = 64 * 1024;
        let big = write("big-secret.txt", &"x".repeat(limit + 1));
        let e = resolve_secret(&format!("${{file:{}}}", big.display()), "headers.X")
            .expect_err("a secret file over the limit is refused")
            .to_string();
        assert!(
            e.contains(&big.display().to_string())
                && e.contains("64 KiB")
                && e.contains("headers.X"),
            "{e}"
        );
        assert!(
            !e.contains("xxxx"),
            "the error repeats the file's text: {e}"
        );
        let at_limit = write("limit-secret.txt", &format!("{}\n", "y".repeat(limit - 1)));
        let ok = resolve_secret(&format!("${{file:{}}}", at_limit.display()), "k").unwrap();
        assert_eq!(ok.len(), limit - 1);
        let e = resolve_secret("${file:/dev/zero}", "k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/zero") && e.contains("64 KiB"), "{e}");
    }

    #[test]
    fn env_keys_are_checked_before_the_config_crate_sees_them() {
        for good in [
            "listener.batch_size",
            "observers[0].enabled",
            "a_b-c.d[1000][2]",
        ] {
            assert_eq!(check_env_key(good), Ok(()), "{good}");
        }
        for bad in [
            "observers[1001].name",
            "observers[4000000000].name",
            "observers[-1].name",
            "observers[+1].name",
            "observers[].name",
            "observers[0.name",
            "observers[0]x.name",
            "listener..id",
            "",
            "[0]",
            "a b",
        ] {
            assert!(check_env_key(bad).is_err(), "{bad}");
        }
        let err = load_with_env(
            None,
            [("OBSERVER__OBSERVERS[4000000000]__NAME".into(), "x".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("environment variable OBSERVER__OBSERVERS[4000000000]__NAME")
                && err.contains("0..=1000"),
            "{err}"
        );
    }
}
