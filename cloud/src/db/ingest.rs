//! Ingest: what devices publish (reports, heartbeats, status, acks, escalations), decoded,
//! checked against its topic and stored, in batches of one transaction.
//!
//! Ingest is idempotent: a report is stored once per run id (a device may send it twice
//! around a reconnect), and the trace version's statistics and fleet-wide confidence (the
//! LLMunix rule, [`tracefleet::confidence`]) change only when a run is new. The caller
//! acknowledges each MQTT message after its transaction commits, so a learner killed in
//! between gets it again. The device a message is from is the one in its topic (the broker's
//! ACL lets a device publish only under its own); a payload that claims another is refused.
//! A payload that does not decode changes nothing — never a crash, never a half-stored row —
//! but is counted, per device and kind of refusal, in `refused_messages` (in the same
//! transaction; [`LearnerDb::refused_messages`] lists them): a message over the size limit
//! ([`wire::MAX_MESSAGE_BYTES`]) is refused here like a malformed one, and the caller
//! acknowledges it like any other, so the broker never sends it again.

use super::{LearnerDb, now_secs};
use rusqlite::{Connection, OptionalExtension, params};
use tracefleet::report::RunStatus;
use tracefleet::wire::{self, Ack, AckOutcome, EscalationMessage, Heartbeat, Status, Topic};

