//! `follower inspect FILE`: what a bundle, a trust root, a signed or compiled trace or a
//! trace source holds (signatures not verified: `install` and `run` verify). A confidential
//! trace is shown whole only when it verifies against the device's trust root and its
//! identity decrypts it; otherwise its header.

use super::trust::print_root;
use anyhow::{Context, Result, anyhow};
use follower::files::read_limited;
use std::path::Path;
use std::process::ExitCode;
use tracefleet::compile;
use tracefleet::signed::{self, SIGNED_MAGIC};
use tracefleet::time::rfc3339;
use tracefleet::trust;

pub fn inspect(state_dir: &Path, file: &Path, json: bool) -> Result<ExitCode> {
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
            rfc3339(manifest.created_at),
            rfc3339(manifest.expires_at)
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
        let t = match &s.sealed {
            None => compile::decode_compiled(&s.compiled).with_context(|| shown.clone())?,
            Some(sealed) => match decrypted(state_dir, &bytes) {
                Ok(trace) => trace,
                Err(why) => return header_only(&s, sealed, &why, json),
            },
        };
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
        let fmt = rfc3339;
        println!(
            "signed: created {}, expires {}, content sha256 {}",
            fmt(s.header.created_at),
            fmt(s.header.expires_at),
            hex::encode(s.header.content_hash)
        );
        if let Some(sealed) = &s.sealed {
            println!(
                "confidential: encrypted to {} recipient(s); verified and decrypted with this device's identity",
                sealed.recipients.len()
            );
        }
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

/// A confidential trace verified against the device's trust root and decrypted with its
/// identity, as a run does (nothing is decrypted before the signatures passed); or why not.
fn decrypted(state_dir: &Path, bytes: &[u8]) -> Result<tracefleet::Trace, String> {
    // Opening the store would create one: a machine that has none has no root either.
    if !state_dir.join("follower.db").exists() {
        return Err("no trust root on this device to verify it against".into());
    }
    let store = follower::store::Store::open(state_dir).map_err(|e| e.to_string())?;
    follower::runner::verify_signed(&store, bytes)
        .map(|(v, _)| v.trace)
        .map_err(|e| format!("{e:#}"))
}

/// What can be shown of a confidential trace without decrypting it: the signed header, the
/// recipients and the signatures.
fn header_only(
    s: &signed::SignedTrace,
    sealed: &signed::Sealed,
    why: &str,
    json: bool,
) -> Result<ExitCode> {
    let h = &s.header;
    if json {
        let v = serde_json::json!({
            "confidential": true,
            "trace_id": h.trace_id,
            "version": h.version.to_string(),
            "created_at": h.created_at,
            "expires_at": h.expires_at,
            "content_sha256": hex::encode(h.content_hash),
            "recipients": sealed.recipients,
            "signatures": s.signatures.iter().map(|e| e.key_id.to_string()).collect::<Vec<_>>(),
            "not_decrypted": why,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "confidential trace {} {}: encrypted to {} recipient(s); header only ({why})",
        h.trace_id,
        h.version,
        sealed.recipients.len()
    );
    println!(
        "signed: created {}, expires {}, content sha256 {}",
        rfc3339(h.created_at),
        rfc3339(h.expires_at),
        hex::encode(h.content_hash)
    );
    for r in &sealed.recipients {
        println!("  recipient {r}");
    }
    for sig in &s.signatures {
        println!("  signature by key {}", sig.key_id);
    }
    println!("(signatures not verified by inspect; `follower run` verifies)");
    Ok(ExitCode::SUCCESS)
}
