//! The trace interpreter: a functional core over a [`Host`].
//!
//! [`run`] takes a compiled, verified trace, the run's context and inputs, and a `Host` that
//! owns every effect (files, processes, the model, the clock). It returns the [`Report`] and
//! emits an [`Event`] around each step so the caller can journal the run. Nothing here touches
//! the file system, a process or the model directly, which is what makes runs testable.
//!
//! Semantics: preconditions → steps as a DAG (`scheduler`: a step starts when its
//! prerequisites finished, in [`Trace::execution_order`] priority, up to `max_parallel` at
//! once on forked hosts) → each step once or once per `foreach` item (`step`) →
//! validations after each attempt (`checks`) → error policy (retry with exponential
//! backoff, skip, fallback step, escalation, fail) → postconditions. Grep and Glob are pure
//! functions over the host's file listing (`search`).

mod checks;
pub mod judgement;
mod scheduler;
mod search;
mod step;
#[cfg(test)]
mod tests;

pub use crate::effects::{
    Completed, FileKind, GenerateRequest, Generation, Host, Interruption, MAX_LISTED_FILES,
    ShellOutput,
};
pub use checks::check_supported;
use checks::{check, schema_violation};
use scheduler::{Progress, conditions, schedule};
use search::{glob_files, grep};
use step::{StepRun, not_run, run_step};

use std::collections::BTreeMap;
use tracefleet::Trace;
use tracefleet::ids::VarName;
use tracefleet::report::{
    CheckResult, LlmUsage, REPORT_VERSION, Report, RunStatus, StepResult, StepStatus,
};
use tracefleet::trace::{Template, Tool};

/// What the run is and where it happens.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// The run id.
    pub run_id: String,
    /// The device id.
    pub device_id: tracefleet::ids::DeviceId,
    /// The run's base directory (for `{base_dir}`).
    pub base_dir: String,
    /// Fidelity already measured for this trace version with the models its steps use, by
    /// step; a judgement step with scored examples and no entry is measured when reached.
    pub fidelity: BTreeMap<u32, tracefleet::judgement::Fidelity>,
}

