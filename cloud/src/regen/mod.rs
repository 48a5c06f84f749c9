//! Regeneration: a model writes or repairs a trace, and the learner proves it compiles
//! before anything else happens to it.
//!
//! [`regenerate`] builds the prompt — the trace language (docs/trace-language.md, compiled
//! in), the goal, the current source if there is one, the failing runs — asks a
//! [`backend::Backend`], takes the trace out of the reply and compiles it; compiler
//! diagnostics (with `line:column`) go back to the model as the next turn, for up to
//! `max_rounds` rounds. What comes out is a source that compiles, under the same trace id,
//! with the tokens and cost of every round; what does not is a [`RegenError::GaveUp`] with
//! the last diagnostics. Signing, the version bump ([`next_version`], [`with_version`]) and
//! the canary rollout are `learner regenerate`'s.

pub mod auto;
pub mod backend;
pub mod dry_run;

use backend::{Backend, BackendError, Prompt, Role, Turn};
use tracefleet::diag::Diagnostic;
use tracefleet::trace::Trace;

/// The trace language, as the model is told it.
pub const TRACE_LANGUAGE: &str = include_str!("../../../docs/trace-language.md");

/// Longest output excerpt of a failing run put in the prompt (bytes).
pub const MAX_EXCERPT_BYTES: usize = 2000;

/// A failing run, as the prompt shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Run id.
    pub run_id: String,
    /// Device.
    pub device_id: tracefleet::ids::DeviceId,
    /// Version that ran.
    pub trace_version: String,
    /// The step that failed (1-based), if one did.
    pub failed_step: Option<u32>,
    /// The run's error.
    pub error: Option<String>,
    /// Failed validations and step outputs, capped at [`MAX_EXCERPT_BYTES`].
    pub excerpt: String,
    /// The run's inputs (after defaults): what a dry run of a candidate uses.
    pub inputs: std::collections::BTreeMap<String, String>,
}

impl Failure {
    /// A failing run as the prompt shows it: the failed step's error, output and failed
    /// validations, and failed pre- and postconditions.
    #[must_use]
    pub fn from_report(r: &tracefleet::report::Report) -> Self {
        use std::fmt::Write as _;
        let mut excerpt = String::new();
        for c in r
            .preconditions
            .iter()
            .chain(&r.postconditions)
            .filter(|c| !c.passed)
        {
            let _ = writeln!(
                excerpt,
                "condition failed: {} ({}): {}",
                c.check, c.kind, c.detail
            );
        }
        for s in &r.step_results {
            let failed_checks: Vec<_> = s.validations.iter().filter(|v| !v.passed).collect();
            if Some(s.step) != r.failed_step && failed_checks.is_empty() {
                continue;
            }
            let _ = writeln!(
                excerpt,
                "step {} ({}, {}): {:?}, exit code {}, {} attempt(s){}",
                s.step,
                s.title,
                s.tool,
                s.status,
                s.exit_code.map_or("-".into(), |c| c.to_string()),
                s.attempts,
                s.error
                    .as_deref()
                    .map_or(String::new(), |e| format!("; error: {e}"))
            );
            for v in failed_checks {
                let _ = writeln!(
                    excerpt,
                    "  validation failed: {} ({}): {}",
                    v.check, v.kind, v.detail
                );
            }
            if !s.output.is_empty() {
                let _ = writeln!(
                    excerpt,
                    "  output:\n{}",
                    cap(&s.output, MAX_EXCERPT_BYTES / 2)
                );
            }
        }
        Failure {
            run_id: r.run_id.clone(),
            device_id: r.device_id.clone(),
            trace_version: r.trace_version.clone(),
            failed_step: r.failed_step,
            error: r.error.clone(),
            excerpt: cap(&excerpt, MAX_EXCERPT_BYTES),
            inputs: r.inputs.clone(),
        }
    }
}

/// Most low-fidelity records put in the prompt (the lowest first).
pub const MAX_LOW_FIDELITY: usize = 5;
/// Most disagreements shown per record.
pub const MAX_DISAGREEMENTS_SHOWN: usize = 10;
/// Longest variable value or answer shown in a disagreement (bytes).
const MAX_VALUE_BYTES: usize = 300;

/// A judgement step whose reference answers a device's model did not repeat well enough to
/// run it unattended, as the prompt shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LowFidelity {
    /// What was measured where, as the prompt says it ("version 1.0.0 on pi-02").
    pub measured: String,
    /// The judgement step.
    pub step: u32,
    /// The device's model.
    pub model: String,
    /// Reference answers repeated.
    pub agreements: u32,
    /// Reference answers scored.
    pub total: u32,
    /// The step's minimum.
    pub min_fidelity: f64,
    /// The reference answers it did not repeat.
    pub disagreements: Vec<Disagreement>,
}

