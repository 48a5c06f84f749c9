//! The device store (SQLite through rusqlite, WAL, schema migrations by rusqlite_migration):
//! trusted keys and runs journaled step by step.
//!
//! Lives at `<state-dir>/follower.db`. Every write is one transaction, so a crash leaves the
//! database at the last committed step.

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
];

/// A count as SQLite's signed 64-bit integer (counts past `i64::MAX` do not occur).
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A model registered on the device (`<state-dir>/models/<file>`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelRow {
    /// Name steps ask for (`model:`), unique on the device.
    pub name: String,
    /// File name inside `<state-dir>/models/`.
    pub file: String,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// File size, bytes.
    pub size: u64,
    /// `general.architecture` (`llama`, …).
    pub architecture: String,
    /// Quantization (`Q4_1`, …).
    pub quantization: String,
    /// The model's training context, tokens.
    pub context_length: u64,
    /// Number of weights.
    pub parameters: u64,
    /// Estimated RAM to run it (weights + KV cache for the default context + compute), bytes.
    pub ram_needed_bytes: u64,
    /// `general.license`, or empty.
    pub license: String,
    /// When it was registered (RFC 3339).
    pub added_at: String,
    /// When its hash was last computed (RFC 3339).
    pub verified_at: String,
    /// File identity when it was hashed (device, inode, size, mtime): unchanged means the hash
    /// still holds.
    pub verified_stamp: String,
}

/// What an outbox message is; it decides the topic it leaves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    /// A run report ([`tracefleet::wire::ReportMessage`]).
    Report,
    /// The outcome of a pushed trace ([`tracefleet::wire::Ack`]).
    Ack,
    /// An escalation ([`tracefleet::wire::EscalationMessage`]).
    Escalation,
}

impl OutboxKind {
    fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Report => "report",
            OutboxKind::Ack => "ack",
            OutboxKind::Escalation => "escalation",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "report" => Some(OutboxKind::Report),
            "ack" => Some(OutboxKind::Ack),
            "escalation" => Some(OutboxKind::Escalation),
            _ => None,
        }
    }

    /// The topic of this kind for `device`.
    #[must_use]
    pub fn topic(self, device: &str) -> tracefleet::wire::Topic {
        use tracefleet::wire::Topic;
        match self {
            OutboxKind::Report => Topic::Reports(device.to_owned()),
            OutboxKind::Ack => Topic::Acks(device.to_owned()),
            OutboxKind::Escalation => Topic::Escalations(device.to_owned()),
        }
    }
}

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Row id (grows with every message).
    pub id: i64,
    /// What it is.
    pub kind: OutboxKind,
    /// The wire-encoded payload.
    pub payload: Vec<u8>,
}

/// A run that did not finish, with what it needs to continue.
#[derive(Debug, Clone)]
pub struct Unfinished {
    /// Trace id.
    pub trace_id: String,
    /// Trace version.
    pub trace_version: String,
    /// `running` (the process ended without finishing it) or `stopped`.
    pub status: String,
    /// The trace as it was run: a signed trace (`signed`) or a compiled one.
    pub trace_file: Vec<u8>,
    /// Whether `trace_file` is a signed trace.
    pub signed: bool,
    /// The run's resolved inputs.
    pub inputs: BTreeMap<String, String>,
    /// The run's base directory.
    pub base_dir: String,
    /// Steps journaled so far.
    pub done: BTreeMap<u32, Completed>,
    /// Earlier resumes.
    pub resumes: u32,
}

