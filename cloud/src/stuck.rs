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

use crate::db::LearnerDb;
use std::time::Duration;
use tracefleet::wire::Action;

/// The `[stuck]` table of `learner.toml`, resolved ([`crate::config`] parses it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckConfig {
    /// The secret command-signing key `serve` signs abort and kill with; without it, stuck
    /// runs are only recorded.
    pub commands_key: Option<std::path::PathBuf>,
    /// Shortest time a run may take before it counts as stuck (default 10 min).
    pub min_after: Duration,
    /// Time between abort and kill, and between kill and giving up (default 30 s).
    pub grace: Duration,
}

impl Default for StuckConfig {
    fn default() -> Self {
        StuckConfig {
            commands_key: None,
            min_after: Duration::from_secs(600),
            grace: Duration::from_secs(30),
        }
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
/// On database failure.
pub fn check(
    db: &LearnerDb,
    now: i64,
    min_after: Duration,
    grace: Duration,
) -> crate::db::Result<Vec<Intervention>> {
    let mut out = Vec::new();
    let grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    for (device, running) in db.running_runs()? {
        for run in running {
            let started = i64::try_from(run.started_at).unwrap_or(i64::MAX);
            let longest = db.longest_success_secs(&run.trace_id)?;
            #[allow(clippy::cast_possible_truncation)]
            let expected = i64::try_from(min_after.as_secs())
                .unwrap_or(i64::MAX)
                .max(longest.map_or(0, |l| (l * 3.0).ceil() as i64));
            if now - started <= expected {
                continue;
            }
            let next = match db.stuck_stage(&run.run_id)? {
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
            db.set_stuck_stage(&run.run_id, &device, &run.trace_id, stage, now)?;
            if stage == "kill_sent" {
                db.add_escalation(
                    &device,
                    &run.trace_id,
                    Some(&run.run_id),
                    &format!(
                        "stuck: the run went on {} s (expected at most {expected} s) and did not end on abort; killed (resumable on the device with `follower resume`)",
                        now - started
                    ),
                    now,
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
