//! The trace interpreter: a functional core over a [`Host`].
//!
//! [`run`] takes a compiled, verified trace, the run's context and inputs, and a `Host` that
//! owns every effect (files, processes, the model, the clock). It returns the [`Report`] and
//! emits an [`Event`] after each step so the caller can journal the run. Nothing here touches
//! the file system, a process or the model directly, which is what makes runs testable.
//!
//! Semantics (this version): preconditions → steps in ascending order → validations after
//! each attempt → error policy (retry with exponential backoff, skip, fail) → postconditions.

use std::collections::BTreeMap;
use std::time::Duration;
use tracefleet::Trace;
use tracefleet::ids::VarName;
use tracefleet::report::Escalation;
use tracefleet::report::{
    CheckResult, LlmUsage, MAX_REPORTED_OUTPUT, REPORT_VERSION, Report, RunStatus, StepResult,
    StepStatus, truncate_utf8,
};
use tracefleet::trace::{
    Check, CheckKind, Foreach, ForeachSource, GrepOutput, OnError, Step, Template, Tool,
};

/// What a file path refers to, as seen by checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Nothing there.
    Missing,
    /// A regular file of this many bytes.
    File(u64),
    /// A directory.
    Directory,
    /// Something else (socket, device…).
    Other,
}

/// Result of a shell command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellOutput {
    /// Standard output (lossy UTF-8, capped by the host).
    pub stdout: String,
    /// Standard error (lossy UTF-8, capped by the host).
    pub stderr: String,
    /// Exit code; `None` when killed by a signal.
    pub exit_code: Option<i32>,
}

/// A request to the device's model.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Model name; `None` = the device's default.
    pub model: Option<String>,
    /// System message.
    pub system: Option<String>,
    /// User message.
    pub prompt: String,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus sampling threshold.
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u32,
    /// GBNF grammar with a `root` rule.
    pub grammar: Option<String>,
    /// JSON Schema (JSON text) the output is constrained to, through llama.cpp's
    /// schema-to-grammar converter.
    pub json_schema: Option<String>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Wall-clock limit for the whole request.
    pub timeout: Duration,
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated text (stop string excluded).
    pub text: String,
    /// Accounting.
    pub usage: LlmUsage,
}

/// Every effect the interpreter needs. Paths are as written in the trace (after variable
/// substitution); the host resolves them against the run's base directory and its policy.
/// Errors are messages for the report: they say what was expected and what was found.
pub trait Host {
    /// Reads a text file; `offset` is the 1-based first line, `limit` the number of lines.
    fn read_file(
        &mut self,
        path: &str,
        offset: Option<u64>,
        limit: Option<u64>,
    ) -> Result<String, String>;
    /// Writes a text file inside the base directory (atomically).
    fn write_file(&mut self, path: &str, content: &str) -> Result<(), String>;
    /// What is at `path`.
    fn file_kind(&mut self, path: &str) -> Result<FileKind, String>;
    /// Every regular file under directory `dir`, recursively, as paths relative to `dir`
    /// (`/`-separated), sorted; symbolic links are not followed. At most
    /// [`MAX_LISTED_FILES`].
    fn list_files(&mut self, dir: &str) -> Result<Vec<String>, String>;
    /// Runs a shell command in the base directory with `env` added to its (scrubbed)
    /// environment.
    fn shell(
        &mut self,
        command: &str,
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<ShellOutput, String>;
    /// Runs the model.
    fn generate(&mut self, request: &GenerateRequest) -> Result<Generation, String>;
    /// Waits (retry backoff).
    fn sleep(&mut self, duration: Duration);
    /// Monotonic time since an arbitrary origin.
    fn monotonic(&self) -> Duration;
    /// Wall-clock time as RFC 3339 UTC text.
    fn timestamp(&self) -> String;
    /// Whether the run must end before its next step (and no further retry starts), and why.
    fn interruption(&self) -> Option<Interruption> {
        None
    }
    /// Fetches `url` (http or https) with a limit on the whole exchange; the body as text.
    /// A non-2xx status is an error that names it.
    fn fetch(&mut self, url: &str, timeout: Duration) -> Result<String, String> {
        let _ = (url, timeout);
        Err("this follower cannot fetch URLs (built without the `webfetch` feature)".into())
    }
    /// Whether the network can reach the host of `url` (name resolution within a few
    /// seconds); checked before any step of a trace with WebFetch steps runs.
    fn reachable(&mut self, url: &str) -> Result<(), String> {
        let _ = url;
        Ok(())
    }
    /// Another handle on the same host for a step that runs concurrently (`max_parallel`
    /// above 1); `None` (the default) runs steps one at a time.
    fn fork(&self) -> Option<Box<dyn Host + Send>> {
        None
    }
}

/// Why a run ends early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interruption {
    /// A stop was requested (SIGINT/SIGTERM, or the fleet): the run ends `stopped` and can be
    /// resumed; a step aborted by a second request is run again on resume.
    Stop,
    /// The run's time limit passed: the run fails with this message.
    Deadline(String),
}

/// A step finished in an earlier attempt of the same run (from the journal).
#[derive(Debug, Clone)]
pub struct Completed {
    /// Its record.
    pub result: StepResult,
    /// Its full output (what later steps bind).
    pub output: String,
}

/// What the run is and where it happens.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// The run id.
    pub run_id: String,
    /// The device id.
    pub device_id: String,
    /// The run's base directory (for `{base_dir}`).
    pub base_dir: String,
}

