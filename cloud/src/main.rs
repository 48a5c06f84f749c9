//! The `learner` binary: parses the command line and hands each command to its family in
//! [`cli`] (which maps arguments onto the library and prints); errors become `error: …` on
//! stderr.
//!
//! Exit codes: 0 success; 2 bad input (compile errors, malformed keys) or a usage error; 1 from
//! `audit verify|list|export` for a log that does not verify.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
    /// The audit log's directory: every command that changes what devices trust or run
    /// appends an entry there (default: learner.toml's `[audit] dir`, else
    /// `$XDG_STATE_HOME/tracefleet/audit`, i.e. `~/.local/state/tracefleet/audit`).
    #[arg(long, global = true, value_name = "DIR", env = "TRACEFLEET_AUDIT_DIR")]
    audit_dir: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check trace sources (`*.trace.md`) and write compiled traces.
    Compile(cli::build::CompileArgs),
    /// Manage signing keys.
    #[command(subcommand)]
    Keys(cli::build::KeysCommand),
    /// Sign a compiled trace (with several `--key`s to reach a threshold).
    Sign(cli::build::SignArgs),
    /// Add a signature to a signed trace (each holder of a threshold key adds theirs).
    Cosign(cli::build::CosignArgs),
    /// Manage trust roots.
    #[command(subcommand)]
    Trust(cli::build::TrustCommand),
    /// Build bundles for sideloading (USB).
    #[command(subcommand)]
    Bundle(cli::build::BundleCommand),
    /// Connect to the fleet's MQTT broker and ingest what devices publish (heartbeats,
    /// reports, acks, escalations, status) into the learner's database, until SIGTERM/SIGINT.
    Serve(cli::serve::ServeArgs),
    /// The fleet at a glance: each device and each trace installed on it — version, runs
    /// there (ok/failed), the last outcome, the version's fleet confidence.
    Fleet(cli::ListArgs),
    /// The fleet's experiences (every reported run and every regeneration), LLMunix-style.
    #[command(subcommand)]
    Memory(cli::fleet::MemoryCommand),
    /// Per trace: what the learner's model spent writing it (tokens, dollars, seconds) against
    /// what its runs on devices took — measured, from the stored records.
    Costs(cli::ListArgs),
    /// Devices the learner has heard of.
    #[command(subcommand)]
    Devices(cli::fleet::DevicesCommand),
    /// Runs devices reported, each trace version's fleet-wide statistics, and escalations.
    #[command(subcommand)]
    Runs(cli::fleet::RunsCommand),
    /// Send a signed command to a device (QoS 1; a device that is offline gets it when it
    /// reconnects).
    #[command(name = "command")]
    Send(cli::command::SendArgs),
    /// Roll a signed trace out to the fleet.
    #[command(subcommand)]
    Rollout(cli::rollout::RolloutCommand),
    /// Regenerate a trace through the model in learner.toml's [backend]: the prompt carries
    /// the goal, the current source and the trace's newest failed runs; the reply is compiled
    /// and repaired until it compiles, then signed under the next minor version (above every
    /// version known) and rolled out, one canary first unless --canary says otherwise.
    Regenerate(cli::rollout::RegenerateArgs),
    /// The audit log: every action that changed what devices trust or run, hash-chained and
    /// signed; `verify` names the first entry altered, removed or moved.
    #[command(subcommand)]
    Audit(cli::audit::AuditCommand),
    /// Simulate many followers in this process (real MQTT clients, deterministic run
    /// results) for fleet tests and benchmarks; prints totals when it ends.
    Simulate(cli::serve::SimulateArgs),
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
        Command::Serve(_) | Command::Simulate(_) | Command::Send(_)
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
            ExitCode::from(2)
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    use cli::{build, command, fleet, rollout, serve};
    let audit = cli::audit::Audit {
        explicit: cli.audit_dir,
    };
    match cli.command {
        Command::Compile(a) => build::compile(a),
        Command::Keys(c) => build::generate_key(c, &audit),
        Command::Sign(a) => build::sign(a, &audit),
        Command::Cosign(a) => build::cosign(a, &audit),
        Command::Trust(c) => build::trust(c, &audit),
        Command::Bundle(c) => build::bundle(c, &audit),
        Command::Serve(a) => serve::serve(&a, &audit),
        Command::Simulate(a) => serve::simulate(a),
        Command::Fleet(a) => fleet::fleet(a),
        Command::Memory(c) => fleet::memory(c),
        Command::Costs(a) => fleet::costs(a),
        Command::Devices(c) => fleet::devices(c),
        Command::Runs(c) => fleet::runs(c),
        Command::Send(a) => command::send(a, &audit),
        Command::Rollout(c) => rollout::rollout(c, &audit),
        Command::Regenerate(a) => rollout::regenerate(a, &audit),
        Command::Audit(c) => return cli::audit::audit(c, &audit),
    }
    .map(|()| ExitCode::SUCCESS)
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
