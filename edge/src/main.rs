//! The `follower` binary: command-line front end over the `follower` library.
//!
//! Exit codes: 0 success; 1 a run that executed and failed; 2 bad input, refused
//! verification or a usage error.

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use follower::exec::{self, Event, RunContext};
use follower::host::{DEFAULT_READ_ROOTS, LocalHost, Stopper};
use follower::infer::{BenchParams, GpuLayers, InferConfig, Inference, ModelSpec, ResourcePolicy};
use follower::sandbox::{self, ResourceLimits};
use follower::store::{NewRun, Store};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};
use tracefleet::report::{Protection, Report, RunStatus, StepStatus};
use tracefleet::signed::{self, SIGNED_MAGIC};
use tracefleet::trust;
use tracefleet::{Trace, compile};

/// The examples under `follower --help`; tests parse them and run them in order
/// (`tests/newcomer.rs`), after the learner's.
const AFTER_HELP: &str = "On a device:
  follower trust init root-v1.tfr          # provision the fleet's trust root, once
  follower install my.tfs                  # verify and install a signed trace
  follower inspect my.tfs                  # what a signed trace holds
  follower run my-trace --output report.json   # run an installed trace by its id
  follower runs list

Exit codes: 0 the run succeeded; 1 the run executed and failed; 2 bad input, refused
verification or a usage error (nothing ran).";

