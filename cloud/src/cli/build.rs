//! Authoring commands: `compile` (trace sources to compiled traces, diagnostics printed),
//! `keys generate`, `sign` and `cosign`, `trust create` (a trust root from public key files)
//! and `bundle create` (signed traces, models and root updates in one signed file for USB).

use super::audit::{Audit, abs};
use super::read_limited;
use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use learner::keys;
use serde_json::json;
use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracefleet::signed::{self, KeyRole};
use tracefleet::{compile, source};

// `learner compile`'s arguments.
#[derive(clap::Args)]
pub struct CompileArgs {
    /// Trace sources.
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    /// Output file (one source) or directory (several); default: beside each source, `.tfc`.
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Only check; write nothing.
    #[arg(long)]
    pub check: bool,
    /// How to print diagnostics: `human` (source line and caret) or `short`
    /// (`file:line:col: error: message`, one per line).
    #[arg(long, value_enum, default_value = "human")]
    pub message_format: MessageFormat,
}

// `learner sign`'s arguments.
#[derive(clap::Args)]
pub struct SignArgs {
    /// The compiled trace (from `learner compile`).
    pub compiled: PathBuf,
    /// Secret trace-signing key(s).
    #[arg(long = "key", value_name = "KEY", required = true)]
    pub keys: Vec<PathBuf>,
    /// How long the signature stays valid (e.g. `90d`, `12h`).
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub expires: Duration,
    /// The signed trace to write.
    #[arg(short, long, value_name = "SIGNED")]
    pub output: PathBuf,
    /// Make it a confidential trace, encrypted to a device's identity (`age1…`, as `follower
    /// identity` prints it) or to every device of a group that has sent its identity in a
    /// heartbeat (`@GROUP`, needs --config). Repeatable; only recipients can install and run it.
    #[arg(long = "encrypt-to", value_name = "RECIPIENT|@GROUP")]
    pub encrypt_to: Vec<String>,
    /// The learner's config: its database knows the devices of an `@GROUP`, and its
    /// `[audit] dir` is where this signature is recorded.
    #[arg(long, value_name = "learner.toml")]
    pub config: Option<PathBuf>,
}

