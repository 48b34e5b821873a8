//! `migrate` and `capture add|list|remove`: installing what the daemon reads.

use std::path::Path;

use anyhow::Result;
use clap::Subcommand;
use observer_core::schema;

use crate::app::App;

#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Attach the capture trigger: one change-log row per changed row of TABLE.
    Add {
        /// `table` or `schema.table`.
        table: String,
        /// The entity name written as `object_type` (e.g. `Order`).
        #[arg(long)]
        entity: String,
        /// Column(s) identifying a row, when the table has no primary key (repeatable).
        #[arg(long = "id-column")]
        id_columns: Vec<String>,
        /// A uuid column to record as `tenant_id` (default: `tenant_id` when it is a uuid column).
        #[arg(long)]
        tenant_column: Option<String>,
    },
    /// List the tables with a capture trigger.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove the capture trigger from TABLE.
    Remove { table: String },
}

/// `migrate` options.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Also install the index template in the `[search]` cluster (backend `elasticsearch`).
    #[arg(long)]
    search: bool,
    /// Also create (or check) the NATS JetStream stream and the partition consumers of `[nats]`.
    #[arg(long)]
    nats: bool,
}

pub async fn migrate(config: Option<&Path>, args: MigrateArgs) -> Result<()> {
    let app = App::load(config)?;
    let mut client = app.connect().await?;
    schema::migrate(&mut client, &app.objects).await?;
    println!(
        "migrated {}: change log {}, tables {}, {}, {}, {}; notify channel `{}`",
        app.where_db(),
        app.objects.change_log,
        app.objects.checkpoints,
        app.objects.dead_letters,
        app.objects.action_log,
        app.objects.audit,
        app.objects.channel
    );
    if args.search {
        println!("{}", crate::ops::search::install_template(&app).await?);
    }
    if args.nats {
        println!("{}", migrate_nats(&app.config).await?);
    }
    Ok(())
}

/// `migrate --nats`: the stream and one consumer per partition, created or checked.
#[cfg(feature = "nats")]
async fn migrate_nats(cfg: &observer_core::config::Config) -> Result<String> {
    let n = &cfg.nats;
    let s = observer_features::nats::stream::ensure(n, true).await?;
    Ok(format!(
        "nats {}: stream `{}` {} (subjects `{}.>`, work-queue retention, file storage, max {} messages / {} bytes, duplicate window {} s); \
         {} partition consumers ({} created, {} checked: max_ack_pending 1, ack wait {} ms)",
        s.server,
        n.stream,
        if s.stream_created { "created" } else { "checked" },
        n.subject_prefix,
        n.max_messages,
        n.max_bytes,
        n.duplicate_window_secs,
        n.partitions,
        s.consumers_created,
        s.consumers_checked,
        n.backoff_ms.first().copied().unwrap_or(n.ack_wait_ms),
    ))
}

#[cfg(not(feature = "nats"))]
async fn migrate_nats(_cfg: &observer_core::config::Config) -> Result<String> {
    anyhow::bail!("--nats needs the `nats` layer, and this binary was built without it (cargo feature `nats`)")
}

pub async fn capture(config: Option<&Path>, cmd: CaptureCommand) -> Result<()> {
    let app = App::load(config)?;
    let mut client = app.connect().await?;
    match cmd {
        CaptureCommand::Add {
            table,
            entity,
            id_columns,
            tenant_column,
        } => {
            if entity.trim().is_empty() {
                anyhow::bail!("--entity must not be empty");
            }
            let c = schema::capture_add(
                &mut client,
                &app.objects,
                &table,
                &entity,
                &id_columns,
                tenant_column.as_deref(),
            )
            .await?;
            println!(
                "capturing {} as entity `{}` (object_id from {}{})",
                c.table,
                c.entity,
                c.id_columns.join(", "),
                c.tenant_column
                    .map(|t| format!(", tenant_id from {t}"))
                    .unwrap_or_default()
            );
        }
        CaptureCommand::List { json } => {
            let list = schema::capture_list(&client).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no table has a capture trigger");
            } else {
                println!(
                    "{:<40} {:<24} {:<24} TENANT",
                    "TABLE", "ENTITY", "ID COLUMNS"
                );
                for c in list {
                    println!(
                        "{:<40} {:<24} {:<24} {}",
                        c.table,
                        c.entity,
                        c.id_columns.join(","),
                        c.tenant_column.unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        CaptureCommand::Remove { table } => {
            if schema::capture_remove(&mut client, &table).await? {
                println!("removed the capture trigger from {table}");
            } else {
                anyhow::bail!("{table} has no capture trigger");
            }
        }
    }
    Ok(())
}
