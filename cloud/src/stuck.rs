//! Stuck runs: a device whose run goes on past its expected time is sent `abort`, then
//! `kill`, and the learner records it for a human (DESIGN.md, "Learner"; issue: stuck-step
//! handling).
//!
//! The running runs come from the devices' heartbeats. A run's expected time is the larger of
//! the configured minimum (`[stuck] min_after`, default 10 min) and three times the longest
//! successful run of the same trace the fleet has reported. `learner serve` checks every
//! second ([`check`]): past the expected time it sends `abort` for the run; if the run is
//! still in the device's heartbeat `grace` later, `kill`, and records an escalation. Each step
//! is stored (`stuck_runs`), so a restarted learner does not send them twice.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use std::time::Duration;
use tracefleet::wire::{Action, RunningRun};

/// The `[stuck]` table of `learner.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StuckConfig {
    /// The secret command-signing key `serve` signs abort and kill with; without it, stuck
    /// runs are only recorded.
    pub commands_key: Option<std::path::PathBuf>,
    /// Shortest time a run may take before it counts as stuck (humantime, default `10m`).
    #[serde(default = "default_min_after")]
    pub min_after: String,
    /// Time between abort and kill, and between kill and giving up (default `30s`).
    #[serde(default = "default_grace")]
    pub grace: String,
}

fn default_min_after() -> String {
    "10m".into()
}
fn default_grace() -> String {
    "30s".into()
}

impl Default for StuckConfig {
    fn default() -> Self {
        StuckConfig {
            commands_key: None,
            min_after: default_min_after(),
            grace: default_grace(),
        }
    }
}

impl StuckConfig {
    /// (`min_after`, `grace`).
    ///
    /// # Errors
    /// A message naming the bad duration.
    pub fn durations(&self) -> Result<(Duration, Duration), String> {
        let p = |what: &str, v: &str| {
            humantime::parse_duration(v).map_err(|e| format!("[stuck] {what} {v:?}: {e}"))
        };
        Ok((p("min_after", &self.min_after)?, p("grace", &self.grace)?))
    }
}

/// What the watchdog wants done about a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intervention {
    /// The device.
    pub device_id: String,
    /// The run.
    pub run_id: String,
    /// `Abort` or `Kill` of the run.
    pub action: Action,
}

/// Checks every online device's running runs; returns the commands to send (and records
/// them, and the escalation when it comes to killing).
///
/// # Errors
/// On SQLite failure.
pub fn check(
    conn: &Connection,
    now: i64,
    min_after: Duration,
    grace: Duration,
) -> rusqlite::Result<Vec<Intervention>> {
    let mut out = Vec::new();
    let mut devices = conn.prepare_cached(
        "SELECT device_id, running_json FROM devices WHERE online = 1 AND running_json != '[]'",
    )?;
    let rows = devices.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    for row in rows {
        let (device, running) = row?;
        let running: Vec<RunningRun> = serde_json::from_str(&running).unwrap_or_default();
        for run in running {
            let started = i64::try_from(run.started_at).unwrap_or(i64::MAX);
            let longest: Option<f64> = conn
                .query_row(
                    "SELECT MAX(json_extract(report_json, '$.execution_time_secs')) FROM runs WHERE trace_id = ?1 AND status = 'success'",
                    [&run.trace_id],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            #[allow(clippy::cast_possible_truncation)]
            let expected = i64::try_from(min_after.as_secs())
                .unwrap_or(i64::MAX)
                .max(longest.map_or(0, |l| (l * 3.0).ceil() as i64));
            if now - started <= expected {
                continue;
            }
            let stage: Option<(String, i64)> = conn
                .query_row(
                    "SELECT stage, since FROM stuck_runs WHERE run_id = ?1",
                    [&run.run_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let next = match stage {
                None => Some(("abort_sent", Action::Abort(Some(run.run_id.clone())))),
                Some((s, since)) if s == "abort_sent" && now - since > grace => {
                    Some(("kill_sent", Action::Kill(Some(run.run_id.clone()))))
                }
                _ => None,
            };
            let Some((stage, action)) = next else {
                continue;
            };
            tracing::warn!(device = %device, run = %run.run_id, trace = %run.trace_id, elapsed_secs = now - started, expected_secs = expected, stage, "stuck run");
            conn.execute(
                "INSERT INTO stuck_runs (run_id, device_id, trace_id, stage, since) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (run_id) DO UPDATE SET stage = excluded.stage, since = excluded.since",
                params![run.run_id, device, run.trace_id, stage, now],
            )?;
            if stage == "kill_sent" {
                conn.execute(
                    "INSERT OR IGNORE INTO escalations (device_id, trace_id, run_id, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        device,
                        run.trace_id,
                        run.run_id,
                        format!(
                            "stuck: the run went on {} s (expected at most {expected} s) and did not end on abort; killed (resumable on the device with `follower resume`)",
                            now - started
                        ),
                        now
                    ],
                )?;
            }
            out.push(Intervention {
                device_id: device.clone(),
                run_id: run.run_id.clone(),
                action,
            });
        }
    }
    Ok(out)
}
