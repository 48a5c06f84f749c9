//! The run report: a superset of the LLMunix follower report (`trace_id`, `status`,
//! `total_steps`, `completed_steps`, `failed_step`, `execution_time_secs`, `estimated_cost`,
//! `step_results[]`, `all_validations_passed`, `all_postconditions_met`) plus the run id,
//! device id, trace version, model token accounting and timings.
//!
//! Written as JSON (`follower run --output REPORT.json`) and stored with the run.

use serde::{Deserialize, Serialize};

/// Outcome of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every step succeeded (or was skipped by its error policy) and every check passed.
    Success,
    /// A precondition, step or postcondition failed (or the run timed out).
    Failed,
    /// Stopped on request (SIGINT/SIGTERM, or the fleet's `stop`) before every step ran;
    /// `follower resume RUN_ID` continues it from the last completed step.
    Stopped,
}

/// Outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// The tool ran and every validation passed.
    Success,
    /// Every attempt failed.
    Failed,
    /// Failed, and the step's error policy said to go on.
    Skipped,
    /// Not reached.
    NotRun,
    /// Failed, and its fallback step succeeded in its place.
    Recovered,
}

/// A step that asked for a person (`human_escalate`), for the fleet link to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escalation {
    /// The step.
    pub step: u32,
    /// The trace's escalation message.
    pub message: String,
    /// Why the step failed.
    pub error: String,
}

/// The outcome of one validation, precondition or postcondition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The check's description.
    pub check: String,
    /// The validation type (`file_exists`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it passed.
    pub passed: bool,
    /// What was found when it failed (or a short confirmation).
    pub detail: String,
}

/// Token accounting and speed of a model step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmUsage {
    /// Model name.
    pub model: String,
    /// Tokens in the prompt (after the chat template), cached or not.
    pub prompt_tokens: u32,
    /// Of `prompt_tokens`, those this generation did not decode itself: the prefix the
    /// inference thread's KV cache already held, or shared with an earlier item of the same
    /// batch. 0 in reports from followers that did not count them.
    #[serde(default)]
    pub cached_prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Prompt processing speed, tokens per second.
    pub prompt_tokens_per_sec: f64,
    /// Generation speed, tokens per second.
    pub generation_tokens_per_sec: f64,
    /// Why generation stopped: `eos`, `max_tokens`, `stop_string`, `grammar`.
    pub stop_reason: String,
    /// Whether a grammar constrained the output.
    pub grammar: bool,
    /// For a constrained answer: the probability the model gave it under the grammar's mask
    /// (see [`crate::judgement`]); for a foreach step's sums, the lowest of its items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_confidence: Option<f64>,
    /// Whether the answer was under the step's `min_answer_confidence` (for sums: any item).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uncertain: bool,
}

impl LlmUsage {
    /// The figures of several generations as one: prompt and generated tokens summed, each
    /// rate as total tokens over the total time the items spent in that phase (an item's time
    /// is its tokens over its rate), the stop reason shared by all or `mixed`, `grammar` if any
    /// used one, the model of the first (a step has one model). `None` for no generations.
    pub fn total(items: &[LlmUsage]) -> Option<LlmUsage> {
        let first = items.first()?;
        let rate = |tokens: fn(&LlmUsage) -> u32, per_sec: fn(&LlmUsage) -> f64| {
            let (mut n, mut secs) = (0u64, 0f64);
            for u in items {
                n += u64::from(tokens(u));
                if per_sec(u) > 0.0 {
                    secs += f64::from(tokens(u)) / per_sec(u);
                }
            }
            (n, if secs > 0.0 { n as f64 / secs } else { 0.0 })
        };
        let (prompt, prompt_rate) = rate(|u| u.prompt_tokens, |u| u.prompt_tokens_per_sec);
        let cached: u64 = items
            .iter()
            .map(|u| u64::from(u.cached_prompt_tokens))
            .sum();
        let (completion, generation_rate) =
            rate(|u| u.completion_tokens, |u| u.generation_tokens_per_sec);
        Some(LlmUsage {
            model: first.model.clone(),
            prompt_tokens: u32::try_from(prompt).unwrap_or(u32::MAX),
            cached_prompt_tokens: u32::try_from(cached).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(completion).unwrap_or(u32::MAX),
            prompt_tokens_per_sec: prompt_rate,
            generation_tokens_per_sec: generation_rate,
            stop_reason: if items.iter().all(|u| u.stop_reason == first.stop_reason) {
                first.stop_reason.clone()
            } else {
                "mixed".into()
            },
            grammar: items.iter().any(|u| u.grammar),
            answer_confidence: items
                .iter()
                .filter_map(|u| u.answer_confidence)
                .reduce(f64::min),
            uncertain: items.iter().any(|u| u.uncertain),
        })
    }
}