impl LearnerDb {
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
    /// the same order. A refused message (topic, payload, size, impersonation) changes
    /// nothing but its count in `refused_messages` and does not stop the others; every other message is stored when this returns `Ok`, and
    /// none is when it returns `Err` (acknowledge them only after `Ok`). The outcome is the
    /// same as ingesting them one by one: a run id seen twice is stored once, and the
    /// confidence follows the runs in arrival order.
    ///
    /// # Errors
    /// SQLite (nothing of the batch is stored).
    pub fn ingest_batch(
        &mut self,
        messages: &[(&str, &[u8])],
    ) -> super::Result<Vec<Result<Ingested, IngestError>>> {
        let now = now_secs();
        // IMMEDIATE: the write lock is taken (waiting out the busy timeout) before the first
        // read. A deferred transaction that reads first and writes later cannot wait for
        // another `serve` instance's write: SQLite answers its upgrade "database is locked"
        // at once (the snapshot it read is stale).
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut batch = Batch::default();
        let mut out = Vec::with_capacity(messages.len());
        for (topic, payload) in messages {
            out.push(match decode_message(topic, payload) {
                Ok(m) => Ok(batch.store(&tx, m, now)?),
                Err(e) => {
                    count_refusal(&tx, topic, &e, now)?;
                    Err(e)
                }
            });
        }
        batch.finish(&tx)?;
        tx.commit()?;
        Ok(out)
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
            let hb: Heartbeat = wire::decode_heartbeat(payload)?;
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
                let counted =
                    installed_there(tx, &device, &report.trace_id, &report.trace_version)?;
                let new = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO runs (run_id, device_id, trace_id, trace_version, status, started_at, finished_at, report_json, received_at, counted)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
                        now,
                        counted
                    ])?
                    == 1;
                if new && !counted {
                    // Debug, not warn: a device sending many would flood the log; the run
                    // list marks each one.
                    tracing::debug!(
                        device = %device,
                        run = %report.run_id,
                        trace = %report.trace_id,
                        version = %report.trace_version,
                        "a report of a version the device has not acked or listed as installed: kept, not counted"
                    );
                }
                if new && counted {
                    self.count(tx, &device, &report, now)?;
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
                    "INSERT INTO devices (device_id, online, last_seen, follower_version, groups_json, installed_json, running_json, telemetry_json, recipient)
                     VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (device_id) DO UPDATE SET online = 1, last_seen = excluded.last_seen, follower_version = excluded.follower_version,
                       groups_json = excluded.groups_json, installed_json = excluded.installed_json, running_json = excluded.running_json, telemetry_json = excluded.telemetry_json,
                       recipient = COALESCE(excluded.recipient, devices.recipient)",
                )?
                .execute(params![
                    device,
                    now,
                    hb.follower_version,
                    to_json(&hb.groups),
                    to_json(&hb.installed),
                    to_json(&hb.running),
                    to_json(&hb.telemetry),
                    hb.recipient
                ])?;
                for t in &hb.installed {
                    self.count_waiting(tx, &device, &t.trace_id, &t.version, now)?;
                }
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
                if let (Some(version), AckOutcome::Installed | AckOutcome::AlreadyInstalled) =
                    (&a.version, &a.outcome)
                {
                    self.count_waiting(tx, &device, &a.trace_id, version, now)?;
                }
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

    /// Counts reports of `device` kept uncounted because it had not acked or listed
    /// `trace` `version` when they arrived (in the order they arrived), now that it has.
    fn count_waiting(
        &mut self,
        tx: &Connection,
        device: &str,
        trace: &str,
        version: &str,
        now: i64,
    ) -> rusqlite::Result<()> {
        let waiting: Vec<(String, String)> = tx
            .prepare_cached(
                "SELECT run_id, report_json FROM runs
                 WHERE device_id = ?1 AND trace_id = ?2 AND trace_version = ?3 AND counted = 0
                 ORDER BY received_at, rowid",
            )?
            .query_map(params![device, trace, version], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for (run_id, json) in waiting {
            tx.prepare_cached("UPDATE runs SET counted = 1 WHERE run_id = ?1")?
                .execute(params![run_id])?;
            // Stored after it was decoded and checked: it decodes again.
            if let Ok(report) = serde_json::from_str::<tracefleet::report::Report>(&json) {
                self.count(tx, device, &report, now)?;
            }
        }
        Ok(())
    }

    /// Counts one stored report toward its version: the device's fidelity figures, and the
    /// run in the version's statistics (a stopped run is not an outcome).
    fn count(
        &mut self,
        tx: &Connection,
        device: &str,
        report: &tracefleet::report::Report,
        now: i64,
    ) -> rusqlite::Result<()> {
        if !report.fidelity.is_empty() {
            super::fidelity::record(
                tx,
                device,
                &report.trace_id,
                &report.trace_version,
                &report.fidelity,
                now,
            )?;
        }
        if report.status != RunStatus::Stopped {
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
                    e.insert(old.unwrap_or((0, 0, tracefleet::confidence::INITIAL_CONFIDENCE)))
                }
            };
            let success = report.status == RunStatus::Success;
            stats.0 += 1;
            stats.1 += i64::from(success);
            stats.2 = tracefleet::confidence::update(stats.2, success);
        }
        Ok(())
    }

    /// Writes the statistics the batch changed.
    fn finish(self, tx: &Connection) -> rusqlite::Result<()> {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO trace_stats (trace_id, version, runs, successes, confidence) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (trace_id, version) DO UPDATE SET runs = excluded.runs, successes = excluded.successes, confidence = excluded.confidence",
        )?;
        for ((trace, version), (runs, successes, confidence)) in self.stats {
            let (failing, reporting) = super::fidelity::failing_devices(tx, &trace, &version)?;
            let confidence = tracefleet::confidence::with_fidelity(confidence, failing, reporting);
            upsert.execute(params![trace, version, runs, successes, confidence])?;
        }
        Ok(())
    }
}

/// Longest detail kept of a refused message (its error, which quotes what was found).
const MAX_REFUSAL_DETAIL: usize = 500;

/// Counts a refused message against the device its topic names (`""` when it names none),
/// by kind of refusal ([`IngestError::kind`]), keeping the last one's topic and error.
fn count_refusal(
    tx: &Connection,
    topic: &str,
    error: &IngestError,
    now: i64,
) -> rusqlite::Result<()> {
    let device = Topic::parse(topic)
        .ok()
        .and_then(|t| t.device().map(str::to_owned))
        .unwrap_or_default();
    let detail: String = error.to_string().chars().take(MAX_REFUSAL_DETAIL).collect();
    let topic: String = topic.chars().take(MAX_REFUSAL_DETAIL).collect();
    tx.prepare_cached(
        "INSERT INTO refused_messages (device_id, kind, count, last_topic, last_detail, last_at) VALUES (?1, ?2, 1, ?3, ?4, ?5)
         ON CONFLICT (device_id, kind) DO UPDATE SET count = count + 1, last_topic = excluded.last_topic,
           last_detail = excluded.last_detail, last_at = excluded.last_at",
    )?
    .execute(params![device, error.kind(), topic, detail, now])?;
    Ok(())
}

