//! Shell steps as processes: `/bin/sh -c` (or a simple command's program itself) in its own
//! process group with a scrubbed environment, resource limits, the run's step cgroup and
//! seccomp filter (see [`crate::sandbox`]) and death with the follower, both pipes read and the
//! exit waited for with `poll(2)` on the step's thread, output caps, timeout → SIGTERM →
//! SIGKILL, leftovers killed (the whole cgroup where there is one, else the process group).

use super::*;

/// `v` as the platform's `rlim_t` (32 bits on armv7), saturating.
#[allow(clippy::unnecessary_fallible_conversions, clippy::useless_conversion)]
fn rlim(v: u64) -> nix::libc::rlim_t {
    nix::libc::rlim_t::try_from(v).unwrap_or(nix::libc::rlim_t::MAX)
}

/// What the child does between fork and exec besides its limits: join the step cgroup
/// (`write(2)` of `0` to each descriptor) and install the seccomp programs.
struct ChildSetup {
    join_fds: Vec<std::os::fd::RawFd>,
    seccomp: Arc<Vec<seccompiler::BpfProgram>>,
}

/// Sets `limits`, the cgroup and seccomp filter of `setup` (and death with the follower's run
/// thread) in the child between fork and exec.
#[allow(unsafe_code)]
fn apply_limits(cmd: &mut Command, limits: ResourceLimits, setup: ChildSetup) {
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
        // First into the cgroup, so that everything the step starts is inside it.
        for fd in &setup.join_fds {
            // SAFETY: `fd` is a descriptor of the parent's `Slot`, open (not close-on-exec'd
            // yet) in this child; the buffer is a static byte string.
            if unsafe { nix::libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        for (r, v) in values {
            setrlimit(r, v, v).map_err(std::io::Error::from)?;
        }
        // If the follower dies (SIGKILL, power management), its step dies with it rather
        // than running on beside a resumed run.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
        // Last: the filters only refuse socket(2) and io_uring_setup(2).
        for prog in setup.seccomp.iter() {
            seccompiler::apply_filter(prog).map_err(|e| match e {
                seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                _ => std::io::Error::from_raw_os_error(nix::libc::EINVAL),
            })?;
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // functions may be called: it iterates over copied arrays and calls write(2),
    // setrlimit(2), prctl(2) and seccomp(2) (plain system calls through libc, nix and
    // seccompiler's `apply_filter`, which builds the `sock_fprog` on the stack: no allocation,
    // no locks); on failure it builds an io::Error from the errno (a raw OS error, no
    // allocation).
    unsafe {
        cmd.pre_exec(hook);
    }
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
fn contain(
    cmd: &mut Command,
    env: &[(String, String)],
    dir: &Path,
    limits: ResourceLimits,
    setup: ChildSetup,
) {
    apply_limits(cmd, limits, setup);
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

/// Where and how a shell command runs: the run's directory, limits, containment (with this
/// host's cgroup slot) and stop requests.
pub(super) struct Place<'a> {
    pub(super) dir: &'a Path,
    pub(super) limits: ResourceLimits,
    pub(super) containment: &'a Containment,
    pub(super) slot: usize,
    pub(super) stopper: &'a Stopper,
}

/// Runs `/bin/sh -c command` in `place` with the containment described in the module docs.
pub(super) fn run_shell(
    command: &str,
    env: &[(String, String)],
    timeout: Duration,
    place: &Place<'_>,
) -> Result<ShellOutput, String> {
    let Place {
        dir,
        limits,
        containment,
        slot,
        stopper,
    } = *place;
    // The step's cgroup slot, held while the step runs (forked hosts share the run's slots).
    let slot = containment.cgroups.as_ref().map(|c| {
        c.slot(slot)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    });
    let setup = || ChildSetup {
        join_fds: slot.as_ref().map(|s| s.join_fds()).unwrap_or_default(),
        seccomp: containment.seccomp.clone(),
    };
    // A simple command runs without the shell in between (see `shell::direct_argv`); when its
    // program cannot be started directly (not found, a script without `#!`), the shell runs it
    // and reports as it would.
    let direct = tracefleet::shell::direct_argv(command, env)
        .and_then(|argv| find_program(&argv[0], dir).map(|p| (p, argv)));
    let spawned = match direct {
        Some((program, argv)) => {
            let mut cmd = Command::new(program);
            cmd.arg0(&argv[0]).args(&argv[1..]);
            contain(&mut cmd, env, dir, limits, setup());
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
            contain(&mut cmd, env, dir, limits, setup());
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
    // And, where the step has a cgroup, everything in it: `setsid` and double forks included.
    let left_running = slot.as_ref().is_some_and(|s| !s.kill_all());
    drop(slot);
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
    if left_running {
        return Err(
            "processes the command left in its cgroup could not be killed within 3 s".into(),
        );
    }
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
        signal: std::os::unix::process::ExitStatusExt::signal(&status),
    })
}
