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
//! Each gets the run's [`ResourceLimits`] (`setrlimit(2)` between fork and exec) and the
//! caller's thread's Landlock domain (see [`crate::sandbox`]).
//!
//! Interruption: a [`Stopper`] shared with the signal handler. One request (`stop`) ends the
//! run before its next step; a second (`abort`) also ends the running command (SIGTERM to its
//! group, SIGKILL after the grace period). A run deadline ends the run the same way.

use crate::effects::{
    FileKind, GenerateRequest, Generation, Host, Interruption, MAX_LISTED_FILES, ShellOutput,
};
use crate::infer::Inference;
use crate::sandbox::ResourceLimits;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::{BufRead, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant, SystemTime};

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
            stopper: Stopper::default(),
            deadline: None,
        })
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

    /// `timeout`, shortened so that it ends no later than the run's deadline.
    fn within_deadline(&self, timeout: Duration) -> Duration {
        match self.deadline {
            Some((at, _)) => timeout.min(at.saturating_duration_since(Instant::now())),
            None => timeout,
        }
    }

    fn absolute(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    fn allowed_for_read(&self, canonical: &Path) -> bool {
        canonical.starts_with(&self.base_dir)
            || self.read_roots.iter().any(|r| canonical.starts_with(r))
    }

    fn roots_text(&self) -> String {
        let mut v = vec![self.base_dir.display().to_string()];
        v.extend(
            self.read_roots
                .iter()
                .map(|r| format!("{} (read-only)", r.display())),
        );
        v.join(", ")
    }

    /// Resolves a path for reading: it must exist and canonicalise inside an allowed root.
    fn resolve_read(&self, path: &str) -> Result<PathBuf, String> {
        let abs = self.absolute(path);
        let canonical = abs
            .canonicalize()
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        if self.allowed_for_read(&canonical) {
            Ok(canonical)
        } else {
            Err(format!(
                "read of {path} refused: it resolves to {}, outside the allowed roots [{}]",
                canonical.display(),
                self.roots_text()
            ))
        }
    }

    /// Resolves a path for writing: lexically inside the base directory, no `..`, no symlink
    /// on the way or at the target. Missing directories are created one by one, each only
    /// after its parent was checked, so nothing is ever created outside the base directory.
    fn resolve_write(&self, path: &str) -> Result<PathBuf, String> {
        if Path::new(path)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(format!(
                "write to {path} refused: `..` is not allowed in write paths"
            ));
        }
        let abs = self.absolute(path);
        let rel = abs.strip_prefix(&self.base_dir).map_err(|_| {
            format!(
                "write to {path} refused: expected a path inside the base directory {}",
                self.base_dir.display()
            )
        })?;
        let parts: Vec<&std::ffi::OsStr> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect();
        let Some((name, dirs)) = parts.split_last() else {
            return Err(format!("write to {path} refused: expected a file name"));
        };
        let mut cur = self.base_dir.clone();
        for d in dirs {
            cur.push(d);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "write to {path} refused: {} is a symbolic link",
                        cur.display()
                    ));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(format!(
                        "write to {path} refused: {} is not a directory",
                        cur.display()
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&cur)
                        .map_err(|e| format!("cannot create {}: {e}", cur.display()))?;
                }
                Err(e) => return Err(format!("cannot inspect {}: {e}", cur.display())),
            }
        }
        let target = cur.join(name);
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "write to {path} refused: the target is a symbolic link"
            ));
        }
        Ok(target)
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
            &self.base_dir,
            timeout,
            self.limits,
            &self.stopper,
        )
    }

    fn generate(&mut self, request: &GenerateRequest) -> Result<Generation, String> {
        let inference = self
            .inference
            .as_ref()
            .ok_or_else(|| "this step needs a model but the follower has none configured (--model FILE.gguf or TRACEFLEET_MODEL)".to_owned())?;
        inference.generate(request).map_err(|e| e.to_string())
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
        humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
    }
}

/// `v` as the platform's `rlim_t` (32 bits on armv7), saturating.
#[allow(clippy::unnecessary_fallible_conversions, clippy::useless_conversion)]
fn rlim(v: u64) -> nix::libc::rlim_t {
    nix::libc::rlim_t::try_from(v).unwrap_or(nix::libc::rlim_t::MAX)
}

