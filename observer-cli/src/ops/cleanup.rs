//! `cleanup`: applies `[retention]` once (the daemon also does it every `interval_secs`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use observer_core::retention;

use super::{db_err, print_json, require_migrated};
use crate::app::App;

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Count what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Option<&Path>, a: CleanupArgs) -> Result<ExitCode> {
    let app = App::load(config)?;
    let client = app.connect().await?;
    require_migrated(&client, &app.objects).await?;
    let policy = &app.config.retention;
    let report = match retention::apply(&client, &app.objects, policy, true, a.dry_run).await {
        Ok(r) => r,
        Err(retention::RetentionError::Db(e)) => return Err(db_err(e)),
        Err(e) => return Err(e.into()),
    };
    if a.json {
        print_json(&report)?;
    } else {
        let verb = if a.dry_run { "would delete" } else { "deleted" };
        let days = |d: u32| {
            if d == 0 {
                "kept forever".to_string()
            } else {
                format!("older than {d} days")
            }
        };
        println!(
            "{verb} {} change-log rows ({})",
            report.change_log,
            days(policy.change_log_days)
        );
        if let Some(note) = &report.change_log_note {
            println!("  {note}");
        }
        println!(
            "{verb} {} action-log rows ({})",
            report.action_log,
            days(policy.action_log_days)
        );
        println!(
            "{verb} {} audit-trail rows ({}; none the search indexer has yet to index)",
            report.audit,
            days(policy.action_log_days)
        );
        println!(
            "{verb} {} resolved dead letters ({})",
            report.dead_letters,
            days(policy.dead_letter_days)
        );
    }
    Ok(ExitCode::SUCCESS)
}
