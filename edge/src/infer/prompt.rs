//! The text a model is given: the prompt through the model's chat template (few-shot turns
//! included) or, for a base model without one, as completion text; special-token texts in
//! user content neutralised; the answer's probabilities under the grammar's mask.

use super::{InferError, llama_err};
use crate::effects::GenerateRequest;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::token_type::LlamaTokenAttr;

/// The texts of the model's control and user-defined tokens (`<|im_start|>`, …), longest first.
pub(super) fn special_token_texts(model: &LlamaModel) -> Vec<String> {
    let vocab = model.vocab();
    let mut out: Vec<String> = vocab
        .tokens()
        .filter(|&t| {
            let a = vocab.attr(t);
            a.contains(LlamaTokenAttr::Control) || a.contains(LlamaTokenAttr::UserDefined)
        })
        .filter_map(|t| {
            vocab
                .text(t)
                .and_then(|c| c.to_str().ok())
                .map(str::to_owned)
        })
        .filter(|t| t.chars().count() >= 2)
        .collect();
    out.sort_by_key(|t| std::cmp::Reverse(t.len()));
    out.dedup();
    out
}

/// Probabilities of the candidates at temperature 1, softmax over the finite logits (those
/// the grammar masked are −∞ and get 0), in candidate order.
pub(super) fn masked_softmax(logits: impl Iterator<Item = f32> + Clone) -> Vec<f64> {
    let max = logits
        .clone()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return logits.map(|_| 0.0).collect();
    }
    let exps: Vec<f64> = logits
        .map(|l| {
            if l.is_finite() {
                f64::from(l - max).exp()
            } else {
                0.0
            }
        })
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The prompt text: through the model's own chat template (GGUF `tokenizer.chat_template`) as
/// system, few-shot user/assistant turns, then the user message; for a model without one (a
/// base model) in completion mode: the system text, each shot as its prompt immediately
/// followed by its answer and a blank line, then the prompt — the model continues it.
pub(super) fn build_prompt(
    model: &LlamaModel,
    specials: &[String],
    req: &GenerateRequest,
) -> Result<String, InferError> {
    let Ok(template) = model.chat_template(None) else {
        let mut text = String::new();
        if let Some(system) = &req.system {
            text.push_str(&neutralise_specials(system, specials));
            text.push_str("\n\n");
        }
        for (user, answer) in &req.shots {
            text.push_str(&neutralise_specials(user, specials));
            text.push_str(&neutralise_specials(answer, specials));
            text.push_str("\n\n");
        }
        text.push_str(&neutralise_specials(&req.prompt, specials));
        return Ok(text);
    };
    let message = |role: &str, content: &str| {
        LlamaChatMessage::new(role.into(), neutralise_specials(content, specials))
            .map_err(|e| llama_err("a chat message")(&e))
    };
    let mut messages = Vec::new();
    if let Some(system) = &req.system {
        messages.push(message("system", system)?);
    }
    for (user, answer) in &req.shots {
        messages.push(message("user", user)?);
        messages.push(message("assistant", answer)?);
    }
    messages.push(message("user", &req.prompt)?);
    model
        .apply_chat_template(&template, &messages, true)
        .map_err(|e| llama_err("applying the chat template")(&e))
}

/// Neutralises special-token text inside message content by inserting a zero-width space
/// after its first character, so data (a log line, a model's earlier output) can never become
/// control tokens when the templated prompt is tokenised with special-token parsing.
pub(super) fn neutralise_specials(content: &str, specials: &[String]) -> String {
    let mut out = content.to_owned();
    for s in specials {
        if out.contains(s.as_str()) {
            let first = s.chars().next().map_or(0, char::len_utf8);
            let replacement = format!("{}\u{200b}{}", &s[..first], &s[first..]);
            out = out.replace(s.as_str(), &replacement);
        }
    }
    out
}
