//! The `nats` roles: `run --role publisher` (its forwarder) and `run --role worker`.
//! docs/scaling.md shows where they sit; the stream and consumers are `migrate --nats`'s.

use std::sync::Arc;

use anyhow::Result;
use observer_core::action::ActionContext;
use observer_core::config::Config;
use observer_core::forward::Forwarder;
use observer_core::observer::Observers;

use crate::app::App;
use crate::daemon::Stoppable;
use crate::stack;

/// The publisher's forwarder, after checking that the stream and consumers exist as `[nats]`
/// describes them (so a publisher never fills a stream no worker set reads).
#[cfg(feature = "nats")]
pub async fn forwarder(cfg: &Config, layers: &stack::LayerState) -> Result<Arc<dyn Forwarder>> {
    use observer_features::nats;
    nats::stream::ensure(&cfg.nats, false).await?;
    let client =
        nats::connect(&cfg.nats, &format!("fraiseql-observers publisher {}", me())).await?;
    tracing::info!(server = %nats::shown_servers(&cfg.nats.url), stream = %cfg.nats.stream,
        partitions = cfg.nats.partitions, max_outstanding_acks = cfg.nats.max_outstanding_acks,
        "publisher: change events go to the stream");
    Ok(Arc::new(nats::JetStreamForwarder::new(
        client,
        &cfg.nats,
        layers.nats.clone(),
    )))
}

#[cfg(not(feature = "nats"))]
pub async fn forwarder(_cfg: &Config, _layers: &stack::LayerState) -> Result<Arc<dyn Forwarder>> {
    anyhow::bail!("--role publisher needs the `nats` layer, and this binary was built without it (cargo feature `nats`)")
}

/// `host:pid`.
fn me() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}:{}", std::process::id())
}

/// `run --role worker`: pulls events from every partition consumer and runs them through the
/// executor stack until a signal; the metrics endpoint stops last.
#[cfg(feature = "nats")]
pub async fn worker(
    app: &App,
    cfg: &Arc<Config>,
    actions: &ActionContext,
    layers: &Arc<stack::LayerState>,
    observers: Arc<Observers>,
    endpoint: Option<impl Stoppable>,
) -> Result<()> {
    use observer_features::nats;
    use tokio_util::sync::CancellationToken;
    let result = async {
        nats::stream::ensure(&cfg.nats, false).await?;
        let name = me();
        let client = nats::connect(&cfg.nats, &format!("fraiseql-observers worker {name}")).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::daemon::signals(shutdown.clone()));
        let (observers_tx, rx) = tokio::sync::watch::channel(observers);
        let current = Arc::new(std::sync::RwLock::new(cfg.clone()));
        tokio::spawn(crate::daemon::reload_on_hup(
            app.config_path.clone(),
            current.clone(),
            observers_tx,
            layers.metrics.clone(),
            shutdown.clone(),
        ));
        let ctx = observer_core::runloop::WorkContext {
            database: app.where_db(),
            config: cfg.clone(),
            observers: rx,
            objects: app.objects.clone(),
            pg_config: app.pg_config.clone(),
            tls: app.tls.clone(),
            metrics: layers.metrics.clone(),
        };
        let (actions, layers2) = (actions.clone(), layers.clone());
        let make = move || {
            let cfg = current
                .read()
                .map(|c| c.clone())
                .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
            stack::build(&cfg, actions.clone(), &layers2)
        };
        let workers = nats::Workers::new(client, &cfg.nats, layers.nats.clone(), name.clone());
        // One slot per partition: each holds at most one message at a time anyway.
        let (tx, mut items) = tokio::sync::mpsc::channel(cfg.nats.partitions as usize);
        let mut pulls = workers.start(tx, shutdown.clone());
        tracing::info!(worker = %name, database = %app.where_db(), observers = ctx.observers.borrow().list.len(),
            "starting as a worker (no change-log listener)");
        let result = observer_core::runloop::supervise_work(&ctx, &make, &mut items, shutdown.clone()).await;
        shutdown.cancel();
        layers.settle().await;
        while pulls.join_next().await.is_some() {}
        // Messages still queued for the loop are given back (their settles are dropped here).
        drop(items);
        workers.finish(std::time::Duration::from_secs(5)).await;
        tracing::info!(worker = %name, "worker stopped");
        result.map_err(anyhow::Error::from)
    }
    .await;
    if let Some(e) = endpoint {
        e.stop().await;
    }
    result
}

#[cfg(not(feature = "nats"))]
pub async fn worker(
    _app: &App,
    _cfg: &Arc<Config>,
    _actions: &ActionContext,
    _layers: &Arc<stack::LayerState>,
    _observers: Arc<Observers>,
    endpoint: Option<impl Stoppable>,
) -> Result<()> {
    if let Some(e) = endpoint {
        e.stop().await;
    }
    anyhow::bail!("--role worker needs the `nats` layer, and this binary was built without it (cargo feature `nats`)")
}