// `learner cosign`'s arguments.
#[derive(clap::Args)]
pub struct CosignArgs {
    /// The signed trace.
    pub signed: PathBuf,
    /// The secret trace-signing key.
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
    /// Where to write the result (default: in place).
    #[arg(short, long, value_name = "SIGNED")]
    pub output: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum BundleCommand {
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
pub enum TrustCommand {
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
pub enum KeysCommand {
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
pub enum MessageFormat {
    Human,
    Short,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Role {
    Root,
    Traces,
    Commands,
    Audit,
}

/// `learner compile`.
pub fn compile(a: CompileArgs) -> Result<()> {
    compile_all(&a.sources, a.output.as_deref(), a.check, a.message_format)
}

/// `learner keys generate`.
pub fn generate_key(KeysCommand::Generate { role, out }: KeysCommand, audit: &Audit) -> Result<()> {
    let role = match role {
        Role::Root => KeyRole::Root,
        Role::Traces => KeyRole::Traces,
        Role::Commands => KeyRole::Commands,
        Role::Audit => KeyRole::Audit,
    };
    let public = keys::generate(role, &out)?;
    println!("{role} key {}", public.key_id());
    println!("secret: {} (0600)", out.display());
    println!("public: {}", keys::public_path(&out).display());
    audit.record(
        None,
        "keys generate",
        &format!("{role} key {}", public.key_id()),
        json!({ "role": role.to_string(), "key_id": public.key_id().to_string(), "secret_file": abs(&out) }),
    )
}

/// `learner sign`.
pub fn sign(
    SignArgs {
        compiled,
        keys: key_files,
        expires,
        output,
        encrypt_to,
        config,
    }: SignArgs,
    audit: &Audit,
) -> Result<()> {
    let secrets = keys::read_trace_keys(&key_files)?;
    let config = config
        .as_deref()
        .map(learner::config::LearnerConfig::load)
        .transpose()?;
    let recipients = recipients(&encrypt_to, config.as_ref())?;
    let bytes = read_limited(&compiled, compile::MAX_COMPILED_BYTES as u64)?;
    let signed = keys::sign_all(&bytes, &secrets, expires, &recipients)
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
    if !recipients.is_empty() {
        println!(
            "confidential: encrypted to {} recipient(s); only they can install and run it",
            recipients.len()
        );
    }
    // With --config, its `[audit] dir` (below --audit-dir), as for the other commands.
    audit.record(
        config.as_ref().and_then(|c| c.audit_dir.as_deref()),
        "sign",
        &format!("{} {}", signed.header.trace_id, signed.header.version),
        json!({
            "keys": ids,
            "content_hash": hex::encode(signed.header.content_hash),
            "expires_at": signed.header.expires_at,
            "output": abs(&output),
            "encrypted_to": signed.sealed.as_ref().map(|s| &s.recipients),
        }),
    )
}

/// The recipients `--encrypt-to` names: `age1…` as given, `@GROUP` as the identities the
/// group's devices sent in their heartbeats (a device that has sent none is named on stderr:
/// it will refuse the trace). In the order given, each once.
fn recipients(
    encrypt_to: &[String],
    config: Option<&learner::config::LearnerConfig>,
) -> Result<Vec<tracefleet::confidential::Recipient>> {
    let mut out: Vec<tracefleet::confidential::Recipient> = Vec::new();
    let mut devices = None;
    for item in encrypt_to {
        let found = if let Some(group) = item.strip_prefix('@') {
            let config = config.with_context(|| {
                format!("--encrypt-to {item}: a group's devices come from the learner's database: pass --config learner.toml")
            })?;
            if devices.is_none() {
                devices = Some(config.open_db()?.device_groups()?);
            }
            let members: Vec<_> = devices
                .iter()
                .flatten()
                .filter(|d| d.groups.iter().any(|g| g == group))
                .collect();
            let missing: Vec<String> = members
                .iter()
                .filter(|d| d.recipient.is_none())
                .map(|d| d.device_id.to_string())
                .collect();
            let known: Vec<tracefleet::confidential::Recipient> = members
                .iter()
                .filter_map(|d| d.recipient.as_deref())
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("--encrypt-to {item}: a stored device identity"))?;
            if known.is_empty() {
                bail!(
                    "--encrypt-to {item}: no device of group {group:?} has sent its identity in a heartbeat ({} device(s) known in the group): expected at least one (`learner devices list` shows them)",
                    members.len()
                );
            }
            for d in &members {
                if let Some(r) = &d.recipient {
                    println!("{item}: {} {r}", d.device_id);
                }
            }
            if !missing.is_empty() {
                eprintln!(
                    "warning: {} device(s) of group {group:?} have sent no identity yet and will refuse this trace: {}",
                    missing.len(),
                    missing.join(", ")
                );
            }
            known
        } else {
            vec![
                item.parse()
                    .with_context(|| format!("--encrypt-to {item}"))?,
            ]
        };
        for r in found {
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// `learner cosign`.
pub fn cosign(
    CosignArgs {
        signed: file,
        key,
        output,
    }: CosignArgs,
    audit: &Audit,
) -> Result<()> {
    let secret = keys::read_trace_keys(std::slice::from_ref(&key))?.remove(0);
    let bytes = read_limited(&file, signed::MAX_SIGNED_BYTES as u64)?;
    let mut s = signed::decode_signed(&bytes).with_context(|| format!("{}", file.display()))?;
    signed::add_signature(&mut s, &secret);
    let out = output.unwrap_or(file);
    std::fs::write(&out, signed::encode_signed(&s))
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{} now carries {} signature(s)",
        out.display(),
        s.signatures.len()
    );
    audit.record(
        None,
        "cosign",
        &format!("{} {}", s.header.trace_id, s.header.version),
        json!({
            "key": secret.public().key_id().to_string(),
            "signatures": s.signatures.len(),
            "output": abs(&out),
        }),
    )
}

/// `learner bundle create`.
pub fn bundle(
    BundleCommand::Create {
        output,
        signed: signed_files,
        models,
        roots,
        trust_root,
        keys: key_files,
        expires,
    }: BundleCommand,
    audit: &Audit,
) -> Result<()> {
    learner::authoring::create_bundle(
        &output,
        &signed_files,
        &models,
        &roots,
        &trust_root,
        &key_files,
        expires,
    )?;
    println!(
        "bundle {} ({} traces, {} models, {} root updates), expires in {}",
        output.display(),
        signed_files.len(),
        models.len(),
        roots.len(),
        humantime::format_duration(expires)
    );
    audit.record(
        None,
        "bundle create",
        &abs(&output),
        json!({
            "traces": signed_files.iter().map(|p| abs(p)).collect::<Vec<_>>(),
            "models": models.iter().map(|p| abs(p)).collect::<Vec<_>>(),
            "roots": roots.iter().map(|p| abs(p)).collect::<Vec<_>>(),
            "expires_in_s": expires.as_secs(),
        }),
    )
}

/// `learner trust create`.
pub fn trust(
    TrustCommand::Create {
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
    }: TrustCommand,
    audit: &Audit,
) -> Result<()> {
    let (root, bytes, signatures) =
        learner::authoring::create_root(&learner::authoring::RootPlan {
            version,
            expires,
            root_keys: &root_keys,
            root_threshold,
            traces_keys: &traces_keys,
            traces_threshold,
            commands_keys: &commands_keys,
            commands_threshold,
            signers: &signers,
        })?;
    std::fs::write(&output, &bytes).with_context(|| format!("writing {}", output.display()))?;
    println!(
        "trust root v{version} → {} (root {root_threshold}/{}, traces {traces_threshold}/{}, {} signature(s))",
        output.display(),
        root.root.keys.len(),
        root.traces.keys.len(),
        signatures
    );
    let ids = |k: &tracefleet::trust::RoleKeys| {
        k.keys
            .iter()
            .map(|k| hex::encode(sha2::Sha256::digest(k.public_key)))
            .collect::<Vec<_>>()
    };
    audit.record(
        None,
        "trust create",
        &format!("trust root v{version}"),
        json!({
            "root_keys": ids(&root.root),
            "root_threshold": root_threshold,
            "traces_keys": ids(&root.traces),
            "traces_threshold": traces_threshold,
            "commands_keys": ids(&root.commands),
            "commands_threshold": commands_threshold,
            "expires_at": root.expires_at,
            "signatures": signatures,
            "output": abs(&output),
        }),
    )
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
