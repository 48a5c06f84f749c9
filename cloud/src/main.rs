//! The `learner` binary: compile trace sources, generate keys, sign compiled traces.
//!
//! Exit codes: 0 success; 2 bad input (compile errors, malformed keys) or a usage error.

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use learner::keys;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracefleet::signed::{self, KeyRole, PublicKey, SecretKey};
use tracefleet::trust::{RoleKey, RoleKeys, TrustRoot, sign_root};
use tracefleet::{compile, source};

/// The examples under `learner --help`; tests parse them and run them in order
/// (`tests/newcomer.rs`), the follower's after them.
const AFTER_HELP: &str = "A trace from source to a device:
  learner keys generate --role root --out root.key     # root.key (0600) + .pub; keep offline
  learner keys generate --role traces --out traces.key
  learner trust create --root-key root.key.pub --traces-key traces.key.pub \\
      --sign root.key -o root-v1.tfr                    # the fleet's trust root, version 1
  learner compile my.trace.md -o my.tfc                 # check; errors show file:line:col
  learner sign my.tfc --key traces.key -o my.tfs        # sign (expires in 365d by default)
  follower trust init root-v1.tfr && follower install my.tfs && follower run my-trace

The trace format: docs/trace-language.md. Exit codes: 0 ok, 2 bad input.";

/// Compile, sign and roll out tracefleet traces; ingest what the fleet reports.
#[derive(Parser)]
#[command(
    name = "learner",
    version,
    about,
    long_about = None,
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check trace sources (`*.trace.md`) and write compiled traces.
    Compile {
        /// Trace sources.
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// Output file (one source) or directory (several); default: beside each source, `.tfc`.
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
        /// Only check; write nothing.
        #[arg(long)]
        check: bool,
        /// How to print diagnostics: `human` (source line and caret) or `short`
        /// (`file:line:col: error: message`, one per line).
        #[arg(long, value_enum, default_value = "human")]
        message_format: MessageFormat,
    },
    /// Manage signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Sign a compiled trace (with several `--key`s to reach a threshold).
    Sign {
        /// The compiled trace (from `learner compile`).
        compiled: PathBuf,
        /// Secret trace-signing key(s).
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
        /// How long the signature stays valid (e.g. `90d`, `12h`).
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// The signed trace to write.
        #[arg(short, long, value_name = "SIGNED")]
        output: PathBuf,
    },
    /// Add a signature to a signed trace (each holder of a threshold key adds theirs).
    Cosign {
        /// The signed trace.
        signed: PathBuf,
        /// The secret trace-signing key.
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// Where to write the result (default: in place).
        #[arg(short, long, value_name = "SIGNED")]
        output: Option<PathBuf>,
    },
    /// Manage trust roots.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Build bundles for sideloading (USB).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Connect to the fleet's MQTT broker and ingest what devices publish (heartbeats,
    /// reports, acks, escalations, status) into the learner's database, until SIGTERM/SIGINT.
    Serve {
        /// The learner's TOML config (db, client_id, [broker]).
        #[arg(long, value_name = "learner.toml")]
        config: PathBuf,
    },
    /// The fleet at a glance: each device and each trace installed on it — version, runs
    /// there (ok/failed), the last outcome, the version's fleet confidence.
    Fleet(ListArgs),
    /// The fleet's experiences (every reported run and every regeneration), LLMunix-style.
    #[command(subcommand)]
    Memory(MemoryCommand),
    /// Per trace: what the learner's model spent writing it (tokens, dollars, seconds) against
    /// what its runs on devices took — measured, from the stored records.
    Costs(ListArgs),
    /// Devices the learner has heard of.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Runs devices reported, each trace version's fleet-wide statistics, and escalations.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Send a signed command to a device (QoS 1; a device that is offline gets it when it
    /// reconnects).
    #[command(name = "command")]
    Send {
        /// The device id.
        device: String,
        /// What to do.
        #[command(subcommand)]
        action: CommandAction,
        /// Secret command-signing key(s) (role commands; several to reach a threshold).
        #[arg(long = "key", value_name = "KEY", global = true)]
        keys: Vec<PathBuf>,
        /// The learner's config (broker, database for the command counter).
        #[arg(long, value_name = "learner.toml", global = true)]
        config: Option<PathBuf>,
        /// How long the device may act on it.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, global = true)]
        expires: Duration,
    },
    /// Roll a signed trace out to the fleet.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Regenerate a trace through the model in learner.toml's [backend]: the prompt carries
    /// the goal, the current source and the trace's newest failed runs; the reply is compiled
    /// and repaired until it compiles, then signed under the next minor version (above every
    /// version known) and rolled out, one canary first unless --canary says otherwise.
    Regenerate(RegenerateArgs),
    /// Simulate many followers in this process (real MQTT clients, deterministic run
    /// results) for fleet tests and benchmarks; prints totals when it ends.
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// How many devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Device id prefix (`PREFIX-0000` …).
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Groups by position: `canary=10,wave1=100` puts the first 10 devices in canary, the
    /// next 100 in wave1, the rest in none.
    #[arg(long, value_delimiter = ',', value_parser = parse_group_count)]
    groups: Vec<(String, usize)>,
    /// Runs of this trace fail (repeatable).
    #[arg(long)]
    fail: Vec<String>,
    /// Run each trace once right after installing it (rollouts move on by themselves).
    #[arg(long)]
    run_on_install: bool,
    /// Reports each device sends at start (load).
    #[arg(long, default_value_t = 0)]
    reports: usize,
    /// Stop after this long (default: at SIGINT).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 30)]
    heartbeat_secs: u64,
    /// Instead: measure the broker's own QoS 1 throughput with the same load — `--devices`
    /// publishers sending `--reports` messages each of the size of a report — received by
    /// one plain subscriber (acking at once, storing nothing); print it and exit.
    #[arg(long)]
    broker_baseline: bool,
    /// The learner's config (broker).
    #[arg(long, value_name = "learner.toml")]
    config: PathBuf,
}

