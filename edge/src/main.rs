//! The `follower` binary: parses the command line and dispatches each command to its module
//! under [`cli`], which maps the arguments onto the `follower` library and prints the outcome.
//!
//! Exit codes: 0 success; 1 a run that executed and failed; 2 bad input, refused
//! verification or a usage error.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cli::models::ModelsCommand;
use cli::run::{ExecArgs, RunArgs};
use cli::runs::RunsCommand;
use cli::traces::TracesCommand;
use cli::trust::TrustCommand;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Print this device's identity for confidential traces: its recipient (`age1…`), which
    /// `learner sign --encrypt-to` takes (created in the state directory, 0600, when missing).
    Identity {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what a trace file holds: signed trace, compiled trace or trace source (a
    /// confidential trace whole only when this device's identity decrypts it).
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
    /// Measure how well a model answers one judgement step on a labelled set (JSON Lines):
    /// accuracy, coverage and selective accuracy at a confidence threshold, macro-F1, the
    /// confusion matrix, calibration (ECE), items/s, beside the majority-class baseline.
    /// Only the model runs. Exit 0 when it ran, 2 on bad input.
    Eval(cli::eval::EvalArgs),
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
            // One "error:" however the message begins (a wrapped error may carry its own).
            let message = format!("{e:#}");
            eprintln!(
                "error: {}",
                message.strip_prefix("error: ").unwrap_or(&message)
            );
            // 1: the run executed and did not succeed; 2: nothing ran.
            if e.downcast_ref::<follower::runner::AfterStart>().is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
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

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let state_dir = cli.state_dir.unwrap_or_else(default_state_dir);
    match cli.command {
        Command::Trust(cmd) => cli::trust::command(&state_dir, cmd),
        Command::Install { file } => cli::install::install(&state_dir, &file),
        Command::Agent { config } => {
            let config = follower::agent::AgentConfig::load(&config)?;
            follower::agent::run(config, &state_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Escalations => cli::device::escalations(&state_dir),
        Command::Check => cli::device::check(&state_dir),
        Command::Traces(cmd) => cli::traces::command(&state_dir, cmd),
        Command::Inspect { file, json } => cli::inspect::inspect(&state_dir, &file, json),
        Command::Identity { json } => cli::trust::identity(&state_dir, json),
        Command::Models(cmd) => cli::models::command(&state_dir, cmd),
        Command::Run(args) => cli::run::run(&state_dir, args),
        Command::Telemetry { json } => cli::device::telemetry(json),
        Command::Resume {
            run_id,
            exec,
            allow_unsigned,
        } => cli::run::resume(&state_dir, &run_id, &exec, allow_unsigned),
        Command::Runs(cmd) => cli::runs::command(&state_dir, cmd),
        Command::Eval(args) => cli::eval::eval(&state_dir, &args),
    }
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
