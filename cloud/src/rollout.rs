//! Staged rollouts, the decisions only (the rows are [`crate::db`]'s, `serve` publishes):
//! a signed trace version goes out wave by wave, each wave a device group (`*` = the whole
//! fleet) published retained on the group's trace topic, or a canary set — devices picked
//! by `learner rollout start --canary N|P%` — published retained on each canary's own trace
//! topic. A roll-forward ([`forward`]) re-signs the last good content above every version.
//!
//! `learner rollout start` records the rollout; `learner serve` drives it ([`tick`]): it
//! publishes the first wave, and moves to the next only when every device known in the
//! current wave (from heartbeats) has acknowledged the version and the wave has reported at
//! least `min_runs` runs of it. Over all runs of the version so far, a failure rate above
//! `max_failure_rate` (once `min_runs` runs are in) halts the rollout before its next wave and
//! withdraws the retained trace from the waves it reached (devices that installed it keep it
//! until a newer version — a roll-forward — arrives: versions never go backwards). A wave with
//! no known device passes at once.

use crate::db::{LearnerDb, rollouts::NewRollout};
use sha2::{Digest, Sha256};

/// The whole fleet, as a wave.
pub const FLEET: &str = "*";

/// One wave of a rollout. Stored as JSON: a group is a string, a canary set an array (so
/// rollouts recorded before canary sets existed read unchanged).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Wave {
    /// A device group (`*` = the whole fleet).
    Group(String),
    /// A canary set: these devices.
    Devices(Vec<String>),
}

impl Wave {
    /// Whether this wave reaches the device `device_id`, whose heartbeat named `groups`.
    #[must_use]
    pub fn reaches(&self, device_id: &str, groups: &[String]) -> bool {
        match self {
            Wave::Group(g) => g == FLEET || groups.contains(g),
            Wave::Devices(d) => d.iter().any(|x| x == device_id),
        }
    }
}

impl std::fmt::Display for Wave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wave::Group(g) => f.write_str(g),
            Wave::Devices(d) => write!(f, "canary[{}]", d.join(" ")),
        }
    }
}

/// The size of a canary set: `N` devices or `P%` of the devices the waves reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Canary {
    /// This many devices.
    Devices(usize),
    /// This share (0 < P ≤ 100) of the devices, rounded up.
    Percent(f64),
}

/// Parses `N` or `P%`.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_canary(s: &str) -> Result<Canary, String> {
    let bad =
        || format!("--canary {s:?}: expected a number of devices (5) or a share of them (10%)");
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| bad())?;
        if p > 0.0 && p <= 100.0 {
            return Ok(Canary::Percent(p));
        }
        return Err(bad());
    }
    match t.parse::<usize>() {
        Ok(n) if n > 0 => Ok(Canary::Devices(n)),
        _ => Err(bad()),
    }
}

