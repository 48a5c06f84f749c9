//! Regeneration as a job, and the triggers that start one without a person (learn once with
//! a large model, execute many times on small ones).
//!
//! [`run`] is the whole pipeline both `learner regenerate` and `learner serve` use: the
//! trace's newest failed runs and its kept source go into the prompt ([`super::regenerate`]),
//! the result gets the next minor version above every version known, is signed with the
//! trace keys, written (source and signed file) to the output directory, its source kept in
//! the learner's database, and rolled out as the [`Staging`] says (a canary first by
//! default). Every attempt — compiled, given up, backend failed, skipped — is a row in
//! `regenerations` with what set it off.
//!
//! With a `[regenerate]` table in learner.toml (and a `[backend]`), `learner serve` looks for
//! work every tick ([`due`]):
//! - **confidence**: the newest version of a trace has at least `min_runs` runs and its
//!   fleet confidence is below `below_confidence`;
//! - **escalation**: a run of a trace escalated (`human_escalate`; escalations without a run,
//!   such as an autonomy refusal, are for people only);
//! - **low fidelity**: devices report a judgement step of the newest version whose model
//!   repeats fewer of its reference answers than the step's `min_fidelity` (what
//!   [`crate::db::LearnerDb::low_fidelity`] finds); every job's prompt holds the
//!   disagreements reported for the version it replaces (the example, the answer expected,
//!   the device model's answer), whatever set it off;
//! - **new goal**: a device asked for a goal no installed trace matches
//!   ([`tracefleet::wire::unmatched_goal`]): a first version is written under an id made from
//!   the goal ([`goal_trace_id`]).
//!
//! One regeneration per trace version: a version that was regenerated successfully is never
//! regenerated again (the new version is judged on its own runs); one whose attempt failed
//! is tried again after `retry_after`. One job runs at a time, on its own thread and
//! database connection, so ingest never waits for the model.

use super::backend::{AnyBackend, Backend, BackendConfig};
use super::{Failure, RegenError, Request};
use crate::db::{LearnerDb, now_secs, regen::RegenerationRow};
use crate::rollout::{Staging, Wave};
use serde::Deserialize;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracefleet::ids::Version;
use tracefleet::signed::SecretKey;

/// `[regenerate]` in learner.toml: automatic regeneration in `learner serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoConfig {
    /// Secret trace-signing key files (relative to learner.toml); several reach a threshold.
    pub keys: Vec<PathBuf>,
    /// How long a regenerated trace's signature stays valid (humantime, default `90d`).
    #[serde(default = "default_expires")]
    pub expires: String,
    /// Where regenerated sources and signed traces are written (default `regenerated`).
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
    /// Most rounds per regeneration (a reply, then a repair per round; default 3).
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// Failed runs shown to the model, newest first (default 5).
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// Regenerate when the newest version's fleet confidence is below this (default 0.5).
    #[serde(default = "default_below")]
    pub below_confidence: f64,
    /// … once it has at least this many runs (default 3).
    #[serde(default = "default_min_runs")]
    pub min_runs: u32,
    /// Regenerate a trace when one of its runs escalates (default true).
    #[serde(default = "yes")]
    pub on_escalation: bool,
    /// Regenerate a trace when devices report a judgement step of its newest version below
    /// the step's `min_fidelity` (default true).
    #[serde(default = "yes")]
    pub on_low_fidelity: bool,
    /// Write a first trace for a goal a device found no trace for (default true).
    #[serde(default = "yes")]
    pub new_goals: bool,
    /// Try a version again this long after an attempt that failed (humantime, default `1h`).
    #[serde(default = "default_retry")]
    pub retry_after: String,
    /// Canary set of the rollout: `N` devices or `P%` (default `1`).
    #[serde(default = "default_canary")]
    pub canary: String,
    /// Waves after the canary (default `["*"]`, the whole fleet).
    #[serde(default = "default_waves")]
    pub waves: Vec<String>,
    /// When the rollout halts (default `failure-rate>0.5 over 1 runs`).
    #[serde(default = "default_abort_if")]
    pub abort_if: String,
}

fn default_expires() -> String {
    "90d".into()
}
fn default_out_dir() -> PathBuf {
    "regenerated".into()
}
fn default_rounds() -> u32 {
    3
}
fn default_failures() -> u32 {
    5
}
fn default_below() -> f64 {
    0.5
}
fn default_min_runs() -> u32 {
    3
}
fn yes() -> bool {
    true
}
fn default_retry() -> String {
    "1h".into()
}
fn default_canary() -> String {
    "1".into()
}
fn default_waves() -> Vec<String> {
    vec![crate::rollout::FLEET.into()]
}
fn default_abort_if() -> String {
    "failure-rate>0.5 over 1 runs".into()
}

/// [`AutoConfig`] checked and parsed.
#[derive(Debug, Clone)]
pub struct Auto {
    /// As written (paths made absolute).
    pub config: AutoConfig,
    /// Signature validity.
    pub expires: Duration,
    /// Retry interval after a failed attempt.
    pub retry_after: Duration,
    /// The rollout of a result.
    pub staging: Staging,
}

