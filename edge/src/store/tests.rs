//! The store, one round trip per concern through the real SQLite file in a temporary
//! directory: trust roots and installed traces (versions never go backwards), the runs
//! journal (record, then find again for a resume), the outbox (enqueue, read in order,
//! delete on acknowledgement) and the agent's state, statistics and escalations.

use super::*;
use crate::testkit::root_file;
use tracefleet::report::{RunStatus, StepStatus};

const AT: &str = "2026-01-01T00:00:00Z";

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// A store with the test trust root 1 installed.
fn rooted() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::testkit::store_with_root(dir.path());
    (dir, store)
}

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

fn step(n: u32, status: StepStatus) -> StepResult {
    StepResult {
        step: n,
        title: format!("s{n}"),
        tool: "Bash".into(),
        status,
        attempts: u32::from(status != StepStatus::NotRun),
        output: format!("out {n}"),
        output_truncated: false,
        exit_code: Some(0),
        error: None,
        duration_secs: 0.5,
        validations: Vec::new(),
        llm: None,
        items: None,
        output_sha256: None,
        output_bytes: None,
        llm_items: Vec::new(),
    }
}

/// A finished run's report, in JSON as a follower writes it (the fields left out take their
/// defaults).
fn report(run_id: &str, status: RunStatus) -> Report {
    let steps = [step(1, StepStatus::Success), step(2, StepStatus::Success)];
    serde_json::from_value(serde_json::json!({
        "report_version": 1, "run_id": run_id, "device_id": "pi-01",
        "trace_id": "t", "trace_version": "1.0.0", "goal_signature": "g", "status": status,
        "total_steps": 2, "completed_steps": 2, "failed_step": null, "error": null,
        "started_at": AT, "finished_at": AT, "execution_time_secs": 1.0, "estimated_cost": 0.0,
        "inputs": {}, "preconditions": [], "all_preconditions_met": true, "step_results": steps,
        "all_validations_passed": true, "postconditions": [], "all_postconditions_met": true,
        "escalations": [], "prompt_tokens": 0, "completion_tokens": 0
    }))
    .unwrap()
}

/// A run of trace `t` 1.0.0 with `inputs`, from a compiled file in `/b`.
fn new_run<'a>(run_id: &'a str, inputs: &'a BTreeMap<String, String>) -> NewRun<'a> {
    NewRun {
        run_id,
        trace_id: "t",
        version: "1.0.0",
        started_at: AT,
        base_dir: "/b",
        trace_file: b"",
        signed: false,
        inputs,
    }
}

#[test]
fn a_fresh_store_is_sound_and_empty() {
    let (dir, store) = open();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert!(store.trust_root().unwrap().is_none());
    assert!(store.installed_traces().unwrap().is_empty());
    assert!(store.runs(10).unwrap().is_empty());
    assert_eq!(store.outbox_len().unwrap(), 0);
    assert!(store.device_id().unwrap().is_none());
    drop(store);
    // Opening again migrates nothing away.
    let again = Store::open(dir.path()).unwrap();
    assert_eq!(again.integrity_check().unwrap(), "ok");
}

#[test]
fn trust_roots_are_kept_newest_first_and_written_against_the_root_verified() {
    let (_dir, mut store) = open();
    let v1 = root_file(1);
    store.add_trust_roots(None, &[(1, &v1)], AT).unwrap();
    let (root, bytes) = store.trust_root().unwrap().unwrap();
    assert_eq!((root.version, bytes), (1, v1));
    // A write verified against no root (or an older one) while root 1 is stored: refused.
    let e = store
        .add_trust_roots(None, &[(2, &root_file(2))], AT)
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::RootChanged {
                expected: None,
                found: Some(1)
            }
        ),
        "{e}"
    );
    assert_eq!(store.trust_root().unwrap().unwrap().0.version, 1);
    let v2 = root_file(2);
    store.add_trust_roots(Some(1), &[(2, &v2)], AT).unwrap();
    assert_eq!(store.trust_root().unwrap().unwrap().0.version, 2);
    // A trace install verified against root 1 no longer writes.
    assert!(matches!(
        store.install_trace(Some(1), "t", v("1.0.0"), b"signed", AT),
        Err(StoreError::RootChanged { .. })
    ));
    assert!(store.installed_version("t").unwrap().is_none());
}

