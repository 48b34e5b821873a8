//! `validate FILE`: loads a configuration as the daemon would and compiles every observer,
//! reporting every problem with its location. Touches no database.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use observer_core::config;
use observer_core::observer::{ConfigIssue, Observers};
use observer_core::schema::TableName;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The file to check.
    pub file: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ValidateArgs) -> Result<ExitCode> {
    let file = args.file.display().to_string();
    let mut issues: Vec<ConfigIssue> = Vec::new();
    let mut observers = 0;
    let mut actions = 0;
    let mut notes: Vec<String> = Vec::new();
    match config::load(Some(&args.file)) {
        Err(e) => issues.push(ConfigIssue {
            location: file.clone(),
            message: e.to_string(),
        }),
        Ok(cfg) => {
            if let Err(e) = TableName::parse(&cfg.change_log.table) {
                issues.push(ConfigIssue {
                    location: "change_log.table".into(),
                    message: e.to_string(),
                });
            }
            if let Err(e) = crate::stack::check_features(&cfg) {
                issues.push(ConfigIssue {
                    location: "features".into(),
                    message: e.to_string(),
                });
            }
            let inline = cfg.queued_but_inline();
            if !inline.is_empty() {
                notes.push(format!(
                    "features.queue is off: the actions of {} (which set `queue`) run inline, not as jobs",
                    inline.join(", ")
                ));
            }
            for (location, message) in cfg.check() {
                issues.push(ConfigIssue { location, message });
            }
            if cfg.observers.is_empty() {
                issues.push(ConfigIssue {
                    location: "observers".into(),
                    message: "no observer is configured".into(),
                });
            }
            match Observers::compile(&cfg) {
                Ok(o) => {
                    observers = o.list.len();
                    actions = o.list.iter().map(|o| o.actions.len()).sum();
                }
                Err(mut e) => issues.append(&mut e),
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"file": file, "valid": issues.is_empty(), "observers": observers, "actions": actions, "errors": issues, "notes": notes})
        );
    } else if issues.is_empty() {
        for n in &notes {
            println!("{file}: note: {n}");
        }
        println!("{file}: valid ({observers} enabled observer(s), {actions} action(s))");
    } else {
        for i in &issues {
            println!("{file}: {i}");
        }
        println!("{file}: {} error(s)", issues.len());
    }
    Ok(if issues.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
