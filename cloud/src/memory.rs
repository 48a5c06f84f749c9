//! Experiences and what learning costs (LLMunix's SmartMemory).
//!
//! An **experience** is a run a device reported or a regeneration the learner made: the goal,
//! the outcome, the trace version, time, cost, tokens and what was learnt. Both are already
//! stored (`runs` with each report's JSON, `regenerations`); [`experiences`] reads them as
//! experiences — nothing is stored twice, so ingest stays one insert per report — with tags
//! and task type from the trace's metadata (its kept source or the newest rollout of it).
//!
//! [`render_memory_log`] writes them the way LLMunix's `memory_log.md` (SmartMemory) does:
//! one block per experience, YAML frontmatter (`experience_id`, `timestamp`, `primary_goal`,
//! `final_outcome`, `components_used`, `execution_time_secs`, `estimated_cost`, `tags`, …)
//! then `## Experience: ID` with **Output Summary** and **Learnings**.
//!
//! [`costs`] sets, per trace, what the learner spent writing it (model tokens, dollars,
//! seconds) against what its runs on devices took (seconds, on-device tokens, no API fees):
//! the measured form of "learn once, execute many times".

use crate::db::LearnerDb;
use crate::db::memory::StoredRegeneration;
use std::collections::HashMap;
use std::fmt::Write as _;
use tracefleet::report::{Report, RunStatus, StepStatus};

/// One experience.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Experience {
    /// `run-<run id>` or `regen-<n>`.
    pub experience_id: String,
    /// `run` or `regeneration`.
    pub kind: &'static str,
    /// RFC 3339 UTC.
    pub timestamp: String,
    /// The goal.
    pub primary_goal: String,
    /// Trace id.
    pub trace_id: String,
    /// The version that ran, or the version written.
    pub trace_version: Option<String>,
    /// The device (runs).
    pub device_id: Option<String>,
    /// Runs: `success`, `success_with_recovery` (a step needed a retry or its fallback),
    /// `failure`, `stopped`. Regenerations: `regenerated`, `gave_up`, `backend_error`,
    /// `skipped`.
    pub final_outcome: String,
    /// Tools of the steps that ran; for a regeneration, the model.
    pub components_used: Vec<String>,
    /// Wall time, seconds.
    pub execution_time_secs: f64,
    /// Dollars (model fees; 0 for on-device runs).
    pub estimated_cost: f64,
    /// Prompt tokens (on-device model for runs, the learner's model for regenerations).
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// The trace's `metadata.task_type`, when the learner knows the trace.
    pub task_type: Option<String>,
    /// `task_type`, `domain`, `risk:<level>`, the trace id, `escalated` when a step escalated.
    pub tags: Vec<String>,
    /// What came out.
    pub output_summary: String,
    /// What it teaches: why it failed, what the model had to repair, what triggered it.
    pub learnings: String,
}

/// What to select.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `final_outcome` equals this.
    pub outcome: Option<String>,
    /// `task_type` equals this.
    pub task_type: Option<String>,
    /// Every one of these tags.
    pub tags: Vec<String>,
    /// This trace.
    pub trace_id: Option<String>,
    /// Goal similar to this (the follower's goal matching, at least 0.25).
    pub goal: Option<String>,
}

impl Filter {
    /// Whether `e` is selected.
    #[must_use]
    pub fn matches(&self, e: &Experience) -> bool {
        self.outcome.as_ref().is_none_or(|o| &e.final_outcome == o)
            && self
                .task_type
                .as_ref()
                .is_none_or(|t| e.task_type.as_ref() == Some(t))
            && self.tags.iter().all(|t| e.tags.contains(t))
            && self.trace_id.as_ref().is_none_or(|t| &e.trace_id == t)
            && self
                .goal
                .as_ref()
                .is_none_or(|g| tracefleet::confidence::goal_similarity(g, &e.primary_goal) >= 0.25)
    }
}

/// A trace's metadata, as far as the learner knows it.
#[derive(Debug, Clone, Default)]
struct Known {
    goal: String,
    task_type: Option<String>,
    tags: Vec<String>,
}

