//! One step: its dependencies, tool call, error handling, `foreach` and the templates it uses.

use super::cx::{Cx, LLM_PARAMETER_KEYS, Params, TemplateUses};
use super::deps::parse_dependencies;
use super::raw::{RawCheck, RawOnError, RawToolCall};
use crate::ids::VarName;
use crate::judgement::OnUncertain;
use crate::source::{SourceForm, SourceStep};
use crate::trace::{
    Check, DEFAULT_STEP_TIMEOUT_SECS, Dependency, Foreach, ForeachSource, MAX_RETRY_COUNT,
    MAX_RETRY_DELAY_SECS, OnError, Step, Template, Tool,
};
use serde_norway::Value;
use std::collections::{BTreeMap, HashMap};

impl Cx {
    pub(crate) fn lower_step(
        &mut self,
        s: &SourceStep,
        numbers: &HashMap<u32, usize>,
        bound: &mut BTreeMap<String, u32>,
    ) -> (Option<Step>, TemplateUses, Option<String>) {
        let mut ok = true;
        let mut item_var: Option<String> = None;
        // Dependencies.
        let mut dependencies = Vec::new();
        let explicit = s.dependencies.is_some();
        if let Some((text, line)) = &s.dependencies {
            match parse_dependencies(text) {
                Ok(deps) => {
                    for (step, var) in deps {
                        if !numbers.contains_key(&step) {
                            self.error(
                                *line,
                                format!(
                                    "step {} depends on step {step}, which does not exist",
                                    s.number
                                ),
                            );
                            ok = false;
                        } else if step == s.number {
                            self.error(*line, format!("step {} depends on itself", s.number));
                            ok = false;
                        }
                        let output_variable = match var.map(|v| v.parse::<VarName>()) {
                            Some(Ok(v)) => {
                                if let Some(prev) = bound.insert(v.as_str().to_owned(), step)
                                    && prev != step
                                {
                                    self.error(*line, format!("output variable `{v}` names step {step}, but it already names step {prev}"));
                                }
                                Some(v)
                            }
                            Some(Err(e)) => {
                                self.error(*line, e.to_string());
                                None
                            }
                            None => None,
                        };
                        dependencies.push(Dependency {
                            step,
                            output_variable,
                        });
                    }
                }
                Err(found) => {
                    self.error(*line, format!("malformed **Dependencies**: expected `None` or `Step N (output_variable: name)` separated by commas, found {found:?}"));
                    ok = false;
                }
            }
        }

        // Tool call.
        let Some(tc_block) = &s.tool_call else {
            match self.form {
                SourceForm::Frontmatter => self.error(s.line, format!("step {} has no **Tool Call**: block: expected a fenced YAML block with `tool` and `parameters`", s.number)),
                SourceForm::BoldFields => self.error(s.line, format!("step {} names no tool (bold-field form): expected `**Tool:** NAME`, or `**Tool Call:**` followed by a `- **Tool:** NAME` bullet", s.number)),
            }
            return (None, Vec::new(), None);
        };
        let Some(raw) =
            self.yaml::<RawToolCall>(tc_block, &format!("tool call of step {}", s.number))
        else {
            return (None, Vec::new(), None);
        };
        for key in raw.unknown.keys() {
            let line = tc_block.line_of_key(key, 0);
            if LLM_PARAMETER_KEYS.contains(&key.as_str()) {
                self.error(
                    line,
                    format!(
                        "`{key}` in step {} is misplaced: expected it under `parameters:` of an LLM step",
                        s.number
                    ),
                );
            } else {
                self.warning(
                    line,
                    format!(
                        "unknown tool call key `{key}` in step {} is ignored",
                        s.number
                    ),
                );
            }
        }
        let mut output_variable = None;
        if let Some(v) = &raw.output_variable {
            match v.parse::<VarName>() {
                Ok(v) => {
                    output_variable = Some(v.clone());
                    if let Some(prev) = bound.insert(v.as_str().to_owned(), s.number)
                        && prev != s.number
                    {
                        self.error(tc_block.line_of_key("output_variable", 0), format!("output variable `{v}` names step {}, but it already names step {prev}", s.number));
                    }
                }
                Err(e) => self.error(tc_block.line_of_key("output_variable", 0), e.to_string()),
            }
        }
        let tool_line = tc_block.line_of_key("tool", 0);
        let mut p = Params {
            map: raw.parameters.clone(),
            block: tc_block,
            what: format!("{} tool in step {}", raw.tool, s.number),
            line: tc_block.line_of_key("parameters", 0),
            span: (tc_block.line, tc_block.end_line()),
        };
        let tool = self.lower_tool(&raw.tool, &mut p, s.number, tool_line);
        if let Some(Tool::Llm(call)) = &tool
            && let OnUncertain::Fallback(f) = call.judgement.on_uncertain
        {
            let line = p.line_of("on_uncertain");
            if !numbers.contains_key(&f) {
                self.error(
                    line,
                    format!(
                        "on_uncertain fallback_step {f} of step {} does not exist",
                        s.number
                    ),
                );
            } else if f == s.number {
                self.error(
                    line,
                    format!("step {} falls back to itself when uncertain", s.number),
                );
            }
        }
        self.finish(p);

        // Validations.
        let mut validations = Vec::new();
        let mut uses: Vec<(usize, Template)> = tool
            .iter()
            .flat_map(Tool::templates)
            .map(|t| (tc_block.line_of_key("parameters", 0), t.clone()))
            .collect();
        if let Some(vb) = &s.validation {
            let what = format!("validation of step {}", s.number);
            if let Some(raw) = self.yaml::<Option<Vec<RawCheck>>>(vb, &what) {
                for (i, c) in raw.unwrap_or_default().into_iter().enumerate() {
                    let line = vb.line_of_item(i);
                    let next = vb.line_of_item(i + 1);
                    let span = (line, if next > line { next } else { vb.end_line() });
                    let mut p = Params {
                        map: c.parameters,
                        block: vb,
                        what: format!("validation `{}` of step {}", c.kind, s.number),
                        line,
                        span,
                    };
                    if let Some(t) = tool.as_ref().filter(|t| {
                        c.kind == "command_exit_code" && !matches!(t, Tool::Bash { .. })
                    }) {
                        self.error(line, format!("`command_exit_code` validation on a {} step: expected it only on Bash steps", t.name()));
                    }
                    if let Some(kind) = self.lower_check_kind(&c.kind, &mut p, true, line) {
                        self.finish(p);
                        uses.extend(kind.templates().into_iter().map(|t| (line, t.clone())));
                        validations.push(Check {
                            description: c.check.unwrap_or_else(|| c.kind.clone()),
                            kind,
                        });
                    }
                }
            } else {
                ok = false;
            }
        }

        // Error handling.
        let mut on_error = OnError::Fail;
        if let Some(eb) = &s.error_handling {
            let what = format!("error handling of step {}", s.number);
            if let Some(v) = self.yaml::<Value>(eb, &what) {
                let inner = match &v {
                    Value::Mapping(m) if m.contains_key("on_error") => {
                        m.get("on_error").cloned().unwrap_or(Value::Null)
                    }
                    _ => v.clone(),
                };
                match serde_norway::from_value::<RawOnError>(inner) {
                    Ok(r) => {
                        let line = eb.line_of_key("action", 0);
                        let fb_line = eb.line_of_key("fallback_step", 0);
                        if let Some(f) = r.fallback_step {
                            if !numbers.contains_key(&f) {
                                self.error(fb_line, format!("fallback_step {f} of step {} does not exist", s.number));
                            } else if f == s.number {
                                self.error(fb_line, format!("step {} falls back to itself", s.number));
                            }
                        }
                        let message = r.escalation_message.clone().or_else(|| r.error_message.clone());
                        on_error = match r.action.as_str() {
                            "fail" | "abort" => OnError::Fail,
                            "skip" | "continue" => OnError::Skip,
                            "retry" => {
                                let retry_count = r.retry_count.unwrap_or(1);
                                let delay_secs = r.delay_seconds.unwrap_or(0.0);
                                if !(0.0..=MAX_RETRY_DELAY_SECS).contains(&delay_secs) {
                                    self.error(eb.line_of_key("delay_seconds", 0), format!("`delay_seconds` is {delay_secs}: expected 0 to {MAX_RETRY_DELAY_SECS}"));
                                }
                                if retry_count > MAX_RETRY_COUNT {
                                    self.error(eb.line_of_key("retry_count", 0), format!("`retry_count` is {retry_count}: expected at most {MAX_RETRY_COUNT}"));
                                }
                                OnError::Retry { retry_count, delay_secs, fallback_step: r.fallback_step }
                            }
                            "fallback" | "fallback_step" => match r.fallback_step {
                                Some(step) => OnError::Fallback { step },
                                None => {
                                    self.error(line, format!("error action `{}` in step {} needs `fallback_step`", r.action, s.number));
                                    OnError::Fail
                                }
                            },
                            "human_escalate" | "escalate" => OnError::Escalate {
                                message: message.unwrap_or_else(|| format!("step {} ({}) failed", s.number, s.title)),
                            },
                            other => {
                                self.error(line, format!("unknown error action `{other}` in step {}: expected retry, skip, fail, fallback or human_escalate", s.number));
                                OnError::Fail
                            }
                        };
                        if r.fallback_step.is_some()
                            && !matches!(on_error, OnError::Retry { .. } | OnError::Fallback { .. })
                        {
                            self.error(fb_line, format!("`fallback_step` in step {} has no effect with action `{}`: expected action retry or fallback", s.number, r.action));
                        }
                    }
                    Err(e) => self.error(eb.line, format!("invalid {what}: {e}: expected `on_error: {{action, retry_count, delay_seconds}}`")),
                }
            }
        }

        let foreach = raw.foreach.as_ref().and_then(|v| {
            let line = tc_block.line_of_key("foreach", 0);
            let f = self.lower_foreach(v, line, s.number)?;
            // The item variable is in scope in this step's templates and validations.
            item_var = Some(f.var.to_string());
            Some(f)
        });
        let allowed_commands = raw.allowed_commands.clone();
        if let Some(cmds) = &allowed_commands {
            let line = tc_block.line_of_key("allowed_commands", 0);
            if !matches!(tool.as_ref(), Some(Tool::Bash { .. })) {
                self.error(
                    line,
                    format!(
                        "`allowed_commands` in step {}: expected it only on Bash steps",
                        s.number
                    ),
                );
            }
            for c in cmds {
                if c.is_empty() || c.contains(|ch: char| ch.is_whitespace() || ch == '/') {
                    self.error(line, format!("`allowed_commands` entry {c:?} in step {}: expected a command name (no spaces, no path)", s.number));
                }
            }
        }
        if raw.allow_command_substitution && !matches!(tool.as_ref(), Some(Tool::Bash { .. })) {
            self.error(
                tc_block.line_of_key("allow_command_substitution", 0),
                format!(
                    "`allow_command_substitution` in step {}: expected it only on Bash steps",
                    s.number
                ),
            );
        }
        if let Some(Tool::Bash { command }) = tool.as_ref() {
            let (text, _) = command.render_shell(|_| Some("")).unwrap_or_default();
            if let Err(e) = crate::shell::check(
                &text,
                allowed_commands.as_deref(),
                raw.allow_command_substitution,
            ) {
                self.error(
                    tc_block.line_of_key("command", 0),
                    format!("step {}: {e}", s.number),
                );
            }
        }
        let timeout_secs = match raw.timeout_secs {
            Some(0) => {
                self.error(
                    tc_block.line_of_key("timeout_secs", 0),
                    "`timeout_secs` is 0: expected at least 1",
                );
                DEFAULT_STEP_TIMEOUT_SECS
            }
            Some(t) => t,
            None => DEFAULT_STEP_TIMEOUT_SECS,
        };

        let step = tool.filter(|_| ok).map(|tool| Step {
            number: s.number,
            title: s.title.clone(),
            line: u32::try_from(s.line).unwrap_or(u32::MAX),
            tool,
            validations,
            on_error,
            dependencies,
            explicit_dependencies: explicit,
            timeout_secs,
            output_variable,
            foreach,
            allowed_commands,
            command_substitution: raw.allow_command_substitution,
            sensitive: raw.sensitive,
        });
        (step, uses, item_var)
    }

