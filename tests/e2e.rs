//! End-to-end tests across processes: the real `learner` and `follower` binaries, a real
//! SQLite store, real shell commands, the real dpkg log and a real GGUF model.

#![allow(clippy::unwrap_used)] // tests state expectations by unwrapping

use tracefleet_e2e::{Workspace, model};

#[test]
fn signed_example_runs_on_the_real_dpkg_log_with_the_model() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    let signed = ws.sign("dpkg-log-triage.trace.md", &key);
    ws.trust(&key);
    let model = model();
    let r = ws.follower(&[
        "run",
        &signed,
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "2",
        "--base-dir",
        "work",
        "--output",
        "report.json",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("SUCCESS"), "{}", r.stdout);

    let report = ws.json("report.json");
    assert_eq!(report["status"], "success");
    assert_eq!(report["trace_id"], "dpkg-log-triage");
    assert_eq!(report["trace_version"], "1.0.0");
    assert_eq!(report["total_steps"], 5);
    assert_eq!(report["completed_steps"], 5);
    assert!(report["failed_step"].is_null());
    assert_eq!(report["all_validations_passed"], true);
    assert_eq!(report["all_postconditions_met"], true);
    let steps = report["step_results"].as_array().unwrap();

    // Step 1 counted real actions in the real log.
    assert!(
        steps[0]["output"]
            .as_str()
            .unwrap()
            .lines()
            .any(|l| l.trim().ends_with(" status"))
    );

    // The LLM step's output matches its grammar: a JSON object with exactly these keys.
    let llm = &steps[3];
    assert_eq!(llm["tool"], "LLM");
    let answer: serde_json::Value =
        serde_json::from_str(llm["output"].as_str().unwrap()).expect("grammar forces JSON");
    let obj = answer.as_object().unwrap();
    assert_eq!(obj.len(), 2, "{answer}");
    assert!(
        ["low", "medium", "high"].contains(&obj["risk"].as_str().unwrap()),
        "{answer}"
    );
    let summary = obj["summary"].as_str().unwrap();
    assert!(!summary.is_empty() && summary.len() <= 200 * 4, "{answer}");
    let usage = &llm["llm"];
    assert_eq!(usage["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(usage["grammar"], true);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 100);
    assert!(usage["completion_tokens"].as_u64().unwrap() > 5);
    assert_eq!(report["completion_tokens"], usage["completion_tokens"]);

    // The Write step produced the report file in the base directory.
    let written = std::fs::read_to_string(ws.path("work/dpkg-triage-report.md")).unwrap();
    assert!(written.contains("## Assessment") && written.contains(obj["risk"].as_str().unwrap()));

    // The run was journaled and its report stored.
    assert_eq!(ws.run_count(), 1);
    let run_id = report["run_id"].as_str().unwrap();
    let shown = ws.follower(&["runs", "show", run_id]);
    assert_eq!(shown.code, Some(0), "{shown:?}");
    let stored: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(stored, report);
}

/// Flips one byte at `offset_from_end` of a file.
fn flip(path: &std::path::Path, offset_from_end: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() - offset_from_end;
    b[i] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

#[test]
fn tampered_signed_trace_is_refused_and_nothing_runs() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    let signed = ws.sign("fixtures/write-marker.trace.md", &key);
    ws.trust(&key);
    // Sanity: the untampered trace runs and writes its marker.
    let ok = ws.follower(&["run", &signed, "--base-dir", "good"]);
    assert_eq!(ok.code, Some(0), "{ok:?}");
    assert!(ws.path("good/marker.txt").is_file());

    // The envelope ends with the signature (64 bytes), before it the key id (32 bytes) and
    // before that the compiled trace: tamper with each.
    for (name, offset, why) in [
        ("sig", 1, "(invalid)"),
        ("keyid", 70, "(untrusted)"),
        ("content", 120, "content hash mismatch"),
    ] {
        let copy = format!("tampered-{name}.tfs");
        std::fs::copy(ws.path(&signed), ws.path(&copy)).unwrap();
        flip(&ws.path(&copy), offset);
        let base = format!("bad-{name}");
        let r = ws.follower(&["run", &copy, "--base-dir", &base]);
        assert_eq!(r.code, Some(2), "{name}: {r:?}");
        assert!(
            r.stderr.contains("refusing") && r.stderr.contains(why),
            "{name}: {}",
            r.stderr
        );
        assert!(!ws.path(&base).exists(), "{name}: the run must not start");
    }
    assert_eq!(ws.run_count(), 1, "only the untampered run is recorded");
}

#[test]
fn an_installed_trace_altered_in_the_store_is_refused_at_the_next_run() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    let signed = ws.sign("fixtures/write-marker.trace.md", &key);
    ws.trust(&key);
    let r = ws.follower(&["install", &signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let db = rusqlite::Connection::open(ws.state_dir().join("follower.db")).unwrap();
    let (id, mut bytes): (String, Vec<u8>) = db
        .query_row("SELECT trace_id, signed FROM installed_traces", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let ok = ws.follower(&["run", &id, "--base-dir", "good"]);
    assert_eq!(ok.code, Some(0), "{ok:?}");

    // Someone with write access to the state directory edits the stored trace (a byte of the
    // compiled trace inside the envelope): installed once is not trusted forever.
    let at = bytes.len() - 120;
    bytes[at] ^= 0x20;
    db.execute("UPDATE installed_traces SET signed = ?1", [&bytes])
        .unwrap();
    drop(db);
    let r = ws.follower(&["run", &id, "--base-dir", "bad"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("content hash mismatch"), "{}", r.stderr);
    assert!(!ws.path("bad").exists(), "the run must not start");
    let check = ws.follower(&["check"]);
    assert_eq!(check.code, Some(1), "{check:?}");
    assert!(check.stdout.contains("content hash mismatch"), "{check:?}");
}

#[test]
fn trace_signed_by_an_untrusted_key_is_refused() {
    let ws = Workspace::new();
    let trusted = ws.key("trusted");
    let other = ws.key("other");
    ws.trust(&trusted);
    let signed = ws.sign("fixtures/write-marker.trace.md", &other);
    let r = ws.follower(&["run", &signed, "--base-dir", "w"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("untrusted"), "{}", r.stderr);
    assert!(!ws.path("w").exists());
    assert_eq!(ws.run_count(), 0);
}

#[test]
fn no_trust_root_means_no_run() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    let signed = ws.sign("fixtures/write-marker.trace.md", &key);
    let r = ws.follower(&["run", &signed, "--base-dir", "w"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("has no trust root yet"), "{}", r.stderr);
    assert!(!ws.path("w").exists());
}

#[test]
fn failing_validation_fails_the_run_with_exit_1() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    let signed = ws.sign("fixtures/failing-validation.trace.md", &key);
    ws.trust(&key);
    let r = ws.follower(&["run", &signed, "--base-dir", "w", "--output", "report.json"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    let report = ws.json("report.json");
    assert_eq!(report["status"], "failed");
    assert_eq!(report["failed_step"], 1);
    assert_eq!(report["completed_steps"], 0);
    assert_eq!(report["all_validations_passed"], false);
    let s1 = &report["step_results"][0];
    assert_eq!(s1["status"], "failed");
    assert_eq!(s1["attempts"], 2, "retry_count 1 means two attempts");
    assert_eq!(s1["output"], "hello\n");
    assert_eq!(s1["validations"][0]["passed"], false);
    assert!(
        s1["validations"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("goodbye")
    );
    assert_eq!(report["step_results"][1]["status"], "not_run");
    assert!(!ws.path("w/never.txt").exists());
}

#[test]
fn unsigned_inputs_are_refused_unless_the_author_allows_them() {
    let ws = Workspace::new();
    let src = tracefleet_e2e::repo_root().join("traces/fixtures/write-marker.trace.md");
    let src = src.to_str().unwrap();
    let r = ws.follower(&["run", src, "--base-dir", "w"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("not a signed trace"), "{}", r.stderr);
    let r = ws.learner(&["compile", src, "-o", "m.tfc"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.follower(&["run", "m.tfc", "--base-dir", "w"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("compiled but unsigned"), "{}", r.stderr);
    assert!(!ws.path("w").exists());
    let r = ws.follower(&["run", src, "--allow-unsigned", "--base-dir", "w"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("UNSIGNED"), "{}", r.stdout);
}

#[test]
fn compile_errors_exit_2_with_file_and_line() {
    let ws = Workspace::new();
    let src = tracefleet_e2e::repo_root().join("traces/fixtures/broken/unknown-tool.trace.md");
    let r = ws.learner(&[
        "compile",
        src.to_str().unwrap(),
        "--check",
        "--message-format",
        "short",
    ]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr
            .contains("unknown-tool.trace.md:11:1: error: unknown tool `Teleport`"),
        "{}",
        r.stderr
    );
    // The default format shows the source line with a caret under it.
    let r = ws.learner(&["compile", src.to_str().unwrap(), "--check"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("unknown-tool.trace.md:11:1\n"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("11 │ tool: Teleport\n"), "{}", r.stderr);
    assert!(r.stderr.contains("1 error found"), "{}", r.stderr);
}

#[test]
fn a_broken_model_file_is_refused_before_any_step() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    let signed = ws.sign("dpkg-log-triage.trace.md", &key);
    ws.trust(&key);
    std::fs::write(ws.path("broken.gguf"), b"<html>not a model</html>").unwrap();
    let r = ws.follower(&["run", &signed, "--model", "broken.gguf", "--base-dir", "w"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr
            .contains("GGUF at byte 0: expected the magic \"GGUF\" (a GGUF model file)"),
        "{}",
        r.stderr
    );
    assert_eq!(ws.run_count(), 0);
    let r = ws.follower(&["run", &signed, "--base-dir", "w"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("step 4 needs a model"), "{}", r.stderr);
}

#[test]
fn every_example_trace_runs_signed_on_this_machine() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    ws.trust(&key);
    let model = model();
    let dir = tracefleet_e2e::repo_root().join("traces");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".trace.md"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "{names:?}");
    for name in names {
        let signed = ws.sign(&name, &key);
        let base = name.trim_end_matches(".trace.md").to_owned();
        let report = format!("{base}.json");
        let r = ws.follower(&[
            "run",
            &signed,
            "--model",
            model.to_str().unwrap(),
            "--threads",
            "2",
            "--base-dir",
            &base,
            "--output",
            &report,
        ]);
        if name == "service-protocol.trace.md" {
            // Its reference answers are ones the test model does not repeat (3 of 6): the
            // run escalates before the judgement step, by design (see the demo).
            assert_eq!(r.code, Some(1), "{name}: {}{}", r.stdout, r.stderr);
            let report = ws.json(&report);
            assert_eq!(report["fidelity"][0]["agreements"], 3, "{report}");
            assert_eq!(report["completed_steps"], 0);
            continue;
        }
        assert_eq!(r.code, Some(0), "{name}: {}{}", r.stdout, r.stderr);
        let report = ws.json(&report);
        assert_eq!(report["status"], "success", "{name}");
        assert_eq!(report["completed_steps"], report["total_steps"], "{name}");
    }
}

/// The installed-trace table and the newest root, as the follower reports them.
fn store_state(ws: &Workspace) -> (String, String) {
    let traces = ws.follower(&["traces", "list", "--json"]);
    let root = ws.follower(&["trust", "show"]);
    (traces.stdout, root.stdout)
}

/// Compiles `src` with its `version:` replaced, signs it with `keys` (several for a
/// threshold) and an expiry, returns the signed file name.
fn signed_version(
    ws: &Workspace,
    version: &str,
    keys: &[&str],
    expires: &str,
    name: &str,
) -> String {
    signed_fixture_version(ws, "write-marker.trace.md", version, keys, expires, name)
}

/// Compiles `traces/fixtures/<fixture>` with its `version:` replaced and signs it with `keys`.
fn signed_fixture_version(
    ws: &Workspace,
    fixture: &str,
    version: &str,
    keys: &[&str],
    expires: &str,
    name: &str,
) -> String {
    let src = std::fs::read_to_string(
        tracefleet_e2e::repo_root()
            .join("traces/fixtures")
            .join(fixture),
    )
    .unwrap();
    let src = src.replace("version: \"1.0.0\"", &format!("version: \"{version}\""));
    std::fs::write(ws.path(&format!("{name}.trace.md")), src).unwrap();
    let r = ws.learner(&[
        "compile",
        &format!("{name}.trace.md"),
        "-o",
        &format!("{name}.tfc"),
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let out = format!("{name}.tfs");
    let tfc = format!("{name}.tfc");
    let mut args = vec![
        "sign",
        tfc.as_str(),
        "--expires",
        expires,
        "-o",
        out.as_str(),
    ];
    for k in keys {
        args.extend(["--key", k]);
    }
    let r = ws.learner(&args);
    assert_eq!(r.code, Some(0), "{r:?}");
    out
}

#[test]
fn install_refusal_matrix_leaves_the_store_unchanged() {
    let ws = Workspace::new();
    let (a, b, stranger) = (ws.key("a"), ws.key("b"), ws.key("stranger"));
    ws.provision(&[&a, &b], 2); // two of two trace keys must sign
    let good = signed_version(&ws, "1.0.0", &[&a, &b], "30d", "good");
    let r = ws.follower(&["install", &good]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let before = store_state(&ws);
    assert!(before.0.contains("\"version\": \"1.0.0\""), "{before:?}");

    let refuse = |file: &str, why: &str| {
        let r = ws.follower(&["install", file]);
        assert_eq!(r.code, Some(2), "{file}: {r:?}");
        assert!(
            r.stderr.contains(why),
            "{file}: expected {why:?} in {}",
            r.stderr
        );
        assert_eq!(store_state(&ws), before, "{file}: the store changed");
    };

    // Too few signatures, and one key signing twice to fake a threshold.
    refuse(
        &signed_version(&ws, "1.1.0", &[&a], "30d", "one-sig"),
        "1 valid signature(s) from trusted trace-signing keys, expected at least 2",
    );
    refuse(
        &signed_version(&ws, "1.1.0", &[&a, &a], "30d", "same-twice"),
        "1 valid signature(s) from trusted trace-signing keys, expected at least 2",
    );
    // An unknown key.
    refuse(
        &signed_version(&ws, "1.1.0", &[&a, &stranger], "30d", "stranger"),
        "(untrusted)",
    );
    // A flipped byte anywhere in the file.
    let flipped_bytes = std::fs::read(ws.path(&good)).unwrap();
    for (i, at) in [4usize, flipped_bytes.len() / 2, flipped_bytes.len() - 1]
        .into_iter()
        .enumerate()
    {
        let mut b = flipped_bytes.clone();
        b[at] ^= 0x20;
        let name = format!("flip-{i}.tfs");
        std::fs::write(ws.path(&name), b).unwrap();
        refuse(&name, "refusing");
    }
    // Expired signature.
    refuse(
        &signed_version(&ws, "1.1.0", &[&a, &b], "0s", "expired"),
        "signed trace expired at",
    );
    // Equal and older versions (rollback).
    refuse(&good, "versions never go backwards");
    refuse(
        &signed_version(&ws, "0.9.0", &[&a, &b], "30d", "older"),
        "versions never go backwards",
    );
    // Unsigned and oversize inputs.
    refuse("good.tfc", "not a signed trace");
    std::fs::write(ws.path("huge.tfs"), vec![b'T'; 2 * 1024 * 1024]).unwrap();
    refuse("huge.tfs", "expected at most");

    // A newer version signed by both keys installs.
    let newer = signed_version(&ws, "1.1.0", &[&a, &b], "30d", "newer");
    let r = ws.follower(&["install", &newer]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(store_state(&ws).0.contains("\"version\": \"1.1.0\""));
    // The refusals were logged, and the database is sound.
    // Running an older signed file than the installed version is a rollback too.
    let older = ws.follower(&["run", "older.tfs", "--base-dir", "old"]);
    assert_eq!(older.code, Some(2), "{older:?}");
    assert!(
        older.stderr.contains("older than the installed 1.1.0"),
        "{}",
        older.stderr
    );
    assert!(!ws.path("old").exists());
    let r = ws.follower(&["run", "write-marker", "--base-dir", "ran"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout
            .contains("write-marker 1.1.0 (installed, verified)"),
        "{}",
        r.stdout
    );
}

#[test]
fn root_rotation_revokes_by_omission_and_needs_the_old_keys() {
    let ws = Workspace::new();
    let (old_t, new_t) = (ws.key("old-traces"), ws.key("new-traces"));
    ws.provision(&[&old_t], 1);
    let r = ws.learner(&["keys", "generate", "--role", "root", "--out", "root2.key"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let create_v2 = |signers: &[&str], out: &str| {
        let mut args = vec![
            "trust",
            "create",
            "--version",
            "2",
            "--root-key",
            "root2.key.pub",
            "--traces-key",
            "new-traces.key.pub",
            "-o",
            out,
        ];
        for s in signers {
            args.extend(["--sign", s]);
        }
        let r = ws.learner(&args);
        assert_eq!(r.code, Some(0), "{r:?}");
    };
    // Signed only by the new root key: refused, the device stays on v1.
    create_v2(&["root2.key"], "v2-new-only.tfr");
    let r = ws.follower(&["trust", "update", "v2-new-only.tfr"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr
            .contains("not signed by the current root keys (v1)"),
        "{}",
        r.stderr
    );
    assert!(
        ws.follower(&["trust", "show"])
            .stdout
            .contains("trust root v1")
    );

    // Signed by old and new root keys: accepted.
    create_v2(&["root.key", "root2.key"], "v2.tfr");
    let r = ws.follower(&["trust", "update", "v2.tfr"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        ws.follower(&["trust", "show"])
            .stdout
            .contains("trust root v2")
    );

    // The old trace key is revoked by omission; the new one verifies.
    let old_signed = signed_version(&ws, "1.0.0", &[&old_t], "30d", "by-old");
    let r = ws.follower(&["install", &old_signed]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("(untrusted)"), "{}", r.stderr);
    let new_signed = signed_version(&ws, "1.0.0", &[&new_t], "30d", "by-new");
    let r = ws.follower(&["install", &new_signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    // A second provisioning is refused.
    let r = ws.follower(&["trust", "init", "v2.tfr"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("already provisioned"), "{}", r.stderr);
}

#[test]
fn an_expired_trust_root_vouches_for_nothing() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    let root = ws.root_v1(&[&key], 1, "2s");
    let r = ws.follower(&["trust", "init", &root]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let signed = ws.sign("fixtures/write-marker.trace.md", &key);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = ws.follower(&["install", &signed]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("trust root v1 expired"), "{}", r.stderr);
    let r = ws.follower(&["run", &signed, "--base-dir", "w"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(!ws.path("w").exists());
}

/// A well-formed GGUF v3 file of exactly `size` bytes: one metadata entry and one F32 tensor
/// filling the data section with `fill` (not a model llama.cpp could run, but one the follower's
/// header check accepts).
fn fake_gguf_filled(ws: &Workspace, name: &str, size: usize, fill: u8) -> String {
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    let mut b = b"GGUF\x03\x00\x00\x00".to_vec();
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    string(&mut b, "test");
    string(&mut b, "weights");
    b.extend_from_slice(&1u32.to_le_bytes()); // one dimension
    let data_offset = (b.len() + 8 + 4 + 8).next_multiple_of(32);
    b.extend_from_slice(&(((size - data_offset) / 4) as u64).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // F32
    b.extend_from_slice(&0u64.to_le_bytes()); // offset
    b.resize(data_offset, 0);
    b.resize(size, fill);
    std::fs::write(ws.path(name), b).unwrap();
    name.into()
}

fn fake_gguf(ws: &Workspace, name: &str, size: usize) -> String {
    fake_gguf_filled(ws, name, size, 7)
}

fn bundle(ws: &Workspace, out: &str, items: &[&str], extra: &[&str]) -> tracefleet_e2e::Run {
    let mut args = vec![
        "bundle",
        "create",
        "-o",
        out,
        "--trust-root",
        "root-v1.tfr",
        "--key",
        "a.key",
    ];
    args.extend(extra);
    args.extend(items);
    ws.learner(&args)
}

#[test]
fn bundles_install_whole_or_not_at_all() {
    let ws = Workspace::new();
    let a = ws.key("a");
    ws.provision(&[&a], 1);
    let t1 = signed_version(&ws, "1.1.0", &[&a], "30d", "t1");
    let other = ws.sign("fixtures/failing-validation.trace.md", &a);
    let model = fake_gguf(&ws, "tiny.gguf", 300_000);
    let r = bundle(&ws, "good.tfb", &[&t1, &other], &["--model", &model]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let before = store_state(&ws);
    let shown = ws.follower(&["inspect", "good.tfb"]);
    assert_eq!(shown.code, Some(0), "{shown:?}");
    assert!(
        shown.stdout.contains("3 entries")
            && shown.stdout.contains("Model tiny.gguf (300000 bytes"),
        "{}",
        shown.stdout
    );

    let refuse = |file: &str, why: &str| {
        let r = ws.follower(&["install", file]);
        assert_eq!(r.code, Some(2), "{file}: {r:?}");
        assert!(
            r.stderr.contains(why),
            "{file}: expected {why:?} in {}",
            r.stderr
        );
        assert_eq!(store_state(&ws), before, "{file}: the store changed");
        assert!(
            !ws.state_dir().join("models/tiny.gguf").exists(),
            "{file}: a model was placed"
        );
    };
    let good = std::fs::read(ws.path("good.tfb")).unwrap();
    // Truncated (partial copy from a USB stick) and with data appended.
    std::fs::write(ws.path("truncated.tfb"), &good[..good.len() - 1000]).unwrap();
    refuse("truncated.tfb", "truncated");
    let mut longer = good.clone();
    longer.extend_from_slice(b"extra");
    std::fs::write(ws.path("longer.tfb"), &longer).unwrap();
    refuse("longer.tfb", "after the last entry");
    // A flipped byte in an entry, and in the signed manifest.
    let mut flipped = good.clone();
    let at = flipped.len() - 10;
    flipped[at] ^= 1;
    std::fs::write(ws.path("flipped.tfb"), &flipped).unwrap();
    refuse("flipped.tfb", "does not match the manifest");
    let mut header_flip = good.clone();
    header_flip[40] ^= 1;
    std::fs::write(ws.path("header.tfb"), &header_flip).unwrap();
    refuse("header.tfb", "refusing header.tfb");
    // Mix and match: this bundle's manifest with another bundle's contents.
    let t1b = signed_version(&ws, "1.1.1", &[&a], "30d", "t1b");
    let r = bundle(&ws, "other.tfb", &[&t1b, &other], &["--model", &model]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let other_bytes = std::fs::read(ws.path("other.tfb")).unwrap();
    let payload: usize = 300_000
        + std::fs::metadata(ws.path(&other)).unwrap().len() as usize
        + std::fs::metadata(ws.path(&t1b)).unwrap().len() as usize;
    let mut mixed = good[..good.len() - payload].to_vec();
    mixed.extend_from_slice(&other_bytes[other_bytes.len() - payload..]);
    std::fs::write(ws.path("mixed.tfb"), &mixed).unwrap();
    refuse("mixed.tfb", "mixed with another bundle");
    // Signed by a key the root does not name.
    let stranger = ws.key("stranger");
    let r = ws.learner(&[
        "bundle",
        "create",
        "-o",
        "stranger.tfb",
        "--trust-root",
        "root-v1.tfr",
        "--key",
        &stranger,
        &t1,
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    refuse("stranger.tfb", "(untrusted)");
    // The learner will not make a bundle that outlives its root.
    let r = bundle(&ws, "frozen.tfb", &[&t1], &["--expires", "400d"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("must not outlive"), "{}", r.stderr);

    // The good bundle installs everything at once.
    let r = ws.follower(&["install", "good.tfb"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let (traces, _) = store_state(&ws);
    assert!(
        traces.contains("\"write-marker\"") && traces.contains("\"failing-validation\""),
        "{traces}"
    );
    assert_eq!(
        std::fs::read(ws.state_dir().join("models/tiny.gguf"))
            .unwrap()
            .len(),
        300_000
    );
    // Installing it again is a rollback of every trace in it: refused, nothing changes.
    let now = store_state(&ws);
    let r = ws.follower(&["install", "good.tfb"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert_eq!(store_state(&ws), now);
    // A refused bundle places no model either: an old bundle carrying another tiny.gguf.
    fake_gguf_filled(&ws, "tiny.gguf", 1000, 9);
    let r = bundle(&ws, "replay.tfb", &[&t1], &["--model", "tiny.gguf"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.follower(&["install", "replay.tfb"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("versions never go backwards"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read(ws.state_dir().join("models/tiny.gguf"))
            .unwrap()
            .len(),
        300_000
    );
}

#[test]
fn a_device_refuses_a_bundle_that_outlives_its_root() {
    let ws = Workspace::new();
    let a = ws.key("a");
    // The device's root expires in 2 days; the bundle was made against a longer-lived root.
    let short = ws.root_v1(&[&a], 1, "2d");
    std::fs::rename(ws.path(&short), ws.path("short.tfr")).unwrap();
    let r = ws.follower(&["trust", "init", "short.tfr"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    ws.root_v1(&[&a], 1, "365d");
    let t = signed_version(&ws, "1.0.0", &[&a], "30d", "t");
    let r = bundle(&ws, "long.tfb", &[&t], &["--expires", "10d"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.follower(&["install", "long.tfb"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("must not outlive its metadata"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_bundle_can_carry_a_root_rotation_and_traces_signed_by_the_new_key() {
    let ws = Workspace::new();
    let (a, b) = (ws.key("a"), ws.key("b"));
    ws.provision(&[&a], 1);
    let r = ws.learner(&[
        "trust",
        "create",
        "--version",
        "2",
        "--root-key",
        "root.key.pub",
        "--traces-key",
        "b.key.pub",
        "--sign",
        "root.key",
        "-o",
        "root-v2.tfr",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let t = signed_version(&ws, "2.0.0", &[&b], "30d", "t");
    let r = ws.learner(&[
        "bundle",
        "create",
        "-o",
        "rot.tfb",
        "--root",
        "root-v2.tfr",
        "--trust-root",
        "root-v2.tfr",
        "--key",
        &b,
        &t,
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.follower(&["install", "rot.tfb"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains("trust root v2 installed")
            && r.stdout.contains("installed write-marker 2.0.0"),
        "{}",
        r.stdout
    );
    assert!(
        ws.follower(&["trust", "show"])
            .stdout
            .contains("trust root v2")
    );
}

/// SIGKILL `follower install` at random moments, 200 times, and check after each kill that
/// the store is sound and never holds half a bundle (both traces always at the same version).
#[test]
fn install_survives_sigkill_at_any_point() {
    let ws = Workspace::new();
    let a = ws.key("a");
    let root = ws.root_v1(&[&a], 1, "365d");
    let r = ws.follower(&["trust", "init", &root]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let model = fake_gguf(&ws, "m.gguf", 2 << 20);
    let bundles: Vec<String> = (1..=60)
        .map(|i| {
            let v = format!("1.0.{i}");
            let x = signed_fixture_version(
                &ws,
                "write-marker.trace.md",
                &v,
                &[&a],
                "30d",
                &format!("x{i}"),
            );
            let y = signed_fixture_version(
                &ws,
                "failing-validation.trace.md",
                &v,
                &[&a],
                "30d",
                &format!("y{i}"),
            );
            let out = format!("b{i}.tfb");
            let r = bundle(&ws, &out, &[&x, &y], &["--model", &model]);
            assert_eq!(r.code, Some(0), "{r:?}");
            out
        })
        .collect();
    let follower = tracefleet_e2e::bin("follower");
    // TRACEFLEET_TEST_SEED=N replays a run of this test (the seed is printed first).
    let mut seed: u64 = std::env::var("TRACEFLEET_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    eprintln!("install_survives_sigkill_at_any_point: TRACEFLEET_TEST_SEED={seed}");
    // Kill points spread over 1.3 times an uninterrupted install as this machine runs it now
    // (a fixed span kills every install on a loaded machine, or none on a fast one).
    let timing = |args: &[&str]| {
        std::process::Command::new(&follower)
            .args(args)
            .current_dir(ws.path("."))
            .env("TRACEFLEET_STATE_DIR", ws.path("timing-state"))
            .output()
            .unwrap()
    };
    assert!(timing(&["trust", "init", &root]).status.success());
    let timed = std::time::Instant::now();
    let r = timing(&["install", &bundles[0]]);
    let span_us = u64::try_from(timed.elapsed().as_micros()).unwrap() * 13 / 10;
    assert!(r.status.success(), "{r:?}");
    let mut next = 0usize;
    let (mut killed, mut completed) = (0, 0);
    for _ in 0..200 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = std::time::Duration::from_micros(seed % span_us);
        let mut child = std::process::Command::new(&follower)
            .args(["install", &bundles[next.min(bundles.len() - 1)]])
            .current_dir(ws.path("."))
            .env("TRACEFLEET_STATE_DIR", ws.state_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        match child.try_wait().unwrap() {
            Some(_) => completed += 1,
            None => {
                child.kill().unwrap(); // SIGKILL
                killed += 1;
            }
        }
        child.wait().unwrap();
        let check = ws.follower(&["check"]);
        assert_eq!(check.code, Some(0), "{check:?}");
        let listed: serde_json::Value =
            serde_json::from_str(&ws.follower(&["traces", "list", "--json"]).stdout).unwrap();
        let versions: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["version"].as_str().unwrap())
            .collect();
        assert!(
            versions.is_empty() || (versions.len() == 2 && versions[0] == versions[1]),
            "half a bundle: {listed}"
        );
        if let Some(v) = versions.first() {
            next = v.rsplit('.').next().unwrap().parse::<usize>().unwrap();
        }
    }
    eprintln!(
        "install under SIGKILL: {killed} killed, {completed} finished, reached bundle {next}"
    );
    assert!(
        killed > 20,
        "the loop should kill many installs mid-way ({killed})"
    );
    // And installs got through between the kills: an empty store would pass every check
    // above, proving nothing.
    assert!(
        completed > 0 && next > 0,
        "no install completed ({completed} finished, reached bundle {next})"
    );
}

#[test]
fn goal_runs_need_earned_confidence_and_escalate_otherwise() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    ws.trust(&key);
    for fixture in [
        "fixtures/write-marker.trace.md",
        "fixtures/failing-validation.trace.md",
    ] {
        let signed = ws.sign(fixture, &key);
        let r = ws.follower(&["install", &signed]);
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    let goal = [
        "run",
        "--goal",
        "write the marker file that proves a run happened",
    ];
    // A new trace starts at confidence 0.75: not on its own.
    let r = ws.follower(&goal);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr
            .contains("not running write-marker 1.0.0 on its own: confidence 0.750"),
        "{}",
        r.stderr
    );
    let r = ws.follower(&["run", "--goal", "reboot the reactor"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("no installed trace matches"),
        "{}",
        r.stderr
    );
    let esc = ws.follower(&["escalations"]).stdout;
    assert!(
        esc.contains("write-marker: not running write-marker 1.0.0 on its own"),
        "{esc}"
    );
    assert!(
        esc.contains("-: no installed trace matches the goal \"reboot the reactor\""),
        "{esc}"
    );

    // Supervised runs by id build confidence (LLMunix rule: c += (1 - c) * 0.1).
    for i in 0..9 {
        let r = ws.follower(&["run", "write-marker", "--base-dir", &format!("w{i}")]);
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    let r = ws.follower(&["run", "failing-validation", "--base-dir", "f"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    let listed: serde_json::Value =
        serde_json::from_str(&ws.follower(&["traces", "list", "--json"]).stdout).unwrap();
    let by_id = |id: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["trace_id"] == id)
            .unwrap()
            .clone()
    };
    let wm = by_id("write-marker");
    assert_eq!(wm["usage_count"], 9);
    let c = wm["confidence"].as_f64().unwrap();
    assert!((c - (1.0 - 0.25 * 0.9f64.powi(9))).abs() < 1e-9, "{c}");
    let fv = by_id("failing-validation");
    assert!(
        (fv["confidence"].as_f64().unwrap() - 0.525).abs() < 1e-9,
        "{fv}"
    );

    // Now the goal runs it on its own.
    let r = ws.follower(&[goal[0], goal[1], goal[2], "--base-dir", "auto"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("selected for the goal"), "{}", r.stdout);
    assert!(ws.path("auto/marker.txt").is_file());
}

/// The learner's audit log over a real history of authoring actions: every action is there
/// in order, the log verifies, and a copy with one entry altered, one removed, two swapped or
/// its tail cut is refused naming the entry (exit 1).
#[test]
fn the_audit_log_records_each_action_and_names_the_entry_altered_removed_or_moved() {
    let ws = Workspace::new();
    let a = ws.key("a");
    let b = ws.key("b");
    ws.provision(&[&a, &b], 2);
    let compiled = "t.tfc";
    let src = tracefleet_e2e::repo_root().join("traces/fixtures/failing-validation.trace.md");
    let r = ws.learner(&["compile", src.to_str().unwrap(), "-o", compiled]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.learner(&["sign", compiled, "--key", &a, "-o", "t.tfs"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.learner(&["cosign", "t.tfs", "--key", &b]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = bundle(&ws, "usb.tfb", &["t.tfs"], &["--key", &b]);
    assert_eq!(r.code, Some(0), "{r:?}");

    let list = ws.learner(&["audit", "list", "--json"]);
    assert_eq!(list.code, Some(0), "{list:?}");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&list.stdout).unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    // Keys a, b and the root key (`provision`), the trust root, then sign, cosign, bundle.
    assert_eq!(
        actions,
        [
            "keys generate",
            "keys generate",
            "keys generate",
            "trust create",
            "sign",
            "cosign",
            "bundle create"
        ],
        "{}",
        list.stdout
    );
    let signed = &entries[4];
    assert!(
        signed["subject"]
            .as_str()
            .unwrap()
            .starts_with("failing-validation "),
        "{signed}"
    );
    assert_eq!(
        signed["detail"]["keys"].as_array().unwrap().len(),
        1,
        "{signed}"
    );
    assert_eq!(entries[5]["detail"]["signatures"], 2, "{}", entries[5]);
    let actor = entries[0]["actor"].as_str().unwrap();
    assert!(actor.contains('@'), "actor {actor:?}: expected user@host");
    assert!(
        list.stderr.contains("7 entries verified"),
        "{}",
        list.stderr
    );

    let verify = ws.learner(&["audit", "verify"]);
    assert_eq!(verify.code, Some(0), "{verify:?}");
    let head = verify
        .stdout
        .split("head ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("a head in the output")
        .to_owned();
    assert!(head.starts_with("7:"), "{head}");

    // Tampered copies of the log, each beside a copy of the key, checked with `--audit-dir`.
    let dir = ws.xdg_state().join("tracefleet/audit");
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let check = |name: &str, tampered: Vec<String>, extra: &[&str]| {
        let copy = ws.path(name);
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::copy(dir.join("audit.key.pub"), copy.join("audit.key.pub")).unwrap();
        std::fs::write(copy.join("audit.jsonl"), tampered.join("\n") + "\n").unwrap();
        let mut args = vec!["audit", "verify", "--audit-dir", name];
        args.extend(extra);
        ws.learner(&args)
    };
    let owned = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    let mut altered = owned(&lines);
    altered[4] = altered[4].replace("failing-validation ", "other-trace ");
    let r = check("altered", altered, &[]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("entry 5: was altered"), "{}", r.stderr);

    let mut removed = owned(&lines);
    removed.remove(3);
    let r = check("removed", removed, &[]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("entry 4: was removed"), "{}", r.stderr);

    let mut swapped = owned(&lines);
    swapped.swap(5, 6);
    let r = check("swapped", swapped, &[]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("entry 6: was moved"), "{}", r.stderr);

    let r = check("cut", owned(&lines[..5]), &[]);
    assert_eq!(r.code, Some(0), "a shorter chain verifies by itself: {r:?}");
    let r = check("cut-head", owned(&lines[..5]), &["--head", &head]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("entry 7: is missing"), "{}", r.stderr);

    // Nothing is exported from a broken log; the intact one exports byte for byte.
    let r = ws.learner(&[
        "audit",
        "export",
        "--audit-dir",
        "altered",
        "-o",
        "out.jsonl",
    ]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(!ws.path("out.jsonl").exists());
    let r = ws.learner(&["audit", "export", "-o", "out.jsonl"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(std::fs::read_to_string(ws.path("out.jsonl")).unwrap(), log);
}
