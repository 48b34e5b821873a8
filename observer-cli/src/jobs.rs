//! The job workers of the `queue` layer in this process: started by `run` (beside the listener,
//! when `[queue] workers` is above 0) and by `run --role queue-worker` (on their own).
//!
//! Which queues: those the observers name, and any other queue that still holds jobs under this
//! key prefix. The second part is the roll-back guarantee: with `features.queue` switched off,
//! new deliveries run inline, and the jobs enqueued before are still worked off here.

use std::sync::Arc;

use anyhow::{bail, Result};
use observer_core::action::ActionContext;
use observer_core::config::Config;
use observer_core::observer::Observers;
use observer_features::queue::{JobQueue, Workers};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::stack::{self, LayerState};

/// The queues to work: named by observers, or holding jobs (found on the server).
async fn queues(queue: &JobQueue, cfg: &Config, observers: &Observers) -> Vec<(String, usize)> {
    let mut names: Vec<String> = observers
        .list
        .iter()
        .filter_map(|o| o.queue.as_deref().map(str::to_string))
        .collect();
    match queue.discover().await {
        Ok(found) => {
            for q in found {
                if names.contains(&q) {
                    continue;
                }
                match queue.stats(&q).await {
                    Ok(s) if s.depth > 0 => {
                        tracing::info!(queue = %q, jobs = s.depth, "queue holds jobs no observer routes to any more; working them off");
                        names.push(q);
                    }
                    _ => {}
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the job queues on Redis; working the configured ones")
        }
    }
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|n| {
            let w = cfg.queue.workers_for(&n);
            (n, w)
        })
        .collect()
}

/// Starts this process's job workers; `None` when there is nothing for them to do (no Redis,
/// no queue, or `[queue] workers = 0` with `role` `all`).
#[allow(clippy::too_many_arguments)]
pub async fn start(
    app: &App,
    cfg: &Arc<Config>,
    actions: &ActionContext,
    layers: &Arc<LayerState>,
    observers: tokio::sync::watch::Receiver<Arc<Observers>>,
    current: Arc<std::sync::RwLock<Arc<Config>>>,
    shutdown: CancellationToken,
) -> Result<Option<JoinHandle<()>>> {
    let Some(redis) = actions.redis.clone() else {
        return Ok(None);
    };
    let queue = JobQueue::new(redis, cfg.queue.dedup_ttl_secs);
    // Cloned out first: the watch's read guard must not be held across the await (it would block
    // a reload's send meanwhile, and it cannot move between threads).
    let now = observers.borrow().clone();
    let list = queues(&queue, cfg, &now).await;
    if list.is_empty() {
        return Ok(None);
    }
    let names: Vec<String> = list.iter().map(|(n, _)| n.clone()).collect();
    tokio::spawn(observer_features::queue::worker::sample(
        queue.clone(),
        layers.queue.clone(),
        names,
        std::time::Duration::from_secs(5),
        shutdown.clone(),
    ));
    let working: Vec<(String, usize)> = list.into_iter().filter(|(_, n)| *n > 0).collect();
    if working.is_empty() {
        return Ok(None);
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let (ctx, layers2) = (actions.clone(), layers.clone());
    // The configuration with the queue layer off, made again only when a reload replaced the
    // running one (a stack is built per job; a deep copy of the config per job would cost more).
    let inline: std::sync::Mutex<Option<(Arc<Config>, Arc<Config>)>> = Default::default();
    let workers = Arc::new(Workers {
        queue,
        metrics: layers.queue.clone(),
        core_metrics: layers.metrics.clone(),
        observers,
        executor: Arc::new(move || {
            let cfg = current
                .read()
                .map(|c| c.clone())
                .unwrap_or_else(|p| p.into_inner().clone());
            let mut cached = inline.lock().unwrap_or_else(|p| p.into_inner());
            let off = match &*cached {
                Some((src, off)) if Arc::ptr_eq(src, &cfg) => off.clone(),
                _ => {
                    let mut c = (*cfg).clone();
                    c.features.queue = false;
                    let off = Arc::new(c);
                    *cached = Some((cfg, off.clone()));
                    off
                }
            };
            drop(cached);
            stack::build(&off, ctx.clone(), &layers2)
        }),
        pool: actions.pool.clone(),
        objects: app.objects.clone(),
        listener: cfg.listener.id.clone(),
        record: cfg.action_log.record,
        consumer: format!("{host}:{}", std::process::id()),
        visibility: std::time::Duration::from_millis(cfg.queue.visibility_timeout_ms),
        drain: std::time::Duration::from_millis(cfg.listener.shutdown_timeout_ms),
    });
    Ok(Some(tokio::spawn(workers.run(working, shutdown))))
}

/// `run --role queue-worker`: refuses what cannot work before starting.
pub fn check_worker(cfg: &Config) -> Result<()> {
    if cfg.redis.url.is_none() {
        bail!("--role queue-worker works off the job queues in Redis, but no Redis is configured: set [redis] url (or REDIS_URL)");
    }
    if cfg.queue.workers == 0 && cfg.queue.per_queue.values().all(|n| *n == 0) {
        bail!("--role queue-worker with [queue] workers = 0 would work on no job: set [queue] workers (or OBSERVER__QUEUE__WORKERS) above 0");
    }
    Ok(())
}
