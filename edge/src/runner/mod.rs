//! A run of a trace on this device, start to finish: which trace (verified again), the run's
//! lock and plan (new, or the continuation of an unfinished one), its models, the read roots
//! (the device's, narrowed by the trace), the host, the signal handling, the Landlock-
//! restricted run thread and the journal, then the report, the outcome and the escalations
//! in the store.
//!
//! Two invariants live here:
//! - **A step's result is journaled before the next step starts.** The interpreter runs on
//!   its own thread; each finished step's record travels to the calling thread, which writes
//!   it to the store and only then lets the run thread go on (`run_journaled`). A start
//!   record is written while the step runs (resuming never depends on it).
//! - **The store is out of the run's reach.** The run thread restricts itself with Landlock
//!   to the base directory and the read roots before the interpreter starts; only the calling
//!   thread, which is not restricted, writes the store.

mod fidelity;
mod load;
mod models;
#[cfg(test)]
mod tests;

pub use fidelity::{StepFidelity, measure_fidelity};
pub use load::{Loaded, MIN_GOAL_SIMILARITY, load_trace, select_by_goal, verify_signed};
pub use models::{registered_spec, run_models};

use crate::effects::{Completed, Host};
use crate::exec::{self, Event, RunContext};
use crate::host::{DEFAULT_READ_ROOTS, LocalHost, Stopper};
use crate::infer::{InferConfig, Inference};
use crate::sandbox::{self, ResourceLimits, StepCaps, cgroup};
use crate::store::{NewRun, Store, StoreError, Unfinished};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracefleet::Trace;
use tracefleet::compile;
use tracefleet::report::{Protection, Report, RunStatus, StepResult};
use tracefleet::time::rfc3339_now;

/// How a run executes (`run` and `resume`), resolved from the command line.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// The default model file for LLM steps that name none (else the registry's).
    pub model: Option<PathBuf>,
    /// How the inference thread runs.
    pub infer: InferConfig,
    /// This device's id in the report (else the enrolled id, else the host name).
    pub device_id: Option<tracefleet::ids::DeviceId>,
    /// The device's read roots (empty: [`DEFAULT_READ_ROOTS`]).
    pub read_roots: Vec<PathBuf>,
    /// Time limit for the whole run.
    pub timeout: Option<Duration>,
    /// Memory cap of one step's processes together, MiB (default: half the device's memory).
    pub step_memory_mib: Option<u64>,
    /// Process cap of one step (default 512).
    pub step_pids: Option<u64>,
}

/// What to run: a new run of a named trace or of the trace matching a goal.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// An installed trace id or a trace file.
    pub trace: Option<PathBuf>,
    /// Pick the installed trace for this goal instead.
    pub goal: Option<String>,
    /// The trace's inputs as given.
    pub vars: Vec<(String, String)>,
    /// The run's working directory (default `<state-dir>/runs/<run-id>`).
    pub base_dir: Option<PathBuf>,
    /// Do not continue an unfinished run of the same trace and inputs.
    pub fresh: bool,
    /// Run sources and unsigned compiled traces (for authors).
    pub allow_unsigned: bool,
    /// The new run's id (default: a fresh UUIDv7).
    pub run_id: Option<String>,
}

/// An exclusive lock on a run, held by the process executing it (`flock(2)` on
/// `<state-dir>/locks/<run-id>`): a run whose lock is free and whose status is `running` was
/// left by a process that ended without finishing it.
struct RunLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
    path: PathBuf,
}