/// Progress of a run, for journaling.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A step is about to start (its record so far: not run yet).
    StepStarted(&'a StepResult),
    /// A step finished (successfully or not), with its full output.
    StepFinished(&'a StepResult, &'a str),
    /// A judgement step's fidelity was measured (before the step ran, or was refused).
    FidelityMeasured(&'a tracefleet::judgement::Fidelity),
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum InputError {
    /// `--var` named no input of the trace.
    #[error("unknown input `{name}`: this trace's inputs are [{known}]")]
    Unknown {
        /// The name given.
        name: String,
        /// The trace's inputs.
        known: String,
    },
    /// A required input was not given.
    #[error("input `{name}` is required (it has no default): pass --var {name}=VALUE")]
    Missing {
        /// The input.
        name: String,
    },
}

/// Applies defaults to `given` inputs and checks them against the trace's declared inputs.
///
/// # Errors
/// [`InputError`] for an unknown name or a missing required input.
pub fn resolve_inputs(
    trace: &Trace,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, InputError> {
    for name in given.keys() {
        if !trace.inputs.iter().any(|i| i.name.as_str() == name) {
            return Err(InputError::Unknown {
                name: name.clone(),
                known: trace
                    .inputs
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let mut out = BTreeMap::new();
    for input in &trace.inputs {
        let v = given
            .get(input.name.as_str())
            .or(input.default.as_ref())
            .ok_or_else(|| InputError::Missing {
                name: input.name.to_string(),
            })?;
        out.insert(input.name.to_string(), v.clone());
    }
    Ok(out)
}

struct Vars {
    values: BTreeMap<String, String>,
}

impl Vars {
    fn lookup(&self, v: &str) -> Option<&str> {
        self.values.get(v).map(String::as_str)
    }

    fn render(&self, t: &Template) -> Result<String, String> {
        t.render(|v| self.lookup(v)).map_err(no_value)
    }

    /// A shell command and the environment carrying its variables' values.
    fn render_shell(&self, t: &Template) -> Result<(String, Vec<(String, String)>), String> {
        t.render_shell(|v| self.lookup(v)).map_err(|e| {
            if VarName::is_valid(&e) {
                no_value(e)
            } else {
                e
            }
        })
    }
}

fn no_value(v: String) -> String {
    format!("variable `{{{v}}}` has no value (its step did not succeed)")
}

struct Attempt {
    output: String,
    exit_code: Option<i32>,
    llm: Option<LlmUsage>,
    /// A Bash step's stderr, for the error when its exit status fails the step.
    stderr: String,
    /// An LLM answer refused as uncertain: why, and what happens instead.
    refusal: Option<(String, judgement::Refusal)>,
}

/// Executes `trace` with resolved `inputs` (see [`resolve_inputs`]).
pub fn run(
    trace: &Trace,
    cx: &RunContext,
    inputs: &BTreeMap<String, String>,
    host: &mut dyn Host,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Report {
    resume(trace, cx, inputs, &BTreeMap::new(), host, on_event)
}

/// Executes `trace` like [`run`], taking the steps in `done` (by step number) as already
/// completed: a step that succeeded, was recovered by its fallback or was skipped is not run
/// again — its record and output are reused and no event is emitted for it. Anything else in
/// `done` (a failed or aborted step) runs again.
pub fn resume(
    trace: &Trace,
    cx: &RunContext,
    inputs: &BTreeMap<String, String>,
    done: &BTreeMap<u32, Completed>,
    host: &mut dyn Host,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Report {
    let done: BTreeMap<u32, &Completed> = done
        .iter()
        .filter(|(_, c)| {
            matches!(
                c.result.status,
                StepStatus::Success | StepStatus::Recovered | StepStatus::Skipped
            )
        })
        .map(|(n, c)| (*n, c))
        .collect();
    let started = host.monotonic();
    let started_at = host.timestamp();
    let mut vars = Vars {
        values: inputs.clone(),
    };
    vars.values.insert("run_id".into(), cx.run_id.clone());
    vars.values.insert("trace_id".into(), trace.id.to_string());
    vars.values.insert("base_dir".into(), cx.base_dir.clone());
    vars.values
        .insert("current_timestamp".into(), started_at.clone());
    let bindings = trace.output_bindings();

    let mut report = Report {
        report_version: REPORT_VERSION,
        run_id: cx.run_id.clone(),
        device_id: cx.device_id.clone(),
        trace_id: trace.id.to_string(),
        trace_version: trace.version.to_string(),
        goal_signature: trace.goal_signature.clone(),
        status: RunStatus::Success,
        total_steps: u32::try_from(trace.steps.len()).unwrap_or(u32::MAX),
        completed_steps: 0,
        failed_step: None,
        error: None,
        started_at,
        finished_at: String::new(),
        execution_time_secs: 0.0,
        estimated_cost: trace.estimated_cost,
        inputs: inputs.clone(),
        preconditions: Vec::new(),
        all_preconditions_met: true,
        step_results: Vec::new(),
        all_validations_passed: true,
        postconditions: Vec::new(),
        all_postconditions_met: true,
        escalations: Vec::new(),
        fidelity: Vec::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        protections: Vec::new(),
        resumes: 0,
        telemetry_start: None,
        telemetry_end: None,
    };

    let (mut results, mut failed) = conditions(&trace.preconditions, &vars, host, "precondition");
    // A trace that fetches from the web needs the network, said and present: a clear
    // precondition failure rather than a step that hangs offline.
    for step in trace
        .steps
        .iter()
        .filter(|s| matches!(s.tool, Tool::WebFetch { .. }))
    {
        let Tool::WebFetch { url, .. } = &step.tool else {
            continue;
        };
        let check = format!("step {} (WebFetch) can reach the network", step.number);
        let outcome = if !trace.metadata.requires_internet {
            Err("the trace does not declare `requires_internet: true` in its metadata".into())
        } else {
            match vars.render(url) {
                // A URL built from a step's output is checked when that step ran.
                Err(_) => Ok(()),
                Ok(u) => host.reachable(&u),
            }
        };
        let passed = outcome.is_ok();
        if let Err(why) = &outcome {
            let e = format!("precondition failed: {check}: {why}");
            failed.get_or_insert(e);
        }
        results.push(CheckResult {
            check,
            kind: "network".into(),
            passed,
            detail: outcome.err().unwrap_or_else(|| "ok".into()),
        });
    }
    report.preconditions = results;
    report.all_preconditions_met = failed.is_none();
    if let Some(error) = failed {
        report.status = RunStatus::Failed;
        report.error = Some(error);
    }

    // Steps named as another step's fallback run only in that role.
    let fallback_only: std::collections::BTreeSet<u32> = trace
        .steps
        .iter()
        .flat_map(|s| {
            let uncertain = match &s.tool {
                Tool::Llm(c) => c.judgement.on_uncertain.fallback_step(),
                _ => None,
            };
            s.on_error.fallback_step().into_iter().chain(uncertain)
        })
        .collect();
    // The main flow's steps: a step that runs only as another's fallback is not one of them
    // (else a run whose fallback was not needed, or ran in its place, read "SUCCESS, 3/4").
    report.total_steps = u32::try_from(
        trace
            .steps
            .iter()
            .filter(|s| !fallback_only.contains(&s.number))
            .count(),
    )
    .unwrap_or(u32::MAX);
    let fallback_results: Vec<StepResult> = done
        .values()
        .filter(|c| fallback_only.contains(&c.result.step))
        .map(|c| c.result.clone())
        .collect();
    let mut progress = Progress {
        report,
        vars,
        fallback_results,
        bindings,
        fidelity: cx.fidelity.clone(),
    };
    schedule(trace, &done, &fallback_only, &mut progress, host, on_event);
    let Progress {
        mut report,
        vars,
        fallback_results,
        ..
    } = progress;

    // A fallback step's own record replaces its "not run" placeholder.
    for fb in fallback_results {
        report.step_results.retain(|r| r.step != fb.step);
        report.step_results.push(fb);
    }
    report.step_results.sort_by_key(|r| r.step);

    if report.status == RunStatus::Success {
        let (mut results, failed) = conditions(&trace.postconditions, &vars, host, "postcondition");
        // A postcondition may render a sensitive step's output (`{var}`): with any sensitive
        // step, what the postconditions found stays on the device too.
        let withheld = trace.withholds_findings();
        if withheld {
            for r in &mut results {
                r.detail = tracefleet::report::WITHHELD.into();
            }
        }
        report.postconditions = results;
        report.all_postconditions_met = failed.is_none();
        if let Some(error) = failed {
            report.status = RunStatus::Failed;
            report.error = Some(if withheld {
                format!(
                    "a postcondition failed; details {}",
                    tracefleet::report::WITHHELD
                )
            } else {
                error
            });
        }
    } else {
        report.all_postconditions_met = false;
    }
    report.finished_at = host.timestamp();
    report.execution_time_secs = (host.monotonic() - started).as_secs_f64();
    report
}
