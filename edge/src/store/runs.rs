//! Runs and their journal: a run's start, each step's start and result, the report at the
//! end (and, when enrolled, its outbox row in the same transaction); unfinished runs for a
//! resume.

use super::*;

/// A run that did not finish, with what it needs to continue.
#[derive(Debug, Clone)]
pub struct Unfinished {
    /// Trace id.
    pub trace_id: String,
    /// Trace version.
    pub trace_version: String,
    /// `running` (the process ended without finishing it) or `stopped`.
    pub status: String,
    /// The trace as it was run: a signed trace (`signed`) or a compiled one.
    pub trace_file: Vec<u8>,
    /// Whether `trace_file` is a signed trace.
    pub signed: bool,
    /// The run's resolved inputs.
    pub inputs: BTreeMap<String, String>,
    /// The run's base directory.
    pub base_dir: String,
    /// Steps journaled so far.
    pub done: BTreeMap<u32, Completed>,
    /// Earlier resumes.
    pub resumes: u32,
}

/// Where an interrupted run's process died, from [`Store::note_crash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crash {
    /// The step in flight (the lowest journaled as started and not finished); `None` when the
    /// process died between steps.
    pub step: Option<u32>,
    /// How many times in a row the run's process died at that step, this time included.
    pub count: u32,
}

/// What a run is, for [`Store::begin_run`].
#[derive(Debug, Clone, Copy)]
pub struct NewRun<'a> {
    /// Run id.
    pub run_id: &'a str,
    /// Trace id.
    pub trace_id: &'a str,
    /// Trace version.
    pub version: &'a str,
    /// Start time (RFC 3339).
    pub started_at: &'a str,
    /// Base directory.
    pub base_dir: &'a str,
    /// The trace file (signed, or compiled when `signed` is false).
    pub trace_file: &'a [u8],
    /// Whether `trace_file` is signed.
    pub signed: bool,
    /// Resolved inputs.
    pub inputs: &'a BTreeMap<String, String>,
}

/// A summary row of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRow {
    /// Run id.
    pub run_id: String,
    /// Trace id.
    pub trace_id: String,
    /// Trace version.
    pub trace_version: String,
    /// `running`, `success` or `failed`.
    pub status: String,
    /// Start time (RFC 3339).
    pub started_at: String,
}

