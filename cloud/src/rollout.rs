//! Staged rollouts (DESIGN.md, "Learner"): a signed trace version goes out wave by wave, each
//! wave a device group (`*` = the whole fleet), published retained on the group's trace topic.
//!
//! `learner rollout start` records the rollout; `learner serve` drives it ([`tick`]): it
//! publishes the first wave, and moves to the next only when every device known in the
//! current wave (from heartbeats) has acknowledged the version and the wave has reported at
//! least `min_runs` runs of it. Over all runs of the version so far, a failure rate above
//! `max_failure_rate` (once `min_runs` runs are in) halts the rollout before its next wave and
//! withdraws the retained trace from the waves it reached (devices that installed it keep it
//! until a newer version — a roll-forward — arrives: versions never go backwards). A wave with
//! no known device passes at once.

use rusqlite::{Connection, OptionalExtension, params};

/// The whole fleet, as a wave.
pub const FLEET: &str = "*";

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rollout {
    /// Row id.
    pub id: i64,
    /// Trace id.
    pub trace_id: String,
    /// Version rolled out.
    pub version: String,
    /// Groups in order (`*` = the whole fleet).
    pub waves: Vec<String>,
    /// Index of the last wave published (-1: none yet).
    pub wave: i64,
    /// `running`, `halted`, `done`, `aborting` (asked to stop; serve withdraws it),
    /// `aborted` or `superseded`.
    pub state: String,
    /// Failure rate above which the rollout halts.
    pub max_failure_rate: f64,
    /// Runs needed per wave to go on, and before the failure rate counts.
    pub min_runs: i64,
    /// Why it halted or stopped.
    pub reason: String,
    /// Runs of this version reported so far, and how many failed.
    pub runs: i64,
    /// Failed runs of this version.
    pub failures: i64,
}

/// Parses `failure-rate>X over N runs` (X in 0..1).
///
/// # Errors
/// A message saying what was expected.
pub fn parse_abort_if(s: &str) -> Result<(f64, u32), String> {
    let bad = || {
        format!(
            "--abort-if {s:?}: expected `failure-rate>X over N runs` (X between 0 and 1, N ≥ 1)"
        )
    };
    let rest = s.trim().strip_prefix("failure-rate>").ok_or_else(bad)?;
    let (rate, runs) = rest.split_once(" over ").ok_or_else(bad)?;
    let rate: f64 = rate.trim().parse().map_err(|_| bad())?;
    let runs = runs.trim();
    let runs = runs
        .strip_suffix("runs")
        .or_else(|| runs.strip_suffix("run"))
        .unwrap_or(runs)
        .trim();
    let runs: u32 = runs.parse().map_err(|_| bad())?;
    if !(0.0..=1.0).contains(&rate) || runs == 0 {
        return Err(bad());
    }
    Ok((rate, runs))
}

/// The topic of a wave for a trace.
#[must_use]
pub fn wave_topic(group: &str, trace_id: &str) -> String {
    if group == FLEET {
        tracefleet::wire::Topic::FleetTrace(trace_id.to_owned()).name()
    } else {
        tracefleet::wire::Topic::GroupTrace(group.to_owned(), trace_id.to_owned()).name()
    }
}

/// What `learner rollout start` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<'a> {
    /// Trace id.
    pub trace_id: &'a str,
    /// Version.
    pub version: &'a str,
    /// The signed trace file.
    pub signed: &'a [u8],
    /// Groups in order (`*` = the whole fleet).
    pub waves: &'a [String],
    /// Failure rate above which the rollout halts.
    pub max_failure_rate: f64,
    /// Runs each wave must report, and before the failure rate counts.
    pub min_runs: u32,
}

