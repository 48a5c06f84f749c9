//! `follower runs list|show`: recorded runs, and a run's report (or, for an unfinished run,
//! what its journal knows).

use anyhow::{Result, bail};
use clap::Subcommand;
use follower::store::Store;
use std::path::Path;
use std::process::ExitCode;
use tracefleet::report::StepStatus;

#[derive(Subcommand)]
pub enum RunsCommand {
    /// List recent runs, newest first.
    List {
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Print the report of a run (JSON).
    Show {
        /// The run id.
        run_id: String,
    },
}

pub fn command(state_dir: &Path, cmd: RunsCommand) -> Result<ExitCode> {
    match cmd {
        RunsCommand::List { limit } => {
            let store = Store::open(state_dir)?;
            for r in store.runs(limit)? {
                println!(
                    "{}  {:<8} {} {}  {}",
                    r.run_id, r.status, r.trace_id, r.trace_version, r.started_at
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Show { run_id } => {
            let id: tracefleet::ids::RunId = run_id.parse()?;
            let store = Store::open(state_dir)?;
            match store.report_json(id.as_str())? {
                None => bail!("no run {id} in {}", state_dir.display()),
                Some(None) => {
                    // Left `running`: print what the journal knows.
                    println!(
                        "run {id} has not finished: the follower was killed or is still running it (`follower resume {id}` continues it)"
                    );
                    if let Some(u) = store.unfinished(id.as_str())? {
                        for (n, c) in &u.done {
                            let status = match c.result.status {
                                StepStatus::NotRun => "started, not finished".to_owned(),
                                other => serde_json::to_value(other)?
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned(),
                            };
                            println!("  step {n}: {status}");
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Some(Some(json)) => {
                    let v: serde_json::Value = serde_json::from_str(&json)?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}
