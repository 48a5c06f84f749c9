//! The fleet's figures for Prometheus (`/metrics`, [`crate::serve::http`]), read from the
//! database at scrape time so that they are what the database says — also with several
//! `serve` instances on one database, each of which answers the same.

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
    /// Devices whose last status said online, and the others.
    pub devices_online: u64,
    /// Devices known and not online.
    pub devices_offline: u64,
    /// Run reports stored.
    pub reports: u64,
    /// Runs by (trace, version, status).
    pub runs: Vec<(String, String, String, u64)>,
    /// Per trace version.
    pub versions: Vec<VersionFigures>,
    /// Devices by (trace, version, ack outcome): `installed`, `already_installed`,
    /// `refused`.
    pub rollout_devices: Vec<(String, String, String, u64)>,
    /// Rollouts by state (`running`, `done`, `halted`, `aborting`, `aborted`).
    pub rollouts: Vec<(String, u64)>,
    /// Regenerations by outcome.
    pub regenerations: Vec<(String, u64)>,
    /// Dollars spent on regenerations.
    pub regeneration_cost: f64,
    /// Escalations recorded (none is acknowledged yet: all are open).
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
        let c = &self.conn;
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
            "SELECT s.trace_id, s.version, s.confidence,
                    (SELECT CAST(SUM(f.agreements) AS REAL) / SUM(f.total) FROM fidelity f
                      WHERE f.trace_id = s.trace_id AND f.version = s.version AND f.total > 0)
             FROM trace_stats s ORDER BY s.trace_id, s.version",
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
                "SELECT trace_id, trace_version, status, COUNT(*) FROM runs GROUP BY trace_id, trace_version, status ORDER BY 1, 2, 3",
            )?,
            versions,
            rollout_devices: triples(
                "SELECT trace_id, version, outcome, COUNT(*) FROM acks GROUP BY trace_id, version, outcome ORDER BY 1, 2, 3",
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