/// The record of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// Step number.
    pub step: u32,
    /// Step title.
    pub title: String,
    /// Tool name.
    pub tool: String,
    /// Outcome.
    pub status: StepStatus,
    /// Attempts made (0 when not run).
    pub attempts: u32,
    /// The tool's output (truncated to [`MAX_REPORTED_OUTPUT`] bytes).
    pub output: String,
    /// Whether `output` was truncated.
    pub output_truncated: bool,
    /// Exit code of a Bash step.
    pub exit_code: Option<i32>,
    /// Why the last attempt failed.
    pub error: Option<String>,
    /// Wall time over all attempts, seconds.
    pub duration_secs: f64,
    /// Validation outcomes of the last attempt.
    pub validations: Vec<CheckResult>,
    /// Model accounting for LLM steps. For a `foreach` LLM step, the sums over its items
    /// ([`LlmUsage::total`]): tokens added up, rates over the time all items took.
    pub llm: Option<LlmUsage>,
    /// For `foreach` steps: how many items there were.
    pub items: Option<u32>,
    /// For a step whose output stays on the device (`sensitive`, or `report_outputs:
    /// hashed`): the SHA-256 (hex) of its whole output; `output` is then empty and `error`
    /// and validation details are withheld too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    /// With `output_sha256`: the whole output's length in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// For `foreach` LLM steps: each item's own figures, in item order (the last attempt of
    /// each item that ran). Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub llm_items: Vec<LlmUsage>,
}

/// What stands in a report for an error or a check's finding that a sensitive step keeps on
/// the device.
pub const WITHHELD: &str = "withheld on the device (sensitive step)";

impl StepResult {
    /// Keeps what the step produced on the device: the output becomes its SHA-256 and length
    /// (of `full_output`, the untruncated output), the error keeps its exit code only, and
    /// validation findings are replaced by [`WITHHELD`]. Status, timings, token counts and
    /// which validations passed stay.
    pub fn withhold_output(&mut self, full_output: &str) {
        use sha2::Digest as _;
        self.output_sha256 = Some(hex::encode(sha2::Sha256::digest(full_output.as_bytes())));
        self.output_bytes = Some(full_output.len() as u64);
        self.output.clear();
        self.output_truncated = false;
        if self.error.is_some() {
            self.error = Some(match self.exit_code {
                Some(code) => format!("exit code {code}; details {WITHHELD}"),
                None => format!("failed; details {WITHHELD}"),
            });
        }
        for v in &mut self.validations {
            v.detail = WITHHELD.into();
        }
    }
}

/// Step outputs longer than this (bytes) are truncated in reports.
pub const MAX_REPORTED_OUTPUT: usize = 16 * 1024;

/// The record of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Report schema version.
    pub report_version: u32,
    /// Run id (UUIDv7).
    pub run_id: String,
    /// The device that ran it.
    pub device_id: crate::ids::DeviceId,
    /// Trace id.
    pub trace_id: String,
    /// Trace version.
    pub trace_version: String,
    /// The goal.
    pub goal_signature: String,
    /// Outcome.
    pub status: RunStatus,
    /// Steps in the trace's main flow (a step that runs only as another's fallback is not
    /// counted; its result is in `step_results` when it ran).
    pub total_steps: u32,
    /// Main-flow steps that succeeded or were recovered by their fallback.
    pub completed_steps: u32,
    /// The step that failed the run, if one did.
    pub failed_step: Option<u32>,
    /// Why the run failed.
    pub error: Option<String>,
    /// Start, RFC 3339 UTC.
    pub started_at: String,
    /// End, RFC 3339 UTC.
    pub finished_at: String,
    /// Wall time, seconds.
    pub execution_time_secs: f64,
    /// The trace's estimated cost (US dollars); on-device runs cost no API fees.
    pub estimated_cost: f64,
    /// Inputs after defaults.
    pub inputs: std::collections::BTreeMap<String, String>,
    /// Precondition outcomes.
    pub preconditions: Vec<CheckResult>,
    /// Whether every precondition held.
    pub all_preconditions_met: bool,
    /// Per-step records in step order.
    pub step_results: Vec<StepResult>,
    /// Whether every validation of every executed step passed.
    pub all_validations_passed: bool,
    /// Postcondition outcomes.
    pub postconditions: Vec<CheckResult>,
    /// Whether every postcondition held.
    pub all_postconditions_met: bool,
    /// Steps that asked for a person.
    pub escalations: Vec<Escalation>,
    /// The fidelity of each judgement step with reference examples that was reached: its
    /// model's agreement with the reference answers (measured in this run or earlier).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fidelity: Vec<crate::judgement::Fidelity>,
    /// Total prompt tokens over model steps.
    pub prompt_tokens: u64,
    /// Total generated tokens over model steps.
    pub completion_tokens: u64,
    /// The containment that was in force (path policy, shell policy, rlimits, Landlock, …).
    #[serde(default)]
    pub protections: Vec<Protection>,
    /// How many times this run was resumed after a stop or a crash (`follower resume`).
    #[serde(default)]
    pub resumes: u32,
    /// The device's resources when the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_start: Option<Telemetry>,
    /// The device's resources when the run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_end: Option<Telemetry>,
}

