//! Regenerations (`regenerations`: every attempt, what it cost, what came out), the trace
//! sources the learner keeps (`trace_sources`), and the automatic triggers' cursor over the
//! escalations (`cursors`).

use super::{LearnerDb, Result, now_secs};
use rusqlite::{OptionalExtension, params};

/// A regeneration as recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RegenerationRow {
    /// Trace id.
    pub trace_id: String,
    /// The version it replaces (`None`: a first version for a new goal).
    pub from_version: Option<String>,
    /// The version it produced, if any.
    pub to_version: Option<String>,
    /// `compiled` (signed and rolled out) or `gave_up`.
    pub outcome: String,
    /// The rollout, or why it gave up.
    pub detail: String,
    /// The model that answered.
    pub model: String,
    /// Rounds (a reply and its repairs).
    pub rounds: u32,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Dollars.
    pub cost: f64,
    /// Failing runs shown to the model.
    pub failures: u32,
    /// What set it off: `command` (`learner regenerate`), or the automatic trigger and why.
    pub trigger: String,
    /// How long asking the model (all rounds) took, milliseconds; `None` when nothing was
    /// asked.
    pub duration_ms: Option<u64>,
}

/// An escalation as the automatic triggers read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEscalation {
    /// Row id (the cursor moves past it).
    pub id: i64,
    /// The device.
    pub device_id: tracefleet::ids::DeviceId,
    /// The trace (`-` for a goal no trace matched).
    pub trace_id: String,
    /// The run, if any.
    pub run_id: Option<String>,
    /// Why.
    pub reason: String,
}

impl LearnerDb {
    /// Records a regeneration (`outcome`: `compiled` or `gave_up`, …).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_regeneration(&self, r: &RegenerationRow) -> Result<()> {
        self.conn.execute(
            "INSERT INTO regenerations (trace_id, from_version, to_version, outcome, detail, model, rounds, input_tokens, output_tokens, cost, failures, at, trigger, duration_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                r.trace_id,
                r.from_version,
                r.to_version,
                r.outcome,
                r.detail,
                r.model,
                r.rounds,
                i64::try_from(r.input_tokens).unwrap_or(i64::MAX),
                i64::try_from(r.output_tokens).unwrap_or(i64::MAX),
                r.cost,
                r.failures,
                now_secs(),
                r.trigger,
                r.duration_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX))
            ],
        )?;
        Ok(())
    }

    /// Keeps the source of `trace_id` `version` (replacing one kept before).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_source(&self, trace_id: &str, version: &str, source: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO trace_sources (trace_id, version, source, at) VALUES (?1, ?2, ?3, ?4)",
            params![trace_id, version, source, now_secs()],
        )?;
        Ok(())
    }

    /// The kept source of `trace_id` `version`, if any.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn source(&self, trace_id: &str, version: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT source FROM trace_sources WHERE trace_id = ?1 AND version = ?2",
                params![trace_id, version],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Every regeneration, oldest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn regenerations(&self) -> Result<Vec<RegenerationRow>> {
        let mut s = self.conn.prepare(
            "SELECT trace_id, from_version, to_version, outcome, detail, model, rounds, input_tokens, output_tokens, cost, failures, trigger, duration_ms
             FROM regenerations ORDER BY id",
        )?;
        let rows = s.query_map([], |r| {
            Ok(RegenerationRow {
                trace_id: r.get(0)?,
                from_version: r.get(1)?,
                to_version: r.get(2)?,
                outcome: r.get(3)?,
                detail: r.get(4)?,
                model: r.get(5)?,
                rounds: r.get(6)?,
                input_tokens: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                output_tokens: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
                cost: r.get(9)?,
                failures: r.get(10)?,
                trigger: r.get(11)?,
                duration_ms: r
                    .get::<_, Option<i64>>(12)?
                    .map(|ms| u64::try_from(ms).unwrap_or(0)),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest kept source of `trace_id`, whatever its version.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn newest_source(&self, trace_id: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT source FROM trace_sources WHERE trace_id = ?1 ORDER BY at DESC, rowid DESC LIMIT 1",
                [trace_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Whether a regeneration of `trace_id` `from_version` compiled, or any was attempted
    /// after `since` (Unix seconds).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn regenerated_since(
        &self,
        trace_id: &str,
        from_version: Option<&str>,
        since: i64,
    ) -> Result<bool> {
        let found: Option<i64> = self
            .conn
            .query_row(
                "SELECT 1 FROM regenerations WHERE trace_id = ?1 AND from_version IS ?2
                 AND (outcome = 'compiled' OR at > ?3) LIMIT 1",
                params![trace_id, from_version, since],
                |r| r.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }

    /// The escalations past the triggers' cursor, oldest first (the cursor does not move:
    /// [`LearnerDb::move_escalation_cursor`]).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn escalations_after_cursor(&self) -> Result<Vec<NewEscalation>> {
        let cursor: i64 = self
            .conn
            .query_row(
                "SELECT value FROM cursors WHERE name = 'escalations'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        Ok(self
            .conn
            .prepare(
                "SELECT id, device_id, trace_id, run_id, reason FROM escalations WHERE id > ?1 ORDER BY id",
            )?
            .query_map([cursor], |r| {
                Ok(NewEscalation {
                    id: r.get(0)?,
                    device_id: super::id_at(r, 1)?,
                    trace_id: r.get(2)?,
                    run_id: r.get(3)?,
                    reason: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Moves the triggers' cursor to escalation `id`.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn move_escalation_cursor(&self, id: i64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO cursors (name, value) VALUES ('escalations', ?1)",
            [id],
        )?;
        Ok(())
    }
}
