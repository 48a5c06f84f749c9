//! The typed intermediate representation of a trace: what [`crate::compile`] produces from a
//! trace source, what is postcard-encoded into a compiled trace, and what the follower executes.
//!
//! Every field has been checked: tools are known, required parameters are present, every
//! `{variable}` resolves, dependencies point at earlier steps. Executing code may rely on that.

use crate::ids::{TraceId, VarName, Version};
use crate::judgement::Judgement;
use serde::{Deserialize, Serialize};

/// A compiled trace: a goal plus the ordered steps that achieved it once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Stable identity across versions.
    pub id: TraceId,
    /// Version of this content; never goes backwards on a device.
    pub version: Version,
    /// Normalised text naming the goal this trace achieves.
    pub goal_signature: String,
    /// Confidence (0..=1) the author recorded; devices keep their own from runs.
    pub confidence: f64,
    /// Success rate (0..=1) the author recorded.
    pub success_rate: f64,
    /// Runs the author recorded.
    pub usage_count: u64,
    /// Estimated cost of a run in US dollars.
    pub estimated_cost: f64,
    /// Estimated wall time of a run in seconds.
    pub estimated_time_secs: f64,
    /// When the trace was learned (RFC 3339 text as written by the author; may be empty).
    pub created_at: String,
    /// The learner's memory entry this trace came from (LLMunix `experience_id`; may be empty).
    pub experience_id: String,
    /// Descriptive metadata.
    pub metadata: Metadata,
    /// Named inputs, set with `--var NAME=VALUE`.
    pub inputs: Vec<Input>,
    /// Checked before the first step; a failed precondition fails the run without running a step.
    pub preconditions: Vec<Check>,
    /// Checked after the last step.
    pub postconditions: Vec<Check>,
    /// What the trace produces (informational).
    pub outputs: Vec<OutputDecl>,
    /// Most steps the follower may run at once (≥ 1).
    pub max_parallel: u32,
    /// Absolute directories the trace reads outside its base directory; narrows the device's
    /// read-only roots (empty: the device's defaults).
    pub read_paths: Vec<String>,
    /// What reports carry of step outputs (`report_outputs:`; default `full`).
    pub report_outputs: ReportOutputs,
    /// Steps in source order (ascending step number); see [`Trace::execution_order`].
    pub steps: Vec<Step>,
}

impl Trace {
    /// Every variable bound to a step's output (by a tool call's `output_variable` or a
    /// `Step N (output_variable: name)` dependency), mapped to the step number.
    pub fn output_bindings(&self) -> std::collections::BTreeMap<&str, u32> {
        let mut m = std::collections::BTreeMap::new();
        for s in &self.steps {
            if let Some(v) = &s.output_variable {
                m.insert(v.as_str(), s.number);
            }
            for d in &s.dependencies {
                if let Some(v) = &d.output_variable {
                    m.insert(v.as_str(), d.step);
                }
            }
        }
        m
    }

    /// The steps each step waits for: its `Dependencies` if it has that line, else the step
    /// before it in source order.
    pub fn prerequisites(&self) -> Vec<(u32, Vec<u32>)> {
        let mut prev = None;
        self.steps
            .iter()
            .map(|s| {
                let deps = if s.explicit_dependencies {
                    s.dependencies.iter().map(|d| d.step).collect()
                } else {
                    prev.into_iter().collect()
                };
                prev = Some(s.number);
                (s.number, deps)
            })
            .collect()
    }