/// One reference answer a device's model did not repeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Disagreement {
    /// The example (1-based, among the step's scored examples).
    pub example: u32,
    /// Its variables, when the learner has the version's source (`None`: only the answer is
    /// known).
    pub vars: Option<Vec<(String, String)>>,
    /// The answer expected, as the prompt shows it (`None` without the source).
    pub expected: Option<String>,
    /// What the device's model answered.
    pub answer: String,
}

impl LowFidelity {
    /// A fidelity measurement, its disagreements matched to the examples of `trace` (the
    /// version measured, when the learner has its source).
    #[must_use]
    pub fn new(
        measured: String,
        f: &tracefleet::judgement::Fidelity,
        trace: Option<&Trace>,
    ) -> Self {
        let step = f.step;
        let scored = trace
            .and_then(|t| t.steps.iter().find(|s| s.number == step))
            .and_then(|s| match &s.tool {
                tracefleet::trace::Tool::Llm(call) => Some(call.judgement.scored()),
                _ => None,
            });
        LowFidelity {
            measured,
            step,
            model: f.model.clone(),
            agreements: f.agreements,
            total: f.total,
            min_fidelity: f64::from(f.min_fidelity),
            disagreements: f
                .disagreements
                .iter()
                .map(|(i, answer)| {
                    let example = scored.and_then(|s| s.get(*i as usize));
                    Disagreement {
                        example: i.saturating_add(1),
                        vars: example.map(|e| {
                            e.vars
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.clone()))
                                .collect()
                        }),
                        expected: example.map(|e| match &e.expect {
                            tracefleet::judgement::Expect::Text(t) => format!("{:?}", t.trim()),
                            tracefleet::judgement::Expect::Regex(r) => {
                                format!("an answer matching the regex {r:?}")
                            }
                            tracefleet::judgement::Expect::Fields(f) => {
                                format!("a JSON object with the fields {f}")
                            }
                        }),
                        answer: answer.clone(),
                    }
                })
                .collect(),
        }
    }
}

/// The version a reply is compiled under until the learner gives it its own.
const PLACEHOLDER_VERSION: tracefleet::ids::Version = tracefleet::ids::Version {
    major: 0,
    minor: 0,
    patch: 1,
};

/// The version a regenerated trace gets: the next minor version above every version known.
#[must_use]
pub fn next_version(known: &[tracefleet::ids::Version]) -> tracefleet::ids::Version {
    known.iter().max().map_or(
        tracefleet::ids::Version {
            major: 1,
            minor: 0,
            patch: 0,
        },
        |v| tracefleet::ids::Version {
            major: v.major,
            minor: v.minor.saturating_add(1),
            patch: 0,
        },
    )
}

/// `source` with its frontmatter's `version:` set to `version` (added when missing).
#[must_use]
pub fn with_version(source: &str, version: &tracefleet::ids::Version) -> String {
    let mut out = Vec::new();
    let mut in_front = false;
    let mut done = false;
    for (i, line) in source.lines().enumerate() {
        if line.trim_end() == "---" {
            if i == 0 {
                in_front = true;
            } else if in_front {
                if !done {
                    out.push(format!("version: \"{version}\""));
                    done = true;
                }
                in_front = false;
            }
        } else if in_front && !done && line.starts_with("version:") {
            out.push(format!("version: \"{version}\""));
            done = true;
            continue;
        }
        out.push(line.to_owned());
    }
    let mut s = out.join("\n");
    if source.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// What to regenerate.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The trace id the result must keep.
    pub trace_id: &'a str,
    /// The goal signature.
    pub goal: &'a str,
    /// The current source (`None`: a new goal, a first version).
    pub current: Option<&'a str>,
    /// Recent failing runs.
    pub failures: &'a [Failure],
    /// Judgement steps of the current version that devices' models do not repeat, lowest
    /// fidelity first.
    pub low_fidelity: &'a [LowFidelity],
    /// Most rounds (a reply, then a repair per round).
    pub max_rounds: u32,
    /// Dry-run each candidate that compiles on the newest failure's inputs.
    pub dry_run: Option<&'a dry_run::DryRunner>,
}

/// A trace that compiles, and what it took.
#[derive(Debug, Clone)]
pub struct Regenerated {
    /// The source, as the model wrote it.
    pub source: String,
    /// Compiled.
    pub trace: Trace,
    /// Compiler warnings.
    pub warnings: Vec<Diagnostic>,
    /// Rounds used (1: the first reply compiled).
    pub rounds: u32,
    /// Input tokens over all rounds.
    pub input_tokens: u64,
    /// Output tokens over all rounds.
    pub output_tokens: u64,
    /// Dollars over all rounds.
    pub cost: f64,
    /// The model that answered.
    pub model: String,
    /// How the dry run went (`None`: none configured).
    pub dry_run: Option<String>,
}