#[test]
fn a_stored_root_that_no_longer_decodes_is_corrupt() {
    let (_dir, store) = open();
    store
        .conn
        .execute(
            "INSERT INTO trust_roots (version, root_file, installed_at) VALUES (1, x'00', ?1)",
            [AT],
        )
        .unwrap();
    assert!(matches!(
        store.trust_root(),
        Err(StoreError::Corrupt {
            what: "trust root",
            ..
        })
    ));
}

#[test]
fn installed_trace_versions_never_go_backwards() {
    let (_dir, mut store) = rooted();
    let base = Some(1);
    store
        .install_trace(base, "t", v("1.2.0"), b"signed 1.2.0", AT)
        .unwrap();
    for (older, signed) in [("1.1.9", &b"older"[..]), ("1.2.0", &b"same"[..])] {
        let e = store
            .install_trace(base, "t", v(older), signed, AT)
            .unwrap_err();
        match e {
            StoreError::Rollback {
                trace_id,
                installed,
                offered,
            } => {
                assert_eq!(trace_id, "t");
                assert_eq!(installed, v("1.2.0"));
                assert_eq!(offered, v(older));
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!(store.installed_version("t").unwrap(), Some(v("1.2.0")));
    assert_eq!(
        store.installed_signed("t").unwrap().unwrap(),
        b"signed 1.2.0"
    );
    store
        .install_trace(base, "t", v("1.10.0"), b"signed 1.10.0", AT)
        .unwrap();
    store
        .install_trace(base, "a", v("0.1.0"), b"signed a", AT)
        .unwrap();
    let installed: Vec<(String, Version)> = store
        .installed_traces()
        .unwrap()
        .into_iter()
        .map(|(id, version, _)| (id, version))
        .collect();
    assert_eq!(
        installed,
        [("a".into(), v("0.1.0")), ("t".into(), v("1.10.0"))],
        "by id, numeric version order"
    );
    assert!(store.installed_signed("missing").unwrap().is_none());
}

#[test]
fn installing_several_traces_writes_all_or_nothing() {
    let (_dir, mut store) = rooted();
    store
        .install_trace(Some(1), "b", v("2.0.0"), b"b2", AT)
        .unwrap();
    let e = store
        .install_all(
            Some(1),
            &[],
            &[("a", v("1.0.0"), b"a1"), ("b", v("1.0.0"), b"b1")],
            AT,
            &mut || Ok(()),
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::Rollback { .. }), "{e}");
    assert!(
        store.installed_version("a").unwrap().is_none(),
        "rolled back"
    );
    // A failure placing files before the commit leaves nothing either.
    let e = store
        .install_all(
            Some(1),
            &[(2, &root_file(2))],
            &[("a", v("1.0.0"), b"a1")],
            AT,
            &mut || Err(StoreError::Files("disk full".into())),
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::Files(_)), "{e}");
    assert!(store.installed_version("a").unwrap().is_none());
    assert_eq!(store.trust_root().unwrap().unwrap().0.version, 1);
    store.log_refusal("trace", "a", "not signed", AT).unwrap();
}

#[test]
fn the_runs_journal_gives_an_unfinished_run_back_for_a_resume() {
    let (_dir, store) = open();
    let inputs = BTreeMap::from([("log".to_owned(), "/var/log/dpkg.log".to_owned())]);
    store
        .begin_run(&NewRun {
            base_dir: "/b/r1",
            trace_file: b"signed bytes",
            signed: true,
            ..new_run("r1", &inputs)
        })
        .unwrap();
    store
        .record_step_start("r1", &step(1, StepStatus::NotRun))
        .unwrap();
    store
        .record_step("r1", &step(1, StepStatus::Success), "full output 1")
        .unwrap();
    store
        .record_step_start("r1", &step(2, StepStatus::NotRun))
        .unwrap();

    let u = store.unfinished("r1").unwrap().unwrap();
    assert_eq!(
        (u.trace_id.as_str(), u.trace_version.as_str()),
        ("t", "1.0.0")
    );
    assert_eq!(u.status, "running");
    assert_eq!(u.trace_file, b"signed bytes");
    assert!(u.signed);
    assert_eq!(u.inputs, inputs);
    assert_eq!(u.base_dir, "/b/r1");
    assert_eq!(u.resumes, 0);
    assert_eq!(u.done.len(), 2);
    assert_eq!(u.done[&1].result.status, StepStatus::Success);
    assert_eq!(u.done[&1].output, "full output 1");
    assert_eq!(
        u.done[&2].result.status,
        StepStatus::NotRun,
        "started, not finished: runs again"
    );
    assert_eq!(u.done[&2].output, "");

    assert_eq!(
        store.running_like("t", "1.0.0", &inputs).unwrap(),
        ["r1"],
        "the same trace and inputs find it"
    );
    assert!(
        store
            .running_like("t", "1.0.0", &BTreeMap::new())
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.mark_resumed("r1").unwrap(), 1);
    assert_eq!(store.mark_resumed("r1").unwrap(), 2);
    assert_eq!(store.report_json("r1").unwrap(), Some(None));

    store.finish_run(&report("r1", RunStatus::Success)).unwrap();
    assert!(store.unfinished("r1").unwrap().is_none(), "finished");
    assert!(
        store
            .running_like("t", "1.0.0", &inputs)
            .unwrap()
            .is_empty()
    );
    let json = store.report_json("r1").unwrap().unwrap().unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report("r1", RunStatus::Success));
    let rows = store.runs(10).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].run_id.as_str(), rows[0].status.as_str()),
        ("r1", "success")
    );
    assert!(store.unfinished("missing").unwrap().is_none());
    assert_eq!(store.report_json("missing").unwrap(), None);
    assert_eq!(
        store.outbox_len().unwrap(),
        0,
        "not enrolled: no outbox row"
    );
}