/// A sample of a device's resources (also what heartbeats carry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// Total memory, bytes (`MemTotal` of /proc/meminfo).
    pub mem_total_bytes: u64,
    /// Memory available for new work without swapping, bytes (`MemAvailable`).
    pub mem_available_bytes: u64,
    /// Load average over 1, 5 and 15 minutes (/proc/loadavg).
    pub load: [f64; 3],
    /// Online CPUs.
    pub cpus: u32,
    /// Temperatures of the kernel's thermal zones (/sys/class/thermal), °C.
    pub thermal: Vec<ThermalZone>,
    /// NVIDIA GPUs through NVML.
    pub gpus: Vec<GpuSample>,
    /// `present`, or why there are no GPU figures (`absent: …`).
    pub gpu_status: String,
}

/// One thermal zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThermalZone {
    /// The zone's type (`cpu-thermal`, `x86_pkg_temp`, …).
    pub zone: String,
    /// Degrees Celsius.
    pub celsius: f64,
}

/// One GPU's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    /// Product name.
    pub name: String,
    /// Core temperature, °C.
    pub temperature_c: Option<u32>,
    /// Memory in use, bytes.
    pub memory_used_bytes: Option<u64>,
    /// Memory in total, bytes.
    pub memory_total_bytes: Option<u64>,
    /// Power draw, watts.
    pub power_watts: Option<f64>,
    /// GPU utilisation over the last sample period, percent.
    pub utilization_pct: Option<u32>,
}

/// One layer of containment and whether it was in force for the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    /// Short name (`landlock`, `rlimits`, `allowed_commands`, …).
    pub name: String,
    /// Whether it was in force.
    pub active: bool,
    /// What it allowed, or why it was not in force.
    pub detail: String,
}

/// The report schema version written by this build.
pub const REPORT_VERSION: u32 = 1;