impl Store {
    /// Records the start of a run.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn begin_run(&self, run: &NewRun<'_>) -> Result<(), StoreError> {
        let inputs = serde_json::to_string(run.inputs).unwrap_or_default();
        self.conn.execute(
            "INSERT INTO runs (run_id, trace_id, trace_version, status, started_at, base_dir, trace_file, signed, inputs_json) VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8)",
            params![
                run.run_id,
                run.trace_id,
                run.version,
                run.started_at,
                run.base_dir,
                run.trace_file,
                run.signed,
                inputs
            ],
        )?;
        Ok(())
    }

    /// A run that has not finished (`running` or `stopped`), with its journal; `None` when
    /// there is no such run or it finished.
    ///
    /// # Errors
    /// On SQLite failure or an unreadable journal row.
    pub fn unfinished(&self, run_id: &str) -> Result<Option<Unfinished>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT trace_id, trace_version, status, trace_file, signed, inputs_json, base_dir, resumes FROM runs WHERE run_id = ?1 AND status IN ('running', 'stopped')",
                [run_id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<Vec<u8>>>(3)?,
                        r.get::<_, bool>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, u32>(7)?,
                    ))
                },
            )
            .optional()?;
        let Some((trace_id, trace_version, status, file, signed, inputs, base_dir, resumes)) = row
        else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare("SELECT step, result_json, output FROM run_steps WHERE run_id = ?1")?;
        let mut done = BTreeMap::new();
        for row in stmt.query_map([run_id], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })? {
            let (step, json, output) = row?;
            let result: StepResult =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                    what: "run journal",
                    detail: format!("run {run_id}, step {step}: {e}"),
                })?;
            done.insert(step, Completed { result, output });
        }
        Ok(Some(Unfinished {
            trace_id,
            trace_version,
            status,
            trace_file: file.unwrap_or_default(),
            signed,
            inputs: serde_json::from_str(&inputs).map_err(|e| StoreError::Corrupt {
                what: "run inputs",
                detail: format!("run {run_id}: {e}"),
            })?,
            base_dir,
            done,
            resumes,
        }))
    }

    /// Runs left `running` (their process ended without finishing them, or is still going)
    /// of this trace version with these inputs, newest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn running_like(
        &self,
        trace_id: &str,
        version: &str,
        inputs: &BTreeMap<String, String>,
    ) -> Result<Vec<String>, StoreError> {
        let inputs = serde_json::to_string(inputs).unwrap_or_default();
        let mut stmt = self.conn.prepare(
            "SELECT run_id FROM runs WHERE status = 'running' AND trace_id = ?1 AND trace_version = ?2 AND inputs_json = ?3 AND trace_file IS NOT NULL ORDER BY run_id DESC",
        )?;
        let ids = stmt.query_map(params![trace_id, version, inputs], |r| r.get(0))?;
        Ok(ids.collect::<Result<_, _>>()?)
    }

    /// Counts that an interrupted (`running`, unlocked) run's process died, at the step it had
    /// in flight: one more when that is where it died last time, else the first. A count
    /// already at two or more is returned as it is (a run refused for a crash loop is not
    /// counted again each time it is refused).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn note_crash(&self, run_id: &str) -> Result<Crash, StoreError> {
        let step: Option<u32> = self.conn.query_row(
            "SELECT MIN(step) FROM run_steps WHERE run_id = ?1 AND status = 'running'",
            [run_id],
            |r| r.get(0),
        )?;
        let (last, count): (Option<u32>, u32) = self.conn.query_row(
            "SELECT crash_step, crashes FROM runs WHERE run_id = ?1",
            [run_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let same = count > 0 && last == step;
        if same && count >= 2 {
            return Ok(Crash { step, count });
        }
        let count = if same { count + 1 } else { 1 };
        self.conn.execute(
            "UPDATE runs SET crash_step = ?2, crashes = ?3 WHERE run_id = ?1",
            params![run_id, step, count],
        )?;
        Ok(Crash { step, count })
    }

    /// Marks a run `running` again for a resume and counts the resume.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn mark_resumed(&self, run_id: &str) -> Result<u32, StoreError> {
        Ok(self.conn.query_row(
            "UPDATE runs SET status = 'running', resumes = resumes + 1 WHERE run_id = ?1 RETURNING resumes",
            [run_id],
            |r| r.get(0),
        )?)
    }

    /// Journals that a step starts (status `running`; its record says not run, so a resume
    /// runs it again unless it finishes).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_step_start(&self, run_id: &str, result: &StepResult) -> Result<(), StoreError> {
        let json = serde_json::to_string(result).unwrap_or_default();
        self.conn.execute(
            "INSERT OR REPLACE INTO run_steps (run_id, step, status, result_json, output) VALUES (?1, ?2, 'running', ?3, '')",
            params![run_id, result.step, json],
        )?;
        Ok(())
    }

    /// Journals a finished step.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_step(
        &self,
        run_id: &str,
        result: &StepResult,
        output: &str,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(result).unwrap_or_default();
        let status = serde_json::to_value(result.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.conn.execute(
            "INSERT OR REPLACE INTO run_steps (run_id, step, status, result_json, output) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![run_id, result.step, status, json, output],
        )?;
        Ok(())
    }

    /// Records the end of a run with its report.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn finish_run(&self, report: &Report) -> Result<(), StoreError> {
        let json = serde_json::to_string(report).unwrap_or_default();
        let status = serde_json::to_value(report.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "UPDATE runs SET status = ?2, finished_at = ?3, report_json = ?4 WHERE run_id = ?1",
            params![report.run_id, status, report.finished_at, json],
        )?;
        // On an enrolled device the report leaves through the outbox; a stopped run is not
        // finished (it reports when it is).
        if status != "stopped" && enrolled(&tx)?.is_some() {
            let message = tracefleet::wire::ReportMessage {
                run_id: report.run_id.clone(),
                report_json: json,
            };
            enqueue(
                &tx,
                OutboxKind::Report,
                &tracefleet::wire::encode(&message),
                &report.finished_at,
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs, newest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn runs(&self, limit: u32) -> Result<Vec<RunRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT run_id, trace_id, trace_version, status, started_at FROM runs ORDER BY run_id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit], |r| {
            Ok(RunRow {
                run_id: r.get(0)?,
                trace_id: r.get(1)?,
                trace_version: r.get(2)?,
                status: r.get(3)?,
                started_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The stored report of a run (JSON text), if it finished.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn report_json(&self, run_id: &str) -> Result<Option<Option<String>>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT report_json FROM runs WHERE run_id = ?1",
                [run_id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?)
    }
}
