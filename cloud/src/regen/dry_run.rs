//! The dry run: a candidate trace that compiles is run once with the follower's own engine —
//! the `follower` binary, `run --allow-unsigned` in a scratch directory that is removed
//! afterwards — on the inputs of the newest failing run, before anything is signed. A run
//! that fails goes back to the model as the next repair round, like a compiler diagnostic.
//!
//! The follower's containment applies as on a device (writes only under the scratch base
//! directory, reads only there and in the read-only roots; Landlock where the kernel has
//! it), so a model-written Bash step cannot reach the learner's files. Inputs that name
//! device paths are read on the learner's machine: `[dry_run] read_roots` says where they
//! may be found. A trace with LLM steps needs `[dry_run] model`; without one it is not
//! dry-run (the attempt says so).
//!
//! **Fidelity.** With `[dry_run] model` — the model the devices run — the candidate's
//! judgement steps are scored on their own reference examples first ([`DryRunner::fidelity`]:
//! `follower eval` on each step's scored examples, the device's own rule of agreement). A
//! step whose model repeats fewer of them than its `min_fidelity` goes back to the model that
//! wrote it as a repair round with the disagreements; the accepted candidate's figures are
//! recorded with the attempt.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracefleet::report::{Report, RunStatus};

/// `[dry_run]` in learner.toml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DryRunConfig {
    /// The follower binary (default: `follower` beside the learner's own executable, else
    /// on `PATH`).
    pub follower: Option<PathBuf>,
    /// The GGUF model for LLM steps (relative to learner.toml).
    pub model: Option<PathBuf>,
    /// Directories the run may read besides its scratch directory (the follower's
    /// `--read-root`; default: its own defaults, /var/log, /etc, /usr/share).
    #[serde(default)]
    pub read_roots: Vec<PathBuf>,
    /// Whole-run time limit (humantime, default `2m`).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Threads for the model (default: the follower's, physical cores).
    pub threads: Option<u32>,
}

fn default_timeout() -> String {
    "2m".into()
}

/// How a candidate fared.
#[derive(Debug, Clone)]
pub enum DryOutcome {
    /// Every step and check passed.
    Passed {
        /// Wall time, seconds.
        secs: f64,
    },
    /// The run failed (or stopped): its report.
    Failed(Box<Report>),
    /// Not dry-run, and why (no recorded inputs, no model for its LLM steps, the follower
    /// could not be started): recorded, not fed back to the model.
    Skipped(String),
}

/// A configured dry run.
#[derive(Debug, Clone)]
pub struct DryRunner {
    follower: PathBuf,
    model: Option<PathBuf>,
    read_roots: Vec<PathBuf>,
    timeout: Duration,
    threads: Option<u32>,
    scratch: PathBuf,
}

impl DryRunConfig {
    /// Resolves paths against `dir` (the config file's); scratch directories go under
    /// `scratch`.
    ///
    /// # Errors
    /// A timeout that does not parse.
    pub fn resolve(&self, dir: &Path, scratch: PathBuf) -> Result<DryRunner, String> {
        let timeout = humantime::parse_duration(&self.timeout).map_err(|e| {
            format!(
                "[dry_run] timeout {:?}: {e} (expected e.g. 2m, 90s)",
                self.timeout
            )
        })?;
        let follower = match &self.follower {
            Some(f) if f.components().count() > 1 => dir.join(f),
            Some(f) => f.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("follower")))
                .filter(|f| f.exists())
                .unwrap_or_else(|| "follower".into()),
        };
        Ok(DryRunner {
            follower,
            model: self.model.as_ref().map(|m| dir.join(m)),
            read_roots: self.read_roots.iter().map(|r| dir.join(r)).collect(),
            timeout,
            threads: self.threads,
            scratch,
        })
    }
}

/// How the model scored a candidate's judgement steps on their reference examples.
#[derive(Debug, Clone)]
pub enum FidelityOutcome {
    /// Each judgement step with scored examples, in step order (the model named as the file's
    /// stem).
    Measured(Vec<tracefleet::judgement::Fidelity>),
    /// Not measured, and why (no model configured, the follower could not be run).
    Skipped(String),
}

/// What `follower eval --json` prints that the dry run reads.
#[derive(Deserialize)]
struct EvalJson {
    model: String,
    items: u32,
    wrong: u32,
    #[serde(default)]
    disagreements: Vec<EvalDisagreement>,
}

