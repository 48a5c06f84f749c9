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

impl DryRunner {
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
