//! What `learner serve` does every second besides ingesting — the leader's duties — as
//! decisions: [`Duties::tick`] takes the database and `now` and returns the messages to
//! publish. It renews (or takes) the lease (only the holder drives rollouts, the watchdog
//! and regeneration), republishes every rollout's waves when it becomes the leader, starts
//! due regenerations, advances the rollouts ([`crate::rollout::tick`]) and turns the stuck-run
//! watchdog's interventions ([`crate::stuck::check`]) into signed commands. The event loop
//! ([`super`]) publishes what it returns.

use crate::db::LearnerDb;
use crate::stuck::{Intervention, StuckConfig};
use tracefleet::signed::SecretKey;
use tracefleet::wire::{self, Topic};

/// A message to publish with QoS 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Topic.
    pub topic: String,
    /// Payload (empty and retained: withdraw the retained message).
    pub payload: Vec<u8>,
    /// Retained (rollout waves) or not (commands).
    pub retain: bool,
}

/// How long a watchdog command stays valid, seconds.
const COMMAND_LIFETIME_SECS: u64 = 600;

/// The leader's duties and whether this instance leads.
pub struct Duties {
    client_id: String,
    stuck: StuckConfig,
    commands_key: Option<SecretKey>,
    regenerations: Option<crate::regen::auto::Runner>,
    audit: Option<crate::audit::AuditLog>,
    leader: bool,
}

impl Duties {
    /// Duties of the `serve` instance `client_id` (the lease holder's name); without a
    /// `commands_key` stuck runs are only recorded, without a `Runner` nothing regenerates.
    #[must_use]
    pub fn new(
        client_id: &str,
        stuck: StuckConfig,
        commands_key: Option<SecretKey>,
        regenerations: Option<crate::regen::auto::Runner>,
    ) -> Self {
        Duties {
            client_id: client_id.to_owned(),
            stuck,
            commands_key,
            regenerations,
            audit: None,
            leader: false,
        }
    }

    /// Records the watchdog's commands and the rollouts' waves, halts, withdrawals and
    /// completions in `audit` (regenerations are recorded by the `Runner`).
    #[must_use]
    pub fn with_audit(mut self, audit: Option<crate::audit::AuditLog>) -> Self {
        self.audit = audit;
        self
    }

    /// Whether this instance led at its last tick.
    #[must_use]
    pub fn leads(&self) -> bool {
        self.leader
    }

    /// One second's work; returns what to publish, in order.
    pub fn tick(&mut self, db: &mut LearnerDb, now: i64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let leads = match db.lead(&self.client_id, now) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "lease");
                false
            }
        };
        if leads != self.leader {
            tracing::info!(
                leader = leads,
                "lead of rollouts, watchdog and regeneration"
            );
            self.leader = leads;
            if leads {
                // Taking over: publish every running rollout's waves again.
                out.extend(rollouts(db, now, true, self.audit.as_ref()));
            }
        }
        if !self.leader {
            return out;
        }
        if let Some(r) = &mut self.regenerations {
            r.tick(db, now);
        }
        out.extend(rollouts(db, now, false, self.audit.as_ref()));
        match crate::stuck::check(db, now, self.stuck.min_after, self.stuck.grace) {
            Ok(interventions) => {
                for i in interventions {
                    out.extend(self.intervention(db, i, now));
                }
            }
            Err(e) => tracing::error!(error = %e, "stuck runs"),
        }
        out
    }

    /// On every (re)connection: when this instance leads, every rollout's waves again (the
    /// broker may have lost its retained messages).
    pub fn on_connect(&self, db: &LearnerDb, now: i64) -> Vec<Outgoing> {
        if self.leader {
            rollouts(db, now, true, self.audit.as_ref())
        } else {
            Vec::new()
        }
    }

    /// A watchdog's abort or kill, signed (only logged without a command key).
    fn intervention(&self, db: &mut LearnerDb, i: Intervention, now: i64) -> Option<Outgoing> {
        let Some(key) = &self.commands_key else {
            tracing::warn!(device = %i.device_id, run = %i.run_id, action = ?i.action, "stuck run: no [stuck] commands_key, so nothing is sent");
            return None;
        };
        let counter = match db.next_command_counter(&i.device_id) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "command counter");
                return None;
            }
        };
        let now = u64::try_from(now).unwrap_or(0);
        let command = wire::Command {
            device_id: i.device_id.clone(),
            counter,
            issued_at: now,
            expires_at: now + COMMAND_LIFETIME_SECS,
            action: i.action,
        };
        if let Some(audit) = &self.audit {
            let verb = match &command.action {
                wire::Action::Kill(_) => "kill",
                _ => "abort",
            };
            let detail = serde_json::json!({
                "run": i.run_id,
                "counter": counter,
                "expires_at": command.expires_at,
                "reason": "stuck run (the watchdog)",
            });
            if let Err(e) = audit.append(&format!("command {verb}"), i.device_id.as_str(), detail) {
                tracing::error!(error = %format!("{e:#}"), "the watchdog's command is sent but could not be recorded in the audit log");
            }
        }
        Some(Outgoing {
            topic: Topic::Commands(i.device_id.into()).name(),
            payload: wire::encode(&wire::sign_command(&command, &[key])),
            retain: false,
        })
    }
}

