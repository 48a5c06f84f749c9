//! The bold-field Markdown variant of LLMunix traces (no YAML frontmatter):
//!
//! ~~~text
//! # Title
//! **Trace ID**: disk-report-v1.0        (`**Key:** value` works too)
//! **Goal**: report disk usage
//! **Version**: 1.0.0
//! ## Metadata
//! - **Task Type**: report
//! ## Step 1: Measure                    (`##` or `###`)
//! **Tool**: Bash                        (or `- **Tool:** Bash`)
//! **Parameters**:                       a `| Parameter | Value |` table, `- key: value`
//!                                       bullets, or a fenced YAML block
//! **Validations**:                      a numbered list: `1. **Check name**` with nested
//!                                       `- Type: …`, `- Path: …` bullets
//! **Error Handling**:                   `- Action: retry`, `- Retry Count: 2`, …
//! **Dependencies**: None (first step)
//! ~~~
//!
//! It is translated into the same [`SourceTrace`] as the frontmatter form: the header becomes
//! the frontmatter and each step's fields become the YAML blocks the compiler reads, built with
//! the YAML library (never by pasting text), so both forms are checked by the same code.
//! Positions point at the field's line in the source.

use super::{Block, SourceForm, SourceStep, SourceTrace};
use crate::diag::LineIndex;
use crate::diag::{Diagnostic, Severity};
use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd};
use serde_norway::{Mapping, Value};

/// A Markdown block, reduced to what the variant uses.
#[derive(Debug, Clone)]
enum Node {
    Heading {
        level: HeadingLevel,
        text: String,
        line: usize,
    },
    /// A paragraph: its fields (see [`Inline`]).
    Para {
        fields: Vec<(Option<String>, String)>,
        /// Per field, how many lines below `line` it starts.
        offsets: Vec<usize>,
        line: usize,
    },
    List {
        items: Vec<Item>,
    },
    Table {
        rows: Vec<Vec<String>>,
    },
    Code {
        text: String,
        line: usize,
    },
}

#[derive(Debug, Clone, Default)]
struct Item {
    label: Option<String>,
    rest: String,
    line: usize,
    children: Vec<Node>,
}

/// Inline text being collected. A bold run at the start of a line opens a field
/// (`**Label**: value`); one paragraph may hold several fields on consecutive lines.
#[derive(Debug, Default)]
struct Inline {
    /// (label, value) per field; the first may have no label (plain text).
    fields: Vec<(Option<String>, String)>,
    /// Per field, the number of line breaks seen before it started.
    offsets: Vec<usize>,
    breaks: usize,
    in_label: bool,
    at_line_start: bool,
    started: bool,
}

impl Inline {
    fn strong_start(&mut self) {
        if !self.started || self.at_line_start {
            self.fields.push((Some(String::new()), String::new()));
            self.offsets.push(self.breaks);
            self.in_label = true;
        }
        self.started = true;
        self.at_line_start = false;
    }
    fn strong_end(&mut self) {
        self.in_label = false;
    }
    fn text(&mut self, t: &str) {
        if self.fields.is_empty() {
            self.fields.push((None, String::new()));
            self.offsets.push(self.breaks);
        }
        if !t.trim().is_empty() {
            self.started = true;
            self.at_line_start = false;
        }
        if let Some((label, rest)) = self.fields.last_mut() {
            match (label, self.in_label) {
                (Some(l), true) => l.push_str(t),
                _ => rest.push_str(t),
            }
        }
    }
    fn line_break(&mut self) {
        self.text(" ");
        self.breaks += 1;
        self.at_line_start = true;
    }
    /// The fields, labels without their trailing `:`, values without a leading `:`.
    fn finish(self) -> Vec<(Option<String>, String)> {
        self.fields
            .into_iter()
            .map(|(label, rest)| {
                let label = label
                    .map(|l| l.trim().trim_end_matches(':').trim().to_owned())
                    .filter(|l| !l.is_empty());
                (label, rest.trim().trim_start_matches(':').trim().to_owned())
            })
            .collect()
    }
}

enum Frame {
    Heading {
        level: HeadingLevel,
        line: usize,
        text: String,
    },
    Para {
        line: usize,
        inline: Inline,
    },
    List {
        items: Vec<Item>,
    },
    Item {
        item: Item,
        inline: Inline,
    },
    Table {
        rows: Vec<Vec<String>>,
        cell: Option<String>,
    },
    Code {
        line: Option<usize>,
        text: String,
    },
}