fn parse_group_count(s: &str) -> Result<(String, usize), String> {
    let (g, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected GROUP=COUNT"))?;
    tracefleet::wire::check_name("group", g).map_err(|e| e.to_string())?;
    Ok((
        g.to_owned(),
        n.parse()
            .map_err(|_| format!("{s:?}: expected GROUP=COUNT"))?,
    ))
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// One line per device: id, online, last seen, follower version, runs reported.
    List(ListArgs),
}

/// Where a listing reads from, and how it prints.
#[derive(clap::Args)]
struct ListArgs {
    /// The learner's config.
    #[arg(long, value_name = "learner.toml")]
    config: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum MemoryCommand {
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
struct MemoryFilter {
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
enum RunsCommand {
    /// Reported runs (oldest first), then per-version statistics.
    List(ListArgs),
}

#[derive(Subcommand)]
enum CommandAction {
    /// Run an installed trace.
    Run {
        /// The trace id.
        trace: String,
        /// An input (repeatable).
        #[arg(long = "var", value_name = "KEY=VALUE")]
        vars: Vec<String>,
    },
    /// Stop a run after its current step (all runs when no id is given).
    Stop {
        /// The run id.
        run: Option<String>,
    },
    /// Abort a run's current step.
    Abort {
        /// The run id.
        run: Option<String>,
    },
    /// Kill a run's process at once (it can be resumed later).
    Kill {
        /// The run id.
        run: Option<String>,
    },
}

#[derive(clap::Args)]
struct RegenerateArgs {
    /// The trace id.
    trace: String,
    /// The current source (without it: a first version for --goal).
    #[arg(long, value_name = "TRACE.md")]
    source: Option<PathBuf>,
    /// The goal (default: the source's goal_signature).
    #[arg(long)]
    goal: Option<String>,
    /// Failed runs shown to the model, newest first.
    #[arg(long, default_value_t = 5)]
    failures: u32,
    /// Most rounds (a reply, then a repair per round).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Secret trace-signing key(s).
    #[arg(long = "key", value_name = "KEY", required = true)]
    keys: Vec<PathBuf>,
    /// How long the signature stays valid.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    expires: Duration,
    /// Where the new source and signed trace are written.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    #[command(flatten)]
    stages: Stages,
}

/// How a rollout is staged.
#[derive(clap::Args)]
struct Stages {
    /// First a canary set of N devices, or P% (rounded up) of the devices the waves reach,
    /// picked from those known (online first), each sent the trace on its own topic.
    #[arg(long, value_name = "N|P%", value_parser = learner::rollout::parse_canary)]
    canary: Option<learner::rollout::Canary>,
    /// Device groups in order, comma-separated; `*` is the whole fleet (e.g.
    /// `canary,wave1,*`).
    #[arg(long, default_value = "*", value_delimiter = ',')]
    waves: Vec<String>,
    /// Halt before the next wave when the version's runs fail too often:
    /// `failure-rate>X over N runs` (N is also the runs each wave must report).
    #[arg(long, default_value = "failure-rate>0.2 over 1 runs", value_parser = learner::rollout::parse_abort_if)]
    abort_if: (f64, u32),
    /// The learner's config.
    #[arg(long, value_name = "learner.toml")]
    config: PathBuf,
}

impl Stages {
    fn staging(&self) -> learner::rollout::Staging {
        learner::rollout::Staging {
            canary: self.canary,
            waves: self.waves.clone(),
            abort_if: self.abort_if,
        }
    }
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Roll a signed trace out wave by wave; `learner serve` publishes each wave (retained on
    /// its group's topic: offline devices get it when they reconnect) once the previous one
    /// has acknowledged it and reported enough good runs, and halts on the abort criterion.
    Start {
        /// The signed trace (from `learner sign`).
        signed: PathBuf,
        /// Refuse unless the signed trace is this version (guards against the wrong file).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// The source it was compiled from: kept by the learner, it goes into the prompt
        /// when this version is regenerated (refused unless it compiles to the signed trace).
        #[arg(long, value_name = "TRACE.md")]
        source: Option<PathBuf>,
        #[command(flatten)]
        stages: Stages,
    },
    /// Roll forward: the content of the trace's last completed rollout, re-signed under a
    /// version above every version the learner knows of it, rolled out like `start` (how a
    /// bad version is undone: versions never go backwards on a device).
    Forward {
        /// The trace id.
        trace: String,
        /// Secret trace-signing key(s).
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
        /// How long the new signature stays valid.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// Also write the re-signed trace here.
        #[arg(short, long, value_name = "SIGNED")]
        output: Option<PathBuf>,
        #[command(flatten)]
        stages: Stages,
    },
    /// Rollouts, newest first: waves reached, runs, failures, state and why.
    Status(ListArgs),
    /// Stop a trace's rollout and withdraw it from the waves it reached.
    Abort {
        /// The trace id.
        trace: String,
        /// The learner's config.
        #[arg(long, value_name = "learner.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Pack signed traces (and optionally model files and trust-root updates) into one signed
    /// bundle file.
    Create {
        /// The bundle to write.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Signed traces (`.tfs`).
        #[arg(required = true)]
        signed: Vec<PathBuf>,
        /// GGUF model files to carry.
        #[arg(long = "model", value_name = "GGUF")]
        models: Vec<PathBuf>,
        /// Trust-root updates to carry (oldest first); devices apply them before the traces.
        #[arg(long = "root", value_name = "ROOT.tfr")]
        roots: Vec<PathBuf>,
        /// The trust root devices will verify the bundle with (the newest `--root` if given):
        /// the bundle may not outlive it.
        #[arg(long, value_name = "ROOT.tfr")]
        trust_root: PathBuf,
        /// Secret trace-signing key(s) that sign the manifest.
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
        /// How long the bundle stays valid (capped by the trust root's expiry).
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        expires: Duration,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Create and sign a trust root naming the root, trace-signing and command-signing keys.
    ///
    /// For a rotation, give the next version and sign with a threshold of the current root's
    /// keys and a threshold of the new root's keys.
    Create {
        /// Root version (1 for a new fleet; current + 1 for a rotation).
        #[arg(long, default_value_t = 1)]
        version: u32,
        /// How long the root stays valid.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// Root public keys (`.pub`).
        #[arg(long = "root-key", value_name = "PUB", required = true)]
        root_keys: Vec<PathBuf>,
        /// Root signatures needed to accept a later root.
        #[arg(long, default_value_t = 1)]
        root_threshold: u32,
        /// Trace-signing public keys.
        #[arg(long = "traces-key", value_name = "PUB", required = true)]
        traces_keys: Vec<PathBuf>,
        /// Trace signatures a device needs.
        #[arg(long, default_value_t = 1)]
        traces_threshold: u32,
        /// Command-signing public keys (default: the trace-signing keys).
        #[arg(long = "commands-key", value_name = "PUB")]
        commands_keys: Vec<PathBuf>,
        /// Command signatures a device needs.
        #[arg(long, default_value_t = 1)]
        commands_threshold: u32,
        /// Secret root keys that sign this root (for a rotation: old and new root keys).
        #[arg(long = "sign", value_name = "KEY", required = true)]
        signers: Vec<PathBuf>,
        /// The root file to write.
        #[arg(short, long, value_name = "ROOT.tfr")]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate an ed25519 key: the secret key at FILE (0600), the public key at FILE.pub.
    Generate {
        /// What the key may sign.
        #[arg(long, value_enum, default_value = "traces")]
        role: Role,
        /// The secret key file to create (never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MessageFormat {
    Human,
    Short,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Role {
    Root,
    Traces,
    Commands,
}

/// Restores the default SIGPIPE action so that a listing piped into `head` ends quietly
/// instead of panicking on a closed stdout (Rust ignores SIGPIPE by default). Not for
/// `serve`, `simulate` and `command`: they write to sockets, and a peer that goes away (a broker restart) must be an
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
        Command::Serve { .. } | Command::Simulate(_) | Command::Send { .. }
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Compile {
            sources,
            output,
            check,
            message_format,
        } => compile_all(&sources, output.as_deref(), check, message_format),
        Command::Keys(KeysCommand::Generate { role, out }) => {
            let role = match role {
                Role::Root => KeyRole::Root,
                Role::Traces => KeyRole::Traces,
                Role::Commands => KeyRole::Commands,
            };
            let public = keys::generate(role, &out)?;
            println!("{role} key {}", public.key_id());
            println!("secret: {} (0600)", out.display());
            println!("public: {}", keys::public_path(&out).display());
            Ok(())
        }
        Command::Sign {
            compiled,
            keys: key_files,
            expires,
            output,
        } => {
            let secrets = trace_keys(&key_files)?;
            let bytes = read_limited(&compiled, compile::MAX_COMPILED_BYTES as u64)?;
            let signed = sign_all(&bytes, &secrets, expires)
                .with_context(|| format!("{}", compiled.display()))?;
            std::fs::write(&output, signed::encode_signed(&signed))
                .with_context(|| format!("writing {}", output.display()))?;
            let ids: Vec<String> = secrets
                .iter()
                .map(|k| k.public().key_id().to_string())
                .collect();
            println!(
                "signed {} {} with {} → {}",
                signed.header.trace_id,
                signed.header.version,
                ids.join(", "),
                output.display()
            );
            Ok(())
        }
        Command::Cosign {
            signed: file,
            key,
            output,
        } => {
            let secret = trace_keys(std::slice::from_ref(&key))?.remove(0);
            let bytes = read_limited(&file, signed::MAX_SIGNED_BYTES as u64)?;
            let mut s =
                signed::decode_signed(&bytes).with_context(|| format!("{}", file.display()))?;
            signed::add_signature(&mut s, &secret);
            let out = output.unwrap_or(file);
            std::fs::write(&out, signed::encode_signed(&s))
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{} now carries {} signature(s)",
                out.display(),
                s.signatures.len()
            );
            Ok(())
        }
        Command::Serve { config } => {
            learner::fleet::serve(&learner::fleet::LearnerConfig::load(&config)?)
        }
        Command::Memory(MemoryCommand::Export {
            output,
            filter,
            config,
        }) => {
            let db = learner::fleet::LearnerDb::open(
                &learner::fleet::LearnerConfig::load(&config)?.db_path(),
            )?;
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
        Command::Memory(MemoryCommand::Query {
            filter,
            limit,
            list: ListArgs { config, json },
        }) => {
            let db = learner::fleet::LearnerDb::open(
                &learner::fleet::LearnerConfig::load(&config)?.db_path(),
            )?;
            let filter = filter.filter();
            let mut selected: Vec<_> = learner::memory::experiences(&db)?
                .into_iter()
                .filter(|e| filter.matches(e))
                .collect();
            if let Some(n) = limit {
                selected.drain(..selected.len().saturating_sub(n));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&selected)?);
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
        Command::Costs(ListArgs { config, json }) => {
            let db = learner::fleet::LearnerDb::open(
                &learner::fleet::LearnerConfig::load(&config)?.db_path(),
            )?;
            let costs = learner::memory::costs(&db)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&costs)?);
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
        Command::Fleet(ListArgs { config, json }) => {
            let db = learner::fleet::LearnerDb::open(
                &learner::fleet::LearnerConfig::load(&config)?.db_path(),
            )?;
            let rows = db.fleet_table()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<16} {:<8} {:<28} {:<9} {:>5} {:>6} {:<8} {:>10}",
                    "DEVICE", "STATUS", "TRACE", "VERSION", "RUNS", "FAILED", "LAST", "CONFIDENCE"
                );
                for r in rows {
                    println!(
                        "{:<16} {:<8} {:<28} {:<9} {:>5} {:>6} {:<8} {:>10}",
                        r.device_id,
                        if r.online { "online" } else { "offline" },
                        r.trace_id.as_deref().unwrap_or("-"),
                        r.version.as_deref().unwrap_or("-"),
                        r.runs,
                        r.runs - r.successes,
                        r.last_status.as_deref().unwrap_or("-"),
                        r.confidence.map_or("-".into(), |c| format!("{c:.3}"))
                    );
                }
            }
            Ok(())
        }
        Command::Devices(DevicesCommand::List(ListArgs { config, json })) => {
            let db = learner::fleet::LearnerDb::open(
                &learner::fleet::LearnerConfig::load(&config)?.db_path(),
            )?;
            let devices = db.devices()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                for d in devices {
                    println!(
                        "{}\t{}\tlast seen {}\t{}\t{} runs",
                        d.device_id,
                        if d.online { "online" } else { "offline" },
                        humantime::format_rfc3339_seconds(
                            UNIX_EPOCH
                                + Duration::from_secs(u64::try_from(d.last_seen).unwrap_or(0))
                        ),
                        d.follower_version.as_deref().unwrap_or("-"),
                        d.runs
                    );
                }
            }
            Ok(())
        }
        Command::Runs(RunsCommand::List(ListArgs { config, json })) => {
            let db = learner::fleet::LearnerDb::open(
                &learner::fleet::LearnerConfig::load(&config)?.db_path(),
            )?;
            let runs = db.runs()?;
            let stats = db.trace_stats()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"runs": runs, "trace_stats": stats, "acks": db.acks()?, "escalations": db.escalations()?, "regenerations": db.regenerations()?})
                    )?
                );
            } else {
                for r in runs {
                    println!(
                        "{}\t{}\t{} {}\t{}",
                        r.run_id, r.device_id, r.trace_id, r.trace_version, r.status
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
                        e.device_id, e.trace_id, e.reason
                    );
                }
            }
            Ok(())
        }
        Command::Send {
            device,
            action,
            keys: key_files,
            config,
            expires,
        } => send_command(&device, action, &key_files, config.as_deref(), expires),
        Command::Rollout(RolloutCommand::Start {
            signed: file,
            version,
            source,
            stages,
        }) => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let s = signed::decode_signed(&bytes).with_context(|| format!("{}", file.display()))?;
            let source = match source {
                Some(path) => Some(source_of(&path, &file, &s)?),
                None => None,
            };
            if let Some(v) = version {
                let v: tracefleet::ids::Version = v.parse().context("--version")?;
                if v != s.header.version {
                    bail!(
                        "{}: {} version {}: expected version {v} (--version)",
                        file.display(),
                        s.header.trace_id,
                        s.header.version
                    );
                }
            }
            start_rollout(&stages, &bytes, &s)?;
            if let Some(text) = source {
                let config = learner::fleet::LearnerConfig::load(&stages.config)?;
                learner::fleet::LearnerDb::open(&config.db_path())?.record_source(
                    s.header.trace_id.as_str(),
                    &s.header.version.to_string(),
                    &text,
                )?;
            }
            Ok(())
        }
        Command::Rollout(RolloutCommand::Forward {
            trace,
            keys: key_files,
            expires,
            output,
            stages,
        }) => {
            let secrets = trace_keys(&key_files)?;
            let config = learner::fleet::LearnerConfig::load(&stages.config)?;
            let mut db = learner::fleet::LearnerDb::open(&config.db_path())?;
            let (good, good_signed) = learner::rollout::last_good(db.conn(), &trace)?
                .with_context(|| format!("{trace}: no completed rollout to roll forward to (`learner rollout status` lists them)"))?;
            let top = learner::rollout::known_versions(db.conn(), &trace)?
                .iter()
                .filter_map(|v| v.parse::<tracefleet::ids::Version>().ok())
                .max()
                .with_context(|| format!("{trace}: no version known"))?;
            let mut content =
                compile::decode_compiled(&signed::decode_signed(&good_signed)?.compiled)?;
            content.version = tracefleet::ids::Version {
                patch: top.patch.checked_add(1).context("patch version overflow")?,
                ..top
            };
            let compiled = compile::encode_compiled(&content);
            let resigned = sign_all(&compiled, &secrets, expires)?;
            let bytes = signed::encode_signed(&resigned);
            if let Some(out) = &output {
                std::fs::write(out, &bytes)
                    .with_context(|| format!("writing {}", out.display()))?;
            }
            println!(
                "{trace}: the content of {good} (the last completed rollout) re-signed as {} (above {top})",
                content.version
            );
            drop(db);
            start_rollout(&stages, &bytes, &resigned)
        }
        Command::Rollout(RolloutCommand::Status(ListArgs { config, json })) => {
            let mut db = learner::fleet::LearnerDb::open(
                &learner::fleet::LearnerConfig::load(&config)?.db_path(),
            )?;
            let rollouts = learner::rollout::list(db.conn())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rollouts)?);
            } else {
                for r in rollouts {
                    println!(
                        "{} {}\t{}\twave {}/{} ({})\t{} runs, {} failed\t{}",
                        r.trace_id,
                        r.version,
                        r.state,
                        r.wave + 1,
                        r.waves.len(),
                        r.waves
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        r.runs,
                        r.failures,
                        r.reason
                    );
                }
            }
            Ok(())
        }
        Command::Rollout(RolloutCommand::Abort { trace, config }) => {
            let mut db = learner::fleet::LearnerDb::open(
                &learner::fleet::LearnerConfig::load(&config)?.db_path(),
            )?;
            if !learner::rollout::abort(
                db.conn(),
                &trace,
                i64::try_from(unix_now()).unwrap_or(i64::MAX),
            )? {
                bail!("no running or halted rollout of {trace}");
            }
            println!("rollout of {trace} aborting: `learner serve` withdraws it");
            Ok(())
        }
        Command::Regenerate(a) => regenerate(a),
        Command::Simulate(a) => {
            let config = learner::fleet::LearnerConfig::load(&a.config)?;
            if a.broker_baseline {
                let size = learner::simulate::baseline_size();
                let rate = learner::simulate::broker_baseline(&config, a.devices, a.reports, size)?;
                println!(
                    "broker: {} publishers x {} QoS 1 messages of {size} bytes, {rate:.0} msg/s end to end",
                    a.devices, a.reports
                );
                return Ok(());
            }
            tracefleet::wire::check_name("device id prefix", &a.prefix)?;
            let devices = a.devices;
            let sim = learner::simulate::Simulation {
                devices: a.devices,
                prefix: a.prefix,
                groups: a.groups,
                fail: a.fail,
                run_on_install: a.run_on_install,
                reports: a.reports,
                duration: a.duration,
                heartbeat_secs: a.heartbeat_secs,
            };
            let t = learner::simulate::run(&config, &sim)?;
            let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            println!(
                "simulated {devices} devices: {} connected, {} traces installed, {} reports sent, {} PUBACKs",
                n(&t.connected),
                n(&t.installed),
                n(&t.reports),
                n(&t.pubacks)
            );
            Ok(())
        }
        Command::Bundle(BundleCommand::Create {
            output,
            signed: signed_files,
            models,
            roots,
            trust_root,
            keys: key_files,
            expires,
        }) => bundle_create(
            &output,
            &signed_files,
            &models,
            &roots,
            &trust_root,
            &key_files,
            expires,
        ),
        Command::Trust(TrustCommand::Create {
            version,
            expires,
            root_keys,
            root_threshold,
            traces_keys,
            traces_threshold,
            commands_keys,
            commands_threshold,
            signers,
            output,
        }) => {
            let now = unix_now();
            let expires_at = now.saturating_add(expires.as_secs());
            let role = |files: &[PathBuf], want: KeyRole, threshold: u32| -> Result<RoleKeys> {
                let keys = files
                    .iter()
                    .map(|f| {
                        let text = std::fs::read_to_string(f)
                            .with_context(|| format!("reading {}", f.display()))?;
                        let k = PublicKey::from_file(&text)
                            .with_context(|| format!("{}", f.display()))?;
                        if k.role != want {
                            bail!("{}: a {} key: expected a {want} key", f.display(), k.role);
                        }
                        Ok(RoleKey {
                            public_key: k.to_bytes(),
                            expires_at,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(RoleKeys { threshold, keys })
            };
            let commands = if commands_keys.is_empty() {
                // Commands default to the trace-signing keys' material under the commands role.
                let mut r = role(&traces_keys, KeyRole::Traces, commands_threshold)?;
                r.threshold = commands_threshold;
                r
            } else {
                role(&commands_keys, KeyRole::Commands, commands_threshold)?
            };
            let root = TrustRoot {
                version,
                created_at: now,
                expires_at,
                root: role(&root_keys, KeyRole::Root, root_threshold)?,
                traces: role(&traces_keys, KeyRole::Traces, traces_threshold)?,
                commands,
            };
            let secrets = signers
                .iter()
                .map(|f| keys::read_secret(f))
                .collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<&SecretKey> = secrets.iter().collect();
            let bytes = sign_root(&root, &refs)?;
            std::fs::write(&output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "trust root v{version} → {} (root {root_threshold}/{}, traces {traces_threshold}/{}, {} signature(s))",
                output.display(),
                root.root.keys.len(),
                root.traces.keys.len(),
                refs.len()
            );
            Ok(())
        }
    }
}

fn bundle_create(
    output: &Path,
    signed_files: &[PathBuf],
    models: &[PathBuf],
    roots: &[PathBuf],
    trust_root: &Path,
    key_files: &[PathBuf],
    expires: Duration,
) -> Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    use tracefleet::bundle::{EntryKind, EntryName, Manifest, ManifestEntry};
    let secrets = trace_keys(key_files)?;
    let refs: Vec<&SecretKey> = secrets.iter().collect();
    let root_bytes = read_limited(trust_root, tracefleet::trust::MAX_ROOT_BYTES as u64)?;
    let (_, root) = tracefleet::trust::decode_root(&root_bytes)
        .with_context(|| format!("{}", trust_root.display()))?;
    let now = unix_now();
    let expires_at = now.saturating_add(expires.as_secs());
    if expires_at > root.expires_at {
        bail!(
            "the bundle would expire after trust root v{} (in {} s): a bundle must not outlive its metadata; pass a shorter --expires",
            root.version,
            root.expires_at.saturating_sub(now)
        );
    }
    // (file, kind, entry name)
    let mut items: Vec<(PathBuf, EntryKind, String)> = Vec::new();
    for f in signed_files {
        let bytes = read_limited(f, signed::MAX_SIGNED_BYTES as u64)?;
        let s = signed::decode_signed(&bytes).with_context(|| format!("{}", f.display()))?;
        items.push((
            f.clone(),
            EntryKind::Trace,
            format!("{}-{}.tfs", s.header.trace_id, s.header.version),
        ));
    }
    for m in models {
        // A device refuses a model that is not a complete GGUF file: say so here instead.
        tracefleet::gguf::read_file(m).map_err(|e| anyhow!("model {}: {e}", m.display()))?;
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        items.push((m.clone(), EntryKind::Model, name));
    }
    let mut entries = Vec::new();
    for (path, kind, name) in &items {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut h = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        entries.push(ManifestEntry {
            name: EntryName::try_from(name.clone())?,
            kind: *kind,
            size,
            sha256: h.finalize().into(),
        });
    }
    let root_files = roots
        .iter()
        .map(|r| read_limited(r, tracefleet::trust::MAX_ROOT_BYTES as u64))
        .collect::<Result<Vec<_>>>()?;
    let manifest = Manifest {
        created_at: now,
        expires_at,
        entries,
    };
    let header = tracefleet::bundle::encode_header(root_files, &manifest, &refs)?;
    let tmp = output.with_extension("part");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    out.write_all(&header)?;
    for (path, _, _) in &items {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        std::io::copy(&mut f, &mut out).with_context(|| format!("copying {}", path.display()))?;
    }
    out.into_inner()
        .map_err(|e| anyhow!("writing {}: {e}", tmp.display()))?
        .sync_all()?;
    std::fs::rename(&tmp, output).with_context(|| format!("writing {}", output.display()))?;
    println!(
        "bundle {} ({} traces, {} models, {} root updates), expires in {}",
        output.display(),
        signed_files.len(),
        models.len(),
        roots.len(),
        humantime::format_duration(expires)
    );
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `learner command DEVICE …`: sign with the command keys, publish with QoS 1.
fn send_command(
    device: &str,
    action: CommandAction,
    key_files: &[PathBuf],
    config: Option<&Path>,
    expires: Duration,
) -> Result<()> {
    use tracefleet::wire::{self, Action};
    wire::check_name("device id", device)?;
    if key_files.is_empty() {
        bail!("--key COMMANDS.key is needed: commands are signed by the trust root's command keys");
    }
    let config = config.ok_or_else(|| {
        anyhow!("--config learner.toml is needed (the broker and the command counters)")
    })?;
    let config = learner::fleet::LearnerConfig::load(config)?;
    let keys = key_files
        .iter()
        .map(|f| {
            let k = keys::read_secret(f)?;
            if k.role != KeyRole::Commands {
                bail!(
                    "{}: a {} key: expected a command-signing key (role commands)",
                    f.display(),
                    k.role
                );
            }
            Ok(k)
        })
        .collect::<Result<Vec<_>>>()?;
    let action = match action {
        CommandAction::Run { trace, vars } => Action::Run {
            trace_id: trace,
            vars: vars
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| anyhow!("--var {kv:?}: expected KEY=VALUE"))
                })
                .collect::<Result<_>>()?,
        },
        CommandAction::Stop { run } => Action::Stop(run),
        CommandAction::Abort { run } => Action::Abort(run),
        CommandAction::Kill { run } => Action::Kill(run),
    };
    let mut db = learner::fleet::LearnerDb::open(&config.db_path())?;
    let now = unix_now();
    let command = wire::Command {
        device_id: device.to_owned(),
        counter: db.next_command_counter(device)?,
        issued_at: now,
        expires_at: now.saturating_add(expires.as_secs()),
        action,
    };
    let refs: Vec<&SecretKey> = keys.iter().collect();
    let payload = wire::encode(&wire::sign_command(&command, &refs));
    learner::fleet::publish_once(
        &config,
        &format!("{}-command", config.client_id),
        &wire::Topic::Commands(device.to_owned()).name(),
        payload,
        false,
        Duration::from_secs(30),
    )?;
    println!(
        "sent to {device}: {:?} (counter {})",
        command.action, command.counter
    );
    Ok(())
}