/// Picks a canary set from the devices the `waves` reach (known from heartbeats): online
/// devices first, then in an order drawn from SHA-256 of the trace id and the device id —
/// stable for one trace, different across traces, so canary duty spreads over the fleet.
///
/// # Errors
/// SQLite; `Ok` with an empty set when no device is known.
pub fn pick_canaries(
    db: &LearnerDb,
    trace_id: &str,
    waves: &[Wave],
    canary: Canary,
) -> crate::db::Result<Vec<String>> {
    let mut candidates = Vec::new();
    for d in db.device_groups()? {
        let (id, online, groups) = (String::from(d.device_id), d.online, d.groups);
        if waves.iter().any(|w| w.reaches(&id, &groups)) {
            let rank: [u8; 32] = Sha256::digest(format!("{trace_id}\n{id}")).into();
            candidates.push((!online, rank, id));
        }
    }
    candidates.sort();
    let n = match canary {
        Canary::Devices(n) => n,
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        Canary::Percent(p) => ((candidates.len() as f64) * p / 100.0).ceil() as usize,
    };
    Ok(candidates
        .into_iter()
        .take(n.max(1))
        .map(|(_, _, id)| id)
        .collect())
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rollout {
    /// Row id.
    pub id: i64,
    /// Trace id.
    pub trace_id: String,
    /// Version rolled out.
    pub version: String,
    /// Waves in order.
    pub waves: Vec<Wave>,
    /// Index of the last wave published (-1: none yet).
    pub wave: i64,
    /// `running`, `halted`, `done`, `aborting` (asked to stop; serve withdraws it),
    /// `aborted` or `superseded`.
    pub state: String,
    /// Failure rate above which the rollout halts.
    pub max_failure_rate: f64,
    /// Runs needed per wave to go on, and before the failure rate counts.
    pub min_runs: i64,
    /// Why it halted or stopped.
    pub reason: String,
    /// Runs of this version reported so far, and how many failed.
    pub runs: i64,
    /// Failed runs of this version.
    pub failures: i64,
}

/// Parses `failure-rate>X over N runs` (X in 0..1).
///
/// # Errors
/// A message saying what was expected.
pub fn parse_abort_if(s: &str) -> Result<(f64, u32), String> {
    let bad = || {
        format!(
            "--abort-if {s:?}: expected `failure-rate>X over N runs` (X between 0 and 1, N ≥ 1)"
        )
    };
    let rest = s.trim().strip_prefix("failure-rate>").ok_or_else(bad)?;
    let (rate, runs) = rest.split_once(" over ").ok_or_else(bad)?;
    let rate: f64 = rate.trim().parse().map_err(|_| bad())?;
    let runs = runs.trim();
    let runs = runs
        .strip_suffix("runs")
        .or_else(|| runs.strip_suffix("run"))
        .unwrap_or(runs)
        .trim();
    let runs: u32 = runs.parse().map_err(|_| bad())?;
    if !(0.0..=1.0).contains(&rate) || runs == 0 {
        return Err(bad());
    }
    Ok((rate, runs))
}

/// The topics a wave of a trace is published on (retained).
#[must_use]
pub fn wave_topics(wave: &Wave, trace_id: &str) -> Vec<String> {
    use tracefleet::wire::Topic;
    match wave {
        Wave::Group(g) if g == FLEET => vec![Topic::FleetTrace(trace_id.to_owned()).name()],
        Wave::Group(g) => vec![Topic::GroupTrace(g.clone(), trace_id.to_owned()).name()],
        Wave::Devices(d) => d
            .iter()
            .map(|d| Topic::DeviceTrace(d.clone(), trace_id.to_owned()).name())
            .collect(),
    }
}

/// The messages that publish (`payload`) or withdraw (empty) `waves`.
fn publishes(waves: &[Wave], trace_id: &str, payload: &[u8]) -> Vec<Publish> {
    waves
        .iter()
        .flat_map(|w| wave_topics(w, trace_id))
        .map(|topic| Publish {
            topic,
            payload: payload.to_vec(),
        })
        .collect()
}

/// What `learner rollout start` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<'a> {
    /// Trace id.
    pub trace_id: &'a str,
    /// Version.
    pub version: &'a str,
    /// The signed trace file.
    pub signed: &'a [u8],
    /// Waves in order.
    pub waves: &'a [Wave],
    /// Failure rate above which the rollout halts.
    pub max_failure_rate: f64,
    /// Runs each wave must report, and before the failure rate counts.
    pub min_runs: u32,
}

/// Records a new rollout (superseding a running one of the same trace).
///
/// # Errors
/// On SQLite failure.
pub fn start(db: &mut LearnerDb, plan: &Plan<'_>, now: i64) -> crate::db::Result<i64> {
    db.insert_rollout(
        &NewRollout {
            trace_id: plan.trace_id,
            version: plan.version,
            signed: plan.signed,
            waves_json: &serde_json::to_string(plan.waves).unwrap_or_default(),
            max_failure_rate: plan.max_failure_rate,
            min_runs: plan.min_runs,
        },
        now,
    )
}

/// How a rollout is staged: an optional canary set in front of the waves, and when it halts.
#[derive(Debug, Clone, PartialEq)]
pub struct Staging {
    /// A canary set in front of the waves, picked from the devices they reach.
    pub canary: Option<Canary>,
    /// Device groups in order (`*` = the whole fleet).
    pub waves: Vec<String>,
    /// `(max_failure_rate, min_runs)`, as [`parse_abort_if`] returns them.
    pub abort_if: (f64, u32),
}