    pub(crate) fn lower_foreach(&mut self, v: &Value, line: usize, number: u32) -> Option<Foreach> {
        const EXPECTED: &str = "expected `foreach: \"GLOB\"` or a mapping with one of `glob`, `lines`, `json` and an optional `as`";
        let (over, var) = match v {
            Value::String(g) => (ForeachSource::Glob(g.clone()), None),
            Value::Mapping(m) => {
                let get = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
                let var_source = |cx: &mut Cx, name: String| match name.parse::<VarName>() {
                    Ok(v) => Some(v),
                    Err(e) => {
                        cx.error(line, format!("foreach in step {number}: {e}"));
                        None
                    }
                };
                let over = match (get("glob"), get("lines"), get("json")) {
                    (Some(g), None, None) => ForeachSource::Glob(g),
                    (None, Some(l), None) => ForeachSource::Lines(var_source(self, l)?),
                    (None, None, Some(j)) => ForeachSource::JsonArray(var_source(self, j)?),
                    _ => {
                        self.error(line, format!("foreach in step {number}: {EXPECTED}"));
                        return None;
                    }
                };
                (over, get("as"))
            }
            _ => {
                self.error(line, format!("foreach in step {number}: {EXPECTED}"));
                return None;
            }
        };
        if let ForeachSource::Glob(g) = &over
            && let Err(e) = glob::Pattern::new(g)
        {
            self.error(
                line,
                format!("foreach in step {number}: invalid glob {g:?}: {e}"),
            );
            return None;
        }
        let var = match var.unwrap_or_else(|| "item".into()).parse::<VarName>() {
            Ok(v) => v,
            Err(e) => {
                self.error(line, format!("foreach in step {number}: {e}"));
                return None;
            }
        };
        Some(Foreach { over, var })
    }
}
