//! The DAG scheduler: which step starts when, forked hosts for parallel steps, and the
//! processing of each result on the scheduler thread (error policy, bindings, journal
//! events, interruption), plus pre- and postconditions.

use super::*;
use std::collections::BTreeMap;
use tracefleet::Trace;
use tracefleet::judgement::Fidelity;
use tracefleet::report::Escalation;
use tracefleet::report::{
    CheckResult, MAX_REPORTED_OUTPUT, Report, RunStatus, StepResult, StepStatus, truncate_utf8,
};
use tracefleet::trace::{Check, OnError, Step};

/// What the run has produced so far, updated as steps finish.
pub(super) struct Progress<'t> {
    pub(super) report: Report,
    pub(super) vars: Vars,
    pub(super) fallback_results: Vec<StepResult>,
    pub(super) bindings: BTreeMap<&'t str, u32>,
    /// Fidelity by step: known before the run, or measured when the step was reached.
    pub(super) fidelity: BTreeMap<u32, Fidelity>,
}

/// Runs the steps as a DAG: a step starts when its prerequisites (its `Dependencies`, else the
/// step before it) have finished, lowest position in [`Trace::execution_order`] first, up to
/// `max_parallel` at once when the host can [`Host::fork`] handles for concurrent steps (else
/// one at a time). Results are processed one by one on this thread, in completion order: error
/// policy, bindings, journal event. After a failure or an interruption no step starts; those
/// running finish and are recorded.
pub(super) fn schedule(
    trace: &Trace,
    done: &BTreeMap<u32, &Completed>,
    fallback_only: &std::collections::BTreeSet<u32>,
    p: &mut Progress<'_>,
    host: &mut dyn Host,
    on_event: &mut dyn FnMut(Event<'_>),
) {
    let n = trace.steps.len();
    // The compiler refuses cycles; a trace without a valid order still runs in source order.
    let order = trace.execution_order().unwrap_or_else(|| (0..n).collect());
    let index: std::collections::HashMap<u32, usize> = trace
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.number, i))
        .collect();
    let prerequisites: Vec<Vec<usize>> = trace
        .prerequisites()
        .into_iter()
        .map(|(_, deps)| deps.iter().filter_map(|d| index.get(d).copied()).collect())
        .collect();
    let mut finished = vec![false; n];
    let mut started = vec![false; n];
    for (i, s) in trace.steps.iter().enumerate() {
        if fallback_only.contains(&s.number) {
            // Never run in order; its dependants do not wait for it.
            finished[i] = true;
            started[i] = true;
        }
    }
    let limit = usize::try_from(trace.max_parallel).unwrap_or(1).max(1);
    let mut pool: Vec<Box<dyn Host + Send>> = if limit > 1 {
        (0..limit).map_while(|_| host.fork()).collect()
    } else {
        Vec::new()
    };
    let parallel = limit > 1 && pool.len() == limit;
    let (tx, rx) = std::sync::mpsc::channel::<(usize, StepRun, Box<dyn Host + Send>)>();
    let mut running = 0usize;
    let mut cursor = 0usize;
    std::thread::scope(|scope| {
        loop {
            // Start what is ready.
            while running < limit {
                if p.report.status == RunStatus::Success
                    && let Some(why) = host.interruption()
                {
                    interrupt(&mut p.report, why);
                }
                if p.report.status != RunStatus::Success {
                    break;
                }
                // Everything before `cursor` in `order` has started.
                while cursor < order.len() && started[order[cursor]] {
                    cursor += 1;
                }
                let Some(i) = order[cursor..]
                    .iter()
                    .copied()
                    .find(|&i| !started[i] && prerequisites[i].iter().all(|&d| finished[d]))
                else {
                    break;
                };
                started[i] = true;
                let step = &trace.steps[i];
                if let Some(c) = done.get(&step.number) {
                    reuse(p, step, c);
                    finished[i] = true;
                    continue;
                }
                on_event(Event::StepStarted(&not_run(step)));
                if let Some(refused) = fidelity_gate(p, step, host, on_event) {
                    complete(p, trace, step, refused, host, on_event);
                    finished[i] = true;
                    continue;
                }
                if parallel && let Some(mut h) = pool.pop() {
                    let vars = Vars {
                        values: p.vars.values.clone(),
                    };
                    let tx = tx.clone();
                    scope.spawn(move || {
                        let run = run_step(step, &vars, &mut *h);
                        let _ = tx.send((i, run, h));
                    });
                    running += 1;
                } else {
                    let run = run_step(step, &p.vars, host);
                    complete(p, trace, step, run, host, on_event);
                    finished[i] = true;
                }
            }
            if running == 0 {
                break;
            }
            let Ok((i, run, h)) = rx.recv() else { break };
            pool.push(h);
            running -= 1;
            complete(p, trace, &trace.steps[i], run, host, on_event);
            finished[i] = true;
        }
    });
    // What never started is reported as not run (a fallback step's own record replaces it).
    for (i, step) in trace.steps.iter().enumerate() {
        let recorded = p.report.step_results.iter().any(|r| r.step == step.number)
            || p.fallback_results.iter().any(|r| r.step == step.number);
        if (!started[i] || fallback_only.contains(&step.number)) && !recorded {
            p.report.step_results.push(not_run(step));
        }
    }
}