/// Reads a secret key that must be a trace-signing key.
/// `learner regenerate`.
fn regenerate(mut a: RegenerateArgs) -> Result<()> {
    use learner::regen::{self, auto};
    let secrets = trace_keys(&a.keys)?;
    tracefleet::wire::check_name("trace id", &a.trace)?;
    let config = learner::fleet::LearnerConfig::load(&a.stages.config)?;
    let backend_config = config.backend.clone().with_context(|| {
        format!(
            "{}: no [backend]: expected the model to ask (kind = \"anthropic\" or \"openai\", model, base_url, …)",
            a.stages.config.display()
        )
    })?;
    let current = match &a.source {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let compiled_current = match &current {
        Some(text) => Some(
            compile::compile_source(&a.trace, text)
                .map(|(t, _)| t)
                .map_err(|d| {
                    anyhow::anyhow!(
                        "{}: {d}",
                        a.source
                            .as_ref()
                            .map_or(String::new(), |p| p.display().to_string())
                    )
                })?,
        ),
        None => None,
    };
    let goal = match (&a.goal, &compiled_current) {
        (Some(g), _) => g.clone(),
        (None, Some(t)) => t.goal_signature.clone(),
        (None, None) => {
            bail!("--goal: needed without --source (a first version is written from the goal)")
        }
    };
    let mut db = learner::fleet::LearnerDb::open(&config.db_path())?;
    let backend = regen::backend::AnyBackend::new(&backend_config)?;
    let job = auto::Job {
        trace_id: a.trace.clone(),
        goal,
        from_version: compiled_current.as_ref().map(|t| t.version.to_string()),
        current,
        trigger: "command".into(),
    };
    if a.stages.canary.is_none() {
        a.stages.canary = Some(learner::rollout::Canary::Devices(1));
    }
    let signing = auto::Signing {
        keys: std::sync::Arc::new(secrets),
        expires: a.expires,
        out_dir: a.out_dir.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let done = rt.block_on(auto::run(
        &mut db,
        &backend,
        &backend_config.model,
        &job,
        &auto::Attempt {
            max_rounds: a.rounds,
            failures: a.failures,
            dry_run: config.dry_run.as_ref(),
        },
        &signing,
        &a.stages.staging(),
    ))?;
    if let Some(d) = &done.dry_run {
        println!("{}: {d}", a.trace);
    }
    println!(
        "{}: {} wrote version {} in {} round(s) ({} input + {} output tokens, ${:.4}) → {}, {}",
        a.trace,
        done.model,
        done.version,
        done.rounds,
        done.input_tokens,
        done.output_tokens,
        done.cost,
        done.source_path.display(),
        done.signed_path.display()
    );
    match done.rollout {
        Ok(waves) => {
            println!(
                "{}",
                learner::rollout::describe_start(
                    &a.trace,
                    &done.version.to_string(),
                    &waves,
                    a.stages.abort_if
                )
            );
            Ok(())
        }
        Err(e) => bail!(
            "the regenerated trace is signed in {} but its rollout was not recorded (`learner rollout start` it when devices are known): --{e}",
            done.signed_path.display()
        ),
    }
}

/// Records a rollout of `bytes` (the signed trace `s`) staged as `stages` says.
fn start_rollout(stages: &Stages, bytes: &[u8], s: &signed::SignedTrace) -> Result<()> {
    let config = learner::fleet::LearnerConfig::load(&stages.config)?;
    let mut db = learner::fleet::LearnerDb::open(&config.db_path())?;
    let id = s.header.trace_id.to_string();
    let version = s.header.version.to_string();
    let staging = stages.staging();
    let waves = learner::rollout::start_staged(
        db.conn(),
        &staging,
        &id,
        &version,
        bytes,
        i64::try_from(unix_now()).unwrap_or(i64::MAX),
    )
    .map_err(|e| anyhow::anyhow!("--{e}"))?;
    println!(
        "{}",
        learner::rollout::describe_start(&id, &version, &waves, staging.abort_if)
    );
    Ok(())
}

/// The text of `path`, refused unless it compiles to the trace signed in `signed_file`.
fn source_of(path: &Path, signed_file: &Path, s: &signed::SignedTrace) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (trace, _) = compile::compile_source(&path.display().to_string(), &text)
        .map_err(|d| anyhow::anyhow!("{}", d.render(&text).trim_end()))?;
    if compile::encode_compiled(&trace) != s.compiled {
        bail!(
            "--source {}: compiles to {} {}, not to the trace signed in {} ({} {}): expected the source that file was compiled from",
            path.display(),
            trace.id,
            trace.version,
            signed_file.display(),
            s.header.trace_id,
            s.header.version
        );
    }
    Ok(text)
}

/// Reads secret trace-signing keys.
fn trace_keys(paths: &[PathBuf]) -> Result<Vec<SecretKey>> {
    keys::read_trace_keys(paths)
}

/// Signs compiled bytes with every key (valid from now for `expires`).
fn sign_all(compiled: &[u8], keys: &[SecretKey], expires: Duration) -> Result<signed::SignedTrace> {
    keys::sign_all(compiled, keys, expires)
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if meta.len() > limit {
        bail!(
            "{} is {} bytes: expected at most {limit}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn compile_all(
    sources: &[PathBuf],
    output: Option<&Path>,
    check: bool,
    format: MessageFormat,
) -> Result<()> {
    let mut failed = 0usize;
    for src in sources {
        let shown = src.display().to_string();
        let bytes = read_limited(src, source::MAX_SOURCE_BYTES as u64)?;
        let text = String::from_utf8(bytes)
            .map_err(|e| anyhow!("{shown}: not UTF-8 (byte {})", e.utf8_error().valid_up_to()))?;
        match compile::compile_source(&shown, &text) {
            Err(diags) => {
                match format {
                    MessageFormat::Human => eprint!("{}", diags.render(&text)),
                    MessageFormat::Short => eprintln!("{diags}"),
                }
                failed += 1;
            }
            Ok((trace, warnings)) => {
                let warnings = tracefleet::Diagnostics(warnings);
                match format {
                    MessageFormat::Human => eprint!("{}", warnings.render(&text)),
                    MessageFormat::Short => warnings.0.iter().for_each(|w| eprintln!("{w}")),
                }
                if check {
                    println!(
                        "{shown}: ok ({} {}, {} steps)",
                        trace.id,
                        trace.version,
                        trace.steps.len()
                    );
                    continue;
                }
                let out = match output {
                    Some(o) if sources.len() == 1 => o.to_path_buf(),
                    Some(dir) => dir.join(format!("{}.tfc", trace.id)),
                    None => src.with_file_name(format!("{}.tfc", trace.id)),
                };
                let bytes = compile::encode_compiled(&trace);
                std::fs::write(&out, &bytes)
                    .with_context(|| format!("writing {}", out.display()))?;
                println!(
                    "{shown} → {} ({} {}, {} steps, {} bytes)",
                    out.display(),
                    trace.id,
                    trace.version,
                    trace.steps.len(),
                    bytes.len()
                );
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} trace source(s) did not compile",
            sources.len()
        );
    }
    Ok(())
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
        examples::assert_all_parse(text, "learner", at_least, |args| {
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
