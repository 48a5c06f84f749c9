//! The real tools behind [`crate::effects::Host`]: files, shell commands and the model.
//!
//! Path policy: relative paths resolve inside the run's base directory. Reads may also reach
//! the device's read-only roots (default `/var/log`, `/etc`, `/usr/share`), because traces
//! work on the device's real data. Writes must stay inside the base directory: `..`
//! components and symlinks that lead out are refused. Paths are canonicalised before the check,
//! so a symlink cannot smuggle a read out of the allowed roots either.
//!
//! Shell commands run as `/bin/sh -c` (a simple command without the shell, as GNU make does:
//! see [`tracefleet::shell::direct_argv`]) in the base directory, in their own process group, with
//! a scrubbed environment, stdin from /dev/null, capped output and a timeout (SIGTERM to the
//! group, then SIGKILL after a grace period). Processes the step leaves behind are killed.
//! Each gets the run's [`ResourceLimits`] (`setrlimit(2)` between fork and exec), the
//! run's [`Containment`] (a step cgroup killed as a whole at the step's end, a seccomp filter
//! on sockets) and the caller's thread's Landlock domain (see [`crate::sandbox`]).
//!
//! Interruption: a [`Stopper`] shared with the signal handler. One request (`stop`) ends the
//! run before its next step; a second (`abort`) also ends the running command (SIGTERM to its
//! group, SIGKILL after the grace period). A run deadline ends the run the same way.

mod paths;
mod process;
#[cfg(test)]
mod tests;
#[cfg(feature = "webfetch")]
mod web;

use paths::tempfile_in;
use process::run_shell;

use crate::effects::{
    FileKind, GenerateRequest, Generation, Host, Interruption, MAX_LISTED_FILES, ShellOutput,
};
use crate::infer::Inference;
use crate::sandbox::{Containment, ResourceLimits};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::{BufRead, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Largest file a Read step or a check reads (bytes).
pub const MAX_READ_BYTES: u64 = 8 * 1024 * 1024;
pub use crate::effects::MAX_STDOUT_BYTES;
/// Largest stderr kept from a shell command (bytes).
pub const MAX_STDERR_BYTES: usize = 64 * 1024;
/// Time between SIGTERM and SIGKILL when a command times out.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a finished command's pipes to close.
const PIPE_GRACE: Duration = Duration::from_secs(1);

/// How long name resolution may take before a WebFetch trace is declared offline.
#[cfg(feature = "webfetch")]
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response body a WebFetch step keeps (bytes); a larger one fails the step.
pub const MAX_FETCH_BYTES: u64 = 4 * 1024 * 1024;

/// Read-only roots a trace may read outside its base directory, by default.
pub const DEFAULT_READ_ROOTS: &[&str] = &["/var/log", "/etc", "/usr/share"];

/// Stop requests for a run, shared between the run and whoever asks (a signal handler, the
/// fleet link): 0 = none, 1 = stop after the current step, 2 or more = abort the current step.
#[derive(Debug, Clone, Default)]
pub struct Stopper(Arc<AtomicU8>);

impl Stopper {
    /// Asks once more: the first call stops, the second aborts.
    pub fn request(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(1))
            });
    }

    /// The requests so far (0, 1, or 2 and more).
    pub fn level(&self) -> u8 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The host of one run.
pub struct LocalHost {
    base_dir: PathBuf,
    read_roots: Vec<PathBuf>,
    inference: Option<Arc<Inference>>,
    origin: Instant,
    limits: ResourceLimits,
    containment: Containment,
    /// This host's slot among the run's step cgroups (forked hosts take others).
    slot: usize,
    stopper: Stopper,
    /// The run's deadline and its length (for the message).
    deadline: Option<(Instant, Duration)>,
}

