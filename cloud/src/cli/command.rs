//! `learner command DEVICE run|stop|abort|kill`: a command signed with the command keys,
//! numbered by the database's per-device counter and published with QoS 1
//! ([`learner::publish::publish_once`]).

use super::unix_now;
use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use learner::keys;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracefleet::signed::{KeyRole, SecretKey};

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
pub fn send(a: SendArgs) -> Result<()> {
    send_command(&a.device, a.action, &a.keys, a.config.as_deref(), a.expires)
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
    let mut db = config.open_db()?;
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
    learner::publish::publish_once(
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
