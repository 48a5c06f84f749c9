//! The invariants the compiler enforces, checked again on every decoded compiled trace: a
//! signature says who vouches for a trace, not that its bytes came from this compiler, and
//! the interpreter relies on these (a negative retry delay would panic in `Duration`, a
//! dependency on a missing step would never be scheduled). Bounds are the compiler's own;
//! the one rule left to the point of use is that a regex compiles (see `check_kind`).

use crate::trace::{
    BUILTIN_VARIABLES, CheckKind, ForeachSource, MAX_MAX_TOKENS, MAX_RETRY_COUNT,
    MAX_RETRY_DELAY_SECS, MAX_TEMPERATURE, OnError, Template, Tool, Trace, is_valid_read_path,
};
use std::collections::{BTreeMap, BTreeSet};

/// Checks `trace` against every rule the compiler applies to what it emits.
///
/// # Errors
/// The first broken rule: which step or field, what was expected, what was found.
pub fn check(trace: &Trace) -> Result<(), String> {
    for (name, v) in [
        ("confidence", trace.confidence),
        ("success_rate", trace.success_rate),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("{name} is {v}: expected 0 to 1"));
        }
    }
    for (name, v) in [
        ("estimated_cost", trace.estimated_cost),
        ("estimated_time_secs", trace.estimated_time_secs),
    ] {
        if !v.is_finite() {
            return Err(format!("{name} is {v}: expected a finite number"));
        }
    }
    if trace.max_parallel == 0 {
        return Err("max_parallel is 0: expected at least 1".into());
    }
    for r in &trace.read_paths {
        if !is_valid_read_path(r) {
            return Err(format!(
                "read path {r:?}: expected an absolute path without `..`"
            ));
        }
    }
    if trace.steps.is_empty() {
        return Err("the trace has no steps: expected at least one".into());
    }
    let numbers: BTreeSet<u32> = trace.steps.iter().map(|s| s.number).collect();
    if trace.steps.windows(2).any(|w| w[0].number >= w[1].number) {
        return Err("step numbers are not strictly ascending".into());
    }
    let Some(order) = trace.execution_order() else {
        return Err("the step dependencies name a missing step or form a cycle".into());
    };
    let ancestors = ancestors(trace, &order);
    let bindings = trace.output_bindings();
    let inputs: BTreeSet<&str> = trace.inputs.iter().map(|i| i.name.as_str()).collect();
    let base = |v: &str| inputs.contains(v) || BUILTIN_VARIABLES.contains(&v);
    for c in &trace.preconditions {
        resolved(c.kind.templates(), |v| base(v), "a precondition")?;
        check_kind(&c.kind, "a precondition")?;
    }
    for c in &trace.postconditions {
        resolved(
            c.kind.templates(),
            |v| base(v) || bindings.contains_key(v),
            "a postcondition",
        )?;
        check_kind(&c.kind, "a postcondition")?;
    }
    for s in &trace.steps {
        let what = format!("step {}", s.number);
        if s.timeout_secs == 0 {
            return Err(format!("{what}: timeout_secs is 0: expected at least 1"));
        }
        let before = &ancestors[&s.number];
        let ready = |v: &str| base(v) || bindings.get(v).is_some_and(|n| before.contains(n));
        match &s.on_error {
            OnError::Retry {
                retry_count,
                delay_secs,
                fallback_step,
            } => {
                if *retry_count > MAX_RETRY_COUNT {
                    return Err(format!(
                        "{what}: retry_count is {retry_count}: expected at most {MAX_RETRY_COUNT}"
                    ));
                }
                if !(0.0..=MAX_RETRY_DELAY_SECS).contains(delay_secs) {
                    return Err(format!(
                        "{what}: retry delay is {delay_secs} s: expected 0 to {MAX_RETRY_DELAY_SECS}"
                    ));
                }
                fallback(*fallback_step, s.number, &numbers, &what)?;
            }
            OnError::Fallback { step } => fallback(Some(*step), s.number, &numbers, &what)?,
            OnError::Fail | OnError::Skip | OnError::Escalate { .. } => {}
        }
        let item = s.foreach.as_ref().map(|f| f.var.as_str());
        if let Some(f) = &s.foreach
            && let ForeachSource::Lines(v) | ForeachSource::JsonArray(v) = &f.over
            && !ready(v.as_str())
        {
            return Err(format!(
                "{what}: foreach over `{v}`, which is not available to it"
            ));
        }
        let in_step = |v: &str| ready(v) || item == Some(v);
        resolved(s.tool.templates(), in_step, &what)?;
        for c in &s.validations {
            resolved(c.kind.templates(), in_step, &what)?;
            check_kind(&c.kind, &what)?;
        }
        if let Tool::Llm(call) = &s.tool {
            if call.max_tokens == 0 || u64::from(call.max_tokens) > MAX_MAX_TOKENS {
                return Err(format!(
                    "{what}: max_tokens is {}: expected 1 to {MAX_MAX_TOKENS}",
                    call.max_tokens
                ));
            }
            if !(0.0..=MAX_TEMPERATURE).contains(&call.temperature) {
                return Err(format!(
                    "{what}: temperature is {}: expected 0 to {MAX_TEMPERATURE}",
                    call.temperature
                ));
            }
            if !(call.top_p > 0.0 && call.top_p <= 1.0) {
                return Err(format!(
                    "{what}: top_p is {}: expected more than 0 and at most 1",
                    call.top_p
                ));
            }
            if let Some(schema) = &call.json_schema {
                json(schema, &what)?;
            }
            judgement(&call.judgement, call, s.number, &numbers, &what)?;
        }
    }
    Ok(())
}