impl AutoConfig {
    /// Resolves paths against `dir` (the config file's) and parses durations and stages.
    ///
    /// # Errors
    /// A message naming the setting and what was expected.
    pub fn resolve(mut self, dir: &Path) -> Result<Auto, String> {
        if self.keys.is_empty() {
            return Err("[regenerate] keys: expected at least one trace-signing key file".into());
        }
        self.keys = self.keys.iter().map(|k| dir.join(k)).collect();
        self.out_dir = dir.join(&self.out_dir);
        let duration = |what: &str, s: &str| {
            humantime::parse_duration(s)
                .map_err(|e| format!("[regenerate] {what} {s:?}: {e} (expected e.g. 90d, 1h)"))
        };
        if !(0.0..=1.0).contains(&self.below_confidence) {
            return Err(format!(
                "[regenerate] below_confidence {}: expected a number from 0 to 1",
                self.below_confidence
            ));
        }
        Ok(Auto {
            expires: duration("expires", &self.expires)?,
            retry_after: duration("retry_after", &self.retry_after)?,
            staging: Staging {
                canary: Some(
                    crate::rollout::parse_canary(&self.canary)
                        .map_err(|e| format!("[regenerate] {e}"))?,
                ),
                waves: self.waves.clone(),
                abort_if: crate::rollout::parse_abort_if(&self.abort_if)
                    .map_err(|e| format!("[regenerate] {e}"))?,
            },
            config: self,
        })
    }
}

/// One regeneration to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The trace id the result keeps (for a new goal: [`goal_trace_id`]).
    pub trace_id: String,
    /// The goal.
    pub goal: String,
    /// The version it replaces (`None`: a first version).
    pub from_version: Option<String>,
    /// That version's source, if the learner has it.
    pub current: Option<String>,
    /// What set it off (`command`, or the trigger and its figures).
    pub trigger: String,
}

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// Most rounds (a reply, then a repair per round).
    pub max_rounds: u32,
    /// Failed runs shown to the model, newest first.
    pub failures: u32,
    /// Dry-run each candidate that compiles.
    pub dry_run: Option<&'a super::dry_run::DryRunner>,
}

/// How a result is signed and where it is written.
pub struct Signing {
    /// Trace-signing keys (shared with the thread a job runs on).
    pub keys: std::sync::Arc<Vec<SecretKey>>,
    /// Signature validity from now.
    pub expires: Duration,
    /// Output directory for `<id>-<version>.trace.md` and `.tfs`.
    pub out_dir: PathBuf,
}

/// A regenerated trace, signed, written and (if it could be) rolled out.
#[derive(Debug, Clone)]
pub struct Done {
    /// Its version.
    pub version: Version,
    /// The source written.
    pub source_path: PathBuf,
    /// The signed trace written.
    pub signed_path: PathBuf,
    /// Rounds used.
    pub rounds: u32,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Dollars.
    pub cost: f64,
    /// The model that answered.
    pub model: String,
    /// The rollout's waves, or why it was not started.
    pub rollout: Result<Vec<Wave>, String>,
    /// How the dry run went (`None`: none configured).
    pub dry_run: Option<String>,
}

impl Done {
    /// The detail of a `regenerate` entry: trigger, versions, model, rounds, tokens, cost (a
    /// string: no floats in the log, which JSON may not give back bit for bit), the files written
    /// and whether the rollout started.
    pub fn audit_detail(&self, job: &Job) -> serde_json::Value {
        serde_json::json!({
            "trigger": job.trigger,
            "from_version": job.from_version,
            "model": self.model,
            "rounds": self.rounds,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_dollars": format!("{:.4}", self.cost),
            "signed": self.signed_path.display().to_string(),
            "source": self.source_path.display().to_string(),
            "rollout": match &self.rollout {
                Ok(waves) => waves.iter().map(ToString::to_string).collect::<Vec<_>>().join(" → "),
                Err(e) => format!("not started: {e}"),
            },
        })
    }
}

/// Why a job produced no trace.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// No reply compiled: nothing was signed or rolled out.
    #[error(
        "{trace}: the model's trace still did not compile after {rounds} rounds; nothing was signed or rolled out. Last problems:\n{last}"
    )]
    GaveUp {
        /// Trace id.
        trace: String,
        /// Rounds used.
        rounds: u32,
        /// The last diagnostics.
        last: String,
    },
    /// The model could not be asked (after the backend's retries).
    #[error("{trace}: {source}")]
    Backend {
        /// Trace id.
        trace: String,
        /// The cause.
        source: super::backend::BackendError,
    },
    /// Anything else (database, files, signing).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Runs `job`: regenerate through `backend`, sign, write, keep the source, roll out; records
