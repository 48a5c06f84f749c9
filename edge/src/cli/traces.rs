//! `follower traces list`: installed traces with their statistics on this device.

use anyhow::Result;
use clap::Subcommand;
use follower::store::Store;
use std::path::Path;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum TracesCommand {
    /// List installed traces.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn command(state_dir: &Path, cmd: TracesCommand) -> Result<ExitCode> {
    let TracesCommand::List { json } = cmd;
    let store = Store::open(state_dir)?;
    let rows = store.installed_traces()?;
    let mut listed = Vec::new();
    for (id, version, _) in &rows {
        let (stats, last_used) = store.stats(id, &version.to_string())?;
        let fidelity = store.fidelity_of_version(id, &version.to_string())?;
        listed.push((id, version, stats, last_used, fidelity));
    }
    if json {
        let v: Vec<serde_json::Value> = listed
            .iter()
            .map(|(id, version, stats, last_used, fidelity)| {
                serde_json::json!({
                    "trace_id": id,
                    "version": version.to_string(),
                    "usage_count": stats.usage_count,
                    "success_rate": stats.success_rate(),
                    "confidence": stats.confidence,
                    "last_used": last_used,
                    "fidelity": fidelity,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (id, version, stats, _, fidelity) in listed {
            let judged: String = fidelity
                .iter()
                .map(|f| {
                    format!(
                        ", step {} fidelity {} with {}{}",
                        f.step,
                        f.short(),
                        f.model,
                        if f.passes() {
                            ""
                        } else {
                            " (below its minimum)"
                        }
                    )
                })
                .collect();
            println!(
                "{id} {version}  confidence {:.3}, {} run(s), success rate {:.2}{judged}",
                stats.confidence,
                stats.usage_count,
                stats.success_rate()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