/// Why no trace came out.
#[derive(Debug, thiserror::Error)]
pub enum RegenError {
    /// The model could not be asked (after the backend's own retries).
    #[error(
        "{source} (after {rounds} answered round(s), {input_tokens} input and {output_tokens} output tokens)"
    )]
    Backend {
        /// The cause.
        source: BackendError,
        /// Rounds answered before it.
        rounds: u32,
        /// Input tokens spent.
        input_tokens: u64,
        /// Output tokens spent.
        output_tokens: u64,
        /// Dollars spent.
        cost: f64,
    },
    /// No reply compiled within the rounds allowed.
    #[error(
        "no compiling trace after {rounds} rounds ({input_tokens} input and {output_tokens} output tokens); last problems:\n{last}"
    )]
    GaveUp {
        /// Rounds used.
        rounds: u32,
        /// What was wrong with the last reply.
        last: String,
        /// Input tokens spent.
        input_tokens: u64,
        /// Output tokens spent.
        output_tokens: u64,
        /// Dollars spent.
        cost: f64,
    },
}

/// The system prompt: what a trace is and how to answer.
#[must_use]
pub fn system_prompt() -> String {
    format!(
        "You write execution traces for tracefleet: Markdown programs that small edge devices run offline, \
         deterministic tool steps directly and judgement steps with a small local model. \
         Reply with the complete trace source only — starting with its `---` frontmatter line, no commentary — \
         optionally inside one ```markdown fence. Keep the trace_id you are given. \
         Prefer deterministic tools and validations over model steps; keep commands within the tools' policy.\n\n\
         {EXAMPLES_RULE}\n\n\
         The trace language:\n\n{TRACE_LANGUAGE}"
    )
}

/// What the system prompt asks of every judgement step (see "Judgement steps" in the trace
/// language); [`missing_examples`] holds a reply to it.
pub const EXAMPLES_RULE: &str = "Every LLM (judgement) step must carry reference examples (`examples:`), \
     10 to 30 of them, covering every answer the step can give, drawn from the inputs and runs shown where you can: \
     each `{vars: {NAME: VALUE, …}, expect: ANSWER}` binds exactly the variables the step's prompt and system message use, \
     and its `expect` is an answer the step's grammar can produce (for a `json_schema` step a mapping of the fields compared; \
     `expect_regex: PATTERN` for a free-form answer). The device's small model must repeat these answers \
     (`min_fidelity`, default 0.8) before the step runs unattended, so write the step so that a small model can: \
     a narrow grammar, plain wording, `few_shot: K` examples in the prompt — or replace it by a deterministic step.";

/// The judgement steps of `trace` that have no scored reference example, as a repair turn
/// (`None`: every LLM step has some).
#[must_use]
pub fn missing_examples(trace: &Trace) -> Option<String> {
    let missing: Vec<String> = trace
        .steps
        .iter()
        .filter_map(|s| match &s.tool {
            tracefleet::trace::Tool::Llm(call) if call.judgement.scored().is_empty() => {
                let vars: Vec<String> = call
                    .message_variables()
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect();
                // (The compiler keeps `few_shot` under the number of examples, so a step
                // without scored examples has none.)
                Some(format!(
                    "- step {} ({}) has no `examples:`: each example must bind {}",
                    s.number,
                    s.title,
                    if vars.is_empty() {
                        "no variable (the prompt uses none)".to_owned()
                    } else {
                        vars.join(", ")
                    }
                ))
            }
            _ => None,
        })
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "The trace compiles, but not every judgement step carries reference examples to score:\n{}\n\n{EXAMPLES_RULE}\n\nReply with the complete corrected trace.",
            missing.join("\n")
        )
    })
}

