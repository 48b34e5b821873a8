//! Failover (cargo feature `failover`): the leader of a listener group holds a lease with a
//! fencing token, so a leader that is alive but stuck — paused, wedged, cut off from Postgres
//! behind a half-open connection — loses the listener within `lease_ms`, and everything it still
//! tries to write afterwards is refused.
//!
//! * The lease is one row per listener (`observer_leases`): a token, the holder, and an expiry
//!   on the database's clock. The leader renews it every `renew_ms` on its own connection (the
//!   *lease session*, whose backend pid and start time the row records).
//! * A standby polls every `poll_ms` and takes the lease, incrementing the token, when it is
//!   vacant (handed back on a clean stop), expired, or when the holder's lease session no longer
//!   exists on the server (the leader crashed or its backend was terminated): the last case makes
//!   a `kill -9` cost a poll interval, not a lease.
//! * The leader stops dispatching on its own clock (`CLOCK_BOOTTIME`, which runs on through
//!   SIGSTOP and suspend): its term is valid until the send time of its last successful
//!   renewal plus the lease, less a margin. That is before the database-clock expiry a standby
//!   waits for, so the two never dispatch at once unless a session ended under a live leader
//!   (then the leader learns it from its connection within milliseconds).
//! * Every transaction of the leader's writer starts with a key-share lock on the lease row and
//!   a check of the token ([`Term::fence`]), so a takeover (which changes the token, a key
//!   column) and a write are serialised and a write under an old token rolls back whole: action
//!   log, dead letters and checkpoint. Renewals change no key column, so they and the writer
//!   never wait for each other.
//! * Every instance registers in `observer_instances` (role, since, heartbeat, lease expiry),
//!   which `status` lists.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use observer_core::config::FailoverConfig;
use observer_core::leadership::{Leadership, LeadershipError, Session, Term};
use observer_core::metrics::Metrics;
use observer_core::schema::Objects;
use observer_core::store::{explain_missing, StoreError};
use observer_core::tls::PgTls;
use tokio::task::JoinHandle;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Instance rows not heard from for this long are deleted when an instance registers.
const FORGET_INSTANCES_AFTER_SECS: i64 = 600;

/// Nanoseconds of `CLOCK_BOOTTIME`: monotonic, and (unlike `CLOCK_MONOTONIC`) it keeps counting
/// while the machine is suspended, so a lease can never look younger than it is.
fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer we pass; CLOCK_BOOTTIME
    // exists on every Linux this builds for.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        // Unreachable on Linux; a zero clock makes every term invalid, never the reverse.
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The statements of the lease, built once for the configured tables.
struct Statements {
    look: String,
    insert: String,
    take: String,
    renew: String,
    release: String,
    fence: String,
    register: String,
    become_leader: String,
    heartbeat: String,
    retire: String,
}