/// Records a new rollout (superseding a running one of the same trace).
///
/// # Errors
/// On SQLite failure.
pub fn start(conn: &mut Connection, plan: &Plan<'_>, now: i64) -> rusqlite::Result<i64> {
    let tx = conn.transaction()?;
    tx.execute(
        "UPDATE rollouts SET state = 'superseded', reason = 'a newer rollout of this trace started', updated_at = ?2
         WHERE trace_id = ?1 AND state = 'running'",
        params![plan.trace_id, now],
    )?;
    tx.execute(
        "INSERT INTO rollouts (trace_id, version, signed, waves_json, wave, state, max_failure_rate, min_runs, reason, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, -1, 'running', ?5, ?6, '', ?7, ?7)",
        params![
            plan.trace_id,
            plan.version,
            plan.signed,
            serde_json::to_string(plan.waves).unwrap_or_default(),
            plan.max_failure_rate,
            plan.min_runs,
            now
        ],
    )?;
    let id = tx.last_insert_rowid();
    tx.commit()?;
    Ok(id)
}

/// Asks `learner serve` to stop the running rollout of `trace_id` and withdraw it.
///
/// # Errors
/// On SQLite failure; `Ok(false)` when none is running.
pub fn abort(conn: &Connection, trace_id: &str, now: i64) -> rusqlite::Result<bool> {
    Ok(conn.execute(
        "UPDATE rollouts SET state = 'aborting', reason = 'aborted by an operator', updated_at = ?2
         WHERE trace_id = ?1 AND state IN ('running', 'halted')",
        params![trace_id, now],
    )? > 0)
}

/// Every rollout, newest first, with its run counts.
///
/// # Errors
/// On SQLite failure.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<Rollout>> {
    let mut s = conn.prepare(
        "SELECT r.id, r.trace_id, r.version, r.waves_json, r.wave, r.state, r.max_failure_rate, r.min_runs, r.reason,
           (SELECT COUNT(*) FROM runs x WHERE x.trace_id = r.trace_id AND x.trace_version = r.version AND x.status != 'stopped'),
           (SELECT COUNT(*) FROM runs x WHERE x.trace_id = r.trace_id AND x.trace_version = r.version AND x.status = 'failed')
         FROM rollouts r ORDER BY r.id DESC",
    )?;
    let rows = s.query_map([], |r| {
        Ok(Rollout {
            id: r.get(0)?,
            trace_id: r.get(1)?,
            version: r.get(2)?,
            waves: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
            wave: r.get(4)?,
            state: r.get(5)?,
            max_failure_rate: r.get(6)?,
            min_runs: r.get(7)?,
            reason: r.get(8)?,
            runs: r.get(9)?,
            failures: r.get(10)?,
        })
    })?;
    rows.collect()
}

/// A message the engine wants published (QoS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic.
    pub topic: String,
    /// Payload (empty: withdraw the retained message).
    pub payload: Vec<u8>,
}

/// Devices known (from heartbeats) to belong to `group`.
fn wave_devices(conn: &Connection, group: &str) -> rusqlite::Result<Vec<String>> {
    let mut s = conn.prepare_cached("SELECT device_id, groups_json FROM devices")?;
    let rows = s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, groups) = row?;
        let groups: Vec<String> = serde_json::from_str(&groups).unwrap_or_default();
        if group == FLEET || groups.iter().any(|g| g == group) {
            out.push(id);
        }
    }
    Ok(out)
}