/// Records a rollout of the signed trace `signed` (`trace_id` `version`) staged as `staging`
/// says, picking its canaries now; returns the waves as recorded.
///
/// # Errors
/// A group name that is not a valid name, a canary set asked for where no device is known in
/// the waves (devices become known by their heartbeats), or SQLite failure.
pub fn start_staged(
    db: &mut LearnerDb,
    staging: &Staging,
    trace_id: &str,
    version: &str,
    signed: &[u8],
    now: i64,
) -> anyhow::Result<Vec<Wave>> {
    let mut waves = Vec::new();
    for w in &staging.waves {
        if w != FLEET {
            tracefleet::wire::check_name("group", w).map_err(|e| anyhow::anyhow!("waves: {e}"))?;
        }
        waves.push(Wave::Group(w.clone()));
    }
    if let Some(canary) = staging.canary {
        let picked = pick_canaries(db, trace_id, &waves, canary)?;
        if picked.is_empty() {
            anyhow::bail!(
                "canary: no device known in the waves {}: devices become known by their heartbeats to `learner serve` (`learner devices list`)",
                staging.waves.join(",")
            );
        }
        waves.insert(0, Wave::Devices(picked));
    }
    let (max_failure_rate, min_runs) = staging.abort_if;
    start(
        db,
        &Plan {
            trace_id,
            version,
            signed,
            waves: &waves,
            max_failure_rate,
            min_runs,
        },
        now,
    )?;
    Ok(waves)
}

/// A roll-forward, prepared: the content of the last completed rollout re-signed under a
/// version above every version known.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The version whose content it carries (the last completed rollout's).
    pub good: String,
    /// The highest version known before it.
    pub top: tracefleet::ids::Version,
    /// Its version (`top` with the patch number one higher).
    pub version: tracefleet::ids::Version,
    /// The re-signed trace.
    pub signed: tracefleet::signed::SignedTrace,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// Prepares a roll-forward of `trace_id` (how a bad version is undone: versions never go
/// backwards on a device): the content of its last completed rollout, re-signed with
/// `keys` under the next patch version above every version the learner knows of it.
/// Nothing is recorded: [`start_staged`] rolls the result out.
///
/// # Errors
/// No completed rollout, no version known, a stored trace that no longer decodes, a patch
/// version overflow, signing, or the database.
pub fn forward(
    db: &LearnerDb,
    trace_id: &str,
    keys: &[tracefleet::signed::SecretKey],
    expires: std::time::Duration,
) -> anyhow::Result<Forward> {
    use anyhow::Context as _;
    use tracefleet::{compile, signed};
    let (good, good_signed) = last_good(db, trace_id)?
        .with_context(|| format!("{trace_id}: no completed rollout to roll forward to (`learner rollout status` lists them)"))?;
    let top =
        newest_version(db, trace_id)?.with_context(|| format!("{trace_id}: no version known"))?;
    let good_envelope = signed::decode_signed(&good_signed)?;
    let mut content = match &good_envelope.sealed {
        None => compile::decode_compiled(&good_envelope.compiled)?,
        // The learner holds no device identity: a confidential trace's content comes from the
        // source kept with its rollout (`rollout start --source`).
        Some(_) => {
            let source = db.source(trace_id, &good)?.with_context(|| {
                format!(
                    "{trace_id} {good} is a confidential trace and the learner kept no source of it, so it cannot read the content to roll forward: compile its source under a version above {top}, `learner sign --encrypt-to …` it and `learner rollout start` it (with --source, so the next roll-forward can)"
                )
            })?;
            compile::compile_source(trace_id, &source)
                .map_err(|d| {
                    anyhow::anyhow!(
                        "the kept source of {trace_id} {good}: {}",
                        d.render(&source).trim_end()
                    )
                })?
                .0
        }
    };
    content.version = tracefleet::ids::Version {
        patch: top.patch.checked_add(1).context("patch version overflow")?,
        ..top
    };
    let compiled = compile::encode_compiled(&content);
    let mut recipients = confidential_recipients(db, trace_id)?;
    if recipients.is_empty()
        && let Some(sealed) = &good_envelope.sealed
    {
        recipients = sealed.parsed()?;
    }
    let resigned = crate::keys::sign_all(&compiled, keys, expires, &recipients)?;
    let bytes = signed::encode_signed(&resigned);
    Ok(Forward {
        good,
        top,
        version: content.version,
        signed: resigned,
        bytes,
    })
}

