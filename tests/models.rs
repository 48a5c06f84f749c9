//! The device's models end to end: registering GGUF files, refusing broken, truncated and
//! swapped ones before llama.cpp sees them, runs that use the registry, JSON-schema-constrained
//! output, reproducible greedy generation, the resource policy and the benchmark — with the
//! real follower binary and the real SmolLM2 model.

#![allow(clippy::unwrap_used)] // tests state expectations by unwrapping

use std::path::Path;
use tracefleet_e2e::{Workspace, model, repo_root};

const NAME: &str = "SmolLM2-135M-Instruct.Q4_1";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A private copy of the test model in the workspace (registering hard-links it, and some tests
/// damage the registered file).
fn model_copy(ws: &Workspace, dir: &str) -> String {
    std::fs::create_dir_all(ws.path(dir)).unwrap();
    let rel = format!("{dir}/{FILE}");
    std::fs::copy(model(), ws.path(&rel)).unwrap();
    rel
}

fn manifest() -> String {
    repo_root()
        .join("models/models.toml")
        .to_string_lossy()
        .into_owned()
}

/// Flips one byte `from_end` bytes before the end of `path` (inside the last tensor's data).
fn flip(path: &Path, from_end: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = f.metadata().unwrap().len() - from_end;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
}

fn registered(ws: &Workspace) -> Vec<serde_json::Value> {
    let r = ws.follower(&["models", "list", "--json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    serde_json::from_str::<serde_json::Value>(&r.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn models_are_checked_before_they_are_registered_and_verified_again_on_demand() {
    let ws = Workspace::new();
    let copy = model_copy(&ws, "incoming");

    // A truncated download: the header reads, the last tensors' data is missing.
    std::fs::create_dir_all(ws.path("short")).unwrap();
    let bytes = std::fs::read(ws.path(&copy)).unwrap();
    std::fs::write(ws.path(&format!("short/{FILE}")), &bytes[..bytes.len() / 2]).unwrap();
    let r = ws.follower(&["models", "add", &format!("short/{FILE}")]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("expected the data of tensor `") && r.stderr.contains("truncated"),
        "{}",
        r.stderr
    );

    // Same size, one byte changed: the manifest's hash refuses it.
    std::fs::create_dir_all(ws.path("swapped")).unwrap();
    let swapped = format!("swapped/{FILE}");
    std::fs::write(ws.path(&swapped), &bytes).unwrap();
    flip(&ws.path(&swapped), 1000);
    let r = ws.follower(&["models", "add", &swapped, "--manifest", &manifest()]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("sha256 is ")
            && r.stderr
                .contains("expected b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 (manifest entry `SmolLM2-135M-Instruct.Q4_1`)"),
        "{}",
        r.stderr
    );
    // Not a model at all.
    std::fs::write(ws.path("page.gguf"), b"<html>404</html>").unwrap();
    let r = ws.follower(&["models", "add", "page.gguf"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("expected the magic \"GGUF\""),
        "{}",
        r.stderr
    );
    // Nothing refused was registered or left behind.
    assert!(registered(&ws).is_empty());
    let models_dir = ws.state_dir().join("models");
    let left: Vec<_> = std::fs::read_dir(&models_dir)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // The real file, matched against the manifest, is registered with what its header says.
    let r = ws.follower(&["models", "add", &copy, "--manifest", &manifest()]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let list = registered(&ws);
    assert_eq!(list.len(), 1);
    let m = &list[0];
    assert_eq!(m["name"], NAME);
    assert_eq!(m["architecture"], "llama");
    assert_eq!(m["quantization"], "Q4_1");
    assert_eq!(m["context_length"], 8192);
    assert_eq!(m["size"], 98_362_432);
    assert_eq!(
        m["sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    assert_eq!(m["license"], "apache-2.0");
    // 134.5 M weights; RAM estimate above the file size.
    let params = m["parameters"].as_u64().unwrap();
    assert!((130_000_000..140_000_000).contains(&params), "{params}");
    assert!(m["ram_needed_bytes"].as_u64().unwrap() > 98_362_432);
    let table = ws.follower(&["models", "list"]);
    assert!(
        table.stdout.contains("Q4_1") && table.stdout.contains(NAME),
        "{}",
        table.stdout
    );

    let r = ws.follower(&["models", "verify"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.starts_with(&format!("ok      {NAME}")),
        "{}",
        r.stdout
    );

    // Edited in place with its old mtime put back (`touch -d`): the status-change time still
    // moved, so a run hashes the file again and refuses it before llama.cpp sees it.
    std::fs::write(ws.path("classify.trace.md"), CLASSIFY).unwrap();
    let file = models_dir.join(FILE);
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    flip(&file, 8192);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
    let r = run_classify(&ws, &[]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("sha256 is "), "{}", r.stderr);
    flip(&file, 8192); // the original bytes again

    // Damaged after registration: verify says which and exits 1.
    flip(&models_dir.join(FILE), 4096);
    let r = ws.follower(&["models", "verify", NAME]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stdout.contains(&format!("FAILED  {NAME}")) && r.stdout.contains("sha256 is "),
        "{}",
        r.stdout
    );

    // Removing unregisters and deletes the file.
    let r = ws.follower(&["models", "remove", NAME]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(registered(&ws).is_empty());
    assert!(!models_dir.join(FILE).exists());
    let r = ws.follower(&["models", "remove", NAME]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("is not registered on this device"),
        "{}",
        r.stderr
    );
}

const CLASSIFY: &str = r#"---
trace_id: classify-line
version: "1.0.0"
goal_signature: classify a log line
---
### Step 1: Classify
**Tool Call**:
```yaml
tool: LLM
parameters:
  system: "You are a Linux administrator. Answer only with JSON."
  prompt: "Is this log line an error? Line: 'kernel: EXT4-fs error (device sda1): remounting read-only'"
  max_tokens: 64
  json_schema:
    type: object
    required: [error, severity]
    additionalProperties: false
    properties:
      error: {type: boolean}
      severity: {enum: [low, medium, high]}
```
"#;

/// The real model with the u32 value of metadata key `key` replaced by `value`.
fn patched(ws: &Workspace, key: &str, value: u32) -> String {
    let mut bytes = std::fs::read(model()).unwrap();
    // key: u64 length, the name, then the u32 type tag (4) and the value.
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    needle.extend_from_slice(&4u32.to_le_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap_or_else(|| panic!("{key} (u32) not found in the model"))
        + needle.len();
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    let name = format!("patched-{}.gguf", key.replace('.', "-"));
    std::fs::write(ws.path(&name), bytes).unwrap();
    name
}

#[test]
fn a_model_whose_hyperparameters_would_crash_llama_cpp_is_refused_before_it_loads() {
    // The hostile probe's files: block_count 1000 aborted llama.cpp (exit 134), context_length
    // 2^32 - 1 panicked in our code, and the unfinished run then crash-looped on every resume.
    let ws = Workspace::new();
    std::fs::write(ws.path("classify.trace.md"), CLASSIFY).unwrap();
    for (key, value) in [
        ("llama.block_count", 1000),
        ("llama.context_length", u32::MAX),
        ("llama.block_count", 31),
    ] {
        let file = patched(&ws, key, value);
        let r = ws.follower(&["models", "add", &file]);
        assert_eq!(r.code, Some(2), "{key}={value}: {r:?}");
        assert!(
            r.stderr.contains(&format!("`{key}`")),
            "{key}: {}",
            r.stderr
        );
        // A run handed the file directly refuses it before any step, without a crash.
        let r = run_classify(&ws, &["--model", &file]);
        assert_eq!(r.code, Some(2), "{key}={value}: {r:?}");
        assert!(
            r.stderr.contains(&format!("`{key}`")),
            "{key}: {}",
            r.stderr
        );
    }
    assert!(registered(&ws).is_empty());
}

fn run_classify(ws: &Workspace, extra: &[&str]) -> tracefleet_e2e::Run {
    let mut args = vec![
        "run",
        "classify.trace.md",
        "--allow-unsigned",
        "--threads",
        "2",
        "--base-dir",
        "w",
        "--json",
    ];
    args.extend_from_slice(extra);
    ws.follower(&args)
}

#[test]
fn runs_use_the_registered_model_constrained_by_a_json_schema_reproducibly() {
    let ws = Workspace::new();
    std::fs::write(ws.path("classify.trace.md"), CLASSIFY).unwrap();

    // No model anywhere: refused before the run starts.
    let r = run_classify(&ws, &[]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("step 1 needs a model") && r.stderr.contains("follower models add"),
        "{}",
        r.stderr
    );
    assert_eq!(ws.run_count(), 0);

    let copy = model_copy(&ws, "incoming");
    let r = ws.follower(&["models", "add", &copy]);
    assert_eq!(r.code, Some(0), "{r:?}");

    // The only registered model serves a step that names none; greedy decoding twice gives
    // the same text, and that text is JSON the schema accepts.
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let r = run_classify(&ws, &[]);
        assert_eq!(r.code, Some(0), "{r:?}");
        let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let step = &report["step_results"][0];
        let llm = &step["llm"];
        assert_eq!(llm["model"], NAME, "{step}");
        assert_eq!(llm["grammar"], true, "{step}");
        assert!(llm["completion_tokens"].as_u64().unwrap() > 0, "{step}");
        assert!(
            llm["generation_tokens_per_sec"].as_f64().unwrap() > 0.0,
            "{step}"
        );
        let out = step["output"].as_str().unwrap().to_owned();
        let v: serde_json::Value = serde_json::from_str(&out).expect("schema-constrained JSON");
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 2, "{out}");
        assert!(o["error"].is_boolean(), "{out}");
        assert!(
            ["low", "medium", "high"].contains(&o["severity"].as_str().unwrap()),
            "{out}"
        );
        outputs.push(out);
    }
    assert_eq!(outputs[0], outputs[1], "greedy generation is reproducible");

    // The registered file changed behind the follower's back: refused before any step runs.
    let runs = ws.run_count();
    flip(&ws.state_dir().join("models").join(FILE), 4096);
    let r = run_classify(&ws, &[]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("sha256 is ") && r.stderr.contains(&format!("registered for `{NAME}`")),
        "{}",
        r.stderr
    );
    assert_eq!(ws.run_count(), runs);
}

#[test]
fn a_model_step_waits_for_memory_then_fails_saying_what_was_short() {
    let ws = Workspace::new();
    std::fs::write(ws.path("classify.trace.md"), CLASSIFY).unwrap();
    let m = model();
    let r = run_classify(
        &ws,
        &[
            "--model",
            m.to_str().unwrap(),
            // Keep a petabyte free: no device has that.
            "--ram-reserve-mb",
            "1000000000",
            "--defer-max",
            "3s",
        ],
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let err = report["step_results"][0]["error"].as_str().unwrap();
    assert!(
        err.contains(&format!("model `{NAME}` deferred for"))
            && err.contains("MiB of RAM plus the 1000000000 MiB reserve"),
        "{err}"
    );
    assert_eq!(report["status"], "failed");
}

#[test]
fn models_bench_measures_prompt_and_generation_speed() {
    let ws = Workspace::new();
    let m = model();
    let r = ws.follower(&[
        "models",
        "bench",
        "--model",
        m.to_str().unwrap(),
        "--threads",
        "2",
        "-p",
        "64",
        "-n",
        "16",
        "-r",
        "2",
        "--json",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let b: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(b["model"], NAME);
    assert_eq!(b["n_threads"], 2);
    assert_eq!(b["n_gpu_layers"], 0);
    for key in ["prompt_tokens_per_sec", "generation_tokens_per_sec"] {
        let v = b[key].as_array().unwrap();
        assert_eq!(v.len(), 2, "{b}");
        // Measured, positive and finite; how fast is the benchmarks' business
        // (docs/benchmarks.md), not a test's: on a loaded 2-core machine generation fell to
        // 0.3 tok/s while the test binary ran other model tests beside it.
        assert!(
            v.iter()
                .all(|x| x.as_f64().is_some_and(|x| x.is_finite() && x > 0.0)),
            "{b}"
        );
    }
    // Prompt processing batches tokens; generation decodes one at a time.
    let mean = |k: &str| {
        let v = b[k].as_array().unwrap();
        v.iter().map(|x| x.as_f64().unwrap()).sum::<f64>() / v.len() as f64
    };
    assert!(
        mean("prompt_tokens_per_sec") > mean("generation_tokens_per_sec"),
        "{b}"
    );
    let table = ws.follower(&[
        "models",
        "bench",
        "--model",
        m.to_str().unwrap(),
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "1",
    ]);
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(
        table.stdout.contains("pp16") && table.stdout.contains("tg4"),
        "{}",
        table.stdout
    );
}
