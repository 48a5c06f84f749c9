//! `follower run` and `follower resume`: their arguments mapped onto the runner
//! ([`follower::runner`]), and the outcome printed — the report (JSON) or a summary, the
//! report file, the exit code (0 success, 1 the run executed and failed or stopped).

use anyhow::{Context, Result};
use clap::Args;
use follower::files::write_atomic;
use follower::infer::{GpuLayers, InferConfig, ResourcePolicy};
use follower::runner::{self, ExecOptions, Finished, RunRequest};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracefleet::report::{Report, RunStatus, StepStatus};

#[derive(Args)]
pub struct RunArgs {
    /// An installed trace id, or a signed trace file (from `learner sign`). A trace source
    /// (`.trace.md`) only with --allow-unsigned.
    #[arg(required_unless_present = "goal")]
    trace: Option<PathBuf>,
    /// Instead of naming a trace: pick the installed trace whose goal signature matches this
    /// text best, and run it only if it has earned autonomy (confidence ≥ 0.9, success rate >
    /// 0.85 on this device); otherwise say why and record an escalation.
    #[arg(long, conflicts_with = "trace", value_name = "TEXT")]
    goal: Option<String>,
    /// Set an input of the trace (repeatable).
    #[arg(long = "var", value_name = "KEY=VALUE", value_parser = parse_var)]
    vars: Vec<(String, String)>,
    /// The run's working directory: relative paths resolve here and writes stay inside.
    /// Default: <state-dir>/runs/<run-id>.
    #[arg(long, value_name = "DIR")]
    base_dir: Option<PathBuf>,
    /// Start a new run even if a crash left a run of this trace unfinished.
    #[arg(long)]
    fresh: bool,
    /// For trace authors: run a trace source or an unsigned compiled trace without verification.
    #[arg(long)]
    allow_unsigned: bool,
    /// The new run's id (a UUID; default: a fresh UUIDv7). The agent names the runs it starts,
    /// so that commands can address them.
    #[arg(long, value_name = "UUID", value_parser = parse_run_id)]
    run_id: Option<String>,
    #[command(flatten)]
    exec: ExecArgs,
}

fn parse_run_id(s: &str) -> Result<String, String> {
    uuid::Uuid::parse_str(s)
        .map(|u| u.hyphenated().to_string())
        .map_err(|e| format!("expected a UUID: {e}"))
}

/// How a run executes (for `run` and `resume`).
#[derive(Args)]
pub struct ExecArgs {
    /// Also write the report (JSON) to this file.
    #[arg(long, value_name = "REPORT.json")]
    output: Option<PathBuf>,
    /// Print the report (JSON) on stdout instead of a summary.
    #[arg(long)]
    json: bool,
    /// The GGUF model for LLM steps that name none (and for those naming its file stem);
    /// default: the models registered with `follower models add`.
    #[arg(long, env = "TRACEFLEET_MODEL", value_name = "FILE.gguf")]
    model: Option<PathBuf>,
    #[command(flatten)]
    infer: InferArgs,
    /// This device's id in reports (default: the id the agent enrolled it as, else the host
    /// name).
    #[arg(long, env = "TRACEFLEET_DEVICE_ID")]
    device_id: Option<tracefleet::ids::DeviceId>,
    /// Directories a trace may read outside its base directory (repeatable; default /var/log, /etc, /usr/share).
    #[arg(long = "read-root", value_name = "DIR")]
    read_roots: Vec<PathBuf>,
    /// Time limit for the whole run (e.g. `90s`, `10m`): no step starts after it and the
    /// running one is aborted; the run fails.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Memory cap of one step's processes together, in MiB, where a step cgroup can be made
    /// (default: half the device's memory).
    #[arg(long, value_name = "MIB", env = "TRACEFLEET_STEP_MEMORY_MIB", value_parser = clap::value_parser!(u64).range(1..))]
    step_memory_mib: Option<u64>,
    /// Process cap of one step (all its processes and threads), where a step cgroup can be
    /// made (default 512).
    #[arg(long, value_name = "N", env = "TRACEFLEET_STEP_PIDS", value_parser = clap::value_parser!(u64).range(1..))]
    step_pids: Option<u64>,
}