/// the attempt in `regenerations` whatever its outcome.
///
/// # Errors
/// [`JobError`]; the attempt is recorded first (except when the database itself fails).
pub async fn run<B: Backend>(
    db: &mut LearnerDb,
    backend: &B,
    model: &str,
    job: &Job,
    attempt: &Attempt<'_>,
    signing: &Signing,
    staging: &Staging,
) -> Result<Done, JobError> {
    let Attempt {
        max_rounds,
        failures: failure_limit,
        dry_run,
    } = *attempt;
    let failures: Vec<Failure> = db
        .failed_reports(&job.trace_id, failure_limit)
        .map_err(anyhow::Error::from)?
        .iter()
        .map(Failure::from_report)
        .collect();
    let mut row = RegenerationRow {
        trace_id: job.trace_id.clone(),
        from_version: job.from_version.clone(),
        to_version: None,
        outcome: String::new(),
        detail: String::new(),
        model: model.to_owned(),
        rounds: 0,
        input_tokens: 0,
        output_tokens: 0,
        cost: 0.0,
        failures: u32::try_from(failures.len()).unwrap_or(u32::MAX),
        trigger: job.trigger.clone(),
        duration_ms: None,
    };
    let low_fidelity = match &job.from_version {
        Some(version) => low_fidelity(db, &job.trace_id, version, job.current.as_deref())?,
        None => Vec::new(),
    };
    let request = Request {
        trace_id: &job.trace_id,
        goal: &job.goal,
        current: job.current.as_deref(),
        failures: &failures,
        low_fidelity: &low_fidelity,
        max_rounds,
        dry_run,
    };
    let asked = std::time::Instant::now();
    let result = super::regenerate(backend, &request).await;
    row.duration_ms = Some(u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX));
    let mut done = match result {
        Ok(done) => done,
        Err(RegenError::GaveUp {
            rounds,
            last,
            input_tokens,
            output_tokens,
            cost,
        }) => {
            row.outcome = "gave_up".into();
            row.detail.clone_from(&last);
            row.rounds = rounds;
            row.input_tokens = input_tokens;
            row.output_tokens = output_tokens;
            row.cost = cost;
            db.record_regeneration(&row).map_err(anyhow::Error::from)?;
            return Err(JobError::GaveUp {
                trace: job.trace_id.clone(),
                rounds,
                last,
            });
        }
        Err(RegenError::Backend {
            source,
            rounds,
            input_tokens,
            output_tokens,
            cost,
        }) => {
            row.outcome = "backend_error".into();
            row.detail = source.to_string();
            row.rounds = rounds;
            row.input_tokens = input_tokens;
            row.output_tokens = output_tokens;
            row.cost = cost;
            db.record_regeneration(&row).map_err(anyhow::Error::from)?;
            return Err(JobError::Backend {
                trace: job.trace_id.clone(),
                source,
            });
        }
    };
    // Above every version the learner or the current source knows.
    let mut known: Vec<Version> = crate::rollout::known_versions(db, &job.trace_id)
        .map_err(anyhow::Error::from)?
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    known.extend(
        job.from_version
            .as_deref()
            .and_then(|v| v.parse::<Version>().ok()),
    );
    let version = super::next_version(&known);
    done.trace.version = version;
    let compiled = tracefleet::compile::encode_compiled(&done.trace);
    // A confidential trace stays confidential: encrypted to its newest rollout's recipients.
    let recipients = crate::rollout::confidential_recipients(db, &job.trace_id)?;
    let signed = crate::keys::sign_all(&compiled, &signing.keys, signing.expires, &recipients)?;
    let bytes = tracefleet::signed::encode_signed(&signed);
    let source = super::with_version(&done.source, &version);
    // A confidential trace's regenerated source is for the learner's user only.
    let mode = if recipients.is_empty() { 0o644 } else { 0o600 };
    let write = |path: &Path, data: &[u8]| -> anyhow::Result<()> {
        use anyhow::Context as _;
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(data))
            .with_context(|| format!("writing {}", path.display()))
    };
    std::fs::create_dir_all(&signing.out_dir).map_err(anyhow::Error::from)?;
    let source_path = signing
        .out_dir
        .join(format!("{}-{version}.trace.md", job.trace_id));
    let signed_path = signing
        .out_dir
        .join(format!("{}-{version}.tfs", job.trace_id));
    write(&source_path, source.as_bytes())?;
    write(&signed_path, &bytes)?;
    db.record_source(&job.trace_id, &version.to_string(), &source)
        .map_err(anyhow::Error::from)?;
    let rollout = crate::rollout::start_staged(
        db,
        staging,
        &job.trace_id,
        &version.to_string(),
        &bytes,
        now_secs(),
    )
    .map_err(|e| e.to_string());
    row.outcome = "compiled".into();
    row.to_version = Some(version.to_string());
    row.model.clone_from(&done.model);
    row.rounds = done.rounds;
    row.input_tokens = done.input_tokens;
    row.output_tokens = done.output_tokens;
    row.cost = done.cost;
    let dry = done
        .dry_run
        .as_ref()
        .map_or(String::new(), |d| format!("{d}; "));
    row.detail = match &rollout {
        Ok(waves) => format!(
            "{dry}signed {}; rolled out: {}",
            signed_path.display(),
            waves
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" → ")
        ),
        Err(e) => format!("{dry}signed {}; not rolled out: {e}", signed_path.display()),
    };
    db.record_regeneration(&row).map_err(anyhow::Error::from)?;
    Ok(Done {
        version,
        source_path,
        signed_path,
        rounds: done.rounds,
        input_tokens: done.input_tokens,
        output_tokens: done.output_tokens,
        cost: done.cost,
        model: done.model,
        rollout,
        dry_run: done.dry_run,
    })
}

