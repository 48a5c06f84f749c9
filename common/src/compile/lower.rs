//! The trace as a whole: header (frontmatter or bold fields), inputs, step numbering,
//! variables bound to step outputs and their resolution, pre/postconditions, outputs.

use super::cx::{Cx, LLM_PARAMETER_KEYS, TemplateUses};
use super::deps::{ancestors, step_graph};
use super::params::scalar_text;
use super::raw::{RawFrontmatter, RawInput, RawOutput, RawSection};
use crate::ids::{TraceId, VarName, Version};
use crate::source::{SourceForm, SourceTrace};
use crate::trace::{BUILTIN_VARIABLES, Check, Input, Metadata, OutputDecl, Step, Trace};
use serde_norway::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};

impl Cx {
    pub(crate) fn lower(&mut self, src: &SourceTrace) -> Option<Trace> {
        let Some(fm_block) = &src.frontmatter else {
            self.error(1, "missing YAML frontmatter: expected the file to start with a `---` block holding trace_id, version and goal_signature");
            return None;
        };
        let fm: RawFrontmatter = self.yaml(fm_block, "frontmatter")?;
        for key in fm.unknown.keys() {
            let line = fm_block.line_of_key(key, 0);
            if LLM_PARAMETER_KEYS.contains(&key.as_str()) {
                self.error(
                    line,
                    format!("`{key}` is not a frontmatter key: expected it under `parameters:` of an LLM step"),
                );
            } else {
                self.warning(line, format!("unknown frontmatter key `{key}` is ignored"));
            }
        }
        let _ = &fm.last_used;

        let id = match fm.trace_id.as_deref().map(str::parse::<TraceId>) {
            Some(Ok(id)) => Some(id),
            Some(Err(e)) => {
                self.error(fm_block.line_of_key("trace_id", 0), e.to_string());
                None
            }
            None => {
                self.error(
                    fm_block.line,
                    match self.form {
                        SourceForm::Frontmatter => "missing `trace_id` in frontmatter: expected e.g. `trace_id: dpkg-log-triage`".to_owned(),
                        SourceForm::BoldFields => format!("missing {} in {}: expected e.g. `**Trace ID:** dpkg-log-triage`", self.form.key("trace_id"), self.form.header()),
                    },
                );
                None
            }
        };
        if let Some(Value::Number(n)) = &fm.version {
            self.warning(
                fm_block.line_of_key("version", 0),
                format!(
                    "`version` is written as the number {n}: quote it (YAML reads 1.10 as 1.1)"
                ),
            );
        }
        let version = match fm.version.as_ref().map(scalar_text) {
            Some(Some(v)) => match v.parse::<Version>() {
                Ok(v) => Some(v),
                Err(e) => {
                    self.error(fm_block.line_of_key("version", 0), e.to_string());
                    None
                }
            },
            Some(None) => {
                self.error(
                    fm_block.line_of_key("version", 0),
                    "`version` must be a string such as \"1.0.0\"",
                );
                None
            }
            None => {
                self.error(
                    fm_block.line,
                    match self.form {
                        SourceForm::Frontmatter => "missing `version` in frontmatter: expected e.g. `version: \"1.0.0\"`".to_owned(),
                        SourceForm::BoldFields => format!("missing {} in {}: expected e.g. `**Version:** 1.0.0`, or a trace id ending in `-vMAJOR.MINOR`", self.form.key("version"), self.form.header()),
                    },
                );
                None
            }
        };
        let goal_signature = fm.goal_signature.clone().unwrap_or_default();
        if goal_signature.trim().is_empty() {
            self.error(
                fm_block.line,
                format!(
                    "missing {} in {}: expected the normalised goal text",
                    self.form.key("goal_signature"),
                    self.form.header()
                ),
            );
        }
        for (key, v) in [
            ("confidence", fm.confidence),
            ("success_rate", fm.success_rate),
        ] {
            if let Some(v) = v
                && !(0.0..=1.0).contains(&v)
            {
                self.error(
                    fm_block.line_of_key(key, 0),
                    format!("`{key}` is {v}: expected a number from 0 to 1"),
                );
            }
        }

        // Inputs.
        let mut inputs = Vec::new();
        for (name, raw) in &fm.inputs {
            let line = fm_block.line_of_key(name, 0);
            let Ok(var) = name.parse::<VarName>() else {
                self.error(
                    line,
                    format!("input name `{name}`: expected [A-Za-z_][A-Za-z0-9_]*"),
                );
                continue;
            };
            if BUILTIN_VARIABLES.contains(&name.as_str()) {
                self.error(line, format!("input `{name}` shadows a built-in variable"));
            }
            let (default, description) = match raw {
                RawInput::Full {
                    default,
                    description,
                } => (default.as_ref(), description.clone()),
                RawInput::Default(v) => (Some(v), String::new()),
            };
            let default = match default.map(scalar_text) {
                Some(Some(s)) => Some(s),
                Some(None) => {
                    self.error(
                        line,
                        format!("input `{name}` default: expected a string, number or boolean"),
                    );
                    None
                }
                None => None,
            };
            inputs.push(Input {
                name: var,
                default,
                description,
            });
        }

        // Steps.
        if src.steps.is_empty() && src.rejected_step_headings == 0 {
            self.error(
                fm_block.line,
                "the trace has no steps: expected at least one `### Step N: title` section",
            );
        }
        let mut numbers = HashMap::new();
        let mut prev = 0u32;
        for s in &src.steps {
            if let Some(first) = numbers.insert(s.number, s.line) {
                self.error(
                    s.line,
                    format!(
                        "duplicate step number {}: step {} is already defined at line {first}",
                        s.number, s.number
                    ),
                );
            } else if s.number <= prev {
                self.error(
                    s.line,
                    format!(
                        "step {} follows step {prev}: expected ascending step numbers",
                        s.number
                    ),
                );
            }
            prev = prev.max(s.number);
        }

        // Variables bound to step outputs: name → producing step.
        let mut bound: BTreeMap<String, u32> = BTreeMap::new();
        let mut steps = Vec::new();
        let mut lowered: Vec<(u32, Option<Step>, TemplateUses)> = Vec::new();
        let mut item_vars: HashMap<u32, String> = HashMap::new();
        for s in &src.steps {
            let (step, uses, item) = self.lower_step(s, &numbers, &mut bound);
            if let Some(item) = item {
                item_vars.insert(s.number, item);
            }
            lowered.push((s.number, step, uses));
        }
        let inputs_set: BTreeSet<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        let graph = step_graph(src);
        self.report_cycles(&graph, &numbers);
        for (number, _, uses) in &lowered {
            let before = ancestors(&graph, *number);
            for (line, t) in uses {
                for v in t.variables() {
                    let ok = inputs_set.contains(v)
                        || BUILTIN_VARIABLES.contains(&v)
                        || item_vars.get(number).is_some_and(|i| i == v)
                        || bound.get(v).is_some_and(|n| before.contains(n));
                    if !ok {
                        let why = match bound.get(v) {
                            Some(n) => format!(
                                "it is the output of step {n}, which step {number} does not wait for (add `Step {n}` to its **Dependencies**)"
                            ),
                            None => "not an input, not a step's output_variable, not a built-in"
                                .to_owned(),
                        };
                        self.error(
                            *line,
                            format!("unresolved variable `{{{v}}}` in step {number}: {why}"),
                        );
                    }
                }
            }
        }
        for (name, step) in &bound {
            if BUILTIN_VARIABLES.contains(&name.as_str()) || inputs_set.contains(name.as_str()) {
                let line = numbers.get(step).copied().unwrap_or(fm_block.line);
                let what = if inputs_set.contains(name.as_str()) {
                    "an input"
                } else {
                    "a built-in variable"
                };
                self.error(line, format!("output variable `{name}` of step {step} shadows {what}: choose another name"));
            }
        }
        let complete = lowered.iter().all(|(_, s, _)| s.is_some());
        steps.extend(lowered.into_iter().filter_map(|(_, s, _)| s));

        let all_vars = |cx: &mut Cx, checks: &[Check], line: usize, what: &str| {
            // Preconditions run before any step, so they cannot use step outputs.
            let outputs_ready = what == "postcondition";
            for c in checks {
                for t in c.kind.templates() {
                    for v in t.variables() {
                        if !(inputs_set.contains(v)
                            || BUILTIN_VARIABLES.contains(&v)
                            || (outputs_ready && bound.contains_key(v)))
                        {
                            cx.error(
                                line,
                                format!(
                                    "unresolved variable `{{{v}}}` in {what} {:?}",
                                    c.description
                                ),
                            );
                        }
                    }
                }
            }
        };
        let preconditions = self.lower_conditions(&fm.preconditions, fm_block, "preconditions");
        all_vars(
            self,
            &preconditions,
            fm_block.line_of_key("preconditions", 0),
            "precondition",
        );
        let mut postconditions =
            self.lower_conditions(&fm.postconditions, fm_block, "postconditions");
        all_vars(
            self,
            &postconditions,
            fm_block.line_of_key("postconditions", 0),
            "postcondition",
        );
        let mut raw_outputs: Vec<RawOutput> = fm.outputs;
        for block in &src.sections {
            // A block that starts a top-level `postconditions:` or `outputs:` key is part of
            // the trace, parsed or not: a block that does not parse (a syntax error, a
            // duplicate key, an alias bomb) is an error, never a silently dropped check.
            // Other blocks are prose examples and other code.
            let declares = block.text.lines().any(|l| {
                let key = l.split(':').next().unwrap_or("");
                l.contains(':') && (key == "postconditions" || key == "outputs")
            });
            let is_section = declares
                || serde_norway::from_str::<Value>(&block.text).is_ok_and(|v| {
                    v.as_mapping().is_some_and(|m| {
                        m.contains_key("postconditions") || m.contains_key("outputs")
                    })
                });
            if !is_section {
                continue;
            }
            let Some(section) = self.yaml::<RawSection>(block, "postconditions/outputs section")
            else {
                continue;
            };
            if let Some(raw) = section.postconditions {
                if !postconditions.is_empty() {
                    self.error(block.line, "postconditions are given twice (frontmatter and a section): expected one list");
                }
                let more = self.lower_conditions(&raw, block, "postconditions");
                all_vars(self, &more, block.line, "postcondition");
                postconditions.extend(more);
            }
            if let Some(outs) = section.outputs {
                raw_outputs.extend(outs);
            }
        }
        let outputs = raw_outputs
            .into_iter()
            .map(|o| OutputDecl {
                name: o.name,
                kind: o.kind,
                location: o.location,
                description: o.description,
            })
            .collect();

        let max_parallel = match fm.max_parallel {
            Some(0) => {
                self.error(
                    fm_block.line_of_key("max_parallel", 0),
                    "`max_parallel` is 0: expected at least 1",
                );
                1
            }
            Some(n) => n,
            None => 1,
        };
        let read_paths = fm.read_paths.clone().unwrap_or_default();
        for r in &read_paths {
            if !crate::trace::is_valid_read_path(r) {
                self.error(
                    fm_block.line_of_key("read_paths", 0),
                    format!("read path {r:?}: expected an absolute path without `..`"),
                );
            }
        }
        let report_outputs = match fm.report_outputs.as_deref() {
            None | Some("full") => crate::trace::ReportOutputs::Full,
            Some("hashed") => crate::trace::ReportOutputs::Hashed,
            Some(other) => {
                self.error(
                    fm_block.line_of_key("report_outputs", 0),
                    format!("`report_outputs: {other}`: expected `full` or `hashed`"),
                );
                crate::trace::ReportOutputs::Full
            }
        };
        let created_at = fm
            .created_at
            .as_ref()
            .and_then(scalar_text)
            .unwrap_or_default();
        if !complete {
            return None;
        }
        Some(Trace {
            id: id?,
            version: version?,
            goal_signature,
            confidence: fm.confidence.unwrap_or(0.75),
            success_rate: fm.success_rate.unwrap_or(1.0),
            usage_count: fm.usage_count.unwrap_or(0),
            estimated_cost: fm.estimated_cost.unwrap_or(0.0),
            estimated_time_secs: fm.estimated_time_secs.unwrap_or(0.0),
            created_at,
            experience_id: fm.experience_id.unwrap_or_default(),
            metadata: Metadata {
                task_type: fm.metadata.task_type,
                domain: fm.metadata.domain,
                requires_internet: fm.metadata.requires_internet,
                requires_human: fm.metadata.requires_human,
                risk_level: fm.metadata.risk_level,
                learned_by: fm.metadata.learned_by,
            },
            inputs,
            preconditions,
            postconditions,
            outputs,
            max_parallel,
            read_paths,
            report_outputs,
            steps,
        })
    }
}