impl RunLock {
    /// The lock, or `None` when another process holds it.
    fn try_acquire(state_dir: &Path, run_id: &str) -> Result<Option<Self>> {
        let dir = state_dir.join("locks");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(run_id);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Self { _lock: lock, path })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(anyhow!("locking {}: {e}", path.display())),
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A run about to execute, new or resumed, holding its store connection (one per command:
/// each close of the last one checkpoints the WAL) and its lock.
pub struct Prepared {
    store: Store,
    lock: RunLock,
    run_id: String,
    base_dir: PathBuf,
    inputs: BTreeMap<String, String>,
    /// Steps journaled by an earlier attempt of this run.
    done: BTreeMap<u32, Completed>,
    resumes: u32,
    loaded: Loaded,
}

impl Prepared {
    /// Continues `run_id` from its journal, counting the resume in the store.
    fn resumed(
        store: Store,
        lock: RunLock,
        run_id: &str,
        unfinished: Unfinished,
        loaded: Loaded,
    ) -> Result<Self> {
        let resumes = store.mark_resumed(run_id)?;
        Ok(Self {
            store,
            lock,
            run_id: run_id.to_owned(),
            base_dir: PathBuf::from(unfinished.base_dir),
            inputs: unfinished.inputs,
            done: unfinished.done,
            resumes,
            loaded,
        })
    }

    /// The run's id.
    #[must_use]
    pub fn run_id(&self) -> &str {
        &self.run_id
    }
}

/// Prepares a new run — or, after a crash (power loss, SIGKILL), the continuation of the
/// unfinished run of the same trace version with the same inputs (unless `fresh`; with a base
/// directory, only the run in that directory), so its completed steps are not repeated. A run
/// still going in another process holds its lock and is left alone; one whose process died
/// twice in a row at the same step is not resumed (a crash loop: an error says so). Notices for the operator (compiler
/// warnings, the resume) go to `notice`.
///
/// # Errors
/// The trace cannot be loaded or verified, is not supported, its inputs do not resolve, or
/// the run is locked.
pub fn prepare(
    state_dir: &Path,
    req: RunRequest,
    notice: &mut dyn FnMut(&str),
) -> Result<Prepared> {
    let store = Store::open(state_dir)?;
    let loaded = match (&req.goal, &req.trace) {
        (Some(goal), _) => select_by_goal(&store, goal)?,
        (None, Some(path)) => load_trace(&store, path, req.allow_unsigned, notice)?,
        (None, None) => bail!("name a trace or give --goal TEXT"),
    };
    let trace = &loaded.trace;
    exec::check_supported(trace).map_err(|e| anyhow!("cannot run trace {}: {e}", trace.id))?;
    let given: BTreeMap<String, String> = req.vars.into_iter().collect();
    let inputs =
        exec::resolve_inputs(trace, &given).with_context(|| format!("trace {}", trace.id))?;

    if !req.fresh {
        let version = trace.version.to_string();
        // With --base-dir, only the unfinished run in that directory continues.
        let wanted = req
            .base_dir
            .as_deref()
            .map(|b| b.canonicalize().unwrap_or(b.to_owned()));
        for id in store.running_like(trace.id.as_str(), &version, &inputs)? {
            if let Some(lock) = RunLock::try_acquire(state_dir, &id)? {
                let Some(unfinished) = store.unfinished(&id)? else {
                    continue;
                };
                if wanted
                    .as_deref()
                    .is_some_and(|w| Path::new(&unfinished.base_dir) != w)
                {
                    continue;
                }
                let crash = store.note_crash(&id)?;
                if crash.count >= 2 {
                    let at = crash
                        .step
                        .map_or_else(|| "between steps".to_owned(), |s| format!("at step {s}"));
                    bail!(
                        "run {id} of {} {version} was interrupted {} times in a row {at} (the follower was killed or crashed there): not resuming it automatically, which could loop; `follower runs show {id}` shows its journal, `follower resume {id}` tries again, `--fresh` starts a new run",
                        trace.id,
                        crash.count
                    );
                }
                notice(&format!(
                    "resuming run {id}: it did not finish (the follower was killed or the device lost power); --fresh starts a new run"
                ));
                return Prepared::resumed(store, lock, &id, unfinished, loaded);
            }
        }
    }

    let run_id = req
        .run_id
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let base_dir = req
        .base_dir
        .unwrap_or_else(|| state_dir.join("runs").join(&run_id));
    let lock = RunLock::try_acquire(state_dir, &run_id)?
        .ok_or_else(|| anyhow!("run {run_id} is locked by another process"))?;
    Ok(Prepared {
        store,
        lock,
        run_id,
        base_dir,
        inputs,
        done: BTreeMap::new(),
        resumes: 0,
        loaded,
    })
}

/// Prepares the continuation of a stopped or interrupted run: its stored trace verified
/// again (or, unsigned, only with `allow_unsigned`), its inputs and journal.
///
/// # Errors
/// No such unfinished run, it is running elsewhere, or its trace no longer verifies.
pub fn prepare_resume(state_dir: &Path, run_id: &str, allow_unsigned: bool) -> Result<Prepared> {
    let store = Store::open(state_dir)?;
    let Some(unfinished) = store.unfinished(run_id)? else {
        bail!(
            "no stopped or interrupted run {run_id}: a finished run cannot be resumed (see `follower runs list`)"
        );
    };
    let lock = RunLock::try_acquire(state_dir, run_id)?
        .ok_or_else(|| anyhow!("run {run_id} is still running in another follower process"))?;
    let loaded = if unfinished.signed {
        // Verified again: the root may have rotated or the signature expired since.
        let (v, _) = verify_signed(&store, &unfinished.trace_file)
            .with_context(|| format!("refusing to resume run {run_id}"))?;
        Loaded::signed(
            v.trace,
            "resumed, verified".into(),
            unfinished.trace_file.clone(),
        )
    } else {
        if !allow_unsigned {
            bail!("run {run_id} is of an unsigned trace: resuming it needs --allow-unsigned again");
        }
        let trace = compile::decode_compiled(&unfinished.trace_file)
            .with_context(|| format!("the trace stored with run {run_id}"))?;
        Loaded::unsigned(trace, "resumed, UNSIGNED")
    };
    if loaded.trace.id.as_str() != unfinished.trace_id
        || loaded.trace.version.to_string() != unfinished.trace_version
    {
        bail!(
            "run {run_id} ran {} {}, but its stored trace is {} {}",
            unfinished.trace_id,
            unfinished.trace_version,
            loaded.trace.id,
            loaded.trace.version
        );
    }
    exec::check_supported(&loaded.trace)
        .map_err(|e| anyhow!("cannot run trace {}: {e}", loaded.trace.id))?;
    Prepared::resumed(store, lock, run_id, unfinished, loaded)
}

/// A run that executed (successfully or not).
#[derive(Debug)]
pub struct Finished {
    /// The report, as stored.
    pub report: Report,
    /// How the trace was obtained, for the summary.
    pub provenance: String,
}

/// The read roots of a run: the device's, narrowed by the trace's `read_paths` — a trace may
/// narrow them, never widen them.
///
/// # Errors
/// A read path of the trace lies outside every device root.
pub fn narrow_read_roots(trace: &Trace, device_roots: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    if trace.read_paths.is_empty() {
        return Ok(device_roots);
    }
    let mut narrowed = Vec::new();
    for r in &trace.read_paths {
        let p = PathBuf::from(r);
        if !device_roots.iter().any(|d| p.starts_with(d)) {
            bail!(
                "cannot run trace {}: it reads {r}, outside this device's read roots [{}]",
                trace.id,
                device_roots
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        narrowed.push(p);
    }
    Ok(narrowed)
}

/// The context of an error that came after a run began executing: steps up to it may have
/// run (and stay journaled, so `follower run` or `follower resume` continues the run), so the
/// command's exit code is 1 (the run executed and did not succeed), never 2 (nothing ran).
/// Found with `anyhow::Error::downcast_ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterStart {
    /// The run.
    pub run_id: String,
}

impl AfterStart {
    fn new(run_id: &str) -> Self {
        Self {
            run_id: run_id.to_owned(),
        }
    }
}

impl std::fmt::Display for AfterStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} stopped after it began (the steps before this error ran and are journaled; `follower runs show {}`)",
            self.run_id, self.run_id
        )
    }
}