    /// Step indices in an order that respects every prerequisite, lowest step number first
    /// among those ready (Kahn's algorithm). `None` when the dependencies have a cycle (the
    /// compiler refuses those) or name a missing step.
    pub fn execution_order(&self) -> Option<Vec<usize>> {
        let prereq = self.prerequisites();
        let index: std::collections::HashMap<u32, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.number, i))
            .collect();
        let mut waiting: Vec<usize> = prereq.iter().map(|(_, d)| d.len()).collect();
        let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); self.steps.len()];
        for (i, (_, deps)) in prereq.iter().enumerate() {
            for d in deps {
                dependants[*index.get(d)?].push(i);
            }
        }
        let mut ready: std::collections::BTreeSet<usize> =
            (0..self.steps.len()).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(self.steps.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &j in &dependants[i] {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.insert(j);
                }
            }
        }
        (order.len() == self.steps.len()).then_some(order)
    }

    /// Whether any step runs the model.
    pub fn llm_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| matches!(s.tool, Tool::Llm(_)))
    }

    /// The judgement steps with scored reference examples, with their calls: the steps whose
    /// fidelity a device measures before it runs them.
    pub fn judged_steps(&self) -> impl Iterator<Item = (&Step, &LlmCall)> {
        self.steps.iter().filter_map(|s| match &s.tool {
            Tool::Llm(call) if !call.judgement.scored().is_empty() => Some((s, call)),
            _ => None,
        })
    }

    /// Whether `step`'s output stays on the device (it is `sensitive`, or the trace says
    /// `report_outputs: hashed`): the report carries its hash and length instead.
    pub fn withholds_output(&self, step: &Step) -> bool {
        step.sensitive || self.report_outputs == ReportOutputs::Hashed
    }

    /// Whether what the postconditions found stays on the device: when any step's output
    /// does (a postcondition may render it).
    pub fn withholds_findings(&self) -> bool {
        self.steps.iter().any(|s| self.withholds_output(s))
    }
}

/// LLMunix trace metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Kind of task (free text).
    pub task_type: String,
    /// Domain (free text).
    pub domain: String,
    /// Whether the trace needs a network connection.
    pub requires_internet: bool,
    /// Whether the trace needs a person.
    pub requires_human: bool,
    /// `low`, `medium` or `high` (free text in LLMunix; kept as written).
    pub risk_level: String,
    /// The model that learned the trace.
    pub learned_by: String,
}

/// A named input variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// Name used as `{name}`.
    pub name: VarName,
    /// Value when `--var` does not set it; `None` makes the input required.
    pub default: Option<String>,
    /// What the input means.
    pub description: String,
}

/// What a trace's reports carry of its steps' outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportOutputs {
    /// Each step's output (truncated), but for steps marked `sensitive`.
    #[default]
    Full,
    /// No step's output: its length and SHA-256 only (every step is treated as sensitive).
    Hashed,
}

/// One step of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The `N` of `### Step N:`; unique, ascending.
    pub number: u32,
    /// The heading text after `Step N:`.
    pub title: String,
    /// The line of the step heading in the source (for messages).
    pub line: u32,
    /// What the step does.
    pub tool: Tool,
    /// Checked after the tool succeeded; any failure fails the attempt.
    pub validations: Vec<Check>,
    /// What to do when the tool or a validation fails.
    pub on_error: OnError,
    /// Steps whose outputs this step uses. Empty with `explicit_dependencies == false` means
    /// "the step before".
    pub dependencies: Vec<Dependency>,
    /// Whether the source had a `**Dependencies**:` line.
    pub explicit_dependencies: bool,
    /// Limit on one attempt of the tool, in seconds.
    pub timeout_secs: u32,
    /// `{name}` bound to this step's output by `output_variable:` in its tool call.
    pub output_variable: Option<VarName>,
    /// Run the tool once per item; zero items is a successful no-op.
    pub foreach: Option<Foreach>,
    /// For Bash steps: the only commands the shell may run (by name; see [`crate::shell`]).
    pub allowed_commands: Option<Vec<String>>,
    /// For Bash steps: whether the command may use command substitution (`$(…)`, backticks).
    pub command_substitution: bool,
    /// The step's output stays on the device: the report carries its length and SHA-256
    /// instead (`sensitive: true` on the tool call, or the trace's `report_outputs: hashed`).
    pub sensitive: bool,
}

/// A step repeated over items, each bound to `{var}` in the step's templates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Foreach {
    /// Where the items come from.
    pub over: ForeachSource,
    /// The variable holding the current item (default `item`).
    pub var: VarName,
}