/// Messages refused from one device for one reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RefusedRow {
    /// The device its topic names (`""` when the topic names none).
    pub device_id: String,
    /// [`IngestError::kind`]: `too_large`, `malformed`, `impersonation`, `not_for_us`.
    pub kind: String,
    /// How many.
    pub count: i64,
    /// The last one's topic.
    pub last_topic: String,
    /// Why the last one was refused.
    pub last_detail: String,
    /// When the last one arrived (Unix seconds).
    pub last_at: i64,
}

impl LearnerDb {
    /// Every count of refused messages, by device and kind.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn refused_messages(&self) -> super::Result<Vec<RefusedRow>> {
        let mut s = self.conn.prepare(
            "SELECT device_id, kind, count, last_topic, last_detail, last_at FROM refused_messages ORDER BY device_id, kind",
        )?;
        let rows = s.query_map([], |r| {
            Ok(RefusedRow {
                device_id: r.get(0)?,
                kind: r.get(1)?,
                count: r.get(2)?,
                last_topic: r.get(3)?,
                last_detail: r.get(4)?,
                last_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// Records that `device` was heard from at `now`.
/// Whether `device` has `trace` `version` installed, as far as the learner knows: it acked
/// the install (installed, or already installed) or its latest heartbeat lists it. A report of
/// any other version — one the device never received, made up, or from a source run — is
/// stored but counts toward nothing (statistics, confidence, fidelity, rollout waves,
/// regeneration): one device cannot raise a version's confidence with runs of a version it
/// does not hold.
fn installed_there(
    tx: &Connection,
    device: &str,
    trace: &str,
    version: &str,
) -> rusqlite::Result<bool> {
    tx.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM acks WHERE device_id = ?1 AND trace_id = ?2 AND version = ?3
                          AND outcome IN ('installed', 'already_installed'))
             OR EXISTS (SELECT 1 FROM devices d, json_each(d.installed_json) j
                        WHERE d.device_id = ?1 AND json_extract(j.value, '$.trace_id') = ?2
                          AND json_extract(j.value, '$.version') = ?3)",
    )?
    .query_row(params![device, trace, version], |r| r.get(0))
}

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
    /// The database.
    #[error("learner database: {0}")]
    Db(#[from] super::DbError),
}

impl IngestError {
    /// The kind of refusal, as counted in `refused_messages`: `too_large` (over
    /// [`wire::MAX_MESSAGE_BYTES`]), `malformed` (topic or payload), `impersonation`,
    /// `not_for_us`, `database`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            IngestError::Wire(wire::WireError::TooLarge { .. }) => "too_large",
            IngestError::Wire(_) => "malformed",
            IngestError::Impersonation { .. } => "impersonation",
            IngestError::NotForUs(_) => "not_for_us",
            IngestError::Db(_) => "database",
        }
    }
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

    fn stats(db: &LearnerDb) -> Vec<(i64, i64, String)> {
        db.trace_stats()
            .unwrap()
            .into_iter()
            .map(|s| (s.runs, s.successes, format!("{:.6}", s.confidence)))
            .collect()
    }

    /// A report whose judgement step 2 agreed with `agreements` of 10 reference answers.
    fn judged(device: &str, run: &str, agreements: u32) -> (String, Vec<u8>) {
        let mut r = synthetic_report(device, run, "t", "1.0.0", true);
        r.fidelity = vec![tracefleet::judgement::Fidelity {
            step: 2,
            model: "m".into(),
            agreements,
            total: 10,
            min_fidelity: 0.8,
            disagreements: vec![],
        }];
        let m = ReportMessage {
            run_id: run.to_owned(),
            report_json: serde_json::to_string(&r).unwrap(),
        };
        (Topic::Reports(device.into()).name(), wire::encode(&m))
    }

    #[test]
    fn fidelity_is_kept_per_device_and_low_fidelity_on_most_devices_holds_confidence_down() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&dir.path().join("l.db")).unwrap();
        for device in ["pi-01", "pi-02", "pi-03"] {
            db.put_installed(device, "t", "1.0.0");
        }
        // Twenty successful runs would earn follower mode (confidence ≥ 0.9)...
        for i in 0..20 {
            let (t, p) = judged("pi-01", &format!("run-a{i}"), 9);
            db.ingest(&t, &p).unwrap();
        }
        let high = db.trace_stats().unwrap()[0].confidence;
        assert!(
            high >= tracefleet::confidence::AUTONOMY_CONFIDENCE,
            "{high}"
        );
        // ...but two of three devices repeat too few reference answers.
        for (device, agreements) in [("pi-02", 4), ("pi-03", 5)] {
            let (t, p) = judged(device, &format!("run-{device}"), agreements);
            db.ingest(&t, &p).unwrap();
        }
        let held = db.trace_stats().unwrap()[0].confidence;
        assert!(
            held <= tracefleet::confidence::LOW_FIDELITY_CAP,
            "{held}: held under the threshold"
        );
        let rows = db.fidelity().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows.iter()
                .map(|r| (r.device_id.as_str(), r.agreements, r.passes()))
                .collect::<Vec<_>>(),
            vec![("pi-01", 9, true), ("pi-02", 4, false), ("pi-03", 5, false)]
        );
        // The latest measurement of a device replaces its earlier one.
        let (t, p) = judged("pi-02", "run-pi-02-b", 10);
        db.ingest(&t, &p).unwrap();
        assert_eq!(db.fidelity().unwrap()[1].agreements, 10);
    }

    #[test]
    fn refused_messages_are_counted_per_device_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&dir.path().join("l.db")).unwrap();
        let reports = Topic::Reports("pi-01".into()).name();
        let huge = vec![wire::WIRE_FORMAT_VERSION; wire::MAX_MESSAGE_BYTES + 1];
        let (_, good) = report("pi-01", "run-1", true);
        let batch: [(&str, &[u8]); 6] = [
            (&reports, &huge),
            (&reports, &huge),
            (&reports, &[0xff; 9]),
            (&Topic::Commands("pi-01".into()).name(), &[1]),
            ("tracefleet/v1/devices/pi\u{1b}/reports", &[1]),
            (&reports, &good),
        ];
        let results = db.ingest_batch(&batch).unwrap();
        assert!(matches!(results[5], Ok(Ingested::Report(_))));
        let e = results[0].as_ref().unwrap_err();
        assert_eq!(e.kind(), "too_large");
        let counts: Vec<_> = db
            .refused_messages()
            .unwrap()
            .into_iter()
            .map(|r| (r.device_id, r.kind, r.count))
            .collect();
        let row = |d: &str, k: &str, n| (d.to_owned(), k.to_owned(), n);
        assert_eq!(
            counts,
            [
                row("", "malformed", 1),
                row("pi-01", "malformed", 1),
                row("pi-01", "not_for_us", 1),
                row("pi-01", "too_large", 2),
            ]
        );
        let too_large = &db.refused_messages().unwrap()[3];
        assert_eq!(too_large.last_topic, reports);
        assert!(
            too_large
                .last_detail
                .contains(&format!("payload of {} bytes", wire::MAX_MESSAGE_BYTES + 1)),
            "{}",
            too_large.last_detail
        );
        assert_eq!(db.runs().unwrap().len(), 1);
    }

    #[test]
    fn a_devices_identity_is_kept_from_its_heartbeats() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&dir.path().join("l.db")).unwrap();
        let beat = |recipient: Option<String>| {
            let hb = Heartbeat {
                device_id: "pi-01".parse().unwrap(),
                sent_at: 1,
                follower_version: "0".into(),
                groups: vec!["lab".into()],
                installed: vec![],
                running: vec![],
                telemetry: tracefleet::report::Telemetry::default(),
                recipient,
            };
            (Topic::Heartbeat("pi-01".into()).name(), wire::encode(&hb))
        };
        let recipient = |db: &LearnerDb| db.devices().unwrap()[0].recipient.clone();
        let first = tracefleet::confidential::Identity::generate()
            .recipient()
            .to_string();
        let (t, p) = beat(Some(first.clone()));
        db.ingest(&t, &p).unwrap();
        assert_eq!(recipient(&db), Some(first.clone()));
        assert_eq!(
            db.device_groups().unwrap()[0].recipient,
            Some(first.clone())
        );
        // A heartbeat without one (an older follower) keeps what is known.
        let (t, p) = beat(None);
        db.ingest(&t, &p).unwrap();
        assert_eq!(recipient(&db), Some(first));
        // A new identity replaces it.
        let second = tracefleet::confidential::Identity::generate()
            .recipient()
            .to_string();
        let (t, p) = beat(Some(second.clone()));
        db.ingest(&t, &p).unwrap();
        assert_eq!(recipient(&db), Some(second.clone()));
        // One that is not a recipient is refused and changes nothing.
        let (t, p) = beat(Some("age1forged".into()));
        assert!(db.ingest(&t, &p).is_err());
        assert_eq!(recipient(&db), Some(second));
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
        one.put_installed("pi-01", "t", "1.0.0");
        let singly: Vec<_> = borrowed
            .iter()
            .map(|(t, p)| one.ingest(t, p).map_err(|e| e.to_string()))
            .collect();
        let mut batched = LearnerDb::open(&dir.path().join("batch.db")).unwrap();
        batched.put_installed("pi-01", "t", "1.0.0");
        // Two batches, the second starting inside the first one's run ids' statistics.
        let mut together = batched.ingest_batch(&borrowed[..25]).unwrap();
        together.extend(batched.ingest_batch(&borrowed[25..]).unwrap());
        let together: Vec<_> = together
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();

        assert_eq!(together, singly);
        // Ids a device made up to reach a path or a terminal are refused, not stored.
        for (run, trace) in [
            ("../../etc/passwd", "t"),
            ("r", "t\u{1b}[31m"),
            ("r", "t\u{202e}x"),
        ] {
            let mut r = synthetic_report("pi-01", run, trace, "1.0.0", true);
            r.run_id = run.to_owned();
            let m = ReportMessage {
                run_id: run.to_owned(),
                report_json: serde_json::to_string(&r).unwrap(),
            };
            let e = one
                .ingest(&Topic::Reports("pi-01".into()).name(), &wire::encode(&m))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("run id") || e.contains("invalid trace id"),
                "{e}"
            );
        }
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

    #[test]
    fn reports_count_only_once_the_device_has_the_version_installed() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&dir.path().join("l.db")).unwrap();
        // A device sends successes of a version it was never sent and never acked: kept for
        // the record, counted nowhere.
        for i in 0..5 {
            let (t, p) = report("pi-01", &format!("fake-{i}"), true);
            assert!(matches!(db.ingest(&t, &p).unwrap(), Ingested::Report(_)));
        }
        assert!(stats(&db).is_empty(), "{:?}", stats(&db));
        let runs = db.runs().unwrap();
        assert_eq!(runs.len(), 5);
        assert!(runs.iter().all(|r| !r.counted));
        // A heartbeat listing another version changes nothing.
        let heartbeat = |version: &str| {
            let hb = Heartbeat {
                device_id: "pi-01".parse().unwrap(),
                sent_at: 1,
                follower_version: "0".into(),
                groups: vec![],
                installed: vec![wire::InstalledTrace {
                    trace_id: "t".into(),
                    version: version.into(),
                }],
                running: vec![],
                telemetry: tracefleet::report::Telemetry::default(),
                recipient: None,
            };
            (Topic::Heartbeat("pi-01".into()).name(), wire::encode(&hb))
        };
        let (t, p) = heartbeat("0.9.0");
        db.ingest(&t, &p).unwrap();
        assert!(stats(&db).is_empty(), "{:?}", stats(&db));
        // Its heartbeat lists the version installed (a USB bundle, say, whose queued reports
        // arrived before the heartbeat): the waiting reports count now, and later ones too.
        let (t, p) = heartbeat("1.0.0");
        db.ingest(&t, &p).unwrap();
        assert_eq!(
            stats(&db).iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
            [(5, 5)]
        );
        assert!(db.runs().unwrap().iter().all(|r| r.counted));
        // Listed again in the next heartbeat: nothing counts twice.
        db.ingest(&t, &p).unwrap();
        let (t, p) = report("pi-01", "real-1", true);
        db.ingest(&t, &p).unwrap();
        assert_eq!(
            stats(&db).iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
            [(6, 6)]
        );
        // Another device's ack counts its own runs, not anybody else's.
        db.put_installed("pi-02", "t", "1.0.0");
        let (t, p) = report("pi-02", "real-2", false);
        db.ingest(&t, &p).unwrap();
        let (t, p) = report("pi-03", "fake-3", false);
        db.ingest(&t, &p).unwrap();
        assert_eq!(
            stats(&db).iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
            [(7, 6)]
        );
    }
}
