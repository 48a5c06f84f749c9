//! The compiler's context: where diagnostics go, the source form being read, the parameters
//! of one tool call or check, and the vocabulary (tools, check types, limits) it checks against.

use crate::diag::{Diagnostic, Severity};
use crate::source::{Block, SourceForm};
use crate::trace::Template;
use serde::Deserialize;
use serde_norway::Value;
use std::collections::BTreeMap;

/// Templates a step uses, with the source line of each (for unresolved-variable errors).
pub(crate) type TemplateUses = Vec<(usize, Template)>;

/// Parameters of one tool call or check, consumed by name so leftovers can be reported.
pub(crate) struct Params<'a> {
    pub(crate) map: BTreeMap<String, Value>,
    pub(crate) block: &'a Block,
    pub(crate) what: String,
    /// The line reported when a key's own line is unknown.
    pub(crate) line: usize,
    /// Source lines `from..to` that hold these parameters (keys are searched there only).
    pub(crate) span: (usize, usize),
}

pub(crate) struct Cx {
    pub(crate) file: String,
    pub(crate) form: SourceForm,
    pub(crate) diags: Vec<Diagnostic>,
}

impl Cx {
    pub(crate) fn error(&mut self, line: usize, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            severity: Severity::Error,
            file: self.file.clone(),
            line,
            column: 1,
            message: message.into(),
        });
    }

    pub(crate) fn warning(&mut self, line: usize, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            severity: Severity::Warning,
            file: self.file.clone(),
            line,
            column: 1,
            message: message.into(),
        });
    }

    pub(crate) fn yaml<T: for<'de> Deserialize<'de>>(
        &mut self,
        block: &Block,
        what: &str,
    ) -> Option<T> {
        match serde_norway::from_str::<T>(&block.text) {
            Ok(v) => Some(v),
            Err(e) => {
                let (line, column) = match e.location() {
                    Some(l) if !block.synthetic => (block.line + l.line() - 1, l.column()),
                    _ => (block.line, 1),
                };
                let msg = e.to_string();
                // serde_norway appends " at line L column C" relative to the block; drop it.
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
                self.diags.push(Diagnostic {
                    severity: Severity::Error,
                    file: self.file.clone(),
                    line,
                    column,
                    message: format!("invalid {what}: {msg}"),
                });
                None
            }
        }
    }
}

impl Params<'_> {
    pub(crate) fn line_of(&self, key: &str) -> usize {
        self.block
            .find_key(key, self.span.0, self.span.1, 0)
            .unwrap_or(self.line)
    }
}

/// The tools of the trace language.
pub const TOOLS: &[&str] = &["Read", "Write", "Bash", "Grep", "Glob", "WebFetch", "LLM"];

/// Keys that belong under an LLM step's `parameters:`, refused (not ignored) elsewhere.
pub(crate) const LLM_PARAMETER_KEYS: &[&str] = &[
    "json_schema",
    "grammar",
    "max_tokens",
    "temperature",
    "examples",
    "min_fidelity",
    "min_answer_confidence",
    "on_uncertain",
    "few_shot",
];

pub use crate::trace::MAX_MAX_TOKENS;

/// The validation types this compiler accepts.
pub const CHECK_TYPES: &[&str] = &[
    "file_exists",
    "directory_exists",
    "content_contains",
    "content_not_contains",
    "content_not_empty",
    "regex_match",
    "command_exit_code",
    "file_size_minimum",
    "json_valid",
    "json_schema",
    "content_structure_check",
];
