//! Validations and pre/postconditions: each check's type and parameters.

use super::cx::{CHECK_TYPES, Cx, Params};
use super::params::scalar_text;
use super::raw::RawCondition;
use crate::source::Block;
use crate::trace::{Check, CheckKind, Template};
use serde_norway::Value;

impl Cx {
    pub(crate) fn lower_conditions(
        &mut self,
        raw: &[RawCondition],
        block: &Block,
        key: &str,
    ) -> Vec<Check> {
        let base = block.line_of_key(key, 0);
        let item_line = |i: usize| {
            block
                .find_key("validation_type", base, usize::MAX, i)
                .or_else(|| block.find_key("type", base, usize::MAX, i))
        };
        let mut out = Vec::new();
        for (i, c) in raw.iter().enumerate() {
            let line = item_line(i).unwrap_or(base);
            let span = (line, item_line(i + 1).unwrap_or(block.end_line()));
            let description = c
                .condition
                .clone()
                .unwrap_or_else(|| c.validation_type.clone());
            let mut p = Params {
                map: c.parameters.clone(),
                block,
                what: format!("{key} `{}`", c.validation_type),
                line,
                span,
            };
            if let Some(kind) = self.lower_check_kind(&c.validation_type, &mut p, false, line) {
                self.finish(p);
                out.push(Check { description, kind });
            }
        }
        out
    }

    pub(crate) fn lower_check_kind(
        &mut self,
        kind: &str,
        p: &mut Params<'_>,
        in_step: bool,
        line: usize,
    ) -> Option<CheckKind> {
        let subject = |cx: &mut Cx, p: &mut Params<'_>| -> Option<Option<Template>> {
            let path = cx
                .opt_string(p, "path")
                .or_else(|| cx.opt_string(p, "file_path"))
                .map(Template);
            if path.is_none() && !in_step {
                cx.error(p.line, format!("{}: missing required parameter `path` (a precondition or postcondition has no step output to check)", p.what));
                return None;
            }
            Some(path)
        };
        Some(match kind {
            "file_exists" => CheckKind::FileExists {
                path: self.req_path(p)?,
            },
            "directory_exists" => CheckKind::DirectoryExists {
                path: self.req_path(p)?,
            },
            "content_contains" | "content_not_contains" => {
                let path = subject(self, p)?;
                let text = self
                    .opt_string(p, "text")
                    .or_else(|| self.opt_string(p, "substring"))
                    .or_else(|| self.opt_string(p, "pattern"))
                    .or_else(|| self.opt_string(p, "value"));
                let Some(text) = text else {
                    self.error(
                        p.line,
                        format!("{}: missing required parameter `text`", p.what),
                    );
                    return None;
                };
                let text = Template(text);
                if kind == "content_contains" {
                    CheckKind::ContentContains { path, text }
                } else {
                    CheckKind::ContentNotContains { path, text }
                }
            }
            "content_not_empty" => CheckKind::ContentNotEmpty {
                path: subject(self, p)?,
            },
            "regex_match" => {
                let path = subject(self, p)?;
                let pattern = self.req_string(p, "pattern")?;
                if let Err(e) = regex::RegexBuilder::new(&pattern)
                    .multi_line(true)
                    .size_limit(1 << 20)
                    .build()
                {
                    self.error(
                        p.line_of("pattern"),
                        format!("{}: invalid regular expression: {e}", p.what),
                    );
                    return None;
                }
                CheckKind::RegexMatch { path, pattern }
            }
            "command_exit_code" if !in_step => {
                self.error(line, format!("{}: `command_exit_code` checks a Bash step's exit code: expected it only in a step's validations", p.what));
                return None;
            }
            "command_exit_code" => {
                let expected = self
                    .opt_u64(p, "expected")
                    .or_else(|| self.opt_u64(p, "exit_code"))
                    .unwrap_or(0);
                CheckKind::CommandExitCode {
                    expected: i32::try_from(expected).unwrap_or(i32::MAX),
                }
            }
            "file_size_minimum" => {
                let path = subject(self, p)?;
                let Some(bytes) = self
                    .opt_u64(p, "bytes")
                    .or_else(|| self.opt_u64(p, "min_bytes"))
                    .or_else(|| self.opt_u64(p, "minimum_bytes"))
                else {
                    self.error(
                        p.line,
                        format!("{}: missing required parameter `bytes`", p.what),
                    );
                    return None;
                };
                CheckKind::FileSizeMinimum { path, bytes }
            }
            "json_valid" => CheckKind::JsonValid {
                path: subject(self, p)?,
            },
            "content_structure_check" => {
                let path = subject(self, p)?;
                let sections = match p.map.remove("required_sections") {
                    Some(Value::Sequence(items)) => {
                        items.iter().filter_map(scalar_text).collect::<Vec<_>>()
                    }
                    _ => {
                        self.error(p.line, format!("{}: missing required parameter `required_sections` (a list of headings)", p.what));
                        return None;
                    }
                };
                CheckKind::ContentStructureCheck {
                    path,
                    required_sections: sections,
                }
            }
            "json_schema" => {
                let path = subject(self, p)?;
                let Some(schema) = p.map.remove("schema") else {
                    self.error(p.line, format!("{}: missing required parameter `schema` (a JSON Schema, as YAML or JSON text)", p.what));
                    return None;
                };
                let schema = self.json_schema(p, "schema", &schema)?;
                CheckKind::JsonSchema { path, schema }
            }
            other => {
                self.error(
                    line,
                    format!(
                        "unknown validation type `{other}`: expected one of {}",
                        CHECK_TYPES.join(", ")
                    ),
                );
                return None;
            }
        })
    }
}