/// One line saying what rollout was recorded.
#[must_use]
pub fn describe_start(
    trace_id: &str,
    version: &str,
    waves: &[Wave],
    abort_if: (f64, u32),
) -> String {
    format!(
        "rollout of {trace_id} {version} recorded: waves {}; halts above a failure rate of {} (over at least {} runs); `learner serve` publishes it",
        waves
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" → "),
        abort_if.0,
        abort_if.1
    )
}

/// Asks `learner serve` to stop the running rollout of `trace_id` and withdraw it.
///
/// # Errors
/// On database failure; `Ok(false)` when none is running.
pub fn abort(db: &LearnerDb, trace_id: &str, now: i64) -> crate::db::Result<bool> {
    db.abort_rollout(trace_id, now)
}

/// Every rollout, newest first, with its run counts.
///
/// # Errors
/// On database failure.
pub fn list(db: &LearnerDb) -> crate::db::Result<Vec<Rollout>> {
    Ok(db
        .rollouts()?
        .into_iter()
        .map(|r| Rollout {
            id: r.id,
            trace_id: r.trace_id,
            version: r.version,
            waves: serde_json::from_str(&r.waves_json).unwrap_or_default(),
            wave: r.wave,
            state: r.state,
            max_failure_rate: r.max_failure_rate,
            min_runs: r.min_runs,
            reason: r.reason,
            runs: r.runs,
            failures: r.failures,
        })
        .collect())
}

/// The last good content of `trace_id`: the version and signed trace of its newest rollout
/// that completed (`done`), if any.
///
/// # Errors
/// On database failure.
pub fn last_good(db: &LearnerDb, trace_id: &str) -> crate::db::Result<Option<(String, Vec<u8>)>> {
    db.last_good(trace_id)
}

/// The recipients of `trace_id`'s newest rollout when that was a confidential trace (empty
/// when it was plain, or there is none): what a regenerated or rolled-forward version is
/// encrypted to, so a confidential trace stays confidential.
///
/// # Errors
/// On SQLite failure, or a stored envelope or recipient that no longer decodes.
pub fn confidential_recipients(
    db: &LearnerDb,
    trace_id: &str,
) -> anyhow::Result<Vec<tracefleet::confidential::Recipient>> {
    let Some(bytes) = db.newest_rollout_signed(trace_id)? else {
        return Ok(Vec::new());
    };
    let envelope = tracefleet::signed::decode_signed(&bytes)?;
    Ok(match envelope.sealed {
        Some(sealed) => sealed.parsed()?,
        None => Vec::new(),
    })
}

/// Every version of `trace_id` the learner has heard of: rolled out, acknowledged or
/// reported. A roll-forward goes above all of them.
///
/// # Errors
/// On database failure.
pub fn known_versions(db: &LearnerDb, trace_id: &str) -> crate::db::Result<Vec<String>> {
    db.known_versions(trace_id)
}

/// The newest version of `trace_id` the learner knows, if any.
///
/// # Errors
/// On database failure.
pub fn newest_version(
    db: &LearnerDb,
    trace_id: &str,
) -> crate::db::Result<Option<tracefleet::ids::Version>> {
    Ok(known_versions(db, trace_id)?
        .iter()
        .filter_map(|v| v.parse::<tracefleet::ids::Version>().ok())
        .max())
}

/// A message the engine wants published (QoS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic.
    pub topic: String,
    /// Payload (empty: withdraw the retained message).
    pub payload: Vec<u8>,
}

