//! The learner's side of the fleet link: `learner serve` ingests what devices publish into
//! SQLite, and `learner command` / `learner rollout` publish to them (DESIGN.md, "Fleet link").
//!
//! Ingest is idempotent: a report is stored once per run id (a device may send it twice
//! around a reconnect), and the trace version's statistics and fleet-wide confidence (the
//! LLMunix rule, [`tracefleet::confidence`]) change only when a run is new. Each MQTT message
//! is acknowledged after its transaction commits, so a learner killed in between gets it
//! again. The device a message is from is the one in its topic (the broker's ACL lets a
//! device publish only under its own); a payload that claims another is refused. A payload
//! that does not decode is logged and dropped — never a crash, never a half-stored row.

use rumqttc::{AsyncClient, Incoming, QoS};
use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracefleet::link::BrokerConfig;
use tracefleet::report::RunStatus;
use tracefleet::wire::{self, Ack, AckOutcome, EscalationMessage, Heartbeat, Status, Topic};

/// `learner.toml`, resolved: relative paths made absolute, the broker chosen.
#[derive(Debug, Clone)]
pub struct LearnerConfig {
    /// The learner's database (default `learner.db` beside the config file).
    pub db: Option<PathBuf>,
    /// MQTT client id (default `tracefleet-learner`); unique per `serve` instance.
    pub client_id: String,
    /// MQTT shared-subscription group (`$share/<group>/…`): several `serve` instances with
    /// this group and one database split the devices' messages between them; one of them
    /// (the lease holder) drives rollouts, the watchdog and regeneration.
    pub shared_group: Option<String>,
    /// Where the learner's clients (`serve`, `command`, `simulate`) reach the broker: the
    /// `[broker]` table, or the embedded broker's address.
    pub broker: BrokerConfig,
    /// The broker `serve` runs itself, when the file has no `[broker]` table.
    pub embedded: Option<crate::broker::EmbeddedBroker>,
    /// Stuck runs: when to abort and kill them, and the key to sign that with.
    pub stuck: crate::stuck::StuckConfig,
    /// The model that regenerates traces.
    pub backend: Option<crate::regen::backend::BackendConfig>,
    /// Automatic regeneration in `serve` (`[regenerate]`; needs `[backend]`).
    pub regenerate: Option<crate::regen::auto::Auto>,
    /// Dry runs of regenerated candidates (`[dry_run]`).
    pub dry_run: Option<crate::regen::dry_run::DryRunner>,
}

/// `learner.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLearnerConfig {
    db: Option<PathBuf>,
    #[serde(default = "default_client_id")]
    client_id: String,
    shared_group: Option<String>,
    /// An external broker.
    broker: Option<BrokerConfig>,
    /// The embedded broker's settings (the default without `[broker]`).
    embedded: Option<crate::broker::EmbeddedBroker>,
    #[serde(default)]
    stuck: crate::stuck::StuckConfig,
    backend: Option<crate::regen::backend::BackendConfig>,
    regenerate: Option<crate::regen::auto::AutoConfig>,
    dry_run: Option<crate::regen::dry_run::DryRunConfig>,
}

fn default_client_id() -> String {
    "tracefleet-learner".into()
}

impl LearnerConfig {
    /// Reads a config file (`TRACEFLEET_MQTT_*` override its broker settings); relative
    /// paths in it are relative to the file.
    ///
    /// # Errors
    /// A message naming the file and what is wrong.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: RawLearnerConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let (broker, embedded) = match (raw.broker, raw.embedded) {
            (Some(_), Some(_)) => anyhow::bail!(
                "{}: both [broker] (an external broker) and [embedded]: expected one of them",
                path.display()
            ),
            (Some(b), None) => (b, None),
            (None, e) => {
                let e = e.unwrap_or_default();
                let addr = crate::broker::client_address(&e);
                let b = BrokerConfig {
                    host: addr.ip().to_string(),
                    port: Some(addr.port()),
                    ..BrokerConfig::default()
                };
                (b, Some(e))
            }
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(g) = &raw.shared_group {
            wire::check_name("shared_group", g)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        let regenerate = match raw.regenerate {
            Some(r) => {
                if raw.backend.is_none() {
                    anyhow::bail!(
                        "{}: [regenerate] without [backend]: expected the model to ask (kind, model, base_url, …)",
                        path.display()
                    );
                }
                Some(
                    r.resolve(dir)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                )
            }
            None => None,
        };
        let dry_run = match raw.dry_run {
            Some(d) => Some(
                d.resolve(dir, std::env::temp_dir().join("tracefleet-dry-run"))
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            ),
            None => None,
        };
        let mut c = LearnerConfig {
            db: raw.db,
            client_id: raw.client_id,
            shared_group: raw.shared_group,
            broker,
            embedded,
            stuck: raw.stuck,
            backend: raw.backend,
            regenerate,
            dry_run,
        };
        c.broker.apply_env()?;
        c.db = Some(dir.join(c.db.take().unwrap_or_else(|| "learner.db".into())));
        c.stuck.commands_key = c.stuck.commands_key.take().map(|k| dir.join(k));
        c.stuck
            .durations()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(c)
    }

    /// The database path.
    #[must_use]
    pub fn db_path(&self) -> PathBuf {
        self.db.clone().unwrap_or_else(|| "learner.db".into())
    }
}