/// Trace metadata by trace id: the newest kept source, else the newest rollout.
fn catalogue(db: &LearnerDb) -> crate::db::Result<HashMap<String, Known>> {
    let mut out: HashMap<String, Known> = HashMap::new();
    let mut put = |t: tracefleet::trace::Trace| {
        let m = &t.metadata;
        let mut tags: Vec<String> = [m.task_type.clone(), m.domain.clone()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        if !m.risk_level.is_empty() {
            tags.push(format!("risk:{}", m.risk_level));
        }
        out.insert(
            t.id.to_string(),
            Known {
                goal: t.goal_signature.clone(),
                task_type: (!m.task_type.is_empty()).then(|| m.task_type.clone()),
                tags,
            },
        );
    };
    // Oldest first, so the newest wins; rollouts first, so a kept source wins.
    for bytes in db.rollout_signed_all()? {
        if let Ok(signed) = tracefleet::signed::decode_signed(&bytes)
            && let Ok(t) = tracefleet::compile::decode_compiled(&signed.compiled)
        {
            put(t);
        }
    }
    for (id, source) in db.kept_sources()? {
        if let Ok((t, _)) = tracefleet::compile::compile_source(&id, &source) {
            put(t);
        }
    }
    Ok(out)
}

fn rfc3339_of(unix: i64) -> String {
    tracefleet::time::rfc3339(u64::try_from(unix).unwrap_or(0))
}

/// Every experience, oldest first (runs by arrival, regenerations by time, interleaved).
///
/// # Errors
/// On SQLite failure; a stored report that no longer parses is skipped.
pub fn experiences(db: &LearnerDb) -> crate::db::Result<Vec<Experience>> {
    let known = catalogue(db)?;
    let mut out: Vec<(i64, Experience)> = Vec::new();
    for (json, at) in db.reports_by_arrival()? {
        let Ok(r) = serde_json::from_str::<Report>(&json) else {
            continue;
        };
        out.push((at, run_experience(&r, known.get(&r.trace_id))));
    }
    for StoredRegeneration { id, at, row } in db.stored_regenerations()? {
        let crate::db::regen::RegenerationRow {
            trace_id,
            from_version: from,
            to_version: to,
            outcome,
            detail,
            model,
            rounds,
            input_tokens: tin,
            output_tokens: tout,
            cost,
            failures,
            trigger,
            duration_ms: ms,
        } = row;
        let k = known.get(&trace_id).cloned().unwrap_or_default();
        let final_outcome = if outcome == "compiled" {
            "regenerated".to_owned()
        } else {
            outcome.clone()
        };
        let output_summary = match (&outcome[..], &from, &to) {
            ("compiled", Some(f), Some(t)) => format!("{trace_id} {f} rewritten as {t}: {detail}"),
            ("compiled", None, Some(t)) => {
                format!("a first trace {trace_id} {t} for the goal: {detail}")
            }
            _ => format!("no new version of {trace_id}: {detail}"),
        };
        let mut learnings =
            format!("Set off by {trigger}; {failures} failing run(s) shown to the model");
        if rounds > 1 && outcome == "compiled" {
            let _ = write!(
                learnings,
                "; the first {} reply(ies) did not compile and were repaired from the compiler's diagnostics",
                rounds - 1
            );
        }
        if outcome == "gave_up" {
            let _ = write!(
                learnings,
                "; after {rounds} rounds the reply still did not compile: {}",
                first_line(&detail)
            );
        }
        learnings.push('.');
        let mut tags = k.tags.clone();
        tags.push(trace_id.clone());
        tags.push("regeneration".into());
        out.push((
            at,
            Experience {
                experience_id: format!("regen-{id}"),
                kind: "regeneration",
                timestamp: rfc3339_of(at),
                primary_goal: k.goal.clone(),
                trace_id,
                trace_version: to,
                device_id: None,
                final_outcome,
                components_used: if model.is_empty() {
                    vec![]
                } else {
                    vec![model]
                },
                execution_time_secs: ms.map_or(0.0, |ms| ms as f64 / 1000.0),
                estimated_cost: cost,
                input_tokens: tin,
                output_tokens: tout,
                task_type: k.task_type.clone(),
                tags,
                output_summary,
                learnings,
            },
        ));
    }
    out.sort_by_key(|(at, _)| *at);
    Ok(out.into_iter().map(|(_, e)| e).collect())
}

fn first_line(s: &str) -> &str {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

fn run_experience(r: &Report, known: Option<&Known>) -> Experience {
    let ran: Vec<_> = r
        .step_results
        .iter()
        .filter(|s| s.status != StepStatus::NotRun)
        .collect();
    let recovered = ran
        .iter()
        .any(|s| s.status == StepStatus::Recovered || s.attempts > 1);
    let final_outcome = match r.status {
        RunStatus::Success if recovered => "success_with_recovery",
        RunStatus::Success => "success",
        RunStatus::Failed => "failure",
        RunStatus::Stopped => "stopped",
    };
    let mut components: Vec<String> = Vec::new();
    for s in &ran {
        if !components.contains(&s.tool) {
            components.push(s.tool.clone());
        }
    }
    let mut learnings = String::new();
    match r.status {
        RunStatus::Success => {
            let _ = write!(
                learnings,
                "All {} steps passed their validations",
                r.completed_steps
            );
            for s in ran
                .iter()
                .filter(|s| s.attempts > 1 || s.status == StepStatus::Recovered)
            {
                let _ = write!(
                    learnings,
                    "; step {} ({}) needed {} attempt(s){}",
                    s.step,
                    s.title,
                    s.attempts,
                    if s.status == StepStatus::Recovered {
                        " and its fallback"
                    } else {
                        ""
                    }
                );
            }
            learnings.push('.');
        }
        _ => {
            let failure = crate::regen::Failure::from_report(r);
            let _ = write!(
                learnings,
                "Failed at step {}: {}",
                failure.failed_step.map_or("-".into(), |s| s.to_string()),
                failure.error.as_deref().unwrap_or("no error recorded")
            );
        }
    }
    for e in &r.escalations {
        let _ = write!(learnings, " Escalated from step {}: {}.", e.step, e.message);
    }
    let k = known.cloned().unwrap_or_default();
    let mut tags = k.tags.clone();
    tags.push(r.trace_id.clone());
    if !r.escalations.is_empty() {
        tags.push("escalated".into());
    }
    Experience {
        experience_id: format!("run-{}", r.run_id),
        kind: "run",
        timestamp: r.finished_at.clone(),
        primary_goal: r.goal_signature.clone(),
        trace_id: r.trace_id.clone(),
        trace_version: Some(r.trace_version.clone()),
        device_id: Some(r.device_id.to_string()),
        final_outcome: final_outcome.into(),
        components_used: components,
        execution_time_secs: r.execution_time_secs,
        estimated_cost: 0.0,
        input_tokens: r.prompt_tokens,
        output_tokens: r.completion_tokens,
        task_type: k.task_type,
        tags,
        output_summary: format!(
            "{} {} on {}: {}/{} steps",
            r.trace_id, r.trace_version, r.device_id, r.completed_steps, r.total_steps
        ),
        learnings,
    }
}

/// A YAML scalar: `s` as a double-quoted string.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn list(items: &[String]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(|i| quoted(i))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `memory_log.md` in LLMunix's SmartMemory layout.
#[must_use]
pub fn render_memory_log(experiences: &[Experience]) -> String {
    let mut out = String::from(
        "# Smart Memory - Experience Log\n\n\
         The fleet's experiences, exported by `learner memory export`: every run a device \
         reported and every regeneration the learner made. Each entry has YAML frontmatter \
         for structured data and Markdown for what was learnt.\n\n---\n",
    );
    for e in experiences {
        let _ = write!(
            out,
            "\n---\nexperience_id: {}\ntimestamp: {}\nprimary_goal: {}\nfinal_outcome: {}\nkind: {}\ntrace_id: {}\ntrace_version: {}\ndevice_id: {}\ncomponents_used: {}\nexecution_time_secs: {:.3}\nestimated_cost: {:.6}\ninput_tokens: {}\noutput_tokens: {}\ntask_type: {}\ntags: {}\n---\n\n## Experience: {}\n\n**Output Summary:** {}\n\n**Learnings:** {}\n\n---\n",
            e.experience_id,
            quoted(&e.timestamp),
            quoted(&e.primary_goal),
            e.final_outcome,
            e.kind,
            e.trace_id,
            e.trace_version.as_deref().map_or("null".into(), quoted),
            e.device_id.as_deref().map_or("null".into(), quoted),
            list(&e.components_used),
            e.execution_time_secs,
            e.estimated_cost,
            e.input_tokens,
            e.output_tokens,
            e.task_type.as_deref().map_or("null".into(), quoted),
            list(&e.tags),
            e.experience_id,
            e.output_summary,
            e.learnings
        );
    }
    out
}

/// What one trace cost to learn and what its runs took.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TraceCost {
    /// Trace id.
    pub trace_id: String,
    /// The goal.
    pub goal: String,
    /// Regenerations that produced a version.
    pub regenerations: u32,
    /// Attempts (every outcome).
    pub attempts: u32,
    /// The learner's model: input tokens over all attempts.
    pub learner_input_tokens: u64,
    /// … output tokens.
    pub learner_output_tokens: u64,
    /// … dollars.
    pub learner_cost: f64,
    /// … seconds, median over attempts that recorded their time (`None`: none did).
    pub learner_median_secs: Option<f64>,
    /// Runs devices reported.
    pub runs: u32,
    /// Successful ones.
    pub successes: u32,
    /// Median run wall time on the device, seconds.
    pub run_median_secs: Option<f64>,
    /// On-device model tokens over all runs (prompt + generated).
    pub run_tokens: u64,
    /// Learner dollars spread over the runs (`learner_cost / runs`).
    pub learner_cost_per_run: Option<f64>,
    /// How many times faster a run is than asking the learner's model
    /// (`learner_median_secs / run_median_secs`).
    pub speedup: Option<f64>,
}

impl TraceCost {
    /// Both times and their ratio, the right way round: `a run takes 3.1 s, the learner's
    /// model took 4.1 s per regeneration: a run is 1.3× faster` (or `… 2.5× slower`).
    /// `None` when either time is unknown.
    pub fn speed_comparison(&self) -> Option<String> {
        let (learner, run) = (self.learner_median_secs?, self.run_median_secs?);
        if learner <= 0.0 || run <= 0.0 {
            return None;
        }
        let (ratio, way) = if run <= learner {
            (learner / run, "faster")
        } else {
            (run / learner, "slower")
        };
        // Two decimals near 1 (1.03× slower reads better than 1.0× slower), one beyond 10.
        let ratio = if ratio < 10.0 {
            format!("{ratio:.2}")
        } else {
            format!("{ratio:.1}")
        };
        Some(format!(
            "a run takes {run:.1} s (median), the learner's model took {learner:.1} s per regeneration: a run is {ratio}× {way}"
        ))
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

/// Per trace, from the stored runs and regenerations, by trace id.
///
/// # Errors
/// On SQLite failure.
pub fn costs(db: &LearnerDb) -> crate::db::Result<Vec<TraceCost>> {
    let all = experiences(db)?;
    let mut ids: Vec<&str> = all.iter().map(|e| e.trace_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out = Vec::new();
    for id in ids {
        let of = || all.iter().filter(move |e| e.trace_id == id);
        let regens: Vec<&Experience> = of().filter(|e| e.kind == "regeneration").collect();
        let runs: Vec<&Experience> = of().filter(|e| e.kind == "run").collect();
        let timed: Vec<f64> = regens
            .iter()
            .filter(|e| e.execution_time_secs > 0.0)
            .map(|e| e.execution_time_secs)
            .collect();
        let learner_cost: f64 = regens.iter().map(|e| e.estimated_cost).sum();
        let learner_median_secs = median(timed);
        let run_median_secs = median(runs.iter().map(|e| e.execution_time_secs).collect());
        let n_runs = u32::try_from(runs.len()).unwrap_or(u32::MAX);
        out.push(TraceCost {
            trace_id: id.to_owned(),
            goal: of()
                .map(|e| e.primary_goal.as_str())
                .find(|g| !g.is_empty())
                .unwrap_or_default()
                .to_owned(),
            regenerations: u32::try_from(
                regens
                    .iter()
                    .filter(|e| e.final_outcome == "regenerated")
                    .count(),
            )
            .unwrap_or(u32::MAX),
            attempts: u32::try_from(regens.len()).unwrap_or(u32::MAX),
            learner_input_tokens: regens.iter().map(|e| e.input_tokens).sum(),
            learner_output_tokens: regens.iter().map(|e| e.output_tokens).sum(),
            learner_cost,
            learner_median_secs,
            runs: n_runs,
            successes: u32::try_from(
                runs.iter()
                    .filter(|e| e.final_outcome.starts_with("success"))
                    .count(),
            )
            .unwrap_or(u32::MAX),
            run_median_secs,
            run_tokens: runs.iter().map(|e| e.input_tokens + e.output_tokens).sum(),
            learner_cost_per_run: (n_runs > 0 && !regens.is_empty())
                .then(|| learner_cost / f64::from(n_runs)),
            speedup: match (learner_median_secs, run_median_secs) {
                (Some(l), Some(r)) if r > 0.0 => Some(l / r),
                _ => None,
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::regen::RegenerationRow;
    use tracefleet::wire::{self, ReportMessage, Topic};

    fn timed(learner: Option<f64>, run: Option<f64>) -> TraceCost {
        TraceCost {
            trace_id: "t".into(),
            goal: "g".into(),
            regenerations: 1,
            attempts: 1,
            learner_input_tokens: 0,
            learner_output_tokens: 0,
            learner_cost: 0.0,
            learner_median_secs: learner,
            runs: 1,
            successes: 1,
            run_median_secs: run,
            run_tokens: 0,
            learner_cost_per_run: None,
            speedup: None,
        }
    }

    #[test]
    fn the_speed_comparison_gives_both_times_and_the_ratio_the_right_way_round() {
        let faster = timed(Some(10.0), Some(2.0)).speed_comparison().unwrap();
        assert!(faster.contains("a run takes 2.0 s"), "{faster}");
        assert!(faster.contains("took 10.0 s"), "{faster}");
        assert!(faster.ends_with("a run is 5.00× faster"), "{faster}");
        // The demo's case: the learner's model (a recorded reply plus the dry run) was quicker.
        let slower = timed(Some(4.0), Some(5.0)).speed_comparison().unwrap();
        assert!(slower.ends_with("a run is 1.25× slower"), "{slower}");
        assert!(!slower.contains("faster"), "{slower}");
        assert_eq!(timed(None, Some(1.0)).speed_comparison(), None);
        assert_eq!(timed(Some(1.0), Some(0.0)).speed_comparison(), None);
    }

    const SOURCE: &str = "---\ntrace_id: t\nversion: \"1.0.0\"\ngoal_signature: \"triage the log: count \\\"errors\\\"\"\nmetadata:\n  task_type: log_triage\n  domain: system_administration\n  risk_level: low\n---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"true\"\n```\n";

    fn report(db: &mut LearnerDb, run: &str, ok: bool, secs: f64, attempts: u32) {
        let mut r = crate::simulate::synthetic_report("pi-01", run, "t", "1.0.0", ok);
        r.goal_signature = "triage the log: count \"errors\"".into();
        r.execution_time_secs = secs;
        r.prompt_tokens = 700;
        r.completion_tokens = 50;
        r.step_results = vec![
            serde_json::from_value(serde_json::json!({
                "step": 1, "title": "s", "tool": "Bash",
                "status": if ok { "success" } else { "failed" },
                "attempts": attempts, "output": "", "output_truncated": false,
                "exit_code": i32::from(!ok), "error": if ok { None } else { Some("exit status 1") },
                "duration_secs": secs, "validations": [], "llm": null, "items": null
            }))
            .unwrap(),
        ];
        let m = ReportMessage {
            run_id: run.to_owned(),
            report_json: serde_json::to_string(&r).unwrap(),
        };
        db.ingest(&Topic::Reports("pi-01".into()).name(), &wire::encode(&m))
            .unwrap();
    }

    fn regeneration(outcome: &str, ms: u64, cost: f64) -> RegenerationRow {
        RegenerationRow {
            trace_id: "t".into(),
            from_version: Some("1.0.0".into()),
            to_version: (outcome == "compiled").then(|| "1.1.0".into()),
            outcome: outcome.into(),
            detail: "signed t-1.1.0.tfs".into(),
            model: "claude-test".into(),
            rounds: 2,
            input_tokens: 3000,
            output_tokens: 400,
            cost,
            failures: 1,
            trigger: "escalation from pi-01: step 1".into(),
            duration_ms: Some(ms),
        }
    }

    #[test]
    fn runs_and_regenerations_become_experiences_exported_as_smart_memory_and_queried() {
        let d = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&d.path().join("learner.db")).unwrap();
        db.record_source("t", "1.0.0", SOURCE).unwrap();
        report(&mut db, "r1", true, 2.0, 1);
        report(&mut db, "r2", true, 4.0, 2);
        report(&mut db, "r3", false, 1.0, 1);
        db.record_regeneration(&regeneration("compiled", 30_000, 0.015))
            .unwrap();
        let all = experiences(&db).unwrap();
        let outcomes: Vec<&str> = all.iter().map(|e| e.final_outcome.as_str()).collect();
        assert_eq!(
            outcomes,
            ["success", "success_with_recovery", "failure", "regenerated"]
        );
        let failed = &all[2];
        assert_eq!(failed.experience_id, "run-r3");
        assert!(failed.learnings.contains("Failed at step 1"), "{failed:?}");
        assert_eq!(failed.task_type.as_deref(), Some("log_triage"));
        assert_eq!(
            failed.tags,
            ["log_triage", "system_administration", "risk:low", "t"]
        );
        assert_eq!(failed.components_used, ["Bash"]);
        assert!(all[1].learnings.contains("needed 2 attempt(s)"));
        let regen = &all[3];
        assert_eq!(regen.kind, "regeneration");
        assert_eq!(regen.primary_goal, "triage the log: count \"errors\"");
        assert_eq!(regen.trace_version.as_deref(), Some("1.1.0"));
        assert!((regen.execution_time_secs - 30.0).abs() < 1e-9);
        assert!(
            regen.learnings.contains("repaired from the compiler"),
            "{regen:?}"
        );

        // memory_log.md: each block's frontmatter is YAML with the SmartMemory fields.
        let log = render_memory_log(&all);
        let blocks: Vec<&str> = log
            .split("\n---\n")
            .filter(|b| b.starts_with("experience_id:"))
            .collect();
        assert_eq!(blocks.len(), 4, "{log}");
        for (b, e) in blocks.iter().zip(&all) {
            let y: serde_norway::Value = serde_norway::from_str(b).unwrap();
            assert_eq!(y["experience_id"].as_str(), Some(e.experience_id.as_str()));
            assert_eq!(y["primary_goal"].as_str(), Some(e.primary_goal.as_str()));
            assert_eq!(y["final_outcome"].as_str(), Some(e.final_outcome.as_str()));
            assert!(y["tags"].as_sequence().is_some());
            assert!(y["execution_time_secs"].as_f64().is_some());
        }
        assert!(log.contains("## Experience: run-r3\n\n**Output Summary:**"));

        // Queries.
        let pick = |f: Filter| -> Vec<String> {
            all.iter()
                .filter(|e| f.matches(e))
                .map(|e| e.experience_id.clone())
                .collect()
        };
        let outcome = |o: &str| Filter {
            outcome: Some(o.into()),
            ..Filter::default()
        };
        assert_eq!(pick(outcome("failure")), ["run-r3"]);
        assert_eq!(
            pick(Filter {
                tags: vec!["regeneration".into()],
                ..Filter::default()
            }),
            ["regen-1"]
        );
        assert_eq!(
            pick(Filter {
                task_type: Some("log_triage".into()),
                goal: Some("count errors in the log".into()),
                ..Filter::default()
            })
            .len(),
            4
        );
        assert!(
            pick(Filter {
                goal: Some("reboot the reactor".into()),
                ..Filter::default()
            })
            .is_empty()
        );

        // Costs: the learner's spend against the runs.
        db.record_regeneration(&regeneration("gave_up", 10_000, 0.005))
            .unwrap();
        let c = &costs(&db).unwrap()[0];
        assert_eq!(
            (c.regenerations, c.attempts, c.runs, c.successes),
            (1, 2, 3, 2)
        );
        assert_eq!((c.learner_input_tokens, c.run_tokens), (6000, 3 * 750));
        assert!((c.learner_cost - 0.02).abs() < 1e-12);
        assert_eq!(c.learner_median_secs, Some(20.0));
        assert_eq!(c.run_median_secs, Some(2.0));
        assert_eq!(c.speedup, Some(10.0));
        assert!((c.learner_cost_per_run.unwrap() - 0.02 / 3.0).abs() < 1e-12);
    }
}