/// Advances every rollout one step; returns what to publish. `republish` also returns the
/// retained messages of every wave already published (after a reconnect: the broker may
/// have lost them).
///
/// # Errors
/// On SQLite failure.
pub fn tick(conn: &Connection, now: i64, republish: bool) -> rusqlite::Result<Vec<Publish>> {
    let mut out = Vec::new();
    for r in list(conn)? {
        let published = usize::try_from(r.wave + 1).unwrap_or(0).min(r.waves.len());
        let reached = &r.waves[..published];
        let set = |state: &str, wave: i64, reason: &str| {
            conn.execute(
                "UPDATE rollouts SET state = ?2, wave = ?3, reason = ?4, updated_at = ?5 WHERE id = ?1",
                params![r.id, state, wave, reason, now],
            )
        };
        match r.state.as_str() {
            "aborting" => {
                out.extend(reached.iter().map(|g| Publish {
                    topic: wave_topic(g, &r.trace_id),
                    payload: Vec::new(),
                }));
                set("aborted", r.wave, &r.reason)?;
                continue;
            }
            "running" => {}
            "done" if republish => {}
            _ => continue,
        }
        // Loaded only for a rollout that may publish it (up to 1 MiB, every second).
        let signed: Vec<u8> =
            conn.query_row("SELECT signed FROM rollouts WHERE id = ?1", [r.id], |x| {
                x.get(0)
            })?;
        if republish {
            out.extend(reached.iter().map(|g| Publish {
                topic: wave_topic(g, &r.trace_id),
                payload: signed.clone(),
            }));
        }
        if r.state == "done" {
            continue;
        }
        // The abort criterion, over every run of this version so far.
        if r.runs >= r.min_runs && r.runs > 0 {
            #[allow(clippy::cast_precision_loss)]
            let rate = r.failures as f64 / r.runs as f64;
            if rate > r.max_failure_rate {
                let reason = format!(
                    "failure rate {rate:.2} over {} runs (more than {:.2}) after wave {} ({}): halted before the next wave",
                    r.runs,
                    r.max_failure_rate,
                    r.wave + 1,
                    reached.last().map_or("-", String::as_str)
                );
                tracing::warn!(trace = %r.trace_id, version = %r.version, %reason, "rollout halted");
                out.extend(reached.iter().map(|g| Publish {
                    topic: wave_topic(g, &r.trace_id),
                    payload: Vec::new(),
                }));
                set("halted", r.wave, &reason)?;
                continue;
            }
        }
        let next = if r.wave < 0 {
            0
        } else {
            let group = &r.waves[published - 1];
            let devices = wave_devices(conn, group)?;
            let mut acked = 0usize;
            let mut runs = 0i64;
            for d in &devices {
                let ok: Option<String> = conn
                    .query_row(
                        "SELECT outcome FROM acks WHERE device_id = ?1 AND trace_id = ?2 AND version = ?3",
                        params![d, r.trace_id, r.version],
                        |x| x.get(0),
                    )
                    .optional()?;
                acked += usize::from(matches!(
                    ok.as_deref(),
                    Some("installed" | "already_installed")
                ));
                runs += conn.query_row(
                    "SELECT COUNT(*) FROM runs WHERE device_id = ?1 AND trace_id = ?2 AND trace_version = ?3 AND status != 'stopped'",
                    params![d, r.trace_id, r.version],
                    |x| x.get::<_, i64>(0),
                )?;
            }
            let passed = devices.is_empty() || (acked == devices.len() && runs >= r.min_runs);
            if !passed {
                continue;
            }
            published
        };
        if next >= r.waves.len() {
            tracing::info!(trace = %r.trace_id, version = %r.version, "rollout done");
            set("done", r.wave, "")?;
            continue;
        }
        tracing::info!(trace = %r.trace_id, version = %r.version, wave = %r.waves[next], "rollout: publishing the next wave");
        out.push(Publish {
            topic: wave_topic(&r.waves[next], &r.trace_id),
            payload: signed,
        });
        set("running", i64::try_from(next).unwrap_or(0), "")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_criteria_parse_or_say_what_is_expected() {
        assert_eq!(parse_abort_if("failure-rate>0.2 over 5 runs"), Ok((0.2, 5)));
        assert_eq!(parse_abort_if("failure-rate>0 over 1 run"), Ok((0.0, 1)));
        for bad in [
            "failure-rate>2 over 5 runs",
            "failure-rate>0.2 over 0 runs",
            "failure-rate<0.2 over 5 runs",
            "0.2 over 5",
            "failure-rate>x over 5 runs",
        ] {
            assert!(
                parse_abort_if(bad).unwrap_err().contains("expected"),
                "{bad}"
            );
        }
    }
}