/// What a run is, for [`Store::begin_run`].
#[derive(Debug, Clone, Copy)]
pub struct NewRun<'a> {
    /// Run id.
    pub run_id: &'a str,
    /// Trace id.
    pub trace_id: &'a str,
    /// Trace version.
    pub version: &'a str,
    /// Start time (RFC 3339).
    pub started_at: &'a str,
    /// Base directory.
    pub base_dir: &'a str,
    /// The trace file (signed, or compiled when `signed` is false).
    pub trace_file: &'a [u8],
    /// Whether `trace_file` is signed.
    pub signed: bool,
    /// Resolved inputs.
    pub inputs: &'a BTreeMap<String, String>,
}

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
        let mut conn = Connection::open(state_dir.join("follower.db"))?;
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
        Ok(Self { conn })
    }

    /// Registers (or replaces) a model.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn put_model(&self, m: &ModelRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO models (name, file, sha256, size, architecture, quantization,
                context_length, parameters, ram_needed_bytes, license, added_at, verified_at,
                verified_stamp)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            rusqlite::params![
                m.name,
                m.file,
                m.sha256,
                sql_int(m.size),
                m.architecture,
                m.quantization,
                sql_int(m.context_length),
                sql_int(m.parameters),
                sql_int(m.ram_needed_bytes),
                m.license,
                m.added_at,
                m.verified_at,
                m.verified_stamp
            ],
        )?;
        Ok(())
    }

    /// The registered models, by name.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn models(&self) -> Result<Vec<ModelRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, file, sha256, size, architecture, quantization, context_length,
                    parameters, ram_needed_bytes, license, added_at, verified_at, verified_stamp
             FROM models ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ModelRow {
                name: r.get(0)?,
                file: r.get(1)?,
                sha256: r.get(2)?,
                size: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                architecture: r.get(4)?,
                quantization: r.get(5)?,
                context_length: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                parameters: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                ram_needed_bytes: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
                license: r.get(9)?,
                added_at: r.get(10)?,
                verified_at: r.get(11)?,
                verified_stamp: r.get(12)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that model `name` was hashed again at `now` with file identity `stamp`.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn mark_model_verified(
        &self,
        name: &str,
        now: &str,
        stamp: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE models SET verified_at = ?2, verified_stamp = ?3 WHERE name = ?1",
            rusqlite::params![name, now, stamp],
        )?;
        Ok(())
    }

    /// Forgets model `name`; whether it was registered.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn remove_model(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM models WHERE name = ?1", [name])?
            > 0)
    }

    /// The newest installed trust root (decoded) and its file bytes.
    ///
    /// # Errors
    /// On SQLite failure or a stored root that no longer decodes.
    pub fn trust_root(&self) -> Result<Option<(TrustRoot, Vec<u8>)>, StoreError> {
        let row: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT root_file FROM trust_roots ORDER BY version DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        row.map(|bytes| {
            decode_root(&bytes)
                .map(|(_, root)| (root, bytes))
                .map_err(|e| StoreError::Corrupt {
                    what: "trust root",
                    detail: e.to_string(),
                })
        })
        .transpose()
    }

    /// Stores verified trust roots (oldest first) in one transaction.
    ///
    /// # Errors
    /// On SQLite failure (nothing is stored then).
    pub fn add_trust_roots(
        &mut self,
        base: Option<u32>,
        roots: &[(u32, &[u8])],
        now: &str,
    ) -> Result<(), StoreError> {
        self.install_all(base, roots, &[], now, &mut || Ok(()))
    }

    /// The installed version of a trace.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn installed_version(&self, trace_id: &str) -> Result<Option<Version>, StoreError> {
        Ok(installed_version_in(&self.conn, trace_id)?)
    }

    /// Installs a verified signed trace, refusing a version that is not above the installed
    /// one. The check and the write are one transaction.
    ///
    /// # Errors
    /// [`StoreError::Rollback`] or an SQLite failure; the store is unchanged then.
    pub fn install_trace(
        &mut self,
        base: Option<u32>,
        trace_id: &str,
        version: Version,
        signed: &[u8],
        now: &str,
    ) -> Result<(), StoreError> {
        self.install_all(base, &[], &[(trace_id, version, signed)], now, &mut || {
            Ok(())
        })
    }

    /// Installs trust roots and traces together: every trace version must be above the
    /// installed one, or nothing is written.
    ///
    /// # Errors
    /// [`StoreError::Rollback`] or an SQLite failure; the store is unchanged then.
    pub fn install_all(
        &mut self,
        base: Option<u32>,
        roots: &[(u32, &[u8])],
        traces: &[(&str, Version, &[u8])],
        now: &str,
        before_commit: &mut dyn FnMut() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        check_base(&tx, base)?;
        for (version, bytes) in roots {
            tx.execute(
                "INSERT INTO trust_roots (version, root_file, installed_at) VALUES (?1, ?2, ?3)",
                params![version, bytes, now],
            )?;
            tx.execute(
                "INSERT INTO install_log (at, kind, name, version, outcome, detail) VALUES (?1, 'trust_root', 'root', ?2, 'installed', '')",
                params![now, version.to_string()],
            )?;
        }
        for (trace_id, version, signed) in traces {
            let installed = installed_version_in(&tx, trace_id)?;
            if let Some(have) = installed
                && *version <= have
            {
                return Err(StoreError::Rollback {
                    trace_id: (*trace_id).to_owned(),
                    installed: have,
                    offered: *version,
                });
            }
            tx.execute(
                "INSERT OR REPLACE INTO installed_traces (trace_id, major, minor, patch, signed, installed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![trace_id, version.major, version.minor, version.patch, signed, now],
            )?;
            tx.execute(
                "INSERT INTO install_log (at, kind, name, version, outcome, detail) VALUES (?1, 'trace', ?2, ?3, 'installed', '')",
                params![now, trace_id, version.to_string()],
            )?;
        }
        // Every check passed and the rows are written: place files, then commit.
        before_commit()?;
        tx.commit()?;
        Ok(())
    }

    /// Records a refused install (the refusal itself changes nothing else).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn log_refusal(
        &self,
        kind: &str,
        name: &str,
        detail: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO install_log (at, kind, name, version, outcome, detail) VALUES (?1, ?2, ?3, '', 'refused', ?4)",
            params![now, kind, name, detail],
        )?;
        Ok(())
    }

    /// Installed traces: (id, version, signed bytes), by id.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn installed_traces(&self) -> Result<Vec<(String, Version, Vec<u8>)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT trace_id, major, minor, patch, signed FROM installed_traces ORDER BY trace_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                Version {
                    major: r.get(1)?,
                    minor: r.get(2)?,
                    patch: r.get(3)?,
                },
                r.get(4)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The signed bytes of an installed trace.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn installed_signed(&self, trace_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT signed FROM installed_traces WHERE trace_id = ?1",
                [trace_id],
                |r| r.get(0),
            )
            .optional()?)
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

    /// Statistics of a trace version (the defaults when it never ran here).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn stats(
        &self,
        trace_id: &str,
        version: &str,
    ) -> Result<(Stats, Option<String>), StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT usage_count, success_count, confidence, last_used FROM trace_stats WHERE trace_id = ?1 AND version = ?2",
                params![trace_id, version],
                |r| Ok((stats_from_row(r)?, r.get::<_, String>(3)?)),
            )
            .optional()?;
        Ok(row.map_or((Stats::default(), None), |(s, at)| (s, Some(at))))
    }

    /// Records a finished run in its trace version's statistics (LLMunix confidence rule).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_outcome(
        &mut self,
        trace_id: &str,
        version: &str,
        success: bool,
        now: &str,
    ) -> Result<Stats, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let before = tx
            .query_row(
                "SELECT usage_count, success_count, confidence FROM trace_stats WHERE trace_id = ?1 AND version = ?2",
                params![trace_id, version],
                stats_from_row,
            )
            .optional()?
            .unwrap_or_default();
        let after = before.record(success);
        tx.execute(
            "INSERT OR REPLACE INTO trace_stats (trace_id, version, usage_count, success_count, confidence, last_used) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                trace_id,
                version,
                i64::try_from(after.usage_count).unwrap_or(i64::MAX),
                i64::try_from(after.success_count).unwrap_or(i64::MAX),
                after.confidence,
                now
            ],
        )?;
        tx.commit()?;
        Ok(after)
    }

    /// Records an escalation for the fleet link to send.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_escalation(
        &self,
        trace_id: &str,
        run_id: Option<&str>,
        reason: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO escalations (at, trace_id, run_id, reason) VALUES (?1, ?2, ?3, ?4)",
            params![now, trace_id, run_id, reason],
        )?;
        if let Some(device_id) = enrolled(&tx)? {
            let message = tracefleet::wire::EscalationMessage {
                device_id,
                trace_id: trace_id.to_owned(),
                run_id: run_id.map(str::to_owned),
                reason: reason.to_owned(),
                at: unix_now(),
            };
            enqueue(
                &tx,
                OutboxKind::Escalation,
                &tracefleet::wire::encode(&message),
                now,
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Enrols this device in a fleet as `device_id`: from now on every finished run's report
    /// and every escalation also goes into the outbox, in the same transaction.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn enroll(&self, device_id: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO agent_state (key, value) VALUES ('device_id', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [device_id],
        )?;
        Ok(())
    }

    /// The device id this device is enrolled as, if it is.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn device_id(&self) -> Result<Option<String>, StoreError> {
        enrolled(&self.conn)
    }

    /// Adds a message to the outbox.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn enqueue(&self, kind: OutboxKind, payload: &[u8], now: &str) -> Result<i64, StoreError> {
        enqueue(&self.conn, kind, payload, now)
    }

    /// Up to `limit` outbox messages with ids above `after`, oldest first.
    ///
    /// # Errors
    /// On SQLite failure, or a row of an unknown kind.
    pub fn outbox_after(&self, after: i64, limit: u32) -> Result<Vec<OutboxMessage>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, kind, payload FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, kind, payload) = row?;
            let kind = OutboxKind::parse(&kind).ok_or_else(|| StoreError::Corrupt {
                what: "outbox message",
                detail: format!(
                    "kind {kind:?} of message {id}: expected report, ack or escalation"
                ),
            })?;
            out.push(OutboxMessage { id, kind, payload });
        }
        Ok(out)
    }

    /// Removes a message the broker acknowledged.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn outbox_delete(&self, id: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM outbox WHERE id = ?1")?
            .execute([id])?;
        Ok(())
    }

    /// Messages waiting in the outbox.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The last command counter this device accepted (0 before the first).
    ///
    /// # Errors
    /// On SQLite failure or a stored value that is not a number.
    pub fn command_counter(&self) -> Result<u64, StoreError> {
        let v: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM agent_state WHERE key = 'command_counter'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        v.map_or(Ok(0), |v| {
            v.parse().map_err(|_| StoreError::Corrupt {
                what: "command counter",
                detail: format!("{v:?}: expected a number"),
            })
        })
    }

    /// Records `counter` as the last accepted one, if it is above the stored one; returns
    /// whether it was (a command is acted on only then).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn accept_command_counter(&self, counter: u64) -> Result<bool, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let last: u64 = tx
            .query_row(
                "SELECT value FROM agent_state WHERE key = 'command_counter'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if counter <= last {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO agent_state (key, value) VALUES ('command_counter', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [counter.to_string()],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Escalations recorded, oldest first: (trace id, reason).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn escalations(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT trace_id, reason FROM escalations ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records the start of a run.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn begin_run(&self, run: &NewRun<'_>) -> Result<(), StoreError> {
        let inputs = serde_json::to_string(run.inputs).unwrap_or_default();
        self.conn.execute(
            "INSERT INTO runs (run_id, trace_id, trace_version, status, started_at, base_dir, trace_file, signed, inputs_json) VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8)",
            params![
                run.run_id,
                run.trace_id,
                run.version,
                run.started_at,
                run.base_dir,
                run.trace_file,
                run.signed,
                inputs
            ],
        )?;
        Ok(())
    }

    /// A run that has not finished (`running` or `stopped`), with its journal; `None` when
    /// there is no such run or it finished.
    ///
    /// # Errors
    /// On SQLite failure or an unreadable journal row.
    pub fn unfinished(&self, run_id: &str) -> Result<Option<Unfinished>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT trace_id, trace_version, status, trace_file, signed, inputs_json, base_dir, resumes FROM runs WHERE run_id = ?1 AND status IN ('running', 'stopped')",
                [run_id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<Vec<u8>>>(3)?,
                        r.get::<_, bool>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, u32>(7)?,
                    ))
                },
            )
            .optional()?;
        let Some((trace_id, trace_version, status, file, signed, inputs, base_dir, resumes)) = row
        else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare("SELECT step, result_json, output FROM run_steps WHERE run_id = ?1")?;
        let mut done = BTreeMap::new();
        for row in stmt.query_map([run_id], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })? {
            let (step, json, output) = row?;
            let result: StepResult =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                    what: "run journal",
                    detail: format!("run {run_id}, step {step}: {e}"),
                })?;
            done.insert(step, Completed { result, output });
        }
        Ok(Some(Unfinished {
            trace_id,
            trace_version,
            status,
            trace_file: file.unwrap_or_default(),
            signed,
            inputs: serde_json::from_str(&inputs).map_err(|e| StoreError::Corrupt {
                what: "run inputs",
                detail: format!("run {run_id}: {e}"),
            })?,
            base_dir,
            done,
            resumes,
        }))
    }

    /// Runs left `running` (their process ended without finishing them, or is still going)
    /// of this trace version with these inputs, newest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn running_like(
        &self,
        trace_id: &str,
        version: &str,
        inputs: &BTreeMap<String, String>,
    ) -> Result<Vec<String>, StoreError> {
        let inputs = serde_json::to_string(inputs).unwrap_or_default();
        let mut stmt = self.conn.prepare(
            "SELECT run_id FROM runs WHERE status = 'running' AND trace_id = ?1 AND trace_version = ?2 AND inputs_json = ?3 AND trace_file IS NOT NULL ORDER BY run_id DESC",
        )?;
        let ids = stmt.query_map(params![trace_id, version, inputs], |r| r.get(0))?;
        Ok(ids.collect::<Result<_, _>>()?)
    }

    /// Marks a run `running` again for a resume and counts the resume.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn mark_resumed(&self, run_id: &str) -> Result<u32, StoreError> {
        Ok(self.conn.query_row(
            "UPDATE runs SET status = 'running', resumes = resumes + 1 WHERE run_id = ?1 RETURNING resumes",
            [run_id],
            |r| r.get(0),
        )?)
    }

    /// Journals that a step starts (status `running`; its record says not run, so a resume
    /// runs it again unless it finishes).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_step_start(&self, run_id: &str, result: &StepResult) -> Result<(), StoreError> {
        let json = serde_json::to_string(result).unwrap_or_default();
        self.conn.execute(
            "INSERT OR REPLACE INTO run_steps (run_id, step, status, result_json, output) VALUES (?1, ?2, 'running', ?3, '')",
            params![run_id, result.step, json],
        )?;
        Ok(())
    }

    /// Journals a finished step.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_step(
        &self,
        run_id: &str,
        result: &StepResult,
        output: &str,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(result).unwrap_or_default();
        let status = serde_json::to_value(result.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.conn.execute(
            "INSERT OR REPLACE INTO run_steps (run_id, step, status, result_json, output) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![run_id, result.step, status, json, output],
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
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "UPDATE runs SET status = ?2, finished_at = ?3, report_json = ?4 WHERE run_id = ?1",
            params![report.run_id, status, report.finished_at, json],
        )?;
        // On an enrolled device the report leaves through the outbox; a stopped run is not
        // finished (it reports when it is).
        if status != "stopped" && enrolled(&tx)?.is_some() {
            let message = tracefleet::wire::ReportMessage {
                run_id: report.run_id.clone(),
                report_json: json,
            };
            enqueue(
                &tx,
                OutboxKind::Report,
                &tracefleet::wire::encode(&message),
                &report.finished_at,
            )?;
        }
        tx.commit()?;
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

fn enrolled(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value FROM agent_state WHERE key = 'device_id'",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

fn enqueue(
    conn: &Connection,
    kind: OutboxKind,
    payload: &[u8],
    now: &str,
) -> Result<i64, StoreError> {
    conn.prepare_cached("INSERT INTO outbox (kind, payload, created_at) VALUES (?1, ?2, ?3)")?
        .execute(params![kind.as_str(), payload, now])?;
    Ok(conn.last_insert_rowid())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refuses to write when the newest stored trust root is not the one a verification used.
fn check_base(tx: &rusqlite::Transaction<'_>, base: Option<u32>) -> Result<(), StoreError> {
    let found: Option<u32> =
        tx.query_row("SELECT MAX(version) FROM trust_roots", [], |r| r.get(0))?;
    if found == base {
        Ok(())
    } else {
        Err(StoreError::RootChanged {
            expected: base,
            found,
        })
    }
}

/// The installed version of a trace, read through `conn` (a transaction derefs to one).
fn installed_version_in(conn: &Connection, trace_id: &str) -> rusqlite::Result<Option<Version>> {
    conn.query_row(
        "SELECT major, minor, patch FROM installed_traces WHERE trace_id = ?1",
        [trace_id],
        |r| {
            Ok(Version {
                major: r.get(0)?,
                minor: r.get(1)?,
                patch: r.get(2)?,
            })
        },
    )
    .optional()
}

/// Stats from the first three columns (usage_count, success_count, confidence).
fn stats_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Stats> {
    let count =
        |i: usize| -> rusqlite::Result<u64> { Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0)) };
    Ok(Stats {
        usage_count: count(0)?,
        success_count: count(1)?,
        confidence: r.get(2)?,
    })
}
