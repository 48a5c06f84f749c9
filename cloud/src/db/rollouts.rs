//! Staged rollouts' rows (`rollouts`) and the fleet facts a rollout's next step depends on:
//! which devices acknowledged a version, how many runs each reported. The decisions —
//! which wave comes next, when to halt — are [`crate::rollout`]'s; waves are stored as the
//! JSON it writes.

use super::{LearnerDb, Result};
use rusqlite::{OptionalExtension, params};
use std::collections::{HashMap, HashSet};

/// A rollout as stored, with its version's run counts.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    /// Row id.
    pub id: i64,
    /// Trace id.
    pub trace_id: String,
    /// Version rolled out.
    pub version: String,
    /// Waves in order, as JSON (see [`crate::rollout::Wave`]).
    pub waves_json: String,
    /// Index of the last wave published (-1: none yet).
    pub wave: i64,
    /// State (`running`, `halted`, `done`, `aborting`, `aborted`, `superseded`).
    pub state: String,
    /// Failure rate above which the rollout halts.
    pub max_failure_rate: f64,
    /// Runs needed per wave to go on, and before the failure rate counts.
    pub min_runs: i64,
    /// Why it halted or stopped.
    pub reason: String,
    /// Runs of this version reported so far (stopped runs not counted).
    pub runs: i64,
    /// Failed runs of this version.
    pub failures: i64,
}

/// A rollout to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRollout<'a> {
    /// Trace id.
    pub trace_id: &'a str,
    /// Version.
    pub version: &'a str,
    /// The signed trace file.
    pub signed: &'a [u8],
    /// Waves in order, as JSON.
    pub waves_json: &'a str,
    /// Failure rate above which the rollout halts.
    pub max_failure_rate: f64,
    /// Runs each wave must report, and before the failure rate counts.
    pub min_runs: u32,
}

impl LearnerDb {
    /// Records a new rollout, superseding a running one of the same trace; returns its id.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn insert_rollout(&mut self, r: &NewRollout<'_>, now: i64) -> Result<i64> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE rollouts SET state = 'superseded', reason = 'a newer rollout of this trace started', updated_at = ?2
             WHERE trace_id = ?1 AND state = 'running'",
            params![r.trace_id, now],
        )?;
        tx.execute(
            "INSERT INTO rollouts (trace_id, version, signed, waves_json, wave, state, max_failure_rate, min_runs, reason, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, -1, 'running', ?5, ?6, '', ?7, ?7)",
            params![
                r.trace_id,
                r.version,
                r.signed,
                r.waves_json,
                r.max_failure_rate,
                r.min_runs,
                now
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    /// Marks the running or halted rollout of `trace_id` `aborting`; `false` when there is
    /// none.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn abort_rollout(&self, trace_id: &str, now: i64) -> Result<bool> {
        Ok(self.conn.execute(
            "UPDATE rollouts SET state = 'aborting', reason = 'aborted by an operator', updated_at = ?2
             WHERE trace_id = ?1 AND state IN ('running', 'halted')",
            params![trace_id, now],
        )? > 0)
    }

    /// Every rollout, newest first, with its run counts.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn rollouts(&self) -> Result<Vec<RolloutRow>> {
        // Runs and failures from the per-version statistics ingest keeps (stopped runs are not
        // counted there): no scan of the runs table every tick.
        let mut s = self.conn.prepare_cached(
            "SELECT r.id, r.trace_id, r.version, r.waves_json, r.wave, r.state, r.max_failure_rate, r.min_runs, r.reason,
               COALESCE(s.runs, 0), COALESCE(s.runs - s.successes, 0)
             FROM rollouts r LEFT JOIN trace_stats s ON s.trace_id = r.trace_id AND s.version = r.version
             ORDER BY r.id DESC",
        )?;
        let rows = s.query_map([], |r| {
            Ok(RolloutRow {
                id: r.get(0)?,
                trace_id: r.get(1)?,
                version: r.get(2)?,
                waves_json: r.get(3)?,
                wave: r.get(4)?,
                state: r.get(5)?,
                max_failure_rate: r.get(6)?,
                min_runs: r.get(7)?,
                reason: r.get(8)?,
                runs: r.get(9)?,
                failures: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The signed trace of rollout `id`.
    ///
    /// # Errors
    /// On SQLite failure (also when there is no such rollout).
    pub fn rollout_signed(&self, id: i64) -> Result<Vec<u8>> {
        Ok(self
            .conn
            .query_row("SELECT signed FROM rollouts WHERE id = ?1", [id], |x| {
                x.get(0)
            })?)
    }

    /// Sets rollout `id`'s state, wave and reason.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn set_rollout(
        &self,
        id: i64,
        state: &str,
        wave: i64,
        reason: &str,
        now: i64,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE rollouts SET state = ?2, wave = ?3, reason = ?4, updated_at = ?5 WHERE id = ?1",
            params![id, state, wave, reason, now],
        )?;
        Ok(())
    }

    /// The version and signed trace of the newest completed (`done`) rollout of `trace_id`.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn last_good(&self, trace_id: &str) -> Result<Option<(String, Vec<u8>)>> {
        Ok(self
            .conn
            .prepare(
                "SELECT version, signed FROM rollouts WHERE trace_id = ?1 AND state = 'done' ORDER BY id DESC LIMIT 1",
            )?
            .query_map([trace_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .next()
            .transpose()?)
    }

    /// The signed trace of the newest rollout of `trace_id`, whatever its state.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn newest_rollout_signed(&self, trace_id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row(
                "SELECT signed FROM rollouts WHERE trace_id = ?1 ORDER BY id DESC LIMIT 1",
                [trace_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Every version of `trace_id` the learner has heard of: rolled out, acknowledged or
    /// reported.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn known_versions(&self, trace_id: &str) -> Result<Vec<String>> {
        Ok(self
            .conn
            .prepare(
                "SELECT version FROM rollouts WHERE trace_id = ?1
                 UNION SELECT version FROM acks WHERE trace_id = ?1
                 UNION SELECT version FROM trace_stats WHERE trace_id = ?1",
            )?
            .query_map([trace_id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Devices that acknowledged `trace_id` `version` as installed (or already installed).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn acked_devices(&self, trace_id: &str, version: &str) -> Result<HashSet<String>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT device_id FROM acks WHERE trace_id = ?1 AND version = ?2 AND outcome IN ('installed', 'already_installed')",
            )?
            .query_map(params![trace_id, version], |x| x.get(0))?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Runs of `trace_id` `version` each device reported (stopped runs not counted).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn runs_by_device(&self, trace_id: &str, version: &str) -> Result<HashMap<String, i64>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT device_id, COUNT(*) FROM runs WHERE trace_id = ?1 AND trace_version = ?2 AND status != 'stopped' AND counted = 1 GROUP BY device_id",
            )?
            .query_map(params![trace_id, version], |x| Ok((x.get(0)?, x.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?)
    }
}