/// Advances the rollouts: what they release or withdraw (retained). Each wave published,
/// halt, withdrawal and completion goes into `audit`.
fn rollouts(
    db: &LearnerDb,
    now: i64,
    republish: bool,
    audit: Option<&crate::audit::AuditLog>,
) -> Vec<Outgoing> {
    match crate::rollout::tick(db, now, republish) {
        Ok(ticked) => {
            for c in ticked.changes {
                let subject = format!("{} {}", c.trace_id, c.version);
                if let Some(audit) = audit
                    && let Err(e) = audit.append(c.action, &subject, c.detail)
                {
                    tracing::error!(error = %format!("{e:#}"), action = c.action, %subject, "a rollout moved on but could not be recorded in the audit log");
                }
            }
            ticked
                .publishes
                .into_iter()
                .map(|p| Outgoing {
                    topic: p.topic,
                    payload: p.payload,
                    retain: true,
                })
                .collect()
        }
        Err(e) => {
            tracing::error!(error = %e, "rollouts");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Plan, Wave};

    fn rollout(db: &mut LearnerDb, waves: &[Wave]) {
        crate::rollout::start(
            db,
            &Plan {
                trace_id: "t",
                version: "1.0.0",
                signed: b"signed",
                waves,
                max_failure_rate: 0.2,
                min_runs: 1,
            },
            0,
        )
        .unwrap();
    }

    #[test]
    fn only_the_lease_holder_publishes_and_a_new_leader_republishes_what_was_published() {
        let d = tempfile::tempdir().unwrap();
        let mut db = LearnerDb::open(&d.path().join("l.db")).unwrap();
        // Two waves of groups no device is known in: each passes as soon as it is looked at.
        rollout(
            &mut db,
            &[Wave::Group("lab".into()), Wave::Group("*".into())],
        );
        let mut a = Duties::new("a", StuckConfig::default(), None, None);
        let mut b = Duties::new("b", StuckConfig::default(), None, None);
        let lab = Outgoing {
            topic: Topic::GroupTrace("lab".into(), "t".into()).name(),
            payload: b"signed".to_vec(),
            retain: true,
        };
        let fleet = Outgoing {
            topic: Topic::FleetTrace("t".into()).name(),
            payload: b"signed".to_vec(),
            retain: true,
        };
        // Taking the lead republishes (nothing yet) and advances twice: the first wave goes
        // out, and passes at once (no device known in it), so the second goes out too.
        assert_eq!(a.tick(&mut db, 100), vec![lab.clone(), fleet.clone()]);
        assert!(a.leads());
        assert_eq!(b.tick(&mut db, 101), vec![], "a holds the lease");
        assert!(!b.leads());
        assert_eq!(b.on_connect(&db, 101), vec![]);
        // A reconnection republishes what was published (and the rollout moves on: done).
        assert_eq!(a.on_connect(&db, 101), vec![lab.clone(), fleet.clone()]);
        assert_eq!(crate::rollout::list(&db).unwrap()[0].state, "done");
        assert_eq!(a.tick(&mut db, 102), vec![]);
        // a dies; b takes over once the lease ran out and republishes the waves.
        let later = 102 + crate::db::LEASE_SECS + 1;
        assert_eq!(b.tick(&mut db, later), vec![lab.clone(), fleet.clone()]);
        assert!(b.leads());
        assert_eq!(b.tick(&mut db, later + 1), vec![]);
        assert_eq!(a.tick(&mut db, later + 2), vec![], "a lost the lead");
        assert!(!a.leads());
    }
}
