//! The device store (SQLite through rusqlite, WAL, schema migrations by rusqlite_migration),
//! the only owner of SQL in this crate: the connection, the schema and its migrations here;
//! the tables by concern in `trust` (trust roots, installed traces, install log), `runs`
//! (runs and their step journal), `outbox` (messages for the broker, the agent's state),
//! `models` (the model registry), `stats` (per-version statistics, escalations) and
//! `fidelity` (each judgement step's agreement with its reference answers, per model).
//!
//! Lives at `<state-dir>/follower.db`. Every write is one transaction, so a crash leaves the
//! database at the last committed step.

mod fidelity;
mod models;
mod outbox;
mod runs;
mod stats;
#[cfg(test)]
mod tests;
mod trust;

pub use models::ModelRow;
pub use outbox::{OutboxKind, OutboxMessage};
use outbox::{enqueue, enrolled};
pub use runs::{Crash, NewRun, RunRow, Unfinished};

use crate::effects::Completed;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};
use std::collections::BTreeMap;
use std::path::Path;
use tracefleet::confidence::Stats;
use tracefleet::ids::Version;
use tracefleet::report::{Report, StepResult};
use tracefleet::trust::{TrustRoot, decode_root};

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
    /// The trust root changed while this install was being verified.
    #[error(
        "the trust root changed during the install (verified against v{expected:?}, now v{found:?}): run the install again"
    )]
    RootChanged {
        /// The root version the verification used.
        expected: Option<u32>,
        /// The newest stored version now.
        found: Option<u32>,
    },
    /// Placing files before the commit failed.
    #[error("{0}")]
    Files(String),
    /// The offered version is not above the installed one.
    #[error(
        "refusing {trace_id} {offered}: version {installed} is installed, and versions never go backwards (re-sign older content under a newer version to roll back)"
    )]
    Rollback {
        /// The trace.
        trace_id: String,
        /// Installed version.
        installed: Version,
        /// Offered version.
        offered: Version,
    },
    /// A stored row does not decode.
    #[error("state database holds a corrupt {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The database file exists but holds no schema: it was truncated or wiped.
    #[error(
        "the state database {path} exists but holds no schema ({bytes} bytes): it was truncated or wiped, and starting afresh would silently forget the trust root, the installed traces and the run history; restore it from a backup, or remove it (with its -wal and -shm files) to start this device over"
    )]
    Emptied {
        /// The database file.
        path: String,
        /// Its size when opened.
        bytes: u64,
    },
}

const MIGRATIONS: &[M<'static>] = &[
    M::up(
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
    ),
    // The trust root replaces the list of trusted keys (no device was provisioned with it).
    M::up(
        "DROP TABLE trusted_keys;
    CREATE TABLE trust_roots (
        version      INTEGER PRIMARY KEY,
        root_file    BLOB NOT NULL,
        installed_at TEXT NOT NULL
    );
    CREATE TABLE installed_traces (
        trace_id     TEXT PRIMARY KEY,
        major        INTEGER NOT NULL,
        minor        INTEGER NOT NULL,
        patch        INTEGER NOT NULL,
        signed       BLOB NOT NULL,
        installed_at TEXT NOT NULL
    );
    CREATE TABLE install_log (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      TEXT NOT NULL,
        kind    TEXT NOT NULL,
        name    TEXT NOT NULL,
        version TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail  TEXT NOT NULL
    );",
    ),
    M::up(
        "CREATE TABLE trace_stats (
        trace_id      TEXT NOT NULL,
        version       TEXT NOT NULL,
        usage_count   INTEGER NOT NULL,
        success_count INTEGER NOT NULL,
        confidence    REAL NOT NULL,
        last_used     TEXT NOT NULL,
        PRIMARY KEY (trace_id, version)
    );
    CREATE TABLE escalations (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        at       TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        run_id   TEXT,
        reason   TEXT NOT NULL
    );",
    ),
    // Resume: what a run needs to continue (its trace file, inputs) and each step's output.
    M::up(
        "ALTER TABLE runs ADD COLUMN trace_file BLOB;
    ALTER TABLE runs ADD COLUMN signed INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE runs ADD COLUMN inputs_json TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE runs ADD COLUMN resumes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE run_steps ADD COLUMN output TEXT NOT NULL DEFAULT '';",
    ),
    // The fleet link: messages waiting for the broker's PUBACK, and the agent's own state
    // (the enrolled device id, the last accepted command counter).
    M::up(
        "CREATE TABLE outbox (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        kind       TEXT NOT NULL,
        payload    BLOB NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE agent_state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
    ),
    // The device's models: what `follower models add` (or a bundle) registered, with the file
    // facts a later load compares before trusting the recorded hash.
    M::up(
        "CREATE TABLE models (
        name             TEXT PRIMARY KEY,
        file             TEXT NOT NULL,
        sha256           TEXT NOT NULL,
        size             INTEGER NOT NULL,
        architecture     TEXT NOT NULL,
        quantization     TEXT NOT NULL,
        context_length   INTEGER NOT NULL,
        parameters       INTEGER NOT NULL,
        ram_needed_bytes INTEGER NOT NULL,
        license          TEXT NOT NULL,
        added_at         TEXT NOT NULL,
        verified_at      TEXT NOT NULL,
        verified_stamp   TEXT NOT NULL
    );",
    ),
    // Judgement: a device model's agreement with a step's reference examples.
    M::up(
        "CREATE TABLE fidelity (
        trace_id      TEXT NOT NULL,
        version       TEXT NOT NULL,
        step          INTEGER NOT NULL,
        model         TEXT NOT NULL,
        digest        TEXT NOT NULL,
        agreements    INTEGER NOT NULL,
        total         INTEGER NOT NULL,
        min_fidelity  REAL NOT NULL,
        disagreements TEXT NOT NULL,
        measured_at   TEXT NOT NULL,
        PRIMARY KEY (trace_id, version, step, model, digest)
    );",
    ),
    // Crash loops: the step an interrupted run was in when its process died, and how many
    // times in a row it died there (an automatic resume stops at two).
    M::up(
        "ALTER TABLE runs ADD COLUMN crash_step INTEGER;
    ALTER TABLE runs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;",
    ),
];