/// A judgement step with scored reference examples runs only when its model's fidelity
/// reaches the step's `min_fidelity`: the fidelity known for this run, or measured now
/// (journaled through [`Event::FidelityMeasured`]). Every fidelity reached goes into the
/// report. `Some`: the step refused, as a failed run escalating with the figures.
fn fidelity_gate(
    p: &mut Progress<'_>,
    step: &Step,
    host: &mut dyn Host,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Option<StepRun> {
    let f = match p.fidelity.get(&step.number) {
        Some(f) => f.clone(),
        None => {
            let m = judgement::measure(step, host)?;
            // The measurement's tokens are the run's too.
            p.report.prompt_tokens += m.prompt_tokens;
            p.report.completion_tokens += m.completion_tokens;
            let f = m.fidelity;
            on_event(Event::FidelityMeasured(&f));
            p.fidelity.insert(step.number, f.clone());
            f
        }
    };
    let passes = f.passes();
    let why = f.refusal();
    p.report.fidelity.retain(|r| r.step != step.number);
    p.report.fidelity.push(f);
    if passes {
        return None;
    }
    let mut result = not_run(step);
    result.status = StepStatus::Failed;
    result.error = Some(why.clone());
    Some(StepRun {
        result,
        full_output: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        refusal: Some(judgement::Refusal::Escalate(
            "the device's model does not repeat the step's reference answers".into(),
        )),
    })
}

/// Takes a step's result from an earlier attempt of the run.
fn reuse(p: &mut Progress<'_>, step: &Step, c: &Completed) {
    if c.result.status != StepStatus::Skipped {
        p.report.completed_steps += 1;
        for (name, n) in &p.bindings {
            if *n == step.number {
                p.vars.values.insert((*name).to_owned(), c.output.clone());
            }
        }
    }
    p.report.step_results.push(c.result.clone());
}

/// Records a finished step: interruption, error policy (escalation, fallback), counters,
/// bindings, the journal event.
fn complete(
    p: &mut Progress<'_>,
    trace: &Trace,
    step: &Step,
    run: StepRun,
    host: &mut dyn Host,
    on_event: &mut dyn FnMut(Event<'_>),
) {
    let StepRun {
        mut result,
        mut full_output,
        prompt_tokens,
        completion_tokens,
        refusal,
    } = run;
    // What a sensitive step produced stays on the device: withheld here, before anything
    // (the journal, an escalation, the run's error) copies it. The full output stays bound
    // for later steps and journaled.
    let withheld = |s: &Step| trace.withholds_output(s);
    if withheld(step) {
        result.withhold_output(&full_output);
    }
    let report = &mut p.report;
    if result.status == StepStatus::Failed
        && let Some(why) = host.interruption()
    {
        // Aborted (or cut short by the deadline): no error policy; journaled as failed,
        // so a resume runs it again.
        result.error = Some(format!(
            "interrupted: {}",
            result.error.clone().unwrap_or_default()
        ));
        on_event(Event::StepFinished(&result, &full_output));
        report.step_results.push(result);
        if report.status == RunStatus::Success {
            interrupt(report, why);
        }
        return;
    }
    report.prompt_tokens += prompt_tokens;
    report.completion_tokens += completion_tokens;
    if result.status == StepStatus::Failed {
        // A refused answer (uncertain, low fidelity) follows the step's judgement policy, not
        // its `on_error`: retrying or skipping would not make the answer trustworthy.
        let (escalation, fallback) = match (&refusal, &step.on_error) {
            (Some(judgement::Refusal::Escalate(message)), _)
            | (None, OnError::Escalate { message }) => (Some(message), None),
            (Some(judgement::Refusal::Fallback(n)), _) => (None, Some(*n)),
            (None, policy) => (None, policy.fallback_step()),
        };
        if let Some(message) = escalation {
            report.escalations.push(Escalation {
                step: step.number,
                message: message.clone(),
                error: result.error.clone().unwrap_or_default(),
            });
        }
        if let Some(fb) = fallback.and_then(|n| trace.steps.iter().find(|s| s.number == n)) {
            on_event(Event::StepStarted(&not_run(fb)));
            let mut fallback = run_step(fb, &p.vars, host);
            if withheld(fb) {
                fallback.result.withhold_output(&fallback.full_output);
            }
            let report = &mut p.report;
            report.prompt_tokens += fallback.prompt_tokens;
            report.completion_tokens += fallback.completion_tokens;
            let recovered = fallback.result.status == StepStatus::Success;
            on_event(Event::StepFinished(&fallback.result, &fallback.full_output));
            p.fallback_results.retain(|r| r.step != fb.number);
            p.fallback_results.push(fallback.result);
            if recovered {
                result.status = StepStatus::Recovered;
                result.error = Some(format!(
                    "recovered by fallback step {}: {}",
                    fb.number,
                    result.error.clone().unwrap_or_default()
                ));
                result.output = fallback.full_output.clone();
                truncate_utf8(&mut result.output, MAX_REPORTED_OUTPUT);
                full_output = fallback.full_output;
                // The fallback's output now stands for the step: withheld if either is.
                if withheld(step) || withheld(fb) {
                    result.withhold_output(&full_output);
                }
            }
        }
    }
    let report = &mut p.report;
    // A step that did not succeed did not pass its validations, whatever stopped it.
    if result.status != StepStatus::Success {
        report.all_validations_passed = false;
    }
    match result.status {
        StepStatus::Success | StepStatus::Recovered => report.completed_steps += 1,
        StepStatus::Failed => {
            // With steps in parallel the first failure is the one reported.
            if report.status != RunStatus::Failed {
                report.status = RunStatus::Failed;
                report.failed_step = Some(step.number);
                report.error = Some(format!(
                    "step {} ({}) failed: {}",
                    step.number,
                    step.title,
                    result.error.clone().unwrap_or_default()
                ));
            }
        }
        StepStatus::Skipped | StepStatus::NotRun => {}
    }
    // Bind the full (untruncated) output for later steps, only when the step succeeded
    // (or its fallback did): a skipped step's partial output must not flow on as if good.
    if matches!(result.status, StepStatus::Success | StepStatus::Recovered) {
        for (name, n) in &p.bindings {
            if *n == step.number {
                p.vars
                    .values
                    .insert((*name).to_owned(), full_output.clone());
            }
        }
    }
    on_event(Event::StepFinished(&result, &full_output));
    report.step_results.push(result);
}

/// Ends the run early for `why`.
fn interrupt(report: &mut Report, why: Interruption) {
    match why {
        Interruption::Stop => {
            report.status = RunStatus::Stopped;
            report.error = Some("stopped on request before every step ran".into());
        }
        Interruption::Deadline(message) => {
            report.status = RunStatus::Failed;
            report.error = Some(message);
        }
    }
}

/// Evaluates pre- or postconditions; the error names the ones that failed.
pub(super) fn conditions(
    checks: &[Check],
    vars: &Vars,
    host: &mut dyn Host,
    what: &str,
) -> (Vec<CheckResult>, Option<String>) {
    let results: Vec<CheckResult> = checks
        .iter()
        .map(|c| check(c, vars, host, None, None))
        .collect();
    let failed: Vec<&str> = results
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.check.as_str())
        .collect();
    let error = (!failed.is_empty()).then(|| format!("{what} failed: {}", failed.join("; ")));
    (results, error)
}
