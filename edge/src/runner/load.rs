//! Which trace a run executes: an installed trace (verified again), a signed file (verified;
//! versions never go backwards), a trace source or compiled trace for authors
//! (`allow_unsigned`), or the installed trace that best matches a goal and has earned
//! autonomy.

use crate::files::read_limited;
use crate::store::Store;
use anyhow::{Context, Result, anyhow, bail};
use std::path::Path;
use tracefleet::signed::{self, SIGNED_MAGIC};
use tracefleet::time::{rfc3339_now, unix_now};
use tracefleet::{Trace, compile};

/// A trace ready to run: the trace, how it was obtained, and the file to keep with the run
/// for a resume (the signed trace, or the compiled form of an unsigned one).
pub struct Loaded {
    /// The trace.
    pub trace: Trace,
    /// How it was obtained, for the summary (`installed, verified`, `UNSIGNED trace source`…).
    pub provenance: String,
    /// The bytes stored with the run.
    pub file: Vec<u8>,
    /// Whether it was verified (only verified runs count in the statistics).
    pub signed: bool,
}

impl Loaded {
    pub(crate) fn signed(trace: Trace, provenance: String, file: Vec<u8>) -> Self {
        Self {
            trace,
            provenance,
            file,
            signed: true,
        }
    }

    pub(crate) fn unsigned(trace: Trace, provenance: &str) -> Self {
        let file = compile::encode_compiled(&trace);
        Self {
            trace,
            provenance: provenance.into(),
            file,
            signed: false,
        }
    }
}

/// Verifies a signed trace against the device's trust root (a confidential trace decrypted
/// with the device's identity); also returns that root's version.
///
/// # Errors
/// No trust root, or the verification refused the bytes.
pub fn verify_signed(store: &Store, bytes: &[u8]) -> Result<(signed::Verified, u32)> {
    let (root, _) = store.trust_root()?.ok_or_else(|| {
        anyhow!("this device has no trust root yet (run `follower trust init ROOT.tfr`)")
    })?;
    let identity = crate::identity::for_trace(store.state_dir(), bytes)?;
    Ok((
        tracefleet::trust::verify_with_root(bytes, &root, unix_now(), identity.as_ref())?,
        root.version,
    ))
}

/// Loads the trace to run: verified when signed; sources and compiled traces only for
/// authors. Compiler warnings of a source go to `warn`.
///
/// # Errors
/// Nothing to load, a refused verification, an older version than the installed one, an
/// unsigned trace without `allow_unsigned`, or a source that does not compile.
pub fn load_trace(
    store: &Store,
    path: &Path,
    allow_unsigned: bool,
    warn: &mut dyn FnMut(&str),
) -> Result<Loaded> {
    // An installed trace id runs the installed version, verified again (the root may have
    // rotated or the signature expired since it was installed) — even if a file of that name
    // happens to exist here; a file is named with a path separator or an extension.
    if let Some(id) = path
        .to_str()
        .and_then(|p| p.parse::<tracefleet::ids::TraceId>().ok())
    {
        if let Some(bytes) = store.installed_signed(id.as_str())? {
            let (v, _) = verify_signed(store, &bytes)
                .with_context(|| format!("refusing installed trace {id}"))?;
            return Ok(Loaded::signed(v.trace, "installed, verified".into(), bytes));
        }
        if !path.exists() {
            bail!("no installed trace {id} and no such file (see `follower traces list`)");
        }
    }
    let bytes = read_limited(path, signed::MAX_SIGNED_BYTES as u64)?;
    let shown = path.display();
    if bytes.starts_with(SIGNED_MAGIC) {
        let (v, _) = verify_signed(store, &bytes).with_context(|| format!("refusing {shown}"))?;
        // Versions never go backwards, for runs from files too.
        if let Some(installed) = store.installed_version(v.trace.id.as_str())?
            && v.trace.version < installed
        {
            bail!(
                "refusing {shown}: {} {} is older than the installed {installed}, and versions never go backwards",
                v.trace.id,
                v.trace.version
            );
        }
        let by = v
            .signed_by
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        return Ok(Loaded::signed(
            v.trace,
            format!("verified, signed by {by}"),
            bytes,
        ));
    }
    if !allow_unsigned {
        if bytes.starts_with(compile::COMPILED_MAGIC) {
            bail!(
                "refusing {shown}: a compiled but unsigned trace; sign it with `learner sign` (trace authors: --allow-unsigned)"
            );
        }
        bail!(
            "refusing {shown}: not a signed trace (expected the \"TFS\" magic); trace authors may run sources with --allow-unsigned"
        );
    }
    if bytes.starts_with(compile::COMPILED_MAGIC) {
        return Ok(Loaded::unsigned(
            compile::decode_compiled(&bytes).with_context(|| format!("{shown}"))?,
            "UNSIGNED compiled trace",
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{shown}: trace source is not UTF-8 (byte {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let (trace, warnings) = compile::compile_source(&shown.to_string(), &text)
        .map_err(|d| anyhow!("{}", d.render(&text).trim_end()))?;
    for w in warnings {
        warn(&w.to_string());
    }
    Ok(Loaded::unsigned(trace, "UNSIGNED trace source"))
}

/// Least goal similarity for `--goal` to pick a trace.
pub const MIN_GOAL_SIMILARITY: f64 = 0.25;

/// `run --goal`: the best-matching installed trace that verifies, if it may run on its own;
/// otherwise an escalation is recorded and the run refused.
///
/// # Errors
/// No trace matches well enough, or the best one has not earned autonomy (both recorded as
/// escalations), or the store failed.
pub fn select_by_goal(store: &Store, goal: &str) -> Result<Loaded> {
    use tracefleet::confidence::goal_similarity;
    let mut best: Option<(f64, Trace, Vec<u8>)> = None;
    for (id, _, bytes) in store.installed_traces()? {
        let Ok((v, _)) = verify_signed(store, &bytes) else {
            tracing::warn!(trace = %id, "installed trace no longer verifies; not considered");
            continue;
        };
        let score = goal_similarity(goal, &v.trace.goal_signature);
        if best.as_ref().is_none_or(|(b, _, _)| score > *b) {
            best = Some((score, v.trace, bytes));
        }
    }
    let now = rfc3339_now();
    let Some((score, trace, file)) = best.filter(|(s, _, _)| *s >= MIN_GOAL_SIMILARITY) else {
        let reason = tracefleet::wire::no_trace_for_goal(goal);
        store.record_escalation("-", None, &reason, &now)?;
        bail!("{reason} (similarity below {MIN_GOAL_SIMILARITY}); escalation recorded");
    };
    let (stats, _) = store.stats(trace.id.as_str(), &trace.version.to_string())?;
    if let Some(why) = stats.autonomy_refusal() {
        let reason = format!(
            "not running {} {} on its own: {why}",
            trace.id, trace.version
        );
        store.record_escalation(trace.id.as_str(), None, &reason, &now)?;
        bail!("{reason}; escalation recorded (run it by id to build confidence under supervision)");
    }
    let how = format!("selected for the goal (similarity {score:.2}), verified");
    Ok(Loaded::signed(trace, how, file))
}
