//! Judgement fidelity as devices report it: for each device, trace version, judgement step
//! and model, how many of the step's reference answers the device's model repeated, and the
//! answers it gave where it did not (the last measurement reported wins). Read by `learner
//! fleet`, `learner runs list --json`, the regeneration triggers ([`LearnerDb::low_fidelity`],
//! whose disagreements go into the prompt), and by ingest, which holds a version's fleet confidence under the follower-mode threshold while
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
    /// The first disagreements: (index into the step's scored examples, the model's answer).
    pub disagreements: Vec<(u32, String)>,
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
        "INSERT INTO fidelity (device_id, trace_id, version, step, model, agreements, total, min_fidelity, at, disagreements)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (device_id, trace_id, version, step, model) DO UPDATE SET
           agreements = excluded.agreements, total = excluded.total,
           min_fidelity = excluded.min_fidelity, at = excluded.at,
           disagreements = excluded.disagreements",
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
            now,
            serde_json::to_string(&f.disagreements).unwrap_or_else(|_| "[]".into())
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

/// The columns [`row`] reads, in its order.
const COLUMNS: &str =
    "device_id, trace_id, version, step, model, agreements, total, min_fidelity, at, disagreements";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FidelityRow> {
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
        // Written by `record` from the same type; anything else reads as none.
        disagreements: serde_json::from_str(&r.get::<_, String>(9)?).unwrap_or_default(),
    })
}

impl LearnerDb {
    /// Every fidelity devices reported, by device, trace, version, step.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn fidelity(&self) -> super::Result<Vec<FidelityRow>> {
        let mut s = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM fidelity ORDER BY device_id, trace_id, version, step, model"
        ))?;
        let rows = s.query_map([], row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The fidelity records of `trace_id` `version` under their step's minimum (the
    /// follower's own rule, [`FidelityRow::passes`]), lowest ratio first, and how many
    /// devices reported fidelity for that version.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn low_fidelity(
        &self,
        trace_id: &str,
        version: &str,
    ) -> super::Result<(Vec<FidelityRow>, u64)> {
        let mut s = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM fidelity WHERE trace_id = ?1 AND version = ?2
             ORDER BY step, device_id, model"
        ))?;
        let all = s
            .query_map(params![trace_id, version], row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let devices = all
            .iter()
            .map(|r| r.device_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64;
        let mut low: Vec<FidelityRow> = all.into_iter().filter(|r| !r.passes()).collect();
        low.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
        Ok((low, devices))
    }
}