/// Executes a prepared run: the report is stored, and for a verified trace that did not stop
/// the outcome counts in the version's statistics and each escalation is recorded.
///
/// # Errors
/// Setting the run up failed (models, base directory, store); or, with [`AfterStart`] in
/// the chain, the run thread panicked, the journal could not be written (the run was stopped
/// then and left to resume, as after a crash) or the report could not be stored.
pub fn execute(state_dir: &Path, prepared: Prepared, opts: &ExecOptions) -> Result<Finished> {
    let Prepared {
        mut store,
        lock: _lock,
        run_id,
        base_dir,
        inputs,
        done,
        resumes,
        loaded,
    } = prepared;
    let trace = &loaded.trace;
    let mut step_models = BTreeMap::new();
    let inference = if trace.llm_steps().next().is_none() {
        None
    } else {
        let (specs, default) = run_models(&store, state_dir, trace, opts.model.as_deref())?;
        step_models = step_model_names(trace, default.as_deref());
        Some(Inference::start(opts.infer.clone(), specs, default)?)
    };
    let fidelity = known_fidelity(&store, trace, &step_models)?;
    let device_roots: Vec<PathBuf> = if opts.read_roots.is_empty() {
        DEFAULT_READ_ROOTS.iter().map(PathBuf::from).collect()
    } else {
        opts.read_roots.clone()
    };
    let read_roots = narrow_read_roots(trace, device_roots)?;
    let limits = ResourceLimits::default();
    let caps = StepCaps::with_overrides(
        crate::telemetry::sample().mem_total_bytes,
        opts.step_memory_mib,
        opts.step_pids,
    );
    let (containment, containment_protections) = contain_steps(state_dir, &run_id, trace, caps);
    let stopper = Stopper::default();
    let mut host = LocalHost::new(&base_dir, &read_roots, inference)
        .with_context(|| format!("base directory {}", base_dir.display()))?
        .with_limits(limits)
        .with_containment(containment.clone())
        .with_stopper(stopper.clone());
    if let Some(t) = opts.timeout {
        host = host.with_deadline(t);
    }
    let device_id = match &opts.device_id {
        Some(id) => Some(id.clone()),
        None => store.device_id()?,
    };
    // Else the host name, when it is a valid device id (host names are), else `unknown`.
    let device_id = match device_id {
        Some(id) => id,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .and_then(|h| h.parse().ok())
            .map_or_else(|| "unknown".parse(), Ok)?,
    };
    let cx = RunContext {
        run_id: run_id.clone(),
        device_id,
        base_dir: host.base_dir().display().to_string(),
        fidelity: fidelity.clone(),
    };
    let policy = sandbox::Policy {
        base_dir: host.base_dir().to_owned(),
        read_roots: host.read_roots().to_vec(),
        network: trace.metadata.requires_internet,
    };
    let mut protections = static_protections(trace, &policy, limits, opts.timeout);
    protections.extend(containment_protections);
    let telemetry_start = crate::telemetry::sample();

    if resumes == 0 {
        store.begin_run(&NewRun {
            run_id: &run_id,
            trace_id: trace.id.as_str(),
            version: &trace.version.to_string(),
            started_at: &rfc3339_now(),
            base_dir: &cx.base_dir,
            trace_file: &loaded.file,
            signed: loaded.signed,
            inputs: &inputs,
        })?;
    }

    let signals = SignalThread::start(stopper.clone())?;
    let journaled = run_journaled(
        trace,
        &cx,
        &inputs,
        &done,
        &mut host,
        Some(&policy),
        &stopper,
        &mut |result, output| match output {
            None => store.record_step_start(&run_id, result),
            Some(output) => store.record_step(&run_id, result, output),
        },
    );
    signals.stop();
    if let Some(c) = &containment.cgroups {
        c.remove();
    }
    let Journaled {
        mut report,
        landlock,
        journal_error,
    } = journaled.context(AfterStart::new(&run_id))?;
    if let Some(e) = journal_error {
        // Left `running`, as after a crash: the next `follower run` of it continues from the
        // last step journaled (a full disk that has room again loses nothing).
        return Err(anyhow::Error::new(e)
            .context("journaling the run")
            .context(AfterStart::new(&run_id)));
    }

    protections.extend(landlock);
    report.protections = protections;
    report.resumes = resumes;
    report.telemetry_start = Some(telemetry_start);
    report.telemetry_end = Some(crate::telemetry::sample());
    record_finished(&mut store, &report, loaded.signed).context(AfterStart::new(&run_id))?;
    // Fidelity measured in this run is kept for the next (source runs included: the step's
    // digest changes when the author edits it).
    for f in report
        .fidelity
        .iter()
        .filter(|f| !fidelity.contains_key(&f.step))
    {
        if let Some(step) = trace.steps.iter().find(|s| s.number == f.step) {
            store
                .record_fidelity(
                    trace.id.as_str(),
                    &trace.version.to_string(),
                    &step_digest(step),
                    f,
                    &rfc3339_now(),
                )
                .context(AfterStart::new(&run_id))?;
        }
    }
    Ok(Finished {
        report,
        provenance: loaded.provenance,
    })
}

