//! `learner audit list|verify|export`, and [`Audit`]: how every other command finds the audit
//! log and appends what it did ([`learner::audit`] holds the format and the checks).

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use learner::audit::{AuditLog, Head, KEY_FILE, Verified};
use std::path::{Path, PathBuf};

/// The audit directory given on the command line or in the environment, for every command.
pub struct Audit {
    /// `--audit-dir` / `TRACEFLEET_AUDIT_DIR`.
    pub explicit: Option<PathBuf>,
}

impl Audit {
    /// The log, with `configured` (learner.toml's `[audit] dir`) below `--audit-dir`.
    pub fn log(&self, configured: Option<&Path>) -> Result<AuditLog> {
        Ok(AuditLog::new(
            AuditLog::locate(self.explicit.as_deref(), configured)?,
            AuditLog::this_user(),
        ))
    }

    /// Appends what a command did. The action has taken effect when this runs: a failure says
    /// so.
    pub fn record(
        &self,
        configured: Option<&Path>,
        action: &str,
        subject: &str,
        detail: serde_json::Value,
    ) -> Result<()> {
        self.log(configured)
            .and_then(|log| log.append(action, subject, detail))
            .with_context(|| {
                format!("{action} {subject} took effect but could not be recorded in the audit log")
            })?;
        Ok(())
    }
}

/// `path` made absolute against the working directory (an audit entry outlives the shell it
/// came from; unchanged when that fails), as text (a path that is not UTF-8 shows with
/// replacement characters rather than failing the entry).
pub fn abs(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

/// `learner audit …`.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Print the entries (time, actor, action, subject), then whether the log verifies.
    List {
        #[command(flatten)]
        at: Where,
        /// Print JSON (the entries as stored).
        #[arg(long)]
        json: bool,
    },
    /// Check the chain and every signature; print the number of entries, the audit key and
    /// the head to record elsewhere. Exit 1 naming the first entry altered, removed or moved.
    Verify {
        #[command(flatten)]
        at: Where,
    },
    /// Verify, then write the entries as JSON Lines (to a SIEM or an archive).
    Export {
        #[command(flatten)]
        at: Where,
        /// Where to write (default: standard output).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// Which log, and what to hold it to.
#[derive(clap::Args)]
pub struct Where {
    /// The learner's config (for `[audit] dir`).
    #[arg(long, value_name = "learner.toml")]
    config: Option<PathBuf>,
    /// The audit public key every entry must be signed with (a `.pub` file; default: the
    /// `audit.key.pub` beside the log — pin a copy kept elsewhere).
    #[arg(long, value_name = "PUB")]
    key: Option<PathBuf>,
    /// A head printed by an earlier `verify` (`SEQ:SHA256`): that entry must still be there,
    /// unchanged (catches entries cut off the end).
    #[arg(long, value_name = "SEQ:SHA256")]
    head: Option<Head>,
}

/// What `audit` runs: exit code 1 for a broken log (the message names the entry).
pub fn audit(command: AuditCommand, audit: &Audit) -> Result<std::process::ExitCode> {
    match command {
        AuditCommand::List { at, json } => {
            let (log, bytes) = read(&at, audit)?;
            let result = check(&at, &log, &bytes);
            if json {
                let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&bytes)
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                super::print_json(&entries)?;
            } else {
                for line in String::from_utf8_lossy(&bytes).lines() {
                    match serde_json::from_str::<learner::audit::Entry>(line) {
                        Ok(e) => println!(
                            "{:>5}  {}  {}  {}  {}",
                            e.record.seq,
                            tracefleet::time::rfc3339(e.record.time),
                            super::shown(&e.record.actor),
                            super::shown(&e.record.action),
                            super::shown(&e.record.subject)
                        ),
                        Err(_) => println!("    ?  (not an entry) {}", super::shown(line)),
                    }
                }
            }
            Ok(match result {
                Ok(v) => {
                    eprintln!("{}", summary(&log, &v));
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("NOT VERIFIED: {}: {e}", log.path().display());
                    std::process::ExitCode::from(1)
                }
            })
        }
        AuditCommand::Verify { at } => {
            let (log, bytes) = read(&at, audit)?;
            match check(&at, &log, &bytes) {
                Ok(v) => {
                    println!("{}", summary(&log, &v));
                    Ok(std::process::ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", log.path().display());
                    Ok(std::process::ExitCode::from(1))
                }
            }
        }
        AuditCommand::Export { at, output } => {
            let (log, bytes) = read(&at, audit)?;
            if let Err(e) = check(&at, &log, &bytes) {
                eprintln!("error: {}: {e}: nothing exported", log.path().display());
                return Ok(std::process::ExitCode::from(1));
            }
            match output {
                Some(path) => std::fs::write(&path, &bytes)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => std::io::Write::write_all(&mut std::io::stdout(), &bytes)?,
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn read(at: &Where, audit: &Audit) -> Result<(AuditLog, Vec<u8>)> {
    let configured = match &at.config {
        Some(path) => learner::config::LearnerConfig::load(path)?.audit_dir,
        None => None,
    };
    let log = audit.log(configured.as_deref())?;
    let bytes = match std::fs::read(log.path()) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "{}: no audit log: expected one where the learner's commands record (--audit-dir, TRACEFLEET_AUDIT_DIR or [audit] dir)",
                log.path().display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", log.path().display())),
    };
    Ok((log, bytes))
}

fn check(at: &Where, log: &AuditLog, bytes: &[u8]) -> Result<Verified, learner::audit::Broken> {
    let pub_path = at
        .key
        .clone()
        .unwrap_or_else(|| learner::keys::public_path(&log.dir().join(KEY_FILE)));
    let pinned = match std::fs::read_to_string(&pub_path)
        .map_err(|e| e.to_string())
        .and_then(|t| tracefleet::signed::PublicKey::from_file(&t).map_err(|e| e.to_string()))
    {
        Ok(k) if k.role == tracefleet::signed::KeyRole::Audit => Some(hex::encode(k.to_bytes())),
        Ok(k) => {
            return Err(learner::audit::Broken {
                entry: 1,
                problem: format!(
                    "{}: a {} key: expected the audit public key (role audit)",
                    pub_path.display(),
                    k.role
                ),
            });
        }
        Err(e) if at.key.is_some() => {
            return Err(learner::audit::Broken {
                entry: 1,
                problem: format!("--key {}: {e}", pub_path.display()),
            });
        }
        Err(_) => None,
    };
    learner::audit::verify(bytes, pinned.as_deref(), at.head.as_ref())
}

fn summary(log: &AuditLog, v: &Verified) -> String {
    match (&v.head, &v.key) {
        (Some(head), Some(key)) => format!(
            "{}: {} entries verified, signed by audit key {key}; head {head} (record it elsewhere; `--head` checks it later)",
            log.path().display(),
            v.entries.len()
        ),
        _ => format!("{}: empty", log.path().display()),
    }
}
