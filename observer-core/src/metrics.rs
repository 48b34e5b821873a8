//! The process's Prometheus collectors. They are always kept (an increment is a few
//! nanoseconds); the `metrics` layer is what serves them over HTTP. Every label set that
//! dashboards and alerts name is touched at start, so a series never reads "no data".

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Breaker states as the `observer_breaker_state` gauge encodes them.
pub const BREAKER_CLOSED: i64 = 0;
pub const BREAKER_HALF_OPEN: i64 = 1;
pub const BREAKER_OPEN: i64 = 2;

/// The `reason` labels of `observer_leader_takeovers_total`.
pub const TAKEOVER_REASONS: [&str; 3] = ["vacant", "expired", "holder_gone"];

pub struct Metrics {
    pub registry: Registry,
    /// Change-log rows read (events and poison rows).
    pub events_read: IntCounter,
    /// Events that matched at least one observer.
    pub events_matched: IntCounter,
    /// Events completed: every action delivered, skipped or dead-lettered.
    pub events_processed: IntCounter,
    /// Action outcomes by observer, type and outcome (`delivered`, `dead_lettered`,
    /// `duplicate`, `condition_false`).
    pub actions: IntCounterVec,
    /// Attempts that failed (retried or dead-lettered), by observer and type.
    pub actions_failed: IntCounterVec,
    /// Time of each attempt, by observer and type.
    pub action_duration: HistogramVec,
    /// Attempts scheduled again after a failure, by observer.
    pub retries: IntCounterVec,
    /// Deliveries put back without an attempt, by reason (`breaker_open`, `rate_limited`,
    /// `dedup_wait`, `claimed_elsewhere`).
    pub deferred: IntCounterVec,
    /// Pending dead letters (refreshed periodically by the metrics layer).
    pub dlq_size: IntGauge,
    /// Dead letters written by this process.
    pub dead_letters: IntCounter,
    /// The checkpoint: change-log pk of the last completed event and how many events this run
    /// completed.
    pub checkpoint_pk: IntGauge,
    pub checkpoint_events: IntGauge,
    /// Events read but not yet completed.
    pub lag_events: IntGauge,
    /// Unread change-log rows after the watermark (refreshed periodically by the metrics layer).
    pub backlog_events: IntGauge,
    /// Age of the oldest event read but not completed (0 when none).
    pub lag_seconds: Gauge,
    /// Dispatches in flight.
    pub in_flight: IntGauge,
    pub dedup_checks: IntCounter,
    pub dedup_skips: IntCounter,
    /// Dedup answers given without the store (Redis unreachable), by what was done.
    pub dedup_unavailable: IntCounterVec,
    /// skips / checks since start.
    pub dedup_rate: Gauge,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    /// Keys removed by `cache` actions.
    pub cache_evictions: IntCounter,
    /// Cache errors (Redis unreachable): the lookup ran uncached.
    pub cache_errors: IntCounter,
    /// hits / (hits + misses) since start.
    pub cache_hit_rate: Gauge,
    /// Lookup time, by source (`cache`, `http`, `sql`).
    pub enrich_duration: HistogramVec,
    /// 0 closed, 1 half-open, 2 open; by destination.
    pub breaker_state: IntGaugeVec,
    /// Times a breaker opened, by destination.
    pub breaker_opened: IntCounterVec,
    /// Whether the listener holds its lock and runs (1) or stands by (0).
    pub listener_active: IntGauge,
    /// 1 while this process leads its listener (holds the lock or the failover lease).
    pub leader: IntGauge,
    /// Times this process became the leader, by how (`vacant`: no leader or handed back;
    /// `expired`: the leader's lease ran out; `holder_gone`: the leader's session ended).
    pub takeovers: IntCounterVec,
    /// Lease renewals that failed (no answer in time or an error); the lease is lost when they
    /// keep failing until it expires.
    pub lease_renew_failures: IntCounter,
    /// Seconds since this leader last renewed its lease (0 while not leading).
    pub lease_since_renewal: Gauge,
    /// Seconds from commit (change-log `created_at`) to completion.
    pub commit_to_done: Histogram,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_i(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauge_f(r: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let action_duration = HistogramVec::new(
            HistogramOpts::new(
                "observer_action_duration_seconds",
                "Duration of each action attempt",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["observer", "type"],
        )
        .expect("valid metric");
        r.register(Box::new(action_duration.clone()))
            .expect("unique metric");
        let enrich_duration = HistogramVec::new(
            HistogramOpts::new(
                "observer_enrich_duration_seconds",
                "Duration of enrichment lookups, by source (cache, http, sql)",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["source"],
        )
        .expect("valid metric");
        r.register(Box::new(enrich_duration.clone()))
            .expect("unique metric");
        let commit_to_done = Histogram::with_opts(
            HistogramOpts::new(
                "observer_commit_to_done_seconds",
                "Seconds from an event's commit to the completion of all its actions",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        r.register(Box::new(commit_to_done.clone()))
            .expect("unique metric");
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "observer_breaker_state",
                "Circuit breaker state per destination: 0 closed, 1 half-open, 2 open",
            ),
            &["destination"],
        )
        .expect("valid metric");
        r.register(Box::new(breaker_state.clone()))
            .expect("unique metric");
        let m = Metrics {
            events_read: counter(&r, "observer_events_read_total", "Change-log rows read"),
            events_matched: counter(
                &r,
                "observer_events_matched_total",
                "Events that matched at least one observer",
            ),
            events_processed: counter(
                &r,
                "observer_events_processed_total",
                "Events whose actions are all delivered, skipped or dead-lettered",
            ),
            actions: counter_vec(
                &r,
                "observer_actions_total",
                "Action outcomes by observer, type and outcome",
                &["observer", "type", "outcome"],
            ),
            actions_failed: counter_vec(
                &r,
                "observer_actions_failed_total",
                "Failed action attempts (retried or dead-lettered)",
                &["observer", "type"],
            ),
            action_duration,
            retries: counter_vec(
                &r,
                "observer_retries_total",
                "Attempts scheduled again after a failure",
                &["observer"],
            ),
            deferred: counter_vec(
                &r,
                "observer_deferred_total",
                "Deliveries put back without an attempt, by reason",
                &["reason"],
            ),
            dlq_size: gauge_i(&r, "observer_dlq_size", "Pending dead letters"),
            dead_letters: counter(
                &r,
                "observer_dead_letters_total",
                "Dead letters written by this process",
            ),
            checkpoint_pk: gauge_i(
                &r,
                "observer_checkpoint_pk",
                "Change-log pk of the last event the completion watermark passed",
            ),
            checkpoint_events: gauge_i(
                &r,
                "observer_checkpoint_events",
                "Events the completion watermark passed in this run",
            ),
            lag_events: gauge_i(
                &r,
                "observer_lag_events",
                "Events read but not yet completed",
            ),
            backlog_events: gauge_i(
                &r,
                "observer_backlog_events",
                "Change-log rows committed after the checkpoint (refreshed periodically)",
            ),
            lag_seconds: gauge_f(
                &r,
                "observer_lag_seconds",
                "Age of the oldest event read but not completed",
            ),
            in_flight: gauge_i(&r, "observer_in_flight", "Dispatches in flight"),
            dedup_checks: counter(
                &r,
                "observer_dedup_checks_total",
                "Deliveries checked by dedup",
            ),
            dedup_skips: counter(
                &r,
                "observer_dedup_skips_total",
                "Deliveries skipped because they already ran within the window",
            ),
            dedup_unavailable: counter_vec(
                &r,
                "observer_dedup_unavailable_total",
                "Dedup checks made while its store was unreachable, by what was done",
                &["action"],
            ),
            dedup_rate: gauge_f(
                &r,
                "observer_dedup_rate",
                "Dedup skips per check since start",
            ),
            cache_hits: counter(&r, "observer_cache_hits_total", "Enrichment cache hits"),
            cache_misses: counter(&r, "observer_cache_misses_total", "Enrichment cache misses"),
            cache_evictions: counter(
                &r,
                "observer_cache_evictions_total",
                "Cache keys removed by cache actions",
            ),
            cache_errors: counter(
                &r,
                "observer_cache_errors_total",
                "Cache operations that failed (the lookup ran uncached)",
            ),
            cache_hit_rate: gauge_f(
                &r,
                "observer_cache_hit_rate",
                "Enrichment cache hits per lookup since start",
            ),
            enrich_duration,
            breaker_state,
            breaker_opened: counter_vec(
                &r,
                "observer_breaker_opened_total",
                "Times a destination's breaker opened",
                &["destination"],
            ),
            listener_active: gauge_i(
                &r,
                "observer_listener_active",
                "1 while this process holds the listener lock and runs",
            ),
            leader: gauge_i(
                &r,
                "observer_leader",
                "1 while this process leads its listener",
            ),
            takeovers: counter_vec(
                &r,
                "observer_leader_takeovers_total",
                "Times this process became the leader of its listener, by how",
                &["reason"],
            ),
            lease_renew_failures: counter(
                &r,
                "observer_lease_renew_failures_total",
                "Failover lease renewals that failed",
            ),
            lease_since_renewal: gauge_f(
                &r,
                "observer_lease_seconds_since_renewal",
                "Seconds since this leader last renewed its failover lease",
            ),
            commit_to_done,
            registry: r,
        };
        for reason in [
            "breaker_open",
            "rate_limited",
            "dedup_wait",
            "claimed_elsewhere",
        ] {
            m.deferred.with_label_values(&[reason]);
        }
        for action in ["processed", "waited"] {
            m.dedup_unavailable.with_label_values(&[action]);
        }
        for reason in TAKEOVER_REASONS {
            m.takeovers.with_label_values(&[reason]);
        }
        for source in ["cache", "http", "sql"] {
            m.enrich_duration.with_label_values(&[source]);
        }
        Arc::new(m)
    }

    /// Touches the per-observer label sets so they read 0 rather than "no data".
    pub fn init_observer(&self, observer: &str, kinds: &[&str]) {
        self.retries.with_label_values(&[observer]);
        for kind in kinds {
            self.actions_failed.with_label_values(&[observer, kind]);
            self.action_duration.with_label_values(&[observer, kind]);
            for outcome in ["delivered", "dead_lettered", "duplicate"] {
                self.actions.with_label_values(&[observer, kind, outcome]);
            }
        }
    }

    pub fn record_dedup(&self, skipped: u64, checked: u64) {
        self.dedup_checks.inc_by(checked);
        self.dedup_skips.inc_by(skipped);
        let c = self.dedup_checks.get();
        if c > 0 {
            self.dedup_rate
                .set(self.dedup_skips.get() as f64 / c as f64);
        }
    }

    pub fn record_cache(&self, hit: bool) {
        if hit {
            self.cache_hits.inc();
        } else {
            self.cache_misses.inc();
        }
        let h = self.cache_hits.get();
        let total = h + self.cache_misses.get();
        self.cache_hit_rate.set(h as f64 / total as f64);
    }

    /// The Prometheus text exposition of every collector.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding our own registry into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
