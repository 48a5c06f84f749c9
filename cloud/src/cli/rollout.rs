//! Rollout commands: `rollout start` (a signed trace, optionally with its source),
//! `rollout forward` (the library's [`learner::rollout::forward`] re-signs the last good
//! content), `rollout status`, `rollout abort`, and `regenerate` (the library's job
//! pipeline, [`learner::regen::auto::run`]). Each maps its arguments and prints the outcome.

use super::audit::Audit;
use super::{ListArgs, open, print_json, unix_now};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use learner::db::LearnerDb;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracefleet::{compile, signed};

#[derive(clap::Args)]
pub struct RegenerateArgs {
    /// The trace id.
    pub trace: String,
    /// The current source (without it: a first version for --goal).
    #[arg(long, value_name = "TRACE.md")]
    source: Option<PathBuf>,
    /// The goal (default: the source's goal_signature).
    #[arg(long)]
    goal: Option<String>,
    /// Failed runs shown to the model, newest first.
    #[arg(long, default_value_t = 5)]
    failures: u32,
    /// Most rounds (a reply, then a repair per round).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Secret trace-signing key(s).
    #[arg(long = "key", value_name = "KEY", required = true)]
    keys: Vec<PathBuf>,
    /// How long the signature stays valid.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    expires: Duration,
    /// Where the new source and signed trace are written.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    #[command(flatten)]
    stages: Stages,
}

/// How a rollout is staged.
#[derive(clap::Args)]
pub struct Stages {
    /// First a canary set of N devices, or P% (rounded up) of the devices the waves reach,
    /// picked from those known (online first), each sent the trace on its own topic.
    #[arg(long, value_name = "N|P%", value_parser = learner::rollout::parse_canary)]
    pub canary: Option<learner::rollout::Canary>,
    /// Device groups in order, comma-separated; `*` is the whole fleet (e.g.
    /// `canary,wave1,*`).
    #[arg(long, default_value = "*", value_delimiter = ',')]
    pub waves: Vec<String>,
    /// Halt before the next wave when the version's runs fail too often:
    /// `failure-rate>X over N runs` (N is also the runs each wave must report).
    #[arg(long, default_value = "failure-rate>0.2 over 1 runs", value_parser = learner::rollout::parse_abort_if)]
    pub abort_if: (f64, u32),
    /// The learner's config.
    #[arg(long, value_name = "learner.toml")]
    pub config: PathBuf,
}

impl Stages {
    pub fn staging(&self) -> learner::rollout::Staging {
        learner::rollout::Staging {
            canary: self.canary,
            waves: self.waves.clone(),
            abort_if: self.abort_if,
        }
    }
}

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Roll a signed trace out wave by wave; `learner serve` publishes each wave (retained on
    /// its group's topic: offline devices get it when they reconnect) once the previous one
    /// has acknowledged it and reported enough good runs, and halts on the abort criterion.
    Start {
        /// The signed trace (from `learner sign`).
        signed: PathBuf,
        /// Refuse unless the signed trace is this version (guards against the wrong file).
        #[arg(long, value_name = "V")]
        version: Option<String>,
        /// The source it was compiled from: kept by the learner, it goes into the prompt
        /// when this version is regenerated (refused unless it compiles to the signed trace).
        #[arg(long, value_name = "TRACE.md")]
        source: Option<PathBuf>,
        #[command(flatten)]
        stages: Stages,
    },
    /// Roll forward: the content of the trace's last completed rollout, re-signed under a
    /// version above every version the learner knows of it, rolled out like `start` (how a
    /// bad version is undone: versions never go backwards on a device).
    Forward {
        /// The trace id.
        trace: String,
        /// Secret trace-signing key(s).
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
        /// How long the new signature stays valid.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// Also write the re-signed trace here.
        #[arg(short, long, value_name = "SIGNED")]
        output: Option<PathBuf>,
        #[command(flatten)]
        stages: Stages,
    },
    /// Rollouts, newest first: waves reached, runs, failures, state and why.
    Status(ListArgs),
    /// Stop a trace's rollout and withdraw it from the waves it reached.
    Abort {
        /// The trace id.
        trace: String,
        /// The learner's config.
        #[arg(long, value_name = "learner.toml")]
        config: PathBuf,
    },
}

