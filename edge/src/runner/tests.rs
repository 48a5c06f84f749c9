//! The runner's invariants, with a scripted host on the run thread: results journaled before
//! the next step starts, the store out of the run thread's reach, read roots only narrowed.

use super::*;
use crate::effects::{FileKind, GenerateRequest, Generation, Interruption, ShellOutput};
use std::sync::{Arc, Mutex};

/// What the journal holds: (step, finished) in write order.
type Written = Arc<Mutex<Vec<(u32, bool)>>>;

/// A host whose shell answers `ok` and, for each command, notes what the journal held when
/// it started, and whether the store's file could be opened from the run's thread.
struct Probe {
    journal: Written,
    seen_at_start: Vec<(String, Vec<(u32, bool)>)>,
    store_file: Option<PathBuf>,
    store_opened: Vec<std::io::Result<()>>,
    /// Shared with the runner, as [`LocalHost`]'s is.
    stopper: Stopper,
}

impl Host for Probe {
    fn read_file(&mut self, path: &str, _: Option<u64>, _: Option<u64>) -> Result<String, String> {
        Err(format!("no file {path}"))
    }
    fn write_file(&mut self, _: &str, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn file_kind(&mut self, _: &str) -> Result<FileKind, String> {
        Ok(FileKind::Missing)
    }
    fn list_files(&mut self, _: &str) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
    fn shell(
        &mut self,
        command: &str,
        _: &[(String, String)],
        _: Duration,
    ) -> Result<ShellOutput, String> {
        let journal = self.journal.lock().unwrap().clone();
        self.seen_at_start.push((command.to_owned(), journal));
        if let Some(f) = &self.store_file {
            self.store_opened.push(std::fs::File::open(f).map(drop));
        }
        Ok(ShellOutput {
            signal: None,
            stdout: "ok\n".into(),
            stderr: String::new(),
            exit_code: Some(0),
        })
    }
    fn generate(&mut self, _: &GenerateRequest) -> Result<Generation, String> {
        Err("no model in this test".into())
    }
    fn sleep(&mut self, _: Duration) {}
    fn monotonic(&self) -> Duration {
        Duration::ZERO
    }
    fn timestamp(&self) -> String {
        "2026-11-21T00:00:00Z".into()
    }
    fn interruption(&self) -> Option<Interruption> {
        (self.stopper.level() > 0).then_some(Interruption::Stop)
    }
}

fn probe(store_file: Option<PathBuf>) -> (Probe, Written) {
    let journal = Written::default();
    let host = Probe {
        journal: journal.clone(),
        seen_at_start: Vec::new(),
        store_file,
        store_opened: Vec::new(),
        stopper: Stopper::default(),
    };
    (host, journal)
}

/// Three Bash steps, each after the one before.
fn three_steps() -> Trace {
    let mut src = String::from("---\ntrace_id: t\nversion: \"1.0\"\ngoal_signature: g\n---\n");
    for n in 1..=3 {
        src.push_str(&format!(
            "### Step {n}: s{n}\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo {n}\n```\n"
        ));
    }
    tracefleet::compile_source("t.trace.md", &src)
        .unwrap_or_else(|d| panic!("{d}"))
        .0
}

fn cx() -> RunContext {
    RunContext {
        run_id: "r".into(),
        device_id: "d".parse().unwrap(),
        base_dir: "/b".into(),
        fidelity: BTreeMap::new(),
    }
}

#[test]
fn a_steps_result_is_journaled_before_the_next_step_starts() {
    let trace = three_steps();
    let (mut host, journal) = probe(None);
    let written = journal.clone();
    let out = run_journaled(
        &trace,
        &cx(),
        &BTreeMap::new(),
        &BTreeMap::new(),
        &mut host,
        None,
        &Stopper::default(),
        &mut |result, output| {
            // A slow store: the run thread must wait for it, not race ahead.
            std::thread::sleep(Duration::from_millis(20));
            written
                .lock()
                .unwrap()
                .push((result.step, output.is_some()));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(out.report.status, RunStatus::Success);
    assert!(out.journal_error.is_none());
    assert_eq!(host.seen_at_start.len(), 3);
    for (command, seen) in &host.seen_at_start {
        let n: u32 = command.trim_start_matches("echo ").parse().unwrap();
        for earlier in 1..n {
            assert!(
                seen.contains(&(earlier, true)),
                "step {n} started before step {earlier}'s result was journaled: {seen:?}"
            );
        }
        assert!(!seen.contains(&(n, true)), "{seen:?}");
    }
    let all = journal.lock().unwrap().clone();
    for n in 1..=3 {
        assert!(all.contains(&(n, true)), "{all:?}");
    }
}

#[test]
fn a_journal_that_cannot_be_written_stops_the_run() {
    let trace = three_steps();
    let (mut host, _) = probe(None);
    let stopper = host.stopper.clone();
    let out = run_journaled(
        &trace,
        &cx(),
        &BTreeMap::new(),
        &BTreeMap::new(),
        &mut host,
        None,
        &stopper,
        &mut |_, _| Err(StoreError::Files("disk full".into())),
    )
    .unwrap();
    assert_eq!(out.report.status, RunStatus::Stopped);
    assert!(matches!(out.journal_error, Some(StoreError::Files(_))));
    assert_eq!(
        host.seen_at_start.len(),
        1,
        "no step starts after the failed write"
    );
}

#[test]
fn the_store_is_out_of_the_run_threads_reach() {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path()).unwrap();
    let db = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "db"))
        .expect("the store's database file");
    // The default base directory lies inside the state directory, beside the store.
    let base = state.path().join("runs").join("r");
    std::fs::create_dir_all(&base).unwrap();
    let policy = sandbox::Policy {
        base_dir: base.clone(),
        read_roots: DEFAULT_READ_ROOTS.iter().map(PathBuf::from).collect(),
        network: false,
    };
    let trace = three_steps();
    store
        .begin_run(&NewRun {
            run_id: "r",
            trace_id: "t",
            version: "1.0.0",
            started_at: "2026-11-21T00:00:00Z",
            base_dir: &base.display().to_string(),
            trace_file: b"",
            signed: false,
            inputs: &BTreeMap::new(),
        })
        .unwrap();
    let (mut host, _) = probe(Some(db.clone()));
    let out = run_journaled(
        &trace,
        &cx(),
        &BTreeMap::new(),
        &BTreeMap::new(),
        &mut host,
        Some(&policy),
        &Stopper::default(),
        &mut |result, output| match output {
            None => store.record_step_start("r", result),
            Some(output) => store.record_step("r", result, output),
        },
    )
    .unwrap();
    // The journal (this thread) was written while the run went on.
    assert!(out.journal_error.is_none());
    assert_eq!(out.report.status, RunStatus::Success);
    assert_eq!(store.unfinished("r").unwrap().unwrap().done.len(), 3);
    // The run's thread could not open the store, wherever Landlock is in force.
    let enforced = out
        .landlock
        .iter()
        .any(|p| p.name == "landlock" && p.active);
    assert_eq!(host.store_opened.len(), 3);
    if enforced {
        for r in &host.store_opened {
            let e = r.as_ref().expect_err("the run thread opened the store");
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        }
    } else {
        eprintln!("Landlock not in force on this kernel: {:?}", out.landlock);
    }
    // And this thread still can.
    assert!(std::fs::File::open(&db).is_ok());
}

#[test]
fn a_trace_narrows_the_read_roots_and_never_widens_them() {
    let mut trace = three_steps();
    let device = vec![PathBuf::from("/var/log"), PathBuf::from("/etc")];
    assert_eq!(narrow_read_roots(&trace, device.clone()).unwrap(), device);
    trace.read_paths = vec!["/var/log/app".into()];
    assert_eq!(
        narrow_read_roots(&trace, device.clone()).unwrap(),
        [PathBuf::from("/var/log/app")]
    );
    trace.read_paths = vec!["/var/log/app".into(), "/home".into()];
    let e = narrow_read_roots(&trace, device).unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot run trace t: it reads /home, outside this device's read roots [/var/log, /etc]"
    );
}