impl Statements {
    fn new(objects: &Objects) -> Statements {
        let l = objects.leases.sql();
        let i = objects.instances.sql();
        // The holder's lease session still exists on the server. A role that may not see the
        // session's start time (another role's backend) counts it as alive: never a takeover
        // on missing information, only on expiry.
        let alive = "EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.backend_pid \
                     AND (a.backend_start IS NULL OR a.backend_start = l.backend_start))";
        let takeable = format!("(l.holder IS NULL OR l.expires_at <= now() OR NOT {alive})");
        let me = "backend_pid = pg_backend_pid(), \
                  backend_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()), \
                  acquired_at = now(), renewed_at = now(), \
                  expires_at = now() + $4::bigint * interval '1 millisecond', lease_ms = $4";
        Statements {
            look: format!(
                "SELECT l.token, l.holder, l.holder_name, l.holder IS NULL, l.expires_at <= now(), NOT {alive},
                        EXTRACT(EPOCH FROM l.expires_at - now())::float8
                 FROM {l} l WHERE l.listener_id = $1"
            ),
            insert: format!(
                "INSERT INTO {l} AS l (listener_id, token, holder, holder_name, backend_pid, backend_start,
                                       acquired_at, renewed_at, expires_at, lease_ms)
                 VALUES ($1, 1, $2, $3, pg_backend_pid(),
                         (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()),
                         now(), now(), now() + $4::bigint * interval '1 millisecond', $4)
                 ON CONFLICT (listener_id) DO NOTHING
                 RETURNING l.token"
            ),
            take: format!(
                "UPDATE {l} AS l SET token = l.token + 1, holder = $2, holder_name = $3, {me}
                 WHERE l.listener_id = $1 AND l.token = $5 AND {takeable}
                 RETURNING l.token"
            ),
            renew: format!(
                "WITH lease AS (
                     UPDATE {l} SET renewed_at = now(), expires_at = now() + $4::bigint * interval '1 millisecond'
                     WHERE listener_id = $1 AND token = $2 AND holder = $3
                     RETURNING expires_at),
                 me AS (
                     UPDATE {i} SET heartbeat_at = now(), lease_expires_at = (SELECT expires_at FROM lease)
                     WHERE listener_id = $1 AND instance_id = $3 AND EXISTS (SELECT 1 FROM lease))
                 SELECT 1 FROM lease"
            ),
            release: format!(
                "UPDATE {l} SET holder = NULL, holder_name = NULL, backend_pid = NULL, backend_start = NULL,
                        expires_at = now()
                 WHERE listener_id = $1 AND token = $2 AND holder = $3"
            ),
            // One round trip: lock the lease row until our commit, check the token, and let the
            // server end the transaction if this connection wedges inside it while holding that
            // lock. `token` is a key column (unique index with listener_id), so a takeover, which
            // changes it, conflicts with this KEY SHARE lock and waits for our commit, and we see
            // any takeover that committed before; a renewal changes no key column and never waits
            // for a write, nor a write for a renewal.
            fence: format!(
                "SELECT l.token = $2 AND l.holder IS NOT DISTINCT FROM $3,
                        set_config('idle_in_transaction_session_timeout', $4, true)
                 FROM {l} l WHERE l.listener_id = $1 FOR KEY SHARE"
            ),
            register: format!(
                "WITH gone AS (
                     DELETE FROM {i} WHERE listener_id = $1 AND instance_id <> $2
                        AND heartbeat_at < now() - {FORGET_INSTANCES_AFTER_SECS} * interval '1 second')
                 INSERT INTO {i} (listener_id, instance_id, host, pid, role)
                 VALUES ($1, $2, $3, $4, 'standby')
                 ON CONFLICT (listener_id, instance_id) DO UPDATE
                    SET role = 'standby', heartbeat_at = now(), lease_expires_at = NULL,
                        role_since = CASE WHEN {i}.role = 'standby' THEN {i}.role_since ELSE now() END"
            ),
            become_leader: format!(
                "INSERT INTO {i} (listener_id, instance_id, host, pid, role, lease_expires_at)
                 VALUES ($1, $2, $3, $4, 'leader', now() + $5::bigint * interval '1 millisecond')
                 ON CONFLICT (listener_id, instance_id) DO UPDATE
                    SET role = 'leader', role_since = now(), heartbeat_at = now(),
                        lease_expires_at = EXCLUDED.lease_expires_at"
            ),
            heartbeat: format!(
                "UPDATE {i} SET heartbeat_at = now() WHERE listener_id = $1 AND instance_id = $2"
            ),
            retire: format!("DELETE FROM {i} WHERE listener_id = $1 AND instance_id = $2"),
        }
    }
}

/// What a standby saw of the lease on one look.
struct Seen {
    token: i64,
    holder: Option<Uuid>,
    holder_name: Option<String>,
    vacant: bool,
    expired: bool,
    gone: bool,
    expires_in_secs: Option<f64>,
}

/// The `failover` layer's [`Leadership`]: a lease with a fencing token (see the module docs).
pub struct LeaseLeadership {
    listener: String,
    instance: Uuid,
    host: String,
    pid: i32,
    lease: Duration,
    renew: Duration,
    poll: Duration,
    /// Subtracted from the lease on our own clock (see `valid_until` in [`LeaseTerm`]).
    margin: Duration,
    pg: tokio_postgres::Config,
    tls: PgTls,
    sql: Arc<Statements>,
    metrics: Arc<Metrics>,
    /// The connection a standby polls on; it becomes the lease session when it takes over.
    standby: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl LeaseLeadership {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        listener: &str,
        host: &str,
        cfg: &FailoverConfig,
        objects: &Objects,
        pg: tokio_postgres::Config,
        tls: PgTls,
        metrics: Arc<Metrics>,
    ) -> LeaseLeadership {
        let lease = Duration::from_millis(cfg.lease_ms);
        LeaseLeadership {
            listener: listener.to_string(),
            instance: Uuid::new_v4(),
            host: host.to_string(),
            pid: std::process::id() as i32,
            lease,
            renew: Duration::from_millis(cfg.renew_every_ms()),
            poll: Duration::from_millis(cfg.poll_ms),
            margin: (lease / 10).min(Duration::from_millis(500)),
            pg,
            tls,
            sql: Arc::new(Statements::new(objects)),
            metrics,
            standby: tokio::sync::Mutex::new(None),
        }
    }

