//! Judgement you can measure: an LLM step's reference examples (the answers the learner's
//! model gave, or an author wrote), how a device model's answer is compared with them, and the
//! figures that say how well a model repeats them.
//!
//! - **Fidelity** of a (trace version, step, model): the share of the step's scored reference
//!   examples the model answers the same way ([`Expect::agrees`]). Below the step's
//!   `min_fidelity` the step does not run unattended.
//! - **Answer confidence**: for a constrained answer (GBNF grammar or JSON Schema), the
//!   probability the model gave the whole answer once the grammar masked the vocabulary — the
//!   product of the chosen tokens' probabilities, each a softmax at temperature 1 over the
//!   tokens the grammar allows at that point (the sequence probability under the constrained
//!   distribution; for an enum grammar, the probability mass of the chosen alternative along
//!   the path the model took — a lower bound when one alternative has several tokenizations).
//!   Computed on the device by the inference thread; an answer under `min_answer_confidence`
//!   is *uncertain* and handled by `on_uncertain`. The use of the model's own answer
//!   probability as its confidence follows Kadavath et al., "Language Models (Mostly) Know What
//!   They Know" (2022); answering only above a threshold is selective prediction (Geifman and
//!   El-Yaniv, "Selective Classification for Deep Neural Networks", 2017).
//! - [`Scores`]: accuracy, coverage, selective accuracy, macro-F1, the confusion matrix and
//!   the expected calibration error (10 equal-width bins, Naeini et al. 2015 as used by Guo et
//!   al., "On Calibration of Modern Neural Networks", 2017) of a labelled set.

use crate::ids::VarName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default `min_fidelity` of a step that has examples.
pub const DEFAULT_MIN_FIDELITY: f32 = 0.8;
/// Most reference examples one step may carry (each costs one generation per model change).
pub const MAX_EXAMPLES: usize = 200;

/// A step's reference examples and what it does with uncertain answers (all empty / default
/// for a step without them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Judgement {
    /// Reference examples: the first `few_shot` go into the prompt, the rest are scored.
    pub examples: Vec<Example>,
    /// Fidelity below which the step is not run unattended (0..=1; meaningful with scored
    /// examples).
    pub min_fidelity: f32,
    /// Answers whose confidence is lower are uncertain (0..=1); `None`: never.
    pub min_answer_confidence: Option<f32>,
    /// What an uncertain answer does.
    pub on_uncertain: OnUncertain,
    /// How many of the examples are put into the prompt as prior turns.
    pub few_shot: u32,
}

impl Judgement {
    /// The examples put into the prompt (the first `few_shot`).
    pub fn shots(&self) -> &[Example] {
        let k = usize::try_from(self.few_shot)
            .unwrap_or(usize::MAX)
            .min(self.examples.len());
        &self.examples[..k]
    }

    /// The examples fidelity is measured on: every example not used in the prompt.
    pub fn scored(&self) -> &[Example] {
        &self.examples[self.shots().len()..]
    }
}

/// One reference example: the step's variables and the answer expected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Values of the variables the step's prompt and system message use, sorted by name.
    pub vars: Vec<(VarName, String)>,
    /// The answer expected.
    pub expect: Expect,
}

impl Example {
    /// The value bound to `name`, if any.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The answer an example expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Expect {
    /// The answer, equal after trimming whitespace at both ends.
    Text(String),
    /// A regular expression (Rust `regex` syntax) the trimmed answer must match.
    Regex(String),
    /// For a `json_schema` step: a JSON object (as JSON text); the answer agrees when it is a
    /// JSON object holding every field given here with an equal value (fields not given are
    /// not compared).
    Fields(String),
}

