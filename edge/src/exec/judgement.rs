//! Judgement steps: the request an LLM step makes (few-shot turns from its reference
//! examples included), the fidelity of the device's model on the step's scored examples, and
//! the gate that keeps a step whose model disagrees with its reference answers from running
//! unattended. Rules in [`tracefleet::judgement`].

use super::{GenerateRequest, Host};
use std::time::Duration;
use tracefleet::judgement::{Example, Expect, Fidelity, MAX_DISAGREEMENTS_KEPT, OnUncertain};
use tracefleet::report::LlmUsage;
use tracefleet::trace::{LlmCall, Step, Tool};

/// The generation request of `call` with its variables looked up by `lookup`; the step's
/// few-shot examples become prior turns (an example expecting a pattern has no answer to show
/// and is left out).
///
/// # Errors
/// The name of a variable `lookup` does not know.
pub fn request<'v>(
    call: &LlmCall,
    lookup: impl Fn(&str) -> Option<&'v str> + Copy,
    timeout: Duration,
) -> Result<GenerateRequest, String> {
    let mut shots = Vec::new();
    for e in call.judgement.shots() {
        if matches!(e.expect, Expect::Regex(_)) {
            continue;
        }
        let user = call.prompt.render(|v| e.var(v))?;
        shots.push((user, e.expect.label().to_owned()));
    }
    Ok(GenerateRequest {
        model: call.model.clone(),
        system: call.system.as_ref().map(|s| s.render(lookup)).transpose()?,
        prompt: call.prompt.render(lookup)?,
        shots,
        max_tokens: call.max_tokens,
        temperature: call.temperature,
        top_p: call.top_p,
        seed: call.seed,
        grammar: call.grammar.clone(),
        json_schema: call.json_schema.clone(),
        stop: call.stop.clone(),
        timeout,
    })
}

/// The model's answer to one example and its figures.
pub struct Answer {
    /// The generated text.
    pub text: String,
    /// Whether it agrees with the example's expectation.
    pub agrees: bool,
    /// Accounting, confidence included.
    pub usage: LlmUsage,
}

/// Answers `example` with `call` through `host`.
///
/// # Errors
/// The host's generation error, or an unbound variable.
pub fn answer(
    call: &LlmCall,
    example: &Example,
    host: &mut dyn Host,
    timeout: Duration,
) -> Result<Answer, String> {
    let request = request(call, |v| example.var(v), timeout)?;
    let g = host.generate(&request)?;
    Ok(Answer {
        agrees: example.expect.agrees(&g.text),
        text: g.text,
        usage: g.usage,
    })
}

/// A fidelity measurement and the tokens it took.
pub struct Measured {
    /// The figures.
    pub fidelity: Fidelity,
    /// Prompt tokens over every example.
    pub prompt_tokens: u64,
    /// Generated tokens over every example.
    pub completion_tokens: u64,
}

/// Measures the fidelity of the host's model on `step`'s scored examples. A generation that
/// fails counts as a disagreement (its error as the answer). `None` for a step without scored
/// examples.
pub fn measure(step: &Step, host: &mut dyn Host) -> Option<Measured> {
    let Tool::Llm(call) = &step.tool else {
        return None;
    };
    let scored = call.judgement.scored();
    if scored.is_empty() {
        return None;
    }
    let timeout = Duration::from_secs(u64::from(step.timeout_secs));
    let mut model = call.model.clone().unwrap_or_default();
    let (mut agreements, mut disagreements) = (0u32, Vec::new());
    let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
    for (i, e) in scored.iter().enumerate() {
        let (agrees, text) = match answer(call, e, host, timeout) {
            Ok(a) => {
                model.clone_from(&a.usage.model);
                prompt_tokens += u64::from(a.usage.prompt_tokens);
                completion_tokens += u64::from(a.usage.completion_tokens);
                (a.agrees, a.text)
            }
            Err(err) => (false, format!("(no answer: {err})")),
        };
        if agrees {
            agreements += 1;
        } else if disagreements.len() < MAX_DISAGREEMENTS_KEPT {
            disagreements.push((u32::try_from(i).unwrap_or(u32::MAX), text));
        }
    }
    Some(Measured {
        fidelity: Fidelity {
            step: step.number,
            model,
            agreements,
            total: u32::try_from(scored.len()).unwrap_or(u32::MAX),
            min_fidelity: call.judgement.min_fidelity,
            disagreements,
        },
        prompt_tokens,
        completion_tokens,
    })
}

/// Why an LLM step's answer was not used, and what runs instead.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Refusal {
    /// The run escalates with this message.
    Escalate(String),
    /// This step runs in place of the refused one.
    Fallback(u32),
}

/// Whether the answer `usage` describes is uncertain for `call`: under its
/// `min_answer_confidence`, or without a confidence to compare.
pub(super) fn uncertain(call: &LlmCall, usage: &LlmUsage) -> Option<String> {
    let min = call.judgement.min_answer_confidence?;
    match usage.answer_confidence {
        // Compared at the threshold's own precision (f32): 0.6 is not under 0.6.
        #[allow(clippy::cast_possible_truncation)]
        Some(c) if (c as f32) >= min => None,
        Some(c) => Some(format!(
            "the model's answer has confidence {c:.2}, under the step's min_answer_confidence {min:.2}"
        )),
        None => Some(format!(
            "the model's answer has no confidence to compare with the step's min_answer_confidence {min:.2}"
        )),
    }
}

/// What an uncertain answer of `call` does (the step's error says why).
pub(super) fn on_uncertain(call: &LlmCall) -> Option<Refusal> {
    match call.judgement.on_uncertain {
        OnUncertain::Accept => None,
        OnUncertain::Escalate => Some(Refusal::Escalate(
            "the model's answer is uncertain (under the step's min_answer_confidence)".into(),
        )),
        OnUncertain::Fallback(n) => Some(Refusal::Fallback(n)),
    }
}