/// Progress of a run, for journaling.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A step is about to start (its record so far: not run yet).
    StepStarted(&'a StepResult),
    /// A step finished (successfully or not), with its full output.
    StepFinished(&'a StepResult, &'a str),
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
        .filter_map(|s| s.on_error.fallback_step())
        .collect();
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
        let (results, failed) = conditions(&trace.postconditions, &vars, host, "postcondition");
        report.postconditions = results;
        report.all_postconditions_met = failed.is_none();
        if let Some(error) = failed {
            report.status = RunStatus::Failed;
            report.error = Some(error);
        }
    } else {
        report.all_postconditions_met = false;
    }
    report.finished_at = host.timestamp();
    report.execution_time_secs = (host.monotonic() - started).as_secs_f64();
    report
}

/// What the run has produced so far, updated as steps finish.
struct Progress<'t> {
    report: Report,
    vars: Vars,
    fallback_results: Vec<StepResult>,
    bindings: BTreeMap<&'t str, u32>,
}

/// Runs the steps as a DAG: a step starts when its prerequisites (its `Dependencies`, else the
/// step before it) have finished, lowest position in [`Trace::execution_order`] first, up to
/// `max_parallel` at once when the host can [`Host::fork`] handles for concurrent steps (else
/// one at a time). Results are processed one by one on this thread, in completion order: error
/// policy, bindings, journal event. After a failure or an interruption no step starts; those
/// running finish and are recorded.
fn schedule(
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
    } = run;
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
        match &step.on_error {
            OnError::Escalate { message } => report.escalations.push(Escalation {
                step: step.number,
                message: message.clone(),
                error: result.error.clone().unwrap_or_default(),
            }),
            policy => {
                if let Some(fb) = policy
                    .fallback_step()
                    .and_then(|n| trace.steps.iter().find(|s| s.number == n))
                {
                    on_event(Event::StepStarted(&not_run(fb)));
                    let fallback = run_step(fb, &p.vars, host);
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
                    }
                }
            }
        }
    }
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

fn not_run(step: &Step) -> StepResult {
    StepResult {
        step: step.number,
        title: step.title.clone(),
        tool: step.tool.name().to_owned(),
        status: StepStatus::NotRun,
        attempts: 0,
        output: String::new(),
        output_truncated: false,
        exit_code: None,
        error: None,
        duration_secs: 0.0,
        validations: Vec::new(),
        llm: None,
        items: None,
        llm_items: Vec::new(),
    }
}