impl Expect {
    /// Whether `answer` agrees with this expectation. An unusable regular expression or JSON
    /// text (refused by the compiler, so only in a foreign trace) agrees with nothing.
    pub fn agrees(&self, answer: &str) -> bool {
        let answer = answer.trim();
        match self {
            Expect::Text(t) => answer == t.trim(),
            Expect::Regex(r) => regex::RegexBuilder::new(r)
                .size_limit(1 << 20)
                .build()
                .is_ok_and(|re| re.is_match(answer)),
            Expect::Fields(json) => {
                let (Ok(serde_json::Value::Object(want)), Ok(serde_json::Value::Object(got))) = (
                    serde_json::from_str::<serde_json::Value>(json),
                    serde_json::from_str::<serde_json::Value>(answer),
                ) else {
                    return false;
                };
                want.iter().all(|(k, v)| got.get(k) == Some(v))
            }
        }
    }

    /// The expected answer as a label (for confusion matrices and few-shot prompts): the text,
    /// the pattern, or the JSON.
    pub fn label(&self) -> &str {
        match self {
            Expect::Text(t) => t.trim(),
            Expect::Regex(r) | Expect::Fields(r) => r,
        }
    }
}

/// What an answer under `min_answer_confidence` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum OnUncertain {
    /// The run stops before using the answer and asks a person (the default).
    #[default]
    Escalate,
    /// The answer is used, marked uncertain in the report.
    Accept,
    /// This step (number) runs in place of the uncertain one.
    Fallback(u32),
}

impl OnUncertain {
    /// The step this policy may run in place of an uncertain answer, if any.
    pub fn fallback_step(self) -> Option<u32> {
        match self {
            OnUncertain::Fallback(n) => Some(n),
            OnUncertain::Escalate | OnUncertain::Accept => None,
        }
    }
}

/// A device model's fidelity on one step: how many of the scored examples it agreed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// The step.
    pub step: u32,
    /// The model's name (registry name).
    pub model: String,
    /// Examples answered as expected.
    pub agreements: u32,
    /// Examples scored.
    pub total: u32,
    /// The step's `min_fidelity`.
    pub min_fidelity: f32,
    /// The first disagreements (index into the scored examples, the model's answer), at most
    /// [`MAX_DISAGREEMENTS_KEPT`].
    #[serde(default)]
    pub disagreements: Vec<(u32, String)>,
}

/// Disagreements kept per fidelity record (for the learner's regeneration prompt).
pub const MAX_DISAGREEMENTS_KEPT: usize = 20;

/// agreements / total (1.0 for no scored examples).
pub fn fidelity_ratio(agreements: u32, total: u32) -> f64 {
    if total == 0 {
        1.0
    } else {
        f64::from(agreements) / f64::from(total)
    }
}

/// Whether a fidelity `ratio` reaches `min_fidelity` (equality passes; a minimum stored as
/// an `f32` is compared within its precision).
pub fn fidelity_passes(ratio: f64, min_fidelity: f64) -> bool {
    ratio + 1e-6 >= min_fidelity
}

impl Fidelity {
    /// agreements / total (1.0 for no scored examples).
    pub fn ratio(&self) -> f64 {
        fidelity_ratio(self.agreements, self.total)
    }

    /// Whether the step may run unattended with this model ([`fidelity_passes`]).
    pub fn passes(&self) -> bool {
        fidelity_passes(self.ratio(), f64::from(self.min_fidelity))
    }

    /// "9/20 (0.45)".
    pub fn short(&self) -> String {
        format!("{}/{} ({:.2})", self.agreements, self.total, self.ratio())
    }

    /// The escalation reason when the step may not run.
    pub fn refusal(&self) -> String {
        format!(
            "model {} agrees with {} of {} reference answers of step {} ({:.2} < {:.2}): the step is not run unattended",
            self.model,
            self.agreements,
            self.total,
            self.step,
            self.ratio(),
            self.min_fidelity
        )
    }
}

/// One scored item of a labelled set.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The label expected.
    pub expected: String,
    /// The model's (trimmed) answer.
    pub answer: String,
    /// Whether the answer agrees with the expectation.
    pub correct: bool,
    /// The answer's confidence (0..=1), when the step is constrained.
    pub confidence: Option<f64>,
}