/// The items of a [`Foreach`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForeachSource {
    /// Files matching a glob, relative to the base directory.
    Glob(String),
    /// The non-empty lines of a variable.
    Lines(VarName),
    /// The elements of a variable holding a JSON array.
    JsonArray(VarName),
}

/// Default per-attempt step timeout in seconds when the trace sets none.
pub const DEFAULT_STEP_TIMEOUT_SECS: u32 = 300;

/// A dependency on an earlier step, optionally naming that step's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    /// The step depended on.
    pub step: u32,
    /// `{name}` bound to that step's output, from `Step N (output_variable: name)`.
    pub output_variable: Option<VarName>,
}

/// A tool call with its checked parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Tool {
    /// Read a text file. Output: the text (the selected lines when `offset`/`limit` are set).
    Read {
        /// File to read; relative paths resolve inside the run's base directory.
        file_path: Template,
        /// First line to return, 1-based.
        offset: Option<u64>,
        /// Number of lines to return.
        limit: Option<u64>,
    },
    /// Write a text file inside the run's base directory. Output: the text written.
    Write {
        /// File to write (inside the base directory).
        file_path: Template,
        /// Text to write.
        content: Template,
    },
    /// Run a shell command (`/bin/sh -c`) in the base directory. Output: its stdout.
    /// `{variables}` are substituted shell-quoted.
    Bash {
        /// The command line.
        command: Template,
    },
    /// Search files for a regular expression. Output: matching lines as `path:line:text`
    /// (`content`), matching file paths (`files_with_matches`) or per-file counts (`count`).
    Grep {
        /// Rust `regex` pattern (checked at compile time).
        pattern: String,
        /// File or directory to search (default: the base directory).
        path: Option<Template>,
        /// Only files whose name matches this glob (e.g. `*.log`).
        glob: Option<String>,
        /// Case-insensitive matching.
        case_insensitive: bool,
        /// What the output lists.
        output_mode: GrepOutput,
    },
    /// List files matching a glob pattern, sorted. Output: one path per line.
    Glob {
        /// The pattern (`*`, `?`, `[…]`, `**`), relative to `path`.
        pattern: String,
        /// Directory to search from (default: the base directory).
        path: Option<Template>,
    },
    /// Fetch a URL over HTTP(S). Output: the response body.
    WebFetch {
        /// The URL.
        url: Template,
        /// What to extract (LLMunix passes this to a model; kept for the report).
        prompt: Option<Template>,
    },
    /// Generate text with the device's in-process GGUF model. Output: the generated text.
    Llm(LlmCall),
}

/// What a Grep step outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrepOutput {
    /// Matching lines, `path:line:text`.
    Content,
    /// Paths of files with a match.
    FilesWithMatches,
    /// `path:count` per file with a match.
    Count,
}

impl Tool {
    /// The tool's name as written in trace sources.
    pub fn name(&self) -> &'static str {
        match self {
            Tool::Read { .. } => "Read",
            Tool::Write { .. } => "Write",
            Tool::Bash { .. } => "Bash",
            Tool::Grep { .. } => "Grep",
            Tool::Glob { .. } => "Glob",
            Tool::WebFetch { .. } => "WebFetch",
            Tool::Llm(_) => "LLM",
        }
    }

    /// Every template the tool uses, for variable checks.
    pub fn templates(&self) -> Vec<&Template> {
        match self {
            Tool::Read { file_path, .. } => vec![file_path],
            Tool::Write { file_path, content } => vec![file_path, content],
            Tool::Bash { command } => vec![command],
            Tool::Grep { path, .. } | Tool::Glob { path, .. } => path.iter().collect(),
            Tool::WebFetch { url, prompt } => std::iter::once(url).chain(prompt.iter()).collect(),
            Tool::Llm(c) => {
                let mut v = vec![&c.prompt];
                v.extend(c.system.as_ref());
                v
            }
        }
    }
}