/// Devices known (from heartbeats) that `waves` reach whose identity is not one of
/// `recipients`, or not known: they will refuse a confidential trace encrypted to
/// `recipients`, and a wave waits for every device of it.
///
/// # Errors
/// On SQLite failure.
pub fn not_recipients(
    db: &LearnerDb,
    waves: &[Wave],
    recipients: &[String],
) -> crate::db::Result<Vec<String>> {
    Ok(db
        .device_groups()?
        .into_iter()
        .filter(|d| {
            waves
                .iter()
                .any(|w| w.reaches(d.device_id.as_str(), &d.groups))
        })
        .filter(|d| !d.recipient.as_ref().is_some_and(|r| recipients.contains(r)))
        .map(|d| d.device_id.into())
        .collect())
}

/// Devices known (from heartbeats) to belong to `wave`, or the canary set.
fn wave_devices(db: &LearnerDb, wave: &Wave) -> crate::db::Result<Vec<String>> {
    if let Wave::Devices(d) = wave {
        return Ok(d.clone());
    }
    Ok(db
        .device_groups()?
        .into_iter()
        .filter(|d| wave.reaches(d.device_id.as_str(), &d.groups))
        .map(|d| d.device_id.into())
        .collect())
}

/// A rollout's state changed by [`tick`]: what `serve` records in the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The trace.
    pub trace_id: String,
    /// The version rolled out.
    pub version: String,
    /// `rollout wave` (the next wave published), `rollout halt` (the abort rule fired),
    /// `rollout withdrawn` (an abort carried out) or `rollout done`.
    pub action: &'static str,
    /// What and why, without floats (the audit log's rule).
    pub detail: serde_json::Value,
}

/// What one [`tick`] does: the messages to publish, in order, and the state changes.
#[derive(Debug, Default)]
pub struct Ticked {
    /// Retained messages to publish (an empty payload withdraws).
    pub publishes: Vec<Publish>,
    /// The rollouts whose state changed.
    pub changes: Vec<Change>,
}

