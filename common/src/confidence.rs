//! Confidence and goal matching: the LLMunix rules, shared by the follower (per device) and the
//! learner (fleet-wide).
//!
//! Confidence of a trace version starts at [`INITIAL_CONFIDENCE`]; a success moves it a tenth of
//! the way to 1 (`c += (1 − c) × 0.1`), a failure multiplies it by 0.7. A follower runs a trace
//! on its own only when confidence ≥ [`AUTONOMY_CONFIDENCE`] and success rate >
//! [`AUTONOMY_SUCCESS_RATE`]; otherwise it escalates.

use std::collections::BTreeSet;

/// Confidence of a trace version never run on this device or fleet.
pub const INITIAL_CONFIDENCE: f64 = 0.75;
/// Confidence needed to run without asking.
pub const AUTONOMY_CONFIDENCE: f64 = 0.9;
/// Success rate that must be exceeded to run without asking.
pub const AUTONOMY_SUCCESS_RATE: f64 = 0.85;

/// The confidence after one more run.
pub fn update(confidence: f64, success: bool) -> f64 {
    let c = confidence.clamp(0.0, 1.0);
    if success {
        c + (1.0 - c) * 0.1
    } else {
        c * 0.7
    }
}

/// Highest fleet confidence of a version whose judgement most devices do not repeat (see
/// [`with_fidelity`]): below [`AUTONOMY_CONFIDENCE`].
pub const LOW_FIDELITY_CAP: f64 = 0.85;

/// Fleet confidence with judgement fidelity taken into account: when most of the devices that
/// reported fidelity for a version (`failing_devices` of `reporting_devices`) have a judgement
/// step below its `min_fidelity`, the confidence is held at most [`LOW_FIDELITY_CAP`], so the
/// version cannot reach follower mode on runs whose judgement does not match its reference
/// answers, however many of them passed their form checks. Otherwise unchanged.
pub fn with_fidelity(confidence: f64, failing_devices: u64, reporting_devices: u64) -> f64 {
    if failing_devices * 2 > reporting_devices {
        confidence.min(LOW_FIDELITY_CAP)
    } else {
        confidence
    }
}

/// Usage statistics of one trace version.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Runs recorded.
    pub usage_count: u64,
    /// Runs that succeeded.
    pub success_count: u64,
    /// Current confidence (0..=1).
    pub confidence: f64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            usage_count: 0,
            success_count: 0,
            confidence: INITIAL_CONFIDENCE,
        }
    }
}

impl Stats {
    /// After one more run.
    pub fn record(self, success: bool) -> Self {
        Self {
            usage_count: self.usage_count + 1,
            success_count: self.success_count + u64::from(success),
            confidence: update(self.confidence, success),
        }
    }

    /// Successes over runs (0 before the first run).
    pub fn success_rate(&self) -> f64 {
        if self.usage_count == 0 {
            0.0
        } else {
            self.success_count as f64 / self.usage_count as f64
        }
    }

    /// Why the follower may not run this trace on its own, if it may not.
    pub fn autonomy_refusal(&self) -> Option<String> {
        if self.confidence >= AUTONOMY_CONFIDENCE && self.success_rate() > AUTONOMY_SUCCESS_RATE {
            return None;
        }
        Some(format!(
            "confidence {:.3} (needs ≥ {AUTONOMY_CONFIDENCE}) and success rate {:.3} over {} run(s) (needs > {AUTONOMY_SUCCESS_RATE})",
            self.confidence,
            self.success_rate(),
            self.usage_count
        ))
    }
}

const STOPWORDS: &[&str] = &[
    "a", "an", "and", "as", "at", "by", "for", "from", "in", "into", "is", "it", "of", "on", "or",
    "the", "then", "to", "with",
];

/// The goal signature of free text: lower-case alphanumeric words without stop words, as a set.
pub fn goal_words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| !w.is_empty() && !STOPWORDS.contains(&w.as_str()))
        .collect()
}

/// How well `query` matches a trace's goal signature: the Jaccard similarity of their word
/// sets (0 = nothing shared, 1 = the same words).
pub fn goal_similarity(query: &str, goal_signature: &str) -> f64 {
    let (a, b) = (goal_words(query), goal_words(goal_signature));
    let union = a.union(&b).count();
    if union == 0 {
        0.0
    } else {
        a.intersection(&b).count() as f64 / union as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_fidelity_on_most_devices_holds_confidence_under_autonomy() {
        assert_eq!(with_fidelity(0.95, 2, 3), LOW_FIDELITY_CAP);
        assert!(with_fidelity(0.95, 2, 3) < AUTONOMY_CONFIDENCE);
        // Half is not most; nobody reporting is nothing to hold against it.
        assert_eq!(with_fidelity(0.95, 1, 2), 0.95);
        assert_eq!(with_fidelity(0.95, 0, 0), 0.95);
        // A lower confidence is left as it is.
        assert_eq!(with_fidelity(0.5, 3, 3), 0.5);
    }

    #[test]
    fn the_llmunix_rule() {
        assert!((update(0.75, true) - 0.775).abs() < 1e-12);
        assert!((update(0.75, false) - 0.525).abs() < 1e-12);
        // Nine successes from a fresh start earn autonomy, eight do not.
        let mut s = Stats::default();
        for _ in 0..8 {
            s = s.record(true);
        }
        assert!(s.autonomy_refusal().is_some(), "{s:?}");
        s = s.record(true);
        assert!(s.autonomy_refusal().is_none(), "{s:?}");
        // One failure costs it again.
        assert!(s.record(false).autonomy_refusal().is_some());
    }

    #[test]
    fn goal_matching() {
        let g = "triage the package manager log: count actions, sample recent changes";
        assert!(
            goal_similarity("triage the dpkg package log", g)
                > goal_similarity("audit services", g)
        );
        assert_eq!(goal_similarity("", g), 0.0);
        assert!((goal_similarity("Count the ACTIONS", "count actions") - 1.0).abs() < 1e-12);
    }
}