impl LocalHost {
    /// A host for a run in `base_dir` (created if missing), reading also from `read_roots`
    /// (those that exist), with the model behind `inference` if the device has one.
    ///
    /// # Errors
    /// When the base directory cannot be created or resolved.
    pub fn new(
        base_dir: &Path,
        read_roots: &[PathBuf],
        inference: Option<Inference>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(base_dir)?;
        let base_dir = base_dir.canonicalize()?;
        let read_roots = read_roots
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .collect();
        Ok(Self {
            base_dir,
            read_roots,
            inference: inference.map(Arc::new),
            origin: Instant::now(),
            limits: ResourceLimits::default(),
            containment: Containment::default(),
            slot: 0,
            stopper: Stopper::default(),
            deadline: None,
        })
    }

    /// Runs every shell command inside `containment` (its step cgroups and seccomp filter).
    #[must_use]
    pub fn with_containment(mut self, containment: Containment) -> Self {
        self.slot = containment.cgroups.as_ref().map_or(0, |c| c.first_slot());
        self.containment = containment;
        self
    }

    /// Applies `limits` to every shell command.
    #[must_use]
    pub fn with_limits(mut self, limits: ResourceLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Ends the run (and its running command) on `stopper`'s requests.
    #[must_use]
    pub fn with_stopper(mut self, stopper: Stopper) -> Self {
        self.stopper = stopper;
        self
    }

    /// Ends the run `limit` from now: no step starts after it, and a running command is
    /// aborted at it.
    #[must_use]
    pub fn with_deadline(mut self, limit: Duration) -> Self {
        self.deadline = Some((Instant::now() + limit, limit));
        self
    }

    /// The canonical base directory.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// The canonical read-only roots (those that exist).
    pub fn read_roots(&self) -> &[PathBuf] {
        &self.read_roots
    }
}

impl Host for LocalHost {
    fn read_file(
        &mut self,
        path: &str,
        offset: Option<u64>,
        limit: Option<u64>,
    ) -> Result<String, String> {
        let p = self.resolve_read(path)?;
        // Stat before open: opening a FIFO or a device could block or never end.
        let meta = std::fs::metadata(&p).map_err(|e| format!("cannot stat {path}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("cannot read {path}: expected a regular file"));
        }
        let f = std::fs::File::open(&p).map_err(|e| format!("cannot open {path}: {e}"))?;
        if offset.is_none() && limit.is_none() {
            if meta.len() > MAX_READ_BYTES {
                return Err(format!(
                    "{path} is {} bytes: expected at most {MAX_READ_BYTES} (use offset/limit to read a window)",
                    meta.len()
                ));
            }
            let mut bytes = Vec::new();
            f.take(MAX_READ_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("cannot read {path}: {e}"))?;
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
        // A window of lines, streamed: memory is bounded by the window, not the file.
        let skip = offset.unwrap_or(1).saturating_sub(1);
        let end = skip.saturating_add(limit.unwrap_or(u64::MAX));
        let mut reader = std::io::BufReader::new(f);
        let mut out = Vec::new();
        let mut line = Vec::new();
        let mut n: u64 = 0;
        while n < end {
            line.clear();
            let got = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("cannot read {path}: {e}"))?;
            if got == 0 {
                break;
            }
            if n >= skip {
                if out.len() + line.len() > MAX_READ_BYTES as usize {
                    return Err(format!(
                        "the selected lines of {path} exceed {MAX_READ_BYTES} bytes"
                    ));
                }
                out.extend_from_slice(&line);
            }
            n += 1;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn write_file(&mut self, path: &str, content: &str) -> Result<(), String> {
        let target = self.resolve_write(path)?;
        let dir = target.parent().unwrap_or(&self.base_dir);
        let mut tmp = tempfile_in(dir).map_err(|e| format!("cannot write {path}: {e}"))?;
        tmp.1
            .write_all(content.as_bytes())
            .and_then(|()| tmp.1.sync_all())
            .map_err(|e| format!("cannot write {path}: {e}"))?;
        std::fs::rename(&tmp.0, &target).map_err(|e| {
            let _ = std::fs::remove_file(&tmp.0);
            format!("cannot write {path}: {e}")
        })
    }

    fn file_kind(&mut self, path: &str) -> Result<FileKind, String> {
        let abs = self.absolute(path);
        let Ok(canonical) = abs.canonicalize() else {
            return Ok(FileKind::Missing);
        };
        if !self.allowed_for_read(&canonical) {
            return Err(format!(
                "check of {path} refused: it resolves to {}, outside the allowed roots [{}]",
                canonical.display(),
                self.roots_text()
            ));
        }
        let m = std::fs::metadata(&canonical).map_err(|e| format!("cannot stat {path}: {e}"))?;
        Ok(if m.is_file() {
            FileKind::File(m.len())
        } else if m.is_dir() {
            FileKind::Directory
        } else {
            FileKind::Other
        })
    }

    fn list_files(&mut self, dir: &str) -> Result<Vec<String>, String> {
        let root = self.resolve_read(dir)?;
        if !root.is_dir() {
            return Err(format!("cannot list {dir}: expected a directory"));
        }
        let mut out = Vec::new();
        let mut todo = vec![(root, String::new())];
        while let Some((abs, rel)) = todo.pop() {
            let entries = std::fs::read_dir(&abs)
                .map_err(|e| format!("cannot list {}: {e}", abs.display()))?;
            for entry in entries.flatten() {
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let name = entry.file_name().to_string_lossy().into_owned();
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                if kind.is_dir() {
                    todo.push((entry.path(), child));
                } else if kind.is_file() {
                    out.push(child);
                    if out.len() > MAX_LISTED_FILES {
                        return Err(format!(
                            "{dir} holds more than {MAX_LISTED_FILES} files: narrow the path"
                        ));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn shell(
        &mut self,
        command: &str,
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<ShellOutput, String> {
        let timeout = self.within_deadline(timeout);
        run_shell(
            command,
            env,
            timeout,
            &process::Place {
                dir: &self.base_dir,
                limits: self.limits,
                containment: &self.containment,
                slot: self.slot,
                stopper: &self.stopper,
            },
        )
    }

    fn generate(&mut self, request: &GenerateRequest) -> Result<Generation, String> {
        let inference = self
            .inference
            .as_ref()
            .ok_or_else(|| "this step needs a model but the follower has none configured (--model FILE.gguf or TRACEFLEET_MODEL)".to_owned())?;
        inference.generate(request).map_err(|e| e.to_string())
    }

    fn generate_batch(&mut self, requests: &[GenerateRequest]) -> Vec<Result<Generation, String>> {
        let Some(inference) = self.inference.as_ref() else {
            return requests.iter().map(|r| self.generate(r)).collect();
        };
        match inference.generate_batch(requests) {
            Ok(results) => results
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect(),
            Err(e) => requests.iter().map(|_| Err(e.to_string())).collect(),
        }
    }

    fn sleep(&mut self, duration: Duration) {
        // In slices, so that a stop request or the deadline ends a long backoff.
        let end = Instant::now() + duration;
        while self.interruption().is_none() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    #[cfg(feature = "webfetch")]
    fn fetch(&mut self, url: &str, timeout: Duration) -> Result<String, String> {
        let timeout = self.within_deadline(timeout);
        web::fetch(url, timeout)
    }

    #[cfg(feature = "webfetch")]
    fn reachable(&mut self, url: &str) -> Result<(), String> {
        web::resolve(url, RESOLVE_TIMEOUT)
    }

    fn fork(&self) -> Option<Box<dyn Host + Send>> {
        Some(Box::new(Self {
            base_dir: self.base_dir.clone(),
            read_roots: self.read_roots.clone(),
            inference: self.inference.clone(),
            origin: self.origin,
            limits: self.limits,
            slot: self
                .containment
                .cgroups
                .as_ref()
                .map_or(0, |c| c.next_slot()),
            containment: self.containment.clone(),
            stopper: self.stopper.clone(),
            deadline: self.deadline,
        }))
    }

    fn interruption(&self) -> Option<Interruption> {
        if self.stopper.level() > 0 {
            return Some(Interruption::Stop);
        }
        match self.deadline {
            Some((at, limit)) if Instant::now() >= at => Some(Interruption::Deadline(format!(
                "the run exceeded its time limit of {}",
                humantime::format_duration(limit)
            ))),
            _ => None,
        }
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }

    fn timestamp(&self) -> String {
        tracefleet::time::rfc3339_now()
    }
}
