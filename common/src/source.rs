//! The trace source: Markdown with YAML frontmatter, in the LLMunix execution-trace format.
//!
//! ~~~text
//! ---
//! trace_id: dpkg-log-triage          # YAML frontmatter
//! version: "1.0.0"
//! ...
//! ---
//! # Title
//! ### Step 1: Count package actions
//! **Tool Call**:
//! ```yaml
//! tool: Bash
//! parameters: { command: "..." }
//! ```
//! **Validation**:        (a fenced YAML list)
//! **Error Handling**:    (a fenced YAML block, `on_error: {...}`)
//! **Dependencies**: Step 1 (output_variable: counts), Step 2   |   None
//! ~~~
//!
//! This module only finds the pieces and their positions (pulldown-cmark does the Markdown);
//! [`crate::compile`] reads the YAML inside them and checks the meaning.

mod bold;

use crate::diag::{Diagnostic, LineIndex, Severity};
use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, MetadataBlockKind, Options, Parser, Tag};
use std::ops::Range;

/// A trace source larger than this is refused before parsing (bytes).
pub const MAX_SOURCE_BYTES: usize = 1024 * 1024;

/// A fenced block (or the frontmatter) and where its content starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The block's text.
    pub text: String,
    /// 1-based line of the block's first content line.
    pub line: usize,
    /// Built from Markdown fields (the bold-field variant) rather than written as YAML: every
    /// position inside it is reported at `line`.
    pub synthetic: bool,
}

impl Block {
    /// The 1-based source line of the first line in the block matching `key:` (optionally as a
    /// list item), searching from the `skip`-th match; the block's first line when absent.
    pub fn line_of_key(&self, key: &str, skip: usize) -> usize {
        self.find_key(key, self.line, usize::MAX, skip)
            .unwrap_or(self.line)
    }

    /// The 1-based source line of the `skip`-th line matching `key:` among source lines
    /// `from..to`, if any.
    pub fn find_key(&self, key: &str, from: usize, to: usize, skip: usize) -> Option<usize> {
        if self.synthetic {
            let present = self.text.lines().any(|l| {
                let t = l.trim_start().trim_start_matches("- ").trim_start();
                t.strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            });
            return (present && skip == 0).then_some(self.line);
        }
        self.text
            .lines()
            .enumerate()
            .map(|(i, l)| (self.line + i, l))
            .filter(|(n, _)| (from..to).contains(n))
            .filter(|(_, l)| {
                let t = l.trim_start().trim_start_matches("- ").trim_start();
                t.strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            })
            .nth(skip)
            .map(|(n, _)| n)
    }

    /// One past the last source line of the block.
    pub fn end_line(&self) -> usize {
        if self.synthetic {
            return self.line + 1;
        }
        self.line + self.text.lines().count()
    }

    /// The 1-based source line of the `n`-th top-level list item (`- `) of the block.
    pub fn line_of_item(&self, n: usize) -> usize {
        if self.synthetic {
            return self.line;
        }
        let indent = self
            .text
            .lines()
            .filter(|l| l.trim_start().starts_with('-'))
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        self.text
            .lines()
            .enumerate()
            .filter(|(_, l)| {
                l.len() - l.trim_start().len() == indent && l.trim_start().starts_with('-')
            })
            .nth(n)
            .map_or(self.line, |(i, _)| self.line + i)
    }
}

/// One `### Step N: title` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStep {
    /// The step number as written.
    pub number: u32,
    /// The heading text after `Step N:`.
    pub title: String,
    /// 1-based line of the heading.
    pub line: usize,
    /// The `**Tool Call**:` block.
    pub tool_call: Option<Block>,
    /// The `**Validation**:` block.
    pub validation: Option<Block>,
    /// The `**Error Handling**:` block.
    pub error_handling: Option<Block>,
    /// The text after `**Dependencies**:` and its line.
    pub dependencies: Option<(String, usize)>,
}

