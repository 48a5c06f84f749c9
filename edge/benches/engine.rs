//! Interpreter overhead per step, without processes: `exec::run` over a trace of trivial Write
//! steps on an in-memory host, against the same writes done by a plain loop on the same host.
//!
//! `cargo bench -p follower --bench engine`; results in docs/benchmarks.md.

#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use follower::exec::{self, FileKind, GenerateRequest, Generation, Host, RunContext, ShellOutput};
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::time::{Duration, Instant};

const STEPS: usize = 1000;

/// Files in a map; no processes, no model.
struct MemHost {
    files: HashMap<String, String>,
    origin: Instant,
}

impl Host for MemHost {
    fn read_file(&mut self, p: &str, _: Option<u64>, _: Option<u64>) -> Result<String, String> {
        self.files
            .get(p)
            .cloned()
            .ok_or_else(|| format!("{p}: missing"))
    }
    fn write_file(&mut self, p: &str, c: &str) -> Result<(), String> {
        self.files.insert(p.to_owned(), c.to_owned());
        Ok(())
    }
    fn file_kind(&mut self, p: &str) -> Result<FileKind, String> {
        Ok(self
            .files
            .get(p)
            .map_or(FileKind::Missing, |c| FileKind::File(c.len() as u64)))
    }
    fn list_files(&mut self, _: &str) -> Result<Vec<String>, String> {
        Ok(self.files.keys().cloned().collect())
    }
    fn shell(
        &mut self,
        _: &str,
        _: &[(String, String)],
        _: Duration,
    ) -> Result<ShellOutput, String> {
        Err("no shell in this benchmark".into())
    }
    fn generate(&mut self, _: &GenerateRequest) -> Result<Generation, String> {
        Err("no model in this benchmark".into())
    }
    fn sleep(&mut self, _: Duration) {}
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
    fn timestamp(&self) -> String {
        "2026-11-21T00:00:00Z".into()
    }
}

fn trace() -> tracefleet::Trace {
    let mut src = String::from(
        "---\ntrace_id: bench\nversion: \"1.0.0\"\ngoal_signature: engine overhead\n---\n",
    );
    for i in 1..=STEPS {
        src.push_str(&format!(
            "### Step {i}: write {i}\n**Tool Call**:\n```yaml\ntool: Write\nparameters:\n  file_path: f{i}.txt\n  content: \"step {i} of {{run_id}}\"\n```\n**Validation**:\n```yaml\n- type: content_not_empty\n```\n"
        ));
    }
    tracefleet::compile_source("bench.trace.md", &src)
        .unwrap_or_else(|d| panic!("{d}"))
        .0
}

fn bench(c: &mut Criterion) {
    let t = trace();
    let cx = RunContext {
        run_id: "r".into(),
        device_id: "d".parse().expect("a device id"),
        base_dir: "/b".into(),
        fidelity: Default::default(),
    };
    let inputs = exec::resolve_inputs(&t, &BTreeMap::new()).expect("inputs");
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(STEPS as u64));
    g.bench_function("plain loop: 1000 writes", |b| {
        b.iter(|| {
            let mut h = MemHost {
                files: HashMap::new(),
                origin: Instant::now(),
            };
            for i in 1..=STEPS {
                let content = format!("step {i} of r");
                h.write_file(&format!("f{i}.txt"), &content).expect("write");
                assert!(!content.is_empty());
            }
            black_box(h.files.len())
        });
    });
    g.bench_function("exec::run: 1000 Write steps", |b| {
        b.iter(|| {
            let mut h = MemHost {
                files: HashMap::new(),
                origin: Instant::now(),
            };
            let r = exec::run(&t, &cx, &inputs, &mut h, &mut |_| {});
            assert_eq!(r.completed_steps as usize, STEPS);
            black_box(r)
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
