//! Stuck runs: a device whose run goes on past its expected time is sent `abort`, then
//! `kill`, and the learner records it for a human. The decisions only: the records are
//! [`crate::db`]'s, the commands are signed and sent by `serve` ([`crate::serve::duties`]).
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
    pub device_id: tracefleet::ids::DeviceId,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracefleet::wire::{self, Heartbeat, ReportMessage, RunningRun, Topic};

    const MIN_AFTER: Duration = Duration::from_secs(600);
    const GRACE: Duration = Duration::from_secs(30);

    fn heartbeat(db: &mut LearnerDb, device: &str, running: &[(&str, &str, u64)]) {
        let hb = Heartbeat {
            device_id: device.parse().unwrap(),
            sent_at: 0,
            follower_version: "0".into(),
            groups: vec![],
            installed: vec![],
            running: running
                .iter()
                .map(|(run, trace, started)| RunningRun {
                    run_id: (*run).into(),
                    trace_id: (*trace).into(),
                    started_at: *started,
                })
                .collect(),
            telemetry: tracefleet::report::Telemetry::default(),
            recipient: None,
        };
        db.ingest(&Topic::Heartbeat(device.into()).name(), &wire::encode(&hb))
            .unwrap();
    }

    fn success(db: &mut LearnerDb, run: &str, trace: &str, secs: f64) {
        let mut r = crate::simulate::synthetic_report("pi-09", run, trace, "1.0.0", true);
        r.execution_time_secs = secs;
        let m = ReportMessage {
            run_id: run.into(),
            report_json: serde_json::to_string(&r).unwrap(),
        };
        db.ingest(&Topic::Reports("pi-09".into()).name(), &wire::encode(&m))
            .unwrap();
    }

    fn actions(db: &LearnerDb, now: i64) -> Vec<(String, Action)> {
        check(db, now, MIN_AFTER, GRACE)
            .unwrap()
            .into_iter()
            .map(|i| (i.device_id.into(), i.action))
            .collect()
    }

    #[test]
    fn a_run_past_its_time_gets_abort_then_kill_after_the_grace_and_an_escalation_once() {
        let d = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&d.path().join("l.db")).unwrap();
        heartbeat(&mut db, "pi-01", &[("r1", "t", 1000)]);
        // Within min_after: nothing.
        assert_eq!(actions(&db, 1600), vec![]);
        let abort = vec![("pi-01".to_owned(), Action::Abort(Some("r1".into())))];
        assert_eq!(actions(&db, 1601), abort);
        // Stored: not sent twice, not even by a restarted learner, before the grace is over.
        assert_eq!(actions(&db, 1631), vec![]);
        assert!(db.escalations().unwrap().is_empty());
        let kill = vec![("pi-01".to_owned(), Action::Kill(Some("r1".into())))];
        assert_eq!(actions(&db, 1632), kill);
        let e = db.escalations().unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].trace_id.as_str(), e[0].run_id.as_deref()),
            ("t", Some("r1"))
        );
        assert!(
            e[0].reason
                .starts_with("stuck: the run went on 632 s (expected at most 600 s)")
        );
        // After the kill the watchdog has nothing more to send.
        assert_eq!(actions(&db, 5000), vec![]);
        assert_eq!(db.escalations().unwrap().len(), 1);
    }

    #[test]
    fn the_expected_time_is_three_times_the_longest_successful_run_when_that_is_longer() {
        let d = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&d.path().join("l.db")).unwrap();
        success(&mut db, "ok-1", "slow", 300.0);
        success(&mut db, "ok-2", "slow", 100.0);
        heartbeat(&mut db, "pi-01", &[("r1", "slow", 0), ("r2", "fast", 0)]);
        // "fast" has no successful run: min_after counts; "slow": 3 × 300 s.
        let at = |now| {
            actions(&db, now)
                .into_iter()
                .map(|(_, a)| a)
                .collect::<Vec<_>>()
        };
        assert_eq!(at(601), vec![Action::Abort(Some("r2".into()))]);
        // r1 is not late at 900 s (r2, aborted at 601 s, gets its kill).
        assert_eq!(at(900), vec![Action::Kill(Some("r2".into()))]);
        assert_eq!(at(901), vec![Action::Abort(Some("r1".into()))]);
    }

    #[test]
    fn runs_of_offline_devices_are_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&d.path().join("l.db")).unwrap();
        heartbeat(&mut db, "pi-01", &[("r1", "t", 0)]);
        let offline = wire::Status {
            online: false,
            at: 1,
        };
        db.ingest(
            &Topic::Status("pi-01".into()).name(),
            &wire::encode(&offline),
        )
        .unwrap();
        assert_eq!(actions(&db, 100_000), vec![]);
    }
}