/// How models run (for `run`, `resume` and `models bench`).
#[derive(Args, Clone)]
pub struct InferArgs {
    /// CPU threads for inference (default: the physical cores).
    #[arg(long, env = "TRACEFLEET_THREADS")]
    threads: Option<u32>,
    /// Layers offloaded to the GPU: a number, or `auto` (as many as fit in --vram-fraction of
    /// the GPU's free memory; 0 without the `cuda` build or without a GPU).
    #[arg(long, env = "TRACEFLEET_GPU_LAYERS", default_value = "auto", value_parser = parse_gpu_layers)]
    gpu_layers: GpuLayersArg,
    /// Share of free GPU memory `--gpu-layers auto` may use.
    #[arg(long, default_value_t = 0.8, value_name = "0..1")]
    vram_fraction: f64,
    /// A model step waits while a thermal zone or GPU is hotter than this (°C).
    #[arg(
        long,
        env = "TRACEFLEET_MAX_TEMP",
        default_value_t = 85.0,
        value_name = "CELSIUS"
    )]
    max_temp: f64,
    /// A model step waits while loading the model would leave less RAM than this free (MiB).
    #[arg(
        long,
        env = "TRACEFLEET_RAM_RESERVE_MB",
        default_value_t = 64,
        value_name = "MIB"
    )]
    ram_reserve_mb: u64,
    /// How long a model step waits for RAM or temperature before it fails with the reason
    /// (its on_error policy then applies).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    defer_max: std::time::Duration,
    /// Unload a model idle this long (`0s`: keep it loaded for the whole run).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    model_idle: std::time::Duration,
    /// Items of a foreach LLM step (and of `eval`) decoded together as parallel sequences
    /// sharing their prompt prefix (default: 4 per core, 2 to 16; 1: one at a time).
    #[arg(long, env = "TRACEFLEET_PARALLEL", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=63))]
    parallel: Option<u32>,
    /// Tokens of the context kept per loaded model (its KV cache, shared by every parallel
    /// sequence, counted in the RAM estimate; grown when a request needs more).
    #[arg(long, default_value_t = follower::infer::DEFAULT_CTX_TOKENS, value_name = "TOKENS")]
    ctx_size: u32,
    /// A fresh context for every request: no prompt-prefix reuse and no batching (the
    /// behaviour before both, to measure against).
    #[arg(long)]
    no_prompt_cache: bool,
}

#[derive(Clone, Copy)]
enum GpuLayersArg {
    Auto,
    Fixed(u32),
}

fn parse_gpu_layers(s: &str) -> Result<GpuLayersArg, String> {
    if s == "auto" {
        return Ok(GpuLayersArg::Auto);
    }
    s.parse()
        .map(GpuLayersArg::Fixed)
        .map_err(|_| format!("expected `auto` or a number of layers, found {s:?}"))
}

impl InferArgs {
    pub fn config(&self) -> InferConfig {
        let defaults = InferConfig::default();
        InferConfig {
            n_threads: self.threads.map_or(defaults.n_threads, |t| t.max(1)),
            gpu_layers: match self.gpu_layers {
                GpuLayersArg::Auto => GpuLayers::Auto {
                    vram_fraction: self.vram_fraction,
                },
                GpuLayersArg::Fixed(n) => GpuLayers::Fixed(n),
            },
            idle_unload: (!self.model_idle.is_zero()).then_some(self.model_idle),
            limits: ResourcePolicy {
                ram_reserve_bytes: self.ram_reserve_mb.saturating_mul(1 << 20),
                max_temp_c: self.max_temp,
                defer_max: self.defer_max,
                ..ResourcePolicy::default()
            },
            prompt_cache: !self.no_prompt_cache,
            parallel: self.parallel.unwrap_or(defaults.parallel),
            ctx_tokens: self.ctx_size.max(256),
        }
    }
}

impl ExecArgs {
    /// Whether `--json` was given.
    pub(crate) fn json(&self) -> bool {
        self.json
    }

