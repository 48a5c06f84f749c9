//! The learner's database: the whole schema (`schema`) and every SQL statement the learner
//! makes, behind one type, [`LearnerDb`]. Other modules get typed rows and functions from
//! here and never see SQLite (`rusqlite` appears nowhere else in the crate), so that a second
//! backend (PostgreSQL, for several `serve` machines sharing one fleet) can be added behind
//! the same methods.
//!
//! SQLite runs in WAL mode with `synchronous=NORMAL` and a 5 s busy timeout; opening creates
//! and migrates the file, one process at a time.
//!
//! - this file: opening, the device/run/statistics listings, command counters, the lease;
//! - [`ingest`]: what devices publish, decoded, checked against its topic and stored;
//! - [`fidelity`]: judgement fidelity as devices report it;
//! - [`rollouts`]: staged rollouts' rows (the decisions are [`crate::rollout`]'s);
//! - [`regen`]: regenerations, kept trace sources, the escalation cursor;
//! - [`stuck`]: the stuck-run watchdog's stages;
//! - [`memory`]: the raw records experiences are read from.

pub mod fidelity;
pub mod ingest;
pub mod memory;
pub mod metrics;
pub mod regen;
pub mod rollouts;
mod schema;
pub mod stuck;

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::Migrations;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracefleet::ids::{DeviceId, IdError, TraceId};
use tracefleet::wire;

/// Why the learner's database failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// SQLite.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// A migration of the schema.
    #[error(transparent)]
    Migration(#[from] rusqlite_migration::Error),
    /// The database's directory or open lock.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A result of the database.
pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// The learner's database.
pub struct LearnerDb {
    conn: Connection,
}

/// A device as the learner last heard of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceRow {
    /// Its id.
    pub device_id: DeviceId,
    /// Whether its last status said online.
    pub online: bool,
    /// Unix seconds of the last message from it.
    pub last_seen: i64,
    /// Its follower version.
    pub follower_version: Option<String>,
    /// Runs reported.
    pub runs: i64,
    /// Its identity for confidential traces (`age1…`), once a heartbeat carried it.
    pub recipient: Option<String>,
}

/// A run a device reported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReportedRun {
    /// Run id.
    pub run_id: String,
    /// The device (from the topic).
    pub device_id: DeviceId,
    /// Trace id (checked on ingest).
    pub trace_id: TraceId,
    /// Trace version.
    pub trace_version: String,
    /// `success`, `failed` or `stopped`.
    pub status: String,
    /// Whether it counts toward the version's statistics: false when the device had not
    /// acked or listed that version as installed when the report came.
    pub counted: bool,
}

/// Something that needs a person.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EscalationRow {
    /// The device.
    pub device_id: DeviceId,
    /// The trace (`-` for a goal no trace matched).
    pub trace_id: String,
    /// The run, if any.
    pub run_id: Option<String>,
    /// Why.
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

/// The last outcome a device reported for a pushed trace version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AckRow {
    /// The device.
    pub device_id: DeviceId,
    /// Trace id.
    pub trace_id: String,
    /// Version.
    pub version: String,
    /// `installed`, `already_installed` or `refused`.
    pub outcome: String,
    /// Why it was refused.
    pub detail: String,
}

/// A trace version's fleet-wide statistics.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TraceStatsRow {
    /// Trace id (of reported runs, checked on ingest).
    pub trace_id: TraceId,
    /// Version.
    pub version: String,
    /// Runs reported.
    pub runs: i64,
    /// Successful ones.
    pub successes: i64,
    /// Confidence (LLMunix rule over the runs in arrival order).
    pub confidence: f64,
}

/// A device and one trace installed on it (from its last heartbeat), with how it ran there.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FleetRow {
    /// The device.
    pub device_id: DeviceId,
    /// Whether its last status said online.
    pub online: bool,
    /// The trace (`None`: the device has none installed).
    pub trace_id: Option<String>,
    /// The installed version.
    pub version: Option<String>,
    /// Runs of that version the device reported.
    pub runs: i64,
    /// Those that succeeded.
    pub successes: i64,
    /// The status of the newest of them.
    pub last_status: Option<String>,
    /// The version's fleet-wide confidence, once it has runs.
    pub confidence: Option<f64>,
}

