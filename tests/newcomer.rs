//! What a newcomer meets first: the set-up script on a machine that lacks what bindgen loads,
//! the examples of both binaries' `--help` run in order as written, and the trace form of
//! LLMunix's Dual-Mode Deployment Guide compiled, signed and run.

#![allow(clippy::unwrap_used)] // tests state expectations by unwrapping

use crate::examples;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use tracefleet_e2e::{Workspace, bin, repo_root};

/// Runs `scripts/setup.sh` with libclang looked for only in `libdir` and a stub `apt-get`
/// first on PATH that records what it is asked and installs nothing. Returns (exit code,
/// stderr, what apt-get was asked).
fn setup_with(ws: &Workspace, libdir: &std::path::Path) -> (Option<i32>, String, String) {
    let stubs = ws.path("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let log = ws.path("apt-get.log");
    let stub = stubs.join("apt-get");
    std::fs::write(
        &stub,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        stubs.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/setup.sh"))
        .env("PATH", path)
        .env("TRACEFLEET_LIBCLANG_DIRS", libdir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[test]
fn setup_installs_libclang_dev_where_only_libclang_cpp_is_present_and_says_what_is_missing() {
    if !nix_is_root() {
        eprintln!("skipped: setup.sh calls apt-get through sudo when not root");
        return;
    }
    let ws = Workspace::new();
    // A fresh Debian 12 image: the C++ library only, which bindgen cannot use.
    let only_cpp = ws.path("llvm-14-cpp-only");
    std::fs::create_dir_all(&only_cpp).unwrap();
    std::fs::write(only_cpp.join("libclang-cpp.so.14"), b"").unwrap();
    let (code, stderr, apt) = setup_with(&ws, &only_cpp);
    assert!(
        apt.lines()
            .any(|l| l.contains("install") && l.split_whitespace().any(|w| w == "libclang-dev")),
        "apt-get was not asked for libclang-dev: {apt:?}\n{stderr}"
    );
    // The stub installed nothing: the check after installing names what is still missing.
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("missing"), "{stderr}");
    assert!(stderr.contains("libclang-dev"), "{stderr}");
    assert!(
        !stderr.contains("cmake (Debian"),
        "only libclang is missing: {stderr}"
    );

    // What bindgen loads (libclang-N.so.M) is enough: nothing is installed for it.
    let ws = Workspace::new();
    let real = ws.path("llvm-14");
    std::fs::create_dir_all(&real).unwrap();
    std::fs::write(real.join("libclang-cpp.so.14"), b"").unwrap();
    std::fs::write(real.join("libclang-14.so.1"), b"").unwrap();
    let (code, stderr, apt) = setup_with(&ws, &real);
    assert!(!apt.contains("libclang-dev"), "{apt:?}");
    assert_eq!(code, Some(0), "{stderr}");
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The examples under `--help`, as printed.
fn help_examples(name: &str) -> Vec<Vec<String>> {
    let out = Command::new(bin(name)).arg("--help").output().unwrap();
    assert!(out.status.success());
    // The example lines only (the command list above them is prose), with their
    // continuation lines.
    let mut text = String::new();
    let mut continued = false;
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let t = l.trim_start();
        if continued || t.starts_with("learner ") || t.starts_with("follower ") {
            text.push_str(t);
            text.push('\n');
            continued = t
                .split(" #")
                .next()
                .unwrap_or("")
                .trim_end()
                .ends_with('\\');
        }
    }
    examples::commands(&text, &["learner", "follower"])
}

#[test]
fn the_help_examples_of_both_binaries_run_in_order_as_written() {
    let ws = Workspace::new();
    // The examples name `my.trace.md`, whose trace id is `my-trace`.
    let src = std::fs::read_to_string(repo_root().join("traces/fixtures/write-marker.trace.md"))
        .unwrap()
        .replace("trace_id: write-marker", "trace_id: my-trace");
    std::fs::write(ws.path("my.trace.md"), src).unwrap();
    let mut commands = help_examples("learner");
    commands.extend(help_examples("follower"));
    assert!(commands.len() >= 10, "{commands:?}");
    let mut ran = Vec::new();
    for args in &commands {
        let argv: Vec<&str> = args[1..].iter().map(String::as_str).collect();
        // `follower trust init` provisions once; the learner's chain already did.
        let key = args.join(" ");
        if ran.contains(&key) {
            continue;
        }
        let r = match args[0].as_str() {
            "learner" => ws.learner(&argv),
            _ => ws.follower(&argv),
        };
        assert_eq!(r.code, Some(0), "`{key}` failed: {r:?}");
        ran.push(key);
    }
    assert!(ws.path("report.json").is_file(), "the run wrote no report");
    assert_eq!(ws.json("report.json")["status"], "success");
}

#[test]
fn the_deployment_guides_form_compiles_signs_and_runs_with_bash_and_write() {
    let ws = Workspace::new();
    let key = ws.key("traces");
    ws.trust(&key);
    // The guide's own example (WebFetch: it compiles here; it runs only online).
    let r = ws.learner(&[
        "compile",
        repo_root()
            .join("traces/fixtures/guide-form.trace.md")
            .to_str()
            .unwrap(),
        "-o",
        "guide.tfc",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stderr.contains("note:"),
        "the inferred version is a note: {r:?}"
    );
    assert!(!r.stderr.contains("frontmatter"), "{r:?}");
    let signed = ws.sign("fixtures/guide-form-local.trace.md", &key);
    let r = ws.follower(&["install", &signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.follower(&[
        "run",
        "kernel-note-v1.2",
        "--base-dir",
        "site",
        "--output",
        "report.json",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let report = ws.json("report.json");
    assert_eq!(report["status"], "success", "{report}");
    assert_eq!(report["completed_steps"], 2, "{report}");
    let note = std::fs::read_to_string(ws.path("site/kernel-note.md")).unwrap();
    assert!(note.starts_with("This machine runs "), "{note}");
    let r = ws.follower(&["traces", "list"]);
    assert!(
        r.stdout.contains("1.2.0"),
        "the version came from the id: {r:?}"
    );
}