/// `learner rollout …`.
pub fn rollout(command: RolloutCommand, audit: &Audit) -> Result<()> {
    match command {
        RolloutCommand::Start {
            signed: file,
            version,
            source,
            stages,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let s = signed::decode_signed(&bytes).with_context(|| format!("{}", file.display()))?;
            let source = match source {
                Some(path) => Some(source_of(&path, &file, &s)?),
                None => None,
            };
            if let Some(v) = version {
                let v: tracefleet::ids::Version = v.parse().context("--version")?;
                if v != s.header.version {
                    bail!(
                        "{}: {} version {}: expected version {v} (--version)",
                        file.display(),
                        s.header.trace_id,
                        s.header.version
                    );
                }
            }
            let (config, mut db) = open(&stages.config)?;
            let waves = start_rollout(&mut db, &stages, &bytes, &s)?;
            if let Some(text) = &source {
                db.record_source(
                    s.header.trace_id.as_str(),
                    &s.header.version.to_string(),
                    text,
                )?;
            }
            audit.record(
                config.audit_dir.as_deref(),
                "rollout start",
                &format!("{} {}", s.header.trace_id, s.header.version),
                json!({ "signed": super::audit::abs(&file), "waves": waves, "abort_if": abort_rule(&stages), "with_source": source.is_some() }),
            )
        }
        RolloutCommand::Forward {
            trace,
            keys: key_files,
            expires,
            output,
            stages,
        } => forward(
            &trace,
            &key_files,
            expires,
            output.as_deref(),
            &stages,
            audit,
        ),
        RolloutCommand::Status(ListArgs { config, json }) => {
            let (_, db) = open(&config)?;
            let rollouts = learner::rollout::list(&db)?;
            if json {
                print_json(&rollouts)?;
            } else {
                for r in rollouts {
                    println!(
                        "{} {}\t{}\twave {}/{} ({})\t{} runs, {} failed\t{}",
                        r.trace_id,
                        r.version,
                        r.state,
                        r.wave + 1,
                        r.waves.len(),
                        r.waves
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        r.runs,
                        r.failures,
                        r.reason
                    );
                }
            }
            Ok(())
        }
        RolloutCommand::Abort { trace, config } => {
            let (config, db) = open(&config)?;
            if !learner::rollout::abort(&db, &trace, i64::try_from(unix_now()).unwrap_or(i64::MAX))?
            {
                bail!("no running or halted rollout of {trace}");
            }
            println!("rollout of {trace} aborting: `learner serve` withdraws it");
            audit.record(
                config.audit_dir.as_deref(),
                "rollout abort",
                &trace,
                json!({}),
            )
        }
    }
}

/// `learner rollout forward`.
fn forward(
    trace: &str,
    key_files: &[PathBuf],
    expires: Duration,
    output: Option<&Path>,
    stages: &Stages,
    audit: &Audit,
) -> Result<()> {
    let secrets = learner::keys::read_trace_keys(key_files)?;
    let (config, mut db) = open(&stages.config)?;
    let f = learner::rollout::forward(&db, trace, &secrets, expires)?;
    if let Some(out) = output {
        std::fs::write(out, &f.bytes).with_context(|| format!("writing {}", out.display()))?;
    }
    println!(
        "{trace}: the content of {} (the last completed rollout) re-signed as {} (above {})",
        f.good, f.version, f.top
    );
    let waves = start_rollout(&mut db, stages, &f.bytes, &f.signed)?;
    let keys: Vec<String> = secrets
        .iter()
        .map(|k| k.public().key_id().to_string())
        .collect();
    audit.record(
        config.audit_dir.as_deref(),
        "rollout forward",
        &format!("{trace} {}", f.version),
        json!({ "content_of": f.good.to_string(), "above": f.top.to_string(), "keys": keys, "waves": waves, "abort_if": abort_rule(stages) }),
    )
}

