//! Checks a trace source and lowers it to the IR ([`crate::trace`]); encodes and decodes the
//! compiled form.
//!
//! Compiled form: `b"TFC"`, one format-version byte ([`COMPILED_FORMAT_VERSION`]), then the
//! postcard encoding (postcard 1.x wire format) of [`Trace`]. Decoding refuses inputs over
//! [`MAX_COMPILED_BYTES`], a wrong magic or version, and trailing bytes.
//!
//! Where LLMunix was lax, this compiler is strict: unknown tools, unknown validation types,
//! unknown or missing parameters, unresolved `{variables}`, dependencies on missing or later
//! steps and duplicate step numbers are errors with `file:line:column`.

use crate::diag::{Diagnostic, Diagnostics, Severity};
use crate::ids::{TraceId, VarName, Version};
use crate::source::{self, Block, SourceForm, SourceStep, SourceTrace};
use crate::trace::{
    BUILTIN_VARIABLES, Check, CheckKind, DEFAULT_MAX_TOKENS, DEFAULT_STEP_TIMEOUT_SECS, Dependency,
    Foreach, ForeachSource, GrepOutput, Input, LlmCall, Metadata, OnError, OutputDecl,
    ShellContext, Step, Template, Tool, Trace,
};
use serde::Deserialize;
use serde_norway::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Magic bytes at the start of a compiled trace.
pub const COMPILED_MAGIC: &[u8; 3] = b"TFC";
/// The compiled format version this build writes and reads.
pub const COMPILED_FORMAT_VERSION: u8 = 3;
/// Largest compiled trace accepted by [`decode_compiled`] (bytes).
pub const MAX_COMPILED_BYTES: usize = 1024 * 1024;

/// Why compiled bytes were refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Over the size limit.
    #[error("compiled trace is {found} bytes: expected at most {limit}")]
    TooLarge {
        /// Bytes given.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// Not a compiled trace.
    #[error("not a compiled trace: expected magic bytes \"TFC\", found {found:02x?}")]
    BadMagic {
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// A format this build does not read.
    #[error(
        "compiled trace format version {found}: this build reads version {COMPILED_FORMAT_VERSION}"
    )]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The postcard body is malformed.
    #[error("malformed compiled trace body: {0}")]
    Body(#[from] postcard::Error),
    /// Bytes after the body.
    #[error("compiled trace has {0} trailing bytes after its body: expected none")]
    Trailing(usize),
}

/// Encodes a trace in the compiled form.
pub fn encode_compiled(trace: &Trace) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(COMPILED_MAGIC);
    out.push(COMPILED_FORMAT_VERSION);
    // Serialising plain data into a Vec cannot fail.
    postcard::to_extend(trace, out).unwrap_or_default()
}

/// Decodes a compiled trace with limits.
///
/// # Errors
/// [`DecodeError`] for oversize input, a wrong magic or version, a malformed body (including
/// ids and versions that fail validation) or trailing bytes.
pub fn decode_compiled(bytes: &[u8]) -> Result<Trace, DecodeError> {
    if bytes.len() > MAX_COMPILED_BYTES {
        return Err(DecodeError::TooLarge {
            found: bytes.len(),
            limit: MAX_COMPILED_BYTES,
        });
    }
    if bytes.len() < 4 || &bytes[..3] != COMPILED_MAGIC {
        return Err(DecodeError::BadMagic {
            found: bytes.iter().take(3).copied().collect(),
        });
    }
    if bytes[3] != COMPILED_FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: bytes[3] });
    }
    let (trace, rest) = postcard::take_from_bytes::<Trace>(&bytes[4..])?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(trace)
}

/// Parses and checks a trace source.
///
/// Returns the trace and any warnings.
///
/// # Errors
/// Every problem found, each with `file:line:column` (warnings included).
pub fn compile_source(file: &str, text: &str) -> Result<(Trace, Vec<Diagnostic>), Diagnostics> {
    let src = source::parse(file, text);
    let mut cx = Cx {
        file: file.to_owned(),
        form: src.form,
        diags: src.diagnostics.clone(),
    };
    let trace = cx.lower(&src);
    let mut diags = Diagnostics(cx.diags);
    diags.sort();
    match trace {
        Some(t) if !diags.has_errors() => Ok((t, diags.0)),
        _ => {
            if !diags.has_errors() {
                diags.0.push(Diagnostic {
                    severity: Severity::Error,
                    file: file.to_owned(),
                    line: 1,
                    column: 1,
                    message: "trace did not compile".into(),
                });
            }
            Err(diags)
        }
    }
}

