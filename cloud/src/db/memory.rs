//! The raw records experiences are read from ([`crate::memory`]): every stored report with
//! when it arrived, every regeneration with its id and time, and the trace metadata sources
//! (signed traces of rollouts, kept sources).

use super::{LearnerDb, Result, regen::RegenerationRow};

/// A regeneration as stored, with its row id and time.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRegeneration {
    /// Row id.
    pub id: i64,
    /// Unix seconds.
    pub at: i64,
    /// The rest of it.
    pub row: RegenerationRow,
}

impl LearnerDb {
    /// Every stored report's JSON and arrival time (Unix seconds), by arrival.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn reports_by_arrival(&self) -> Result<Vec<(String, i64)>> {
        let mut s = self
            .conn
            .prepare("SELECT report_json, received_at FROM runs ORDER BY received_at, rowid")?;
        Ok(
            s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<rusqlite::Result<_>>()?,
        )
    }

    /// Every regeneration with its id and time, oldest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn stored_regenerations(&self) -> Result<Vec<StoredRegeneration>> {
        let mut s = self.conn.prepare(
            "SELECT id, trace_id, from_version, to_version, outcome, detail, model, rounds, input_tokens, output_tokens, cost, failures, at, trigger, duration_ms
             FROM regenerations ORDER BY id",
        )?;
        let rows = s.query_map([], |r| {
            Ok(StoredRegeneration {
                id: r.get(0)?,
                at: r.get(12)?,
                row: RegenerationRow {
                    trace_id: r.get(1)?,
                    from_version: r.get(2)?,
                    to_version: r.get(3)?,
                    outcome: r.get(4)?,
                    detail: r.get(5)?,
                    model: r.get(6)?,
                    rounds: r.get(7)?,
                    input_tokens: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
                    output_tokens: u64::try_from(r.get::<_, i64>(9)?).unwrap_or(0),
                    cost: r.get(10)?,
                    failures: r.get(11)?,
                    trigger: r.get(13)?,
                    duration_ms: r
                        .get::<_, Option<i64>>(14)?
                        .map(|ms| u64::try_from(ms).unwrap_or(0)),
                },
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The signed trace of every rollout, oldest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn rollout_signed_all(&self) -> Result<Vec<Vec<u8>>> {
        let mut s = self
            .conn
            .prepare("SELECT signed FROM rollouts ORDER BY id")?;
        Ok(s.query_map([], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Every kept source (trace id, source), oldest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn kept_sources(&self) -> Result<Vec<(String, String)>> {
        let mut s = self
            .conn
            .prepare("SELECT trace_id, source FROM trace_sources ORDER BY at, rowid")?;
        Ok(
            s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<rusqlite::Result<_>>()?,
        )
    }
}