/// The model each LLM step uses: the one it names, else the run's default.
fn step_model_names(trace: &Trace, default: Option<&str>) -> BTreeMap<u32, String> {
    trace
        .steps
        .iter()
        .filter_map(|s| match &s.tool {
            tracefleet::trace::Tool::Llm(c) => c
                .model
                .as_deref()
                .or(default)
                .map(|m| (s.number, m.to_owned())),
            _ => None,
        })
        .collect()
}

/// SHA-256 (hex) of a step's compiled form: a fidelity record holds while it is unchanged.
fn step_digest(step: &tracefleet::trace::Step) -> String {
    use sha2::Digest;
    let bytes = postcard::to_allocvec(&step.tool).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The fidelity already measured for this trace version, with the model each step uses.
fn known_fidelity(
    store: &Store,
    trace: &Trace,
    models: &BTreeMap<u32, String>,
) -> Result<BTreeMap<u32, tracefleet::judgement::Fidelity>, StoreError> {
    let mut out = BTreeMap::new();
    for step in trace.llm_steps() {
        let Some(model) = models.get(&step.number) else {
            continue;
        };
        if let Some(f) = store.fidelity(
            trace.id.as_str(),
            &trace.version.to_string(),
            step.number,
            model,
            &step_digest(step),
        )? {
            out.insert(step.number, f);
        }
    }
    Ok(out)
}

/// Stores the report; for a verified trace that did not stop, counts the outcome in the
/// version's statistics and records each escalation. Statistics are kept for verified traces
/// only: author runs of sources do not count, and a stopped run is not an outcome.
fn record_finished(store: &mut Store, report: &Report, signed: bool) -> Result<(), StoreError> {
    store.finish_run(report)?;
    if signed && report.status != RunStatus::Stopped {
        let success = report.status == RunStatus::Success;
        store.record_outcome(
            &report.trace_id,
            &report.trace_version,
            success,
            &rfc3339_now(),
        )?;
        for e in &report.escalations {
            let reason = format!("step {}: {} ({})", e.step, e.message, e.error);
            store.record_escalation(
                &report.trace_id,
                Some(&report.run_id),
                &reason,
                &rfc3339_now(),
            )?;
        }
    }
    Ok(())
}

/// SIGINT/SIGTERM handling for one run: the first stops after the current step, the second
/// aborts it (through the host's [`Stopper`]).
struct SignalThread {
    handle: signal_hook::iterator::Handle,
    thread: std::thread::JoinHandle<()>,
}

impl SignalThread {
    fn start(stopper: Stopper) -> Result<Self> {
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])
        .context("installing the signal handlers")?;
        let handle = signals.handle();
        let thread = std::thread::spawn(move || {
            for sig in signals.forever() {
                stopper.request();
                let what = if stopper.level() == 1 {
                    "stopping after the current step (send it again to abort the step)"
                } else {
                    "aborting the current step"
                };
                eprintln!("follower: signal {sig}: {what}");
            }
        });
        Ok(Self { handle, thread })
    }

    fn stop(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}