/// Parameters of an LLM step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmCall {
    /// The user message.
    pub prompt: Template,
    /// The system message, if any.
    pub system: Option<Template>,
    /// Model name from the device's manifest; `None` = the device's default model.
    pub model: Option<String>,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// Sampling temperature; `0.0` means greedy (deterministic).
    pub temperature: f32,
    /// Nucleus sampling threshold (used when `temperature > 0`).
    pub top_p: f32,
    /// Seed for sampling (used when `temperature > 0`).
    pub seed: u32,
    /// A GBNF grammar (llama.cpp's format) with a `root` rule that constrains the output.
    pub grammar: Option<String>,
    /// A JSON Schema (as JSON text) the output must conform to: the follower turns it into a
    /// grammar with llama.cpp's own converter and validates the output against it. At most one
    /// of `grammar` and `json_schema` is set.
    pub json_schema: Option<String>,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Reference examples, fidelity threshold, answer confidence threshold and few-shot
    /// count (see [`crate::judgement`]); empty for a step without examples.
    pub judgement: Judgement,
}

impl LlmCall {
    /// The variables the prompt and the system message use (what every reference example
    /// must bind).
    pub fn message_variables(&self) -> std::collections::BTreeSet<&str> {
        self.prompt
            .variables()
            .into_iter()
            .chain(self.system.iter().flat_map(Template::variables))
            .collect()
    }
}

/// Default `max_tokens` of an LLM step.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// A validation, precondition or postcondition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Human description (`check:` / `condition:`).
    pub description: String,
    /// What is checked.
    pub kind: CheckKind,
}

/// The subject of a check: a file, or the step's output when no `path` is given.
pub type Subject = Option<Template>;

/// The validation types. Where a variant has a `path` (`Subject`), `None` means "the step's
/// output" (for preconditions and postconditions a path is required).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CheckKind {
    /// The path exists and is a regular file.
    FileExists {
        /// The file.
        path: Template,
    },
    /// The path exists and is a directory.
    DirectoryExists {
        /// The directory.
        path: Template,
    },
    /// The content contains `text`.
    ContentContains {
        /// File or output.
        path: Subject,
        /// Substring that must occur.
        text: Template,
    },
    /// The content does not contain `text`.
    ContentNotContains {
        /// File or output.
        path: Subject,
        /// Substring that must not occur.
        text: Template,
    },
    /// The content has a non-whitespace character.
    ContentNotEmpty {
        /// File or output.
        path: Subject,
    },
    /// The content matches a regular expression (Rust `regex` syntax, multi-line mode).
    RegexMatch {
        /// File or output.
        path: Subject,
        /// The pattern (checked at compile time).
        pattern: String,
    },
    /// The Bash step exited with this code.
    CommandExitCode {
        /// Expected exit code.
        expected: i32,
    },
    /// The file has at least `bytes` bytes (or the output that many bytes).
    FileSizeMinimum {
        /// File or output.
        path: Subject,
        /// Minimum size in bytes.
        bytes: u64,
    },
    /// The content parses as JSON.
    JsonValid {
        /// File or output.
        path: Subject,
    },
    /// The content is JSON that validates against a JSON Schema.
    JsonSchema {
        /// File or output.
        path: Subject,
        /// The schema, as JSON text.
        schema: String,
    },
    /// The content has every heading in `required_sections` (Markdown `#` lines; the text
    /// after the hashes is compared, trimmed).
    ContentStructureCheck {
        /// File or output.
        path: Subject,
        /// Headings that must be present.
        required_sections: Vec<String>,
    },
}