/// `learner regenerate`.
pub fn regenerate(mut a: RegenerateArgs, audit: &Audit) -> Result<()> {
    use learner::regen::{self, auto};
    let secrets = learner::keys::read_trace_keys(&a.keys)?;
    tracefleet::wire::check_name("trace id", &a.trace)?;
    let config = learner::config::LearnerConfig::load(&a.stages.config)?;
    let backend_config = config.backend.clone().with_context(|| {
        format!(
            "{}: no [backend]: expected the model to ask (kind = \"anthropic\" or \"openai\", model, base_url, …)",
            a.stages.config.display()
        )
    })?;
    let current = match &a.source {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let compiled_current = match &current {
        Some(text) => Some(
            compile::compile_source(&a.trace, text)
                .map(|(t, _)| t)
                .map_err(|d| {
                    anyhow::anyhow!(
                        "{}: {d}",
                        a.source
                            .as_ref()
                            .map_or(String::new(), |p| p.display().to_string())
                    )
                })?,
        ),
        None => None,
    };
    let goal = match (&a.goal, &compiled_current) {
        (Some(g), _) => g.clone(),
        (None, Some(t)) => t.goal_signature.clone(),
        (None, None) => {
            bail!("--goal: needed without --source (a first version is written from the goal)")
        }
    };
    let mut db = config.open_db()?;
    let backend = regen::backend::AnyBackend::new(&backend_config)?;
    let job = auto::Job {
        trace_id: a.trace.clone(),
        goal,
        from_version: compiled_current.as_ref().map(|t| t.version.to_string()),
        current,
        trigger: "command".into(),
    };
    if a.stages.canary.is_none() {
        a.stages.canary = Some(learner::rollout::Canary::Devices(1));
    }
    let signing = auto::Signing {
        keys: std::sync::Arc::new(secrets),
        expires: a.expires,
        out_dir: a.out_dir.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let done = rt.block_on(auto::run(
        &mut db,
        &backend,
        &backend_config.model,
        &job,
        &auto::Attempt {
            max_rounds: a.rounds,
            failures: a.failures,
            dry_run: config.dry_run.as_ref(),
        },
        &signing,
        &a.stages.staging(),
    ))?;
    if let Some(d) = &done.dry_run {
        println!("{}: {d}", a.trace);
    }
    println!(
        "{}: {} wrote version {} in {} round(s) ({} input + {} output tokens, ${:.4}) → {}, {}",
        a.trace,
        done.model,
        done.version,
        done.rounds,
        done.input_tokens,
        done.output_tokens,
        done.cost,
        done.source_path.display(),
        done.signed_path.display()
    );
    audit.record(
        config.audit_dir.as_deref(),
        "regenerate",
        &format!("{} {}", a.trace, done.version),
        done.audit_detail(&job),
    )?;
    match done.rollout {
        Ok(waves) => {
            println!(
                "{}",
                learner::rollout::describe_start(
                    &a.trace,
                    &done.version.to_string(),
                    &waves,
                    a.stages.abort_if
                )
            );
            Ok(())
        }
        Err(e) => bail!(
            "the regenerated trace is signed in {} but its rollout was not recorded (`learner rollout start` it when devices are known): --{e}",
            done.signed_path.display()
        ),
    }
}

/// The abort rule as `--abort-if` writes it (a string: the audit log holds no floats, which
/// JSON may not give back bit for bit).
fn abort_rule(stages: &Stages) -> String {
    format!(
        "failure-rate>{} over {} runs",
        stages.abort_if.0, stages.abort_if.1
    )
}

/// Records a rollout of `bytes` (the signed trace `s`) staged as `stages` says; returns its
/// waves as text.
fn start_rollout(
    db: &mut LearnerDb,
    stages: &Stages,
    bytes: &[u8],
    s: &signed::SignedTrace,
) -> Result<Vec<String>> {
    let id = s.header.trace_id.to_string();
    let version = s.header.version.to_string();
    let staging = stages.staging();
    let waves = learner::rollout::start_staged(
        db,
        &staging,
        &id,
        &version,
        bytes,
        i64::try_from(unix_now()).unwrap_or(i64::MAX),
    )
    .map_err(|e| anyhow::anyhow!("--{e}"))?;
    println!(
        "{}",
        learner::rollout::describe_start(&id, &version, &waves, staging.abort_if)
    );
    if let Some(sealed) = &s.sealed {
        let outside = learner::rollout::not_recipients(db, &waves, &sealed.recipients)?;
        if !outside.is_empty() {
            eprintln!(
                "warning: {} device(s) these waves reach are not recipients of this confidential trace and will refuse it (a wave waits for each of its devices to install): {}",
                outside.len(),
                outside.join(", ")
            );
        }
    }
    Ok(waves.iter().map(ToString::to_string).collect())
}

/// The text of `path`, refused unless it compiles to the trace signed in `signed_file` (for a
/// confidential trace: to its id and version).
fn source_of(path: &Path, signed_file: &Path, s: &signed::SignedTrace) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (trace, _) = compile::compile_source(&path.display().to_string(), &text)
        .map_err(|d| anyhow::anyhow!("{}", d.render(&text).trim_end()))?;
    // A confidential trace's content is ciphertext the learner cannot read: then the source
    // must name the same trace and version.
    let matches = match &s.sealed {
        None => compile::encode_compiled(&trace) == s.compiled,
        Some(_) => trace.id == s.header.trace_id && trace.version == s.header.version,
    };
    if !matches {
        bail!(
            "--source {}: compiles to {} {}, not to the trace signed in {} ({} {}): expected the source that file was compiled from",
            path.display(),
            trace.id,
            trace.version,
            signed_file.display(),
            s.header.trace_id,
            s.header.version
        );
    }
    Ok(text)
}