/// The first user turn.
#[must_use]
pub fn first_turn(req: &Request<'_>) -> String {
    let mut t = format!("trace_id: {}\ngoal: {}\n\n", req.trace_id, req.goal);
    match req.current {
        Some(src) => {
            t.push_str("The current version of the trace fails on the fleet. Its source:\n\n````markdown\n");
            t.push_str(src);
            t.push_str("\n````\n\n");
        }
        None => t.push_str("There is no trace for this goal yet: write the first version.\n\n"),
    }
    if !req.failures.is_empty() {
        t.push_str("Failing runs, newest first:\n");
        for f in req.failures {
            t.push_str(&format!(
                "\n- run {} on {} (version {}): failed step {}; error: {}\n",
                f.run_id,
                f.device_id,
                f.trace_version,
                f.failed_step.map_or("-".into(), |s| s.to_string()),
                f.error.as_deref().unwrap_or("-")
            ));
            if !f.excerpt.is_empty() {
                t.push_str("  ```\n");
                t.push_str(&cap(&f.excerpt, MAX_EXCERPT_BYTES));
                t.push_str("\n  ```\n");
            }
        }
        t.push('\n');
    }
    if !req.low_fidelity.is_empty() {
        t.push_str(&low_fidelity_section(req.low_fidelity));
    }
    t.push_str("Write the complete new trace.");
    t
}

/// What would make a judgement step easier for a small model (both fidelity prompts say it).
const EASIER: &str = "Make each such step easier for the small model — reference examples in the prompt \
     (`few_shot`), a narrower grammar, simpler and shorter wording — or replace it by a deterministic \
     step (Bash, Grep) that gives the reference answers; keep the reference answers right and cover \
     every answer.";

/// The prompt's part on judgement steps devices' models do not repeat.
fn low_fidelity_section(low: &[LowFidelity]) -> String {
    format!(
        "Devices' small models do not repeat the reference answers of these judgement steps, so the \
         steps do not run unattended there. {EASIER}\n{}\n",
        describe_low_fidelity(low)
    )
}

/// Each record's figures, then each disagreement (the example's variables, the answer
/// expected, the model's answer).
fn describe_low_fidelity(low: &[LowFidelity]) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    for l in low.iter().take(MAX_LOW_FIDELITY) {
        let _ = writeln!(
            t,
            "\n- step {} of {}, model {}: agrees with {} of {} reference answers ({:.2} < {:.2})",
            l.step,
            l.measured,
            l.model,
            l.agreements,
            l.total,
            tracefleet::judgement::fidelity_ratio(l.agreements, l.total),
            l.min_fidelity
        );
        for d in l.disagreements.iter().take(MAX_DISAGREEMENTS_SHOWN) {
            let vars = d.vars.as_ref().map_or_else(
                || "(not known here)".to_owned(),
                |vars| {
                    vars.iter()
                        .map(|(k, v)| format!("{k}: {:?}", cap(v, MAX_VALUE_BYTES)))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            );
            let _ = writeln!(
                t,
                "  - example {}: vars {{{vars}}}; expected {}; the model answered {:?}",
                d.example,
                d.expected.as_deref().unwrap_or("(not known here)"),
                cap(&d.answer, MAX_VALUE_BYTES)
            );
        }
        if l.disagreements.len() > MAX_DISAGREEMENTS_SHOWN {
            let _ = writeln!(
                t,
                "  - … and {} more",
                l.disagreements.len() - MAX_DISAGREEMENTS_SHOWN
            );
        }
    }
    if low.len() > MAX_LOW_FIDELITY {
        let _ = writeln!(t, "\n(and {} more records)", low.len() - MAX_LOW_FIDELITY);
    }
    t
}

/// "step 4 with M: 18/20 (0.90)" for each measurement.
fn fidelity_summary(measured: &[tracefleet::judgement::Fidelity]) -> String {
    measured
        .iter()
        .map(|f| format!("step {} with {}: {}", f.step, f.model, f.short()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `s` cut to at most `max` bytes on a character boundary, marked when cut.
fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes cut]", &s[..end], s.len() - end)
}

/// The trace source in a reply: the content of its outer ```markdown / ```md / ````markdown
/// fence if it has one, from the first `---` line on; `None` without a `---` line.
#[must_use]
pub fn extract_trace(reply: &str) -> Option<String> {
    let lines: Vec<&str> = reply.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == "---")?;
    let fence = lines[..start].iter().rev().find_map(|l| {
        let t = l.trim();
        let ticks = t.chars().take_while(|c| *c == '`').count();
        (ticks >= 3 && matches!(t[ticks..].trim(), "markdown" | "md" | ""))
            .then(|| "`".repeat(ticks))
    });
    let mut end = lines.len();
    if let Some(fence) = fence {
        // The outer fence closes at its last line of exactly those backticks.
        if let Some(close) = lines[start..].iter().rposition(|l| l.trim() == fence) {
            end = start + close;
        }
    }
    let mut out = lines[start..end].join("\n");
    out.push('\n');
    Some(out)
}