/// A device's id, whether it is online and the groups its last heartbeat named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceGroups {
    /// Its id.
    pub device_id: DeviceId,
    /// Whether its last status said online.
    pub online: bool,
    /// Its groups (empty when the stored list does not parse).
    pub groups: Vec<String>,
    /// Its identity for confidential traces (`age1…`), once a heartbeat carried it.
    pub recipient: Option<String>,
}

/// A column that holds text which does not parse as what the row says it is.
#[derive(Debug, thiserror::Error)]
#[error("column {column}: {error}")]
pub struct ColumnError {
    /// The column's name.
    pub column: String,
    /// Why its text was refused.
    pub error: IdError,
}

/// Column `idx` of `row` as a validated id ([`DeviceId`], [`TraceId`]). Ids are stored as
/// ingest checked them; one that no longer parses is a
/// [`rusqlite::Error::FromSqlConversionFailure`] naming the column (the orphan rule keeps
/// `FromSql` off the ids here).
pub(crate) fn id_at<T>(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<T>
where
    T: std::str::FromStr<Err = IdError>,
{
    let text: String = row.get(idx)?;
    text.parse().map_err(|error| {
        let column = row.as_ref().column_name(idx).unwrap_or("?").to_owned();
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            Box::new(ColumnError { column, error }),
        )
    })
}

/// How long a `serve` instance's lead lasts without renewal (it renews every second).
pub const LEASE_SECS: i64 = 10;

/// [`tracefleet::time::unix_now`] as SQLite stores it (INTEGER, i64).
pub(crate) fn now_secs() -> i64 {
    i64::try_from(tracefleet::time::unix_now()).unwrap_or(i64::MAX)
}