/// The judgement steps of `trace_id` `version` whose fidelity devices reported under the
/// step's minimum, lowest first, their disagreements matched to the examples of `current`
/// (the version's source).
fn low_fidelity(
    db: &LearnerDb,
    trace_id: &str,
    version: &str,
    current: Option<&str>,
) -> Result<Vec<super::LowFidelity>, JobError> {
    let (rows, _) = db
        .low_fidelity(trace_id, version)
        .map_err(anyhow::Error::from)?;
    // The examples are those of the version measured, if that is what the learner kept.
    let trace = current
        .and_then(|src| tracefleet::compile::compile_source(trace_id, src).ok())
        .filter(|(t, _)| t.version.to_string() == version);
    Ok(rows
        .iter()
        .map(|r| {
            super::LowFidelity::new(
                format!("version {} on {}", r.version, r.device_id),
                &tracefleet::judgement::Fidelity {
                    step: r.step,
                    model: r.model.clone(),
                    agreements: r.agreements,
                    total: r.total,
                    // Stored from the report's f32.
                    min_fidelity: r.min_fidelity as f32,
                    disagreements: r.disagreements.clone(),
                },
                trace.as_ref().map(|(t, _)| t),
            )
        })
        .collect())
}

/// The trace id a first version for `goal` gets: its words, lowercased, joined by `-`
/// (ASCII letters and digits only, at most 48 bytes), `goal` when nothing is left.
#[must_use]
pub fn goal_trace_id(goal: &str) -> String {
    let mut id = String::new();
    for word in goal
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let word = word.to_ascii_lowercase();
        let extra = usize::from(!id.is_empty()) + word.len();
        if id.len() + extra > 48 {
            break;
        }
        if !id.is_empty() {
            id.push('-');
        }
        id.push_str(&word);
    }
    if id.is_empty() { "goal".into() } else { id }
}

/// Whether `trace_id` `from_version` needs no attempt now: one compiled already, or one
/// failed less than `retry_after` ago.
fn handled(
    db: &LearnerDb,
    trace_id: &str,
    from_version: Option<&str>,
    retry_after: Duration,
    now: i64,
) -> crate::db::Result<bool> {
    let since = now.saturating_sub(i64::try_from(retry_after.as_secs()).unwrap_or(i64::MAX));
    db.regenerated_since(trace_id, from_version, since)
}

/// The goal and current source for regenerating `trace_id` `version`: the kept source of
/// that version (else the newest kept one) and its goal_signature, else the goal of the
/// newest signed trace of it the learner rolled out. `None` when neither is known.
fn goal_and_source(
    db: &LearnerDb,
    trace_id: &str,
    version: &str,
) -> crate::db::Result<Option<(String, Option<String>)>> {
    // That version's source; else the newest kept one (a roll-forward re-signs content
    // under a new version without a source of its own).
    let kept = match db.source(trace_id, version)? {
        Some(s) => Some(s),
        None => db.newest_source(trace_id)?,
    };
    if let Some(source) = kept
        && let Ok((t, _)) = tracefleet::compile::compile_source(trace_id, &source)
    {
        return Ok(Some((t.goal_signature, Some(source))));
    }
    let signed = db.newest_rollout_signed(trace_id)?;
    Ok(signed.and_then(|bytes| {
        let s = tracefleet::signed::decode_signed(&bytes).ok()?;
        let t = tracefleet::compile::decode_compiled(&s.compiled).ok()?;
        Some((t.goal_signature, None))
    }))
}