/// A journal entry on its way from the sandboxed run thread to the store — a step's record
/// with its full output when it finished, without when it starts — and, for a finished step,
/// the channel that tells the run thread it was written. A start is written while the step
/// runs (resuming does not depend on it: a step without a result runs again either way); a
/// result is written before the next step starts.
type JournalEntry = (
    StepResult,
    Option<String>,
    Option<std::sync::mpsc::SyncSender<()>>,
);

/// Writes one journal record: a step's start (no output) or its result (its full output).
pub(crate) type JournalWriter<'a> =
    dyn FnMut(&StepResult, Option<&str>) -> Result<(), StoreError> + 'a;

/// What [`run_journaled`] returns.
#[derive(Debug)]
pub(crate) struct Journaled {
    /// The interpreter's report.
    pub(crate) report: Report,
    /// What the run thread's Landlock restriction put in force (empty without a policy).
    pub(crate) landlock: Vec<Protection>,
    /// The first journal write that failed (the run was stopped then).
    pub(crate) journal_error: Option<StoreError>,
}

/// Runs the interpreter on its own thread — restricted by Landlock to `policy` first, when
/// given, with every process it starts — while the calling thread, outside the sandbox,
/// writes the journal through `journal` (a start: no output; a result: the full output). A
/// finished step's result is written before the run thread goes on; a journal write that
/// fails stops the run (without a journal it could not be resumed faithfully).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_journaled(
    trace: &Trace,
    cx: &RunContext,
    inputs: &BTreeMap<String, String>,
    done: &BTreeMap<u32, Completed>,
    host: &mut (dyn Host + Send),
    policy: Option<&sandbox::Policy>,
    stopper: &Stopper,
    journal: &mut JournalWriter<'_>,
) -> Result<Journaled> {
    let (journal_tx, journal_rx) = std::sync::mpsc::channel::<JournalEntry>();
    let mut journal_error = None;
    let (report, landlock) = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let landlock = policy
                .map(sandbox::restrict_current_thread)
                .unwrap_or_default();
            let journal_tx = journal_tx;
            let report = exec::resume(trace, cx, inputs, done, host, &mut |event| match event {
                Event::StepStarted(result) => {
                    let _ = journal_tx.send((result.clone(), None, None));
                }
                Event::StepFinished(result, output) => {
                    let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
                    let entry = (result.clone(), Some(output.to_owned()), Some(ack_tx));
                    if journal_tx.send(entry).is_ok() {
                        let _ = ack_rx.recv();
                    }
                }
                // Kept in the report; stored when the run ends (a crash only costs a
                // measurement again).
                Event::FidelityMeasured(_) => {}
            });
            (report, landlock)
        });
        for (result, output, ack) in journal_rx {
            if let Err(e) = journal(&result, output.as_deref()) {
                stopper.request();
                journal_error.get_or_insert(e);
            }
            if let Some(ack) = ack {
                let _ = ack.send(());
            }
        }
        worker.join()
    })
    .map_err(|_| anyhow!("the run thread panicked"))?;
    Ok(Journaled {
        report,
        landlock,
        journal_error,
    })
}

