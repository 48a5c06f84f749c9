//! `follower trust init|update|show`: provisioning and rotating the device's trust root, and
//! printing one (also for `inspect`); `follower identity`: the device's key for confidential
//! traces, created with the first trust root.

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use follower::files::read_limited;
use follower::store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracefleet::signed;
use tracefleet::time::{rfc3339, rfc3339_now, unix_now};
use tracefleet::trust;

#[derive(Subcommand)]
pub enum TrustCommand {
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

pub fn command(state_dir: &Path, cmd: TrustCommand) -> Result<ExitCode> {
    match cmd {
        TrustCommand::Init { root } => {
            let bytes = read_limited(&root, trust::MAX_ROOT_BYTES as u64)?;
            let mut store = Store::open(state_dir)?;
            if let Some((current, _)) = store.trust_root()? {
                bail!(
                    "this device is already provisioned with trust root v{}: use `follower trust update` to rotate",
                    current.version
                );
            }
            let accepted = trust::verify_initial(&bytes, unix_now())
                .with_context(|| format!("refusing {}", root.display()))?;
            store.add_trust_roots(None, &[(accepted.version, &bytes)], &rfc3339_now())?;
            println!("trust root v{} installed", accepted.version);
            print_root(&accepted);
            let (identity, created) = follower::identity::ensure(state_dir)?;
            println!(
                "identity {} ({}{})",
                identity.recipient(),
                follower::identity::path(state_dir).display(),
                if created { ", created" } else { "" }
            );
            Ok(ExitCode::SUCCESS)
        }
        TrustCommand::Update { roots } => {
            let mut store = Store::open(state_dir)?;
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
            store.add_trust_roots(Some(current.version), &rows, &rfc3339_now())?;
            if let Some((newest, _)) = chain.last() {
                println!("trust root v{} → v{}", current.version, newest.version);
                print_root(newest);
            }
            Ok(ExitCode::SUCCESS)
        }
        TrustCommand::Show => {
            let store = Store::open(state_dir)?;
            match store.trust_root()? {
                None => println!("no trust root (run `follower trust init ROOT.tfr`)"),
                Some((root, _)) => {
                    println!("trust root v{}", root.version);
                    print_root(&root);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn print_root(root: &trust::TrustRoot) {
    println!("  expires {}", rfc3339(root.expires_at));
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
            println!("    {id}  expires {}", rfc3339(k.expires_at));
        }
    }
}

/// `follower identity [--json]`: the device's recipient, creating the identity when missing.
pub fn identity(state_dir: &Path, json: bool) -> Result<ExitCode> {
    let (identity, created) = follower::identity::ensure(state_dir)?;
    let path = follower::identity::path(state_dir);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "recipient": identity.recipient().to_string(),
                "file": path.display().to_string(),
                "created": created,
            }))?
        );
    } else {
        println!("{}", identity.recipient());
        if created {
            eprintln!("created {} (0600)", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
