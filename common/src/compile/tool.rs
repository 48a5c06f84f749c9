//! Each tool's parameters (Read, Write, Bash, Grep, Glob, WebFetch, LLM) and an LLM step's
//! JSON Schema, checked the way the follower uses them.

use super::cx::{Cx, MAX_MAX_TOKENS, Params, TOOLS};
use super::judgement::Constraint;
use super::params::scalar_text;
use crate::trace::{
    DEFAULT_MAX_TOKENS, GrepOutput, LlmCall, MAX_TEMPERATURE, ShellContext, Template, Tool,
};
use serde_norway::Value;

impl Cx {
    pub(crate) fn lower_tool(
        &mut self,
        tool_name: &str,
        p: &mut Params<'_>,
        number: u32,
        tool_line: usize,
    ) -> Option<Tool> {
        let p = &mut *p;
        match tool_name {
            "Read" => Some(Tool::Read {
                file_path: self.req_template(p, "file_path")?,
                offset: self.opt_u64(p, "offset"),
                limit: self.opt_u64(p, "limit"),
            }),
            "Write" => {
                let file_path = self.req_template(p, "file_path");
                let content = self.req_template(p, "content");
                Some(Tool::Write {
                    file_path: file_path?,
                    content: content?,
                })
            }
            "Bash" => {
                let command = self.req_template(p, "command")?;
                let _ = self.opt_string(p, "description");
                for (v, ctx) in command.shell_contexts() {
                    if ctx == ShellContext::SingleQuoted {
                        self.error(
                            p.line_of("command"),
                            format!("`{{{v}}}` is inside single quotes in the command, where the shell does not expand it: move it outside the quotes or into double quotes"),
                        );
                    }
                }
                Some(Tool::Bash { command })
            }
            "LLM" | "Task" => {
                if tool_name == "Task" {
                    let _ = self.opt_string(p, "description");
                    let _ = self.opt_string(p, "subagent_type");
                }
                let prompt = self.req_template(p, "prompt")?;
                let system = self.opt_string(p, "system").map(Template);
                let model = self.opt_string(p, "model");
                let max_tokens = self
                    .opt_u64(p, "max_tokens")
                    .map_or(u64::from(DEFAULT_MAX_TOKENS), |v| v);
                if !(1..=MAX_MAX_TOKENS).contains(&max_tokens) {
                    self.error(
                        p.line_of("max_tokens"),
                        format!("`max_tokens` is {max_tokens}: expected 1 to {MAX_MAX_TOKENS}"),
                    );
                }
                let max_tokens =
                    u32::try_from(max_tokens.min(MAX_MAX_TOKENS)).unwrap_or(DEFAULT_MAX_TOKENS);
                let temperature = self.opt_f64(p, "temperature").unwrap_or(0.0) as f32;
                if !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
                    self.error(
                        p.line_of("temperature"),
                        format!("`temperature` is {temperature}: expected 0 (greedy) to {MAX_TEMPERATURE}"),
                    );
                }
                let top_p = self.opt_f64(p, "top_p").unwrap_or(1.0) as f32;
                if !(top_p > 0.0 && top_p <= 1.0) {
                    self.error(
                        p.line_of("top_p"),
                        format!("`top_p` is {top_p}: expected more than 0 and at most 1"),
                    );
                }
                let seed = self
                    .opt_u64(p, "seed")
                    .unwrap_or(0)
                    .min(u64::from(u32::MAX)) as u32;
                let json_schema = match p.map.remove("json_schema") {
                    None => None,
                    Some(v) => Some(self.json_schema(p, "json_schema", &v)?),
                };
                let grammar = self.opt_string(p, "grammar");
                if grammar.is_some() && json_schema.is_some() {
                    self.error(
                        p.line_of("json_schema"),
                        format!("{}: both `grammar` and `json_schema`: expected one constraint on the output", p.what),
                    );
                }
                if let Some(g) = &grammar
                    && !g
                        .lines()
                        .any(|l| l.trim_start().starts_with("root") && l.contains("::="))
                {
                    self.error(p.line_of("grammar"), "`grammar` has no `root ::= ...` rule: expected a GBNF grammar whose start rule is `root`");
                }
                let stop = match p.map.remove("stop") {
                    None => Vec::new(),
                    Some(Value::String(s)) => vec![s],
                    Some(Value::Sequence(items)) => items.iter().filter_map(scalar_text).collect(),
                    Some(_) => {
                        self.error(
                            p.line_of("stop"),
                            "`stop`: expected a string or a list of strings",
                        );
                        Vec::new()
                    }
                };
                let judgement = self.lower_judgement(
                    p,
                    &prompt,
                    system.as_ref(),
                    &Constraint {
                        grammar: grammar.as_deref(),
                        json_schema: json_schema.as_deref(),
                    },
                );
                Some(Tool::Llm(LlmCall {
                    prompt,
                    system,
                    model,
                    max_tokens,
                    temperature,
                    top_p,
                    seed,
                    grammar,
                    json_schema,
                    stop,
                    judgement,
                }))
            }
            "Grep" => {
                let pattern = self.req_string(p, "pattern")?;
                if let Err(e) = regex::RegexBuilder::new(&pattern)
                    .size_limit(1 << 20)
                    .build()
                {
                    self.error(
                        p.line_of("pattern"),
                        format!("{}: invalid regular expression: {e}", p.what),
                    );
                    return None;
                }
                let path = self.opt_string(p, "path").map(Template);
                let glob = self.opt_string(p, "glob");
                if let Some(g) = &glob
                    && let Err(e) = glob::Pattern::new(g)
                {
                    self.error(
                        p.line_of("glob"),
                        format!("{}: invalid glob {g:?}: {e}", p.what),
                    );
                }
                let case_insensitive = self
                    .opt_bool(p, "-i")
                    .or_else(|| self.opt_bool(p, "case_insensitive"))
                    .unwrap_or(false);
                let output_mode = match self.opt_string(p, "output_mode").as_deref() {
                    None | Some("content") => GrepOutput::Content,
                    Some("files_with_matches") => GrepOutput::FilesWithMatches,
                    Some("count") => GrepOutput::Count,
                    Some(other) => {
                        self.error(p.line_of("output_mode"), format!("{}: `output_mode` is {other:?}: expected content, files_with_matches or count", p.what));
                        return None;
                    }
                };
                Some(Tool::Grep {
                    pattern,
                    path,
                    glob,
                    case_insensitive,
                    output_mode,
                })
            }
            "Glob" => {
                let pattern = self.req_string(p, "pattern")?;
                if let Err(e) = glob::Pattern::new(&pattern) {
                    self.error(
                        p.line_of("pattern"),
                        format!("{}: invalid glob {pattern:?}: {e}", p.what),
                    );
                    return None;
                }
                if pattern.starts_with('/') || pattern.split('/').any(|c| c == "..") {
                    self.error(p.line_of("pattern"), format!("{}: glob {pattern:?} must be relative without `..`: put the directory in `path`", p.what));
                    return None;
                }
                let path = self.opt_string(p, "path").map(Template);
                Some(Tool::Glob { pattern, path })
            }
            "WebFetch" => {
                let url = self.req_template(p, "url")?;
                let prompt = self.opt_string(p, "prompt").map(Template);
                Some(Tool::WebFetch { url, prompt })
            }
            other => {
                self.error(tool_line, format!("unknown tool `{other}` in step {number}: expected one of {} (or LLMunix Task)", TOOLS.join(", ")));
                p.map.clear(); // its parameters cannot be judged
                None
            }
        }
    }

    /// A JSON Schema given as YAML or JSON text under `key`, checked the way the follower
    /// builds its validator (draft from `$schema`, no remote `$ref`); its JSON text.
    pub(crate) fn json_schema(
        &mut self,
        p: &Params<'_>,
        key: &str,
        value: &Value,
    ) -> Option<String> {
        let schema = match value {
            Value::String(text) => {
                serde_json::from_str::<serde_json::Value>(text).map_err(|e| e.to_string())
            }
            other => serde_json::to_value(other).map_err(|e| e.to_string()),
        };
        match schema {
            Ok(v) if v.is_object() || v.is_boolean() => {
                // The follower builds the same validator; a schema it could not use is an
                // authoring error. No remote `$ref`: nothing is fetched.
                if let Err(e) = jsonschema::validator_for(&v) {
                    self.error(
                        p.line_of(key),
                        format!("{}: `{key}` is not a usable JSON Schema: {e}", p.what),
                    );
                    return None;
                }
                Some(v.to_string())
            }
            Ok(_) => {
                self.error(
                    p.line_of(key),
                    format!("{}: `{key}` must be a JSON Schema object", p.what),
                );
                None
            }
            Err(e) => {
                self.error(
                    p.line_of(key),
                    format!("{}: `{key}` is not valid JSON: {e}", p.what),
                );
                None
            }
        }
    }
}