#[derive(Deserialize)]
struct EvalDisagreement {
    item: u32,
    answer: String,
}

/// A step's scored examples as `follower eval` reads them: one JSON object a line.
fn dataset(examples: &[tracefleet::judgement::Example]) -> String {
    use tracefleet::judgement::Expect;
    let mut out = String::new();
    for e in examples {
        let vars: serde_json::Map<String, serde_json::Value> = e
            .vars
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
            .collect();
        let mut line = serde_json::json!({ "vars": vars });
        match &e.expect {
            Expect::Text(t) => line["expect"] = serde_json::Value::String(t.clone()),
            Expect::Regex(r) => line["expect_regex"] = serde_json::Value::String(r.clone()),
            Expect::Fields(f) => {
                line["expect"] = serde_json::from_str(f).unwrap_or(serde_json::Value::Null);
            }
        }
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

impl DryRunner {
    /// Scores each judgement step of `source` (compiled: `trace`) that has scored reference
    /// examples with `[dry_run] model`, as a device measures fidelity before the step.
    pub async fn fidelity(
        &self,
        trace: &tracefleet::trace::Trace,
        source: &str,
    ) -> FidelityOutcome {
        let steps: Vec<(u32, &tracefleet::trace::LlmCall)> = trace
            .judged_steps()
            .map(|(s, call)| (s.number, call))
            .collect();
        if steps.is_empty() {
            return FidelityOutcome::Measured(Vec::new());
        }
        let Some(model) = &self.model else {
            return FidelityOutcome::Skipped(
                "its judgement steps' fidelity was not measured: [dry_run] names no model".into(),
            );
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = self.scratch.join(format!("{}-fidelity-{nanos}", trace.id));
        let mut measured = Vec::new();
        let mut outcome = None;
        for (step, call) in steps {
            match self.eval_step(&dir, model, source, step, call).await {
                Ok(f) => measured.push(f),
                Err(why) => {
                    outcome = Some(FidelityOutcome::Skipped(why));
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        outcome.unwrap_or(FidelityOutcome::Measured(measured))
    }

    async fn eval_step(
        &self,
        dir: &Path,
        model: &Path,
        source: &str,
        step: u32,
        call: &tracefleet::trace::LlmCall,
    ) -> Result<tracefleet::judgement::Fidelity, String> {
        let file = dir.join("candidate.trace.md");
        let data = dir.join(format!("step-{step}.jsonl"));
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&file, source))
            .and_then(|()| std::fs::write(&data, dataset(call.judgement.scored())))
            .map_err(|e| format!("scratch directory {}: {e}", dir.display()))?;
        let mut cmd = tokio::process::Command::new(&self.follower);
        cmd.arg("--state-dir")
            .arg(dir.join("state"))
            .arg("eval")
            .arg(&file)
            .arg("--step")
            .arg(step.to_string())
            .arg("--dataset")
            .arg(&data)
            .arg("--model")
            .arg(model)
            // Every answer counts, however unsure: fidelity is agreement, as on a device.
            .arg("--threshold")
            .arg("0")
            .arg("--json");
        if let Some(t) = self.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        cmd.env_remove("TRACEFLEET_STATE_DIR")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(self.timeout, cmd.output()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return Err(format!(
                    "cannot start the follower {}: {e}",
                    self.follower.display()
                ));
            }
            Err(_) => {
                return Err(format!(
                    "scoring step {step}'s examples took longer than {:?}",
                    self.timeout
                ));
            }
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(format!(
                "`follower eval` of step {step} failed ({}): {}",
                output.status,
                stderr.lines().last().unwrap_or("").trim()
            ));
        }
        let e = serde_json::from_slice::<EvalJson>(&output.stdout).map_err(|e| {
            format!(
                "`follower eval --json` of step {step} printed what the learner cannot read ({e}): expected items, wrong and disagreements (is {} older than the learner?)",
                self.follower.display()
            )
        })?;
        Ok(tracefleet::judgement::Fidelity {
            step,
            model: e.model,
            agreements: e.items.saturating_sub(e.wrong),
            total: e.items,
            min_fidelity: call.judgement.min_fidelity,
            disagreements: e
                .disagreements
                .into_iter()
                .take(tracefleet::judgement::MAX_DISAGREEMENTS_KEPT)
                .map(|d| (d.item, d.answer))
                .collect(),
        })
    }

    /// Runs `source` (trace `trace_id`) on `inputs`.
    pub async fn run(
        &self,
        trace: &tracefleet::trace::Trace,
        source: &str,
        inputs: Option<&BTreeMap<String, String>>,
    ) -> DryOutcome {
        let Some(inputs) = inputs else {
            return DryOutcome::Skipped("no recorded inputs (no failing run)".into());
        };
        if trace.llm_steps().next().is_some() && self.model.is_none() {
            return DryOutcome::Skipped("it has LLM steps and [dry_run] names no model".into());
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = self.scratch.join(format!("{}-{nanos}", trace.id));
        let outcome = self.run_in(&dir, source, inputs).await;
        let _ = std::fs::remove_dir_all(&dir);
        outcome
    }

    async fn run_in(
        &self,
        dir: &Path,
        source: &str,
        inputs: &BTreeMap<String, String>,
    ) -> DryOutcome {
        let file = dir.join("candidate.trace.md");
        let report = dir.join("report.json");
        if let Err(e) =
            std::fs::create_dir_all(dir.join("run")).and_then(|()| std::fs::write(&file, source))
        {
            return DryOutcome::Skipped(format!("scratch directory {}: {e}", dir.display()));
        }
        let mut cmd = tokio::process::Command::new(&self.follower);
        cmd.arg("--state-dir")
            .arg(dir.join("state"))
            .arg("run")
            .arg(&file)
            .arg("--allow-unsigned")
            .arg("--base-dir")
            .arg(dir.join("run"))
            .arg("--output")
            .arg(&report)
            .arg("--device-id")
            .arg("learner-dry-run")
            .arg("--timeout")
            .arg(format!("{}s", self.timeout.as_secs().max(1)));
        for (k, v) in inputs {
            cmd.arg("--var").arg(format!("{k}={v}"));
        }
        if let Some(m) = &self.model {
            cmd.arg("--model").arg(m);
        }
        if let Some(t) = self.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        for r in &self.read_roots {
            cmd.arg("--read-root").arg(r);
        }
        cmd.env_remove("TRACEFLEET_STATE_DIR")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let started = std::time::Instant::now();
        let output = match tokio::time::timeout(
            self.timeout + Duration::from_secs(10),
            cmd.output(),
        )
        .await
        {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return DryOutcome::Skipped(format!(
                    "cannot start the follower {}: {e}",
                    self.follower.display()
                ));
            }
            Err(_) => {
                return DryOutcome::Skipped(format!(
                    "the follower did not finish within {:?}",
                    self.timeout
                ));
            }
        };
        let secs = started.elapsed().as_secs_f64();
        match std::fs::read_to_string(&report)
            .ok()
            .and_then(|j| serde_json::from_str::<Report>(&j).ok())
        {
            Some(r) if r.status == RunStatus::Success => DryOutcome::Passed { secs },
            // Preconditions check the environment: here they say the failing run's inputs
            // are not on the learner's machine, which is nothing to tell the model.
            Some(r) if !r.all_preconditions_met => DryOutcome::Skipped(format!(
                "the failing run's inputs are not available here: {}",
                r.error.as_deref().unwrap_or("a precondition failed")
            )),
            Some(r) => DryOutcome::Failed(Box::new(r)),
            None => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                DryOutcome::Skipped(format!(
                    "the follower wrote no report ({}): {}",
                    output.status,
                    stderr.lines().last().unwrap_or("").trim()
                ))
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SOURCE: &str = "---\ntrace_id: t\nversion: \"1.0.0\"\ngoal_signature: do the thing\n---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"true\"\n```\n";

    fn config(text: &str) -> DryRunConfig {
        toml::from_str(text).unwrap()
    }

    fn trace() -> tracefleet::trace::Trace {
        tracefleet::compile::compile_source("t", SOURCE).unwrap().0
    }

    fn inputs() -> BTreeMap<String, String> {
        BTreeMap::from([("path".to_owned(), "/var/log/x".to_owned())])
    }

    /// A stand-in for the follower: writes `report` where `--output` says, or nothing.
    fn fake_follower(dir: &Path, report: Option<&Report>) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let script = dir.join("follower");
        let copy = match report {
            Some(r) => {
                let json = dir.join("canned.json");
                std::fs::write(&json, serde_json::to_string(r).unwrap()).unwrap();
                format!("cp '{}' \"$out\"", json.display())
            }
            None => "echo 'no model here' >&2; exit 2".to_owned(),
        };
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = --output ] && out=$2; shift; done\n{copy}\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    /// A stand-in for `follower eval --json`: keeps the dataset it was given as
    /// `dir/seen-N.jsonl` and prints `dir/eval-N.json` (N counting calls from 1), or fails.
    pub(crate) fn fake_eval(dir: &Path, replies: &[Option<&str>]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        for (i, r) in replies.iter().enumerate() {
            if let Some(r) = r {
                std::fs::write(dir.join(format!("eval-{}.json", i + 1)), r).unwrap();
            }
        }
        let script = dir.join("follower-eval");
        let d = dir.display();
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nn=$(( $(cat '{d}/calls' 2>/dev/null || echo 0) + 1 )); echo $n > '{d}/calls'\n\
                 while [ $# -gt 0 ]; do [ \"$1\" = --dataset ] && cp \"$2\" '{d}/seen-'$n.jsonl; shift; done\n\
                 [ -f '{d}/eval-'$n.json ] || {{ echo 'error: no model here' >&2; exit 2; }}\ncat '{d}/eval-'$n.json\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    /// Trace `t` with a judgement step: four examples, the first in the prompt.
    pub(crate) const JUDGED: &str = "---\ntrace_id: t\nversion: \"1.0.0\"\ngoal_signature: name the protocol\ninputs:\n  entry:\n    default: \"ssh 22/___\"\n---\n### Step 1: protocol\n**Tool Call**:\n```yaml\ntool: LLM\nparameters:\n  prompt: \"Protocol of {entry}? Answer tcp or udp.\"\n  grammar: 'root ::= \"tcp\" | \"udp\"'\n  few_shot: 1\n  examples:\n    - vars: {entry: \"ftp 21/___\"}\n      expect: tcp\n    - vars: {entry: \"ssh 22/___\"}\n      expect: tcp\n    - vars: {entry: \"domain 53/___\"}\n      expect: udp\n    - vars: {entry: \"http 80/___\"}\n      expect_regex: \"^tcp$\"\n```\n";

    #[tokio::test]
    async fn fidelity_is_scored_with_follower_eval_on_each_judgement_steps_scored_examples() {
        let d = tempfile::tempdir().unwrap();
        let follower = fake_eval(
            d.path(),
            &[
                Some(
                    r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "items": 3, "wrong": 2, "disagreements": [{"item": 1, "answer": "tcp"}, {"item": 2, "answer": "udp"}], "accuracy": 0.33}"#,
                ),
                None,
                Some(r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "items": 3, "accuracy": 0.33}"#),
            ],
        );
        let r = config(&format!(
            "follower = \"{}\"\nmodel = \"m.gguf\"",
            follower.display()
        ))
        .resolve(d.path(), d.path().join("scratch"))
        .unwrap();
        let judged = tracefleet::compile::compile_source("t", JUDGED).unwrap().0;
        match r.fidelity(&judged, JUDGED).await {
            FidelityOutcome::Measured(f) => {
                assert_eq!(f.len(), 1);
                let f = &f[0];
                assert_eq!((f.step, f.agreements, f.total), (1, 1, 3));
                assert_eq!(f.model, "SmolLM2-135M-Instruct.Q4_1");
                assert!(!f.passes());
                assert_eq!(
                    f.disagreements,
                    [(1, "tcp".to_owned()), (2, "udp".to_owned())]
                );
            }
            other => panic!("{other:?}"),
        }
        // The scored examples (not the one in the prompt), as `follower eval` reads them.
        let seen = std::fs::read_to_string(d.path().join("seen-1.jsonl")).unwrap();
        assert_eq!(
            seen,
            "{\"expect\":\"tcp\",\"vars\":{\"entry\":\"ssh 22/___\"}}\n{\"expect\":\"udp\",\"vars\":{\"entry\":\"domain 53/___\"}}\n{\"expect_regex\":\"^tcp$\",\"vars\":{\"entry\":\"http 80/___\"}}\n"
        );
        // A follower that cannot score says why; a trace without judgement needs nothing;
        // without a model nothing is measured.
        match r.fidelity(&judged, JUDGED).await {
            FidelityOutcome::Skipped(why) => assert!(
                why.contains("`follower eval` of step 1 failed") && why.ends_with("no model here"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        // One that prints figures without the wrong items (an older follower) says so.
        match r.fidelity(&judged, JUDGED).await {
            FidelityOutcome::Skipped(why) => assert!(
                why.contains("printed what the learner cannot read (missing field `wrong`")
                    && why.contains("older than the learner"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(r.fidelity(&trace(), SOURCE).await, FidelityOutcome::Measured(f) if f.is_empty())
        );
        let no_model = config(&format!("follower = \"{}\"", follower.display()))
            .resolve(d.path(), d.path().join("scratch"))
            .unwrap();
        assert!(
            matches!(no_model.fidelity(&judged, JUDGED).await, FidelityOutcome::Skipped(why) if why.contains("names no model"))
        );
        assert_eq!(
            std::fs::read_dir(d.path().join("scratch")).unwrap().count(),
            0
        );
    }

    #[test]
    fn settings_resolve_against_the_config_directory_and_a_bad_timeout_is_named() {
        let d = Path::new("/etc/tracefleet");
        let r = config("follower = \"bin/follower\"\nmodel = \"m.gguf\"\nread_roots = [\"data\"]")
            .resolve(d, "/tmp/s".into())
            .unwrap();
        assert_eq!(r.follower, d.join("bin/follower"));
        assert_eq!(r.model, Some(d.join("m.gguf")));
        assert_eq!(r.read_roots, vec![d.join("data")]);
        assert_eq!(r.timeout, Duration::from_secs(120));
        // A bare name is looked up on PATH, as a command.
        let r = config("follower = \"follower\"")
            .resolve(d, "/tmp/s".into())
            .unwrap();
        assert_eq!(r.follower, Path::new("follower"));
        let e = config("timeout = \"later\"")
            .resolve(d, "/tmp/s".into())
            .unwrap_err();
        assert!(
            e.contains("[dry_run] timeout \"later\"") && e.contains("expected"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn what_cannot_be_dry_run_is_skipped_saying_why() {
        let d = tempfile::tempdir().unwrap();
        let r = config("follower = \"/nonexistent/follower\"")
            .resolve(d.path(), d.path().join("scratch"))
            .unwrap();
        let skipped = |o: DryOutcome| match o {
            DryOutcome::Skipped(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(skipped(r.run(&trace(), SOURCE, None).await).contains("no recorded inputs"));
        let why = skipped(r.run(&trace(), SOURCE, Some(&inputs())).await);
        assert!(
            why.starts_with("cannot start the follower /nonexistent/follower"),
            "{why}"
        );
        let llm_source = SOURCE.replace(
            "tool: Bash\nparameters:\n  command: \"true\"",
            "tool: LLM\nparameters:\n  prompt: \"say hi\"",
        );
        let llm = tracefleet::compile::compile_source("t", &llm_source)
            .unwrap()
            .0;
        let why = skipped(r.run(&llm, SOURCE, Some(&inputs())).await);
        assert!(why.contains("LLM steps"), "{why}");
    }

    #[tokio::test]
    async fn the_followers_report_decides_passed_failed_or_skipped() {
        let d = tempfile::tempdir().unwrap();
        let scratch = d.path().join("scratch");
        let run = |report: Option<Report>| {
            let follower = fake_follower(d.path(), report.as_ref());
            let r = config(&format!("follower = \"{}\"", follower.display()))
                .resolve(d.path(), scratch.clone())
                .unwrap();
            async move { r.run(&trace(), SOURCE, Some(&inputs())).await }
        };
        let ok = crate::simulate::synthetic_report("learner-dry-run", "r", "t", "1.0.0", true);
        assert!(matches!(
            run(Some(ok.clone())).await,
            DryOutcome::Passed { .. }
        ));
        let failed = crate::simulate::synthetic_report("learner-dry-run", "r", "t", "1.0.0", false);
        assert!(
            matches!(run(Some(failed.clone())).await, DryOutcome::Failed(r) if r.run_id == "r")
        );
        let mut unmet = failed;
        unmet.all_preconditions_met = false;
        match run(Some(unmet)).await {
            DryOutcome::Skipped(why) => {
                assert!(why.contains("inputs are not available here"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        match run(None).await {
            DryOutcome::Skipped(why) => {
                assert!(
                    why.contains("wrote no report") && why.ends_with("no model here"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Every scratch directory is removed afterwards.
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    }
}