/// Verify and execute signed traces on this device, offline.
#[derive(Parser)]
#[command(
    name = "follower",
    version,
    about,
    long_about = None,
    after_help = AFTER_HELP
)]
struct Cli {
    /// Where the follower keeps its state (trusted keys, runs).
    /// Default: /var/lib/tracefleet as root, else $XDG_STATE_HOME/tracefleet or ~/.local/state/tracefleet.
    #[arg(long, global = true, env = "TRACEFLEET_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage this device's trust root (the keys it trusts to sign traces and commands).
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Show what a trace file holds: signed trace, compiled trace or trace source.
    Inspect {
        /// The file.
        file: PathBuf,
        /// Print the trace as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify and install a signed trace or a bundle (versions never go backwards; a bundle
    /// installs whole or not at all).
    Install {
        /// A signed trace (`.tfs`) or a bundle (`.tfb`, from `learner bundle create`).
        file: PathBuf,
    },
    /// Installed traces.
    #[command(subcommand)]
    Traces(TracesCommand),
    /// Verify and run a signed trace (an installed trace id or a signed file). A run of the
    /// same trace version with the same inputs that a crash left unfinished is resumed instead
    /// (--fresh starts a new one). SIGINT/SIGTERM: stop after the current step (a second one
    /// aborts the step); a stopped run can be resumed.
    Run(RunArgs),
    /// Continue a stopped or interrupted run from its last completed step (completed steps
    /// are not run again).
    Resume {
        /// The run id (see `follower runs list`).
        run_id: String,
        #[command(flatten)]
        exec: ExecArgs,
        /// Needed again when the run was of an unsigned trace.
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Join the fleet: stay connected to the MQTT broker, install pushed traces, run traces on
    /// signed commands and on the config's schedule, send every run's report (from an outbox
    /// that survives restarts), heartbeats and escalations. Stops on SIGTERM/SIGINT after
    /// stopping its runs.
    Agent {
        /// The agent's TOML config (device_id, groups, [broker], heartbeat_secs, run_args,
        /// [[schedule]]); TRACEFLEET_DEVICE_ID and TRACEFLEET_MQTT_* override it.
        #[arg(long, value_name = "follower.toml")]
        config: PathBuf,
    },
    /// Inspect recorded runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Check the device store: SQLite integrity, and every installed trace still verifies.
    Check,
    /// Escalations recorded on this device (for the fleet link to send), oldest first.
    Escalations,
    /// The device's GGUF models: register, list, verify, remove, benchmark.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// What this device has now: memory, load, CPUs, temperatures, GPUs (through NVML).
    Telemetry {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Provision this device with its first trust root (a `.tfr` file from `learner trust
    /// create`); it must be signed by a threshold of its own root keys.
    Init {
        /// The trust-root file.
        root: PathBuf,
    },
    /// Rotate to newer trust roots, given in version order; each must be signed by a threshold
    /// of the previous root's keys and of its own.
    Update {
        /// Trust-root files, oldest first.
        #[arg(required = true)]
        roots: Vec<PathBuf>,
    },
    /// Show the trust root: version, expiry, keys and thresholds per role.
    Show,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Registered models: name, architecture, quantization, size, context, RAM needed.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a GGUF file (complete, every tensor inside it; hash against the manifest or
    /// --sha256) and register it: hard-linked, else copied, into <state-dir>/models/.
    Add {
        /// The GGUF file.
        file: PathBuf,
        /// Register under this name (default: the manifest's name for the file, else the file
        /// name without `.gguf`).
        #[arg(long)]
        name: Option<String>,
        /// The SHA-256 the file must have (hex).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// A model manifest (`models/models.toml`): the file must match its entry.
        #[arg(long, value_name = "models.toml")]
        manifest: Option<PathBuf>,
    },
    /// Hash registered models again (all, or those named); exit 1 if one differs or is broken.
    Verify {
        /// Model names.
        names: Vec<String>,
    },
    /// Unregister a model and delete its file.
    Remove {
        /// The model name.
        name: String,
    },
    /// Measure prompt processing and generation speed the way llama.cpp's `llama-bench` does
    /// (random tokens, a warm-up, mean ± sd of the repetitions).
    Bench {
        /// A registered model (default: the only one).
        name: Option<String>,
        /// A GGUF file instead of a registered model.
        #[arg(long, conflicts_with = "name", value_name = "FILE.gguf")]
        model: Option<PathBuf>,
        /// Prompt tokens (llama-bench -p).
        #[arg(short = 'p', long, default_value_t = 512)]
        n_prompt: u32,
        /// Generated tokens (llama-bench -n).
        #[arg(short = 'n', long, default_value_t = 128)]
        n_gen: u32,
        /// Repetitions (llama-bench -r).
        #[arg(short = 'r', long, default_value_t = 5)]
        repetitions: u32,
        /// Print JSON (every repetition's figures).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        infer: InferArgs,
    },
}

#[derive(Subcommand)]
enum TracesCommand {
    /// List installed traces.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
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

#[derive(Args)]
struct RunArgs {
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
struct ExecArgs {
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
    device_id: Option<String>,
    /// Directories a trace may read outside its base directory (repeatable; default /var/log, /etc, /usr/share).
    #[arg(long = "read-root", value_name = "DIR")]
    read_roots: Vec<PathBuf>,
    /// Time limit for the whole run (e.g. `90s`, `10m`): no step starts after it and the
    /// running one is aborted; the run fails.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
}

/// How models run (for `run`, `resume` and `models bench`).
#[derive(Args, Clone)]
struct InferArgs {
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
    fn config(&self) -> InferConfig {
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
        }
    }
}

/// The models a run's LLM steps use, each checked before llama.cpp sees it, and the default
/// for steps that name none. `--model FILE` is the default (named by its file stem); other
/// names come from the device's registry, whose files are hashed again when they changed since
/// they were last verified.
fn run_models(
    store: &Store,
    state_dir: &Path,
    trace: &Trace,
    model_file: Option<&Path>,
) -> Result<(Vec<ModelSpec>, Option<String>)> {
    let mut specs: Vec<ModelSpec> = Vec::new();
    let mut default = None;
    if let Some(file) = model_file {
        let name = follower::infer::model_name_of(file);
        specs.push(ModelSpec::from_file(&name, file)?);
        default = Some(name);
    }
    let now = now_rfc3339();
    let add_registered =
        |row: follower::store::ModelRow, specs: &mut Vec<ModelSpec>| -> Result<String> {
            if !specs.iter().any(|s| s.name == row.name) {
                specs.push(registered_spec(store, state_dir, &row, &now)?);
            }
            Ok(row.name)
        };
    for step in trace.llm_steps() {
        let tracefleet::trace::Tool::Llm(call) = &step.tool else {
            continue;
        };
        let found = match &call.model {
            Some(name) if specs.iter().any(|s| &s.name == name) => Ok(()),
            Some(name) => follower::models::find(store, name)
                .map_err(anyhow::Error::from)
                .and_then(|row| add_registered(row, &mut specs).map(|_| ())),
            None if default.is_some() => Ok(()),
            None => follower::models::only(store)
                .map_err(anyhow::Error::from)
                .and_then(|row| add_registered(row, &mut specs))
                .map(|name| default = Some(name)),
        };
        found.with_context(|| {
            format!(
                "trace {} step {} needs a model (pass --model FILE.gguf, set TRACEFLEET_MODEL, or register one with `follower models add`)",
                trace.id, step.number
            )
        })?;
    }
    Ok((specs, default))
}

/// A registered model checked for use ([`follower::models::verify`]: header, and the hash when
/// the file changed), described by the header that check read.
fn registered_spec(
    store: &Store,
    state_dir: &Path,
    row: &follower::store::ModelRow,
    now: &str,
) -> Result<ModelSpec> {
    let (path, info, _) = follower::models::verify(store, state_dir, row, false, now)?;
    Ok(ModelSpec {
        name: row.name.clone(),
        path,
        info,
        size: row.size,
    })
}

fn models_command(state_dir: &Path, cmd: ModelsCommand) -> Result<ExitCode> {
    use follower::models;
    let store = Store::open(state_dir)?;
    match cmd {
        ModelsCommand::List { json } => {
            let rows = store.models()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no models registered (add one with `follower models add FILE.gguf`)");
            } else {
                println!(
                    "{:<32} {:<8} {:<10} {:>9} {:>8} {:>9}  sha256",
                    "name", "arch", "quant", "size MiB", "context", "RAM MiB"
                );
                for m in rows {
                    println!(
                        "{:<32} {:<8} {:<10} {:>9} {:>8} {:>9}  {}",
                        m.name,
                        m.architecture,
                        m.quantization,
                        m.size >> 20,
                        m.context_length,
                        m.ram_needed_bytes >> 20,
                        &m.sha256[..m.sha256.len().min(16)]
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Add {
            file,
            name,
            sha256,
            manifest,
        } => {
            let row = models::add(
                &store,
                state_dir,
                &file,
                &models::AddOptions {
                    name,
                    sha256,
                    manifest,
                },
                &now_rfc3339(),
            )?;
            println!(
                "added model {} ({} {}, {} MiB, context {}, needs ~{} MiB RAM) sha256 {}",
                row.name,
                row.architecture,
                row.quantization,
                row.size >> 20,
                row.context_length,
                row.ram_needed_bytes >> 20,
                row.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Verify { names } => {
            let rows = store.models()?;
            let picked: Vec<_> = if names.is_empty() {
                rows
            } else {
                names
                    .iter()
                    .map(|n| models::find(&store, n))
                    .collect::<Result<_, _>>()?
            };
            let mut bad = 0;
            for row in &picked {
                match models::verify(&store, state_dir, row, true, &now_rfc3339()) {
                    Ok(_) => println!("ok      {}  sha256 {}", row.name, row.sha256),
                    Err(e) => {
                        bad += 1;
                        println!("FAILED  {}  {e}", row.name);
                    }
                }
            }
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ModelsCommand::Remove { name } => {
            let row = models::find(&store, &name)?;
            store.remove_model(&name)?;
            let still_used = store.models()?.iter().any(|m| m.file == row.file);
            if !still_used {
                let path = models::models_dir(state_dir).join(&row.file);
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    bail!(
                        "model {name} unregistered, but {} stays: {e}",
                        path.display()
                    );
                }
            }
            println!("removed model {name}");
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Bench {
            name,
            model,
            n_prompt,
            n_gen,
            repetitions,
            json,
            infer,
        } => {
            let spec = match (&model, &name) {
                (Some(file), _) => {
                    ModelSpec::from_file(&follower::infer::model_name_of(file), file)?
                }
                (None, n) => {
                    let row = match n {
                        Some(n) => models::find(&store, n)?,
                        None => models::only(&store)?,
                    };
                    registered_spec(&store, state_dir, &row, &now_rfc3339())?
                }
            };
            drop(store);
            let name = spec.name.clone();
            let inference = Inference::start(infer.config(), vec![spec], Some(name.clone()))?;
            let report = inference.bench(
                Some(&name),
                BenchParams {
                    n_prompt,
                    n_gen,
                    repetitions: repetitions.max(1),
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let line = |test: String, v: &[f64]| {
                    let (mean, sd) = mean_sd(v);
                    println!(
                        "{:<32} {:>7} {:>4} {:>10} {:>10.2} ± {:.2}",
                        report.model, report.n_threads, report.n_gpu_layers, test, mean, sd
                    );
                };
                println!(
                    "{:<32} {:>7} {:>4} {:>10} {:>17}",
                    "model", "threads", "ngl", "test", "tokens/s"
                );
                if n_prompt > 0 {
                    line(format!("pp{n_prompt}"), &report.prompt_tokens_per_sec);
                }
                if n_gen > 0 {
                    line(format!("tg{n_gen}"), &report.generation_tokens_per_sec);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Mean and sample standard deviation.
fn mean_sd(v: &[f64]) -> (f64, f64) {
    #[allow(clippy::cast_precision_loss)]
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, found {s:?}"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Restores the default SIGPIPE action so that a listing piped into `head` ends quietly
/// instead of panicking on a closed stdout (Rust ignores SIGPIPE by default). Not for
/// `agent`, `run` (WebFetch, MQTT) and `resume`: they write to sockets, and a peer that goes away (a broker restart) must be an
/// error they handle, not a signal that kills them without a word. (Child processes get the
/// default action back from std's spawn either way.)
#[allow(unsafe_code)]
fn default_sigpipe() {
    // SAFETY: called in `main` before any thread exists; SIG_DFL installs no handler code.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Agent { .. } | Command::Run(_) | Command::Resume { .. }
    ) {
        default_sigpipe();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/tracefleet");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("tracefleet");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/state/tracefleet")
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let state_dir = cli.state_dir.unwrap_or_else(default_state_dir);
    match cli.command {
        Command::Trust(TrustCommand::Init { root }) => {
            let bytes = read_limited(&root, trust::MAX_ROOT_BYTES as u64)?;
            let mut store = Store::open(&state_dir)?;
            if let Some((current, _)) = store.trust_root()? {
                bail!(
                    "this device is already provisioned with trust root v{}: use `follower trust update` to rotate",
                    current.version
                );
            }
            let accepted = trust::verify_initial(&bytes, unix_now())
                .with_context(|| format!("refusing {}", root.display()))?;
            store.add_trust_roots(None, &[(accepted.version, &bytes)], &now_rfc3339())?;
            println!("trust root v{} installed", accepted.version);
            print_root(&accepted);
            Ok(ExitCode::SUCCESS)
        }
        Command::Trust(TrustCommand::Update { roots }) => {
            let mut store = Store::open(&state_dir)?;
            let (current, _) = store.trust_root()?.ok_or_else(|| {
                anyhow!("this device has no trust root yet: run `follower trust init ROOT`")
            })?;
            let files: Vec<Vec<u8>> = roots
                .iter()
                .map(|r| read_limited(r, trust::MAX_ROOT_BYTES as u64))
                .collect::<Result<_>>()?;
            let slices: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
            let chain = trust::verify_chain(&current, &slices, unix_now())
                .context("refusing the trust-root update")?;
            let rows: Vec<(u32, &[u8])> = chain.iter().map(|(r, b)| (r.version, *b)).collect();
            store.add_trust_roots(Some(current.version), &rows, &now_rfc3339())?;
            if let Some((newest, _)) = chain.last() {
                println!("trust root v{} → v{}", current.version, newest.version);
                print_root(newest);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Trust(TrustCommand::Show) => {
            let store = Store::open(&state_dir)?;
            match store.trust_root()? {
                None => println!("no trust root (run `follower trust init ROOT.tfr`)"),
                Some((root, _)) => {
                    println!("trust root v{}", root.version);
                    print_root(&root);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Install { file } => install(&state_dir, &file),
        Command::Agent { config } => {
            let config = follower::agent::AgentConfig::load(&config)?;
            follower::agent::run(config, &state_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Escalations => {
            let store = Store::open(&state_dir)?;
            for (trace_id, reason) in store.escalations()? {
                println!("{trace_id}: {reason}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let store = Store::open(&state_dir)?;
            let integrity = store.integrity_check()?;
            let mut problems = Vec::new();
            if integrity != "ok" {
                problems.push(format!("SQLite integrity check: {integrity}"));
            }
            let root = store.trust_root()?;
            let traces = store.installed_traces()?;
            for (id, version, bytes) in &traces {
                match &root {
                    None => problems.push(format!(
                        "{id} {version} is installed but there is no trust root"
                    )),
                    Some((r, _)) => match signed::verify_with_root(bytes, r, unix_now()) {
                        Ok(v) if v.trace.id.as_str() == id && v.trace.version == *version => {}
                        Ok(v) => problems.push(format!(
                            "{id} {version}: stored bytes hold {} {}",
                            v.trace.id, v.trace.version
                        )),
                        Err(e) => problems.push(format!("{id} {version}: {e}")),
                    },
                }
            }
            if problems.is_empty() {
                println!(
                    "ok: integrity ok, trust root {}, {} installed trace(s) verify",
                    root.map_or("none".into(), |(r, _)| format!("v{}", r.version)),
                    traces.len()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &problems {
                    println!("problem: {p}");
                }
                Ok(ExitCode::from(1))
            }
        }
        Command::Traces(TracesCommand::List { json }) => {
            let store = Store::open(&state_dir)?;
            let rows = store.installed_traces()?;
            let mut listed = Vec::new();
            for (id, version, _) in &rows {
                let (stats, last_used) = store.stats(id, &version.to_string())?;
                listed.push((id, version, stats, last_used));
            }
            if json {
                let v: Vec<serde_json::Value> = listed
                    .iter()
                    .map(|(id, version, stats, last_used)| {
                        serde_json::json!({
                            "trace_id": id,
                            "version": version.to_string(),
                            "usage_count": stats.usage_count,
                            "success_rate": stats.success_rate(),
                            "confidence": stats.confidence,
                            "last_used": last_used,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (id, version, stats, _) in listed {
                    println!(
                        "{id} {version}  confidence {:.3}, {} run(s), success rate {:.2}",
                        stats.confidence,
                        stats.usage_count,
                        stats.success_rate()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { file, json } => inspect(&file, json),
        Command::Models(cmd) => models_command(&state_dir, cmd),
        Command::Run(args) => run(&state_dir, args),
        Command::Telemetry { json } => {
            let t = follower::telemetry::sample();
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print_telemetry(&t);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume {
            run_id,
            exec,
            allow_unsigned,
        } => resume(&state_dir, &run_id, exec, allow_unsigned),
        Command::Runs(RunsCommand::List { limit }) => {
            let store = Store::open(&state_dir)?;
            for r in store.runs(limit)? {
                println!(
                    "{}  {:<8} {} {}  {}",
                    r.run_id, r.status, r.trace_id, r.trace_version, r.started_at
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs(RunsCommand::Show { run_id }) => {
            let id: tracefleet::ids::RunId = run_id.parse()?;
            let store = Store::open(&state_dir)?;
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

/// Reads a file refusing more than `limit` bytes (checked before reading).
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: expected a regular file", path.display());
    }
    if meta.len() > limit {
        bail!(
            "{} is {} bytes: expected at most {limit}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// RFC 3339 text for unix seconds; raw seconds past year 9999 (what RFC 3339 can show).
fn unix_to_rfc3339(t: u64) -> String {
    const MAX_RFC3339: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if t > MAX_RFC3339 {
        return format!("{t} (unix seconds)");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Loads the trace to run: verified when signed; sources and compiled traces only for authors.
/// Verifies a signed trace against the device's trust root.
/// Verifies a signed trace against the device's trust root; also returns that root's version.
fn verify_signed(store: &Store, bytes: &[u8]) -> Result<(signed::Verified, u32)> {
    let (root, _) = store.trust_root()?.ok_or_else(|| {
        anyhow!("this device has no trust root yet (run `follower trust init ROOT.tfr`)")
    })?;
    Ok((
        signed::verify_with_root(bytes, &root, unix_now())?,
        root.version,
    ))
}

fn print_root(root: &trust::TrustRoot) {
    println!("  expires {}", unix_to_rfc3339(root.expires_at));
    for role in [
        signed::KeyRole::Root,
        signed::KeyRole::Traces,
        signed::KeyRole::Commands,
    ] {
        let r = root.role(role);
        println!("  {role}: {} of {} keys", r.threshold, r.keys.len());
        for k in &r.keys {
            let id = signed::PublicKey::from_bytes(role, &k.public_key)
                .map(|p| p.key_id().to_string())
                .unwrap_or_default();
            println!("    {id}  expires {}", unix_to_rfc3339(k.expires_at));
        }
    }
}

/// `follower install FILE`: verify, refuse rollback, store atomically.
fn install(state_dir: &Path, file: &Path) -> Result<ExitCode> {
    let shown = file.display().to_string();
    let mut magic = [0u8; 3];
    std::fs::File::open(file)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .with_context(|| format!("cannot read {shown}"))?;
    if &magic == tracefleet::bundle::BUNDLE_MAGIC {
        return install_bundle(state_dir, file);
    }
    let bytes = read_limited(file, signed::MAX_SIGNED_BYTES as u64)?;
    if !bytes.starts_with(SIGNED_MAGIC) {
        bail!(
            "refusing {shown}: not a signed trace or bundle (expected the \"TFS\" or \"TFB\" magic)"
        );
    }
    let mut store = Store::open(state_dir)?;
    let (verified, root_version) = match verify_signed(&store, &bytes) {
        Ok(v) => v,
        Err(e) => {
            store.log_refusal("trace", &shown, &format!("{e:#}"), &now_rfc3339())?;
            return Err(e.context(format!("refusing {shown}")));
        }
    };
    let id = verified.trace.id.to_string();
    match store.install_trace(
        Some(root_version),
        &id,
        verified.trace.version,
        &bytes,
        &now_rfc3339(),
    ) {
        Ok(()) => {
            println!("installed {id} {}", verified.trace.version);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            store.log_refusal("trace", &id, &e.to_string(), &now_rfc3339())?;
            Err(e.into())
        }
    }
}

/// `follower install BUNDLE`, with a progress bar for large bundles on a terminal.
fn install_bundle(state_dir: &Path, file: &Path) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let shown = file.display().to_string();
    let mut store = Store::open(state_dir)?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let bar = (size > 8 << 20 && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(size);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message("verifying");
        b
    });
    let mut progress = |done: u64, _total: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    let result = follower::install::install_bundle(
        &mut store,
        state_dir,
        file,
        unix_now(),
        &now_rfc3339(),
        &mut progress,
    );
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match result {
        Ok(done) => {
            for v in &done.roots {
                println!("trust root v{v} installed");
            }
            for (id, v) in &done.traces {
                println!("installed {id} {v}");
            }
            for m in &done.models {
                println!("model {m} placed in {}", state_dir.join("models").display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            store.log_refusal("bundle", &shown, &e.to_string(), &now_rfc3339())?;
            Err(anyhow!(e).context(format!("refusing {shown}")))
        }
    }
}

/// A trace ready to run: the trace, how it was obtained, and the file to keep with the run
/// for a resume (the signed trace, or the compiled form of an unsigned one).
struct Loaded {
    trace: Trace,
    provenance: String,
    file: Vec<u8>,
    signed: bool,
}

impl Loaded {
    fn signed(trace: Trace, provenance: String, file: Vec<u8>) -> Self {
        Self {
            trace,
            provenance,
            file,
            signed: true,
        }
    }

    fn unsigned(trace: Trace, provenance: &str) -> Self {
        let file = compile::encode_compiled(&trace);
        Self {
            trace,
            provenance: provenance.into(),
            file,
            signed: false,
        }
    }
}

fn load_trace(store: &Store, path: &Path, allow_unsigned: bool) -> Result<Loaded> {
    // An installed trace id runs the installed version, verified again (the root may have
    // rotated or the signature expired since it was installed) — even if a file of that name
    // happens to exist here; a file is named with a path separator or an extension.
    if let Some(id) = path
        .to_str()
        .and_then(|p| p.parse::<tracefleet::ids::TraceId>().ok())
    {
        if let Some(bytes) = store.installed_signed(id.as_str())? {
            let (v, _) = verify_signed(store, &bytes)
                .with_context(|| format!("refusing installed trace {id}"))?;
            return Ok(Loaded::signed(v.trace, "installed, verified".into(), bytes));
        }
        if !path.exists() {
            bail!("no installed trace {id} and no such file (see `follower traces list`)");
        }
    }
    let bytes = read_limited(path, signed::MAX_SIGNED_BYTES as u64)?;
    let shown = path.display();
    if bytes.starts_with(SIGNED_MAGIC) {
        let (v, _) = verify_signed(store, &bytes).with_context(|| format!("refusing {shown}"))?;
        // Versions never go backwards, for runs from files too.
        if let Some(installed) = store.installed_version(v.trace.id.as_str())?
            && v.trace.version < installed
        {
            bail!(
                "refusing {shown}: {} {} is older than the installed {installed}, and versions never go backwards",
                v.trace.id,
                v.trace.version
            );
        }
        let by = v
            .signed_by
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        return Ok(Loaded::signed(
            v.trace,
            format!("verified, signed by {by}"),
            bytes,
        ));
    }
    if !allow_unsigned {
        if bytes.starts_with(compile::COMPILED_MAGIC) {
            bail!(
                "refusing {shown}: a compiled but unsigned trace; sign it with `learner sign` (trace authors: --allow-unsigned)"
            );
        }
        bail!(
            "refusing {shown}: not a signed trace (expected the \"TFS\" magic); trace authors may run sources with --allow-unsigned"
        );
    }
    if bytes.starts_with(compile::COMPILED_MAGIC) {
        return Ok(Loaded::unsigned(
            compile::decode_compiled(&bytes).with_context(|| format!("{shown}"))?,
            "UNSIGNED compiled trace",
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{shown}: trace source is not UTF-8 (byte {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let (trace, warnings) = compile::compile_source(&shown.to_string(), &text)
        .map_err(|d| anyhow!("{}", d.render(&text).trim_end()))?;
    for w in warnings {
        eprintln!("{w}");
    }
    Ok(Loaded::unsigned(trace, "UNSIGNED trace source"))
}

/// Least goal similarity for `--goal` to pick a trace.
const MIN_GOAL_SIMILARITY: f64 = 0.25;

/// `run --goal`: the best-matching installed trace that verifies, if it may run on its own.
fn select_by_goal(store: &Store, goal: &str) -> Result<Loaded> {
    use tracefleet::confidence::goal_similarity;
    let mut best: Option<(f64, Trace, Vec<u8>)> = None;
    for (id, _, bytes) in store.installed_traces()? {
        let Ok((v, _)) = verify_signed(store, &bytes) else {
            tracing::warn!(trace = %id, "installed trace no longer verifies; not considered");
            continue;
        };
        let score = goal_similarity(goal, &v.trace.goal_signature);
        if best.as_ref().is_none_or(|(b, _, _)| score > *b) {
            best = Some((score, v.trace, bytes));
        }
    }
    let now = now_rfc3339();
    let Some((score, trace, file)) = best.filter(|(s, _, _)| *s >= MIN_GOAL_SIMILARITY) else {
        let reason = tracefleet::wire::no_trace_for_goal(goal);
        store.record_escalation("-", None, &reason, &now)?;
        bail!("{reason} (similarity below {MIN_GOAL_SIMILARITY}); escalation recorded");
    };
    let (stats, _) = store.stats(trace.id.as_str(), &trace.version.to_string())?;
    if let Some(why) = stats.autonomy_refusal() {
        let reason = format!(
            "not running {} {} on its own: {why}",
            trace.id, trace.version
        );
        store.record_escalation(trace.id.as_str(), None, &reason, &now)?;
        bail!("{reason}; escalation recorded (run it by id to build confidence under supervision)");
    }
    let how = format!("selected for the goal (similarity {score:.2}), verified");
    Ok(Loaded::signed(trace, how, file))
}

fn run(state_dir: &Path, args: RunArgs) -> Result<ExitCode> {
    // One connection for the whole command: each close of the last one checkpoints the WAL.
    let store = Store::open(state_dir)?;
    let loaded = match (&args.goal, &args.trace) {
        (Some(goal), _) => select_by_goal(&store, goal)?,
        (None, Some(path)) => load_trace(&store, path, args.allow_unsigned)?,
        (None, None) => bail!("name a trace or give --goal TEXT"),
    };
    let trace = &loaded.trace;
    exec::check_supported(trace).map_err(|e| anyhow!("cannot run trace {}: {e}", trace.id))?;
    let given: BTreeMap<String, String> = args.vars.into_iter().collect();
    let inputs =
        exec::resolve_inputs(trace, &given).with_context(|| format!("trace {}", trace.id))?;

    // After a crash (power loss, SIGKILL): continue the unfinished run instead of repeating
    // its completed steps. A run still going in another process holds its lock.
    if !args.fresh && args.base_dir.is_none() {
        let version = trace.version.to_string();
        for id in store.running_like(trace.id.as_str(), &version, &inputs)? {
            if let Some(lock) = RunLock::try_acquire(state_dir, &id)? {
                let Some(unfinished) = store.unfinished(&id)? else {
                    continue;
                };
                eprintln!(
                    "resuming run {id}: it did not finish (the follower was killed or the device lost power); --fresh starts a new run"
                );
                let plan = Plan::resumed(&store, &id, unfinished, loaded)?;
                return execute(state_dir, store, plan, args.exec, lock);
            }
        }
    }

    let run_id = args
        .run_id
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let base_dir = args
        .base_dir
        .unwrap_or_else(|| state_dir.join("runs").join(&run_id));
    let lock = RunLock::try_acquire(state_dir, &run_id)?
        .ok_or_else(|| anyhow!("run {run_id} is locked by another process"))?;
    let plan = Plan {
        run_id,
        base_dir,
        inputs,
        done: BTreeMap::new(),
        resumes: 0,
        loaded,
    };
    execute(state_dir, store, plan, args.exec, lock)
}

fn resume(
    state_dir: &Path,
    run_id: &str,
    args: ExecArgs,
    allow_unsigned: bool,
) -> Result<ExitCode> {
    let store = Store::open(state_dir)?;
    let Some(unfinished) = store.unfinished(run_id)? else {
        bail!(
            "no stopped or interrupted run {run_id}: a finished run cannot be resumed (see `follower runs list`)"
        );
    };
    let lock = RunLock::try_acquire(state_dir, run_id)?
        .ok_or_else(|| anyhow!("run {run_id} is still running in another follower process"))?;
    let loaded = if unfinished.signed {
        // Verified again: the root may have rotated or the signature expired since.
        let (v, _) = verify_signed(&store, &unfinished.trace_file)
            .with_context(|| format!("refusing to resume run {run_id}"))?;
        Loaded::signed(
            v.trace,
            "resumed, verified".into(),
            unfinished.trace_file.clone(),
        )
    } else {
        if !allow_unsigned {
            bail!("run {run_id} is of an unsigned trace: resuming it needs --allow-unsigned again");
        }
        let trace = compile::decode_compiled(&unfinished.trace_file)
            .with_context(|| format!("the trace stored with run {run_id}"))?;
        Loaded::unsigned(trace, "resumed, UNSIGNED")
    };
    if loaded.trace.id.as_str() != unfinished.trace_id
        || loaded.trace.version.to_string() != unfinished.trace_version
    {
        bail!(
            "run {run_id} ran {} {}, but its stored trace is {} {}",
            unfinished.trace_id,
            unfinished.trace_version,
            loaded.trace.id,
            loaded.trace.version
        );
    }
    exec::check_supported(&loaded.trace)
        .map_err(|e| anyhow!("cannot run trace {}: {e}", loaded.trace.id))?;
    let plan = Plan::resumed(&store, run_id, unfinished, loaded)?;
    execute(state_dir, store, plan, args, lock)
}

/// An exclusive lock on a run, held by the process executing it (`flock(2)` on
/// `<state-dir>/locks/<run-id>`): a run whose lock is free and whose status is `running` was
/// left by a process that ended without finishing it.
struct RunLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
    path: PathBuf,
}

impl RunLock {
    /// The lock, or `None` when another process holds it.
    fn try_acquire(state_dir: &Path, run_id: &str) -> Result<Option<Self>> {
        let dir = state_dir.join("locks");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(run_id);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Self { _lock: lock, path })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(anyhow!("locking {}: {e}", path.display())),
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A run about to execute, new or resumed.
struct Plan {
    run_id: String,
    base_dir: PathBuf,
    inputs: BTreeMap<String, String>,
    /// Steps journaled by an earlier attempt of this run.
    done: BTreeMap<u32, exec::Completed>,
    resumes: u32,
    loaded: Loaded,
}

impl Plan {
    /// Continues `run_id` from its journal, counting the resume in the store.
    fn resumed(
        store: &Store,
        run_id: &str,
        unfinished: follower::store::Unfinished,
        loaded: Loaded,
    ) -> Result<Self> {
        Ok(Self {
            run_id: run_id.to_owned(),
            base_dir: PathBuf::from(unfinished.base_dir),
            inputs: unfinished.inputs,
            done: unfinished.done,
            resumes: store.mark_resumed(run_id)?,
            loaded,
        })
    }
}

/// A journal entry on its way from the sandboxed run thread to the store — a step's record
/// with its full output when it finished, without when it starts — and, for a finished step,
/// the channel that tells the run thread it was written. A start is written while the step
/// runs (resuming does not depend on it: a step without a result runs again either way); a
/// result is written before the next step starts.
type JournalEntry = (
    tracefleet::report::StepResult,
    Option<String>,
    Option<std::sync::mpsc::SyncSender<()>>,
);

fn execute(
    state_dir: &Path,
    mut store: Store,
    plan: Plan,
    args: ExecArgs,
    _lock: RunLock,
) -> Result<ExitCode> {
    let Plan {
        run_id,
        base_dir,
        inputs,
        done,
        resumes,
        loaded,
    } = plan;
    let trace = &loaded.trace;
    let inference = if trace.llm_steps().next().is_none() {
        None
    } else {
        let (specs, default) = run_models(&store, state_dir, trace, args.model.as_deref())?;
        Some(Inference::start(args.infer.config(), specs, default)?)
    };
    let device_roots: Vec<PathBuf> = if args.read_roots.is_empty() {
        DEFAULT_READ_ROOTS.iter().map(PathBuf::from).collect()
    } else {
        args.read_roots
    };
    // A trace may narrow the device's read roots, never widen them.
    let read_roots: Vec<PathBuf> = if trace.read_paths.is_empty() {
        device_roots
    } else {
        let mut narrowed = Vec::new();
        for r in &trace.read_paths {
            let p = PathBuf::from(r);
            if !device_roots.iter().any(|d| p.starts_with(d)) {
                bail!(
                    "cannot run trace {}: it reads {r}, outside this device's read roots [{}]",
                    trace.id,
                    device_roots
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            narrowed.push(p);
        }
        narrowed
    };
    let limits = ResourceLimits::default();
    let stopper = Stopper::default();
    let mut host = LocalHost::new(&base_dir, &read_roots, inference)
        .with_context(|| format!("base directory {}", base_dir.display()))?
        .with_limits(limits)
        .with_stopper(stopper.clone());
    if let Some(t) = args.timeout {
        host = host.with_deadline(t);
    }
    let device_id = match args.device_id {
        Some(id) => Some(id),
        None => store.device_id()?,
    };
    let device_id = device_id.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into())
    });
    let cx = RunContext {
        run_id: run_id.clone(),
        device_id,
        base_dir: host.base_dir().display().to_string(),
    };
    let policy = sandbox::Policy {
        base_dir: host.base_dir().to_owned(),
        read_roots: host.read_roots().to_vec(),
        network: trace.metadata.requires_internet,
    };
    let mut protections = static_protections(trace, &policy, limits, args.timeout);
    let telemetry_start = follower::telemetry::sample();

    if resumes == 0 {
        store.begin_run(&NewRun {
            run_id: &run_id,
            trace_id: trace.id.as_str(),
            version: &trace.version.to_string(),
            started_at: &now_rfc3339(),
            base_dir: &cx.base_dir,
            trace_file: &loaded.file,
            signed: loaded.signed,
            inputs: &inputs,
        })?;
    }

    // SIGINT/SIGTERM: the first stops after the current step, the second aborts it.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing the signal handlers")?;
    let signals_handle = signals.handle();
    let on_signal = stopper.clone();
    let signal_thread = std::thread::spawn(move || {
        for sig in signals.forever() {
            on_signal.request();
            let what = if on_signal.level() == 1 {
                "stopping after the current step (send it again to abort the step)"
            } else {
                "aborting the current step"
            };
            eprintln!("follower: signal {sig}: {what}");
        }
    });

    // The trace runs on its own thread, restricted by Landlock (with every process it starts);
    // the journal is written here, outside the sandbox, before the run goes on.
    let (journal_tx, journal_rx) = std::sync::mpsc::channel::<JournalEntry>();
    let mut journal_error = None;
    let (mut report, landlock) = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let landlock = sandbox::restrict_current_thread(&policy);
            let journal_tx = journal_tx;
            let report =
                exec::resume(
                    trace,
                    &cx,
                    &inputs,
                    &done,
                    &mut host,
                    &mut |event| match event {
                        Event::StepStarted(result) => {
                            let _ = journal_tx.send((result.clone(), None, None));
                        }
                        Event::StepFinished(result, output) => {
                            let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
                            let entry = (result.clone(), Some(output.to_owned()), Some(ack_tx));
                            if journal_tx.send(entry).is_ok() {
                                let _ = ack_rx.recv();
                            }
                        }
                    },
                );
            (report, landlock)
        });
        for (result, output, ack) in journal_rx {
            let written = match &output {
                None => store.record_step_start(&run_id, &result),
                Some(output) => store.record_step(&run_id, &result, output),
            };
            if let Err(e) = written {
                // Without a journal the run could not be resumed faithfully: stop it.
                stopper.request();
                journal_error.get_or_insert(e);
            }
            if let Some(ack) = ack {
                let _ = ack.send(());
            }
        }
        worker.join()
    })
    .map_err(|_| anyhow!("the run thread panicked"))?;
    signals_handle.close();
    let _ = signal_thread.join();

    protections.extend(landlock);
    report.protections = protections;
    report.resumes = resumes;
    report.telemetry_start = Some(telemetry_start);
    report.telemetry_end = Some(follower::telemetry::sample());
    store.finish_run(&report)?;
    // Statistics are kept for verified traces only: author runs of sources do not count, and
    // a stopped run is not an outcome.
    if loaded.signed && report.status != RunStatus::Stopped {
        let success = report.status == RunStatus::Success;
        store.record_outcome(
            &report.trace_id,
            &report.trace_version,
            success,
            &now_rfc3339(),
        )?;
        for e in &report.escalations {
            let reason = format!("step {}: {} ({})", e.step, e.message, e.error);
            store.record_escalation(
                &report.trace_id,
                Some(&report.run_id),
                &reason,
                &now_rfc3339(),
            )?;
        }
    }
    if let Some(e) = journal_error {
        return Err(e).context("journaling the run");
    }

    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.output {
        write_atomic(out, json.as_bytes())
            .with_context(|| format!("writing the report to {}", out.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_summary(&report, &loaded.provenance, args.output.as_deref());
    }
    Ok(match report.status {
        RunStatus::Success => ExitCode::SUCCESS,
        RunStatus::Failed | RunStatus::Stopped => ExitCode::from(1),
    })
}

/// The protections that do not depend on the kernel, for the report.
fn static_protections(
    trace: &Trace,
    policy: &sandbox::Policy,
    limits: ResourceLimits,
    timeout: Option<std::time::Duration>,
) -> Vec<Protection> {
    let bash: Vec<&tracefleet::trace::Step> = trace
        .steps
        .iter()
        .filter(|s| matches!(s.tool, tracefleet::trace::Tool::Bash { .. }))
        .collect();
    let restricted = bash.iter().filter(|s| s.allowed_commands.is_some()).count();
    let no_subst = bash.iter().filter(|s| !s.command_substitution).count();
    let p = |name: &str, active: bool, detail: String| Protection {
        name: name.into(),
        active,
        detail,
    };
    vec![
        p(
            "path policy",
            true,
            format!(
                "writes inside {}; reads there and in [{}]; `..` and symlink escapes refused",
                policy.base_dir.display(),
                policy
                    .read_roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        p(
            "scrubbed environment",
            true,
            "Bash steps see PATH, HOME, LANG, LC_ALL, TMPDIR, TRACEFLEET_BASE_DIR and their TF_VAR_* values only".into(),
        ),
        p(
            "allowed_commands",
            restricted > 0,
            format!(
                "{restricted} of {} Bash steps restricted to their allowed commands (checked with a POSIX shell parser)",
                bash.len()
            ),
        ),
        p(
            "no command substitution",
            no_subst > 0,
            format!("refused in {no_subst} of {} Bash steps", bash.len()),
        ),
        limits.protection(),
        p(
            "timeouts",
            true,
            match timeout {
                Some(t) => format!(
                    "per step (the trace's timeout_secs); whole run {}",
                    humantime::format_duration(t)
                ),
                None => "per step (the trace's timeout_secs); no run limit".into(),
            },
        ),
    ]
}

fn print_telemetry(t: &tracefleet::report::Telemetry) {
    #[allow(clippy::cast_precision_loss)]
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    println!(
        "memory: {:.2} GiB available of {:.2} GiB",
        gib(t.mem_available_bytes),
        gib(t.mem_total_bytes)
    );
    println!(
        "cpus: {}, load {:.2} {:.2} {:.2}",
        t.cpus, t.load[0], t.load[1], t.load[2]
    );
    if t.thermal.is_empty() {
        println!("thermal: no thermal zones");
    }
    for z in &t.thermal {
        println!("thermal: {} {:.1} °C", z.zone, z.celsius);
    }
    if t.gpus.is_empty() {
        println!("gpu: {}", t.gpu_status);
    }
    for g in &t.gpus {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
        println!(
            "gpu: {} — {} °C, memory {} / {} MiB, {} W, {} % busy",
            g.name,
            opt(g.temperature_c.map(|c| c.to_string())),
            opt(g.memory_used_bytes.map(|b| (b >> 20).to_string())),
            opt(g.memory_total_bytes.map(|b| (b >> 20).to_string())),
            opt(g.power_watts.map(|w| format!("{w:.0}"))),
            opt(g.utilization_pct.map(|u| u.to_string())),
        );
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
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

fn inspect(file: &Path, json: bool) -> Result<ExitCode> {
    let shown = file.display().to_string();
    let mut magic = [0u8; 3];
    let _ =
        std::fs::File::open(file).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
    if &magic == tracefleet::bundle::BUNDLE_MAGIC {
        let mut f =
            std::io::BufReader::new(std::fs::File::open(file).with_context(|| shown.clone())?);
        let (header, manifest, _) =
            tracefleet::bundle::read_header(&mut f).with_context(|| shown.clone())?;
        println!(
            "bundle {shown}: {} entries, {} trust-root update(s), {} signature(s)",
            manifest.entries.len(),
            header.roots.len(),
            header.signatures.len()
        );
        println!(
            "  created {}, expires {}",
            unix_to_rfc3339(manifest.created_at),
            unix_to_rfc3339(manifest.expires_at)
        );
        for e in &manifest.entries {
            println!(
                "  {:?} {} ({} bytes, sha256 {})",
                e.kind,
                e.name,
                e.size,
                hex::encode(e.sha256)
            );
        }
        println!("(signatures not verified by inspect; `follower install` verifies)");
        return Ok(ExitCode::SUCCESS);
    }
    if &magic == trust::ROOT_MAGIC {
        let bytes = read_limited(file, trust::MAX_ROOT_BYTES as u64)?;
        let (signed_root, root) = trust::decode_root(&bytes).with_context(|| shown.clone())?;
        println!(
            "trust root v{} ({} signature(s), not verified by inspect)",
            root.version,
            signed_root.signatures.len()
        );
        print_root(&root);
        return Ok(ExitCode::SUCCESS);
    }
    let bytes = read_limited(file, signed::MAX_SIGNED_BYTES as u64)?;
    let (trace, header) = if bytes.starts_with(SIGNED_MAGIC) {
        let s = signed::decode_signed(&bytes).with_context(|| shown.clone())?;
        let t = compile::decode_compiled(&s.compiled).with_context(|| shown.clone())?;
        (t, Some(s))
    } else if bytes.starts_with(compile::COMPILED_MAGIC) {
        (
            compile::decode_compiled(&bytes).with_context(|| shown.clone())?,
            None,
        )
    } else {
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow!("{shown}: not a signed trace, a compiled trace or UTF-8 trace source")
        })?;
        (
            compile::compile_source(&shown, &text)
                .map_err(|d| anyhow!("{}", d.render(&text).trim_end()))?
                .0,
            None,
        )
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&trace)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("trace {} {}", trace.id, trace.version);
    println!("goal: {}", trace.goal_signature);
    if let Some(s) = header {
        let fmt = unix_to_rfc3339;
        println!(
            "signed: created {}, expires {}, content sha256 {}",
            fmt(s.header.created_at),
            fmt(s.header.expires_at),
            hex::encode(s.header.content_hash)
        );
        for sig in &s.signatures {
            println!("  signature by key {}", sig.key_id);
        }
        println!("(signatures not verified by inspect; `follower run` verifies)");
    }
    for i in &trace.inputs {
        println!(
            "input {} = {}",
            i.name,
            i.default.as_deref().unwrap_or("(required)")
        );
    }
    for s in &trace.steps {
        println!(
            "step {} [{}] {} ({} validations)",
            s.number,
            s.tool.name(),
            s.title,
            s.validations.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
#[path = "../../tests/examples.rs"]
mod examples;

#[cfg(test)]
mod cli_tests {
    use super::examples;
    use clap::Parser;

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    fn assert_parses(text: &str, at_least: usize) {
        examples::assert_all_parse(text, "follower", at_least, |args| {
            super::Cli::try_parse_from(args).map(drop)
        });
    }

    #[test]
    fn every_example_of_the_help_text_parses() {
        assert_parses(super::AFTER_HELP, 3);
    }

    #[test]
    fn every_example_of_the_readme_by_hand_section_parses() {
        assert_parses(&examples::readme_by_hand(), 10);
    }
}