/// Evaluates pre- or postconditions; the error names the ones that failed.
fn conditions(
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

/// One executed step.
struct StepRun {
    /// The record (output truncated for the report; fields of the last attempt).
    result: StepResult,
    /// The untruncated output of the last attempt.
    full_output: String,
    /// Prompt tokens over all attempts.
    prompt_tokens: u64,
    /// Generated tokens over all attempts.
    completion_tokens: u64,
}

/// Runs one step with its error policy: once, or once per `foreach` item (each item bound to
/// the step's item variable; zero items is a successful no-op; the first item that fails after
/// its retries fails the step). A foreach step's output is its items' outputs, one per line.
fn run_step(step: &Step, vars: &Vars, host: &mut dyn Host) -> StepRun {
    let start = host.monotonic();
    let mut run = match &step.foreach {
        None => run_item(step, vars, host),
        Some(each) => match foreach_items(each, vars, host) {
            Err(e) => {
                let mut result = not_run(step);
                result.status = StepStatus::Failed;
                result.attempts = 1;
                result.error = Some(format!("foreach: {e}"));
                StepRun {
                    result,
                    full_output: String::new(),
                    prompt_tokens: 0,
                    completion_tokens: 0,
                }
            }
            Ok(items) => {
                let mut outputs = Vec::with_capacity(items.len());
                let mut total = StepRun {
                    result: StepResult {
                        status: StepStatus::Success,
                        ..not_run(step)
                    },
                    full_output: String::new(),
                    prompt_tokens: 0,
                    completion_tokens: 0,
                };
                let mut usages = Vec::new();
                for item in &items {
                    if host.interruption().is_some() {
                        total.result.status = StepStatus::Failed;
                        total.result.error = Some(format!("interrupted before item {item:?}"));
                        break;
                    }
                    let mut item_vars = Vars {
                        values: vars.values.clone(),
                    };
                    item_vars.values.insert(each.var.to_string(), item.clone());
                    let r = run_item(step, &item_vars, host);
                    usages.extend(r.result.llm.clone());
                    total.prompt_tokens += r.prompt_tokens;
                    total.completion_tokens += r.completion_tokens;
                    let ok = r.result.status == StepStatus::Success;
                    outputs.push(r.full_output.trim_end_matches('\n').to_owned());
                    total.result = r.result;
                    if !ok {
                        total.result.error = Some(format!(
                            "item {item:?}: {}",
                            total.result.error.clone().unwrap_or_default()
                        ));
                        break;
                    }
                }
                total.result.items = Some(u32::try_from(items.len()).unwrap_or(u32::MAX));
                // The step's figures are the sums over its items; each item's beside them.
                total.result.llm = LlmUsage::total(&usages);
                total.result.llm_items = usages;
                total.full_output = outputs.join("\n");
                total.result.output = total.full_output.clone();
                total
            }
        },
    };
    if run.result.status == StepStatus::Failed && step.on_error == OnError::Skip {
        run.result.status = StepStatus::Skipped;
    }
    run.result.duration_secs = (host.monotonic() - start).as_secs_f64();
    run.result.output_truncated = truncate_utf8(&mut run.result.output, MAX_REPORTED_OUTPUT);
    run
}

/// The items a `foreach` runs over.
fn foreach_items(each: &Foreach, vars: &Vars, host: &mut dyn Host) -> Result<Vec<String>, String> {
    let value = |v: &VarName| {
        vars.lookup(v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("variable `{{{v}}}` has no value (its step did not succeed)"))
    };
    match &each.over {
        ForeachSource::Lines(v) => Ok(value(v)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()),
        ForeachSource::JsonArray(v) => {
            let text = value(v)?;
            let parsed: serde_json::Value = serde_json::from_str(text.trim())
                .map_err(|e| format!("`{{{v}}}` is not JSON: {e}"))?;
            let items = parsed
                .as_array()
                .ok_or_else(|| format!("`{{{v}}}` is JSON but not an array"))?;
            Ok(items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                .collect())
        }
        ForeachSource::Glob(pattern) => {
            glob_files(host, pattern, None).map(|out| out.lines().map(str::to_owned).collect())
        }
    }
}

/// Runs one step's tool and validations under its retry policy (no skip conversion, no
/// timing: [`run_step`] does those).
fn run_item(step: &Step, vars: &Vars, host: &mut dyn Host) -> StepRun {
    let (max_attempts, delay) = match step.on_error {
        OnError::Retry {
            retry_count,
            delay_secs,
            ..
        } => (retry_count.saturating_add(1), delay_secs),
        OnError::Fail | OnError::Skip | OnError::Fallback { .. } | OnError::Escalate { .. } => {
            (1, 0.0)
        }
    };
    let timeout = Duration::from_secs(u64::from(step.timeout_secs));
    let mut result = not_run(step);
    let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
    for attempt in 1..=max_attempts {
        result.attempts = attempt;
        result.exit_code = None;
        result.llm = None;
        let outcome = run_tool(step, vars, host, timeout);
        if let Ok(Attempt { llm: Some(u), .. }) = &outcome {
            prompt_tokens += u64::from(u.prompt_tokens);
            completion_tokens += u64::from(u.completion_tokens);
        }
        let (ok, error) = match outcome {
            Ok(a) => {
                result.validations = step
                    .validations
                    .iter()
                    .map(|c| check(c, vars, host, Some(&a.output), a.exit_code))
                    .collect();
                let failed: Vec<String> = result
                    .validations
                    .iter()
                    .filter(|v| !v.passed)
                    .map(|v| format!("{} ({})", v.check, v.detail))
                    .collect();
                // A Bash step that exits non-zero fails unless a command_exit_code
                // validation says which code is expected.
                let exit_checked = step
                    .validations
                    .iter()
                    .any(|c| matches!(c.kind, CheckKind::CommandExitCode { .. }));
                let exit_failed = !exit_checked && a.exit_code.is_some_and(|c| c != 0);
                let error = if exit_failed {
                    Some(format!(
                        "command exited with status {}",
                        a.exit_code.unwrap_or_default()
                    ))
                } else if !failed.is_empty() {
                    Some(format!("validation failed: {}", failed.join("; ")))
                } else {
                    None
                };
                result.exit_code = a.exit_code;
                result.llm = a.llm;
                result.output = a.output;
                (error.is_none(), error)
            }
            Err(e) => {
                result.validations.clear();
                result.output.clear();
                (false, Some(e))
            }
        };
        if ok {
            result.status = StepStatus::Success;
            result.error = None;
            break;
        }
        result.status = StepStatus::Failed;
        result.error = error;
        if attempt < max_attempts && host.interruption().is_none() {
            let backoff = delay * f64::from(2u32.saturating_pow(attempt - 1));
            host.sleep(Duration::from_secs_f64(backoff.min(3600.0)));
        }
    }
    let full_output = result.output.clone();
    StepRun {
        result,
        full_output,
        prompt_tokens,
        completion_tokens,
    }
}

fn run_tool(
    step: &Step,
    vars: &Vars,
    host: &mut dyn Host,
    timeout: Duration,
) -> Result<Attempt, String> {
    match &step.tool {
        Tool::Read {
            file_path,
            offset,
            limit,
        } => {
            let path = vars.render(file_path)?;
            let output = host.read_file(&path, *offset, *limit)?;
            Ok(Attempt {
                output,
                exit_code: None,
                llm: None,
            })
        }
        Tool::Write { file_path, content } => {
            let path = vars.render(file_path)?;
            let content = vars.render(content)?;
            host.write_file(&path, &content)?;
            Ok(Attempt {
                output: content,
                exit_code: None,
                llm: None,
            })
        }
        Tool::Bash { command } => {
            let (command, env) = vars.render_shell(command)?;
            let out = host.shell(&command, &env, timeout)?;
            if out.exit_code.is_none() {
                return Err(format!(
                    "command was killed by a signal; stderr: {}",
                    out.stderr.trim()
                ));
            }
            Ok(Attempt {
                output: out.stdout,
                exit_code: out.exit_code,
                llm: None,
            })
        }
        Tool::Grep {
            pattern,
            path,
            glob,
            case_insensitive,
            output_mode,
        } => {
            let root = path.as_ref().map(|p| vars.render(p)).transpose()?;
            let output = grep(
                host,
                pattern,
                root.as_deref(),
                glob.as_deref(),
                *case_insensitive,
                *output_mode,
            )?;
            Ok(Attempt {
                output,
                exit_code: None,
                llm: None,
            })
        }
        Tool::Glob { pattern, path } => {
            let root = path.as_ref().map(|p| vars.render(p)).transpose()?;
            let output = glob_files(host, pattern, root.as_deref())?;
            Ok(Attempt {
                output,
                exit_code: None,
                llm: None,
            })
        }
        Tool::WebFetch { url, .. } => {
            let url = vars.render(url)?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "expected an http:// or https:// URL, found {url:?}"
                ));
            }
            Ok(Attempt {
                output: host.fetch(&url, timeout)?,
                exit_code: None,
                llm: None,
            })
        }
        Tool::Llm(call) => {
            let request = GenerateRequest {
                model: call.model.clone(),
                system: call.system.as_ref().map(|s| vars.render(s)).transpose()?,
                prompt: vars.render(&call.prompt)?,
                max_tokens: call.max_tokens,
                temperature: call.temperature,
                top_p: call.top_p,
                seed: call.seed,
                grammar: call.grammar.clone(),
                json_schema: call.json_schema.clone(),
                stop: call.stop.clone(),
                timeout,
            };
            let g = host.generate(&request)?;
            // Constrained decoding keeps the output inside the schema's grammar, but a
            // generation cut short (max_tokens, a stop string) can still end mid-object.
            if let Some(schema) = &call.json_schema
                && let Some(why) = schema_violation(schema, &g.text)?
            {
                return Err(format!(
                    "the model's output does not conform to the step's json_schema (stopped by {} after {} tokens): {why}",
                    g.usage.stop_reason, g.usage.completion_tokens
                ));
            }
            Ok(Attempt {
                output: g.text,
                exit_code: None,
                llm: Some(g.usage),
            })
        }
    }
}