/// Builds the block tree of `text`.
fn nodes(text: &str) -> Vec<Node> {
    let index = LineIndex::new(text);
    let mut out: Vec<Node> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let push_node = |stack: &mut Vec<Frame>, out: &mut Vec<Node>, node: Node| match stack.last_mut()
    {
        Some(Frame::Item { item, .. }) => item.children.push(node),
        _ => out.push(node),
    };
    for (event, range) in Parser::new_ext(text, Options::ENABLE_TABLES).into_offset_iter() {
        let line = index.line_col(range.start).0;
        match event {
            Event::Start(Tag::Heading { level, .. }) => stack.push(Frame::Heading {
                level,
                line,
                text: String::new(),
            }),
            Event::Start(Tag::Paragraph)
                // A paragraph inside a list item carries the item's inline text.
                if !matches!(stack.last(), Some(Frame::Item { .. })) => {
                    stack.push(Frame::Para {
                        line,
                        inline: Inline::default(),
                    });
                }
            Event::Start(Tag::List(_)) => stack.push(Frame::List { items: Vec::new() }),
            Event::Start(Tag::Item) => stack.push(Frame::Item {
                item: Item {
                    line,
                    ..Item::default()
                },
                inline: Inline::default(),
            }),
            Event::Start(Tag::Table(_)) => stack.push(Frame::Table {
                rows: Vec::new(),
                cell: None,
            }),
            Event::Start(Tag::TableHead | Tag::TableRow) => {
                if let Some(Frame::Table { rows, .. }) = stack.last_mut() {
                    rows.push(Vec::new());
                }
            }
            Event::Start(Tag::TableCell) => {
                if let Some(Frame::Table { cell, .. }) = stack.last_mut() {
                    *cell = Some(String::new());
                }
            }
            Event::End(TagEnd::TableCell) => {
                if let Some(Frame::Table { rows, cell, .. }) = stack.last_mut()
                    && let (Some(row), Some(c)) = (rows.last_mut(), cell.take()) {
                        row.push(c.trim().to_owned());
                    }
            }
            Event::Start(Tag::CodeBlock(_)) => stack.push(Frame::Code {
                line: None,
                text: String::new(),
            }),
            Event::Start(Tag::Strong) => if let Some(Frame::Para { inline, .. } | Frame::Item { inline, .. }) = stack.last_mut() {
                inline.strong_start()
            },
            Event::End(TagEnd::Strong) => if let Some(Frame::Para { inline, .. } | Frame::Item { inline, .. }) = stack.last_mut() {
                inline.strong_end()
            },
            Event::Text(t) | Event::Code(t) => match stack.last_mut() {
                Some(Frame::Heading { text, .. }) => text.push_str(&t),
                Some(Frame::Para { inline, .. } | Frame::Item { inline, .. }) => inline.text(&t),
                Some(Frame::Table { cell: Some(c), .. }) => c.push_str(&t),
                Some(Frame::Code { line: l, text }) => {
                    l.get_or_insert(line);
                    text.push_str(&t);
                }
                _ => {}
            },
            Event::SoftBreak | Event::HardBreak => if let Some(Frame::Para { inline, .. } | Frame::Item { inline, .. }) = stack.last_mut() {
                inline.line_break()
            },
            Event::End(TagEnd::Heading(_)) => {
                if let Some(Frame::Heading { level, line, text }) = stack.pop() {
                    push_node(
                        &mut stack,
                        &mut out,
                        Node::Heading {
                            level,
                            text: text.trim().to_owned(),
                            line,
                        },
                    );
                }
            }
            Event::End(TagEnd::Paragraph) => {
                if let Some(Frame::Para { .. }) = stack.last()
                    && let Some(Frame::Para { line, inline }) = stack.pop() {
                        push_node(
                            &mut stack,
                            &mut out,
                            Node::Para {
                                offsets: inline.offsets.clone(),
                                fields: inline.finish(),
                                line,
                            },
                        );
                    }
            }
            Event::End(TagEnd::Item) => {
                if let Some(Frame::Item { mut item, inline }) = stack.pop() {
                    let (label, rest) = inline.finish().into_iter().next().unwrap_or_default();
                    item.label = label;
                    item.rest = rest;
                    if let Some(Frame::List { items }) = stack.last_mut() {
                        items.push(item);
                    }
                }
            }
            Event::End(TagEnd::List(_)) => {
                if let Some(Frame::List { items }) = stack.pop() {
                    push_node(&mut stack, &mut out, Node::List { items });
                }
            }
            Event::End(TagEnd::Table) => {
                if let Some(Frame::Table { rows, .. }) = stack.pop() {
                    push_node(&mut stack, &mut out, Node::Table { rows });
                }
            }
            Event::End(TagEnd::CodeBlock) => {
                if let Some(Frame::Code { line: l, text }) = stack.pop() {
                    push_node(
                        &mut stack,
                        &mut out,
                        Node::Code {
                            text,
                            line: l.unwrap_or(line + 1),
                        },
                    );
                }
            }
            _ => {}
        }
    }
    out
}