/// Truncates `s` to at most `max` bytes on a character boundary; returns whether it did.
pub fn truncate_utf8(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_withheld_step_keeps_hash_length_status_and_exit_code_only() {
        let report: Report = serde_json::from_str(OLDER).unwrap();
        let mut s = report.step_results[1].clone();
        s.exit_code = Some(3);
        s.withhold_output("the secret\n");
        assert_eq!(s.output, "");
        assert_eq!(s.output_bytes, Some(11));
        // sha256("the secret\n")
        assert_eq!(
            s.output_sha256.as_deref(),
            Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"the secret\n")).as_str())
        );
        assert_eq!(
            s.error.as_deref(),
            Some("exit code 3; details withheld on the device (sensitive step)")
        );
        assert_eq!(s.validations[0].detail, WITHHELD);
        assert!(!s.validations[0].passed, "which checks passed stays");
        assert_eq!(s.status, StepStatus::Failed);
        // A step without an error gets none.
        let mut ok = report.step_results[0].clone();
        ok.withhold_output("x");
        assert_eq!(ok.error, None);
        let json = serde_json::to_string(&ok).unwrap();
        assert!(json.contains("\"output_sha256\"") && !json.contains("\"output\":\"ok\""));
        // Steps not withheld carry neither field.
        let plain = serde_json::to_string(&report.step_results[0]).unwrap();
        assert!(!plain.contains("output_sha256") && !plain.contains("output_bytes"));
    }

    /// A report as an early follower wrote it: none of the fields added since (`protections`,
    /// `resumes`, `telemetry_start`, `telemetry_end`, a step's `llm_items`).
    const OLDER: &str = r#"{
        "report_version": 1,
        "run_id": "0192f3c4-5b6a-7c8d-9e0f-a1b2c3d4e5f6",
        "device_id": "pi-01",
        "trace_id": "dpkg-log-triage",
        "trace_version": "1.0.0",
        "goal_signature": "triage dpkg log",
        "status": "failed",
        "total_steps": 2,
        "completed_steps": 1,
        "failed_step": 2,
        "error": "validation failed",
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:03Z",
        "execution_time_secs": 3.25,
        "estimated_cost": 0.0,
        "inputs": {"log": "/var/log/dpkg.log"},
        "preconditions": [],
        "all_preconditions_met": true,
        "step_results": [
            {"step": 1, "title": "read", "tool": "Bash", "status": "success", "attempts": 1,
             "output": "ok", "output_truncated": false, "exit_code": 0, "error": null,
             "duration_secs": 0.5, "validations": [], "llm": null, "items": null},
            {"step": 2, "title": "judge", "tool": "LLM", "status": "failed", "attempts": 2,
             "output": "", "output_truncated": false, "exit_code": null,
             "error": "validation failed", "duration_secs": 2.5,
             "validations": [{"check": "says ok", "type": "output_contains", "passed": false,
                              "detail": "no ok"}],
             "llm": {"model": "smollm2", "prompt_tokens": 40, "completion_tokens": 8,
                     "prompt_tokens_per_sec": 400.0, "generation_tokens_per_sec": 40.0,
                     "stop_reason": "eos", "grammar": false},
             "items": null}
        ],
        "all_validations_passed": false,
        "postconditions": [],
        "all_postconditions_met": true,
        "escalations": [{"step": 2, "message": "ask a person", "error": "validation failed"}],
        "prompt_tokens": 40,
        "completion_tokens": 8
    }"#;

    #[test]
    fn an_older_report_without_the_newer_fields_still_parses() {
        let r: Report = serde_json::from_str(OLDER).unwrap();
        assert_eq!(r.device_id, "pi-01");
        assert_eq!(r.status, RunStatus::Failed);
        assert_eq!(r.failed_step, Some(2));
        assert_eq!(r.step_results[1].status, StepStatus::Failed);
        assert_eq!(r.step_results[1].validations[0].kind, "output_contains");
        assert_eq!(
            r.step_results[1].llm.as_ref().map(|u| u.completion_tokens),
            Some(8)
        );
        // The newer fields take their defaults.
        assert!(r.protections.is_empty());
        assert_eq!(r.resumes, 0);
        assert!(r.telemetry_start.is_none() && r.telemetry_end.is_none());
        assert!(r.step_results.iter().all(|s| s.llm_items.is_empty()));
    }

    #[test]
    fn a_report_survives_a_json_round_trip() {
        let mut r: Report = serde_json::from_str(OLDER).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        // Empty optional newer fields are left out, as before they existed.
        for absent in ["telemetry_start", "telemetry_end", "llm_items"] {
            assert!(!json.contains(absent), "{absent} in {json}");
        }
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), r);

        r.protections.push(Protection {
            name: "landlock".into(),
            active: true,
            detail: "ABI 4".into(),
        });
        r.resumes = 2;
        r.telemetry_start = Some(Telemetry {
            mem_total_bytes: 1 << 30,
            mem_available_bytes: 1 << 29,
            load: [0.5, 0.25, 0.125],
            cpus: 4,
            thermal: vec![ThermalZone {
                zone: "cpu-thermal".into(),
                celsius: 51.5,
            }],
            gpus: vec![GpuSample {
                name: "gpu".into(),
                temperature_c: Some(60),
                memory_used_bytes: None,
                memory_total_bytes: Some(1 << 32),
                power_watts: Some(12.5),
                utilization_pct: None,
            }],
            gpu_status: "present".into(),
        });
        r.telemetry_end = Some(Telemetry::default());
        let usage = r.step_results[1].llm.clone().unwrap();
        r.step_results[1].llm_items = vec![usage.clone(), usage];
        r.step_results[1].items = Some(2);
        r.status = RunStatus::Stopped;
        let json = serde_json::to_string_pretty(&r).unwrap();
        assert!(json.contains("\"status\": \"stopped\""), "{json}");
        assert!(json.contains("\"type\": \"output_contains\""), "{json}");
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), r);
    }

    #[test]
    fn a_report_with_a_bad_device_id_is_refused() {
        let bad = OLDER.replace("\"pi-01\"", "\"../x\"");
        assert!(serde_json::from_str::<Report>(&bad).is_err());
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        let mut s = "aé".to_owned(); // 'é' is two bytes
        assert!(truncate_utf8(&mut s, 2));
        assert_eq!(s, "a");
        let mut short = "abc".to_owned();
        assert!(!truncate_utf8(&mut short, 3));
        assert_eq!(short, "abc");
    }
}