#[derive(Deserialize, Default)]
struct RawFrontmatter {
    trace_id: Option<String>,
    experience_id: Option<String>,
    goal_signature: Option<String>,
    confidence: Option<f64>,
    estimated_cost: Option<f64>,
    estimated_time_secs: Option<f64>,
    success_rate: Option<f64>,
    usage_count: Option<u64>,
    created_at: Option<Value>,
    last_used: Option<Value>,
    version: Option<Value>,
    #[serde(default)]
    metadata: RawMetadata,
    #[serde(default)]
    preconditions: Vec<RawCondition>,
    #[serde(default)]
    postconditions: Vec<RawCondition>,
    #[serde(default)]
    outputs: Vec<RawOutput>,
    max_parallel: Option<u32>,
    read_paths: Option<Vec<String>>,
    #[serde(default)]
    inputs: BTreeMap<String, RawInput>,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawMetadata {
    #[serde(default)]
    task_type: String,
    #[serde(default)]
    domain: String,
    #[serde(default)]
    requires_internet: bool,
    #[serde(default)]
    requires_human: bool,
    #[serde(default)]
    risk_level: String,
    #[serde(default)]
    learned_by: String,
    #[serde(flatten)]
    _other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct RawCondition {
    #[serde(alias = "check")]
    condition: Option<String>,
    #[serde(alias = "type")]
    validation_type: String,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
}

/// A fenced block outside the steps (`## Post-Execution Validation`, `## Expected Outputs`).
#[derive(Deserialize)]
struct RawSection {
    postconditions: Option<Vec<RawCondition>>,
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawInput {
    Full {
        default: Option<Value>,
        #[serde(default)]
        description: String,
    },
    Default(Value),
}

#[derive(Deserialize)]
struct RawToolCall {
    tool: String,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
    output_variable: Option<String>,
    timeout_secs: Option<u32>,
    foreach: Option<Value>,
    allowed_commands: Option<Vec<String>>,
    #[serde(default)]
    allow_command_substitution: bool,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct RawCheck {
    check: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnError {
    action: String,
    retry_count: Option<u32>,
    delay_seconds: Option<f64>,
    fallback_step: Option<u32>,
    escalation_message: Option<String>,
    error_message: Option<String>,
}

/// Templates a step uses, with the source line of each (for unresolved-variable errors).
type TemplateUses = Vec<(usize, Template)>;

/// Parameters of one tool call or check, consumed by name so leftovers can be reported.
struct Params<'a> {
    map: BTreeMap<String, Value>,
    block: &'a Block,
    what: String,
    /// The line reported when a key's own line is unknown.
    line: usize,
    /// Source lines `from..to` that hold these parameters (keys are searched there only).
    span: (usize, usize),
}

struct Cx {
    file: String,
    form: SourceForm,
    diags: Vec<Diagnostic>,
}

impl Cx {
    fn error(&mut self, line: usize, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            severity: Severity::Error,
            file: self.file.clone(),
            line,
            column: 1,
            message: message.into(),
        });
    }

    fn warning(&mut self, line: usize, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            severity: Severity::Warning,
            file: self.file.clone(),
            line,
            column: 1,
            message: message.into(),
        });
    }

