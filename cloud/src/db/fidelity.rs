//! Judgement fidelity as devices report it: for each device, trace version, judgement step
//! and model, how many of the step's reference answers the device's model repeated (the last
//! measurement reported wins). Read by `learner fleet`, `learner runs list --json`, and by
//! ingest, which holds a version's fleet confidence under the follower-mode threshold while
//! most devices reporting fidelity for it fall below a step's `min_fidelity`
//! ([`tracefleet::confidence::with_fidelity`]).

use super::LearnerDb;
use rusqlite::{Connection, params};
use tracefleet::judgement::Fidelity;

/// One device's fidelity on one judgement step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FidelityRow {
    /// The device.
    pub device_id: String,
    /// The trace.
    pub trace_id: String,
    /// Its version.
    pub version: String,
    /// The judgement step.
    pub step: u32,
    /// The device's model.
    pub model: String,
    /// Reference answers repeated.
    pub agreements: u32,
    /// Reference answers scored.
    pub total: u32,
    /// The step's minimum.
    pub min_fidelity: f64,
    /// When it was reported (Unix seconds).
    pub at: i64,
}

impl FidelityRow {
    /// agreements / total (1 for none scored).
    pub fn ratio(&self) -> f64 {
        tracefleet::judgement::fidelity_ratio(self.agreements, self.total)
    }

    /// Whether the step may run unattended on that device (the follower's own rule).
    pub fn passes(&self) -> bool {
        tracefleet::judgement::fidelity_passes(self.ratio(), self.min_fidelity)
    }
}

/// Stores the fidelity one report carries for `device`.
pub(super) fn record(
    tx: &Connection,
    device: &str,
    trace_id: &str,
    version: &str,
    fidelity: &[Fidelity],
    now: i64,
) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO fidelity (device_id, trace_id, version, step, model, agreements, total, min_fidelity, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (device_id, trace_id, version, step, model) DO UPDATE SET
           agreements = excluded.agreements, total = excluded.total,
           min_fidelity = excluded.min_fidelity, at = excluded.at",
    )?;
    for f in fidelity {
        upsert.execute(params![
            device,
            trace_id,
            version,
            f.step,
            f.model,
            f.agreements,
            f.total,
            f64::from(f.min_fidelity),
            now
        ])?;
    }
    Ok(())
}

/// (devices with a judgement step below its minimum, devices that reported fidelity) for a
/// trace version, each device counted once (its latest record per step and model).
pub(super) fn failing_devices(
    tx: &Connection,
    trace_id: &str,
    version: &str,
) -> rusqlite::Result<(u64, u64)> {
    tx.prepare_cached(
        "SELECT COUNT(DISTINCT device_id),
                COUNT(DISTINCT CASE WHEN CAST(agreements AS REAL) / MAX(total, 1) + 1e-6 < min_fidelity
                                    THEN device_id END)
         FROM fidelity WHERE trace_id = ?1 AND version = ?2",
    )?
    .query_row(params![trace_id, version], |r| {
        Ok((r.get::<_, i64>(1)? as u64, r.get::<_, i64>(0)? as u64))
    })
}

impl LearnerDb {
    /// Every fidelity devices reported, by device, trace, version, step.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn fidelity(&self) -> super::Result<Vec<FidelityRow>> {
        let mut s = self.conn.prepare(
            "SELECT device_id, trace_id, version, step, model, agreements, total, min_fidelity, at
             FROM fidelity ORDER BY device_id, trace_id, version, step, model",
        )?;
        let rows = s.query_map([], |r| {
            Ok(FidelityRow {
                device_id: r.get(0)?,
                trace_id: r.get(1)?,
                version: r.get(2)?,
                step: r.get(3)?,
                model: r.get(4)?,
                agreements: r.get(5)?,
                total: r.get(6)?,
                min_fidelity: r.get(7)?,
                at: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
