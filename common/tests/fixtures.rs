//! Data-driven compiler tests over the repository's traces.
//!
//! - Every example in `traces/` and every fixture in `traces/fixtures/` compiles without
//!   warnings, round-trips through the compiled form and through `inspect --json` (serde JSON).
//! - Every fixture in `traces/fixtures/broken/` fails with exactly the diagnostics in its
//!   `.expected` file (short format). `UPDATE_EXPECT=1 cargo test` rewrites those files; review
//!   the diff before committing.

#![allow(clippy::unwrap_used)] // tests state expectations by unwrapping

use std::path::{Path, PathBuf};
use tracefleet::{Trace, compile_source, decode_compiled, encode_compiled};

fn traces_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../traces")
}

fn sources_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".trace.md"))
        .collect();
    v.sort();
    v
}

#[test]
fn examples_compile_cleanly_and_round_trip() {
    let examples = sources_in(&traces_dir());
    assert!(
        examples.len() >= 5,
        "expected at least five example traces, found {examples:?}"
    );
    let fixtures = sources_in(&traces_dir().join("fixtures"));
    let mut llm_steps = 0;
    let mut tools = std::collections::BTreeSet::new();
    for path in examples.iter().chain(&fixtures) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let (trace, warnings) =
            compile_source(&name, &text).unwrap_or_else(|d| panic!("{}", d.render(&text)));
        // Notes say how the source was read (e.g. a version taken from the id); not warnings.
        let warnings: Vec<_> = warnings
            .iter()
            .filter(|d| d.severity != tracefleet::Severity::Note)
            .collect();
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        assert_eq!(
            decode_compiled(&encode_compiled(&trace)).unwrap(),
            trace,
            "{name}"
        );
        let json = serde_json::to_string(&trace).unwrap();
        assert_eq!(
            serde_json::from_str::<Trace>(&json).unwrap(),
            trace,
            "{name}: inspect --json"
        );
        if examples.contains(path) {
            llm_steps += trace.llm_steps().count();
            tools.extend(trace.steps.iter().map(|s| s.tool.name()));
        }
    }
    assert!(llm_steps >= 2, "the examples need at least two LLM steps");
    for t in ["Read", "Write", "Bash", "Grep", "Glob", "LLM"] {
        assert!(tools.contains(t), "no example uses {t}");
    }
}

#[test]
fn broken_fixtures_fail_with_their_diagnostics() {
    let dir = traces_dir().join("fixtures/broken");
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut mismatches = Vec::new();
    let fixtures = sources_in(&dir);
    assert!(fixtures.len() >= 15, "{fixtures:?}");
    for path in fixtures {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let got = match compile_source(&name, &text) {
            Ok(_) => format!("{name}: compiled, but it is a broken fixture\n"),
            Err(d) => format!("{d}\n"),
        };
        let expected_path = path.with_file_name(name.replace(".trace.md", ".expected"));
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            mismatches.push(format!("{name}\n--- expected\n{expected}--- got\n{got}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{}\n(UPDATE_EXPECT=1 rewrites the .expected files)",
        mismatches.join("\n")
    );
}