    fn yaml<T: for<'de> Deserialize<'de>>(&mut self, block: &Block, what: &str) -> Option<T> {
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

    fn lower(&mut self, src: &SourceTrace) -> Option<Trace> {
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
        if src.steps.is_empty() {
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
            let is_section = serde_norway::from_str::<Value>(&block.text).is_ok_and(|v| {
                v.as_mapping()
                    .is_some_and(|m| m.contains_key("postconditions") || m.contains_key("outputs"))
            });
            if !is_section {
                continue; // prose examples and other code are not part of the trace
            }
            let Some(section) = self.yaml::<RawSection>(block, "section") else {
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
            let p = std::path::Path::new(r);
            if !p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                self.error(
                    fm_block.line_of_key("read_paths", 0),
                    format!("read path {r:?}: expected an absolute path without `..`"),
                );
            }
        }
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
            steps,
        })
    }

    /// Reports each dependency cycle once, at the line of its lowest-numbered step.
    fn report_cycles(&mut self, graph: &BTreeMap<u32, Vec<u32>>, numbers: &HashMap<u32, usize>) {
        // 0 = unvisited, 1 = on the stack, 2 = done.
        let mut state: BTreeMap<u32, u8> = BTreeMap::new();
        let mut reported: BTreeSet<Vec<u32>> = BTreeSet::new();
        for &start in graph.keys() {
            let mut stack: Vec<(u32, usize)> = vec![(start, 0)];
            let mut path: Vec<u32> = Vec::new();
            while let Some((node, i)) = stack.pop() {
                if i == 0 {
                    if state.get(&node).copied().unwrap_or(0) != 0 {
                        continue;
                    }
                    state.insert(node, 1);
                    path.push(node);
                }
                let next = graph.get(&node).and_then(|d| d.get(i)).copied();
                match next {
                    Some(n) => {
                        stack.push((node, i + 1));
                        match state.get(&n).copied().unwrap_or(0) {
                            0 if graph.contains_key(&n) => stack.push((n, 0)),
                            1 => {
                                let from = path.iter().position(|&p| p == n).unwrap_or(0);
                                let mut cycle: Vec<u32> = path[from..].to_vec();
                                let lowest = cycle
                                    .iter()
                                    .enumerate()
                                    .min_by_key(|(_, v)| **v)
                                    .map_or(0, |(i, _)| i);
                                cycle.rotate_left(lowest);
                                if reported.insert(cycle.clone()) {
                                    let shown: Vec<String> = cycle
                                        .iter()
                                        .chain(cycle.first())
                                        .map(|n| format!("step {n}"))
                                        .collect();
                                    let line = numbers.get(&cycle[0]).copied().unwrap_or(1);
                                    self.error(
                                        line,
                                        format!(
                                            "dependency cycle: {} (each waits for the next)",
                                            shown.join(" → ")
                                        ),
                                    );
                                }
                            }
                            _ => {}
                        }
                    }
                    None => {
                        state.insert(node, 2);
                        path.pop();
                    }
                }
            }
        }
    }

    fn lower_conditions(&mut self, raw: &[RawCondition], block: &Block, key: &str) -> Vec<Check> {
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

    fn lower_step(
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
                                if !(0.0..=3600.0).contains(&delay_secs) {
                                    self.error(eb.line_of_key("delay_seconds", 0), format!("`delay_seconds` is {delay_secs}: expected 0 to 3600"));
                                }
                                if retry_count > 100 {
                                    self.error(eb.line_of_key("retry_count", 0), format!("`retry_count` is {retry_count}: expected at most 100"));
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
        });
        (step, uses, item_var)
    }

    fn lower_foreach(&mut self, v: &Value, line: usize, number: u32) -> Option<Foreach> {
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

    fn lower_tool(
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
                if !(0.0..=2.0).contains(&temperature) {
                    self.error(
                        p.line_of("temperature"),
                        format!("`temperature` is {temperature}: expected 0 (greedy) to 2"),
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

    fn lower_check_kind(
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

    fn req_path(&mut self, p: &mut Params<'_>) -> Option<Template> {
        match self
            .opt_string(p, "path")
            .or_else(|| self.opt_string(p, "file_path"))
        {
            Some(s) => Some(Template(s)),
            None => {
                self.error(
                    p.line,
                    format!("{}: missing required parameter `path`", p.what),
                );
                None
            }
        }
    }

    fn req_template(&mut self, p: &mut Params<'_>, key: &str) -> Option<Template> {
        self.req_string(p, key).map(Template)
    }

    fn req_string(&mut self, p: &mut Params<'_>, key: &str) -> Option<String> {
        let v = self.opt_string(p, key);
        if v.is_none() && !p.map.contains_key(key) {
            self.error(
                p.line,
                format!("{}: missing required parameter `{key}`", p.what),
            );
        }
        v
    }

    /// A JSON Schema given as YAML or JSON text under `key`, checked the way the follower
    /// builds its validator (draft from `$schema`, no remote `$ref`); its JSON text.
    fn json_schema(&mut self, p: &Params<'_>, key: &str, value: &Value) -> Option<String> {
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

    fn opt_string(&mut self, p: &mut Params<'_>, key: &str) -> Option<String> {
        let v = p.map.remove(key)?;
        match scalar_text(&v) {
            Some(s) => Some(s),
            None => {
                self.error(
                    p.line_of(key),
                    format!(
                        "{}: parameter `{key}`: expected text, found {}",
                        p.what,
                        kind_of(&v)
                    ),
                );
                None
            }
        }
    }

    fn opt_u64(&mut self, p: &mut Params<'_>, key: &str) -> Option<u64> {
        let v = p.map.remove(key)?;
        match v.as_u64() {
            Some(n) => Some(n),
            None => {
                self.error(
                    p.line_of(key),
                    format!(
                        "{}: parameter `{key}`: expected a non-negative integer, found {}",
                        p.what,
                        kind_of(&v)
                    ),
                );
                None
            }
        }
    }

    fn opt_bool(&mut self, p: &mut Params<'_>, key: &str) -> Option<bool> {
        let v = p.map.remove(key)?;
        match v.as_bool() {
            Some(b) => Some(b),
            None => {
                self.error(
                    p.line_of(key),
                    format!(
                        "{}: parameter `{key}`: expected true or false, found {}",
                        p.what,
                        kind_of(&v)
                    ),
                );
                None
            }
        }
    }

    fn opt_f64(&mut self, p: &mut Params<'_>, key: &str) -> Option<f64> {
        let v = p.map.remove(key)?;
        match v.as_f64() {
            Some(n) => Some(n),
            None => {
                self.error(
                    p.line_of(key),
                    format!(
                        "{}: parameter `{key}`: expected a number, found {}",
                        p.what,
                        kind_of(&v)
                    ),
                );
                None
            }
        }
    }

    /// Reports parameters nobody consumed.
    fn finish(&mut self, p: Params<'_>) {
        for key in p.map.keys() {
            self.error(
                p.line_of(key),
                format!("{}: unknown parameter `{key}`", p.what),
            );
        }
    }
}

impl Params<'_> {
    fn line_of(&self, key: &str) -> usize {
        self.block
            .find_key(key, self.span.0, self.span.1, 0)
            .unwrap_or(self.line)
    }
}

/// The tools of the trace language.
pub const TOOLS: &[&str] = &["Read", "Write", "Bash", "Grep", "Glob", "WebFetch", "LLM"];

/// Keys that belong under an LLM step's `parameters:`, refused (not ignored) elsewhere.
const LLM_PARAMETER_KEYS: &[&str] = &["json_schema", "grammar", "max_tokens", "temperature"];

/// Largest `max_tokens` an LLM step may ask for.
pub const MAX_MAX_TOKENS: u64 = 32_768;

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

/// Text of a YAML scalar (strings, numbers and booleans as written); `None` for collections.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Each step's prerequisites: its parsed **Dependencies** (when the line parses), else the
/// step before it in source order.
fn step_graph(src: &SourceTrace) -> BTreeMap<u32, Vec<u32>> {
    let mut prev = None;
    let mut g = BTreeMap::new();
    for s in &src.steps {
        let deps = match &s.dependencies {
            Some((text, _)) => parse_dependencies(text)
                .map(|d| d.into_iter().map(|(n, _)| n).collect())
                .unwrap_or_default(),
            None => prev.into_iter().collect(),
        };
        g.entry(s.number).or_insert(deps);
        prev = Some(s.number);
    }
    g
}

/// Every step that must finish before `step` runs.
fn ancestors(graph: &BTreeMap<u32, Vec<u32>>, step: u32) -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<u32> = graph.get(&step).cloned().unwrap_or_default();
    while let Some(n) = todo.pop() {
        if n != step && seen.insert(n) {
            todo.extend(graph.get(&n).into_iter().flatten().copied());
        }
    }
    seen
}

/// Parses `None` or `Step N (output_variable: name), Step M`.
fn parse_dependencies(text: &str) -> Result<Vec<(u32, Option<String>)>, String> {
    let t = text.trim();
    // LLMunix writes `None`, `None (first step)`, `None (can run in parallel with Step 1)`.
    let none = t.get(..4).is_some_and(|h| h.eq_ignore_ascii_case("none"))
        && t[4..].trim_start().chars().next().is_none_or(|c| c == '(');
    if t.is_empty() || none || t == "-" {
        return Ok(Vec::new());
    }
    let re = regex::Regex::new(
        r"^\s*[Ss]tep\s+(\d+)\s*(?:\(\s*output_variable\s*:\s*`?([^)`\s]+)`?\s*\))?\s*$",
    )
    .map_err(|e| e.to_string())?;
    t.split(',')
        .map(|part| {
            let c = re.captures(part).ok_or_else(|| part.trim().to_owned())?;
            let n = c[1].parse::<u32>().map_err(|_| part.trim().to_owned())?;
            Ok((n, c.get(2).map(|m| m.as_str().to_owned())))
        })
        .collect()
}