impl CheckKind {
    /// The validation type's name as written in trace sources.
    pub fn type_name(&self) -> &'static str {
        match self {
            CheckKind::FileExists { .. } => "file_exists",
            CheckKind::DirectoryExists { .. } => "directory_exists",
            CheckKind::ContentContains { .. } => "content_contains",
            CheckKind::ContentNotContains { .. } => "content_not_contains",
            CheckKind::ContentNotEmpty { .. } => "content_not_empty",
            CheckKind::RegexMatch { .. } => "regex_match",
            CheckKind::CommandExitCode { .. } => "command_exit_code",
            CheckKind::FileSizeMinimum { .. } => "file_size_minimum",
            CheckKind::JsonValid { .. } => "json_valid",
            CheckKind::JsonSchema { .. } => "json_schema",
            CheckKind::ContentStructureCheck { .. } => "content_structure_check",
        }
    }

    /// Every template the check uses, for variable checks.
    pub fn templates(&self) -> Vec<&Template> {
        match self {
            CheckKind::FileExists { path } | CheckKind::DirectoryExists { path } => vec![path],
            CheckKind::ContentContains { path, text }
            | CheckKind::ContentNotContains { path, text } => {
                path.iter().chain(std::iter::once(text)).collect()
            }
            CheckKind::ContentNotEmpty { path }
            | CheckKind::RegexMatch { path, .. }
            | CheckKind::FileSizeMinimum { path, .. }
            | CheckKind::JsonValid { path }
            | CheckKind::JsonSchema { path, .. }
            | CheckKind::ContentStructureCheck { path, .. } => path.iter().collect(),
            CheckKind::CommandExitCode { .. } => vec![],
        }
    }
}

/// What a step does when its tool or a validation fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OnError {
    /// Fail the run (the default).
    Fail,
    /// Try again up to `retry_count` more times, waiting `delay_secs × 2^(attempt-1)` between
    /// attempts (exponential backoff); when every attempt failed, run `fallback_step` if given,
    /// else fail the run.
    Retry {
        /// Extra attempts after the first.
        retry_count: u32,
        /// Wait before the first retry, in seconds.
        delay_secs: f64,
        /// Step to run instead once the retries are exhausted.
        fallback_step: Option<u32>,
    },
    /// Record the failure and go on with the next step.
    Skip,
    /// Run another step in place of this one (LLMunix `fallback_step`).
    Fallback {
        /// The step to run.
        step: u32,
    },
    /// Stop and ask a person (LLMunix `human_escalate`): the run fails with an escalation.
    Escalate {
        /// What the person is told.
        message: String,
    },
}

impl OnError {
    /// The fallback step this policy may run, if any.
    pub fn fallback_step(&self) -> Option<u32> {
        match self {
            OnError::Retry { fallback_step, .. } => *fallback_step,
            OnError::Fallback { step } => Some(*step),
            OnError::Fail | OnError::Skip | OnError::Escalate { .. } => None,
        }
    }
}

/// A declared output of the trace (LLMunix `outputs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDecl {
    /// Name.
    pub name: String,
    /// `file`, `directory`, `variable` or `metric` (as written).
    pub kind: String,
    /// Where to find it.
    pub location: String,
    /// What it is.
    pub description: String,
}

/// Text with `{variable}` placeholders.
///
/// A placeholder is `{name}` where `name` is a [`VarName`]; `{{` and `}}` are literal braces.
/// Braces around anything else (`awk '{print $1}'`, JSON, `${HOME}`) are literal text, so
/// shell and JSON snippets need no escaping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template(pub String);

/// One piece of a parsed [`Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Literal text (braces already unescaped).
    Text(std::borrow::Cow<'a, str>),
    /// A `{name}` placeholder.
    Var(&'a str),
}

impl Template {
    /// The raw text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Splits the template into literal text and placeholders.
    pub fn pieces(&self) -> Vec<Piece<'_>> {
        let s = self.0.as_str();
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut lit = String::new();
        let mut i = 0;
        let mut lit_start = 0;
        while i < b.len() {
            match b[i] {
                b'{' if b.get(i + 1) == Some(&b'{') => {
                    lit.push_str(&s[lit_start..i]);
                    lit.push('{');
                    i += 2;
                    lit_start = i;
                }
                b'}' if b.get(i + 1) == Some(&b'}') => {
                    lit.push_str(&s[lit_start..i]);
                    lit.push('}');
                    i += 2;
                    lit_start = i;
                }
                b'{' if i == 0 || b[i - 1] != b'$' => {
                    if let Some(end) = s[i + 1..].find('}') {
                        let name = &s[i + 1..i + 1 + end];
                        if VarName::is_valid(name) {
                            lit.push_str(&s[lit_start..i]);
                            if !lit.is_empty() {
                                out.push(Piece::Text(std::mem::take(&mut lit).into()));
                            }
                            out.push(Piece::Var(name));
                            i += end + 2;
                            lit_start = i;
                            continue;
                        }
                    }
                    i += 1;
                }
                _ => i += 1,
            }
        }
        lit.push_str(&s[lit_start..]);
        if !lit.is_empty() {
            out.push(Piece::Text(lit.into()));
        }
        out
    }

    /// The placeholder names in order of appearance (with repeats).
    pub fn variables(&self) -> Vec<&str> {
        self.pieces()
            .into_iter()
            .filter_map(|p| match p {
                Piece::Var(v) => Some(v),
                Piece::Text(_) => None,
            })
            .collect()
    }

    /// Substitutes every placeholder with `lookup(name)` (for text, not shell commands: see
    /// [`Template::render_shell`]).
    ///
    /// # Errors
    /// The first name `lookup` does not know.
    pub fn render<'v>(&self, lookup: impl Fn(&str) -> Option<&'v str>) -> Result<String, String> {
        let mut out = String::with_capacity(self.0.len());
        for p in self.pieces() {
            match p {
                Piece::Text(t) => out.push_str(&t),
                Piece::Var(v) => out.push_str(lookup(v).ok_or_else(|| v.to_owned())?),
            }
        }
        Ok(out)
    }
}

