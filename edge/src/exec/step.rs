//! One step: its error policy around attempts (retry with backoff, skip, fallback,
//! escalation), `foreach` items, and each tool's call through the [`Host`].

use super::judgement::{self, Refusal};
use super::*;
use std::collections::VecDeque;
use std::time::Duration;
use tracefleet::ids::VarName;
use tracefleet::report::{LlmUsage, MAX_REPORTED_OUTPUT, StepResult, StepStatus, truncate_utf8};
use tracefleet::trace::{CheckKind, Foreach, ForeachSource, OnError, Step, Tool};

/// One executed step.
pub(super) struct StepRun {
    /// The record (output truncated for the report; fields of the last attempt).
    pub(super) result: StepResult,
    /// The untruncated output of the last attempt.
    pub(super) full_output: String,
    /// Prompt tokens over all attempts.
    pub(super) prompt_tokens: u64,
    /// Generated tokens over all attempts.
    pub(super) completion_tokens: u64,
    /// Set when the step's answer was refused (uncertain, or a fidelity below the step's
    /// minimum): what the scheduler does instead of the step's `on_error`.
    pub(super) refusal: Option<Refusal>,
}

/// Runs one step with its error policy: once, or once per `foreach` item (each item bound to
/// the step's item variable; zero items is a successful no-op; the first item that fails after
/// its retries fails the step). A foreach step's output is its items' outputs, one per line.
pub(super) fn run_step(step: &Step, vars: &Vars, host: &mut dyn Host) -> StepRun {
    let start = host.monotonic();
    let mut run = match &step.foreach {
        None => run_item(step, vars, host, None),
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
                    refusal: None,
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
                    refusal: None,
                };
                let mut usages = Vec::new();
                let mut ready = VecDeque::new();
                for (n, item) in items.iter().enumerate() {
                    if host.interruption().is_some() {
                        total.result.status = StepStatus::Failed;
                        total.result.error = Some(format!("interrupted before item {item:?}"));
                        break;
                    }
                    if ready.is_empty()
                        && let Tool::Llm(call) = &step.tool
                    {
                        let chunk = &items[n..items.len().min(n + BATCH_ITEMS)];
                        ready = generate_items(call, each, vars, chunk, host, timeout(step));
                    }
                    let r = run_item(
                        step,
                        &item_vars(vars, each, item),
                        host,
                        ready.pop_front().flatten(),
                    );
                    usages.extend(r.result.llm.clone());
                    total.prompt_tokens += r.prompt_tokens;
                    total.completion_tokens += r.completion_tokens;
                    let ok = r.result.status == StepStatus::Success;
                    outputs.push(r.full_output.trim_end_matches('\n').to_owned());
                    total.result = r.result;
                    total.refusal = r.refusal;
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

/// Items of a foreach LLM step generated as one batch ([`Host::generate_batch`]); the
/// interruption check runs between batches.
const BATCH_ITEMS: usize = 64;

/// The step's variables with the foreach variable bound to `item`.
fn item_vars(vars: &Vars, each: &Foreach, item: &str) -> Vars {
    let mut values = vars.values.clone();
    values.insert(each.var.to_string(), item.to_owned());
    Vars { values }
}

fn timeout(step: &Step) -> Duration {
    Duration::from_secs(u64::from(step.timeout_secs))
}

/// The first attempt's generation of each of `items` for LLM step `call`, as one batch, in
/// order; `None` for an item whose request cannot be rendered (its attempt reports why).
fn generate_items(
    call: &tracefleet::trace::LlmCall,
    each: &Foreach,
    vars: &Vars,
    items: &[String],
    host: &mut dyn Host,
    timeout: Duration,
) -> VecDeque<Option<Result<Generation, String>>> {
    let requests: Vec<Option<GenerateRequest>> = items
        .iter()
        .map(|item| {
            let v = item_vars(vars, each, item);
            judgement::request(call, |name| v.lookup(name), timeout).ok()
        })
        .collect();
    let batch: Vec<GenerateRequest> = requests.iter().flatten().cloned().collect();
    let mut answers = host.generate_batch(&batch).into_iter();
    requests
        .iter()
        .map(|r| r.as_ref().and_then(|_| answers.next()))
        .collect()
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
/// timing: [`run_step`] does those). `first` is an LLM step's first generation when it was
/// made already (in a batch).
fn run_item(
    step: &Step,
    vars: &Vars,
    host: &mut dyn Host,
    mut first: Option<Result<Generation, String>>,
) -> StepRun {
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
    let timeout = timeout(step);
    let mut result = not_run(step);
    let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
    let mut refusal = None;
    for attempt in 1..=max_attempts {
        result.attempts = attempt;
        result.exit_code = None;
        result.llm = None;
        let outcome = run_tool(step, vars, host, timeout, first.take());
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
                let error = if let Some((why, r)) = a.refusal {
                    // Asking again would not make the model surer: no retry.
                    refusal = Some(r);
                    Some(why)
                } else if exit_failed {
                    Some(format!(
                        "command exited with status {}{}",
                        a.exit_code.unwrap_or_default(),
                        stderr_tail(&a.stderr)
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
        if refusal.is_some() {
            break;
        }
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
        refusal,
    }
}

fn run_tool(
    step: &Step,
    vars: &Vars,
    host: &mut dyn Host,
    timeout: Duration,
    generated: Option<Result<Generation, String>>,
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
                stderr: String::new(),
                refusal: None,
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
                stderr: String::new(),
                refusal: None,
            })
        }
        Tool::Bash { command } => {
            let (command, env) = vars.render_shell(command)?;
            let out = host.shell(&command, &env, timeout)?;
            if out.exit_code.is_none() {
                return Err(format!(
                    "command was killed by {}{}",
                    signal_name(out.signal),
                    stderr_tail(&out.stderr)
                ));
            }
            Ok(Attempt {
                output: out.stdout,
                exit_code: out.exit_code,
                llm: None,
                stderr: out.stderr,
                refusal: None,
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
                stderr: String::new(),
                refusal: None,
            })
        }
        Tool::Glob { pattern, path } => {
            let root = path.as_ref().map(|p| vars.render(p)).transpose()?;
            let output = glob_files(host, pattern, root.as_deref())?;
            Ok(Attempt {
                output,
                exit_code: None,
                llm: None,
                stderr: String::new(),
                refusal: None,
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
                stderr: String::new(),
                refusal: None,
            })
        }
        Tool::Llm(call) => {
            let request =
                judgement::request(call, |v| vars.lookup(v), timeout).map_err(no_value)?;
            let g = generated.unwrap_or_else(|| host.generate(&request))?;
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
            let mut usage = g.usage;
            let refusal = judgement::uncertain(call, &usage).and_then(|why| {
                usage.uncertain = true;
                judgement::on_uncertain(call).map(|r| (why, r))
            });
            Ok(Attempt {
                output: g.text,
                exit_code: None,
                llm: Some(usage),
                stderr: String::new(),
                refusal,
            })
        }
    }
}

pub(super) fn not_run(step: &Step) -> StepResult {
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
        output_sha256: None,
        output_bytes: None,
        llm_items: Vec::new(),
    }
}

/// `signal 9 (SIGKILL)`, or `a signal` when the host could not say which.
fn signal_name(signal: Option<i32>) -> String {
    match signal {
        Some(n) => match nix::sys::signal::Signal::try_from(n) {
            Ok(s) => format!("signal {n} ({})", s.as_str()),
            Err(_) => format!("signal {n}"),
        },
        None => "a signal".into(),
    }
}

/// `; stderr: …` with the last lines of a command's stderr (at most 3 lines, 400 bytes), or
/// nothing when it wrote none: why a command failed is usually there.
fn stderr_tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let mut tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.len() > 400 {
        let mut cut = tail.len() - 400;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = format!("…{}", &tail[cut..]);
    }
    format!("; stderr: {tail}")
}