impl LearnerDb {
    /// Opens (creating and migrating) the database.
    ///
    /// # Errors
    /// On SQLite or migration failure, or when its directory cannot be created.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // Two processes opening a new database at once (`serve` and a `rollout start`) would
        // race to switch it to WAL and to migrate it (SQLite answers one of them "database is
        // locked" at once, whatever the busy timeout): one at a time.
        let lock = std::fs::File::create(path.with_extension("db-open-lock"))?;
        lock.lock()?;
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Migrations::from_slice(schema::MIGRATIONS).to_latest(&mut conn)?;
        drop(lock);
        Ok(LearnerDb { conn })
    }

    /// The fleet at a glance: a row per device and trace it has installed (a device with
    /// none has one row without a trace), by device then trace.
    ///
    /// # Errors
    /// On SQLite failure; a device's installed list that does not parse counts as empty.
    pub fn fleet_table(&self) -> Result<Vec<FleetRow>> {
        let mut devices = self
            .conn
            .prepare("SELECT device_id, online, installed_json FROM devices ORDER BY device_id")?;
        let devices: Vec<(DeviceId, bool, String)> = devices
            .query_map([], |r| Ok((id_at(r, 0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut runs = self.conn.prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(status = 'success'), 0),
               (SELECT status FROM runs WHERE device_id = ?1 AND trace_id = ?2 AND trace_version = ?3
                ORDER BY received_at DESC, run_id DESC LIMIT 1)
             FROM runs WHERE device_id = ?1 AND trace_id = ?2 AND trace_version = ?3",
        )?;
        let mut out = Vec::new();
        for (device_id, online, installed) in devices {
            let mut installed: Vec<wire::InstalledTrace> =
                serde_json::from_str(&installed).unwrap_or_default();
            installed.sort_by(|a, b| a.trace_id.cmp(&b.trace_id));
            if installed.is_empty() {
                out.push(FleetRow {
                    device_id: device_id.clone(),
                    online,
                    trace_id: None,
                    version: None,
                    runs: 0,
                    successes: 0,
                    last_status: None,
                    confidence: None,
                });
            }
            for t in installed {
                let (runs, successes, last_status) = runs
                    .query_row(params![device_id.as_str(), t.trace_id, t.version], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?;
                let confidence = self
                    .conn
                    .query_row(
                        "SELECT confidence FROM trace_stats WHERE trace_id = ?1 AND version = ?2",
                        params![t.trace_id, t.version],
                        |r| r.get(0),
                    )
                    .optional()?;
                out.push(FleetRow {
                    device_id: device_id.clone(),
                    online,
                    trace_id: Some(t.trace_id),
                    version: Some(t.version),
                    runs,
                    successes,
                    last_status,
                    confidence,
                });
            }
        }
        Ok(out)
    }

    /// Devices, by id.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        let mut s = self.conn.prepare(
            "SELECT d.device_id, d.online, d.last_seen, d.follower_version, (SELECT COUNT(*) FROM runs r WHERE r.device_id = d.device_id), d.recipient
             FROM devices d ORDER BY d.device_id",
        )?;
        let rows = s.query_map([], |r| {
            Ok(DeviceRow {
                device_id: id_at(r, 0)?,
                online: r.get(1)?,
                last_seen: r.get(2)?,
                follower_version: r.get(3)?,
                runs: r.get(4)?,
                recipient: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every device with whether it is online and its groups, in storage order.
    ///
    /// # Errors
    /// On SQLite failure; a group list that does not parse counts as empty.
    pub fn device_groups(&self) -> Result<Vec<DeviceGroups>> {
        let mut s = self
            .conn
            .prepare_cached("SELECT device_id, online, groups_json, recipient FROM devices")?;
        let rows = s.query_map([], |r| {
            Ok((
                id_at(r, 0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device_id, online, groups, recipient) = row?;
            out.push(DeviceGroups {
                device_id,
                online,
                groups: serde_json::from_str(&groups).unwrap_or_default(),
                recipient,
            });
        }
        Ok(out)
    }

    /// Per-version statistics, by trace and version.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn trace_stats(&self) -> Result<Vec<TraceStatsRow>> {
        let mut s = self.conn.prepare(
            "SELECT trace_id, version, runs, successes, confidence FROM trace_stats ORDER BY trace_id, version",
        )?;
        let rows = s.query_map([], |r| {
            Ok(TraceStatsRow {
                trace_id: id_at(r, 0)?,
                version: r.get(1)?,
                runs: r.get(2)?,
                successes: r.get(3)?,
                confidence: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Reported runs, oldest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn runs(&self) -> Result<Vec<ReportedRun>> {
        let mut s = self.conn.prepare(
            "SELECT run_id, device_id, trace_id, trace_version, status, counted FROM runs ORDER BY received_at, run_id",
        )?;
        let rows = s.query_map([], |r| {
            Ok(ReportedRun {
                run_id: r.get(0)?,
                device_id: id_at(r, 1)?,
                trace_id: id_at(r, 2)?,
                trace_version: r.get(3)?,
                status: r.get(4)?,
                counted: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest failed runs of `trace_id` (any version), at most `limit`.
    ///
    /// # Errors
    /// On SQLite failure; a stored report that no longer parses is skipped.
    pub fn failed_reports(
        &self,
        trace_id: &str,
        limit: u32,
    ) -> Result<Vec<tracefleet::report::Report>> {
        let mut s = self.conn.prepare(
            "SELECT report_json FROM runs WHERE trace_id = ?1 AND status = 'failed' AND counted = 1
             ORDER BY received_at DESC, run_id DESC LIMIT ?2",
        )?;
        let rows = s.query_map(params![trace_id, limit], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for json in rows {
            if let Ok(report) = serde_json::from_str(&json?) {
                out.push(report);
            }
        }
        Ok(out)
    }

    /// Escalations (from devices, and stuck runs), oldest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn escalations(&self) -> Result<Vec<EscalationRow>> {
        let mut s = self.conn.prepare(
            "SELECT device_id, trace_id, run_id, reason, at FROM escalations ORDER BY id",
        )?;
        let rows = s.query_map([], |r| {
            Ok(EscalationRow {
                device_id: id_at(r, 0)?,
                trace_id: r.get(1)?,
                run_id: r.get(2)?,
                reason: r.get(3)?,
                at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// What devices said of pushed traces, by device, trace and version.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn acks(&self) -> Result<Vec<AckRow>> {
        let mut s = self.conn.prepare(
            "SELECT device_id, trace_id, version, outcome, detail FROM acks ORDER BY device_id, trace_id, version",
        )?;
        let rows = s.query_map([], |r| {
            Ok(AckRow {
                device_id: id_at(r, 0)?,
                trace_id: r.get(1)?,
                version: r.get(2)?,
                outcome: r.get(3)?,
                detail: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The next command counter for `device`: above every one issued before, and at least
    /// the current time in milliseconds (so a learner whose database was lost still issues
    /// counters the device accepts).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn next_command_counter(&mut self, device: &str) -> Result<u64> {
        // Reads, then writes: IMMEDIATE, so that another instance's write is waited for
        // rather than answered "database is locked" (see `ingest_batch`).
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let last: Option<i64> = tx
            .query_row(
                "SELECT counter FROM command_counters WHERE device_id = ?1",
                [device],
                |r| r.get(0),
            )
            .optional()?;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let next = last.map_or(now_ms, |l| (l + 1).max(now_ms));
        tx.execute(
            "INSERT INTO command_counters (device_id, counter) VALUES (?1, ?2)
             ON CONFLICT (device_id) DO UPDATE SET counter = excluded.counter",
            params![device, next],
        )?;
        tx.commit()?;
        Ok(u64::try_from(next).unwrap_or(0))
    }

    /// Takes or renews the lead for `holder`: `true` when `holder` leads until `now +
    /// LEASE_SECS` (it held the lease, or the lease had run out).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn lead(&self, holder: &str, now: i64) -> Result<bool> {
        let changed = self.conn.execute(
            "INSERT INTO leases (name, holder, until) VALUES ('serve', ?1, ?2)
             ON CONFLICT (name) DO UPDATE SET holder = ?1, until = ?2
             WHERE leases.holder = ?1 OR leases.until < ?3",
            params![holder, now + LEASE_SECS, now],
        )?;
        Ok(changed == 1)
    }

    /// Stores that `device` acked installing `trace_id` `version`, for tests (reports count
    /// only from devices that have the version installed).
    #[cfg(test)]
    pub(crate) fn put_installed(&self, device: &str, trace_id: &str, version: &str) {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO acks (device_id, trace_id, version, outcome, detail, at) VALUES (?1, ?2, ?3, 'installed', '', 0)",
                params![device, trace_id, version],
            )
            .unwrap();
    }

    /// Stores a device as if a heartbeat had named it (`groups` as JSON), for tests.
    #[cfg(test)]
    pub(crate) fn put_device(&self, device_id: &str, online: bool, groups_json: &str) {
        self.conn
            .execute(
                "INSERT INTO devices (device_id, online, last_seen, groups_json) VALUES (?1, ?2, 0, ?3)",
                params![device_id, online, groups_json],
            )
            .unwrap();
    }

    /// A device's identity for confidential traces (tests).
    #[cfg(test)]
    pub(crate) fn put_recipient(&self, device_id: &str, recipient: &str) {
        self.conn
            .execute(
                "UPDATE devices SET recipient = ?2 WHERE device_id = ?1",
                params![device_id, recipient],
            )
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_serve_instance_leads_until_its_lease_runs_out() {
        let d = tempfile::tempdir().unwrap();
        let db = LearnerDb::open(&d.path().join("learner.db")).unwrap();
        let c = &db;
        assert!(c.lead("learner-a", 100).unwrap());
        assert!(!c.lead("learner-b", 101).unwrap());
        assert!(c.lead("learner-a", 105).unwrap(), "the holder renews");
        assert!(
            !c.lead("learner-b", 100 + LEASE_SECS + 5).unwrap(),
            "renewed at 105"
        );
        // A stops renewing (killed): B takes over once the lease has run out.
        assert!(c.lead("learner-b", 105 + LEASE_SECS + 1).unwrap());
        assert!(!c.lead("learner-a", 105 + LEASE_SECS + 2).unwrap());
    }

    #[test]
    fn a_stored_device_id_that_does_not_parse_is_an_error_naming_its_column() {
        let d = tempfile::tempdir().unwrap();
        let db = LearnerDb::open(&d.path().join("learner.db")).unwrap();
        db.put_device("pi-01", true, "[\"canary\"]");
        let rows = db.device_groups().unwrap();
        assert_eq!(rows[0].device_id, "pi-01");
        assert_eq!(rows[0].groups, ["canary"]);
        db.put_device("../etc", true, "[]");
        let e = db.devices().unwrap_err().to_string();
        assert!(
            e.contains("column device_id: invalid device id \"../etc\""),
            "{e}"
        );
        assert!(db.device_groups().is_err());
        assert!(db.fleet_table().is_err());
    }
}
