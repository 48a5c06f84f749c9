//! The serde shapes of a trace source's YAML blocks (frontmatter, tool call, validation,
//! error handling, sections), read before they are checked and lowered.

use serde::Deserialize;
use serde_norway::Value;
use std::collections::BTreeMap;

#[derive(Deserialize, Default)]
pub(crate) struct RawFrontmatter {
    pub(crate) trace_id: Option<String>,
    pub(crate) experience_id: Option<String>,
    pub(crate) goal_signature: Option<String>,
    pub(crate) confidence: Option<f64>,
    pub(crate) estimated_cost: Option<f64>,
    pub(crate) estimated_time_secs: Option<f64>,
    pub(crate) success_rate: Option<f64>,
    pub(crate) usage_count: Option<u64>,
    pub(crate) created_at: Option<Value>,
    pub(crate) last_used: Option<Value>,
    pub(crate) version: Option<Value>,
    #[serde(default)]
    pub(crate) metadata: RawMetadata,
    #[serde(default)]
    pub(crate) preconditions: Vec<RawCondition>,
    #[serde(default)]
    pub(crate) postconditions: Vec<RawCondition>,
    #[serde(default)]
    pub(crate) outputs: Vec<RawOutput>,
    pub(crate) max_parallel: Option<u32>,
    pub(crate) read_paths: Option<Vec<String>>,
    pub(crate) report_outputs: Option<String>,
    #[serde(default)]
    pub(crate) inputs: BTreeMap<String, RawInput>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
pub(crate) struct RawMetadata {
    #[serde(default)]
    pub(crate) task_type: String,
    #[serde(default)]
    pub(crate) domain: String,
    #[serde(default)]
    pub(crate) requires_internet: bool,
    #[serde(default)]
    pub(crate) requires_human: bool,
    #[serde(default)]
    pub(crate) risk_level: String,
    #[serde(default)]
    pub(crate) learned_by: String,
    #[serde(flatten)]
    pub(crate) _other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
pub(crate) struct RawCondition {
    #[serde(alias = "check")]
    pub(crate) condition: Option<String>,
    #[serde(alias = "type")]
    pub(crate) validation_type: String,
    #[serde(default)]
    pub(crate) parameters: BTreeMap<String, Value>,
}

/// A fenced block outside the steps (`## Post-Execution Validation`, `## Expected Outputs`).
#[derive(Deserialize)]
pub(crate) struct RawSection {
    pub(crate) postconditions: Option<Vec<RawCondition>>,
    pub(crate) outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
pub(crate) struct RawOutput {
    pub(crate) name: String,
    #[serde(rename = "type", default)]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) location: String,
    #[serde(default)]
    pub(crate) description: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum RawInput {
    Full {
        default: Option<Value>,
        #[serde(default)]
        description: String,
    },
    Default(Value),
}

#[derive(Deserialize)]
pub(crate) struct RawToolCall {
    pub(crate) tool: String,
    #[serde(default)]
    pub(crate) parameters: BTreeMap<String, Value>,
    pub(crate) output_variable: Option<String>,
    pub(crate) timeout_secs: Option<u32>,
    pub(crate) foreach: Option<Value>,
    pub(crate) allowed_commands: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) allow_command_substitution: bool,
    #[serde(default)]
    pub(crate) sensitive: bool,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
pub(crate) struct RawCheck {
    pub(crate) check: Option<String>,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) parameters: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOnError {
    pub(crate) action: String,
    pub(crate) retry_count: Option<u32>,
    pub(crate) delay_seconds: Option<f64>,
    pub(crate) fallback_step: Option<u32>,
    pub(crate) escalation_message: Option<String>,
    pub(crate) error_message: Option<String>,
}