/// Asks `backend` for a trace and repairs it until it compiles under `req.trace_id`.
///
/// # Errors
/// [`RegenError::Backend`] when the model cannot be reached; [`RegenError::GaveUp`] when no
/// reply compiles within `req.max_rounds`.
pub async fn regenerate<B: Backend>(
    backend: &B,
    req: &Request<'_>,
) -> Result<Regenerated, RegenError> {
    let mut prompt = Prompt {
        system: system_prompt(),
        turns: vec![Turn {
            role: Role::User,
            content: first_turn(req),
        }],
    };
    let file = format!("{}.trace.md", req.trace_id);
    let (mut input_tokens, mut output_tokens, mut cost) = (0, 0, 0.0);
    let mut last = String::new();
    for round in 1..=req.max_rounds.max(1) {
        let c = backend
            .complete(&prompt)
            .await
            .map_err(|source| RegenError::Backend {
                source,
                rounds: round - 1,
                input_tokens,
                output_tokens,
                cost,
            })?;
        input_tokens += c.input_tokens;
        output_tokens += c.output_tokens;
        cost += c.cost;
        let feedback = match extract_trace(&c.text) {
            None => "Your reply has no trace: reply with the complete trace source, starting with its `---` frontmatter line.".to_owned(),
            // The version is the learner's to choose (see `next_version`): whatever the
            // model wrote there, or nothing, is replaced.
            Some(source) => match tracefleet::compile::compile_source(
                &file,
                &with_version(&source, &PLACEHOLDER_VERSION),
            ) {
                Ok((trace, _)) if trace.id.as_str() == req.trace_id && let Some(missing) = missing_examples(&trace) => missing,
                Ok((trace, warnings)) if trace.id.as_str() == req.trace_id => 'candidate: {
                    // Its judgement first: the devices' model must repeat its examples.
                    let fidelity = match req.dry_run {
                        Some(d) => Some(
                            d.fidelity(&trace, &with_version(&source, &PLACEHOLDER_VERSION))
                                .await,
                        ),
                        None => None,
                    };
                    let fidelity = match fidelity {
                        None => None,
                        Some(dry_run::FidelityOutcome::Skipped(why)) => Some(why),
                        Some(dry_run::FidelityOutcome::Measured(measured)) => {
                            let low: Vec<LowFidelity> = measured
                                .iter()
                                .filter(|f| !f.passes())
                                .map(|f| {
                                    LowFidelity::new(
                                        "your reply, answered by the devices' model on the learner".into(),
                                        f,
                                        Some(&trace),
                                    )
                                })
                                .collect();
                            if !low.is_empty() {
                                break 'candidate format!(
                                    "The trace compiles, but the devices' model does not repeat the reference answers of its judgement steps, so they would not run unattended:\n{}\n{EASIER}\n\nReply with the complete corrected trace.",
                                    describe_low_fidelity(&low)
                                );
                            }
                            (!measured.is_empty())
                                .then(|| format!("fidelity {}", fidelity_summary(&measured)))
                        }
                    };
                    let dry = match req.dry_run {
                        Some(d) => Some(
                            d.run(
                                &trace,
                                &with_version(&source, &PLACEHOLDER_VERSION),
                                req.failures.first().map(|f| &f.inputs),
                            )
                            .await,
                        ),
                        None => None,
                    };
                    let run_id = req.failures.first().map_or("-", |f| f.run_id.as_str());
                    let verdict = match dry {
                        None => Ok(None),
                        Some(dry_run::DryOutcome::Passed { secs }) => Ok(Some(format!(
                            "dry run passed on the inputs of run {run_id} in {secs:.1} s"
                        ))),
                        Some(dry_run::DryOutcome::Skipped(why)) => {
                            Ok(Some(format!("not dry-run: {why}")))
                        }
                        Some(dry_run::DryOutcome::Failed(report)) => {
                            let f = Failure::from_report(&report);
                            Err(format!(
                                "The trace compiles, but a dry run of it on the inputs of run {run_id} failed: step {}; error: {}\n\n```\n{}\n```\n\nReply with the complete corrected trace.",
                                f.failed_step.map_or("-".into(), |s| s.to_string()),
                                f.error.as_deref().unwrap_or("-"),
                                f.excerpt
                            ))
                        }
                    };
                    let verdict = verdict.map(|dry| match (fidelity, dry) {
                        (Some(f), Some(d)) => Some(format!("{f}; {d}")),
                        (f, d) => f.or(d),
                    });
                    match verdict {
                        Ok(dry_run) => {
                            return Ok(Regenerated {
                                source,
                                trace,
                                warnings,
                                rounds: round,
                                input_tokens,
                                output_tokens,
                                cost,
                                model: c.model,
                                dry_run,
                            });
                        }
                        Err(feedback) => feedback,
                    }
                }
                Ok((trace, _)) => format!(
                    "The trace_id is {:?}: it must stay {:?}. Reply with the complete corrected trace.",
                    trace.id.as_str(),
                    req.trace_id
                ),
                Err(diags) => format!(
                    "The trace does not compile:\n\n{diags}\n\nReply with the complete corrected trace."
                ),
            },
        };
        tracing::info!(trace = %req.trace_id, round, "the model's trace needs a repair");
        last.clone_from(&feedback);
        prompt.turns.push(Turn {
            role: Role::Assistant,
            content: c.text,
        });
        prompt.turns.push(Turn {
            role: Role::User,
            content: feedback,
        });
    }
    Err(RegenError::GaveUp {
        rounds: req.max_rounds.max(1),
        last,
        input_tokens,
        output_tokens,
        cost,
    })
}

