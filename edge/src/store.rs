//! The device store (SQLite through rusqlite, WAL, schema migrations by rusqlite_migration):
//! trusted keys and runs journaled step by step.
//!
//! Lives at `<state-dir>/follower.db`. Every write is one transaction, so a crash leaves the
//! database at the last committed step.

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};
use std::path::Path;
use tracefleet::report::{Report, StepResult};
use tracefleet::signed::{KeyRole, PublicKey};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite refused.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A migration failed.
    #[error("state database migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// The state directory could not be created.
    #[error("state directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A stored row does not decode.
    #[error("state database holds a corrupt {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
}

const MIGRATIONS: &[M<'static>] = &[M::up(
    "CREATE TABLE trusted_keys (
        key_id     TEXT PRIMARY KEY,
        role       TEXT NOT NULL,
        public_key BLOB NOT NULL,
        added_at   TEXT NOT NULL
    );
    CREATE TABLE runs (
        run_id        TEXT PRIMARY KEY,
        trace_id      TEXT NOT NULL,
        trace_version TEXT NOT NULL,
        status        TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        finished_at   TEXT,
        base_dir      TEXT NOT NULL,
        report_json   TEXT
    );
    CREATE TABLE run_steps (
        run_id      TEXT NOT NULL REFERENCES runs(run_id),
        step        INTEGER NOT NULL,
        status      TEXT NOT NULL,
        result_json TEXT NOT NULL,
        PRIMARY KEY (run_id, step)
    );",
)];

/// A summary row of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRow {
    /// Run id.
    pub run_id: String,
    /// Trace id.
    pub trace_id: String,
    /// Trace version.
    pub trace_version: String,
    /// `running`, `success` or `failed`.
    pub status: String,
    /// Start time (RFC 3339).
    pub started_at: String,
}

/// The follower's state database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating and migrating) `<state_dir>/follower.db`.
    ///
    /// # Errors
    /// [`StoreError`] when the directory or database cannot be created or migrated.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Dir {
            path: state_dir.display().to_string(),
            source,
        })?;
        let mut conn = Connection::open(state_dir.join("follower.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Migrations::from_slice(MIGRATIONS).to_latest(&mut conn)?;
        Ok(Self { conn })
    }

    /// Adds (or replaces) a trusted key.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn trust_key(&self, key: &PublicKey, now: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO trusted_keys (key_id, role, public_key, added_at) VALUES (?1, ?2, ?3, ?4)",
            params![key.key_id().to_string(), key.role.to_string(), key.to_bytes().as_slice(), now],
        )?;
        Ok(())
    }

    /// Every trusted key.
    ///
    /// # Errors
    /// On SQLite failure or a corrupt row.
    pub fn trusted_keys(&self) -> Result<Vec<PublicKey>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT role, public_key FROM trusted_keys ORDER BY added_at")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (role, bytes) = row?;
            let corrupt = |detail: String| StoreError::Corrupt {
                what: "trusted key",
                detail,
            };
            let role: KeyRole = role.parse().map_err(corrupt)?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| corrupt("key is not 32 bytes".into()))?;
            out.push(PublicKey::from_bytes(role, &arr).map_err(|e| corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Records the start of a run.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn begin_run(
        &self,
        run_id: &str,
        trace_id: &str,
        version: &str,
        started_at: &str,
        base_dir: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO runs (run_id, trace_id, trace_version, status, started_at, base_dir) VALUES (?1, ?2, ?3, 'running', ?4, ?5)",
            params![run_id, trace_id, version, started_at, base_dir],
        )?;
        Ok(())
    }

    /// Journals a finished step.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_step(&self, run_id: &str, result: &StepResult) -> Result<(), StoreError> {
        let json = serde_json::to_string(result).unwrap_or_default();
        let status = serde_json::to_value(result.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.conn.execute(
            "INSERT OR REPLACE INTO run_steps (run_id, step, status, result_json) VALUES (?1, ?2, ?3, ?4)",
            params![run_id, result.step, status, json],
        )?;
        Ok(())
    }

    /// Records the end of a run with its report.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn finish_run(&self, report: &Report) -> Result<(), StoreError> {
        let json = serde_json::to_string(report).unwrap_or_default();
        let status = serde_json::to_value(report.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.conn.execute(
            "UPDATE runs SET status = ?2, finished_at = ?3, report_json = ?4 WHERE run_id = ?1",
            params![report.run_id, status, report.finished_at, json],
        )?;
        Ok(())
    }

    /// Runs, newest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn runs(&self, limit: u32) -> Result<Vec<RunRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT run_id, trace_id, trace_version, status, started_at FROM runs ORDER BY run_id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit], |r| {
            Ok(RunRow {
                run_id: r.get(0)?,
                trace_id: r.get(1)?,
                trace_version: r.get(2)?,
                status: r.get(3)?,
                started_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The stored report of a run (JSON text), if it finished.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn report_json(&self, run_id: &str) -> Result<Option<Option<String>>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT report_json FROM runs WHERE run_id = ?1",
                [run_id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?)
    }
}
