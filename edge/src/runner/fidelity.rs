//! Fidelity measured outside a run: `follower traces fidelity`, which the agent starts when it
//! has installed a pushed trace, so that a judgement step's fidelity with this device's model
//! is known (and shown by `follower traces list`) before the first run needs it.

use super::{ExecOptions, known_fidelity, load_trace, run_models, step_digest, step_model_names};
use crate::exec::judgement;
use crate::host::LocalHost;
use crate::infer::Inference;
use crate::store::Store;
use anyhow::{Context, Result};
use std::path::Path;
use tracefleet::judgement::Fidelity;
use tracefleet::time::rfc3339_now;

/// One judgement step's fidelity and whether it was measured now (else it was known).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepFidelity {
    /// The figures.
    #[serde(flatten)]
    pub fidelity: Fidelity,
    /// Measured by this call (`false`: already stored for this version, step, model and step
    /// digest).
    pub measured: bool,
}

/// Answers every scored reference example of `trace`'s judgement steps with the model each
/// step resolves to on this device, and stores each fidelity (as a run would before the step).
/// A fidelity already stored for the same version, step, model and step digest is returned,
/// not measured again. `trace`: an installed trace id or a signed file (verified either way).
///
/// # Errors
/// The trace does not load or verify, no model can be resolved for a judgement step, the
/// model does not load, or the store cannot be written.
pub fn measure_fidelity(
    state_dir: &Path,
    trace: &Path,
    opts: &ExecOptions,
) -> Result<Vec<StepFidelity>> {
    let mut store = Store::open(state_dir)?;
    let loaded = load_trace(&store, trace, false, &mut |w| tracing::warn!("{w}"))?;
    let trace = &loaded.trace;
    let judged: Vec<_> = trace.judged_steps().map(|(s, _)| s).collect();
    if judged.is_empty() {
        return Ok(Vec::new());
    }
    let (specs, default) = run_models(&store, state_dir, trace, opts.model.as_deref())?;
    let models = step_model_names(trace, default.as_deref());
    let known = known_fidelity(&store, trace, &models)?;
    let mut out = Vec::new();
    let to_measure: Vec<_> = judged
        .into_iter()
        .filter(|s| match known.get(&s.number) {
            Some(f) => {
                out.push(StepFidelity {
                    fidelity: f.clone(),
                    measured: false,
                });
                false
            }
            None => true,
        })
        .collect();
    if !to_measure.is_empty() {
        let inference = Inference::start(opts.infer.clone(), specs, default)?;
        // The host's files are never touched: only the model answers.
        let scratch = state_dir.join("runs").join(format!(
            ".fidelity-{}-{}-{}",
            trace.id,
            trace.version,
            std::process::id()
        ));
        let mut host = LocalHost::new(&scratch, &[], Some(inference))
            .with_context(|| format!("scratch directory {}", scratch.display()))?;
        for step in to_measure {
            let Some(m) = judgement::measure(step, &mut host) else {
                continue;
            };
            store.record_fidelity(
                trace.id.as_str(),
                &trace.version.to_string(),
                &step_digest(step),
                &m.fidelity,
                &rfc3339_now(),
            )?;
            out.push(StepFidelity {
                fidelity: m.fidelity,
                measured: true,
            });
        }
        drop(host);
        let _ = std::fs::remove_dir_all(&scratch);
    }
    out.sort_by_key(|f| f.fidelity.step);
    Ok(out)
}
