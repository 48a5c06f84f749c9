//! Per-version statistics (LLMunix confidence rule) and escalations; an escalation also
//! enters the outbox when the device is enrolled, in the same transaction.

use super::*;

impl Store {
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
        if let Some(device_id) = enrolled(&tx)?.and_then(|d| d.parse().ok()) {
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