/// Which of the two accepted source forms a file is written in. Diagnostics name it, so that
/// a message never talks about a part the detected form does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceForm {
    /// YAML frontmatter and `**Tool Call**:` fenced YAML blocks (LLMunix's trace schema).
    Frontmatter,
    /// `**Trace ID:** …` bold fields and bullets, no frontmatter (LLMunix's deployment guide).
    BoldFields,
}

impl SourceForm {
    /// How the trace's header is called in this form, for diagnostics.
    pub fn header(self) -> &'static str {
        match self {
            SourceForm::Frontmatter => "frontmatter",
            SourceForm::BoldFields => "the bold-field header (`**Field:** value` lines)",
        }
    }

    /// How a header key is written in this form: `version` or `**Version:**`.
    pub fn key(self, key: &str) -> String {
        match self {
            SourceForm::Frontmatter => format!("`{key}`"),
            SourceForm::BoldFields => {
                let label: Vec<String> = key
                    .split('_')
                    .map(|w| match w {
                        "id" => "ID".to_owned(),
                        w => {
                            let mut c = w.chars();
                            c.next().map_or_else(String::new, |f| {
                                f.to_uppercase().collect::<String>() + c.as_str()
                            })
                        }
                    })
                    .collect();
                format!("`**{}:**`", label.join(" "))
            }
        }
    }
}

/// A trace source split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTrace {
    /// The file name used in diagnostics.
    pub file: String,
    /// The form the file is written in.
    pub form: SourceForm,
    /// The YAML frontmatter.
    pub frontmatter: Option<Block>,
    /// The first `#` heading, if any.
    pub title: Option<String>,
    /// The step sections in source order.
    pub steps: Vec<SourceStep>,
    /// Fenced blocks outside any step (for `## Post-Execution Validation` and
    /// `## Expected Outputs` sections).
    pub sections: Vec<Block>,
    /// Structural problems found while splitting.
    pub diagnostics: Vec<Diagnostic>,
    /// Step headings refused (malformed, number out of range): already reported, so that
    /// "the trace has no steps" is not said as well.
    pub rejected_step_headings: usize,
}

impl SourceStep {
    /// A step section with no fields yet.
    pub fn new(number: u32, title: &str, line: usize) -> Self {
        Self {
            number,
            title: title.to_owned(),
            line,
            tool_call: None,
            validation: None,
            error_handling: None,
            dependencies: None,
        }
    }
}

