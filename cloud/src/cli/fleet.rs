//! The listings: `fleet` (device × installed trace), `devices list`, `runs list`, `memory
//! export|query` and `costs` — what the learner's database holds, printed as text or JSON.

use super::{ListArgs, open, print_json, shown};
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DevicesCommand {
    /// One line per device: id, online, last seen, follower version, runs reported.
    List(ListArgs),
}

#[derive(Subcommand)]
pub enum MemoryCommand {
    /// Write the experiences as LLMunix's `memory_log.md` (SmartMemory: YAML frontmatter and
    /// learnings per experience).
    Export {
        /// Where to write it (`-`: standard output).
        #[arg(short, long, default_value = "memory_log.md")]
        output: PathBuf,
        #[command(flatten)]
        filter: MemoryFilter,
        /// The learner's config.
        #[arg(long, value_name = "learner.toml")]
        config: PathBuf,
    },
    /// List experiences, oldest first.
    Query {
        #[command(flatten)]
        filter: MemoryFilter,
        /// At most this many, the newest.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        list: ListArgs,
    },
}

/// Which experiences.
#[derive(clap::Args)]
pub struct MemoryFilter {
    /// `success`, `success_with_recovery`, `failure`, `stopped`, `regenerated`, `gave_up`,
    /// `backend_error`, `skipped`.
    #[arg(long)]
    outcome: Option<String>,
    /// The trace's metadata.task_type.
    #[arg(long)]
    task_type: Option<String>,
    /// A tag every experience must carry (repeatable): task type, domain, `risk:LEVEL`,
    /// trace id, `escalated`, `regeneration`.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// One trace.
    #[arg(long)]
    trace: Option<String>,
    /// Goals similar to this.
    #[arg(long)]
    goal: Option<String>,
}

impl MemoryFilter {
    fn filter(self) -> learner::memory::Filter {
        learner::memory::Filter {
            outcome: self.outcome,
            task_type: self.task_type,
            tags: self.tags,
            trace_id: self.trace,
            goal: self.goal,
        }
    }
}

#[derive(Subcommand)]
pub enum RunsCommand {
    /// Reported runs (oldest first), then per-version statistics, escalations, and the
    /// messages ingest refused (too large, malformed …), counted per device.
    List(ListArgs),
}

/// `learner memory export|query`.
pub fn memory(command: MemoryCommand) -> Result<()> {
    match command {
        MemoryCommand::Export {
            output,
            filter,
            config,
        } => {
            let (_, db) = open(&config)?;
            let filter = filter.filter();
            let selected: Vec<_> = learner::memory::experiences(&db)?
                .into_iter()
                .filter(|e| filter.matches(e))
                .collect();
            let text = learner::memory::render_memory_log(&selected);
            if output.as_os_str() == "-" {
                print!("{text}");
            } else {
                std::fs::write(&output, text)
                    .with_context(|| format!("writing {}", output.display()))?;
                println!("{} experience(s) → {}", selected.len(), output.display());
            }
            Ok(())
        }
        MemoryCommand::Query {
            filter,
            limit,
            list: ListArgs { config, json },
        } => {
            let (_, db) = open(&config)?;
            let filter = filter.filter();
            let mut selected: Vec<_> = learner::memory::experiences(&db)?
                .into_iter()
                .filter(|e| filter.matches(e))
                .collect();
            if let Some(n) = limit {
                selected.drain(..selected.len().saturating_sub(n));
            }
            if json {
                print_json(&selected)?;
            } else {
                for e in selected {
                    println!(
                        "{}\t{}\t{}\t{} {}\t{}\t{:.1}s\t${:.4}\t{}",
                        e.timestamp,
                        e.experience_id,
                        e.final_outcome,
                        e.trace_id,
                        e.trace_version.as_deref().unwrap_or("-"),
                        e.device_id.as_deref().unwrap_or("learner"),
                        e.execution_time_secs,
                        e.estimated_cost,
                        e.learnings
                    );
                }
            }
            Ok(())
        }
    }
}

/// `learner costs`.
pub fn costs(ListArgs { config, json }: ListArgs) -> Result<()> {
    let (_, db) = open(&config)?;
    let costs = learner::memory::costs(&db)?;
    if json {
        print_json(&costs)?;
    } else {
        let secs = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.1}s"));
        for c in costs {
            println!(
                "{}: learner {} version(s) in {} attempt(s), {}+{} tokens, ${:.4}, median {} — devices {} runs ({} ok), median {}, {} on-device tokens, no API fees{}{}",
                c.trace_id,
                c.regenerations,
                c.attempts,
                c.learner_input_tokens,
                c.learner_output_tokens,
                c.learner_cost,
                secs(c.learner_median_secs),
                c.runs,
                c.successes,
                secs(c.run_median_secs),
                c.run_tokens,
                c.learner_cost_per_run.map_or(String::new(), |d| format!(
                    "; learning spread over the runs: ${d:.4}/run"
                )),
                c.speed_comparison()
                    .map_or(String::new(), |x| format!("; {x}"))
            );
        }
    }
    Ok(())
}