#[cfg(test)]
mod tests {
    use super::backend::Completion;
    use super::*;
    use std::sync::Mutex;

    /// Replays scripted replies and records every prompt it was sent.
    struct Scripted {
        replies: Mutex<Vec<String>>,
        prompts: Mutex<Vec<Prompt>>,
    }

    impl Scripted {
        fn new(replies: &[&str]) -> Self {
            Scripted {
                replies: Mutex::new(replies.iter().rev().map(|r| (*r).to_owned()).collect()),
                prompts: Mutex::new(Vec::new()),
            }
        }
    }

    impl Backend for Scripted {
        async fn complete(&self, prompt: &Prompt) -> Result<Completion, BackendError> {
            self.prompts.lock().unwrap().push(prompt.clone());
            let Some(text) = self.replies.lock().unwrap().pop() else {
                return Err(BackendError::Malformed {
                    url: "scripted".into(),
                    detail: "no reply scripted".into(),
                });
            };
            Ok(Completion {
                text,
                model: "scripted".into(),
                stop_reason: Some("end_turn".into()),
                input_tokens: 100,
                output_tokens: 10,
                attempts: 1,
                cost: 0.5,
            })
        }
    }

    const SHIPPED: &str = include_str!("../../../traces/dpkg-log-triage.trace.md");

    /// The reference examples a reply adds to the shipped trace's judgement step.
    const EXAMPLES: &str = "  examples:\n    - vars: {recent_changes: \"2026-11-02 10:00:01 upgrade openssl:amd64 3.0.1 3.0.2\", action_counts: \"upgrade 1\"}\n      expect_regex: '\"risk\": ?\"(low|medium)\"'\n    - vars: {recent_changes: \"2026-11-02 10:00:01 remove linux-image-6.1 6.1.0 <none>\", action_counts: \"remove 1\"}\n      expect_regex: '\"risk\": ?\"high\"'\n";