#[test]
fn a_corrupt_journal_row_is_an_error_not_a_skipped_step() {
    let (_dir, store) = open();
    store.begin_run(&new_run("r1", &BTreeMap::new())).unwrap();
    store
        .conn
        .execute(
            "INSERT INTO run_steps (run_id, step, status, result_json) VALUES ('r1', 1, 'success', '{')",
            [],
        )
        .unwrap();
    assert!(matches!(
        store.unfinished("r1"),
        Err(StoreError::Corrupt {
            what: "run journal",
            ..
        })
    ));
}

#[test]
fn the_outbox_keeps_messages_in_order_until_deleted() {
    let (_dir, store) = open();
    let a = store.enqueue(OutboxKind::Ack, b"ack", AT).unwrap();
    let b = store.enqueue(OutboxKind::Report, b"report", AT).unwrap();
    let c = store.enqueue(OutboxKind::Escalation, b"esc", AT).unwrap();
    assert!(a < b && b < c, "ids grow");
    assert_eq!(store.outbox_len().unwrap(), 3);
    let all = store.outbox_after(0, 10).unwrap();
    assert_eq!(
        all,
        [
            OutboxMessage {
                id: a,
                kind: OutboxKind::Ack,
                payload: b"ack".to_vec()
            },
            OutboxMessage {
                id: b,
                kind: OutboxKind::Report,
                payload: b"report".to_vec()
            },
            OutboxMessage {
                id: c,
                kind: OutboxKind::Escalation,
                payload: b"esc".to_vec()
            },
        ]
    );
    let ids = |after, limit| -> Vec<i64> {
        store
            .outbox_after(after, limit)
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect()
    };
    assert_eq!(ids(a, 10), [b, c]);
    assert_eq!(ids(0, 2), [a, b]);
    store.outbox_delete(b).unwrap();
    store.outbox_delete(b).unwrap(); // twice: harmless
    assert_eq!(ids(0, 10), [a, c]);
    assert_eq!(store.outbox_len().unwrap(), 2);
    assert_eq!(
        OutboxKind::Report.topic("pi-01").name(),
        tracefleet::wire::Topic::Reports("pi-01".into()).name()
    );
    // A row of a kind this build does not know is corruption, named.
    store
        .conn
        .execute(
            "INSERT INTO outbox (kind, payload, created_at) VALUES ('gossip', x'', ?1)",
            [AT],
        )
        .unwrap();
    assert!(matches!(
        store.outbox_after(0, 10),
        Err(StoreError::Corrupt {
            what: "outbox message",
            ..
        })
    ));
}