/// Every step each step transitively waits for, given the trace's execution `order`.
fn ancestors(trace: &Trace, order: &[usize]) -> BTreeMap<u32, BTreeSet<u32>> {
    let prereq: BTreeMap<u32, Vec<u32>> = trace.prerequisites().into_iter().collect();
    let mut out: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    // Prerequisites come earlier in execution order, so one pass in that order suffices.
    for &i in order {
        let n = trace.steps[i].number;
        let mut set = BTreeSet::new();
        for d in prereq.get(&n).into_iter().flatten() {
            set.insert(*d);
            set.extend(out.get(d).into_iter().flatten().copied());
        }
        out.insert(n, set);
    }
    out
}

/// An LLM step's reference examples and thresholds: bounded counts, thresholds in 0..=1,
/// every example binding every variable of the prompt and system message, a fallback that
/// exists and is another step.
fn judgement(
    j: &crate::judgement::Judgement,
    call: &crate::trace::LlmCall,
    number: u32,
    numbers: &BTreeSet<u32>,
    what: &str,
) -> Result<(), String> {
    use crate::judgement::{Expect, MAX_EXAMPLES, OnUncertain};
    if j.examples.len() > MAX_EXAMPLES {
        return Err(format!(
            "{what}: {} examples: expected at most {MAX_EXAMPLES}",
            j.examples.len()
        ));
    }
    for (name, v) in [
        ("min_fidelity", Some(j.min_fidelity)),
        ("min_answer_confidence", j.min_answer_confidence),
    ] {
        if let Some(v) = v
            && !(0.0..=1.0).contains(&v)
        {
            return Err(format!("{what}: {name} is {v}: expected 0 to 1"));
        }
    }
    if j.min_answer_confidence.is_some() && call.grammar.is_none() && call.json_schema.is_none() {
        return Err(format!(
            "{what}: min_answer_confidence without a grammar or json_schema: expected a constrained answer"
        ));
    }
    if j.few_shot > 0 && usize::try_from(j.few_shot).unwrap_or(usize::MAX) >= j.examples.len() {
        return Err(format!(
            "{what}: few_shot is {} with {} examples: expected fewer than the examples",
            j.few_shot,
            j.examples.len()
        ));
    }
    let used = call.message_variables();
    for (i, e) in j.examples.iter().enumerate() {
        if let Some(v) = used.iter().find(|v| e.var(v).is_none()) {
            return Err(format!("{what}: example {} does not bind {{{v}}}", i + 1));
        }
        if matches!(e.expect, Expect::Fields(_)) != call.json_schema.is_some() {
            return Err(format!(
                "{what}: example {}: expected fields exactly when the step has a json_schema",
                i + 1
            ));
        }
    }
    if let OnUncertain::Fallback(f) = j.on_uncertain {
        fallback(Some(f), number, numbers, what)?;
    }
    Ok(())
}

fn fallback(
    step: Option<u32>,
    own: u32,
    numbers: &BTreeSet<u32>,
    what: &str,
) -> Result<(), String> {
    match step {
        Some(f) if f == own => Err(format!("{what} falls back to itself")),
        Some(f) if !numbers.contains(&f) => {
            Err(format!("{what}: fallback step {f} does not exist"))
        }
        _ => Ok(()),
    }
}

