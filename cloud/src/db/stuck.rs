//! The stuck-run watchdog's records: the runs online devices say are running (from their
//! heartbeats), the longest successful run of a trace, and each stuck run's stage
//! (`stuck_runs`) with the escalation a kill leaves. The decisions are [`crate::stuck`]'s.

use super::{LearnerDb, Result, id_at};
use rusqlite::{OptionalExtension, params};
use tracefleet::ids::DeviceId;
use tracefleet::wire::RunningRun;

impl LearnerDb {
    /// Each online device with runs in its last heartbeat, and those runs (a list that does
    /// not parse counts as empty).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn running_runs(&self) -> Result<Vec<(DeviceId, Vec<RunningRun>)>> {
        let mut devices = self.conn.prepare_cached(
            "SELECT device_id, running_json FROM devices WHERE online = 1 AND running_json != '[]'",
        )?;
        let rows = devices.query_map([], |r| Ok((id_at(r, 0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (device, running) = row?;
            out.push((device, serde_json::from_str(&running).unwrap_or_default()));
        }
        Ok(out)
    }

    /// The longest successful run of `trace_id` the fleet reported, seconds.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn longest_success_secs(&self, trace_id: &str) -> Result<Option<f64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT MAX(json_extract(report_json, '$.execution_time_secs')) FROM runs WHERE trace_id = ?1 AND status = 'success'",
                [trace_id],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    /// The watchdog's stage for `run_id` and since when, if it has one.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn stuck_stage(&self, run_id: &str) -> Result<Option<(String, i64)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT stage, since FROM stuck_runs WHERE run_id = ?1",
                [run_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Records that the watchdog reached `stage` for `run_id` at `now`.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn set_stuck_stage(
        &self,
        run_id: &str,
        device_id: &str,
        trace_id: &str,
        stage: &str,
        now: i64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO stuck_runs (run_id, device_id, trace_id, stage, since) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (run_id) DO UPDATE SET stage = excluded.stage, since = excluded.since",
            params![run_id, device_id, trace_id, stage, now],
        )?;
        Ok(())
    }

    /// Records an escalation the learner raised itself (once per device, trace, run, reason
    /// and time).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn add_escalation(
        &self,
        device_id: &str,
        trace_id: &str,
        run_id: Option<&str>,
        reason: &str,
        at: i64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO escalations (device_id, trace_id, run_id, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![device_id, trace_id, run_id, reason, at],
        )?;
        Ok(())
    }
}