#[test]
fn an_enrolled_device_sends_reports_and_escalations_through_the_outbox() {
    let (_dir, store) = open();
    store.enroll("pi-01").unwrap();
    assert_eq!(store.device_id().unwrap().unwrap(), "pi-01");
    store.enroll("pi-02").unwrap();
    assert_eq!(
        store.device_id().unwrap().unwrap(),
        "pi-02",
        "enrolled again"
    );
    store
        .begin_run(&NewRun {
            signed: true,
            ..new_run("r1", &BTreeMap::new())
        })
        .unwrap();
    // A stopped run reports when it finishes, not before.
    store.finish_run(&report("r1", RunStatus::Stopped)).unwrap();
    assert_eq!(store.outbox_len().unwrap(), 0);
    store.finish_run(&report("r1", RunStatus::Failed)).unwrap();
    store
        .record_escalation("t", Some("r1"), "step 2 needs a person", AT)
        .unwrap();
    let out = store.outbox_after(0, 10).unwrap();
    assert_eq!(
        out.iter().map(|m| m.kind).collect::<Vec<_>>(),
        [OutboxKind::Report, OutboxKind::Escalation]
    );
    let (m, r) = tracefleet::wire::decode_report(&out[0].payload).unwrap();
    assert_eq!((m.run_id.as_str(), r.status), ("r1", RunStatus::Failed));
    let e: tracefleet::wire::EscalationMessage =
        tracefleet::wire::decode(&out[1].payload, "escalation").unwrap();
    assert_eq!(e.device_id, "pi-02");
    assert_eq!(
        (e.trace_id.as_str(), e.run_id.as_deref()),
        ("t", Some("r1"))
    );
    assert_eq!(e.reason, "step 2 needs a person");
    assert_eq!(
        store.escalations().unwrap(),
        [("t".to_owned(), "step 2 needs a person".to_owned())]
    );
}

#[test]
fn command_counters_only_go_up() {
    let (_dir, store) = open();
    assert_eq!(store.command_counter().unwrap(), 0);
    assert!(store.accept_command_counter(5).unwrap());
    assert!(!store.accept_command_counter(5).unwrap(), "replayed");
    assert!(!store.accept_command_counter(4).unwrap(), "older");
    assert_eq!(store.command_counter().unwrap(), 5);
    assert!(store.accept_command_counter(6).unwrap());
    assert_eq!(store.command_counter().unwrap(), 6);
}

#[test]
fn statistics_follow_the_confidence_rule_per_version() {
    let (_dir, mut store) = open();
    let (fresh, last) = store.stats("t", "1.0.0").unwrap();
    assert_eq!(fresh, Stats::default());
    assert!(last.is_none());
    let expected = Stats::default().record(true).record(false);
    store.record_outcome("t", "1.0.0", true, AT).unwrap();
    let after = store
        .record_outcome("t", "1.0.0", false, "2026-01-02T00:00:00Z")
        .unwrap();
    assert_eq!(after, expected);
    let (stored, last) = store.stats("t", "1.0.0").unwrap();
    assert_eq!(stored, expected);
    assert_eq!(last.as_deref(), Some("2026-01-02T00:00:00Z"));
    assert_eq!(
        store.stats("t", "2.0.0").unwrap().0,
        Stats::default(),
        "another version starts afresh"
    );
    // Not enrolled: an escalation is kept, nothing goes to the outbox.
    store.record_escalation("t", None, "no model", AT).unwrap();
    assert_eq!(store.escalations().unwrap().len(), 1);
    assert_eq!(store.outbox_len().unwrap(), 0);
}

#[test]
fn a_store_truncated_to_zero_bytes_is_refused_not_recreated_empty() {
    let (dir, store) = rooted();
    assert!(store.trust_root().unwrap().is_some());
    drop(store);
    let db = dir.path().join("follower.db");
    std::fs::File::create(&db).unwrap(); // truncates to 0 bytes
    for extra in ["follower.db-wal", "follower.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(extra));
    }
    let Err(e) = Store::open(dir.path()) else {
        panic!("a 0-byte store opened")
    };
    assert!(matches!(e, StoreError::Emptied { bytes: 0, .. }), "{e}");
    assert!(e.to_string().contains("holds no schema"), "{e}");
    // Refusing wrote nothing: the file is still what was found.
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);
}

#[test]
fn a_new_store_is_created_whole_and_a_leftover_partial_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    // What a crash while creating the store leaves: a half-made file under the other name.
    std::fs::write(dir.path().join("follower.db.new"), b"partial").unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert!(store.trust_root().unwrap().is_none());
    assert!(!dir.path().join("follower.db.new").exists());
    drop(store);
    // And it opens again as the same store.
    Store::open(dir.path()).unwrap();
}
