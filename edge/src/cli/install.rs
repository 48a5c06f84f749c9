//! `follower install FILE`: a signed trace or a bundle, told apart by its magic bytes;
//! refusals are logged in the store and exit 2; a large bundle shows a progress bar on a
//! terminal.

use anyhow::{Context, Result, anyhow, bail};
use follower::files::read_limited;
use follower::install::{SignedRefused, install_signed};
use follower::store::Store;
use std::path::Path;
use std::process::ExitCode;
use tracefleet::signed::{self, SIGNED_MAGIC};
use tracefleet::time::{rfc3339_now, unix_now};

/// `follower install FILE`: verify, refuse rollback, store atomically.
pub fn install(state_dir: &Path, file: &Path) -> Result<ExitCode> {
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
    match install_signed(&mut store, &bytes, None, unix_now(), &rfc3339_now()) {
        Ok(t) => {
            println!("installed {} {}", t.trace_id, t.version);
            Ok(ExitCode::SUCCESS)
        }
        Err(SignedRefused {
            trace_id: None,
            error,
        }) => {
            let e = anyhow::Error::from(error);
            store.log_refusal("trace", &shown, &format!("{e:#}"), &rfc3339_now())?;
            Err(e.context(format!("refusing {shown}")))
        }
        Err(SignedRefused {
            trace_id: Some(id),
            error,
        }) => {
            store.log_refusal("trace", &id, &error.to_string(), &rfc3339_now())?;
            Err(error.into())
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
        &rfc3339_now(),
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
            for (name, why) in &done.skipped {
                println!("left out {name}: {why}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            store.log_refusal("bundle", &shown, &e.to_string(), &rfc3339_now())?;
            Err(anyhow!(e).context(format!("refusing {shown}")))
        }
    }
}