/// Refuses, before anything runs, a trace that uses what this follower cannot execute yet.
///
/// # Errors
/// What is unsupported and where (step number).
pub fn check_supported(trace: &Trace) -> Result<(), String> {
    for s in &trace.steps {
        if let Tool::Bash { command } = &s.tool {
            // The compiler checked this too; the follower does not rely on it.
            let (text, _) = command.render_shell(|_| Some("")).unwrap_or_default();
            tracefleet::shell::check(&text, s.allowed_commands.as_deref(), s.command_substitution)
                .map_err(|e| format!("step {}: {e}", s.number))?;
        }
    }
    Ok(())
}

/// Most schema violations a json_schema check reports.
const MAX_SCHEMA_ERRORS: usize = 5;

/// Why `text` is not JSON conforming to `schema` (JSON text), or `None` when it is.
///
/// # Errors
/// The schema itself is not usable (the compiler checked it; a tampered file could differ).
fn schema_violation(schema: &str, text: &str) -> Result<Option<String>, String> {
    let instance = match serde_json::from_str::<serde_json::Value>(text.trim()) {
        Ok(v) => v,
        Err(e) => {
            return Ok(Some(format!(
                "expected JSON, found an error at line {} column {}: {e}",
                e.line(),
                e.column()
            )));
        }
    };
    let schema: serde_json::Value =
        serde_json::from_str(schema).map_err(|e| format!("the trace's schema is not JSON: {e}"))?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| format!("the trace's schema is not usable: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .take(MAX_SCHEMA_ERRORS)
        .map(|e| {
            let at = e.instance_path().to_string();
            format!("at {}: {e}", if at.is_empty() { "/" } else { &at })
        })
        .collect();
    Ok((!errors.is_empty())
        .then(|| format!("expected JSON matching the schema: {}", errors.join("; "))))
}

/// Most files a Grep or Glob step looks at.
pub const MAX_LISTED_FILES: usize = 100_000;

/// Lists the files a search covers: `root` itself when it is a file, else every file under
/// it (the base directory when `None`), as paths the host resolves.
fn search_files(host: &mut dyn Host, root: Option<&str>) -> Result<Vec<String>, String> {
    let root = root.unwrap_or(".");
    match host.file_kind(root)? {
        FileKind::File(_) => Ok(vec![root.to_owned()]),
        FileKind::Directory => Ok(host
            .list_files(root)?
            .into_iter()
            .map(|rel| {
                if root == "." {
                    rel
                } else {
                    format!("{}/{rel}", root.trim_end_matches('/'))
                }
            })
            .collect()),
        FileKind::Missing => Err(format!(
            "expected a file or directory at {root}, found nothing"
        )),
        FileKind::Other => Err(format!(
            "expected a file or directory at {root}, found a special file"
        )),
    }
}

fn grep(
    host: &mut dyn Host,
    pattern: &str,
    root: Option<&str>,
    name_glob: Option<&str>,
    case_insensitive: bool,
    mode: GrepOutput,
) -> Result<String, String> {
    let re = regex::RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
    let name_glob = name_glob
        .map(glob::Pattern::new)
        .transpose()
        .map_err(|e| format!("invalid glob: {e}"))?;
    let mut out = String::new();
    for file in search_files(host, root)? {
        let name = file.rsplit('/').next().unwrap_or(&file);
        if name_glob.as_ref().is_some_and(|g| !g.matches(name)) {
            continue;
        }
        // Unreadable or oversize files are skipped, as grep -s does.
        let Ok(text) = host.read_file(&file, None, None) else {
            continue;
        };
        let mut count = 0usize;
        for (n, line) in text.lines().enumerate() {
            if re.is_match(line) {
                count += 1;
                if mode == GrepOutput::Content {
                    out.push_str(&format!("{file}:{}:{line}\n", n + 1));
                }
            }
        }
        match mode {
            GrepOutput::FilesWithMatches if count > 0 => out.push_str(&format!("{file}\n")),
            GrepOutput::Count if count > 0 => out.push_str(&format!("{file}:{count}\n")),
            _ => {}
        }
        if out.len() > crate::host::MAX_STDOUT_BYTES {
            return Err(format!(
                "Grep output exceeds {} bytes: narrow the pattern or path",
                crate::host::MAX_STDOUT_BYTES
            ));
        }
    }
    Ok(out)
}

fn glob_files(host: &mut dyn Host, pattern: &str, root: Option<&str>) -> Result<String, String> {
    let g = glob::Pattern::new(pattern).map_err(|e| format!("invalid glob {pattern:?}: {e}"))?;
    let opts = glob::MatchOptions {
        require_literal_separator: true,
        ..glob::MatchOptions::new()
    };
    let root = root.unwrap_or(".");
    let mut out = String::new();
    for rel in host.list_files(root)? {
        if g.matches_with(&rel, opts) {
            if root == "." {
                out.push_str(&rel);
            } else {
                out.push_str(&format!("{}/{rel}", root.trim_end_matches('/')));
            }
            out.push('\n');
        }
    }
    Ok(out)
}

/// Evaluates one check. `output`/`exit_code` are the step's (absent for pre/postconditions).
fn check(
    c: &Check,
    vars: &Vars,
    host: &mut dyn Host,
    output: Option<&str>,
    exit_code: Option<i32>,
) -> CheckResult {
    let (passed, detail) = match evaluate(&c.kind, vars, host, output, exit_code) {
        Ok(r) => r,
        Err(e) => (false, e),
    };
    CheckResult {
        check: c.description.clone(),
        kind: c.kind.type_name().to_owned(),
        passed,
        detail,
    }
}

fn subject(
    path: &Option<Template>,
    vars: &Vars,
    host: &mut dyn Host,
    output: Option<&str>,
) -> Result<String, String> {
    match (path, output) {
        (Some(p), _) => {
            let p = vars.render(p)?;
            host.read_file(&p, None, None)
        }
        (None, Some(o)) => Ok(o.to_owned()),
        (None, None) => Err("no `path` given and no step output to check".into()),
    }
}

fn evaluate(
    kind: &CheckKind,
    vars: &Vars,
    host: &mut dyn Host,
    output: Option<&str>,
    exit_code: Option<i32>,
) -> Result<(bool, String), String> {
    Ok(match kind {
        CheckKind::FileExists { path } => {
            let p = vars.render(path)?;
            match host.file_kind(&p)? {
                FileKind::File(n) => (true, format!("{p} is a file of {n} bytes")),
                other => (
                    false,
                    format!("expected a file at {p}, found {}", describe(other)),
                ),
            }
        }
        CheckKind::DirectoryExists { path } => {
            let p = vars.render(path)?;
            match host.file_kind(&p)? {
                FileKind::Directory => (true, format!("{p} is a directory")),
                other => (
                    false,
                    format!("expected a directory at {p}, found {}", describe(other)),
                ),
            }
        }
        CheckKind::ContentContains { path, text } => {
            let s = subject(path, vars, host, output)?;
            let t = vars.render(text)?;
            let ok = s.contains(&t);
            (
                ok,
                if ok {
                    format!("found {t:?}")
                } else {
                    format!(
                        "expected the content to contain {t:?}; it does not ({} bytes)",
                        s.len()
                    )
                },
            )
        }
        CheckKind::ContentNotContains { path, text } => {
            let s = subject(path, vars, host, output)?;
            let t = vars.render(text)?;
            let ok = !s.contains(&t);
            (
                ok,
                if ok {
                    format!("{t:?} absent")
                } else {
                    format!("expected the content not to contain {t:?}; it does")
                },
            )
        }
        CheckKind::ContentNotEmpty { path } => {
            let s = subject(path, vars, host, output)?;
            let ok = !s.trim().is_empty();
            (
                ok,
                if ok {
                    format!("{} bytes", s.len())
                } else {
                    "expected non-empty content, found only whitespace or nothing".into()
                },
            )
        }
        CheckKind::RegexMatch { path, pattern } => {
            let s = subject(path, vars, host, output)?;
            let re = regex::RegexBuilder::new(pattern)
                .multi_line(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
            let ok = re.is_match(&s);
            (
                ok,
                if ok {
                    format!("matches /{pattern}/")
                } else {
                    format!(
                        "expected a match for /{pattern}/, found none in {} bytes",
                        s.len()
                    )
                },
            )
        }
        CheckKind::CommandExitCode { expected } => match exit_code {
            Some(c) if c == *expected => (true, format!("exit code {c}")),
            Some(c) => (false, format!("expected exit code {expected}, found {c}")),
            None => (
                false,
                format!("expected exit code {expected}, found no exit code"),
            ),
        },
        CheckKind::FileSizeMinimum { path, bytes } => {
            let size = match path {
                Some(p) => {
                    let p = vars.render(p)?;
                    match host.file_kind(&p)? {
                        FileKind::File(n) => n,
                        other => {
                            return Ok((
                                false,
                                format!("expected a file at {p}, found {}", describe(other)),
                            ));
                        }
                    }
                }
                None => output.map_or(0, |o| o.len() as u64),
            };
            let ok = size >= *bytes;
            (
                ok,
                if ok {
                    format!("{size} bytes ≥ {bytes}")
                } else {
                    format!("expected at least {bytes} bytes, found {size}")
                },
            )
        }
        CheckKind::JsonValid { path } => {
            let s = subject(path, vars, host, output)?;
            match serde_json::from_str::<serde_json::Value>(s.trim()) {
                Ok(_) => (true, "valid JSON".into()),
                Err(e) => (
                    false,
                    format!(
                        "expected valid JSON, found an error at line {} column {}: {e}",
                        e.line(),
                        e.column()
                    ),
                ),
            }
        }
        CheckKind::JsonSchema { path, schema } => {
            let s = subject(path, vars, host, output)?;
            match schema_violation(schema, &s)? {
                None => (true, "valid against the schema".into()),
                Some(why) => (false, why),
            }
        }
        CheckKind::ContentStructureCheck {
            path,
            required_sections,
        } => {
            let s = subject(path, vars, host, output)?;
            let headings: Vec<String> = s
                .lines()
                .filter_map(|l| l.trim_start().strip_prefix('#'))
                .map(|h| h.trim_start_matches('#').trim().to_lowercase())
                .collect();
            let missing: Vec<&str> = required_sections
                .iter()
                .filter(|r| !headings.contains(&r.trim().to_lowercase()))
                .map(String::as_str)
                .collect();
            if missing.is_empty() {
                (
                    true,
                    format!("all {} sections present", required_sections.len()),
                )
            } else {
                (
                    false,
                    format!(
                        "expected headings {missing:?}, not found among {} headings",
                        headings.len()
                    ),
                )
            }
        }
    })
}

fn describe(k: FileKind) -> &'static str {
    match k {
        FileKind::Missing => "nothing",
        FileKind::File(_) => "a file",
        FileKind::Directory => "a directory",
        FileKind::Other => "a special file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, VecDeque};

    /// A scripted host: shell answers come from a queue; files live in a map.
    #[derive(Default)]
    struct FakeHost {
        shell_answers: VecDeque<ShellOutput>,
        commands: Vec<(String, Vec<(String, String)>)>,
        files: HashMap<String, String>,
        slept: Vec<Duration>,
        clock: Duration,
        /// Scripted model answers, in order.
        generations: VecDeque<Generation>,
    }

    impl Host for FakeHost {
        fn read_file(
            &mut self,
            path: &str,
            _: Option<u64>,
            _: Option<u64>,
        ) -> Result<String, String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| format!("no file {path}"))
        }
        fn write_file(&mut self, path: &str, content: &str) -> Result<(), String> {
            self.files.insert(path.to_owned(), content.to_owned());
            Ok(())
        }
        fn list_files(&mut self, dir: &str) -> Result<Vec<String>, String> {
            let prefix = if dir == "." {
                String::new()
            } else {
                format!("{dir}/")
            };
            let mut v: Vec<String> = self
                .files
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
                .collect();
            v.sort();
            Ok(v)
        }
        fn file_kind(&mut self, path: &str) -> Result<FileKind, String> {
            if path == "."
                || self
                    .files
                    .keys()
                    .any(|k| k.starts_with(&format!("{path}/")))
            {
                return Ok(FileKind::Directory);
            }
            Ok(self
                .files
                .get(path)
                .map_or(FileKind::Missing, |c| FileKind::File(c.len() as u64)))
        }
        fn shell(
            &mut self,
            command: &str,
            env: &[(String, String)],
            _: Duration,
        ) -> Result<ShellOutput, String> {
            self.commands.push((command.to_owned(), env.to_vec()));
            self.shell_answers
                .pop_front()
                .ok_or_else(|| "no scripted answer".to_owned())
        }
        fn generate(&mut self, _: &GenerateRequest) -> Result<Generation, String> {
            self.generations
                .pop_front()
                .ok_or_else(|| "no model in this test".into())
        }
        fn sleep(&mut self, d: Duration) {
            self.slept.push(d);
            self.clock += d;
        }
        fn monotonic(&self) -> Duration {
            self.clock
        }
        fn timestamp(&self) -> String {
            "2026-11-21T00:00:00Z".into()
        }
    }

    fn out(stdout: &str, code: i32) -> ShellOutput {
        ShellOutput {
            stdout: stdout.into(),
            stderr: String::new(),
            exit_code: Some(code),
        }
    }

    fn trace(body: &str) -> Trace {
        let src = format!("---\ntrace_id: t\nversion: \"1.0\"\ngoal_signature: g\n{body}");
        tracefleet::compile_source("t.trace.md", &src)
            .unwrap_or_else(|d| panic!("{d}"))
            .0
    }

    #[test]
    fn shell_policy_is_enforced_even_when_the_compiler_was_bypassed() {
        let mut t = trace(
            "---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: grep x f\nallowed_commands: [grep]\n```\n",
        );
        assert_eq!(check_supported(&t), Ok(()));
        for (command, expected) in [
            (
                "grep x f | rm -rf /",
                "command `rm` is not in allowed_commands [grep]",
            ),
            ("grep x \"$(cat /etc/shadow)\"", "command substitution '$('"),
            ("grep x `id`", "command substitution '`'"),
        ] {
            t.steps[0].tool = Tool::Bash {
                command: Template(command.into()),
            };
            let e = check_supported(&t).unwrap_err();
            assert!(e.starts_with("step 1: ") && e.contains(expected), "{e}");
        }
        t.steps[0].allowed_commands = None;
        t.steps[0].command_substitution = true;
        assert_eq!(check_supported(&t), Ok(()));
    }

    fn run_with(t: &Trace, host: &mut FakeHost) -> Report {
        let cx = RunContext {
            run_id: "r".into(),
            device_id: "d".into(),
            base_dir: "/b".into(),
        };
        let inputs = resolve_inputs(t, &BTreeMap::new()).unwrap();
        let mut events = 0;
        let (mut started, mut finished) = (Vec::new(), Vec::new());
        let r = run(t, &cx, &inputs, host, &mut |e| match e {
            Event::StepStarted(s) => started.push(s.step),
            Event::StepFinished(s, _) => {
                finished.push(s.step);
                events += 1;
            }
        });
        // Every step that finished was journaled as started, once per run of it.
        started.sort_unstable();
        finished.sort_unstable();
        assert_eq!(started, finished);
        assert_eq!(
            events,
            r.step_results
                .iter()
                .filter(|s| s.status != StepStatus::NotRun)
                .count()
        );
        r
    }

    const STEP: &str = "### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: check\noutput_variable: first\n```\n**Validation**:\n```yaml\n- check: ready\n  type: content_contains\n  parameters:\n    text: ready\n```\n";

    #[test]
    fn retry_backs_off_exponentially_then_succeeds() {
        let t = trace(&format!(
            "---\n{STEP}**Error Handling**:\n```yaml\non_error: {{action: retry, retry_count: 3, delay_seconds: 1}}\n```\n"
        ));
        let mut h = FakeHost {
            shell_answers: [out("not yet", 0), out("boom", 1), out("ready", 0)].into(),
            ..FakeHost::default()
        };
        let r = run_with(&t, &mut h);
        assert_eq!(r.status, RunStatus::Success);
        assert_eq!(r.step_results[0].attempts, 3);
        assert_eq!(
            h.slept,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert!(r.all_validations_passed);
    }

    #[test]
    fn skip_goes_on_but_never_binds_the_failed_output() {
        let t = trace(&format!(
            "---\n{STEP}**Error Handling**:\n```yaml\non_error: {{action: skip}}\n```\n### Step 2: uses it\n**Tool Call**:\n```yaml\ntool: Write\nparameters:\n  file_path: out.txt\n  content: \"{{first}}\"\n```\n"
        ));
        let mut h = FakeHost {
            shell_answers: [out("not yet", 0)].into(),
            ..FakeHost::default()
        };
        let r = run_with(&t, &mut h);
        assert_eq!(r.step_results[0].status, StepStatus::Skipped);
        assert_eq!(r.step_results[1].status, StepStatus::Failed);
        assert!(
            r.step_results[1]
                .error
                .as_deref()
                .unwrap_or("")
                .contains("`{first}` has no value")
        );
        assert!(!h.files.contains_key("out.txt"));
        assert!(!r.all_validations_passed);
        assert_eq!(r.failed_step, Some(2));
    }

    #[test]
    fn failed_precondition_runs_no_step() {
        let t = trace(&format!(
            "preconditions:\n  - condition: input exists\n    validation_type: file_exists\n    parameters: {{path: in.txt}}\n---\n{STEP}"
        ));
        let mut h = FakeHost::default();
        let r = run_with(&t, &mut h);
        assert_eq!(r.status, RunStatus::Failed);
        assert!(!r.all_preconditions_met);
        assert_eq!(r.step_results[0].status, StepStatus::NotRun);
        assert!(h.commands.is_empty());
    }

    #[test]
    fn shell_values_travel_in_the_environment() {
        let t = trace(
            "inputs:\n  target: \"$(reboot)\"\n---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: ls {target}\n```\n",
        );
        let mut h = FakeHost {
            shell_answers: [out("", 0)].into(),
            ..FakeHost::default()
        };
        let r = run_with(&t, &mut h);
        assert_eq!(r.status, RunStatus::Success);
        let (cmd, env) = &h.commands[0];
        assert_eq!(cmd, "ls \"${TF_VAR_target}\"");
        assert_eq!(
            env,
            &vec![("TF_VAR_target".to_owned(), "$(reboot)".to_owned())]
        );
    }

    #[test]
    fn json_schema_validation_passes_and_fails_with_the_instance_path() {
        let t = trace(
            "---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: cat r.json\n```\n**Validation**:\n```yaml\n- check: the risk record\n  type: json_schema\n  parameters:\n    schema:\n      type: object\n      required: [risk]\n      properties:\n        risk: {enum: [low, medium, high]}\n        count: {type: integer, minimum: 0}\n```\n",
        );
        for (answer, ok, detail) in [
            (
                r#"{"risk": "low", "count": 3}"#,
                true,
                "valid against the schema",
            ),
            (r#"{"risk": "extreme"}"#, false, "at /risk:"),
            (r#"{"count": -1, "risk": "low"}"#, false, "at /count:"),
            (r#"{"count": 1}"#, false, "\"risk\" is a required property"),
            ("not json", false, "expected JSON, found an error at line 1"),
        ] {
            let mut h = FakeHost {
                shell_answers: [out(answer, 0)].into(),
                ..FakeHost::default()
            };
            let r = run_with(&t, &mut h);
            let v = &r.step_results[0].validations[0];
            assert_eq!(v.passed, ok, "{answer}: {v:?}");
            assert!(v.detail.contains(detail), "{answer}: {}", v.detail);
        }
    }

    #[test]
    fn nonzero_exit_fails_unless_expected() {
        let t = trace(
            "---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: grep x f\n```\n**Validation**:\n```yaml\n- check: no match is fine\n  type: command_exit_code\n  parameters: {expected: 1}\n```\n### Step 2: t\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: false\n```\n",
        );
        let mut h = FakeHost {
            shell_answers: [out("", 1), out("", 1)].into(),
            ..FakeHost::default()
        };
        let r = run_with(&t, &mut h);
        assert_eq!(r.step_results[0].status, StepStatus::Success);
        assert_eq!(r.step_results[1].status, StepStatus::Failed);
        assert!(
            r.step_results[1]
                .error
                .as_deref()
                .unwrap_or("")
                .contains("exited with status 1")
        );
    }

    #[test]
    fn foreach_runs_each_line_and_zero_items_is_a_no_op() {
        let t = trace(
            "inputs:\n  names: \"a\\nb\\n\\nc\"\n---\n### Step 1: each\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo {n}\nforeach: {lines: names, as: n}\n```\n",
        );
        let mut h = FakeHost {
            shell_answers: [out("A\n", 0), out("B\n", 0), out("C\n", 0)].into(),
            ..FakeHost::default()
        };
        let r = run_with(&t, &mut h);
        assert_eq!(r.status, RunStatus::Success);
        assert_eq!(r.step_results[0].items, Some(3));
        assert_eq!(r.step_results[0].output, "A\nB\nC");
        let items: Vec<&str> = h
            .commands
            .iter()
            .map(|(_, env)| env[0].1.as_str())
            .collect();
        assert_eq!(items, vec!["a", "b", "c"]);

        let mut empty = BTreeMap::new();
        empty.insert("names".to_owned(), "\n\n".to_owned());
        let inputs = resolve_inputs(&t, &empty).unwrap();
        let cx = RunContext {
            run_id: "r".into(),
            device_id: "d".into(),
            base_dir: "/b".into(),
        };
        let mut h = FakeHost::default();
        let r = run(&t, &cx, &inputs, &mut h, &mut |_| {});
        assert_eq!(r.status, RunStatus::Success);
        assert_eq!(r.step_results[0].items, Some(0));
        assert!(h.commands.is_empty());
    }

    fn generation(text: &str, prompt: u32, completion: u32, secs: f64, stop: &str) -> Generation {
        Generation {
            text: text.into(),
            usage: LlmUsage {
                model: "m".into(),
                prompt_tokens: prompt,
                completion_tokens: completion,
                // Prompt and generation each took `secs`.
                prompt_tokens_per_sec: f64::from(prompt) / secs,
                generation_tokens_per_sec: f64::from(completion) / secs,
                stop_reason: stop.into(),
                grammar: true,
            },
        }
    }

    #[test]
    fn a_foreach_llm_step_reports_the_sums_over_its_items_and_each_items_figures() {
        let t = trace(
            "inputs:\n  lines: \"x\\ny\\nz\"\n---\n### Step 1: judge\n**Tool Call**:\n```yaml\ntool: LLM\nparameters:\n  prompt: \"judge {l}\"\n  grammar: 'root ::= \"a\" | \"b\"'\nforeach: {lines: lines, as: l}\n```\n",
        );
        let mut h = FakeHost {
            generations: [
                generation("a", 100, 1, 1.0, "grammar"),
                generation("b", 200, 3, 1.0, "grammar"),
                generation("a", 300, 2, 2.0, "eos"),
            ]
            .into(),
            ..FakeHost::default()
        };
        let r = run_with(&t, &mut h);
        assert_eq!(r.status, RunStatus::Success, "{r:?}");
        let s = &r.step_results[0];
        assert_eq!(s.items, Some(3));
        assert_eq!(s.llm_items.len(), 3);
        assert_eq!(
            s.llm_items
                .iter()
                .map(|u| u.prompt_tokens)
                .collect::<Vec<_>>(),
            [100, 200, 300]
        );
        let sum = s.llm.as_ref().unwrap();
        assert_eq!((sum.prompt_tokens, sum.completion_tokens), (600, 6));
        // 600 prompt tokens in 1 + 1 + 2 s; 6 generated in the same 4 s.
        assert!((sum.prompt_tokens_per_sec - 150.0).abs() < 1e-9, "{sum:?}");
        assert!(
            (sum.generation_tokens_per_sec - 1.5).abs() < 1e-9,
            "{sum:?}"
        );
        assert_eq!(sum.stop_reason, "mixed");
        assert_eq!((r.prompt_tokens, r.completion_tokens), (600, 6));
    }

    #[test]
    fn foreach_over_a_glob_and_a_failing_item() {
        let t = trace(
            "---\n### Step 1: each log\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: wc -l {f}\nforeach: {glob: \"*.log\", as: f}\n```\n",
        );
        let mut h = FakeHost {
            shell_answers: [out("1\n", 0), out("", 2)].into(),
            ..FakeHost::default()
        };
        h.files.insert("a.log".into(), "x".into());
        h.files.insert("b.log".into(), "y".into());
        h.files.insert("c.txt".into(), "z".into());
        let r = run_with(&t, &mut h);
        assert_eq!(r.status, RunStatus::Failed);
        assert!(
            r.step_results[0]
                .error
                .as_deref()
                .unwrap_or("")
                .contains("item \"b.log\""),
            "{:?}",
            r.step_results[0].error
        );
        assert_eq!(h.commands.len(), 2);
    }

    #[test]
    fn fallback_recovers_and_the_fallback_step_runs_only_in_that_role() {
        let t = trace(
            "---\n### Step 1: primary\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: primary\noutput_variable: got\n```\n**Error Handling**:\n```yaml\non_error: {action: retry, retry_count: 1, fallback_step: 3}\n```\n### Step 2: uses it\n**Tool Call**:\n```yaml\ntool: Write\nparameters:\n  file_path: out.txt\n  content: \"{got}\"\n```\n**Dependencies**: Step 1\n### Step 3: plan b\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: plan-b\n```\n**Dependencies**: None\n",
        );
        let mut h = FakeHost {
            shell_answers: [out("", 1), out("", 1), out("from b", 0)].into(),
            ..FakeHost::default()
        };
        let r = run_with_events(&t, &mut h);
        assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
        assert_eq!(r.step_results[0].status, StepStatus::Recovered);
        assert_eq!(r.step_results[0].attempts, 2);
        assert_eq!(r.step_results[2].status, StepStatus::Success);
        assert_eq!(h.files.get("out.txt").map(String::as_str), Some("from b"));
        let cmds: Vec<&str> = h.commands.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(
            cmds,
            vec!["primary", "primary", "plan-b"],
            "plan b ran once, as the fallback"
        );
    }

    #[test]
    fn escalation_fails_the_run_and_is_reported() {
        let t = trace(
            "---\n### Step 1: needs a human\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: check\n```\n**Error Handling**:\n```yaml\non_error: {action: human_escalate, escalation_message: \"call the site engineer\"}\n```\n",
        );
        let mut h = FakeHost {
            shell_answers: [out("", 3)].into(),
            ..FakeHost::default()
        };
        let r = run_with(&t, &mut h);
        assert_eq!(r.status, RunStatus::Failed);
        assert_eq!(r.escalations.len(), 1);
        assert_eq!(r.escalations[0].message, "call the site engineer");
        assert!(r.escalations[0].error.contains("status 3"));
    }

    fn run_with_events(t: &Trace, host: &mut FakeHost) -> Report {
        let cx = RunContext {
            run_id: "r".into(),
            device_id: "d".into(),
            base_dir: "/b".into(),
        };
        let inputs = resolve_inputs(t, &BTreeMap::new()).unwrap();
        run(t, &cx, &inputs, host, &mut |_| {})
    }
}
