//! What every command shares: the loaded configuration, our object names, and connections made
//! with errors that say where we tried to connect (never the password).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use observer_core::config::{self, Config};
use observer_core::schema::{Objects, TableName};

/// The loaded configuration and the handles derived from it.
pub struct App {
    pub config: Arc<Config>,
    pub config_path: Option<PathBuf>,
    pub objects: Arc<Objects>,
    pub pg_config: tokio_postgres::Config,
    /// The connector of every connection; TLS (verified) only with `sslmode=require`.
    pub tls: observer_core::tls::PgTls,
    pub tls_on: bool,
}

impl App {
    /// Loads the config file (if any) with env overrides, and checks the names it gives.
    pub fn load(path: Option<&Path>) -> Result<App> {
        let config = config::load(path)?;
        let table = TableName::parse(&config.change_log.table).context("change_log.table")?;
        // Checked here too (not only by `validate` and `run`): `migrate` writes the channel into
        // a trigger function.
        config::check_channel(&config.listener.channel)
            .map_err(|m| anyhow!("listener.channel: {m}"))?;
        let objects = Arc::new(Objects::new(table, &config.listener.channel));
        let url = config::resolve_secret(&config.database.url, "database.url")?;
        let mut pg_config = tokio_postgres::Config::from_str(&url)
            .map_err(|e| anyhow!("database.url is not a valid Postgres URL: {e}"))?;
        let ca_file = match &config.database.ca_file {
            Some(f) => Some(config::resolve_secret(f, "database.ca_file")?),
            None => None,
        };
        let (tls, tls_on) = observer_core::tls::configure(&mut pg_config, ca_file.as_deref())?;
        pg_config.connect_timeout(Duration::from_millis(
            config.database.connect_timeout_ms.max(1),
        ));
        // The pid tells an operator (and the failover tests) which process a session belongs to.
        pg_config.application_name(format!("fraiseql-observers pid {}", std::process::id()));
        Ok(App {
            config: Arc::new(config),
            config_path: path.map(Path::to_path_buf),
            objects,
            pg_config,
            tls,
            tls_on,
        })
    }

    /// `host:port/dbname` of the configured database, for messages.
    pub fn where_db(&self) -> String {
        let host = self
            .pg_config
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(s) => s.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = self.pg_config.get_ports().first().copied().unwrap_or(5432);
        let db = self
            .pg_config
            .get_dbname()
            .or(self.pg_config.get_user())
            .unwrap_or("postgres");
        format!("{host}:{port}/{db}")
    }

    /// One connection, driven in the background.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = self
            .pg_config
            .connect(self.tls.clone())
            .await
            .with_context(|| format!("cannot connect to the database at {}", self.where_db()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
        Ok(client)
    }

    /// A pool for the daemon's readers and `sql` actions.
    pub fn pool(&self) -> Result<deadpool_postgres::Pool> {
        let mgr = deadpool_postgres::Manager::from_config(
            self.pg_config.clone(),
            self.tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        deadpool_postgres::Pool::builder(mgr)
            .max_size(self.config.database.pool_size.max(2))
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_millis(
                self.config.database.connect_timeout_ms.max(1),
            )))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| anyhow!("database pool: {e}"))
    }

    /// The `[redis]` handle, when a URL is configured (`REDIS_URL` or `[redis] url`). It
    /// connects on first use.
    pub fn redis(&self) -> Result<Option<observer_core::action::RedisHandle>> {
        let Some(url) = &self.config.redis.url else {
            return Ok(None);
        };
        let url = observer_core::config::resolve_secret(url, "redis.url")?;
        observer_core::action::RedisHandle::new(
            &url,
            &self.config.redis.key_prefix,
            std::time::Duration::from_millis(self.config.redis.timeout_ms),
        )
        .map(Some)
        .map_err(anyhow::Error::msg)
    }
}