/// The run's step cgroups and seccomp filter, with what they put in force for the report.
///
/// First, the cgroups left by runs of this state directory whose follower died (their lock is
/// free) are killed and removed, so that no step of a dead follower runs on beside a resumed
/// run.
fn contain_steps(
    state_dir: &Path,
    run_id: &str,
    trace: &Trace,
    caps: StepCaps,
) -> (sandbox::Containment, Vec<Protection>) {
    let plan = cgroup::Plan::new(
        &cgroup::current_layout(),
        std::env::var(cgroup::ROOT_ENV).ok().as_deref(),
        &cgroup::state_key(state_dir),
    );
    let cleaned = cgroup::sweep(&plan.tops(), &|run| {
        run == run_id || matches!(RunLock::try_acquire(state_dir, run), Ok(Some(_)))
    });
    if !cleaned.is_empty() {
        tracing::info!(runs = ?cleaned, "killed the processes left by earlier runs");
    }
    let slots = usize::try_from(trace.max_parallel).unwrap_or(1);
    let (cgroups, mut protections) = match plan.setup(run_id, slots, caps) {
        Ok(setup) => {
            let p = setup.protections();
            (Some(Arc::new(setup)), p)
        }
        Err(e) => (None, plan.unavailable(&e, caps)),
    };
    let (programs, seccomp) = sandbox::seccomp::programs(trace.metadata.requires_internet);
    protections.push(seccomp);
    (
        sandbox::Containment {
            cgroups,
            seccomp: Arc::new(programs),
        },
        protections,
    )
}

/// The protections that do not depend on the kernel, for the report.
fn static_protections(
    trace: &Trace,
    policy: &sandbox::Policy,
    limits: ResourceLimits,
    timeout: Option<Duration>,
) -> Vec<Protection> {
    let bash: Vec<&tracefleet::trace::Step> = trace
        .steps
        .iter()
        .filter(|s| matches!(s.tool, tracefleet::trace::Tool::Bash { .. }))
        .collect();
    let restricted = bash.iter().filter(|s| s.allowed_commands.is_some()).count();
    let no_subst = bash.iter().filter(|s| !s.command_substitution).count();
    let p = |name: &str, active: bool, detail: String| Protection {
        name: name.into(),
        active,
        detail,
    };
    vec![
        p(
            "path policy",
            true,
            format!(
                "writes inside {}; reads there and in [{}]; `..` and symlink escapes refused",
                policy.base_dir.display(),
                policy
                    .read_roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        p(
            "scrubbed environment",
            true,
            "Bash steps see PATH, HOME, LANG, LC_ALL, TMPDIR, TRACEFLEET_BASE_DIR and their TF_VAR_* values only".into(),
        ),
        p(
            "allowed_commands",
            restricted > 0,
            format!(
                "{restricted} of {} Bash steps restricted to their allowed commands (checked with a POSIX shell parser)",
                bash.len()
            ),
        ),
        p(
            "no command substitution",
            no_subst > 0,
            format!("refused in {no_subst} of {} Bash steps", bash.len()),
        ),
        limits.protection(nix::unistd::geteuid().is_root()),
        p(
            "timeouts",
            true,
            match timeout {
                Some(t) => format!(
                    "per step (the trace's timeout_secs); whole run {}",
                    humantime::format_duration(t)
                ),
                None => "per step (the trace's timeout_secs); no run limit".into(),
            },
        ),
    ]
}
