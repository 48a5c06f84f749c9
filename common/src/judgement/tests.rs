//! Tests of the agreement rule and of the figures, against a set computed by hand.

use super::*;

fn item(expected: &str, answer: &str, confidence: f64) -> Scored {
    Scored {
        expected: expected.into(),
        answer: answer.into(),
        correct: expected == answer,
        confidence: Some(confidence),
    }
}

/// Five items computed by hand (see each figure's comment).
fn hand_set() -> Vec<Scored> {
    vec![
        item("a", "a", 0.9),
        item("a", "b", 0.6),
        item("b", "b", 0.8),
        item("b", "b", 0.3),
        item("a", "a", 0.95),
    ]
}

#[test]
fn figures_match_a_set_computed_by_hand() {
    let s = Scores::compute(&hand_set(), Some(0.5));
    assert_eq!(s.items, 5);
    // 0.3 is under the threshold: four answered.
    assert_eq!(s.answered, 4);
    assert!((s.coverage - 0.8).abs() < 1e-12);
    // Correct and answered: items 1, 3, 5 → 3 of 5 items, 3 of 4 answered.
    assert!((s.accuracy - 0.6).abs() < 1e-12);
    assert!((s.selective_accuracy - 0.75).abs() < 1e-12);
    // "a" is expected 3 times of 5.
    assert!((s.majority_baseline - 0.6).abs() < 1e-12);
    // a: P = 2/2, R = 2/3 → 0.8; b: P = 2/3, R = 2/2 → 0.8.
    assert!((s.macro_f1 - 0.8).abs() < 1e-12, "{}", s.macro_f1);
    // Bins: 9 {0.9 ✓, 0.95 ✓} → 2/5·|1−0.925| = 0.03; 6 {0.6 ✗} → 0.12; 8 {0.8 ✓} → 0.04;
    // 3 {0.3 ✓} → 0.14. Sum 0.33.
    assert!((s.ece.unwrap() - 0.33).abs() < 1e-12, "{:?}", s.ece);
    assert_eq!(s.confusion["a"]["b"], 1);
    assert_eq!(s.confusion["a"]["a"], 2);
    assert_eq!(s.confusion["b"]["b"], 2);
}

#[test]
fn without_a_threshold_every_item_is_answered() {
    let s = Scores::compute(&hand_set(), None);
    assert_eq!(s.answered, 5);
    assert!((s.accuracy - 0.8).abs() < 1e-12);
    assert!((s.selective_accuracy - 0.8).abs() < 1e-12);
    let empty = Scores::compute(&[], Some(0.5));
    assert_eq!((empty.items, empty.answered), (0, 0));
    assert_eq!(empty.selective_accuracy, 0.0);
    assert_eq!(empty.ece, None);
}

#[test]
fn a_confidence_of_one_falls_in_the_last_bin() {
    let s = Scores::compute(&[item("a", "a", 1.0), item("a", "b", 1.0)], None);
    // One bin: accuracy 0.5, confidence 1.0.
    assert!((s.ece.unwrap() - 0.5).abs() < 1e-12);
}

#[test]
fn agreement_rules() {
    assert!(Expect::Text("tcp".into()).agrees("  tcp\n"));
    assert!(!Expect::Text("tcp".into()).agrees("tcp/udp"));
    assert!(Expect::Regex("^(low|medium)$".into()).agrees("medium"));
    assert!(!Expect::Regex("^(low|medium)$".into()).agrees("high"));
    // Bad pattern: agrees with nothing rather than panicking.
    assert!(!Expect::Regex("(".into()).agrees("("));
    let fields = Expect::Fields(r#"{"risk":"low"}"#.into());
    assert!(fields.agrees(r#"{"risk": "low", "summary": "anything"}"#));
    assert!(!fields.agrees(r#"{"risk": "high", "summary": "low"}"#));
    assert!(!fields.agrees("low"));
    assert!(!fields.agrees(r#"["risk","low"]"#));
}

#[test]
fn shots_come_first_and_are_never_scored() {
    let ex = |e: &str| Example {
        vars: vec![],
        expect: Expect::Text(e.into()),
    };
    let mut j = Judgement {
        examples: vec![ex("1"), ex("2"), ex("3")],
        few_shot: 1,
        ..Judgement::default()
    };
    assert_eq!(j.shots(), &[ex("1")]);
    assert_eq!(j.scored(), &[ex("2"), ex("3")]);
    j.few_shot = 10;
    assert_eq!(j.shots().len(), 3);
    assert!(j.scored().is_empty());
}

#[test]
fn fidelity_passes_at_the_threshold_and_names_the_figures_when_it_does_not() {
    let f = Fidelity {
        step: 2,
        model: "SmolLM2-135M-Instruct.Q4_1".into(),
        agreements: 9,
        total: 20,
        min_fidelity: 0.8,
        disagreements: vec![],
    };
    assert!(!f.passes());
    assert_eq!(
        f.refusal(),
        "model SmolLM2-135M-Instruct.Q4_1 agrees with 9 of 20 reference answers of step 2 (0.45 < 0.80): the step is not run unattended"
    );
    let at = Fidelity {
        agreements: 16,
        ..f.clone()
    };
    assert!(at.passes());
    assert_eq!(at.short(), "16/20 (0.80)");
}