const MIGRATIONS: &[M<'static>] = &[
    M::up(
        "CREATE TABLE devices (
        device_id        TEXT PRIMARY KEY,
        online           INTEGER NOT NULL DEFAULT 0,
        last_seen        INTEGER NOT NULL,
        follower_version TEXT,
        groups_json      TEXT NOT NULL DEFAULT '[]',
        installed_json   TEXT NOT NULL DEFAULT '[]',
        running_json     TEXT NOT NULL DEFAULT '[]',
        telemetry_json   TEXT
    );
    CREATE TABLE runs (
        run_id        TEXT PRIMARY KEY,
        device_id     TEXT NOT NULL,
        trace_id      TEXT NOT NULL,
        trace_version TEXT NOT NULL,
        status        TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        finished_at   TEXT NOT NULL,
        report_json   TEXT NOT NULL,
        received_at   INTEGER NOT NULL
    );
    CREATE INDEX runs_by_trace ON runs (trace_id, trace_version);
    CREATE TABLE trace_stats (
        trace_id      TEXT NOT NULL,
        version       TEXT NOT NULL,
        runs          INTEGER NOT NULL,
        successes     INTEGER NOT NULL,
        confidence    REAL NOT NULL,
        PRIMARY KEY (trace_id, version)
    );
    CREATE TABLE acks (
        device_id TEXT NOT NULL,
        trace_id  TEXT NOT NULL,
        version   TEXT NOT NULL,
        outcome   TEXT NOT NULL,
        detail    TEXT NOT NULL,
        at        INTEGER NOT NULL,
        PRIMARY KEY (device_id, trace_id, version)
    );
    CREATE TABLE escalations (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        trace_id  TEXT NOT NULL,
        run_id    TEXT,
        reason    TEXT NOT NULL,
        at        INTEGER NOT NULL,
        UNIQUE (device_id, trace_id, run_id, reason, at)
    );
    CREATE TABLE command_counters (
        device_id TEXT PRIMARY KEY,
        counter   INTEGER NOT NULL
    );",
    ),
    // Staged rollouts (see crate::rollout).
    M::up(
        "CREATE TABLE rollouts (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        trace_id         TEXT NOT NULL,
        version          TEXT NOT NULL,
        signed           BLOB NOT NULL,
        waves_json       TEXT NOT NULL,
        wave             INTEGER NOT NULL,
        state            TEXT NOT NULL,
        max_failure_rate REAL NOT NULL,
        min_runs         INTEGER NOT NULL,
        reason           TEXT NOT NULL,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL
    );",
    ),
    // Stuck runs (see crate::stuck).
    M::up(
        "CREATE TABLE stuck_runs (
        run_id    TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        trace_id  TEXT NOT NULL,
        stage     TEXT NOT NULL,
        since     INTEGER NOT NULL
    );",
    ),
    // The rollout tick reads a version's acks across devices.
    M::up("CREATE INDEX acks_by_trace ON acks (trace_id, version);"),
    // Every regeneration: what the model was asked, what it cost, what came out.
    M::up(
        "CREATE TABLE regenerations (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        trace_id      TEXT NOT NULL,
        from_version  TEXT,
        to_version    TEXT,
        outcome       TEXT NOT NULL,
        detail        TEXT NOT NULL,
        model         TEXT NOT NULL,
        rounds        INTEGER NOT NULL,
        input_tokens  INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost          REAL NOT NULL,
        failures      INTEGER NOT NULL,
        at            INTEGER NOT NULL
    );",
    ),
    // What set a regeneration off; trace sources the learner keeps (the current source goes
    // into the next regeneration's prompt); how far the automatic triggers have read the
    // escalations.
    M::up(
        "ALTER TABLE regenerations ADD COLUMN trigger TEXT NOT NULL DEFAULT 'command';
    CREATE INDEX regenerations_by_trace ON regenerations (trace_id, from_version);
    CREATE TABLE trace_sources (
        trace_id TEXT NOT NULL,
        version  TEXT NOT NULL,
        source   TEXT NOT NULL,
        at       INTEGER NOT NULL,
        PRIMARY KEY (trace_id, version)
    );
    CREATE TABLE cursors (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );",
    ),
    // How long each regeneration took (the cost accounting sets it against runs).
    M::up("ALTER TABLE regenerations ADD COLUMN duration_ms INTEGER;"),
    // Which `serve` instance leads (drives rollouts, the watchdog, regeneration), until when.
    M::up(
        "CREATE TABLE leases (
        name   TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until  INTEGER NOT NULL
    );",
    ),
];

/// The learner's database.
pub struct LearnerDb {
    conn: Connection,
}

/// A device as the learner last heard of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceRow {
    /// Its id.
    pub device_id: String,
    /// Whether its last status said online.
    pub online: bool,
    /// Unix seconds of the last message from it.
    pub last_seen: i64,
    /// Its follower version.
    pub follower_version: Option<String>,
    /// Runs reported.
    pub runs: i64,
}

/// A run a device reported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReportedRun {
    /// Run id.
    pub run_id: String,
    /// The device (from the topic).
    pub device_id: String,
    /// Trace id.
    pub trace_id: String,
    /// Trace version.
    pub trace_version: String,
    /// `success`, `failed` or `stopped`.
    pub status: String,
}