    pub(crate) fn options(&self) -> ExecOptions {
        ExecOptions {
            model: self.model.clone(),
            infer: self.infer.config(),
            device_id: self.device_id.clone(),
            read_roots: self.read_roots.clone(),
            timeout: self.timeout,
            step_memory_mib: self.step_memory_mib,
            step_pids: self.step_pids,
        }
    }
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, found {s:?}"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// `follower run`.
pub fn run(state_dir: &Path, args: RunArgs) -> Result<ExitCode> {
    let opts = args.exec.options();
    let req = RunRequest {
        trace: args.trace,
        goal: args.goal,
        vars: args.vars,
        base_dir: args.base_dir,
        fresh: args.fresh,
        allow_unsigned: args.allow_unsigned,
        run_id: args.run_id,
    };
    let prepared = runner::prepare(state_dir, req, &mut |notice| eprintln!("{notice}"))?;
    let finished = runner::execute(state_dir, prepared, &opts)?;
    finish(&finished, &args.exec)
}

/// `follower resume RUN_ID`.
pub fn resume(
    state_dir: &Path,
    run_id: &str,
    args: &ExecArgs,
    allow_unsigned: bool,
) -> Result<ExitCode> {
    let prepared = runner::prepare_resume(state_dir, run_id, allow_unsigned)?;
    let finished = runner::execute(state_dir, prepared, &args.options())?;
    finish(&finished, args)
}

/// Writes and prints the report; the exit code of its status.
fn finish(finished: &Finished, args: &ExecArgs) -> Result<ExitCode> {
    let report = &finished.report;
    let json = serde_json::to_string_pretty(report)?;
    if let Some(out) = &args.output {
        write_atomic(out, json.as_bytes())
            .with_context(|| format!("writing the report to {}", out.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_summary(report, &finished.provenance, args.output.as_deref());
    }
    Ok(match report.status {
        RunStatus::Success => ExitCode::SUCCESS,
        RunStatus::Failed | RunStatus::Stopped => ExitCode::from(1),
    })
}

fn print_summary(r: &Report, provenance: &str, output: Option<&Path>) {
    let status = match r.status {
        RunStatus::Success => "SUCCESS",
        RunStatus::Failed => "FAILED",
        RunStatus::Stopped => "STOPPED (resume with `follower resume RUN_ID`)",
    };
    println!("trace {} {} ({provenance})", r.trace_id, r.trace_version);
    println!(
        "run {} on {}: {status}, {}/{} steps in {:.2} s",
        r.run_id, r.device_id, r.completed_steps, r.total_steps, r.execution_time_secs
    );
    for c in r.preconditions.iter().filter(|c| !c.passed) {
        println!("  precondition failed: {} — {}", c.check, c.detail);
    }
    for s in &r.step_results {
        let st = match s.status {
            StepStatus::Success => "ok",
            StepStatus::Failed => "FAILED",
            StepStatus::Skipped => "skipped",
            StepStatus::NotRun => "not run",
            StepStatus::Recovered => "recovered by its fallback",
        };
        let mut line = format!("  step {} [{}] {}: {st}", s.step, s.tool, s.title);
        if let Some(n) = s.items {
            line.push_str(&format!(" ({n} items)"));
        }
        if s.attempts > 1 {
            line.push_str(&format!(" after {} attempts", s.attempts));
        }
        if let Some(l) = &s.llm {
            line.push_str(&format!(
                " — {} prompt + {} generated tokens, {:.0} tok/s prompt, {:.0} tok/s generation ({})",
                l.prompt_tokens, l.completion_tokens, l.prompt_tokens_per_sec, l.generation_tokens_per_sec, l.model
            ));
        }
        println!("{line}");
        if let Some(e) = &s.error {
            println!("      {e}");
        }
    }
    for e in &r.escalations {
        println!(
            "  escalation from step {}: {} ({})",
            e.step, e.message, e.error
        );
    }
    for c in r.postconditions.iter().filter(|c| !c.passed) {
        println!("  postcondition failed: {} — {}", c.check, c.detail);
    }
    if let Some(e) = &r.error {
        println!("error: {e}");
    }
    if let Some(o) = output {
        println!("report: {}", o.display());
    }
}