    /// This instance's id in `observer_instances`.
    pub fn instance_id(&self) -> Uuid {
        self.instance
    }

    fn name(&self) -> String {
        format!("{}:{}", self.host, self.pid)
    }

    async fn connect(&self) -> Result<tokio_postgres::Client, LeadershipError> {
        let (client, conn) = self.pg.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "failover lease connection ended");
            }
        });
        // A takeover never waits behind a wedged holder's row lock; a statement never hangs.
        client
            .batch_execute(&format!(
                "SET application_name = 'fraiseql-observers pid {} lease'; SET lock_timeout = '{}ms'; SET statement_timeout = '{}ms'",
                self.pid,
                self.poll.as_millis().max(100),
                self.lease.as_millis()
            ))
            .await?;
        Ok(client)
    }

    async fn look(&self, c: &tokio_postgres::Client) -> Result<Option<Seen>, LeadershipError> {
        let row = c
            .query_opt(self.sql.look.as_str(), &[&self.listener])
            .await
            .map_err(explain_missing)?;
        Ok(row.map(|r| Seen {
            token: r.get(0),
            holder: r.get(1),
            holder_name: r.get(2),
            vacant: r.get(3),
            expired: r.get::<_, Option<bool>>(4).unwrap_or(true),
            gone: r.get::<_, Option<bool>>(5).unwrap_or(true),
            expires_in_secs: r.get(6),
        }))
    }

    /// One attempt to take the lease: the new token and why it was free, or `None`.
    async fn try_take(
        &self,
        c: &tokio_postgres::Client,
        seen: &Option<Seen>,
    ) -> Result<Option<(i64, &'static str)>, LeadershipError> {
        let lease_ms = self.lease.as_millis() as i64;
        let name = self.name();
        let row = match seen {
            None => c
                .query_opt(
                    self.sql.insert.as_str(),
                    &[&self.listener, &self.instance, &name, &lease_ms],
                )
                .await
                .map_err(explain_missing)?
                .map(|r| (r.get::<_, i64>(0), "vacant")),
            Some(s) if s.holder == Some(self.instance) || s.vacant || s.expired || s.gone => {
                let reason = if s.vacant || s.holder == Some(self.instance) {
                    "vacant"
                } else if s.gone {
                    "holder_gone"
                } else {
                    "expired"
                };
                c.query_opt(
                    self.sql.take.as_str(),
                    &[&self.listener, &self.instance, &name, &lease_ms, &s.token],
                )
                .await
                .map_err(explain_missing)?
                .map(|r| (r.get::<_, i64>(0), reason))
            }
            Some(_) => None,
        };
        Ok(row)
    }

    async fn register(&self, c: &tokio_postgres::Client) -> Result<(), LeadershipError> {
        c.execute(
            self.sql.register.as_str(),
            &[&self.listener, &self.instance, &self.host, &self.pid],
        )
        .await
        .map_err(explain_missing)?;
        Ok(())
    }
}

/// Statement errors that mean "not now" rather than trouble: a lock or statement timeout
/// (another transaction holds the lease row), a serialisation conflict.
fn transient(e: &LeadershipError) -> bool {
    match e {
        LeadershipError::Db(d) => d.code().is_some_and(|c| {
            let c = c.code();
            c == "55P03" || c == "57014" || c.starts_with("40")
        }),
        _ => false,
    }
}