/// The figures of a labelled set at one confidence threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    /// Items scored.
    pub items: usize,
    /// Items answered (confidence at or above the threshold; every item without one).
    pub answered: usize,
    /// answered / items.
    pub coverage: f64,
    /// Correct answered items / items (an uncertain item counts as not correct).
    pub accuracy: f64,
    /// Correct answered items / answered items (0 when none answered).
    pub selective_accuracy: f64,
    /// The share of the most frequent expected label: the majority-class baseline accuracy.
    pub majority_baseline: f64,
    /// Macro-averaged F1 over the expected labels (answers counted as given, uncertain or not).
    pub macro_f1: f64,
    /// Expected calibration error over 10 equal-width confidence bins (items with a
    /// confidence only); `None` when no item has one.
    pub ece: Option<f64>,
    /// Confusion counts: expected label → answer → count.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
    /// The threshold applied (`None`: every item answered).
    pub threshold: Option<f64>,
}

impl Scores {
    /// Scores `items` at `threshold`.
    pub fn compute(items: &[Scored], threshold: Option<f64>) -> Scores {
        let n = items.len();
        let is_answered = |s: &Scored| match (threshold, s.confidence) {
            (Some(t), Some(c)) => c >= t,
            _ => true,
        };
        let answered = items.iter().filter(|s| is_answered(s)).count();
        let correct_answered = items.iter().filter(|s| is_answered(s) && s.correct).count();
        let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for s in items {
            *confusion
                .entry(s.expected.clone())
                .or_default()
                .entry(s.answer.clone())
                .or_default() += 1;
        }
        let majority = confusion
            .values()
            .map(|row| row.values().sum::<usize>())
            .max()
            .unwrap_or(0);
        Scores {
            items: n,
            answered,
            coverage: ratio(answered, n),
            accuracy: ratio(correct_answered, n),
            selective_accuracy: ratio(correct_answered, answered),
            majority_baseline: ratio(majority, n),
            macro_f1: macro_f1(items),
            ece: expected_calibration_error(items, 10),
            confusion,
            threshold,
        }
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// F1 per expected label (true positive: expected and answered that label and correct),
/// averaged with equal weight.
fn macro_f1(items: &[Scored]) -> f64 {
    let labels: std::collections::BTreeSet<&str> =
        items.iter().map(|s| s.expected.as_str()).collect();
    if labels.is_empty() {
        return 0.0;
    }
    let mut sum = 0.0;
    for label in &labels {
        let tp = items
            .iter()
            .filter(|s| s.expected == *label && s.correct)
            .count();
        let predicted = items
            .iter()
            .filter(|s| (s.correct && s.expected == *label) || (!s.correct && s.answer == *label))
            .count();
        let actual = items.iter().filter(|s| s.expected == *label).count();
        let precision = ratio(tp, predicted);
        let recall = ratio(tp, actual);
        if precision + recall > 0.0 {
            sum += 2.0 * precision * recall / (precision + recall);
        }
    }
    sum / labels.len() as f64
}

/// ECE = Σ_b (|b| / n) · |accuracy(b) − mean confidence(b)| over `bins` equal-width bins of
/// [0, 1] (a confidence of exactly 1 falls in the last bin).
fn expected_calibration_error(items: &[Scored], bins: usize) -> Option<f64> {
    let with: Vec<(f64, bool)> = items
        .iter()
        .filter_map(|s| s.confidence.map(|c| (c.clamp(0.0, 1.0), s.correct)))
        .collect();
    if with.is_empty() {
        return None;
    }
    let mut count = vec![0usize; bins];
    let mut conf_sum = vec![0.0f64; bins];
    let mut correct = vec![0usize; bins];
    for &(c, ok) in &with {
        let b = ((c * bins as f64) as usize).min(bins - 1);
        count[b] += 1;
        conf_sum[b] += c;
        correct[b] += usize::from(ok);
    }
    let n = with.len() as f64;
    Some(
        (0..bins)
            .filter(|&b| count[b] > 0)
            .map(|b| {
                let k = count[b] as f64;
                (k / n) * (correct[b] as f64 / k - conf_sum[b] / k).abs()
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests;
