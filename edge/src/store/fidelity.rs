//! Fidelity of a device model on a judgement step's reference examples, kept per (trace,
//! version, step, model, step digest): the digest covers the step's whole LLM call (prompt,
//! constraint, examples), so a changed step — an author's edited source run under the same
//! version — is measured again, and so is a different model.

use super::*;
use tracefleet::judgement::Fidelity;

impl Store {
    /// The fidelity recorded for `step` of a trace version with `model`, when the step's
    /// digest is still `digest`.
    ///
    /// # Errors
    /// On SQLite failure, or a stored record that does not decode.
    pub fn fidelity(
        &self,
        trace_id: &str,
        version: &str,
        step: u32,
        model: &str,
        digest: &str,
    ) -> Result<Option<Fidelity>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT agreements, total, min_fidelity, disagreements FROM fidelity
                 WHERE trace_id = ?1 AND version = ?2 AND step = ?3 AND model = ?4 AND digest = ?5",
                params![trace_id, version, step, model, digest],
                |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, f64>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(agreements, total, min_fidelity, disagreements)| {
            let disagreements =
                serde_json::from_str(&disagreements).map_err(|e| StoreError::Corrupt {
                    what: "fidelity record",
                    detail: format!("{trace_id} {version} step {step}: disagreements: {e}"),
                })?;
            Ok(Fidelity {
                step,
                model: model.to_owned(),
                agreements,
                total,
                min_fidelity: min_fidelity as f32,
                disagreements,
            })
        })
        .transpose()
    }

    /// Every fidelity recorded for a trace version (for `follower traces list`), by step.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn fidelity_of_version(
        &self,
        trace_id: &str,
        version: &str,
    ) -> Result<Vec<Fidelity>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT step, model, agreements, total, min_fidelity FROM fidelity
             WHERE trace_id = ?1 AND version = ?2 ORDER BY step, measured_at DESC",
        )?;
        let rows = stmt.query_map(params![trace_id, version], |r| {
            Ok(Fidelity {
                step: r.get(0)?,
                model: r.get(1)?,
                agreements: r.get(2)?,
                total: r.get(3)?,
                min_fidelity: r.get::<_, f64>(4)? as f32,
                disagreements: Vec::new(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a measured fidelity (replacing an earlier one for the same key).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_fidelity(
        &mut self,
        trace_id: &str,
        version: &str,
        digest: &str,
        f: &Fidelity,
        now: &str,
    ) -> Result<(), StoreError> {
        let disagreements = serde_json::to_string(&f.disagreements).unwrap_or_default();
        self.conn.execute(
            "INSERT OR REPLACE INTO fidelity
             (trace_id, version, step, model, digest, agreements, total, min_fidelity, disagreements, measured_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                trace_id,
                version,
                f.step,
                f.model,
                digest,
                f.agreements,
                f.total,
                f64::from(f.min_fidelity),
                disagreements,
                now
            ],
        )?;
        Ok(())
    }
}