/// Where a placeholder sits in a shell command, by POSIX quoting rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShellContext {
    /// Outside quotes: substituted as `"${TF_VAR_name}"`.
    Unquoted,
    /// Inside `"…"`: substituted as `${TF_VAR_name}`.
    DoubleQuoted,
    /// Inside `'…'`: the shell would not expand it; refused by the compiler.
    SingleQuoted,
}

/// The environment variable that carries `{name}` into a Bash step.
pub fn shell_var_env(name: &str) -> String {
    format!("TF_VAR_{name}")
}

impl Template {
    /// Each placeholder of a shell command with its quoting context.
    ///
    /// Tracks `'…'`, `"…"` and backslash escapes across the literal text (heredoc bodies and
    /// command substitutions count as the context they appear in).
    pub fn shell_contexts(&self) -> Vec<(&str, ShellContext)> {
        let mut out = Vec::new();
        let mut state = ShellContext::Unquoted;
        for piece in self.pieces() {
            match piece {
                Piece::Var(v) => out.push((v, state)),
                Piece::Text(t) => {
                    let mut chars = t.chars();
                    while let Some(c) = chars.next() {
                        state = match (state, c) {
                            (ShellContext::Unquoted | ShellContext::DoubleQuoted, '\\') => {
                                chars.next();
                                state
                            }
                            (ShellContext::Unquoted, '\'') => ShellContext::SingleQuoted,
                            (ShellContext::Unquoted, '"') => ShellContext::DoubleQuoted,
                            (ShellContext::SingleQuoted, '\'')
                            | (ShellContext::DoubleQuoted, '"') => ShellContext::Unquoted,
                            (s, _) => s,
                        };
                    }
                }
            }
        }
        out
    }

    /// Renders a shell command without ever splicing a value into shell syntax: each
    /// `{name}` becomes a reference to the environment variable [`shell_var_env`]`(name)`
    /// (`"${TF_VAR_name}"` outside quotes, `${TF_VAR_name}` inside double quotes), and the
    /// values travel in the returned environment. The shell never parses a value as code.
    ///
    /// # Errors
    /// A name `lookup` does not know, or a placeholder inside single quotes.
    pub fn render_shell<'v>(
        &self,
        lookup: impl Fn(&str) -> Option<&'v str>,
    ) -> Result<(String, Vec<(String, String)>), String> {
        let contexts = self.shell_contexts();
        let mut env: Vec<(String, String)> = Vec::new();
        for (name, ctx) in &contexts {
            if *ctx == ShellContext::SingleQuoted {
                return Err(format!(
                    "`{{{name}}}` is inside single quotes, where the shell does not expand it"
                ));
            }
            let value = lookup(name).ok_or_else(|| (*name).to_owned())?;
            let key = shell_var_env(name);
            if !env.iter().any(|(k, _)| *k == key) {
                env.push((key, value.to_owned()));
            }
        }
        let mut ctx = contexts.iter().map(|(_, c)| *c);
        let mut out = String::with_capacity(self.0.len());
        for p in self.pieces() {
            match p {
                Piece::Text(t) => out.push_str(&t),
                Piece::Var(v) => {
                    let key = shell_var_env(v);
                    match ctx.next() {
                        Some(ShellContext::DoubleQuoted) => out.push_str(&format!("${{{key}}}")),
                        _ => out.push_str(&format!("\"${{{key}}}\"")),
                    }
                }
            }
        }
        Ok((out, env))
    }
}