#[async_trait::async_trait]
impl Leadership for LeaseLeadership {
    async fn acquire(
        &self,
        _session: Session<'_>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Box<dyn Term>>, LeadershipError> {
        let mut standby = self.standby.lock().await;
        let mut registered = false;
        let mut last_heartbeat = tokio::time::Instant::now();
        let mut announced: Option<(i64, Option<String>)> = None;
        loop {
            if standby.as_ref().is_none_or(|c| c.is_closed()) {
                *standby = Some(self.connect().await?);
                registered = false;
            }
            let Some(c) = standby.as_ref() else {
                continue;
            };
            // The instance row is for `status`: a row lock or timeout delays it to the next
            // round rather than failing the run.
            let beat = if !registered {
                self.register(c).await
            } else if last_heartbeat.elapsed() >= self.renew {
                c.execute(
                    self.sql.heartbeat.as_str(),
                    &[&self.listener, &self.instance],
                )
                .await
                .map(|_| ())
                .map_err(LeadershipError::from)
            } else {
                Ok(())
            };
            match beat {
                Ok(()) => {
                    registered = true;
                    last_heartbeat = tokio::time::Instant::now();
                }
                Err(e) if transient(&e) => {}
                Err(e) => return Err(e),
            }
            let sent = boottime_ns();
            let attempt = async {
                let seen = self.look(c).await?;
                let took = self.try_take(c, &seen).await?;
                Ok::<_, LeadershipError>((seen, took))
            }
            .await;
            match attempt {
                Ok((seen, Some((token, reason)))) => {
                    let Some(client) = standby.take() else {
                        continue;
                    };
                    let lease_ms = self.lease.as_millis() as i64;
                    // The lease is ours from here; the instance row only shows it.
                    if let Err(e) = client
                        .execute(
                            self.sql.become_leader.as_str(),
                            &[
                                &self.listener,
                                &self.instance,
                                &self.host,
                                &self.pid,
                                &lease_ms,
                            ],
                        )
                        .await
                    {
                        tracing::warn!(error = %observer_core::pg_error(&e), "could not mark this instance as the leader in the instance registry");
                    }
                    self.metrics.takeovers.with_label_values(&[reason]).inc();
                    let from = seen
                        .as_ref()
                        .and_then(|s| s.holder_name.clone())
                        .filter(|_| reason != "vacant");
                    tracing::info!(
                        listener = %self.listener,
                        token,
                        reason,
                        previous = from.as_deref().unwrap_or(""),
                        "failover lease acquired; this instance is now the leader{}",
                        match (reason, &from) {
                            ("expired", Some(f)) => format!(" (the lease of {f} expired)"),
                            ("holder_gone", Some(f)) => format!(" (the session of {f} is gone)"),
                            _ => String::new(),
                        }
                    );
                    return Ok(Some(Box::new(LeaseTerm::start(self, client, token, sent))));
                }
                Ok((seen, None)) => {
                    let now = seen.as_ref().map(|s| (s.token, s.holder_name.clone()));
                    if now.is_some() && now != announced {
                        let s = seen.as_ref();
                        tracing::info!(
                            listener = %self.listener,
                            leader = s.and_then(|s| s.holder_name.as_deref()).unwrap_or("?"),
                            token = s.map(|s| s.token).unwrap_or(0),
                            expires_in_secs = s.and_then(|s| s.expires_in_secs).unwrap_or(0.0),
                            "listener is led by another instance; standing by"
                        );
                        announced = now;
                    }
                }
                Err(e) if transient(&e) => {}
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    async fn retire(&self) {
        let standby = self.standby.lock().await.take();
        let client = match standby.filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => match self.connect().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot deregister this instance");
                    return;
                }
            },
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&self.listener, &self.instance];
        let q = client.execute(self.sql.retire.as_str(), &params);
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), q).await {
            tracing::debug!(error = %e, "cannot deregister this instance");
        }
    }
}

/// One lease held: renewed by a task on the lease session until it is lost or released.
struct LeaseTerm {
    listener: String,
    instance: Uuid,
    token: i64,
    lost: CancellationToken,
    /// `CLOCK_BOOTTIME` nanoseconds until which the lease is provably ours.
    valid_until: Arc<AtomicU64>,
    /// The idle-in-transaction limit the fence sets on the writer's transactions.
    writer_idle_limit: String,
    sql: Arc<Statements>,
    session: Arc<tokio_postgres::Client>,
    renewer: JoinHandle<()>,
}

impl LeaseTerm {
    fn start(
        owner: &LeaseLeadership,
        client: tokio_postgres::Client,
        token: i64,
        sent_ns: u64,
    ) -> LeaseTerm {
        let valid_for = owner.lease.saturating_sub(owner.margin).as_nanos() as u64;
        let valid_until = Arc::new(AtomicU64::new(sent_ns.saturating_add(valid_for)));
        let lost = CancellationToken::new();
        let session = Arc::new(client);
        let renewer = tokio::spawn(renew_loop(Renewal {
            listener: owner.listener.clone(),
            instance: owner.instance,
            token,
            lease_ms: owner.lease.as_millis() as i64,
            renew: owner.renew,
            valid_for,
            valid_until: valid_until.clone(),
            last_renewal_ns: sent_ns,
            lost: lost.clone(),
            sql: owner.sql.clone(),
            session: session.clone(),
            metrics: owner.metrics.clone(),
        }));
        LeaseTerm {
            listener: owner.listener.clone(),
            instance: owner.instance,
            token,
            lost,
            valid_until,
            writer_idle_limit: format!("{}ms", owner.lease.as_millis()),
            sql: owner.sql.clone(),
            session,
            renewer,
        }
    }
}

