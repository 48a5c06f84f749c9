//! The `learner` binary: compile trace sources, generate keys, sign compiled traces.
//!
//! Exit codes: 0 success; 2 bad input (compile errors, malformed keys) or a usage error.

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use learner::keys;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracefleet::signed::{self, KeyRole};
use tracefleet::{compile, source};

/// Compile, sign and (later) roll out tracefleet traces.
#[derive(Parser)]
#[command(
    name = "learner",
    version,
    about,
    long_about = None,
    after_help = "A trace from source to a device:\n  \
        learner keys generate --out traces.key          # traces.key (0600) + traces.key.pub\n  \
        learner compile my.trace.md -o my.tfc            # check; errors show file:line:col\n  \
        learner sign my.tfc --key traces.key -o my.tfs   # sign (expires in 365d by default)\n  \
        follower trust init traces.key.pub && follower run my.tfs\n\n\
        The trace format: docs/trace-language.md. Exit codes: 0 ok, 2 bad input."
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
    /// Sign a compiled trace.
    Sign {
        /// The compiled trace (from `learner compile`).
        compiled: PathBuf,
        /// The secret trace-signing key.
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// How long the signature stays valid (e.g. `90d`, `12h`).
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// The signed trace to write.
        #[arg(short, long, value_name = "SIGNED")]
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

/// Restores the default SIGPIPE action so that `follower … | head` ends quietly instead of
/// panicking on a closed stdout (Rust ignores SIGPIPE by default).
#[allow(unsafe_code)]
fn default_sigpipe() {
    // SAFETY: called first in `main`, before any thread exists; SIG_DFL installs no handler code.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
}

fn main() -> ExitCode {
    default_sigpipe();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(Cli::parse()) {
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
            key,
            expires,
            output,
        } => {
            let secret = keys::read_secret(&key)?;
            if secret.role != KeyRole::Traces {
                bail!(
                    "{}: a {} key: expected a trace-signing key (role traces)",
                    key.display(),
                    secret.role
                );
            }
            let bytes = read_limited(&compiled, compile::MAX_COMPILED_BYTES as u64)?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let signed = signed::sign(&bytes, &secret, now, now.saturating_add(expires.as_secs()))
                .with_context(|| format!("{}", compiled.display()))?;
            std::fs::write(&output, signed::encode_signed(&signed))
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "signed {} {} with key {} → {}",
                signed.header.trace_id,
                signed.header.version,
                secret.public().key_id(),
                output.display()
            );
            Ok(())
        }
    }
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