fn resolved(
    templates: Vec<&Template>,
    known: impl Fn(&str) -> bool,
    what: &str,
) -> Result<(), String> {
    for t in templates {
        for v in t.variables() {
            if !known(v) {
                return Err(format!("{what}: variable `{{{v}}}` is not available there"));
            }
        }
    }
    Ok(())
}

/// Regexes are not compiled here: compiling them cost more than the rest of decoding
/// together (the verify benchmark went from 43 to 228 µs a trace), and the follower compiles
/// each where it is used, with the same size limit, failing the check with the compiler's
/// message — never a panic.
fn check_kind(kind: &CheckKind, what: &str) -> Result<(), String> {
    match kind {
        CheckKind::JsonSchema { schema, .. } => json(schema, what),
        _ => Ok(()),
    }
}

fn json(text: &str, what: &str) -> Result<(), String> {
    // Parsed, not built: the follower hands it to llama.cpp's schema converter, which must
    // never see text that is not JSON.
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(drop)
        .map_err(|e| format!("{what}: JSON schema does not parse: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::compile::DecodeError;
    use crate::trace::{Dependency, OnError, Template, Tool, Trace};
    use crate::{compile_source, decode_compiled, encode_compiled};

    fn compiled() -> Trace {
        let src = "---\ntrace_id: t\nversion: \"1.0\"\ngoal_signature: g\n---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo hi\n```\n**Error Handling**:\n```yaml\non_error: {action: retry, retry_count: 2, delay_seconds: 1}\n```\n### Step 2: b\n**Tool Call**:\n```yaml\ntool: LLM\nparameters:\n  prompt: \"say {greeting}\"\n```\n**Dependencies**: Step 1 (output_variable: greeting)\n";
        compile_source("t.md", src).unwrap().0
    }

    /// The tampered trace is refused by the decoder with `expect` in the message.
    fn refused(change: impl FnOnce(&mut Trace), expect: &str) {
        let mut t = compiled();
        change(&mut t);
        match decode_compiled(&encode_compiled(&t)) {
            Err(DecodeError::Invariant(m)) => assert!(m.contains(expect), "{m}"),
            other => panic!("expected an invariant error with {expect:?}, found {other:?}"),
        }
    }

    #[test]
    fn what_the_compiler_emits_decodes() {
        let t = compiled();
        assert_eq!(decode_compiled(&encode_compiled(&t)).unwrap(), t);
    }

    #[test]
    fn a_tampered_compiled_trace_is_refused_at_decode_time_not_at_run_time() {
        // The hostile probe's case: one byte turned the retry delay negative, then it was
        // signed with a real key; `Duration::from_secs_f64` panicked mid-run on every resume.
        refused(
            |t| {
                t.steps[0].on_error = OnError::Retry {
                    retry_count: 2,
                    delay_secs: -1.0,
                    fallback_step: None,
                }
            },
            "retry delay is -1 s",
        );
        refused(
            |t| {
                t.steps[0].on_error = OnError::Retry {
                    retry_count: 2,
                    delay_secs: f64::NAN,
                    fallback_step: None,
                }
            },
            "retry delay is NaN",
        );
        refused(
            |t| {
                t.steps[1].dependencies = vec![Dependency {
                    step: 9,
                    output_variable: None,
                }]
            },
            "missing step or form a cycle",
        );
        refused(
            |t| t.steps[1].dependencies[0].step = 2,
            "missing step or form a cycle",
        );
        refused(|t| t.steps[0].timeout_secs = 0, "timeout_secs is 0");
        refused(|t| t.steps[1].number = 1, "strictly ascending");
        refused(|t| t.steps.clear(), "no steps");
        refused(|t| t.max_parallel = 0, "max_parallel");
        refused(|t| t.confidence = 7.0, "confidence is 7");
        refused(
            |t| t.steps[0].on_error = OnError::Fallback { step: 1 },
            "falls back to itself",
        );
        refused(
            |t| {
                t.steps[0].tool = Tool::Bash {
                    command: Template("echo {greeting}".into()),
                }
            },
            "variable `{greeting}`",
        );
        refused(
            |t| {
                if let Tool::Llm(c) = &mut t.steps[1].tool {
                    c.max_tokens = 1 << 30;
                }
            },
            "max_tokens",
        );
        refused(|t| t.read_paths = vec!["/var/../etc".into()], "read path");
    }
}