impl SourceTrace {
    /// A source with nothing found yet.
    pub fn empty(file: &str) -> Self {
        Self {
            file: file.to_owned(),
            form: SourceForm::Frontmatter,
            frontmatter: None,
            title: None,
            steps: Vec::new(),
            sections: Vec::new(),
            diagnostics: Vec::new(),
            rejected_step_headings: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Field {
    ToolCall,
    Validation,
    ErrorHandling,
    Dependencies,
}

impl Field {
    fn from_label(label: &str) -> Option<Self> {
        let l = label
            .trim()
            .trim_end_matches(':')
            .trim()
            .to_ascii_lowercase();
        match l.as_str() {
            "tool call" => Some(Field::ToolCall),
            "validation" | "validations" => Some(Field::Validation),
            "error handling" => Some(Field::ErrorHandling),
            "dependencies" => Some(Field::Dependencies),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Field::ToolCall => "**Tool Call**:",
            Field::Validation => "**Validation**:",
            Field::ErrorHandling => "**Error Handling**:",
            Field::Dependencies => "**Dependencies**:",
        }
    }
}

/// Splits a trace source into frontmatter and step sections.
///
/// Never fails: problems (a field without its block, a malformed step heading, a source over
/// [`MAX_SOURCE_BYTES`]) are returned in [`SourceTrace::diagnostics`] with their positions.
pub fn parse(file: &str, text: &str) -> SourceTrace {
    let mut out = SourceTrace::empty(file);
    let err = |out: &mut SourceTrace, line: usize, column: usize, message: String| {
        out.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            file: file.to_owned(),
            line,
            column,
            message,
        });
    };
    if text.len() > MAX_SOURCE_BYTES {
        err(
            &mut out,
            1,
            1,
            format!(
                "trace source is {} bytes: expected at most {MAX_SOURCE_BYTES}",
                text.len()
            ),
        );
        return out;
    }
    if bold::is_bold_variant(text) {
        return bold::parse(file, text);
    }
    let index = LineIndex::new(text);
    let opts = Options::ENABLE_YAML_STYLE_METADATA_BLOCKS | Options::ENABLE_TABLES;

    let mut heading: Option<(HeadingLevel, Range<usize>, String)> = None;
    // Paragraph state: Some(label text) while inside a leading **strong**; the label once closed.
    let mut para: Option<(usize, Option<String>, bool, String)> = None; // (start, label, in_strong, rest)
    let mut pending: Option<(Field, usize)> = None;
    let mut code: Option<(Option<usize>, String, bool)> = None; // (first text offset, text, is_fenced)
    let mut meta: Option<(Option<usize>, String)> = None;
    let mut in_step = false;
    let mut step_level = HeadingLevel::H3;
    // `**Dependencies**:` with nothing after it: the list that follows holds them.
    let mut deps_pending: Option<usize> = None;
    let mut deps_list: Option<(usize, Vec<String>)> = None;

    for (event, range) in Parser::new_ext(text, opts).into_offset_iter() {
        match event {
            Event::Start(Tag::MetadataBlock(MetadataBlockKind::YamlStyle)) => {
                meta = Some((None, String::new()));
            }
            Event::End(pulldown_cmark::TagEnd::MetadataBlock(_)) => {
                if let Some((start, t)) = meta.take() {
                    let line = start.map_or_else(
                        || index.line_col(range.start).0 + 1,
                        |s| index.line_col(s).0,
                    );
                    out.frontmatter = Some(Block {
                        text: t,
                        line,
                        synthetic: false,
                    });
                }
            }
            Event::Start(Tag::List(_)) if deps_pending.is_some() && deps_list.is_none() => {
                deps_list = deps_pending.take().map(|line| (line, Vec::new()));
            }
            Event::Start(Tag::Item) if deps_list.is_some() => {
                if let Some((_, items)) = deps_list.as_mut() {
                    items.push(String::new());
                }
            }
            Event::End(pulldown_cmark::TagEnd::List(_)) if deps_list.is_some() => {
                if let Some((line, items)) = deps_list.take() {
                    let text = items
                        .iter()
                        .map(|i| i.trim())
                        .collect::<Vec<_>>()
                        .join(", ");
                    if let Some(step) = out.steps.last_mut().filter(|_| in_step) {
                        step.dependencies = Some((text, line));
                    }
                }
            }
            Event::Start(Tag::Heading { level, .. }) => {
                if let Some(line) = deps_pending.take() {
                    err(&mut out, line, 1, "expected `None` or `Step N (output_variable: name)` items after **Dependencies**:, found a heading".into());
                }
                if let Some((field, line)) = pending.take() {
                    err(
                        &mut out,
                        line,
                        1,
                        format!(
                            "expected a fenced YAML block after {}, found a heading",
                            field.label()
                        ),
                    );
                }
                heading = Some((level, range, String::new()));
            }
            Event::End(pulldown_cmark::TagEnd::Heading(_)) => {
                if let Some((level, r, t)) = heading.take() {
                    let (line, column) = index.line_col(r.start);
                    let started = on_heading(&mut out, level, line, column, t.trim());
                    // Any other heading at step level or above ends the current step, so later
                    // fields cannot attach to it silently.
                    if started {
                        in_step = true;
                        step_level = level;
                    } else if level <= step_level {
                        in_step = false;
                    }
                }
            }
            Event::Start(Tag::Paragraph) if deps_list.is_some() => {}
            Event::End(pulldown_cmark::TagEnd::Paragraph) if deps_list.is_some() => {}
            Event::Start(Tag::Paragraph) => {
                if let Some(line) = deps_pending.take() {
                    err(&mut out, line, 1, "expected `None` or `Step N (output_variable: name)` items after **Dependencies**:, found a paragraph".into());
                }
                if let Some((field, line)) = pending.take() {
                    err(
                        &mut out,
                        line,
                        1,
                        format!(
                            "expected a fenced YAML block after {}, found a paragraph",
                            field.label()
                        ),
                    );
                }
                para = Some((range.start, None, false, String::new()));
            }
            Event::Start(Tag::Strong) => {
                if let Some(p) = para.as_mut()
                    && p.1.is_none()
                    && p.3.trim().is_empty()
                {
                    p.1 = Some(String::new());
                    p.2 = true;
                }
            }
            Event::End(pulldown_cmark::TagEnd::Strong) => {
                if let Some(p) = para.as_mut() {
                    p.2 = false;
                }
            }
            Event::End(pulldown_cmark::TagEnd::Paragraph) => {
                if let Some((start, Some(label), _, rest)) = para.take() {
                    let (line, _) = index.line_col(start);
                    if let Some(field) = Field::from_label(&label) {
                        on_field(
                            &mut out,
                            field,
                            line,
                            rest.trim_start().trim_start_matches(':').trim(),
                            in_step,
                            &mut pending,
                            &mut deps_pending,
                        );
                    }
                }
            }
            Event::Start(Tag::CodeBlock(kind)) => {
                code = Some((
                    None,
                    String::new(),
                    matches!(kind, CodeBlockKind::Fenced(_)),
                ));
            }
            Event::End(pulldown_cmark::TagEnd::CodeBlock) => {
                let block = code.take();
                // Fenced blocks outside steps may hold `postconditions:` or `outputs:`.
                let code_outside = if pending.is_none() && !in_step {
                    block.clone()
                } else {
                    None
                };
                if let Some((start, t, _fenced)) = block
                    && let Some((field, _)) = pending.take()
                {
                    let line = start.map_or_else(
                        || index.line_col(range.start).0 + 1,
                        |s| index.line_col(s).0,
                    );
                    let block = Block {
                        text: t,
                        line,
                        synthetic: false,
                    };
                    let mut duplicate = None;
                    if let Some(step) = out.steps.last_mut() {
                        let slot = match field {
                            Field::ToolCall => Some(&mut step.tool_call),
                            Field::Validation => Some(&mut step.validation),
                            Field::ErrorHandling => Some(&mut step.error_handling),
                            Field::Dependencies => None,
                        };
                        if let Some(slot) = slot {
                            if slot.is_some() {
                                duplicate = Some(format!(
                                    "step {} has a second {} block: expected one",
                                    step.number,
                                    field.label()
                                ));
                            } else {
                                *slot = Some(block);
                            }
                        }
                    }
                    if let Some(msg) = duplicate {
                        err(&mut out, line, 1, msg);
                    }
                } else if let Some((start, t, true)) = code_outside {
                    let line = start.map_or_else(
                        || index.line_col(range.start).0 + 1,
                        |s| index.line_col(s).0,
                    );
                    out.sections.push(Block {
                        text: t,
                        line,
                        synthetic: false,
                    });
                }
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(m) = meta.as_mut() {
                    m.0.get_or_insert(range.start);
                    m.1.push_str(&t);
                } else if let Some(c) = code.as_mut() {
                    c.0.get_or_insert(range.start);
                    c.1.push_str(&t);
                } else if let Some(item) =
                    deps_list.as_mut().and_then(|(_, items)| items.last_mut())
                {
                    item.push_str(&t);
                } else if let Some(h) = heading.as_mut() {
                    h.2.push_str(&t);
                } else if let Some(p) = para.as_mut() {
                    match (&mut p.1, p.2) {
                        (Some(label), true) => label.push_str(&t),
                        _ => p.3.push_str(&t),
                    }
                }
            }
            Event::SoftBreak | Event::HardBreak => {
                if let Some(p) = para.as_mut() {
                    p.3.push(' ');
                }
            }
            _ => {}
        }
    }
    if let Some((field, line)) = pending.take() {
        err(
            &mut out,
            line,
            1,
            format!(
                "expected a fenced YAML block after {}, found the end of the file",
                field.label()
            ),
        );
    }
    if let Some(line) = deps_pending {
        err(&mut out, line, 1, "expected `None` or `Step N (output_variable: name)` items after **Dependencies**:, found the end of the file".into());
    }
    out
}

/// Handles a heading; returns whether it started a step.
fn on_heading(
    out: &mut SourceTrace,
    level: HeadingLevel,
    line: usize,
    column: usize,
    text: &str,
) -> bool {
    if level == HeadingLevel::H1 && out.title.is_none() {
        out.title = Some(text.to_owned());
    }
    let Some(rest) = strip_prefix_ci(text, "step") else {
        return false;
    };
    // LLMunix documents `### Step N:`; some of its examples use `## Step N:`.
    if !matches!(level, HeadingLevel::H2 | HeadingLevel::H3) {
        out.diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            file: out.file.clone(),
            line,
            column,
            message: format!("step heading at level {level:?}: expected `### Step N: title` (or `##`); this section is not a step"),
        });
        return false;
    }
    let rest = rest.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = rest[digits.len()..].trim_start();
    let title = after.strip_prefix(':').map(str::trim);
    match (digits.parse::<u32>(), title) {
        (Ok(number), Some(title)) => {
            out.steps.push(SourceStep::new(number, title, line));
            true
        }
        (Err(_), Some(_)) if !digits.is_empty() => {
            out.rejected_step_headings += 1;
            out.diagnostics.push(Diagnostic {
                severity: Severity::Error,
                file: out.file.clone(),
                line,
                column,
                message: format!(
                    "step number {digits} is too large: expected a number from 0 to {}",
                    u32::MAX
                ),
            });
            false
        }
        _ => {
            out.rejected_step_headings += 1;
            out.diagnostics.push(Diagnostic {
                severity: Severity::Error,
                file: out.file.clone(),
                line,
                column,
                message: format!(
                    "malformed step heading {text:?}: expected `### Step N: title` with a decimal N"
                ),
            });
            false
        }
    }
}