/// Sets `limits` (and death with the follower's run thread) in the child between fork and
/// exec.
#[allow(unsafe_code)]
fn apply_limits(cmd: &mut Command, limits: ResourceLimits) {
    // Never above the current hard limit (raising it needs privilege); computed before fork.
    let values = [
        (Resource::RLIMIT_CPU, limits.cpu_secs),
        (Resource::RLIMIT_AS, limits.address_space_bytes),
        (Resource::RLIMIT_FSIZE, limits.file_size_bytes),
        (Resource::RLIMIT_NPROC, limits.processes),
    ]
    .map(|(r, v)| {
        let v = rlim(v);
        (r, getrlimit(r).map_or(v, |(_, hard)| v.min(hard)))
    });
    let hook = move || -> std::io::Result<()> {
        for (r, v) in values {
            setrlimit(r, v, v).map_err(std::io::Error::from)?;
        }
        // If the follower dies (SIGKILL, power management), its step dies with it rather
        // than running on beside a resumed run.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // functions may be called: it iterates over a copied array and calls setrlimit(2) and
    // prctl(2) (plain system calls through nix: no allocation, no locks); on failure it builds
    // an io::Error from the errno (a raw OS error, no allocation).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Creates a uniquely named temporary file in `dir` (same file system as the target, so the
/// final rename is atomic).
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for i in 0..100u32 {
        let name = format!(
            ".tracefleet-tmp-{}-{}-{i}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        );
        let p = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("could not create a temporary file"))
}

/// One of a command's output pipes, read on the step's own thread as poll(2) reports data.
struct Capture {
    pipe: Option<std::os::fd::OwnedFd>,
    kept: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capture {
    fn new(pipe: Option<impl Into<std::os::fd::OwnedFd>>, cap: usize) -> Self {
        Capture {
            pipe: pipe.map(Into::into),
            kept: Vec::new(),
            cap,
            truncated: false,
        }
    }

    /// Reads what the pipe holds now (poll said it is readable, so this does not block);
    /// closes it at end of file or on an error.
    fn read_ready(&mut self) {
        let Some(pipe) = &self.pipe else { return };
        let mut chunk = [0u8; 16384];
        match rustix::io::read(pipe, &mut chunk) {
            Ok(0) | Err(_) => self.pipe = None,
            Ok(n) => {
                let room = self.cap.saturating_sub(self.kept.len());
                self.kept.extend_from_slice(&chunk[..n.min(room)]);
                self.truncated |= n > room;
            }
        }
    }
}

/// Waits up to `timeout` for data on the open pipes or the exit of the process behind
/// `pidfd`, and reads what arrived.
fn poll_step(pipes: [&mut Capture; 2], pidfd: Option<&std::os::fd::OwnedFd>, timeout: Duration) {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let [a, b] = pipes;
    let readable = PollFlags::IN | PollFlags::HUP | PollFlags::ERR;
    let ready = {
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(3);
        let mut which = Vec::with_capacity(3);
        for (i, p) in [&a.pipe, &b.pipe].into_iter().enumerate() {
            if let Some(fd) = p {
                fds.push(PollFd::new(fd, PollFlags::IN));
                which.push(i);
            }
        }
        if let Some(fd) = pidfd {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        if fds.is_empty() {
            std::thread::sleep(timeout);
            return;
        }
        let ts = Timespec::try_from(timeout).unwrap_or(Timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        });
        if rustix::event::poll(&mut fds, Some(&ts)).is_err() {
            return;
        }
        which
            .iter()
            .zip(&fds)
            .filter(|(_, fd)| fd.revents().intersects(readable))
            .map(|(i, _)| *i)
            .collect::<Vec<_>>()
    };
    for i in ready {
        if i == 0 {
            a.read_ready()
        } else {
            b.read_ready()
        }
    }
}

/// The search path of every step's commands.
const STEP_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the shell would find `name`: itself when it holds a `/` (relative to `dir`), else the
/// first executable regular file of that name along [`STEP_PATH`].
fn find_program(name: &str, dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = dir.join(name);
        return executable(&p).then_some(p);
    }
    STEP_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| executable(p))
}

/// The containment every step process gets: `limits`, its own process group, the scrubbed
/// environment plus `env`, `dir` as working directory, home and TMPDIR, stdin from /dev/null
/// and both outputs piped to the step.
fn contain(cmd: &mut Command, env: &[(String, String)], dir: &Path, limits: ResourceLimits) {
    apply_limits(cmd, limits);
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", STEP_PATH)
        .env("HOME", dir)
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .env("TRACEFLEET_BASE_DIR", dir)
        .env("TMPDIR", dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
}

/// Runs `/bin/sh -c command` in `dir` with the containment described in the module docs.
fn run_shell(
    command: &str,
    env: &[(String, String)],
    dir: &Path,
    timeout: Duration,
    limits: ResourceLimits,
    stopper: &Stopper,
) -> Result<ShellOutput, String> {
    // A simple command runs without the shell in between (see `shell::direct_argv`); when its
    // program cannot be started directly (not found, a script without `#!`), the shell runs it
    // and reports as it would.
    let direct = tracefleet::shell::direct_argv(command, env)
        .and_then(|argv| find_program(&argv[0], dir).map(|p| (p, argv)));
    let spawned = match direct {
        Some((program, argv)) => {
            let mut cmd = Command::new(program);
            cmd.arg0(&argv[0]).args(&argv[1..]);
            contain(&mut cmd, env, dir, limits);
            // What the shell would add to the environment of the program it starts.
            cmd.env("PWD", dir).spawn().ok()
        }
        None => None,
    };
    let mut child = match spawned {
        Some(child) => child,
        None => {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(command);
            contain(&mut cmd, env, dir, limits);
            cmd.spawn()
                .map_err(|e| format!("cannot start /bin/sh: {e}"))?
        }
    };
    let pgid =
        Pid::from_raw(i32::try_from(child.id()).map_err(|_| "process id out of range".to_owned())?);
    let mut out = Capture::new(child.stdout.take(), MAX_STDOUT_BYTES);
    let mut err = Capture::new(child.stderr.take(), MAX_STDERR_BYTES);
    // A pidfd (Linux 5.3+) wakes poll(2) the moment the command exits; without one (older
    // kernels) an exit that leaves the pipes open is noticed within the 20 ms slice.
    let pidfd = rustix::process::Pid::from_raw(pgid.as_raw())
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let mut deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let mut aborted = false;
    // This thread reads both pipes and waits for the command itself: it wakes on output, on
    // the command's exit, and at least every 20 ms to act on a stop request or the deadline.
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| format!("cannot wait for the command: {e}"))?
        {
            break status;
        }
        let now = Instant::now();
        if !aborted && !timed_out && stopper.level() >= 2 {
            aborted = true;
            deadline = now;
        }
        if now >= deadline && !timed_out {
            timed_out = true;
            let _ = killpg(pgid, Signal::SIGTERM);
        }
        if timed_out && now >= deadline + KILL_GRACE {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let wake = if timed_out {
            deadline + KILL_GRACE
        } else {
            deadline
        };
        let slice = wake
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), Duration::from_millis(20));
        // Without a pidfd and with both pipes closed, poll the exit in short steps.
        let slice = if pidfd.is_none() && out.pipe.is_none() && err.pipe.is_none() {
            slice.min(Duration::from_millis(1))
        } else {
            slice
        };
        poll_step([&mut out, &mut err], pidfd.as_ref(), slice);
    };
    // Nothing the step started may outlive it (and hold our pipes open). A process that left
    // the group (`setsid`) can still hold them: the step waits for them no longer than
    // PIPE_GRACE.
    let _ = killpg(pgid, Signal::SIGKILL);
    let grace_end = Instant::now() + PIPE_GRACE;
    while out.pipe.is_some() || err.pipe.is_some() {
        let left = grace_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        poll_step(
            [&mut out, &mut err],
            None,
            left.min(Duration::from_millis(20)),
        );
    }
    let (stdout, stdout_truncated) = (out.kept, out.truncated);
    let stderr = err.kept;
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    if aborted {
        return Err(format!(
            "command aborted on request (SIGTERM to its process group); stderr: {}",
            stderr.trim()
        ));
    }
    if timed_out {
        return Err(format!(
            "command timed out after {} s and was killed; stderr: {}",
            timeout.as_secs(),
            stderr.trim()
        ));
    }
    if stdout_truncated {
        return Err(format!(
            "command wrote more than {MAX_STDOUT_BYTES} bytes to stdout: expected less (the output cap)"
        ));
    }
    Ok(ShellOutput {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr,
        exit_code: status.code(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dir: &Path) -> LocalHost {
        LocalHost::new(dir, &[PathBuf::from("/etc")], None).unwrap()
    }

    #[test]
    fn writes_stay_inside_the_base_dir() {
        let d = tempfile::tempdir().unwrap();
        let mut h = host(d.path());
        h.write_file("a/b.txt", "x").unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("a/b.txt")).unwrap(),
            "x"
        );
        assert!(
            h.write_file("../escape.txt", "x")
                .unwrap_err()
                .contains("`..`")
        );
        assert!(
            h.write_file("/tmp/escape.txt", "x")
                .unwrap_err()
                .contains("inside the base directory")
        );
        std::os::unix::fs::symlink("/tmp", d.path().join("link")).unwrap();
        assert!(
            h.write_file("link/escape.txt", "x")
                .unwrap_err()
                .contains("is a symbolic link")
        );
        std::os::unix::fs::symlink("/tmp/target-file", d.path().join("flink")).unwrap();
        assert!(
            h.write_file("flink", "x")
                .unwrap_err()
                .contains("symbolic link")
        );
    }

    #[test]
    fn reads_reach_read_roots_but_not_elsewhere() {
        let d = tempfile::tempdir().unwrap();
        let mut h = host(d.path());
        assert!(
            h.read_file("/etc/hostname", None, None).is_ok()
                || !Path::new("/etc/hostname").exists()
        );
        let e = h.read_file("/proc/self/status", None, None).unwrap_err();
        assert!(e.contains("outside the allowed roots"), "{e}");
        std::os::unix::fs::symlink("/proc/self/status", d.path().join("sneaky")).unwrap();
        let e = h.read_file("sneaky", None, None).unwrap_err();
        assert!(e.contains("outside the allowed roots"), "{e}");
    }

    #[test]
    fn read_window_selects_lines() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "1\n2\n3\n4\n").unwrap();
        let mut h = host(d.path());
        assert_eq!(h.read_file("f", Some(2), Some(2)).unwrap(), "2\n3\n");
    }

    #[test]
    fn shell_runs_scrubbed_in_base_dir_and_times_out() {
        let d = tempfile::tempdir().unwrap();
        let mut h = host(d.path());
        // SAFETY-free way to check the scrub: a variable from our environment must not leak.
        let out = h
            .shell(
                "pwd; echo \"[$CARGO_PKG_NAME]\"; exit 3",
                &[],
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(out.exit_code, Some(3));
        let canonical = d.path().canonicalize().unwrap();
        assert!(
            out.stdout.starts_with(canonical.to_str().unwrap()),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout.contains("[]"),
            "environment not scrubbed: {}",
            out.stdout
        );
        let t = Instant::now();
        let e = h
            .shell("sleep 30", &[], Duration::from_millis(200))
            .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        // A background child holding stdout must not hang the step.
        let t = Instant::now();
        let out = h
            .shell("sleep 30 & echo started", &[], Duration::from_secs(10))
            .unwrap();
        assert_eq!(out.stdout, "started\n");
        assert!(t.elapsed() < Duration::from_secs(10));
        // Nor one that escaped the process group.
        let t = Instant::now();
        let out = h
            .shell(
                "setsid sleep 30 & echo escaped",
                &[],
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(out.stdout, "escaped\n");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn simple_commands_run_without_the_shell_exactly_as_with_it() {
        let d = tempfile::tempdir().unwrap();
        let mut h = host(d.path());
        let env = vec![("TF_VAR_x".to_owned(), "two  words $HOME `id` *".to_owned())];
        let run = |h: &mut LocalHost, c: &str| h.shell(c, &env, Duration::from_secs(10)).unwrap();
        for command in [
            "/usr/bin/printf '[%s]' a 'b  c' \"${TF_VAR_x}\" '' x=y \"q\"'r's",
            "/usr/bin/env",
            "/bin/sh -c 'exit 7'",
            "cat missing-file",
        ] {
            assert!(
                tracefleet::shell::direct_argv(command, &env).is_some(),
                "{command}"
            );
            // A trailing `;` leaves the same command to the shell.
            let (direct, shell) = (run(&mut h, command), run(&mut h, &format!("{command};")));
            let sorted = |o: &str| {
                let mut l: Vec<&str> = o.lines().collect();
                l.sort_unstable();
                l.join("\n")
            };
            assert_eq!(sorted(&direct.stdout), sorted(&shell.stdout), "{command}");
            assert_eq!(direct.exit_code, shell.exit_code, "{command}");
            assert_eq!(
                direct.stderr.is_empty(),
                shell.stderr.is_empty(),
                "{command}"
            );
        }
        // Programs the shell must handle: one not found, and a script without `#!`.
        let out = run(&mut h, "no-such-program-anywhere --x");
        assert_eq!(out.exit_code, Some(127));
        assert!(out.stderr.contains("not found"), "{}", out.stderr);
        std::fs::write(d.path().join("script"), "echo from-script\n").unwrap();
        std::fs::set_permissions(
            d.path().join("script"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(run(&mut h, "./script").stdout, "from-script\n");
    }

    #[test]
    fn list_files_is_recursive_sorted_and_does_not_follow_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let mut h = host(d.path());
        h.write_file("b/x.log", "1").unwrap();
        h.write_file("a.txt", "2").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("etc-link")).unwrap();
        assert_eq!(h.list_files(".").unwrap(), vec!["a.txt", "b/x.log"]);
        assert!(
            h.list_files("/proc")
                .unwrap_err()
                .contains("outside the allowed roots")
        );
    }

    #[test]
    fn fifo_is_refused_not_waited_on() {
        let d = tempfile::tempdir().unwrap();
        let mut h = host(d.path());
        nix::unistd::mkfifo(&d.path().join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = h.read_file("pipe", None, None).unwrap_err();
        assert!(e.contains("expected a regular file"), "{e}");
        let e = h.read_file("pipe", Some(1), Some(1)).unwrap_err();
        assert!(e.contains("expected a regular file"), "{e}");
    }

    #[test]
    fn write_through_a_symlinked_directory_creates_nothing_outside() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let mut h = host(d.path());
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        let e = h.write_file("link/new/f.txt", "x").unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(
            !outside.path().join("new").exists(),
            "created a directory outside"
        );
    }
}

/// The WebFetch tool: HTTP(S) with ureq (rustls, Mozilla's roots from webpki-roots).
#[cfg(feature = "webfetch")]
mod web {
    use super::MAX_FETCH_BYTES;
    use std::net::ToSocketAddrs;
    use std::sync::mpsc;
    use std::time::Duration;

    /// The host and port of an http(s) URL.
    fn authority(url: &str) -> Result<(String, u16), String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("expected an http(s) URL, found {url:?}"))?;
        let default_port = if scheme == "https" { 443 } else { 80 };
        let auth = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let auth = auth.rsplit_once('@').map_or(auth, |(_, a)| a);
        if let Some(v6) = auth.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .ok_or_else(|| format!("malformed IPv6 host in {url:?}"))?;
            let port = tail.strip_prefix(':').map_or(Ok(default_port), str::parse);
            return Ok((
                h.to_owned(),
                port.map_err(|_| format!("bad port in {url:?}"))?,
            ));
        }
        match auth.rsplit_once(':') {
            Some((h, p)) => Ok((
                h.to_owned(),
                p.parse().map_err(|_| format!("bad port in {url:?}"))?,
            )),
            None => Ok((auth.to_owned(), default_port)),
        }
    }

    /// Resolves the URL's host within `timeout` (getaddrinfo has no timeout of its own, so it
    /// runs on a helper thread that is abandoned when late).
    pub(super) fn resolve(url: &str, timeout: Duration) -> Result<(), String> {
        let (host, port) = authority(url)?;
        if host.is_empty() {
            return Err(format!("no host in {url:?}"));
        }
        let (tx, rx) = mpsc::channel();
        let name = host.clone();
        std::thread::spawn(move || {
            let _ = tx.send(
                (name.as_str(), port)
                    .to_socket_addrs()
                    .map(|mut a| a.next().is_some()),
            );
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(format!("{host} has no address")),
            Ok(Err(e)) => Err(format!(
                "offline or unknown host: cannot resolve {host}: {e}"
            )),
            Err(_) => Err(format!(
                "offline: resolving {host} took longer than {} s",
                timeout.as_secs()
            )),
        }
    }

    /// GET `url`; the body as (lossy) UTF-8 text.
    pub(super) fn fetch(url: &str, timeout: Duration) -> Result<String, String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
            .http_status_as_error(false)
            .user_agent(concat!("tracefleet-follower/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let mut response = agent
            .get(url)
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_FETCH_BYTES)
            .read_to_vec()
            .map_err(|e| {
                format!("GET {url}: reading the body (at most {MAX_FETCH_BYTES} bytes): {e}")
            })?;
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[cfg(test)]
    mod tests {
        use super::authority;

        #[test]
        fn authority_of_urls() {
            assert_eq!(
                authority("https://example.org/x").unwrap(),
                ("example.org".into(), 443)
            );
            assert_eq!(
                authority("http://127.0.0.1:8080?q").unwrap(),
                ("127.0.0.1".into(), 8080)
            );
            assert_eq!(authority("http://u:p@h:81/").unwrap(), ("h".into(), 81));
            assert_eq!(authority("http://[::1]:9/").unwrap(), ("::1".into(), 9));
            assert!(authority("http://h:x/").is_err());
        }
    }
}