/// `learner fleet`.
pub fn fleet(ListArgs { config, json }: ListArgs) -> Result<()> {
    let (_, db) = open(&config)?;
    let rows = db.fleet_table()?;
    let fidelity = db.fidelity()?;
    // The device's worst judgement step on the version it runs: "agreements/total".
    let worst = |device: &str, trace: Option<&str>, version: Option<&str>| {
        fidelity
            .iter()
            .filter(|f| {
                f.device_id == device
                    && Some(f.trace_id.as_str()) == trace
                    && Some(f.version.as_str()) == version
            })
            .min_by(|a, b| a.ratio().total_cmp(&b.ratio()))
    };
    if json {
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut v = serde_json::to_value(r)?;
            let f = worst(&r.device_id, r.trace_id.as_deref(), r.version.as_deref());
            v["fidelity"] = serde_json::to_value(f)?;
            out.push(v);
        }
        print_json(&out)?;
    } else {
        println!(
            "{:<16} {:<8} {:<28} {:<9} {:>5} {:>6} {:<8} {:>10} {:>9}",
            "DEVICE",
            "STATUS",
            "TRACE",
            "VERSION",
            "RUNS",
            "FAILED",
            "LAST",
            "CONFIDENCE",
            "FIDELITY"
        );
        for r in rows {
            let f = worst(&r.device_id, r.trace_id.as_deref(), r.version.as_deref()).map_or_else(
                || "-".into(),
                |f| {
                    format!(
                        "{}/{}{}",
                        f.agreements,
                        f.total,
                        if f.passes() { "" } else { " LOW" }
                    )
                },
            );
            println!(
                "{:<16} {:<8} {:<28} {:<9} {:>5} {:>6} {:<8} {:>10} {:>9}",
                r.device_id,
                if r.online { "online" } else { "offline" },
                r.trace_id.as_deref().unwrap_or("-"),
                r.version.as_deref().unwrap_or("-"),
                r.runs,
                r.runs - r.successes,
                r.last_status.as_deref().unwrap_or("-"),
                r.confidence.map_or("-".into(), |c| format!("{c:.3}")),
                f
            );
        }
    }
    Ok(())
}

/// `learner devices list`.
pub fn devices(DevicesCommand::List(ListArgs { config, json }): DevicesCommand) -> Result<()> {
    let (_, db) = open(&config)?;
    let devices = db.devices()?;
    if json {
        print_json(&devices)?;
    } else {
        for d in devices {
            println!(
                "{}\t{}\tlast seen {}\t{}\t{} runs\t{}",
                d.device_id,
                if d.online { "online" } else { "offline" },
                tracefleet::time::rfc3339(u64::try_from(d.last_seen).unwrap_or(0)),
                d.follower_version.as_deref().unwrap_or("-"),
                d.runs,
                d.recipient.as_deref().unwrap_or("no identity yet")
            );
        }
    }
    Ok(())
}

/// `learner runs list`.
pub fn runs(RunsCommand::List(ListArgs { config, json }): RunsCommand) -> Result<()> {
    let (_, db) = open(&config)?;
    let runs = db.runs()?;
    let stats = db.trace_stats()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"runs": runs, "trace_stats": stats, "acks": db.acks()?, "escalations": db.escalations()?, "regenerations": db.regenerations()?, "refused": db.refused_messages()?, "fidelity": db.fidelity()?})
            )?
        );
    } else {
        for r in runs {
            println!(
                "{}\t{}\t{} {}\t{}{}",
                shown(&r.run_id),
                shown(&r.device_id),
                shown(r.trace_id.as_str()),
                shown(&r.trace_version),
                r.status,
                if r.counted {
                    ""
                } else {
                    " (not counted: the device had not acked or listed this version)"
                }
            );
        }
        for s in stats {
            println!(
                "{} {}: {} runs, {} successful, confidence {:.3}",
                s.trace_id, s.version, s.runs, s.successes, s.confidence
            );
        }
        for e in db.escalations()? {
            println!(
                "escalation from {} ({}): {}",
                shown(&e.device_id),
                shown(&e.trace_id),
                shown(&e.reason)
            );
        }
        for r in db.refused_messages()? {
            println!(
                "refused from {}: {} {} message(s), the last on {}: {}",
                shown(&r.device_id),
                r.count,
                r.kind,
                shown(&r.last_topic),
                shown(&r.last_detail)
            );
        }
    }
    Ok(())
}