/// Advances every rollout one step; returns what to publish and what changed. `republish`
/// also returns the retained messages of every wave already published (after a reconnect:
/// the broker may have lost them).
///
/// # Errors
/// On SQLite failure.
pub fn tick(db: &LearnerDb, now: i64, republish: bool) -> crate::db::Result<Ticked> {
    let mut out = Vec::new();
    let mut changes = Vec::new();
    for r in list(db)? {
        let change = |action: &'static str, detail: serde_json::Value| Change {
            trace_id: r.trace_id.clone(),
            version: r.version.clone(),
            action,
            detail,
        };
        let published = usize::try_from(r.wave + 1).unwrap_or(0).min(r.waves.len());
        let reached = &r.waves[..published];
        let set =
            |state: &str, wave: i64, reason: &str| db.set_rollout(r.id, state, wave, reason, now);
        match r.state.as_str() {
            "aborting" => {
                out.extend(publishes(reached, &r.trace_id, &[]));
                set("aborted", r.wave, &r.reason)?;
                changes.push(change(
                    "rollout withdrawn",
                    serde_json::json!({
                        "waves": reached.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "reason": r.reason,
                    }),
                ));
                continue;
            }
            "running" => {}
            "done" if republish => {}
            _ => continue,
        }
        // Loaded only for a rollout that may publish it (up to 1 MiB, every second).
        let signed = db.rollout_signed(r.id)?;
        if republish {
            out.extend(publishes(reached, &r.trace_id, &signed));
        }
        if r.state == "done" {
            continue;
        }
        // The abort criterion, over every run of this version so far.
        if r.runs >= r.min_runs && r.runs > 0 {
            #[allow(clippy::cast_precision_loss)]
            let rate = r.failures as f64 / r.runs as f64;
            if rate > r.max_failure_rate {
                let reason = format!(
                    "failure rate {rate:.2} over {} runs (more than {:.2}) after wave {} ({}): halted before the next wave",
                    r.runs,
                    r.max_failure_rate,
                    r.wave + 1,
                    reached.last().map_or("-".into(), ToString::to_string)
                );
                tracing::warn!(trace = %r.trace_id, version = %r.version, %reason, "rollout halted");
                out.extend(publishes(reached, &r.trace_id, &[]));
                set("halted", r.wave, &reason)?;
                changes.push(change(
                    "rollout halt",
                    serde_json::json!({
                        "runs": r.runs,
                        "failures": r.failures,
                        "waves_withdrawn": reached.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "reason": reason,
                    }),
                ));
                continue;
            }
        }
        let next = if r.wave < 0 {
            0
        } else {
            let devices = wave_devices(db, &r.waves[published - 1])?;
            // Which devices acked the version, and runs per device, in one query each.
            let acked_by = db.acked_devices(&r.trace_id, &r.version)?;
            let runs_by = db.runs_by_device(&r.trace_id, &r.version)?;
            let acked = devices.iter().filter(|d| acked_by.contains(*d)).count();
            let runs: i64 = devices.iter().filter_map(|d| runs_by.get(d)).sum();
            let passed = devices.is_empty() || (acked == devices.len() && runs >= r.min_runs);
            if !passed {
                continue;
            }
            published
        };
        if next >= r.waves.len() {
            tracing::info!(trace = %r.trace_id, version = %r.version, "rollout done");
            set("done", r.wave, "")?;
            changes.push(change(
                "rollout done",
                serde_json::json!({ "runs": r.runs, "failures": r.failures }),
            ));
            continue;
        }
        tracing::info!(trace = %r.trace_id, version = %r.version, wave = %r.waves[next], "rollout: publishing the next wave");
        out.extend(publishes(&r.waves[next..=next], &r.trace_id, &signed));
        set("running", i64::try_from(next).unwrap_or(0), "")?;
        changes.push(change(
            "rollout wave",
            serde_json::json!({
                "wave": next + 1,
                "of": r.waves.len(),
                "target": r.waves[next].to_string(),
                "runs_so_far": r.runs,
                "failures_so_far": r.failures,
            }),
        ));
    }
    Ok(Ticked {
        publishes: out,
        changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_sizes_parse_or_say_what_is_expected() {
        assert_eq!(parse_canary("5"), Ok(Canary::Devices(5)));
        assert_eq!(parse_canary("12.5%"), Ok(Canary::Percent(12.5)));
        for bad in ["0", "0%", "101%", "-1", "five", "5 %x", ""] {
            assert!(parse_canary(bad).unwrap_err().contains("expected"), "{bad}");
        }
    }

    #[test]
    fn waves_stored_before_canary_sets_read_unchanged() {
        let old: Vec<Wave> = serde_json::from_str(r#"["canary","*"]"#).unwrap();
        assert_eq!(old, [Wave::Group("canary".into()), Wave::Group("*".into())]);
        let new = vec![Wave::Devices(vec!["a".into()]), Wave::Group("*".into())];
        let json = serde_json::to_string(&new).unwrap();
        assert_eq!(json, r#"[["a"],"*"]"#);
        assert_eq!(serde_json::from_str::<Vec<Wave>>(&json).unwrap(), new);
    }

    #[test]
    fn canaries_are_online_devices_of_the_waves_in_an_order_that_depends_on_the_trace() {
        let dir = tempfile::tempdir().unwrap();
        let db = LearnerDb::open(&dir.path().join("l.db")).unwrap();
        let conn = &db;
        for i in 0..20 {
            db.put_device(
                &format!("d{i:02}"),
                i % 2 == 0,
                if i < 16 { r#"["wave1"]"# } else { r#"["lab"]"# },
            );
        }
        let wave1 = [Wave::Group("wave1".into())];
        let a = pick_canaries(conn, "trace-a", &wave1, Canary::Devices(3)).unwrap();
        assert_eq!(a.len(), 3);
        for d in &a {
            let n: usize = d[1..].parse().unwrap();
            assert!(n < 16 && n.is_multiple_of(2), "{d}: online and in wave1");
        }
        assert_eq!(
            pick_canaries(conn, "trace-a", &wave1, Canary::Devices(3)).unwrap(),
            a
        );
        let b = pick_canaries(conn, "trace-b", &wave1, Canary::Devices(3)).unwrap();
        assert_ne!(a, b, "another trace, other canaries");
        // 10% of wave1's 16 devices, rounded up; more than the online ones reaches offline ones.
        assert_eq!(
            pick_canaries(conn, "t", &wave1, Canary::Percent(10.0))
                .unwrap()
                .len(),
            2
        );
        let all = pick_canaries(conn, "t", &wave1, Canary::Devices(12)).unwrap();
        assert_eq!(all.len(), 12);
        assert!(
            all[..8]
                .iter()
                .all(|d| d[1..].parse::<usize>().unwrap() % 2 == 0)
        );
        let fleet = [Wave::Group(FLEET.into())];
        assert_eq!(
            pick_canaries(conn, "t", &fleet, Canary::Percent(100.0))
                .unwrap()
                .len(),
            20
        );
        let none = [Wave::Group("nobody".into())];
        assert!(
            pick_canaries(conn, "t", &none, Canary::Devices(1))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn abort_criteria_parse_or_say_what_is_expected() {
        assert_eq!(parse_abort_if("failure-rate>0.2 over 5 runs"), Ok((0.2, 5)));
        assert_eq!(parse_abort_if("failure-rate>0 over 1 run"), Ok((0.0, 1)));
        for bad in [
            "failure-rate>2 over 5 runs",
            "failure-rate>0.2 over 0 runs",
            "failure-rate<0.2 over 5 runs",
            "0.2 over 5",
            "failure-rate>x over 5 runs",
        ] {
            assert!(
                parse_abort_if(bad).unwrap_err().contains("expected"),
                "{bad}"
            );
        }
    }

    /// A learner database with devices `c1` (group canary) and `w1`, `w2` (group rest), and a
    /// rollout of `t` 1.0.0 in the waves canary then rest, halting above `max_failure_rate`
    /// once `min_runs` runs are in.
    fn rollout(max_failure_rate: f64, min_runs: u32) -> (tempfile::TempDir, LearnerDb) {
        let dir = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&dir.path().join("l.db")).unwrap();
        db.put_device("c1", true, r#"["canary"]"#);
        db.put_device("w1", true, r#"["rest"]"#);
        db.put_device("w2", true, r#"["rest"]"#);
        let waves = [Wave::Group("canary".into()), Wave::Group("rest".into())];
        let plan = Plan {
            trace_id: "t",
            version: "1.0.0",
            signed: b"signed trace",
            waves: &waves,
            max_failure_rate,
            min_runs,
        };
        start(&mut db, &plan, 0).unwrap();
        (dir, db)
    }

    /// What the device sends: its ack of the install, then one report per outcome.
    fn device_reports(db: &mut LearnerDb, device: &str, outcomes: &[bool]) {
        use tracefleet::wire::{self, Ack, AckOutcome, ReportMessage, Topic};
        let ack = Ack {
            trace_id: "t".into(),
            version: Some("1.0.0".into()),
            outcome: AckOutcome::Installed,
            at: 1,
        };
        db.ingest(&Topic::Acks(device.into()).name(), &wire::encode(&ack))
            .unwrap();
        for (i, ok) in outcomes.iter().enumerate() {
            let run = format!("{device}-r{i}");
            let r = crate::simulate::synthetic_report(device, &run, "t", "1.0.0", *ok);
            let m = ReportMessage {
                run_id: run,
                report_json: serde_json::to_string(&r).unwrap(),
            };
            db.ingest(&Topic::Reports(device.into()).name(), &wire::encode(&m))
                .unwrap();
        }
    }

    fn state(db: &LearnerDb) -> (String, i64) {
        let r = &list(db).unwrap()[0];
        (r.state.clone(), r.wave)
    }

    fn topics(p: &[Publish]) -> Vec<(String, bool)> {
        p.iter()
            .map(|p| (p.topic.clone(), p.payload.is_empty()))
            .collect()
    }

    #[test]
    fn devices_a_confidential_trace_is_not_encrypted_to_are_named() {
        let (_d, db) = rollout(0.25, 4);
        db.put_recipient("c1", "age1c1");
        db.put_recipient("w1", "age1w1");
        let names = |groups: &[&str], recipients: &[&str]| {
            let waves: Vec<Wave> = groups
                .iter()
                .map(|g| Wave::Group((*g).to_owned()))
                .collect();
            let recipients: Vec<String> = recipients.iter().map(|r| (*r).to_owned()).collect();
            not_recipients(&db, &waves, &recipients).unwrap()
        };
        assert!(names(&["canary"], &["age1c1"]).is_empty());
        // w2 has sent no identity; w1's is not among the recipients.
        assert_eq!(names(&["rest"], &["age1c1"]), ["w1", "w2"]);
        assert_eq!(names(&["*"], &["age1c1", "age1w1"]), ["w2"]);
    }

    #[test]
    fn a_canary_at_the_failure_limit_goes_on_and_one_above_it_halts_and_withdraws() {
        let canary = wave_topics(&Wave::Group("canary".into()), "t");
        let rest = wave_topics(&Wave::Group("rest".into()), "t");
        // Limit 0.25 over at least 4 runs; the canary reports 1 failure in 4: exactly at it.
        let (_d, mut db) = rollout(0.25, 4);
        let first = tick(&db, 1, false).unwrap().publishes;
        assert_eq!(
            topics(&first),
            canary
                .iter()
                .map(|t| (t.clone(), false))
                .collect::<Vec<_>>()
        );
        device_reports(&mut db, "c1", &[true, false, true, true]);
        let next = tick(&db, 2, false).unwrap().publishes;
        assert_eq!(
            state(&db),
            ("running".into(), 1),
            "at the limit is not above it"
        );
        assert_eq!(
            topics(&next),
            rest.iter().map(|t| (t.clone(), false)).collect::<Vec<_>>()
        );

        // 2 failures in 4: above the limit — halted, and every wave reached is withdrawn
        // (an empty retained message on its topic), the next one never published.
        let (_d, mut db) = rollout(0.25, 4);
        let changes = tick(&db, 1, false).unwrap().changes;
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].action, "rollout wave");
        assert_eq!(changes[0].detail["target"], "canary");
        device_reports(&mut db, "c1", &[true, false, false, true]);
        let ticked = tick(&db, 2, false).unwrap();
        let halted = ticked.publishes;
        assert_eq!(state(&db), ("halted".into(), 0));
        // What serve records in the audit log: the halt, with its figures.
        assert_eq!(ticked.changes.len(), 1, "{:?}", ticked.changes);
        assert_eq!(ticked.changes[0].action, "rollout halt");
        assert_eq!(ticked.changes[0].detail["failures"], 2);
        assert!(
            tick(&db, 3, true).unwrap().changes.is_empty(),
            "republishing changes nothing"
        );
        assert_eq!(
            topics(&halted),
            canary.iter().map(|t| (t.clone(), true)).collect::<Vec<_>>()
        );
        let reason = &list(&db).unwrap()[0].reason;
        assert!(reason.contains("failure rate 0.50 over 4 runs"), "{reason}");
        assert!(
            tick(&db, 3, false).unwrap().publishes.is_empty(),
            "a halted rollout stays halted"
        );
    }

    #[test]
    fn a_wave_waits_for_min_runs_before_the_failure_rate_counts_or_the_next_wave_goes() {
        let (_d, mut db) = rollout(0.25, 4);
        tick(&db, 1, false).unwrap();
        // Three runs, all failed: a rate of 1.0, but under min_runs — neither halt nor advance.
        device_reports(&mut db, "c1", &[false, false, false]);
        assert!(tick(&db, 2, false).unwrap().publishes.is_empty());
        assert_eq!(state(&db), ("running".into(), 0));
        // The fourth run (a success) brings min_runs: 3 of 4 failed, halted.
        let mut more = db;
        let r = crate::simulate::synthetic_report("c1", "c1-r9", "t", "1.0.0", true);
        let m = tracefleet::wire::ReportMessage {
            run_id: "c1-r9".into(),
            report_json: serde_json::to_string(&r).unwrap(),
        };
        more.ingest(
            &tracefleet::wire::Topic::Reports("c1".into()).name(),
            &tracefleet::wire::encode(&m),
        )
        .unwrap();
        tick(&more, 3, false).unwrap();
        assert_eq!(state(&more).0, "halted");

        // Healthy but short of min_runs: the next wave waits.
        let (_d, mut db) = rollout(0.25, 4);
        tick(&db, 1, false).unwrap();
        device_reports(&mut db, "c1", &[true, true, true]);
        assert!(tick(&db, 2, false).unwrap().publishes.is_empty());
        assert_eq!(state(&db), ("running".into(), 0));
    }
}