/// Whether `text` is the bold-field variant: no frontmatter and a `**Trace ID**` field.
pub(crate) fn is_bold_variant(text: &str) -> bool {
    !text.trim_start().starts_with("---")
        && nodes(text)
            .iter()
            .any(|n| fields_of(n).iter().any(|(l, _, _)| key(l) == "trace_id"))
}

/// The `**Label**: value` fields of a paragraph, with the paragraph's line.
fn fields_of(n: &Node) -> Vec<(String, String, usize)> {
    match n {
        Node::Para {
            fields,
            offsets,
            line,
        } => fields
            .iter()
            .zip(offsets)
            .filter_map(|((l, r), o)| l.clone().map(|l| (l, r.clone(), line + o)))
            .collect(),
        _ => Vec::new(),
    }
}

/// The paragraph's first field, when it starts with a label.
fn field_of(n: &Node) -> Option<(String, String, usize)> {
    match n {
        Node::Para { fields, line, .. } => match fields.first() {
            Some((Some(l), r)) => Some((l.clone(), r.clone(), *line)),
            _ => None,
        },
        _ => None,
    }
}

/// `Trace ID` → `trace_id`.
fn key(label: &str) -> String {
    label
        .trim()
        .to_ascii_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("_")
}

/// A scalar from Markdown text: numbers and booleans (`Yes`/`No`) typed, the rest a string.
fn scalar(v: &str) -> Value {
    let v = v.trim();
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" => return Value::Bool(true),
        "no" | "false" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(n) = v.parse::<u64>() {
        return Value::Number(n.into());
    }
    if let Ok(f) = v.parse::<f64>() {
        return Value::Number(f.into());
    }
    Value::String(v.to_owned())
}

fn block(value: &Value, line: usize) -> Block {
    Block {
        text: serde_norway::to_string(value).unwrap_or_default(),
        line,
        synthetic: true,
    }
}