/// The term ends with its run: renewals stop, and the lease session closes with the last
/// reference to it (a standby then sees the holder's session gone).
impl Drop for LeaseTerm {
    fn drop(&mut self) {
        self.renewer.abort();
        self.lost.cancel();
    }
}

#[async_trait::async_trait]
impl Term for LeaseTerm {
    fn token(&self) -> i64 {
        self.token
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    fn holds(&self) -> bool {
        !self.lost.is_cancelled() && boottime_ns() < self.valid_until.load(Ordering::Acquire)
    }

    async fn fence(&self, tx: &Transaction<'_>) -> Result<(), StoreError> {
        let row = tx
            .query_opt(
                self.sql.fence.as_str(),
                &[
                    &self.listener,
                    &self.token,
                    &self.instance,
                    &self.writer_idle_limit,
                ],
            )
            .await
            .map_err(explain_missing)?;
        match row {
            Some(r) if r.get::<_, Option<bool>>(0) == Some(true) => Ok(()),
            _ => {
                self.lost.cancel();
                Err(StoreError::LeaseLost {
                    listener: self.listener.clone(),
                    token: self.token,
                })
            }
        }
    }

    async fn release(&self) {
        self.renewer.abort();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&self.listener, &self.token, &self.instance];
        let q = self.session.execute(self.sql.release.as_str(), &params);
        match tokio::time::timeout(Duration::from_secs(2), q).await {
            Ok(Ok(1)) => {
                tracing::info!(listener = %self.listener, token = self.token, "failover lease handed back")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not hand the failover lease back; it expires on its own")
            }
            Err(_) => {
                tracing::warn!("handing the failover lease back timed out; it expires on its own")
            }
        }
    }
}

/// The renewal task's state.
struct Renewal {
    listener: String,
    instance: Uuid,
    token: i64,
    lease_ms: i64,
    renew: Duration,
    valid_for: u64,
    valid_until: Arc<AtomicU64>,
    last_renewal_ns: u64,
    lost: CancellationToken,
    sql: Arc<Statements>,
    session: Arc<tokio_postgres::Client>,
    metrics: Arc<Metrics>,
}

/// Renews the lease every `renew` until it is lost; keeps `observer_lease_seconds_since_renewal`
/// current. The lease is lost when the row says another token holds it, when the lease session
/// closes, or when no renewal succeeds before our own deadline.
async fn renew_loop(mut r: Renewal) {
    let tick = r.renew.min(Duration::from_millis(250));
    let listener = r.listener.clone();
    let lose = |r: &Renewal, why: &str| {
        r.metrics.lease_since_renewal.set(0.0);
        tracing::warn!(listener = %r.listener, token = r.token, "failover lease lost: {why}; stopping dispatch");
        r.lost.cancel();
    };
    loop {
        let now = boottime_ns();
        let deadline = r.valid_until.load(Ordering::Acquire);
        r.metrics
            .lease_since_renewal
            .set(now.saturating_sub(r.last_renewal_ns) as f64 / 1e9);
        if now >= deadline {
            lose(&r, "no renewal succeeded within the lease");
            return;
        }
        let due = r.last_renewal_ns.saturating_add(r.renew.as_nanos() as u64);
        if now < due {
            tokio::time::sleep(Duration::from_nanos(due - now).min(tick)).await;
            continue;
        }
        let sent = boottime_ns();
        let left = Duration::from_nanos(deadline.saturating_sub(sent));
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&r.listener, &r.token, &r.instance, &r.lease_ms];
        let q = r.session.query_opt(r.sql.renew.as_str(), &params);
        match tokio::time::timeout(left, q).await {
            Ok(Ok(Some(_))) => {
                r.last_renewal_ns = sent;
                r.valid_until
                    .fetch_max(sent.saturating_add(r.valid_for), Ordering::AcqRel);
            }
            Ok(Ok(None)) => {
                lose(&r, "another instance holds it under a newer token");
                return;
            }
            Ok(Err(e)) => {
                r.metrics.lease_renew_failures.inc();
                if r.session.is_closed() {
                    lose(&r, &format!("the lease session ended ({e})"));
                    return;
                }
                tracing::warn!(listener = %listener, error = %observer_core::pg_error(&e), "failover lease renewal failed; retrying");
                tokio::time::sleep(tick).await;
            }
            Err(_) => {
                r.metrics.lease_renew_failures.inc();
                lose(&r, "renewals got no answer from the database");
                return;
            }
        }
    }
}
