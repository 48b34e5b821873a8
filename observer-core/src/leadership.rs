//! Who may act for a listener: the seam between the run loop and the way one instance of a
//! listener group is made the only active one.
//!
//! A run first asks its [`Leadership`] for a [`Term`] (standing by until it gets one). While it
//! runs it asks the term, before every dispatch, whether it still [`holds`](Term::holds) it,
//! stops when the term is [`lost`](Term::lost), and lets the term [`fence`](Term::fence) every
//! transaction its writer commits, so an instance that lost its term cannot record anything.
//! On a clean stop it [`releases`](Term::release) the term after its last write, so a standby
//! takes over at once.
//!
//! The core implementation, [`AdvisoryLock`], is a session advisory lock on the run's LISTEN
//! connection (the behaviour with `features.failover` off). The `failover` layer in
//! `observer-features` provides a lease with a fencing token that also survives a leader that is
//! alive but stuck (see docs/architecture.md, "Failover").

use std::time::Duration;

use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use crate::store::StoreError;

/// The run's LISTEN connection, which a leadership may use (the advisory lock lives on it) and
/// whose loss ends the run anyway.
pub struct Session<'a> {
    pub client: &'a tokio_postgres::Client,
    /// Cancelled when the connection is lost.
    pub lost: &'a CancellationToken,
}

/// Why no term could be had.
#[derive(Debug, thiserror::Error)]
pub enum LeadershipError {
    #[error("database: {}", crate::pg_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("the LISTEN connection was lost while standing by")]
    SessionLost,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

/// Makes this process the active instance of its listener, or keeps it standing by.
#[async_trait::async_trait]
pub trait Leadership: Send + Sync {
    /// Waits as a standby until this process may lead; `Ok(None)` when `shutdown` fires first.
    async fn acquire(
        &self,
        session: Session<'_>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Box<dyn Term>>, LeadershipError>;

    /// The process is exiting: forget this instance wherever it was registered.
    async fn retire(&self) {}
}

/// One period during which this process leads its listener.
#[async_trait::async_trait]
pub trait Term: Send + Sync {
    /// The fencing token of this term (0 when the mechanism has none).
    fn token(&self) -> i64;
    /// Cancelled when the term is lost; the run stops.
    fn lost(&self) -> CancellationToken;
    /// Whether the term is still provably held now: checked before every dispatch, so a process
    /// that was paused past its lease starts nothing before it notices.
    fn holds(&self) -> bool;
    /// Runs inside every transaction the writer commits, first; fails (and so rolls back the
    /// whole transaction) when another instance holds the listener now.
    async fn fence(&self, tx: &Transaction<'_>) -> Result<(), StoreError>;
    /// Hands the term back after the run's last write, so a standby need not wait for it to
    /// expire. Best effort: a term that cannot be released expires.
    async fn release(&self);
}

/// The listener's session advisory lock, on the LISTEN connection: held for as long as that
/// connection lives. Fencing is the checkpoint's epoch (see `checkpoint.rs`).
pub struct AdvisoryLock {
    listener: String,
    /// How often a standby tries the lock again.
    pub retry: Duration,
}

impl AdvisoryLock {
    pub fn new(listener: &str) -> AdvisoryLock {
        AdvisoryLock {
            listener: listener.to_string(),
            retry: Duration::from_secs(2),
        }
    }
}

/// The SQL expression of the listener lock's key (also read by `status` from `pg_locks`).
pub const LISTENER_LOCK_KEY: &str = "hashtextextended('fraiseql_observers:' || $1, 0)";

#[async_trait::async_trait]
impl Leadership for AdvisoryLock {
    async fn acquire(
        &self,
        session: Session<'_>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Box<dyn Term>>, LeadershipError> {
        let listener = self.listener.as_str();
        let sql = format!("SELECT pg_try_advisory_lock({LISTENER_LOCK_KEY})");
        let mut announced = false;
        loop {
            let got: bool = session.client.query_one(&sql, &[&listener]).await?.get(0);
            if got {
                if announced {
                    tracing::info!(
                        listener,
                        "listener lock acquired; this instance is now active"
                    );
                }
                return Ok(Some(Box::new(LockTerm {
                    lost: CancellationToken::new(),
                })));
            }
            if !announced {
                tracing::info!(
                    listener,
                    "listener is active in another process; standing by"
                );
                announced = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = session.lost.cancelled() => return Err(LeadershipError::SessionLost),
                _ = tokio::time::sleep(self.retry) => {}
            }
        }
    }
}

/// A term of the advisory lock: it ends with the LISTEN connection (which ends the run).
struct LockTerm {
    lost: CancellationToken,
}

#[async_trait::async_trait]
impl Term for LockTerm {
    fn token(&self) -> i64 {
        0
    }
    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }
    fn holds(&self) -> bool {
        true
    }
    async fn fence(&self, _tx: &Transaction<'_>) -> Result<(), StoreError> {
        Ok(())
    }
    async fn release(&self) {}
}
