//! The outbox (reports, acks and escalations waiting for the broker's PUBACK) and the
//! agent's state: the enrolled device id and the last accepted command counter.

use super::*;

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

impl Store {
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
    pub fn device_id(&self) -> Result<Option<tracefleet::ids::DeviceId>, StoreError> {
        // Enrolled from a checked config; a row that no longer parses counts as none.
        Ok(enrolled(&self.conn)?.and_then(|d| d.parse().ok()))
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
}

pub(super) fn enrolled(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value FROM agent_state WHERE key = 'device_id'",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

pub(super) fn enqueue(
    conn: &Connection,
    kind: OutboxKind,
    payload: &[u8],
    now: &str,
) -> Result<i64, StoreError> {
    conn.prepare_cached("INSERT INTO outbox (kind, payload, created_at) VALUES (?1, ?2, ?3)")?
        .execute(params![kind.as_str(), payload, now])?;
    Ok(conn.last_insert_rowid())
}
