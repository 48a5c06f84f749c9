//! Tests of the bold-field forms, the LLMunix deployment guide's example among them.

#![allow(clippy::unwrap_used)]
use crate::diag::Severity;
use crate::trace::Tool;

/// The example trace of LLMunix's Dual-Mode Deployment Guide, as it is written there.
const GUIDE: &str = "# Execution Trace: research-ai-trends-v1.0

**Trace ID:** research-ai-trends-v1.0
**Goal Signature:** research AI trends and generate report
**Confidence:** 0.95
**Estimated Cost:** 0.15
**Estimated Time (seconds):** 120
**Success Rate:** 0.94
**Usage Count:** 17

---

## Step 1: Fetch AI news from TechCrunch

**Description:** Fetch AI news from TechCrunch

**Tool Call:**
- **Tool:** WebFetch
- **Parameters:**
  - **URL:** https://techcrunch.com/category/artificial-intelligence/
  - **Prompt:** Extract top 5 AI trends

**Validation:**
- **Check:** Response contains AI topics
- **Type:** content_contains
- **Parameters:**
  - **Substring:** AI
";

#[test]
fn the_deployment_guides_example_compiles_with_its_version_from_the_id() {
    let (trace, diags) =
        crate::compile_source("guide.md", GUIDE).unwrap_or_else(|d| panic!("{}", d.render(GUIDE)));
    assert_eq!(trace.id.as_str(), "research-ai-trends-v1.0");
    assert_eq!(trace.version.to_string(), "1.0.0");
    assert_eq!(trace.steps.len(), 1);
    match &trace.steps[0].tool {
        Tool::WebFetch { url, prompt } => {
            assert_eq!(
                url.0,
                "https://techcrunch.com/category/artificial-intelligence/"
            );
            assert_eq!(prompt.as_ref().unwrap().0, "Extract top 5 AI trends");
        }
        other => panic!("expected WebFetch, found {other:?}"),
    }
    assert_eq!(trace.steps[0].validations.len(), 1);
    let notes: Vec<_> = diags
        .iter()
        .filter(|d| d.severity == Severity::Note)
        .collect();
    assert_eq!(notes.len(), 1, "{diags:?}");
    assert!(notes[0].message.contains("version 1.0.0"), "{}", notes[0]);
    assert!(
        diags.iter().all(|d| d.severity == Severity::Note),
        "{diags:?}"
    );
}

#[test]
fn prose_fields_of_the_guide_are_warned_about_never_errors() {
    let text = GUIDE.replace(
        "**Usage Count:** 17\n",
        "**Usage Count:** 17\n\n**Confidence Evolution:** 0.75 → 0.95 over 17 runs\n",
    );
    let (_, diags) =
        crate::compile_source("guide.md", &text).unwrap_or_else(|d| panic!("{}", d.render(&text)));
    let warning = diags
        .iter()
        .find(|d| d.severity == Severity::Warning)
        .unwrap();
    assert!(
        warning.message.contains("**Confidence Evolution:**"),
        "{warning}"
    );
    assert_eq!(warning.line, 11);
    let note = diags.iter().find(|d| d.severity == Severity::Note).unwrap();
    assert_eq!(note.line, 3, "the note points at the trace id: {note}");
}

#[test]
fn a_missing_version_names_the_bold_field_form_not_a_frontmatter() {
    let text = GUIDE.replace(
        "research-ai-trends-v1.0\n**Goal",
        "research-ai-trends\n**Goal",
    );
    let err = crate::compile_source("guide.md", &text).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("**Version:**"), "{msg}");
    assert!(!msg.contains("frontmatter"), "{msg}");
}

#[test]
fn parameter_names_match_without_regard_to_case_and_spaces() {
    let text = "**Trace ID:** t\n**Version:** 1.0.0\n**Goal:** g\n\n## Step 1: w\n\n**Tool Call:**\n- **Tool:** Write\n- **Parameters:**\n  - **File Path:** out.txt\n  - **CONTENT:** hello\n";
    let (trace, _) =
        crate::compile_source("t.md", text).unwrap_or_else(|d| panic!("{}", d.render(text)));
    match &trace.steps[0].tool {
        Tool::Write { file_path, content } => {
            assert_eq!(file_path.0, "out.txt");
            assert_eq!(content.0, "hello");
        }
        other => panic!("expected Write, found {other:?}"),
    }
}