/// Creates the store at `db` with its schema, under another name first and then renamed into
/// place, so that a crash while creating it leaves no schema-less `follower.db` (which
/// [`Store::open`] refuses) but only a leftover `follower.db.new`, removed by the next try.
fn create_whole(db: &Path) -> Result<(), StoreError> {
    let new = db.with_extension("db.new");
    for stale in ["", "-journal", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{stale}", new.display()));
    }
    let mut conn = Connection::open(&new)?;
    Migrations::from_slice(MIGRATIONS).to_latest(&mut conn)?;
    conn.close().map_err(|(_, e)| e)?;
    let placed = std::fs::rename(&new, db).and_then(|()| {
        // The rename is durable only once the directory is.
        db.parent()
            .map_or(Ok(()), |dir| std::fs::File::open(dir)?.sync_all())
    });
    placed.map_err(|source| StoreError::Dir {
        path: db.display().to_string(),
        source,
    })
}

/// A count as SQLite's signed 64-bit integer (counts past `i64::MAX` do not occur).
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The follower's state database.
pub struct Store {
    conn: Connection,
    state_dir: std::path::PathBuf,
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
        // Two follower processes opening a new store at once (the agent and a `follower run`)
        // would race to switch it to WAL and to migrate it (SQLite answers one of them
        // "database is locked" at once, whatever the busy timeout): one at a time.
        let lock_path = state_dir.join("follower.db-open-lock");
        let lock = std::fs::File::create(&lock_path).map_err(|source| StoreError::Dir {
            path: lock_path.display().to_string(),
            source,
        })?;
        lock.lock().map_err(|source| StoreError::Dir {
            path: lock_path.display().to_string(),
            source,
        })?;
        let db = state_dir.join("follower.db");
        match std::fs::metadata(&db) {
            Ok(meta) => {
                // A store that exists has its schema: every store is created whole (below). One
                // without — truncated to 0 bytes, or wiped — is refused rather than recreated
                // empty, which would drop the trust root and the history without a word.
                let conn = Connection::open(&db)?;
                let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
                if version == 0 {
                    return Err(StoreError::Emptied {
                        path: db.display().to_string(),
                        bytes: meta.len(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_whole(&db)?,
            Err(source) => {
                return Err(StoreError::Dir {
                    path: db.display().to_string(),
                    source,
                });
            }
        }
        let mut conn = Connection::open(&db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Each follower command opens the store and closes it at exit; a checkpoint at every
        // close would cost two fsyncs per command. The WAL is checkpointed when it passes 256
        // pages instead (so the next open's WAL-index recovery reads at most that), and kept
        // at most 1 MiB afterwards.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        conn.pragma_update(None, "wal_autocheckpoint", 256)?;
        conn.pragma_update(None, "journal_size_limit", 1024 * 1024)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Migrations::from_slice(MIGRATIONS).to_latest(&mut conn)?;
        drop(lock);
        Ok(Self {
            conn,
            state_dir: state_dir.to_owned(),
        })
    }

    /// The state directory this store lives in (where the device's identity file is too).
    #[must_use]
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// SQLite's own consistency check (`PRAGMA integrity_check`): `ok` when sound.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

use tracefleet::time::unix_now;