fn on_field(
    out: &mut SourceTrace,
    field: Field,
    line: usize,
    rest: &str,
    in_step: bool,
    pending: &mut Option<(Field, usize)>,
    deps_pending: &mut Option<usize>,
) {
    let Some(step) = out.steps.last_mut().filter(|_| in_step) else {
        out.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            file: out.file.clone(),
            line,
            column: 1,
            message: format!(
                "{} outside a step: expected it under a `### Step N: title` heading",
                field.label()
            ),
        });
        return;
    };
    if field == Field::Dependencies {
        if step.dependencies.is_some() {
            out.diagnostics.push(Diagnostic {
                severity: Severity::Error,
                file: out.file.clone(),
                line,
                column: 1,
                message: format!(
                    "step {} has a second **Dependencies**: line: expected one",
                    step.number
                ),
            });
        } else if rest.is_empty() {
            *deps_pending = Some(line);
        } else {
            step.dependencies = Some((rest.to_owned(), line));
        }
    } else {
        if !rest.is_empty() {
            let msg = format!(
                "unexpected text after {}: expected the fenced YAML block on the following lines, found {rest:?}",
                field.label()
            );
            out.diagnostics.push(Diagnostic {
                severity: Severity::Error,
                file: out.file.clone(),
                line,
                column: 1,
                message: msg,
            });
        }
        *pending = Some((field, line));
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "---\ntrace_id: t\nversion: \"1.0\"\n---\n# Goal\n\n### Step 1: First\n\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo hi\n```\n\n**Dependencies**: None\n\n### Step 2: Second\n**Tool Call**:\n```yaml\ntool: Read\n```\n**Validation**:\n```yaml\n- check: x\n  type: content_not_empty\n```\n**Dependencies**: Step 1 (output_variable: greeting)\n";

    #[test]
    fn finds_frontmatter_steps_fields_and_lines() {
        let s = parse("t.trace.md", SRC);
        assert!(s.diagnostics.is_empty(), "{:?}", s.diagnostics);
        let fm = s.frontmatter.unwrap();
        assert_eq!(fm.line, 2);
        assert!(fm.text.contains("trace_id: t"));
        assert_eq!(s.title.as_deref(), Some("Goal"));
        assert_eq!(s.steps.len(), 2);
        assert_eq!(s.steps[0].line, 7);
        assert_eq!(s.steps[0].title, "First");
        assert_eq!(s.steps[0].tool_call.as_ref().unwrap().line, 11);
        assert_eq!(s.steps[0].dependencies.as_ref().unwrap().0, "None");
        assert_eq!(
            s.steps[1].dependencies.as_ref().unwrap().0,
            "Step 1 (output_variable: greeting)"
        );
        assert_eq!(s.steps[1].validation.as_ref().unwrap().line_of_item(0), 25);
    }

    #[test]
    fn field_without_block_is_reported_with_its_line() {
        let s = parse("x.md", "### Step 1: a\n**Tool Call**:\n\nsome prose\n");
        assert_eq!(s.diagnostics.len(), 1);
        assert_eq!(s.diagnostics[0].line, 2);
        assert!(
            s.diagnostics[0]
                .message
                .contains("expected a fenced YAML block")
        );
    }

    #[test]
    fn multibyte_heading_text_does_not_panic() {
        // Found by the trace_source fuzz target: a heading whose 4th byte is inside a character.
        let s = parse("x.md", "# St\u{6410}p\n### \u{6410}\n");
        assert!(s.steps.is_empty());
    }

    #[test]
    fn fields_after_a_non_step_heading_do_not_attach_to_the_previous_step() {
        let s = parse(
            "x.md",
            "### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\n```\n### Notes\n**Dependencies**: Step 9\n",
        );
        assert!(s.steps[0].dependencies.is_none());
        assert_eq!(s.diagnostics.len(), 1, "{:?}", s.diagnostics);
        assert!(s.diagnostics[0].message.contains("outside a step"));
        assert_eq!(s.diagnostics[0].line, 7);
    }

    #[test]
    fn text_glued_to_a_block_field_is_reported() {
        let s = parse(
            "x.md",
            "### Step 1: a\n**Error Handling**:\n**Dependencies**: Step 1\n```yaml\non_error: {action: skip}\n```\n",
        );
        assert!(
            s.diagnostics.iter().any(|d| d
                .message
                .contains("unexpected text after **Error Handling**:")),
            "{:?}",
            s.diagnostics
        );
    }

    #[test]
    fn h2_step_headings_are_steps_and_h3_inside_them_do_not_close_them() {
        let s = parse(
            "x.md",
            "## Step 1: a\n### Notes\n**Tool Call**:\n```yaml\ntool: Bash\n```\n## Step 2: b\n",
        );
        assert!(s.diagnostics.is_empty(), "{:?}", s.diagnostics);
        assert_eq!(s.steps.len(), 2);
        assert!(s.steps[0].tool_call.is_some());
    }

    #[test]
    fn malformed_step_heading() {
        let s = parse("x.md", "### Step one: a\n");
        assert_eq!(s.diagnostics[0].line, 1);
        assert!(s.diagnostics[0].message.contains("malformed step heading"));
    }
}
