//! `follower traces list`: installed traces with their statistics on this device;
//! `follower traces fidelity`: this device's model on a trace's reference answers, measured
//! and stored before a run needs it.

use anyhow::Result;
use clap::Subcommand;
use follower::store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum TracesCommand {
    /// List installed traces.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure (and store) how this device's model answers each judgement step's reference
    /// examples — what a run otherwise measures before the step. The agent runs it after it
    /// installs a pushed trace. Known figures are shown, not measured again. Exit 0 when
    /// measured, also when a step falls below its minimum (its runs will escalate there).
    Fidelity {
        /// An installed trace id or a signed trace file.
        trace: PathBuf,
        /// Model and inference options as for `follower run` (`--json` prints JSON).
        #[command(flatten)]
        exec: Box<super::run::ExecArgs>,
    },
}

pub fn command(state_dir: &Path, cmd: TracesCommand) -> Result<ExitCode> {
    let json = match cmd {
        TracesCommand::List { json } => json,
        TracesCommand::Fidelity { trace, exec } => return fidelity(state_dir, &trace, &exec),
    };
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

fn fidelity(state_dir: &Path, trace: &Path, exec: &super::run::ExecArgs) -> Result<ExitCode> {
    let measured = follower::runner::measure_fidelity(state_dir, trace, &exec.options())?;
    if exec.json() {
        println!("{}", serde_json::to_string_pretty(&measured)?);
        return Ok(ExitCode::SUCCESS);
    }
    if measured.is_empty() {
        println!(
            "{}: no judgement step with reference answers: nothing to measure",
            trace.display()
        );
    }
    for m in &measured {
        let f = &m.fidelity;
        println!(
            "step {}: {} agrees with {} of {} reference answers ({:.2}, minimum {:.2}){}{}",
            f.step,
            f.model,
            f.agreements,
            f.total,
            f.ratio(),
            f.min_fidelity,
            if f.passes() {
                ""
            } else {
                ": below its minimum, runs escalate before this step"
            },
            if m.measured { "" } else { " (known)" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