    /// The shipped trace with reference examples on its judgement step: a reply the learner
    /// takes.
    static GOOD_OWNED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let out = SHIPPED.replacen(
            "  max_tokens: 256\n",
            &format!("  max_tokens: 256\n{EXAMPLES}"),
            1,
        );
        assert_ne!(out, SHIPPED);
        out
    });

    fn good() -> &'static str {
        &GOOD_OWNED
    }

    fn request(max_rounds: u32) -> Request<'static> {
        Request {
            trace_id: "dpkg-log-triage",
            goal: "triage the package manager log",
            current: Some(SHIPPED),
            failures: &[],
            low_fidelity: &[],
            max_rounds,
            dry_run: None,
        }
    }

    #[test]
    fn the_new_version_goes_into_the_frontmatter_and_above_every_known_one() {
        let v: tracefleet::ids::Version = "1.4.2".parse().unwrap();
        let out = with_version(SHIPPED, &v);
        assert!(out.contains("\nversion: \"1.4.2\"\n") && !out.contains("\"1.0.0\""));
        assert_eq!(out.len(), SHIPPED.len());
        let (t, _) = tracefleet::compile::compile_source("x", &out).unwrap();
        assert_eq!(t.version, v);
        let without = "---\ntrace_id: a\n---\nbody\n";
        assert_eq!(
            with_version(without, &v),
            "---\ntrace_id: a\nversion: \"1.4.2\"\n---\nbody\n"
        );
        let known: Vec<tracefleet::ids::Version> = ["1.0.0", "1.2.9", "1.10.0"]
            .iter()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(next_version(&known).to_string(), "1.11.0");
        assert_eq!(next_version(&[]).to_string(), "1.0.0");
    }

    #[test]
    fn a_trace_is_taken_from_a_fenced_reply_with_its_own_fences_inside() {
        let reply = format!(
            "Here is the fixed trace:\n\n````markdown\n{}````\n\nIt now checks the log first.",
            good()
        );
        assert_eq!(extract_trace(&reply).as_deref(), Some(good()));
        let reply = format!("```markdown\n{}```\n", good());
        assert_eq!(extract_trace(&reply).as_deref(), Some(good()));
        assert_eq!(extract_trace(good()).as_deref(), Some(good()));
        assert_eq!(extract_trace("I cannot help with that."), None);
    }

    #[tokio::test]
    async fn a_reply_that_does_not_compile_is_repaired_with_the_diagnostics() {
        let broken = good().replacen("tool: Bash", "tool: Bashh", 1);
        let backend = Scripted::new(&[&broken, good()]);
        let r = regenerate(&backend, &request(3)).await.unwrap();
        assert_eq!(r.rounds, 2);
        assert_eq!(r.source, good());
        assert_eq!(r.trace.id.as_str(), "dpkg-log-triage");
        assert_eq!((r.input_tokens, r.output_tokens), (200, 20));
        assert!((r.cost - 1.0).abs() < 1e-12);
        let prompts = backend.prompts.lock().unwrap();
        let second = &prompts[1];
        assert_eq!(second.turns.len(), 3);
        assert_eq!(second.turns[1].role, Role::Assistant);
        assert_eq!(second.turns[1].content, broken);
        let feedback = &second.turns[2].content;
        assert!(
            feedback.contains("does not compile") && feedback.contains("Bashh"),
            "{feedback}"
        );
        assert!(
            feedback.contains("dpkg-log-triage.trace.md:"),
            "line and column: {feedback}"
        );
        // The first turn carries the goal and the current source; the system prompt the language.
        assert!(
            prompts[0].turns[0]
                .content
                .contains("triage the package manager log")
        );
        assert!(prompts[0].turns[0].content.contains(SHIPPED));
        assert!(prompts[0].system.contains(TRACE_LANGUAGE));
    }

    #[tokio::test]
    async fn a_model_that_never_compiles_is_given_up_on_after_the_rounds_allowed() {
        let backend = Scripted::new(&[
            "no trace here",
            "---\ntrace_id: dpkg-log-triage\n---\n",
            "still nothing",
        ]);
        let e = regenerate(&backend, &request(3)).await.unwrap_err();
        match &e {
            RegenError::GaveUp {
                rounds,
                last,
                input_tokens,
                ..
            } => {
                assert_eq!((*rounds, *input_tokens), (3, 300));
                assert!(last.contains("no trace"), "{last}");
            }
            other => panic!("{other}"),
        }
        assert_eq!(backend.prompts.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_backend_failing_after_a_round_reports_what_that_round_cost() {
        let broken = good().replacen("tool: Bash", "tool: Bashh", 1);
        let backend = Scripted::new(&[&broken]);
        match regenerate(&backend, &request(3)).await.unwrap_err() {
            RegenError::Backend {
                rounds,
                input_tokens,
                output_tokens,
                cost,
                ..
            } => {
                assert_eq!((rounds, input_tokens, output_tokens), (1, 100, 10));
                assert!((cost - 0.5).abs() < 1e-12);
            }
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn a_reply_without_a_version_compiles_the_learner_gives_it_one() {
        let unversioned = good().replacen("version: \"1.0.0\"\n", "", 1);
        assert_ne!(unversioned, good());
        let backend = Scripted::new(&[&unversioned]);
        let r = regenerate(&backend, &request(1)).await.unwrap();
        assert_eq!((r.rounds, r.source.as_str()), (1, unversioned.as_str()));
    }

    #[tokio::test]
    async fn a_trace_under_another_id_is_sent_back() {
        let renamed = good().replacen("trace_id: dpkg-log-triage", "trace_id: dpkg-triage-v2", 1);
        let backend = Scripted::new(&[&renamed, good()]);
        let r = regenerate(&backend, &request(2)).await.unwrap();
        assert_eq!(r.rounds, 2);
        let prompts = backend.prompts.lock().unwrap();
        assert!(
            prompts[1].turns[2]
                .content
                .contains("must stay \"dpkg-log-triage\"")
        );
    }

    #[tokio::test]
    async fn a_judgement_step_without_examples_or_with_examples_that_do_not_fit_is_sent_back() {
        // The shipped trace has no examples on its LLM step; then examples that bind a
        // variable the step does not use and miss one it does; then the good reply.
        let wrong_vars = SHIPPED.replacen(
            "  max_tokens: 256\n",
            "  max_tokens: 256\n  examples:\n    - vars: {changes: \"x\", action_counts: \"y\"}\n      expect_regex: 'low'\n",
            1,
        );
        let backend = Scripted::new(&[SHIPPED, &wrong_vars, good()]);
        let r = regenerate(&backend, &request(3)).await.unwrap();
        assert_eq!((r.rounds, r.source.as_str()), (3, good()));
        let step = r.trace.llm_steps().next().unwrap();
        let tracefleet::trace::Tool::Llm(call) = &step.tool else {
            unreachable!()
        };
        assert_eq!(call.judgement.scored().len(), 2);
        let prompts = backend.prompts.lock().unwrap();
        // The system prompt asks for them.
        assert!(prompts[0].system.contains(EXAMPLES_RULE));
        let missing = &prompts[1].turns[2].content;
        assert!(
            missing.contains("step 4 (Assess the risk of the recent changes) has no `examples:`")
                && missing.contains("each example must bind `action_counts`, `recent_changes`"),
            "{missing}"
        );
        let misfit = &prompts[2].turns[4].content;
        assert!(
            misfit.contains("does not compile")
                && misfit.contains(
                    "binds `changes`, which the step's prompt and system message do not use"
                )
                && misfit.contains("does not bind `{recent_changes}`"),
            "{misfit}"
        );
    }

    #[tokio::test]
    async fn a_model_that_never_writes_examples_is_given_up_on_saying_which_step_lacks_them() {
        let backend = Scripted::new(&[SHIPPED, SHIPPED]);
        match regenerate(&backend, &request(2)).await.unwrap_err() {
            RegenError::GaveUp { rounds, last, .. } => {
                assert_eq!(rounds, 2);
                assert!(
                    last.contains(
                        "step 4 (Assess the risk of the recent changes) has no `examples:`"
                    ),
                    "{last}"
                );
            }
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn a_candidate_the_devices_model_does_not_repeat_is_sent_back_with_the_disagreements() {
        use dry_run::tests::{JUDGED, fake_eval};
        let d = tempfile::tempdir().unwrap();
        let follower = fake_eval(
            d.path(),
            &[
                Some(
                    r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "items": 3, "wrong": 2, "disagreements": [{"item": 1, "answer": "tcp"}, {"item": 2, "answer": "udp"}]}"#,
                ),
                Some(
                    r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "items": 3, "wrong": 0, "disagreements": []}"#,
                ),
            ],
        );
        let runner: dry_run::DryRunConfig = toml::from_str(&format!(
            "follower = \"{}\"\nmodel = \"m.gguf\"",
            follower.display()
        ))
        .unwrap();
        let runner = runner.resolve(d.path(), d.path().join("scratch")).unwrap();
        let backend = Scripted::new(&[JUDGED, JUDGED]);
        let req = Request {
            trace_id: "t",
            goal: "name the protocol",
            current: None,
            failures: &[],
            low_fidelity: &[],
            max_rounds: 2,
            dry_run: Some(&runner),
        };
        let r = regenerate(&backend, &req).await.unwrap();
        assert_eq!(r.rounds, 2);
        assert_eq!(
            r.dry_run.as_deref(),
            Some(
                "fidelity step 1 with SmolLM2-135M-Instruct.Q4_1: 3/3 (1.00); not dry-run: no recorded inputs (no failing run)"
            )
        );
        let prompts = backend.prompts.lock().unwrap();
        let repair = &prompts[1].turns[2].content;
        assert!(
            repair.contains("the devices' model does not repeat the reference answers")
                && repair.contains("- step 1 of your reply, answered by the devices' model on the learner, model SmolLM2-135M-Instruct.Q4_1: agrees with 1 of 3 reference answers (0.33 < 0.80)")
                && repair.contains("example 2: vars {entry: \"domain 53/___\"}; expected \"udp\"; the model answered \"tcp\"")
                && repair.contains("example 3: vars {entry: \"http 80/___\"}; expected an answer matching the regex \"^tcp$\"; the model answered \"udp\"")
                && repair.contains("few_shot"),
            "{repair}"
        );
    }

    #[test]
    fn failing_runs_go_into_the_first_turn_with_long_outputs_cut() {
        let failures = [Failure {
            run_id: "r1".into(),
            device_id: "pi-01".parse().unwrap(),
            trace_version: "1.0.0".into(),
            failed_step: Some(2),
            error: Some("validation failed: output_contains".into()),
            excerpt: "x".repeat(MAX_EXCERPT_BYTES + 500),
            inputs: std::collections::BTreeMap::new(),
        }];
        let req = Request {
            failures: &failures,
            ..request(1)
        };
        let t = first_turn(&req);
        assert!(
            t.contains("run r1 on pi-01 (version 1.0.0): failed step 2; error: validation failed")
        );
        assert!(t.contains("[500 bytes cut]"), "{t}");
        let new_goal = Request {
            current: None,
            ..request(1)
        };
        assert!(first_turn(&new_goal).contains("write the first version"));
    }
}