/// Translates a bold-field trace into a [`SourceTrace`].
pub(crate) fn parse(file: &str, text: &str) -> SourceTrace {
    let mut out = SourceTrace::empty(file);
    out.form = SourceForm::BoldFields;
    let mut header = Mapping::new();
    let mut metadata = Mapping::new();
    let mut header_line = 1;
    let mut section = String::new();
    let nodes = nodes(text);
    let mut i = 0;
    while i < nodes.len() {
        let node = &nodes[i];
        i += 1;
        match node {
            Node::Heading {
                level,
                text: h,
                line,
            } => {
                if *level == HeadingLevel::H1 && out.title.is_none() {
                    out.title = Some(h.clone());
                }
                section = key(h);
                let step = h
                    .strip_prefix("Step ")
                    .or_else(|| h.strip_prefix("step "))
                    .and_then(|r| r.split_once(':'))
                    .and_then(|(n, t)| n.trim().parse::<u32>().ok().map(|n| (n, t.trim())));
                if matches!(level, HeadingLevel::H2 | HeadingLevel::H3)
                    && let Some((number, title)) = step
                {
                    out.steps.push(SourceStep::new(number, title, *line));
                    section = "step".into();
                    continue;
                }
            }
            Node::Para { .. } | Node::List { .. } if section != "step" => {
                let fields: Vec<(String, String, usize)> = match node {
                    Node::List { items } => items
                        .iter()
                        .filter_map(|it| it.label.clone().map(|l| (l, it.rest.clone(), it.line)))
                        .collect(),
                    other => fields_of(other),
                };
                for (label, value, line) in fields {
                    let k = match key(&label).as_str() {
                        "trace_id" => "trace_id",
                        "experience_id" => "experience_id",
                        "goal" | "goal_signature" => "goal_signature",
                        "confidence" => "confidence",
                        "success_rate" => "success_rate",
                        "usage_count" => "usage_count",
                        "estimated_cost" => "estimated_cost",
                        "estimated_time" | "estimated_time_secs" | "estimated_time_seconds" => {
                            "estimated_time_secs"
                        }
                        "version" => "version",
                        "created" | "created_at" => "created_at",
                        "last_used" => "last_used",
                        "task_type" => "task_type",
                        "domain" => "domain",
                        "requires_internet" => "requires_internet",
                        "requires_human" => "requires_human",
                        "risk_level" => "risk_level",
                        "learned_by" => "learned_by",
                        _ => {
                            // Prose fields of the guide's form (`**Confidence Evolution:**`,
                            // `**Description:**`, …) are documentation: never an error.
                            if section != "preconditions" && section != "postconditions" {
                                out.diagnostics.push(Diagnostic {
                                    severity: Severity::Warning,
                                    file: file.to_owned(),
                                    line,
                                    column: 1,
                                    message: format!("`**{label}:**` is not a field of the trace language (bold-field form): it is kept in the source only"),
                                });
                            }
                            continue;
                        }
                    };
                    let v = match k {
                        "estimated_cost" => scalar(value.trim_start_matches('$')),
                        "estimated_time_secs" => {
                            scalar(value.split_whitespace().next().unwrap_or(""))
                        }
                        "version" | "trace_id" | "goal_signature" | "created_at" | "last_used"
                        | "experience_id" => Value::String(value.clone()),
                        _ => scalar(&value),
                    };
                    if k == "trace_id" {
                        header_line = line;
                    }
                    let target = if [
                        "task_type",
                        "domain",
                        "requires_internet",
                        "requires_human",
                        "risk_level",
                        "learned_by",
                    ]
                    .contains(&k)
                    {
                        &mut metadata
                    } else {
                        &mut header
                    };
                    target.insert(Value::String(k.into()), v);
                }
                if section == "preconditions" || section == "postconditions" {
                    out.diagnostics.push(Diagnostic {
                        severity: Severity::Warning,
                        file: file.to_owned(),
                        line: header_line,
                        column: 1,
                        message: format!("{section} written as prose cannot be checked: they are ignored (write them as YAML frontmatter to have them checked)"),
                    });
                }
            }
            Node::Para { .. } => {
                let Some((label, rest, line)) = field_of(node) else {
                    continue;
                };
                let rest = &rest;
                let line = &line;
                let k = key(&label);
                let Some(step) = out.steps.last_mut() else {
                    continue;
                };
                match k.as_str() {
                    "tool_call" if rest.is_empty() => match nodes.get(i) {
                        // The guide's form: `- **Tool:** NAME` and `- **Parameters:**` bullets.
                        Some(Node::List { items }) => {
                            i += 1;
                            let call = tool_call_of(items);
                            // Without a `- **Tool:**` bullet the compiler says what is missing.
                            if call.contains_key("tool") {
                                step.tool_call = Some(block(&Value::Mapping(call), *line));
                            }
                        }
                        Some(Node::Code { text, line }) => {
                            i += 1;
                            step.tool_call = Some(Block {
                                text: text.clone(),
                                line: *line,
                                synthetic: false,
                            });
                        }
                        _ => {}
                    },
                    "tool" | "tool_call" => {
                        // Parameters follow as their own field; collect them now.
                        let mut call = Mapping::new();
                        call.insert("tool".into(), Value::String(rest.clone()));
                        let (params, used) = parameters(&nodes[i..]);
                        i += used;
                        if !params.is_empty() {
                            call.insert("parameters".into(), Value::Mapping(params));
                        }
                        step.tool_call = Some(block(&Value::Mapping(call), *line));
                    }
                    "validation" | "validations" => {
                        if let Some(Node::List { items }) = nodes.get(i) {
                            i += 1;
                            let checks = checks_of(items);
                            step.validation = Some(block(&Value::Sequence(checks), *line));
                        } else if let Some(Node::Code { text, line }) = nodes.get(i) {
                            i += 1;
                            step.validation = Some(Block {
                                text: text.clone(),
                                line: *line,
                                synthetic: false,
                            });
                        }
                    }
                    "error_handling" => {
                        if let Some(Node::List { items }) = nodes.get(i) {
                            i += 1;
                            let mut m = Mapping::new();
                            // `- **On Error:**` with nested bullets, or the bullets themselves.
                            let flat: Vec<&Item> = items
                                .iter()
                                .flat_map(|it| match pair(it) {
                                    Some((k, v)) if k == "on_error" && v.is_empty() => {
                                        child_items(it).collect::<Vec<_>>()
                                    }
                                    _ => vec![it],
                                })
                                .collect();
                            for it in flat {
                                if let Some((k, v)) = pair(it) {
                                    let k = match k.as_str() {
                                        "message" => "error_message".to_owned(),
                                        other => other.to_owned(),
                                    };
                                    m.insert(Value::String(k), scalar(&v));
                                }
                            }
                            let mut wrapper = Mapping::new();
                            wrapper.insert("on_error".into(), Value::Mapping(m));
                            step.error_handling = Some(block(&Value::Mapping(wrapper), *line));
                        } else if let Some(Node::Code { text, line }) = nodes.get(i) {
                            i += 1;
                            step.error_handling = Some(Block {
                                text: text.clone(),
                                line: *line,
                                synthetic: false,
                            });
                        }
                    }
                    "dependencies" => {
                        let text = if rest.is_empty() {
                            match nodes.get(i) {
                                Some(Node::List { items }) => {
                                    i += 1;
                                    items
                                        .iter()
                                        .map(|it| it.rest.clone())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                }
                                _ => String::new(),
                            }
                        } else {
                            rest.clone()
                        };
                        step.dependencies = Some((text, *line));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    if !metadata.is_empty() {
        header.insert("metadata".into(), Value::Mapping(metadata));
    }
    if !header.contains_key("version")
        && let Some(Value::String(id)) = header.get("trace_id")
        && let Some(version) = version_suffix(id)
    {
        out.diagnostics.push(Diagnostic {
            severity: Severity::Note,
            file: file.to_owned(),
            line: header_line,
            column: 1,
            message: format!("no `**Version:**` field (bold-field form): version {version} is taken from the trace id's `-v` suffix"),
        });
        header.insert("version".into(), Value::String(version));
    }
    out.frontmatter = Some(block(&Value::Mapping(header), header_line));
    out
}

/// `- Key: value` → (`key`, `value`).
fn pair(it: &Item) -> Option<(String, String)> {
    if let Some(l) = &it.label {
        return Some((key(l), it.rest.clone()));
    }
    let (k, v) = it.rest.split_once(':')?;
    Some((key(k), v.trim().trim_matches('`').to_owned()))
}

/// The parameters that follow `**Tool**:`: a `**Parameters**:` field and its table, bullet
/// list or YAML block. Returns them and how many nodes were used.
fn parameters(rest: &[Node]) -> (Mapping, usize) {
    let mut m = Mapping::new();
    let Some((l, _, _)) = rest.first().and_then(field_of) else {
        return (m, 0);
    };
    if key(&l) != "parameters" {
        return (m, 0);
    }
    match rest.get(1) {
        Some(Node::Table { rows, .. }) => {
            for row in rows.iter().skip(1) {
                if let [k, v, ..] = row.as_slice() {
                    m.insert(
                        Value::String(key(k.trim_matches('`'))),
                        Value::String(v.trim_matches('`').to_owned()),
                    );
                }
            }
            (m, 2)
        }
        Some(Node::List { items }) => (param_map(items), 2),
        Some(Node::Code { text, .. }) => match serde_norway::from_str::<Value>(text) {
            Ok(Value::Mapping(p)) => (p, 2),
            _ => (m, 1),
        },
        _ => (m, 1),
    }
}

/// The items of the lists nested under `it`.
fn child_items(it: &Item) -> impl Iterator<Item = &Item> {
    it.children.iter().flat_map(|c| match c {
        Node::List { items } => items.as_slice(),
        _ => &[],
    })
}

/// A parameter value from Markdown text: integers, floats that print back as written, and
/// `true`/`false` typed (`max_tokens`, `temperature`, …); everything else text, so that
/// `1.10` or `yes` stay what the author wrote.
fn param_scalar(v: &str) -> Value {
    let v = v.trim().trim_matches('`');
    if let Ok(n) = v.parse::<u64>() {
        return Value::Number(n.into());
    }
    if let Ok(f) = v.parse::<f64>()
        && f.is_finite()
        && f.to_string() == v
    {
        return Value::Number(f.into());
    }
    match v {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(v.to_owned()),
    }
}

/// `- key: value` or `- **Key:** value` bullets → parameters, names matched without regard
/// to case and spaces (`File Path` → `file_path`, `URL` → `url`).
fn param_map(items: &[Item]) -> Mapping {
    let mut m = Mapping::new();
    for it in items {
        if let Some((k, v)) = pair(it) {
            m.insert(Value::String(k), param_scalar(&v));
        }
    }
    m
}

/// The guide's `**Tool Call:**` bullets: `- **Tool:** NAME`, `- **Parameters:**` with nested
/// `- **Name:** value` bullets; other bullets are tool-call keys (`timeout_secs`, `foreach`).
fn tool_call_of(items: &[Item]) -> Mapping {
    let mut call = Mapping::new();
    for it in items {
        let Some((k, v)) = pair(it) else { continue };
        match k.as_str() {
            "tool" => {
                call.insert("tool".into(), Value::String(v));
            }
            "parameters" => {
                let nested: Vec<Item> = child_items(it).cloned().collect();
                let mut params = param_map(&nested);
                if !v.is_empty() && params.is_empty() {
                    params.insert("value".into(), Value::String(v));
                }
                call.insert("parameters".into(), Value::Mapping(params));
            }
            _ => {
                call.insert(Value::String(k), param_scalar(&v));
            }
        }
    }
    call
}

/// A `**Validation:**` list: numbered checks (`1. **Check name**` with nested `- Type: …`
/// bullets), or the guide's bullets (`- **Check:** …`, `- **Type:** …`, `- **Parameters:**`
/// with nested bullets; a new `Check` starts the next check).
fn checks_of(items: &[Item]) -> Vec<Value> {
    let fielded = items
        .iter()
        .any(|it| matches!(pair(it), Some((k, _)) if k == "check" || k == "type"));
    if !fielded {
        return items.iter().map(check_of).collect();
    }
    let mut checks = Vec::new();
    let mut current: Vec<&Item> = Vec::new();
    for it in items {
        let starts = match pair(it) {
            Some((k, _)) if k == "check" => true,
            Some((k, _)) if k == "type" => current
                .iter()
                .any(|c| matches!(pair(c), Some((k, _)) if k == "type")),
            _ => false,
        };
        if starts && !current.is_empty() {
            checks.push(check_from(None, &current));
            current.clear();
        }
        current.push(it);
    }
    if !current.is_empty() {
        checks.push(check_from(None, &current));
    }
    checks
}

/// `1. **Check name**` with nested `- Type: …` bullets → `{check, type, parameters}`.
fn check_of(it: &Item) -> Value {
    let name = match pair(it) {
        Some((k, v)) if k == "check" && it.label.is_some() => v,
        _ => it.label.clone().unwrap_or_else(|| it.rest.clone()),
    };
    check_from(Some(name), &child_items(it).collect::<Vec<_>>())
}

/// A check from its field bullets (`check`, `type`, `parameters` with nested bullets, or a
/// parameter directly).
fn check_from(name: Option<String>, fields: &[&Item]) -> Value {
    let mut check = Mapping::new();
    if let Some(name) = name {
        check.insert("check".into(), Value::String(name));
    }
    let mut params = Mapping::new();
    for sub in fields {
        let Some((k, v)) = pair(sub) else { continue };
        match k.as_str() {
            "check" => {
                check.insert("check".into(), Value::String(v));
            }
            "type" => {
                check.insert("type".into(), Value::String(v));
            }
            "parameters" => {
                for p in child_items(sub) {
                    if let Some((k, v)) = pair(p) {
                        params.insert(Value::String(k), scalar(&v));
                    }
                }
            }
            _ => {
                params.insert(Value::String(k), scalar(&v));
            }
        }
    }
    if !params.is_empty() {
        check.insert("parameters".into(), Value::Mapping(params));
    }
    Value::Mapping(check)
}

/// `research-ai-trends-v1.0` → `1.0.0`: the version LLMunix's guide writes into trace ids.
fn version_suffix(id: &str) -> Option<String> {
    let (_, v) = id.rsplit_once("-v")?;
    v.parse::<crate::ids::Version>().ok().map(|v| v.to_string())
}

#[cfg(test)]
mod tests;
