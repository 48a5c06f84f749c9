//! The fleet's figures for Prometheus (`/metrics`, [`crate::serve::http`]), read from the
//! database at scrape time in one read transaction, so that they are what the database says
//! at one moment — also with several `serve` instances on one database, each of which
//! answers the same (aggregate them with `max`, not `sum`).
//!
//! Per-version figures are limited to the trace versions the learner itself rolled out or
//! kept a source of (trace ids and versions in reports are what devices say: a device must
//! not be able to add series), and confidence and fidelity to each trace's newest rollout
//! (an old version's low confidence is history, not an alert).

use super::{LearnerDb, Result};

/// Figures per trace version.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionFigures {
    /// The trace.
    pub trace_id: String,
    /// Its version.
    pub version: String,
    /// Fleet confidence (the LLMunix rule over counted runs).
    pub confidence: f64,
    /// Reference answers repeated / scored over every device and judgement step that
    /// reported them; `None` when none did.
    pub fidelity: Option<f64>,
}

/// What `/metrics` exposes, read in one pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Devices whose last status said online.
    pub devices_online: u64,
    /// Devices known and not online.
    pub devices_offline: u64,
    /// Run reports stored.
    pub reports: u64,
    /// Runs by (trace, version, status), for the versions the learner rolled out or kept a
    /// source of.
    pub runs: Vec<(String, String, String, u64)>,
    /// Each trace's newest rollout's version, with its figures when it has runs.
    pub versions: Vec<VersionFigures>,
    /// Devices by (trace, version, ack outcome): `installed`, `already_installed`,
    /// `refused`, for the versions the learner rolled out.
    pub rollout_devices: Vec<(String, String, String, u64)>,
    /// Rollouts by state (`running`, `done`, `halted`, `aborting`, `aborted`, `superseded`).
    pub rollouts: Vec<(String, u64)>,
    /// Regenerations by outcome.
    pub regenerations: Vec<(String, u64)>,
    /// Dollars spent on regenerations.
    pub regeneration_cost: f64,
    /// Escalations recorded.
    pub escalations: u64,
    /// Messages refused by ingest, by kind.
    pub refused: Vec<(String, u64)>,
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl LearnerDb {
    /// The figures `/metrics` exposes.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn metrics_snapshot(&self) -> Result<Snapshot> {
        // One read transaction: every figure from the same moment.
        let c = self.conn.unchecked_transaction()?;
        let pairs = |sql: &str| -> Result<Vec<(String, u64)>> {
            let mut s = c.prepare_cached(sql)?;
            let rows = s.query_map([], |r| Ok((r.get::<_, String>(0)?, count(r.get(1)?))))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        };
        let triples = |sql: &str| -> Result<Vec<(String, String, String, u64)>> {
            let mut s = c.prepare_cached(sql)?;
            let rows = s.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, count(r.get(3)?)))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        };
        let (online, offline): (i64, i64) = c.query_row(
            "SELECT COALESCE(SUM(online != 0), 0), COALESCE(SUM(online = 0), 0) FROM devices",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let reports: i64 = c.query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0))?;
        let mut s = c.prepare_cached(
            "SELECT n.trace_id, n.version, s.confidence,
                    (SELECT CAST(SUM(f.agreements) AS REAL) / SUM(f.total) FROM fidelity f
                      WHERE f.trace_id = n.trace_id AND f.version = n.version AND f.total > 0)
             FROM rollouts n JOIN trace_stats s ON s.trace_id = n.trace_id AND s.version = n.version
             WHERE n.id = (SELECT MAX(id) FROM rollouts WHERE trace_id = n.trace_id)
             ORDER BY n.trace_id",
        )?;
        let versions = s
            .query_map([], |r| {
                Ok(VersionFigures {
                    trace_id: r.get(0)?,
                    version: r.get(1)?,
                    confidence: r.get(2)?,
                    fidelity: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        drop(s);
        let (escalations, cost): (i64, f64) = c.query_row(
            "SELECT (SELECT COUNT(*) FROM escalations), (SELECT COALESCE(SUM(cost), 0) FROM regenerations)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Snapshot {
            devices_online: count(online),
            devices_offline: count(offline),
            reports: count(reports),
            runs: triples(
                "WITH known AS (SELECT trace_id, version FROM rollouts UNION SELECT trace_id, version FROM trace_sources)
                 SELECT r.trace_id, r.trace_version, r.status, COUNT(*) FROM runs r
                 JOIN known k ON k.trace_id = r.trace_id AND k.version = r.trace_version
                 GROUP BY r.trace_id, r.trace_version, r.status ORDER BY 1, 2, 3",
            )?,
            versions,
            rollout_devices: triples(
                "SELECT a.trace_id, a.version, a.outcome, COUNT(*) FROM acks a
                 WHERE EXISTS (SELECT 1 FROM rollouts n WHERE n.trace_id = a.trace_id AND n.version = a.version)
                 GROUP BY a.trace_id, a.version, a.outcome ORDER BY 1, 2, 3",
            )?,
            rollouts: pairs("SELECT state, COUNT(*) FROM rollouts GROUP BY state ORDER BY 1")?,
            regenerations: pairs(
                "SELECT outcome, COUNT(*) FROM regenerations GROUP BY outcome ORDER BY 1",
            )?,
            regeneration_cost: cost,
            escalations: count(escalations),
            refused: pairs(
                "SELECT kind, SUM(count) FROM refused_messages GROUP BY kind ORDER BY 1",
            )?,
        })
    }
}