/// The jobs the triggers ask for now, oldest cause first. Escalations are read once (a
/// cursor in the database moves past them); confidence is looked at every time, and
/// a version is never regenerated twice (see the module docs).
///
/// # Errors
/// On SQLite failure.
pub fn due(db: &mut LearnerDb, auto: &Auto, now: i64) -> crate::db::Result<Vec<Job>> {
    let c = &auto.config;
    let mut candidates: Vec<(String, Option<String>, String)> = Vec::new();
    // Escalations since the cursor.
    let escalations = db.escalations_after_cursor()?;
    for crate::db::regen::NewEscalation {
        device_id: device,
        trace_id,
        run_id,
        reason,
        ..
    } in &escalations
    {
        if trace_id == "-" {
            if let (true, Some(goal)) = (c.new_goals, tracefleet::wire::unmatched_goal(reason)) {
                candidates.push((
                    goal_trace_id(&goal),
                    Some(goal),
                    format!("new goal from {device}"),
                ));
            }
        } else if c.on_escalation && run_id.is_some() {
            candidates.push((
                trace_id.clone(),
                None,
                format!("escalation from {device}: {reason}"),
            ));
        }
    }
    if let Some(last) = escalations.last() {
        db.move_escalation_cursor(last.id)?;
    }
    // Confidence of each trace's newest version.
    let stats = db.trace_stats()?;
    let mut trace_ids: Vec<&str> = stats.iter().map(|s| s.trace_id.as_str()).collect();
    trace_ids.dedup();
    for trace_id in trace_ids {
        let Some(newest) = crate::rollout::newest_version(db, trace_id)? else {
            continue;
        };
        let newest = newest.to_string();
        if let Some(s) = stats
            .iter()
            .find(|s| s.trace_id.as_str() == trace_id && s.version == newest)
            .filter(|s| s.runs >= i64::from(c.min_runs) && s.confidence < c.below_confidence)
        {
            candidates.push((
                trace_id.to_owned(),
                None,
                format!(
                    "confidence {:.2} after {} runs (below {})",
                    s.confidence, s.runs, c.below_confidence
                ),
            ));
        }
    }
    // Judgement the devices' models do not repeat, on each trace's newest version.
    if c.on_low_fidelity {
        let mut trace_ids: Vec<&str> = stats.iter().map(|s| s.trace_id.as_str()).collect();
        trace_ids.dedup();
        for trace_id in trace_ids {
            let Some(newest) = crate::rollout::newest_version(db, trace_id)? else {
                continue;
            };
            let (low, reporting) = db.low_fidelity(trace_id, &newest.to_string())?;
            let Some(worst) = low.first() else {
                continue;
            };
            let failing = low
                .iter()
                .map(|r| r.device_id.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            candidates.push((
                trace_id.to_owned(),
                None,
                format!(
                    "fidelity below min_fidelity on {failing} of {reporting} device(s): step {} with {} on {}: {}/{} ({:.2} < {:.2})",
                    worst.step,
                    worst.model,
                    worst.device_id,
                    worst.agreements,
                    worst.total,
                    worst.ratio(),
                    worst.min_fidelity
                ),
            ));
        }
    }
    let mut jobs: Vec<Job> = Vec::new();
    for (trace_id, goal, trigger) in candidates {
        if jobs.iter().any(|j| j.trace_id == trace_id) {
            continue;
        }
        if let Some(goal) = goal {
            // A first version, unless the learner already knows this trace.
            if crate::rollout::newest_version(db, &trace_id)?.is_some()
                || handled(db, &trace_id, None, auto.retry_after, now)?
            {
                continue;
            }
            jobs.push(Job {
                trace_id,
                goal,
                from_version: None,
                current: None,
                trigger,
            });
            continue;
        }
        let Some(version) = crate::rollout::newest_version(db, &trace_id)? else {
            continue;
        };
        let version = version.to_string();
        if handled(db, &trace_id, Some(&version), auto.retry_after, now)? {
            continue;
        }
        let (goal, current) = match goal_and_source(db, &trace_id, &version)? {
            Some(found) => found,
            None => {
                db.record_regeneration(&RegenerationRow {
                    trace_id: trace_id.clone(),
                    from_version: Some(version.clone()),
                    to_version: None,
                    outcome: "skipped".into(),
                    detail: "neither its source nor a readable rollout of it is known (a confidential trace is readable only from its kept source): `learner rollout start --source` or `learner regenerate --source`".into(),
                    model: String::new(),
                    rounds: 0,
                    input_tokens: 0,
                    output_tokens: 0,
                    cost: 0.0,
                    failures: 0,
                    trigger,
                    duration_ms: None,
                })?;
                continue;
            }
        };
        jobs.push(Job {
            trace_id,
            goal,
            from_version: Some(version),
            current,
            trigger,
        });
    }
    Ok(jobs)
}

/// `learner serve`'s side of it: queued jobs, one running at a time on its own thread.
pub struct Runner {
    auto: Auto,
    backend: BackendConfig,
    keys: std::sync::Arc<Vec<SecretKey>>,
    dry_run: Option<super::dry_run::DryRunner>,
    db_path: PathBuf,
    audit: Option<crate::audit::AuditLog>,
    queue: VecDeque<Job>,
    running: Option<std::thread::JoinHandle<()>>,
}

impl Runner {
    /// Reads the signing keys and checks the backend settings.
    ///
    /// # Errors
    /// A key that cannot be read or is not a trace-signing key, or a backend that cannot be
    /// built (its API key missing from the environment).
    pub fn new(
        auto: Auto,
        backend: BackendConfig,
        dry_run: Option<super::dry_run::DryRunner>,
        db_path: PathBuf,
        audit: Option<crate::audit::AuditLog>,
    ) -> anyhow::Result<Self> {
        let keys = std::sync::Arc::new(crate::keys::read_trace_keys(&auto.config.keys)?);
        AnyBackend::new(&backend)?;
        Ok(Runner {
            auto,
            backend,
            keys,
            dry_run,
            db_path,
            audit,
            queue: VecDeque::new(),
            running: None,
        })
    }

    /// Finds what is due, and starts the next job when none is running.
    pub fn tick(&mut self, db: &mut LearnerDb, now: i64) {
        match due(db, &self.auto, now) {
            Ok(jobs) => {
                for job in jobs {
                    if !self.queue.iter().any(|q| q.trace_id == job.trace_id) {
                        tracing::info!(trace = %job.trace_id, trigger = %job.trigger, "regeneration due");
                        self.queue.push_back(job);
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "regeneration triggers"),
        }
        if self.running.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        self.running = None;
        while let Some(job) = self.queue.pop_front() {
            // Another attempt may have handled it since it was queued.
            match handled(
                db,
                &job.trace_id,
                job.from_version.as_deref(),
                self.auto.retry_after,
                now,
            ) {
                Ok(false) => {}
                Ok(true) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "regeneration triggers");
                    return;
                }
            }
            self.running = Some(self.spawn(job));
            return;
        }
    }

    fn spawn(&self, job: Job) -> std::thread::JoinHandle<()> {
        let backend = self.backend.clone();
        let signing = Signing {
            keys: self.keys.clone(),
            expires: self.auto.expires,
            out_dir: self.auto.config.out_dir.clone(),
        };
        let staging = self.auto.staging.clone();
        let (max_rounds, failures) = (self.auto.config.max_rounds, self.auto.config.failures);
        let db_path = self.db_path.clone();
        let dry_run = self.dry_run.clone();
        let audit = self.audit.clone();
        std::thread::spawn(move || {
            let result = (|| -> anyhow::Result<Done> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let mut db = LearnerDb::open(&db_path)?;
                let client = AnyBackend::new(&backend)?;
                Ok(rt.block_on(run(
                    &mut db,
                    &client,
                    &backend.model,
                    &job,
                    &Attempt {
                        max_rounds,
                        failures,
                        dry_run: dry_run.as_ref(),
                    },
                    &signing,
                    &staging,
                ))?)
            })();
            match result {
                Ok(done) => {
                    tracing::info!(
                        trace = %job.trace_id,
                        version = %done.version,
                        rounds = done.rounds,
                        cost = done.cost,
                        rollout = ?done.rollout,
                        trigger = %job.trigger,
                        "regenerated"
                    );
                    let subject = format!("{} {}", job.trace_id, done.version);
                    if let Some(Err(e)) = audit
                        .as_ref()
                        .map(|a| a.append("regenerate", &subject, done.audit_detail(&job)))
                    {
                        tracing::error!(error = %format!("{e:#}"), %subject, "the regeneration took effect but could not be recorded in the audit log");
                    }
                }
                Err(e) => tracing::warn!(trace = %job.trace_id, error = %e, "regeneration failed"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracefleet::wire::{self, EscalationMessage, ReportMessage, Topic};

    const SOURCE: &str = "---\ntrace_id: t\nversion: \"1.0.0\"\ngoal_signature: do the thing\n---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"true\"\n```\n";

    fn report(db: &mut LearnerDb, run: &str, ok: bool) {
        db.put_installed("pi-01", "t", "1.0.0");
        let r = crate::simulate::synthetic_report("pi-01", run, "t", "1.0.0", ok);
        let m = ReportMessage {
            run_id: run.to_owned(),
            report_json: serde_json::to_string(&r).unwrap(),
        };
        db.ingest(&Topic::Reports("pi-01".into()).name(), &wire::encode(&m))
            .unwrap();
    }

    fn escalate(db: &mut LearnerDb, trace_id: &str, run_id: Option<&str>, reason: &str) {
        let m = EscalationMessage {
            device_id: "pi-02".parse().unwrap(),
            trace_id: trace_id.into(),
            run_id: run_id.map(str::to_owned),
            reason: reason.into(),
            at: 1,
        };
        db.ingest(
            &Topic::Escalations("pi-02".into()).name(),
            &wire::encode(&m),
        )
        .unwrap();
    }

    fn row(trace_id: &str, from: Option<&str>, outcome: &str) -> RegenerationRow {
        RegenerationRow {
            trace_id: trace_id.into(),
            from_version: from.map(str::to_owned),
            to_version: None,
            outcome: outcome.into(),
            detail: String::new(),
            model: "m".into(),
            rounds: 1,
            input_tokens: 0,
            output_tokens: 0,
            cost: 0.0,
            failures: 0,
            trigger: "test".into(),
            duration_ms: Some(1500),
        }
    }

    #[test]
    fn triggers_find_low_confidence_escalated_runs_and_new_goals_once_each() {
        let d = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&d.path().join("learner.db")).unwrap();
        let auto: AutoConfig = toml::from_str("keys = [\"traces.key\"]\nmin_runs = 2").unwrap();
        let auto = auto.resolve(d.path()).unwrap();
        assert_eq!(auto.config.keys, vec![d.path().join("traces.key")]);
        let now = now_secs();

        // One failure: confidence 0.525, and fewer runs than min_runs.
        report(&mut db, "r1", false);
        assert_eq!(due(&mut db, &auto, now).unwrap(), vec![]);
        // Two: 0.3675 < 0.5 — due, but with neither source nor rollout known it is skipped,
        // recorded, and not looked at again before retry_after.
        report(&mut db, "r2", false);
        assert_eq!(due(&mut db, &auto, now).unwrap(), vec![]);
        let rows = db.regenerations().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].outcome, "skipped");
        assert!(rows[0].trigger.starts_with("confidence 0.37 after 2 runs"));
        assert_eq!(due(&mut db, &auto, now).unwrap(), vec![]);
        assert_eq!(db.regenerations().unwrap().len(), 1);

        // With the source kept, after retry_after: a job with the source and its goal.
        db.record_source("t", "1.0.0", SOURCE).unwrap();
        let later = now + 3601;
        let jobs = due(&mut db, &auto, later).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].trace_id, "t");
        assert_eq!(jobs[0].goal, "do the thing");
        assert_eq!(jobs[0].from_version.as_deref(), Some("1.0.0"));
        assert_eq!(jobs[0].current.as_deref(), Some(SOURCE));

        // Escalations: one without a run (an autonomy refusal) is for people; one of a run
        // of a trace the learner does not know starts nothing; a goal with no trace does.
        escalate(&mut db, "t", None, "not running t 1.0.0 on its own");
        escalate(&mut db, "unknown", Some("r9"), "step 1 failed");
        escalate(
            &mut db,
            "-",
            None,
            &wire::no_trace_for_goal("Reboot the reactor, gently!"),
        );
        let jobs = due(&mut db, &auto, later).unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.trace_id.as_str()).collect();
        assert_eq!(ids, ["reboot-the-reactor-gently", "t"]);
        assert_eq!(jobs[0].goal, "Reboot the reactor, gently!");
        assert_eq!(jobs[0].from_version, None);
        assert_eq!(jobs[0].trigger, "new goal from pi-02");
        // The escalations were read once.
        let ids: Vec<String> = due(&mut db, &auto, later)
            .unwrap()
            .into_iter()
            .map(|j| j.trace_id)
            .collect();
        assert_eq!(ids, ["t"]);

        // A compiled regeneration of 1.0.0 ends it for good; a run of t that escalates
        // afterwards concerns the same version and starts nothing either.
        db.record_regeneration(&row("t", Some("1.0.0"), "compiled"))
            .unwrap();
        escalate(&mut db, "t", Some("r3"), "step 1 failed");
        assert_eq!(due(&mut db, &auto, later + 10 * 3600).unwrap(), vec![]);
    }

    /// Trace `t` with one judgement step and three reference examples.
    const JUDGED: &str = "---\ntrace_id: t\nversion: \"1.0.0\"\ngoal_signature: name the protocol\ninputs:\n  entry:\n    default: \"ssh 22/___\"\n---\n### Step 1: protocol\n**Tool Call**:\n```yaml\ntool: LLM\nparameters:\n  prompt: \"Protocol of {entry}? Answer tcp or udp.\"\n  grammar: 'root ::= \"tcp\" | \"udp\"'\n  examples:\n    - vars: {entry: \"ssh 22/___\"}\n      expect: tcp\n    - vars: {entry: \"domain 53/___\"}\n      expect: udp\n    - vars: {entry: \"http 80/___\"}\n      expect: tcp\n```\n";

    /// A successful run of `t` 1.0.0 on `device` whose model agreed with `agreements` of 3.
    fn judged_report(db: &mut LearnerDb, device: &str, run: &str, agreements: u32) {
        db.put_installed(device, "t", "1.0.0");
        let mut r = crate::simulate::synthetic_report(device, run, "t", "1.0.0", true);
        r.fidelity = vec![tracefleet::judgement::Fidelity {
            step: 1,
            model: "SmolLM2-135M-Instruct.Q4_1".into(),
            agreements,
            total: 3,
            min_fidelity: 0.8,
            disagreements: [(0, "udp".to_owned()), (2, "udp".to_owned())]
                .into_iter()
                .take(3 - agreements as usize)
                .collect(),
        }];
        let m = ReportMessage {
            run_id: run.to_owned(),
            report_json: serde_json::to_string(&r).unwrap(),
        };
        db.ingest(&Topic::Reports(device.into()).name(), &wire::encode(&m))
            .unwrap();
    }

    /// Replays one reply and records the prompts it was sent.
    struct Recording {
        reply: String,
        prompts: std::sync::Mutex<Vec<super::super::backend::Prompt>>,
    }

    impl Backend for Recording {
        async fn complete(
            &self,
            prompt: &super::super::backend::Prompt,
        ) -> Result<super::super::backend::Completion, super::super::backend::BackendError>
        {
            self.prompts.lock().unwrap().push(prompt.clone());
            Ok(super::super::backend::Completion {
                text: self.reply.clone(),
                model: "claude-test".into(),
                stop_reason: Some("end_turn".into()),
                input_tokens: 1000,
                output_tokens: 100,
                attempts: 1,
                cost: 0.01,
            })
        }
    }

    #[tokio::test]
    async fn low_fidelity_sets_off_one_regeneration_whose_prompt_holds_the_disagreements() {
        let d = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&d.path().join("learner.db")).unwrap();
        let auto: AutoConfig = toml::from_str("keys = [\"traces.key\"]").unwrap();
        let auto = auto.resolve(d.path()).unwrap();
        let now = now_secs();
        db.record_source("t", "1.0.0", JUDGED).unwrap();

        // A device whose model repeats every reference answer sets nothing off.
        judged_report(&mut db, "pi-01", "r1", 3);
        assert_eq!(due(&mut db, &auto, now).unwrap(), vec![]);
        // One that repeats 1 of 3 does, though its run succeeded.
        judged_report(&mut db, "pi-02", "r2", 1);
        let jobs = due(&mut db, &auto, now).unwrap();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert_eq!(jobs[0].from_version.as_deref(), Some("1.0.0"));
        assert_eq!(
            jobs[0].trigger,
            "fidelity below min_fidelity on 1 of 2 device(s): step 1 with SmolLM2-135M-Instruct.Q4_1 on pi-02: 1/3 (0.33 < 0.80)"
        );
        // Switched off, it is not looked at.
        let off: AutoConfig =
            toml::from_str("keys = [\"traces.key\"]\non_low_fidelity = false").unwrap();
        assert_eq!(
            due(&mut db, &off.resolve(d.path()).unwrap(), now).unwrap(),
            vec![]
        );

        // The job: the prompt holds the disagreements with their examples.
        let key = d.path().join("traces.key");
        crate::keys::generate(tracefleet::signed::KeyRole::Traces, &key).unwrap();
        let fixed = JUDGED.replace("  examples:\n", "  few_shot: 1\n  examples:\n");
        let backend = Recording {
            reply: fixed,
            prompts: std::sync::Mutex::new(Vec::new()),
        };
        let signing = Signing {
            keys: std::sync::Arc::new(crate::keys::read_trace_keys(&[key]).unwrap()),
            expires: Duration::from_secs(3600),
            out_dir: d.path().join("out"),
        };
        let done = run(
            &mut db,
            &backend,
            "claude-test",
            &jobs[0],
            &Attempt {
                max_rounds: 1,
                failures: 5,
                dry_run: None,
            },
            &signing,
            &auto.staging,
        )
        .await
        .unwrap();
        assert_eq!(done.version.to_string(), "1.1.0");
        let first = backend.prompts.lock().unwrap()[0].turns[0].content.clone();
        assert!(
            first.contains("step 1 of version 1.0.0 on pi-02, model SmolLM2-135M-Instruct.Q4_1: agrees with 1 of 3 reference answers (0.33 < 0.80)"),
            "{first}"
        );
        assert!(
            first.contains("example 1: vars {entry: \"ssh 22/___\"}; expected \"tcp\"; the model answered \"udp\"")
                && first.contains("example 3: vars {entry: \"http 80/___\"}; expected \"tcp\"; the model answered \"udp\""),
            "{first}"
        );
        assert!(
            first.contains("few_shot") && !first.contains("pi-01"),
            "{first}"
        );
        let rows = db.regenerations().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].outcome, "compiled");
        assert!(rows[0].trigger.starts_with("fidelity below min_fidelity"));

        // Regenerated once: more low fidelity on 1.0.0 sets nothing off again, even later.
        judged_report(&mut db, "pi-03", "r3", 0);
        assert_eq!(due(&mut db, &auto, now + 10 * 3600).unwrap(), vec![]);
    }

    #[test]
    fn a_goal_becomes_a_trace_id_of_its_words() {
        assert_eq!(
            goal_trace_id("Check the disk: /var 90%?"),
            "check-the-disk-var-90"
        );
        assert_eq!(goal_trace_id("!!!"), "goal");
        let long = goal_trace_id(&"word ".repeat(40));
        assert!(long.len() <= 48 && long.ends_with("word"), "{long}");
        wire::check_name("trace id", &long).unwrap();
    }

    #[test]
    fn bad_settings_are_refused_naming_them() {
        let d = Path::new("/etc/tracefleet");
        let parse = |t: &str| toml::from_str::<AutoConfig>(t).unwrap().resolve(d);
        assert!(parse("keys = []").unwrap_err().contains("keys"));
        assert!(
            parse("keys = [\"k\"]\nretry_after = \"soon\"")
                .unwrap_err()
                .contains("retry_after \"soon\"")
        );
        assert!(
            parse("keys = [\"k\"]\nbelow_confidence = 2.0")
                .unwrap_err()
                .contains("below_confidence 2")
        );
        assert!(parse("keys = [\"k\"]\ncanary = \"lots\"").is_err());
        let ok = parse("keys = [\"k\"]").unwrap();
        assert_eq!(ok.staging.canary, Some(crate::rollout::Canary::Devices(1)));
        assert_eq!(ok.staging.waves, ["*"]);
        assert_eq!(ok.config.out_dir, d.join("regenerated"));
    }
}
