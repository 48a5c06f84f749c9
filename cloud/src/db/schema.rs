//! The learner database's schema: every table and index, as the ordered migrations
//! (rusqlite_migration) that take any earlier database to the current one. Append only:
//! an existing database must open, so a released migration is never changed.

use rusqlite_migration::M;

/// The migrations, oldest first.
pub(super) const MIGRATIONS: &[M<'static>] = &[
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
    // Messages ingest refused (too large, malformed, impersonating, not for the learner),
    // counted per device and kind (see crate::db::ingest).
    M::up(
        "CREATE TABLE refused_messages (
        device_id   TEXT NOT NULL,
        kind        TEXT NOT NULL,
        count       INTEGER NOT NULL,
        last_topic  TEXT NOT NULL,
        last_detail TEXT NOT NULL,
        last_at     INTEGER NOT NULL,
        PRIMARY KEY (device_id, kind)
    );",
    ),
    // Judgement fidelity each device reported: its model's agreement with a step's reference
    // answers (see crate::db::fidelity).
    M::up(
        "CREATE TABLE fidelity (
        device_id    TEXT NOT NULL,
        trace_id     TEXT NOT NULL,
        version      TEXT NOT NULL,
        step         INTEGER NOT NULL,
        model        TEXT NOT NULL,
        agreements   INTEGER NOT NULL,
        total        INTEGER NOT NULL,
        min_fidelity REAL NOT NULL,
        at           INTEGER NOT NULL,
        PRIMARY KEY (device_id, trace_id, version, step, model)
    );",
    ),
    // The reference answers the device's model did not repeat (JSON `[[index into the
    // step's scored examples, the model's answer], …]`): what a regeneration is shown.
    M::up("ALTER TABLE fidelity ADD COLUMN disagreements TEXT NOT NULL DEFAULT '[]';"),
    // A report counts toward its trace version only from a device that has that version
    // installed (acked, or listed in its heartbeat); others are kept, uncounted.
    M::up("ALTER TABLE runs ADD COLUMN counted INTEGER NOT NULL DEFAULT 1;"),
    // Such reports are counted once the device acks or lists the version (a device
    // installed by USB reports its queued runs before its first heartbeat): found by this
    // index, small because it holds only the reports still waiting.
    M::up(
        "CREATE INDEX runs_uncounted ON runs (device_id, trace_id, trace_version) WHERE counted = 0;",
    ),
    // A device's identity for confidential traces (`age1…`), from its heartbeat.
    M::up("ALTER TABLE devices ADD COLUMN recipient TEXT;"),
];