/// Largest `max_tokens` an LLM step may ask for (the compiler's bound, checked again when a
/// compiled trace is decoded).
pub const MAX_MAX_TOKENS: u64 = 32_768;

/// Most extra attempts a `retry` policy may ask for (compiler and decoder).
pub const MAX_RETRY_COUNT: u32 = 100;

/// Longest wait before the first retry, seconds (compiler and decoder).
pub const MAX_RETRY_DELAY_SECS: f64 = 3600.0;

/// Highest sampling temperature an LLM step may ask for (0 = greedy; compiler and decoder).
pub const MAX_TEMPERATURE: f32 = 2.0;

/// Whether `path` may be a trace's read path: absolute, without `..` (compiler and decoder).
pub fn is_valid_read_path(path: &str) -> bool {
    let p = std::path::Path::new(path);
    p.is_absolute()
        && !p
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
}

/// Built-in variables every trace may use: `{run_id}`, `{trace_id}`, `{base_dir}`,
/// `{current_timestamp}` (RFC 3339, UTC, at the start of the run).
pub const BUILTIN_VARIABLES: &[&str] = &["run_id", "trace_id", "base_dir", "current_timestamp"];

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Template {
        Template(s.to_owned())
    }

    #[test]
    fn placeholders_and_literal_braces() {
        assert_eq!(t("wc -l {log_path}").variables(), vec!["log_path"]);
        assert!(t("awk '{print $3}' x").variables().is_empty());
        assert!(t(r#"{"a": 1}"#).variables().is_empty());
        assert!(t("echo ${HOME}").variables().is_empty());
        assert!(t("{{not_a_var}}").variables().is_empty());
        let lookup = |v: &str| (v == "x").then_some("1");
        assert_eq!(t("{{x}} {x}").render(lookup).unwrap(), "{x} 1");
        assert_eq!(t("a {y}").render(lookup).unwrap_err(), "y");
    }

    #[test]
    fn shell_rendering_never_splices_values_into_syntax() {
        let hostile = "$(reboot); rm -rf / `id` 'x' \"y\"";
        let lookup = |_: &str| Some(hostile);
        let (cmd, env) = t("cat {p} | grep \"Result: {p}\"")
            .render_shell(lookup)
            .unwrap();
        assert_eq!(cmd, "cat \"${TF_VAR_p}\" | grep \"Result: ${TF_VAR_p}\"");
        assert_eq!(env, vec![("TF_VAR_p".to_owned(), hostile.to_owned())]);
        let e = t("grep 'a{p}' f").render_shell(lookup).unwrap_err();
        assert!(e.contains("single quotes"), "{e}");
        // Escaped quotes do not change the context.
        let escaped = t("echo \\' {p}");
        assert_eq!(
            escaped.shell_contexts(),
            vec![("p", ShellContext::Unquoted)]
        );
        let awk = t("awk '{print $1}' {p}");
        assert_eq!(awk.shell_contexts(), vec![("p", ShellContext::Unquoted)]);
    }

    #[test]
    fn hostile_values_run_as_data_in_a_real_shell() {
        let hostile = "$(echo INJECTED); echo INJECTED `echo INJECTED`";
        let (cmd, env) = t("printf '%s|' {v} \"{v}\"")
            .render_shell(|_| Some(hostile))
            .unwrap();
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&cmd)
            .env_clear()
            .envs(env)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{hostile}|{hostile}|")
        );
    }
}