/// Something that needs a person.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EscalationRow {
    /// The device.
    pub device_id: String,
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
    pub device_id: String,
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
    /// Trace id.
    pub trace_id: String,
    /// Version.
    pub version: String,
    /// Runs reported.
    pub runs: i64,
    /// Successful ones.
    pub successes: i64,
    /// Confidence (LLMunix rule over the runs in arrival order).
    pub confidence: f64,
}

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl LearnerDb {
    /// Opens (creating and migrating) the database.
    ///
    /// # Errors
    /// On SQLite or migration failure.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
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
        Migrations::from_slice(MIGRATIONS).to_latest(&mut conn)?;
        drop(lock);
        Ok(LearnerDb { conn })
    }

    /// Ingests one message published on `topic` (a batch of one: [`LearnerDb::ingest_batch`]).
    /// Returns what it was, for logs; a payload that is refused returns an error and changes
    /// nothing.
    ///
    /// # Errors
    /// [`IngestError`]: the topic, the payload, or SQLite.
    pub fn ingest(&mut self, topic: &str, payload: &[u8]) -> Result<Ingested, IngestError> {
        self.ingest_batch(&[(topic, payload)])?
            .pop()
            .unwrap_or_else(|| unreachable!("one result per message"))
    }

    /// Ingests messages in arrival order in one transaction: one result per message, in
    /// the same order. A refused message (topic, payload, impersonation) changes nothing and
    /// does not stop the others; every other message is stored when this returns `Ok`, and
    /// none is when it returns `Err` (acknowledge them only after `Ok`). The outcome is the
    /// same as ingesting them one by one: a run id seen twice is stored once, and the
    /// confidence follows the runs in arrival order.
    ///
    /// # Errors
    /// SQLite (nothing of the batch is stored).
    pub fn ingest_batch(
        &mut self,
        messages: &[(&str, &[u8])],
    ) -> rusqlite::Result<Vec<Result<Ingested, IngestError>>> {
        let now = unix_now();
        let tx = self.conn.transaction()?;
        let mut batch = Batch::default();
        let mut out = Vec::with_capacity(messages.len());
        for (topic, payload) in messages {
            out.push(match decode_message(topic, payload) {
                Ok(m) => Ok(batch.store(&tx, m, now)?),
                Err(e) => Err(e),
            });
        }
        batch.finish(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// The newest failed runs of `trace_id` (any version), at most `limit`.
    ///
    /// # Errors
    /// On SQLite failure; a stored report that no longer parses is skipped.
    pub fn failed_reports(
        &self,
        trace_id: &str,
        limit: u32,
    ) -> rusqlite::Result<Vec<tracefleet::report::Report>> {
        let mut s = self.conn.prepare(
            "SELECT report_json FROM runs WHERE trace_id = ?1 AND status = 'failed'
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

    /// Records a regeneration (`outcome`: `compiled` or `gave_up`, …).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_regeneration(&self, r: &RegenerationRow) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO regenerations (trace_id, from_version, to_version, outcome, detail, model, rounds, input_tokens, output_tokens, cost, failures, at, trigger, duration_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                r.trace_id,
                r.from_version,
                r.to_version,
                r.outcome,
                r.detail,
                r.model,
                r.rounds,
                i64::try_from(r.input_tokens).unwrap_or(i64::MAX),
                i64::try_from(r.output_tokens).unwrap_or(i64::MAX),
                r.cost,
                r.failures,
                unix_now(),
                r.trigger,
                r.duration_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX))
            ],
        )?;
        Ok(())
    }

    /// Keeps the source of `trace_id` `version` (replacing one kept before).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn record_source(
        &self,
        trace_id: &str,
        version: &str,
        source: &str,
    ) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO trace_sources (trace_id, version, source, at) VALUES (?1, ?2, ?3, ?4)",
            params![trace_id, version, source, unix_now()],
        )?;
        Ok(())
    }

    /// The kept source of `trace_id` `version`, if any.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn source(&self, trace_id: &str, version: &str) -> rusqlite::Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT source FROM trace_sources WHERE trace_id = ?1 AND version = ?2",
                params![trace_id, version],
                |r| r.get(0),
            )
            .optional()
    }

    /// Every regeneration, oldest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn regenerations(&self) -> rusqlite::Result<Vec<RegenerationRow>> {
        let mut s = self.conn.prepare(
            "SELECT trace_id, from_version, to_version, outcome, detail, model, rounds, input_tokens, output_tokens, cost, failures, trigger, duration_ms
             FROM regenerations ORDER BY id",
        )?;
        let rows = s.query_map([], |r| {
            Ok(RegenerationRow {
                trace_id: r.get(0)?,
                from_version: r.get(1)?,
                to_version: r.get(2)?,
                outcome: r.get(3)?,
                detail: r.get(4)?,
                model: r.get(5)?,
                rounds: r.get(6)?,
                input_tokens: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                output_tokens: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
                cost: r.get(9)?,
                failures: r.get(10)?,
                trigger: r.get(11)?,
                duration_ms: r
                    .get::<_, Option<i64>>(12)?
                    .map(|ms| u64::try_from(ms).unwrap_or(0)),
            })
        })?;
        rows.collect()
    }

    /// The fleet at a glance: a row per device and trace it has installed (a device with
    /// none has one row without a trace), by device then trace.
    ///
    /// # Errors
    /// On SQLite failure; a device's installed list that does not parse counts as empty.
    pub fn fleet_table(&self) -> rusqlite::Result<Vec<FleetRow>> {
        let mut devices = self
            .conn
            .prepare("SELECT device_id, online, installed_json FROM devices ORDER BY device_id")?;
        let devices: Vec<(String, bool, String)> = devices
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
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
                    .query_row(params![device_id, t.trace_id, t.version], |r| {
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
    pub fn devices(&self) -> rusqlite::Result<Vec<DeviceRow>> {
        let mut s = self.conn.prepare(
            "SELECT d.device_id, d.online, d.last_seen, d.follower_version, (SELECT COUNT(*) FROM runs r WHERE r.device_id = d.device_id)
             FROM devices d ORDER BY d.device_id",
        )?;
        let rows = s.query_map([], |r| {
            Ok(DeviceRow {
                device_id: r.get(0)?,
                online: r.get(1)?,
                last_seen: r.get(2)?,
                follower_version: r.get(3)?,
                runs: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// Per-version statistics, by trace and version.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn trace_stats(&self) -> rusqlite::Result<Vec<TraceStatsRow>> {
        let mut s = self.conn.prepare(
            "SELECT trace_id, version, runs, successes, confidence FROM trace_stats ORDER BY trace_id, version",
        )?;
        let rows = s.query_map([], |r| {
            Ok(TraceStatsRow {
                trace_id: r.get(0)?,
                version: r.get(1)?,
                runs: r.get(2)?,
                successes: r.get(3)?,
                confidence: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// Reported runs, oldest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn runs(&self) -> rusqlite::Result<Vec<ReportedRun>> {
        let mut s = self.conn.prepare(
            "SELECT run_id, device_id, trace_id, trace_version, status FROM runs ORDER BY received_at, run_id",
        )?;
        let rows = s.query_map([], |r| {
            Ok(ReportedRun {
                run_id: r.get(0)?,
                device_id: r.get(1)?,
                trace_id: r.get(2)?,
                trace_version: r.get(3)?,
                status: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// Escalations (from devices, and stuck runs), oldest first.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn escalations(&self) -> rusqlite::Result<Vec<EscalationRow>> {
        let mut s = self.conn.prepare(
            "SELECT device_id, trace_id, run_id, reason, at FROM escalations ORDER BY id",
        )?;
        let rows = s.query_map([], |r| {
            Ok(EscalationRow {
                device_id: r.get(0)?,
                trace_id: r.get(1)?,
                run_id: r.get(2)?,
                reason: r.get(3)?,
                at: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// What devices said of pushed traces, by device, trace and version.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn acks(&self) -> rusqlite::Result<Vec<AckRow>> {
        let mut s = self.conn.prepare(
            "SELECT device_id, trace_id, version, outcome, detail FROM acks ORDER BY device_id, trace_id, version",
        )?;
        let rows = s.query_map([], |r| {
            Ok(AckRow {
                device_id: r.get(0)?,
                trace_id: r.get(1)?,
                version: r.get(2)?,
                outcome: r.get(3)?,
                detail: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// The connection, for reads other modules make ([`crate::rollout`], the triggers).
    pub fn conn_ref(&self) -> &Connection {
        &self.conn
    }

    /// The connection, for changes other modules make.
    pub fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// The next command counter for `device`: above every one issued before, and at least
    /// the current time in milliseconds (so a learner whose database was lost still issues
    /// counters the device accepts).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn next_command_counter(&mut self, device: &str) -> rusqlite::Result<u64> {
        let tx = self.conn.transaction()?;
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
}

/// A message decoded and checked against its topic, ready to store.
enum Message {
    Report {
        device: String,
        report: Box<tracefleet::report::Report>,
        json: String,
    },
    Heartbeat(String, Heartbeat),
    Status(String, Status),
    Ack(String, Ack),
    Escalation(String, EscalationMessage),
}

/// Decodes a message and checks that the device in its payload is the one in its topic.
fn decode_message(topic: &str, payload: &[u8]) -> Result<Message, IngestError> {
    let topic = Topic::parse(topic)?;
    let claimed = |device: &String, payload: &str| {
        if payload == device {
            Ok(())
        } else {
            Err(IngestError::Impersonation {
                topic: device.clone(),
                payload: payload.to_owned(),
            })
        }
    };
    Ok(match topic {
        Topic::Reports(device) => {
            let (m, report) = wire::decode_report(payload)?;
            claimed(&device, &report.device_id)?;
            Message::Report {
                device,
                report: Box::new(report),
                json: m.report_json,
            }
        }
        Topic::Heartbeat(device) => {
            let hb: Heartbeat = wire::decode(payload, "heartbeat")?;
            claimed(&device, &hb.device_id)?;
            Message::Heartbeat(device, hb)
        }
        Topic::Status(device) => Message::Status(device, wire::decode(payload, "status")?),
        Topic::Acks(device) => Message::Ack(device, wire::decode(payload, "ack")?),
        Topic::Escalations(device) => {
            let e: EscalationMessage = wire::decode(payload, "escalation")?;
            claimed(&device, &e.device_id)?;
            Message::Escalation(device, e)
        }
        t @ (Topic::Commands(_)
        | Topic::FleetTrace(_)
        | Topic::GroupTrace(..)
        | Topic::DeviceTrace(..)) => {
            return Err(IngestError::NotForUs(t.name()));
        }
    })
}

/// What one ingest transaction keeps in memory: each trace version's statistics (read once,
/// written once at the end) and the devices already marked seen.
#[derive(Default)]
struct Batch {
    stats: std::collections::HashMap<(String, String), (i64, i64, f64)>,
    seen: std::collections::HashSet<String>,
}

impl Batch {
    fn seen(&mut self, tx: &Connection, device: &str, now: i64) -> rusqlite::Result<()> {
        if !self.seen.contains(device) {
            seen(tx, device, now)?;
            self.seen.insert(device.to_owned());
        }
        Ok(())
    }

    fn store(&mut self, tx: &Connection, m: Message, now: i64) -> rusqlite::Result<Ingested> {
        Ok(match m {
            Message::Report {
                device,
                report,
                json,
            } => {
                let status = match report.status {
                    RunStatus::Success => "success",
                    RunStatus::Failed => "failed",
                    RunStatus::Stopped => "stopped",
                };
                let new = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO runs (run_id, device_id, trace_id, trace_version, status, started_at, finished_at, report_json, received_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )?
                    .execute(params![
                        report.run_id,
                        device,
                        report.trace_id,
                        report.trace_version,
                        status,
                        report.started_at,
                        report.finished_at,
                        json,
                        now
                    ])?
                    == 1;
                if new && report.status != RunStatus::Stopped {
                    let key = (report.trace_id.clone(), report.trace_version.clone());
                    let stats = match self.stats.entry(key) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            let old = tx
                                .prepare_cached(
                                    "SELECT runs, successes, confidence FROM trace_stats WHERE trace_id = ?1 AND version = ?2",
                                )?
                                .query_row(params![report.trace_id, report.trace_version], |r| {
                                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                                })
                                .optional()?;
                            e.insert(old.unwrap_or((
                                0,
                                0,
                                tracefleet::confidence::INITIAL_CONFIDENCE,
                            )))
                        }
                    };
                    let success = report.status == RunStatus::Success;
                    stats.0 += 1;
                    stats.1 += i64::from(success);
                    stats.2 = tracefleet::confidence::update(stats.2, success);
                }
                self.seen(tx, &device, now)?;
                if new {
                    Ingested::Report(report.run_id)
                } else {
                    Ingested::Duplicate(report.run_id)
                }
            }
            Message::Heartbeat(device, hb) => {
                tx.prepare_cached(
                    "INSERT INTO devices (device_id, online, last_seen, follower_version, groups_json, installed_json, running_json, telemetry_json)
                     VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (device_id) DO UPDATE SET online = 1, last_seen = excluded.last_seen, follower_version = excluded.follower_version,
                       groups_json = excluded.groups_json, installed_json = excluded.installed_json, running_json = excluded.running_json, telemetry_json = excluded.telemetry_json",
                )?
                .execute(params![
                    device,
                    now,
                    hb.follower_version,
                    to_json(&hb.groups),
                    to_json(&hb.installed),
                    to_json(&hb.running),
                    to_json(&hb.telemetry)
                ])?;
                self.seen.insert(device);
                Ingested::Heartbeat
            }
            Message::Status(device, s) => {
                self.seen(tx, &device, now)?;
                tx.prepare_cached("UPDATE devices SET online = ?2 WHERE device_id = ?1")?
                    .execute(params![device, s.online])?;
                Ingested::Status(s.online)
            }
            Message::Ack(device, a) => {
                let (outcome, detail) = match &a.outcome {
                    AckOutcome::Installed => ("installed", String::new()),
                    AckOutcome::AlreadyInstalled => ("already_installed", String::new()),
                    AckOutcome::Refused(why) => ("refused", why.clone()),
                };
                tx.prepare_cached(
                    "INSERT INTO acks (device_id, trace_id, version, outcome, detail, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (device_id, trace_id, version) DO UPDATE SET outcome = excluded.outcome, detail = excluded.detail, at = excluded.at
                     WHERE NOT (acks.outcome = 'installed' AND excluded.outcome = 'already_installed')",
                )?
                .execute(params![
                    device,
                    a.trace_id,
                    a.version.clone().unwrap_or_default(),
                    outcome,
                    detail,
                    i64::try_from(a.at).unwrap_or(i64::MAX)
                ])?;
                self.seen(tx, &device, now)?;
                Ingested::Ack(
                    a.trace_id,
                    a.version.unwrap_or_default(),
                    outcome.to_owned(),
                )
            }
            Message::Escalation(device, e) => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO escalations (device_id, trace_id, run_id, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    device,
                    e.trace_id,
                    e.run_id,
                    e.reason,
                    i64::try_from(e.at).unwrap_or(i64::MAX)
                ])?;
                self.seen(tx, &device, now)?;
                Ingested::Escalation
            }
        })
    }

    /// Writes the statistics the batch changed.
    fn finish(self, tx: &Connection) -> rusqlite::Result<()> {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO trace_stats (trace_id, version, runs, successes, confidence) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (trace_id, version) DO UPDATE SET runs = excluded.runs, successes = excluded.successes, confidence = excluded.confidence",
        )?;
        for ((trace, version), (runs, successes, confidence)) in self.stats {
            upsert.execute(params![trace, version, runs, successes, confidence])?;
        }
        Ok(())
    }
}

/// Records that `device` was heard from at `now`.
fn seen(conn: &Connection, device: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO devices (device_id, last_seen) VALUES (?1, ?2)
         ON CONFLICT (device_id) DO UPDATE SET last_seen = excluded.last_seen",
    )?
    .execute(params![device, now])?;
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A device and one trace installed on it (from its last heartbeat), with how it ran there.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FleetRow {
    /// The device.
    pub device_id: String,
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

/// A regeneration as recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RegenerationRow {
    /// Trace id.
    pub trace_id: String,
    /// The version it replaces (`None`: a first version for a new goal).
    pub from_version: Option<String>,
    /// The version it produced, if any.
    pub to_version: Option<String>,
    /// `compiled` (signed and rolled out) or `gave_up`.
    pub outcome: String,
    /// The rollout, or why it gave up.
    pub detail: String,
    /// The model that answered.
    pub model: String,
    /// Rounds (a reply and its repairs).
    pub rounds: u32,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Dollars.
    pub cost: f64,
    /// Failing runs shown to the model.
    pub failures: u32,
    /// What set it off: `command` (`learner regenerate`), or the automatic trigger and why.
    pub trigger: String,
    /// How long asking the model (all rounds) took, milliseconds; `None` when nothing was
    /// asked.
    pub duration_ms: Option<u64>,
}

/// What a message was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// A new run report.
    Report(String),
    /// A report already stored (sent again around a reconnect).
    Duplicate(String),
    /// A heartbeat.
    Heartbeat,
    /// Online or offline.
    Status(bool),
    /// An ack: trace, version, outcome.
    Ack(String, String, String),
    /// An escalation.
    Escalation,
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Topic or payload malformed.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// A device claiming to be another.
    #[error("a message on the topic of device {topic:?} claims to be from {payload:?}: refused")]
    Impersonation {
        /// Device in the topic.
        topic: String,
        /// Device in the payload.
        payload: String,
    },
    /// A topic the learner publishes on, not one it ingests.
    #[error("topic {0} is the learner's own")]
    NotForUs(String),
    /// SQLite.
    #[error("learner database: {0}")]
    Db(#[from] rusqlite::Error),
}

/// How long a `serve` instance's lead lasts without renewal (it renews every second).
pub const LEASE_SECS: i64 = 10;

/// Takes or renews the lead for `holder`: `true` when `holder` leads until `now +
/// LEASE_SECS` (it held the lease, or the lease had run out).
///
/// # Errors
/// On SQLite failure.
pub fn lead(conn: &Connection, holder: &str, now: i64) -> rusqlite::Result<bool> {
    let changed = conn.execute(
        "INSERT INTO leases (name, holder, until) VALUES ('serve', ?1, ?2)
         ON CONFLICT (name) DO UPDATE SET holder = ?1, until = ?2
         WHERE leases.holder = ?1 OR leases.until < ?3",
        params![holder, now + LEASE_SECS, now],
    )?;
    Ok(changed == 1)
}

/// `learner serve`: connects to the broker and ingests until SIGTERM/SIGINT.
///
/// # Errors
/// When the database or the broker settings cannot be used.
pub fn serve(config: &LearnerConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve_loop(config))
}

async fn serve_loop(config: &LearnerConfig) -> anyhow::Result<()> {
    let mut db = LearnerDb::open(&config.db_path())?;
    if let Some(embedded) = &config.embedded {
        crate::broker::start(embedded)?;
    }
    let options = config
        .broker
        .options(&config.client_id, None, wire::MAX_MESSAGE_BYTES)?;
    // Room for the acks of several batches and the rollouts' publishes: acks are queued
    // without waiting (this task is the one that drains the queue, by polling).
    let (client, mut eventloop) = AsyncClient::new(options, 16 * INGEST_BATCH);
    let mut batch = Vec::with_capacity(INGEST_BATCH);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut backoff = Duration::from_millis(250);
    let (stuck_after, stuck_grace) = config.stuck.durations().map_err(|e| anyhow::anyhow!(e))?;
    let commands_key = match &config.stuck.commands_key {
        Some(path) => {
            let k = crate::keys::read_secret(path)?;
            if k.role != tracefleet::signed::KeyRole::Commands {
                anyhow::bail!(
                    "[stuck] commands_key {}: a {} key: expected a command-signing key",
                    path.display(),
                    k.role
                );
            }
            Some(k)
        }
        None => None,
    };
    let mut regenerations = match (&config.regenerate, &config.backend) {
        (Some(auto), Some(backend)) => Some(crate::regen::auto::Runner::new(
            auto.clone(),
            backend.clone(),
            config.dry_run.clone(),
            config.db_path(),
        )?),
        _ => None,
    };
    let mut rollouts = tokio::time::interval(Duration::from_secs(1));
    rollouts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader = false;
    tracing::info!(db = %config.db_path().display(), "learner serving");
    loop {
        tokio::select! {
            _ = rollouts.tick() => {
                let leads = match lead(&db.conn, &config.client_id, unix_now()) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "lease");
                        false
                    }
                };
                if leads != leader {
                    tracing::info!(leader = leads, "lead of rollouts, watchdog and regeneration");
                    leader = leads;
                    if leads {
                        // Taking over: publish every running rollout's waves again.
                        drive_rollouts(&client, &db, true);
                    }
                }
                if !leader {
                    continue;
                }
                if let Some(r) = &mut regenerations {
                    r.tick(&mut db, unix_now());
                }
                drive_rollouts(&client, &db, false);
                match crate::stuck::check(&db.conn, unix_now(), stuck_after, stuck_grace) {
                    Ok(interventions) => {
                        for i in interventions {
                            send_intervention(&client, &mut db, commands_key.as_ref(), i);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "stuck runs"),
                }
            }
            ev = eventloop.poll() => match ev {
                Ok(rumqttc::Event::Incoming(Incoming::ConnAck(_))) => {
                    backoff = Duration::from_millis(250);
                    connected(&client, &db, config.shared_group.as_deref(), leader)?;
                }
                Ok(rumqttc::Event::Incoming(Incoming::Publish(p))) => {
                    // Whatever else has already arrived joins this message in one
                    // transaction (the poll is cancel-safe: unread bytes stay buffered).
                    batch.push(p);
                    let mut reconnected = false;
                    for _ in 0..4 * INGEST_BATCH {
                        if batch.len() >= INGEST_BATCH {
                            break;
                        }
                        match ready_event(&mut eventloop).await {
                            Some(Ok(rumqttc::Event::Incoming(Incoming::Publish(p)))) => batch.push(p),
                            Some(Ok(rumqttc::Event::Incoming(Incoming::ConnAck(_)))) => {
                                reconnected = true;
                                break;
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "broker connection");
                                break;
                            }
                            None => break,
                        }
                    }
                    ingest_and_ack(&client, &mut db, &mut batch);
                    if reconnected {
                        connected(&client, &db, config.shared_group.as_deref(), leader)?;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "broker connection");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    Ok(())
}

/// The event that is ready now, if any: polls `eventloop` once, without waiting.
async fn ready_event(
    eventloop: &mut rumqttc::EventLoop,
) -> Option<Result<rumqttc::Event, rumqttc::ConnectionError>> {
    let mut poll = std::pin::pin!(eventloop.poll());
    match std::future::poll_fn(|cx| std::task::Poll::Ready(poll.as_mut().poll(cx))).await {
        std::task::Poll::Ready(event) => Some(event),
        std::task::Poll::Pending => None,
    }
}

/// Most messages ingested in one transaction.
const INGEST_BATCH: usize = 512;

/// On every (re)connection: subscribes to what devices publish (through the shared group
/// when there is one) and, when this instance leads, publishes the rollouts' waves again
/// (the broker may have lost its retained messages).
fn connected(
    client: &AsyncClient,
    db: &LearnerDb,
    shared_group: Option<&str>,
    leader: bool,
) -> anyhow::Result<()> {
    tracing::info!(shared_group, "connected to the broker");
    let kinds = ["heartbeat", "reports", "acks", "escalations", "status"];
    client.try_subscribe_many(kinds.iter().map(|k| {
        let topic = match shared_group {
            Some(g) => format!("$share/{g}/{}", wire::all_devices(k)),
            None => wire::all_devices(k),
        };
        rumqttc::SubscribeFilter::new(topic, QoS::AtLeastOnce)
    }))?;
    if leader {
        drive_rollouts(client, db, true);
    }
    Ok(())
}

/// Ingests `batch` in one transaction, then acknowledges every message of it, in order
/// (MQTT 3.1.1 §4.6). When the transaction fails nothing is acknowledged: the broker sends
/// the messages again on the next connection.
fn ingest_and_ack(client: &AsyncClient, db: &mut LearnerDb, batch: &mut Vec<rumqttc::Publish>) {
    let messages: Vec<(&str, &[u8])> = batch
        .iter()
        .map(|p| (p.topic.as_str(), &p.payload[..]))
        .collect();
    match db.ingest_batch(&messages) {
        Ok(results) => {
            for (r, p) in results.into_iter().zip(batch.iter()) {
                match r {
                    Ok(what) => tracing::debug!(?what, "ingested"),
                    Err(e) => tracing::warn!(error = %e, topic = %p.topic, "message dropped"),
                }
                if let Err(e) = client.try_ack(p) {
                    tracing::error!(error = %e, "cannot queue an ack: the broker sends the message again on the next connection");
                }
            }
        }
        Err(e) => tracing::error!(error = %e, messages = batch.len(), "could not store messages"),
    }
    batch.clear();
}

/// Signs and publishes a watchdog's abort or kill (only recorded without a command key).
fn send_intervention(
    client: &AsyncClient,
    db: &mut LearnerDb,
    key: Option<&tracefleet::signed::SecretKey>,
    i: crate::stuck::Intervention,
) {
    let Some(key) = key else {
        tracing::warn!(device = %i.device_id, run = %i.run_id, action = ?i.action, "stuck run: no [stuck] commands_key, so nothing is sent");
        return;
    };
    let counter = match db.next_command_counter(&i.device_id) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "command counter");
            return;
        }
    };
    let now = u64::try_from(unix_now()).unwrap_or(0);
    let command = wire::Command {
        device_id: i.device_id.clone(),
        counter,
        issued_at: now,
        expires_at: now + 600,
        action: i.action,
    };
    let payload = wire::encode(&wire::sign_command(&command, &[key]));
    if let Err(e) = client.try_publish(
        Topic::Commands(i.device_id).name(),
        QoS::AtLeastOnce,
        false,
        payload,
    ) {
        tracing::error!(error = %e, "cannot send a command");
    }
}

/// Advances the rollouts and publishes what they release or withdraw (retained, QoS 1).
fn drive_rollouts(client: &AsyncClient, db: &LearnerDb, republish: bool) {
    match crate::rollout::tick(&db.conn, unix_now(), republish) {
        Ok(publishes) => {
            for p in publishes {
                if let Err(e) = client.try_publish(&p.topic, QoS::AtLeastOnce, true, p.payload) {
                    tracing::error!(error = %e, topic = %p.topic, "cannot publish a rollout wave");
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "rollouts"),
    }
}

/// Publishes one message with QoS 1 (retained if asked) and waits for the broker's PUBACK.
///
/// # Errors
/// When the broker cannot be reached or does not acknowledge within `timeout`.
pub fn publish_once(
    config: &LearnerConfig,
    client_id: &str,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut options = config
            .broker
            .options(client_id, None, wire::MAX_MESSAGE_BYTES)?;
        options.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(options, 8);
        client.try_publish(topic, QoS::AtLeastOnce, retain, payload)?;
        tokio::time::timeout(timeout, async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(Incoming::PubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(anyhow::anyhow!(
                            "broker {}:{}: {e}",
                            config.broker.host,
                            config.broker.port()
                        ));
                    }
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no PUBACK from the broker within {timeout:?}"))??;
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::synthetic_report;
    use tracefleet::wire::ReportMessage;

    fn report(device: &str, run: &str, ok: bool) -> (String, Vec<u8>) {
        let r = synthetic_report(device, run, "t", "1.0.0", ok);
        let m = ReportMessage {
            run_id: run.to_owned(),
            report_json: serde_json::to_string(&r).unwrap(),
        };
        (Topic::Reports(device.into()).name(), wire::encode(&m))
    }

    #[test]
    fn one_serve_instance_leads_until_its_lease_runs_out() {
        let d = tempfile::tempdir().unwrap();
        let db = LearnerDb::open(&d.path().join("learner.db")).unwrap();
        let c = &db.conn;
        assert!(lead(c, "learner-a", 100).unwrap());
        assert!(!lead(c, "learner-b", 101).unwrap());
        assert!(lead(c, "learner-a", 105).unwrap(), "the holder renews");
        assert!(
            !lead(c, "learner-b", 100 + LEASE_SECS + 5).unwrap(),
            "renewed at 105"
        );
        // A stops renewing (killed): B takes over once the lease has run out.
        assert!(lead(c, "learner-b", 105 + LEASE_SECS + 1).unwrap());
        assert!(!lead(c, "learner-a", 105 + LEASE_SECS + 2).unwrap());
    }

    #[test]
    fn the_example_learner_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/systemd/learner.toml");
        let c = LearnerConfig::load(&p).unwrap();
        assert_eq!(
            c.db_path(),
            Path::new("/var/lib/tracefleet-learner/learner.db")
        );
        assert!(c.embedded.is_none());
        assert_eq!(c.broker.host, "broker.example");
        assert_eq!(c.backend.unwrap().model, "claude-sonnet-4-5");
        assert_eq!(
            c.stuck.commands_key.as_deref(),
            Some(Path::new("/etc/tracefleet/commands.key"))
        );
    }

    fn stats(db: &LearnerDb) -> Vec<(i64, i64, String)> {
        db.trace_stats()
            .unwrap()
            .into_iter()
            .map(|s| (s.runs, s.successes, format!("{:.6}", s.confidence)))
            .collect()
    }

    #[test]
    fn a_trace_pushed_again_stays_installed_and_a_refusal_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&dir.path().join("l.db")).unwrap();
        let ack = |outcome: AckOutcome| {
            let a = Ack {
                trace_id: "t".into(),
                version: Some("1.0.0".into()),
                outcome,
                at: 1,
            };
            (Topic::Acks("pi-01".into()).name(), wire::encode(&a))
        };
        let outcome = |db: &LearnerDb| db.acks().unwrap()[0].outcome.clone();
        let (t, p) = ack(AckOutcome::Installed);
        db.ingest(&t, &p).unwrap();
        // The retained wave delivered again (a republish, a reconnect).
        let (t, p) = ack(AckOutcome::AlreadyInstalled);
        db.ingest(&t, &p).unwrap();
        assert_eq!(outcome(&db), "installed");
        let (t, p) = ack(AckOutcome::Refused("expired".into()));
        db.ingest(&t, &p).unwrap();
        assert_eq!(outcome(&db), "refused");
    }

    #[test]
    fn a_batch_stores_what_the_same_messages_one_by_one_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut messages = Vec::new();
        for i in 0..40 {
            // Failures at irregular places: the confidence depends on the order.
            messages.push(report(
                "pi-01",
                &format!("run-{i}"),
                i % 3 != 0 && i % 7 != 0,
            ));
        }
        // Sent again around a reconnect, inside the same batch and across batches.
        messages.insert(10, messages[3].clone());
        // Garbage, a payload claiming another device, a topic the learner publishes on.
        messages.insert(20, (Topic::Reports("pi-01".into()).name(), vec![0xff; 9]));
        let (_, other) = report("pi-02", "run-x", true);
        messages.insert(21, (Topic::Reports("pi-01".into()).name(), other));
        messages.insert(22, (Topic::Commands("pi-01".into()).name(), vec![1]));
        let borrowed: Vec<(&str, &[u8])> =
            messages.iter().map(|(t, p)| (t.as_str(), &p[..])).collect();

        let mut one = LearnerDb::open(&dir.path().join("one.db")).unwrap();
        let singly: Vec<_> = borrowed
            .iter()
            .map(|(t, p)| one.ingest(t, p).map_err(|e| e.to_string()))
            .collect();
        let mut batched = LearnerDb::open(&dir.path().join("batch.db")).unwrap();
        // Two batches, the second starting inside the first one's run ids' statistics.
        let mut together = batched.ingest_batch(&borrowed[..25]).unwrap();
        together.extend(batched.ingest_batch(&borrowed[25..]).unwrap());
        let together: Vec<_> = together
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();

        assert_eq!(together, singly);
        assert_eq!(together[10], Ok(Ingested::Duplicate("run-3".into())));
        assert!(together[20].as_ref().unwrap_err().contains("format byte"));
        assert!(together[21].as_ref().unwrap_err().contains("claims to be"));
        assert!(together[22].as_ref().unwrap_err().contains("learner's own"));
        assert_eq!(batched.runs().unwrap().len(), 40);
        let s = stats(&batched);
        assert_eq!(s, stats(&one));
        // 40 runs, of which i % 3 == 0 or i % 7 == 0 failed: 14 + 6 - 2 = 18.
        assert_eq!((s[0].0, s[0].1), (40, 22));
        // Sending the whole batch again changes nothing.
        let again = batched.ingest_batch(&borrowed).unwrap();
        assert!(again.iter().all(|r| !matches!(r, Ok(Ingested::Report(_)))));
        assert_eq!(stats(&batched), s);
        assert_eq!(batched.devices().unwrap().len(), 1);
    }
}
