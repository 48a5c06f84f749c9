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
fn no_trusted_key_means_no_run() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    let signed = ws.sign("fixtures/write-marker.trace.md", &key);
    let r = ws.follower(&["run", &signed, "--base-dir", "w"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("trusts no trace-signing key"),
        "{}",
        r.stderr
    );
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
            .contains("not a GGUF file: expected magic \"GGUF\""),
        "{}",
        r.stderr
    );
    assert_eq!(ws.run_count(), 0);
    let r = ws.follower(&["run", &signed, "--base-dir", "w"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("no model is configured"), "{}", r.stderr);
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
        assert_eq!(r.code, Some(0), "{name}: {}{}", r.stdout, r.stderr);
        let report = ws.json(&report);
        assert_eq!(report["status"], "success", "{name}");
        assert_eq!(report["completed_steps"], report["total_steps"], "{name}");
    }
}
