//! `learner command DEVICE run|stop|abort|kill`: the keys and the action from the
//! arguments; [`learner::publish::send_command`] numbers, signs and publishes it.

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use learner::keys;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracefleet::signed::KeyRole;

// `learner command`'s arguments.
#[derive(clap::Args)]
pub struct SendArgs {
    /// The device id.
    pub device: String,
    /// What to do.
    #[command(subcommand)]
    pub action: CommandAction,
    /// Secret command-signing key(s) (role commands; several to reach a threshold).
    #[arg(long = "key", value_name = "KEY", global = true)]
    pub keys: Vec<PathBuf>,
    /// The learner's config (broker, database for the command counter).
    #[arg(long, value_name = "learner.toml", global = true)]
    pub config: Option<PathBuf>,
    /// How long the device may act on it.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, global = true)]
    pub expires: Duration,
}

#[derive(Subcommand)]
pub enum CommandAction {
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

/// `learner command`.
pub fn send(a: SendArgs, audit: &super::audit::Audit) -> Result<()> {
    send_command(
        &a.device,
        a.action,
        &a.keys,
        a.config.as_deref(),
        a.expires,
        audit,
    )
}

/// `learner command DEVICE …`: sign with the command keys, publish with QoS 1.
fn send_command(
    device: &str,
    action: CommandAction,
    key_files: &[PathBuf],
    config: Option<&Path>,
    expires: Duration,
    audit: &super::audit::Audit,
) -> Result<()> {
    use tracefleet::wire::{self, Action};
    wire::check_name("device id", device)?;
    if key_files.is_empty() {
        bail!("--key COMMANDS.key is needed: commands are signed by the trust root's command keys");
    }
    let config = config.ok_or_else(|| {
        anyhow!("--config learner.toml is needed (the broker and the command counters)")
    })?;
    let config = learner::config::LearnerConfig::load(config)?;
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
    let command = learner::publish::send_command(&config, device, action, &keys, expires)?;
    println!(
        "sent to {device}: {:?} (counter {})",
        command.action, command.counter
    );
    let (verb, detail) = match &command.action {
        Action::Run { trace_id, vars } => (
            "run",
            serde_json::json!({ "trace": trace_id, "vars": vars.iter().map(|(k, _)| k).collect::<Vec<_>>() }),
        ),
        Action::Stop(run) => ("stop", serde_json::json!({ "run": run })),
        Action::Abort(run) => ("abort", serde_json::json!({ "run": run })),
        Action::Kill(run) => ("kill", serde_json::json!({ "run": run })),
    };
    let mut detail = detail;
    detail["counter"] = command.counter.into();
    detail["expires_at"] = command.expires_at.into();
    audit.record(
        config.audit_dir.as_deref(),
        &format!("command {verb}"),
        device,
        detail,
    )
}
