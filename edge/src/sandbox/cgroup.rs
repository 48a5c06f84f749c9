//! Step cgroups: every Bash step runs inside a cgroup of the run, so that the step is contained
//! as a whole, not process by process.
//!
//! - **Where.** Beside the follower's own cgroup (read from `/proc/self/cgroup` and
//!   `/proc/self/mountinfo`, see [`Layout`]): `<own>/tracefleet-<key>/<run-id>/s<slot>`, where
//!   `key` names the state directory and a slot is one of the run's `max_parallel` places for a
//!   running step. cgroup v2 is preferred (`memory.max`, `memory.swap.max`, `pids.max`,
//!   `cgroup.kill`); each controller v2 cannot give (not delegated, a hybrid system) is taken from
//!   its cgroup v1 hierarchy (`memory`, `pids`, and `freezer` for kill-all) when mounted and
//!   writable. `TRACEFLEET_CGROUP_ROOT` replaces the discovery with one cgroup v2 directory
//!   (`none`: no cgroups).
//! - **Joining.** The slot's `cgroup.procs` files are opened before the run thread restricts
//!   itself with Landlock (which then could not open them); a step's process writes `0` to them
//!   between fork and exec ([`Slot::join_fds`]), so everything it starts is inside.
//! - **Killing.** At each step's end every process left in the slot is killed
//!   ([`Slot::kill_all`]: `cgroup.kill`, else freeze, SIGKILL each, thaw): `setsid` and double
//!   forks included. At the next start of a follower on the same state directory, the run
//!   cgroups of runs no process holds the lock of are killed and removed ([`sweep`]) before any
//!   run resumes.
//! - **Honesty.** [`Setup::protections`] says what is in force, and why not where it is not.

use nix::fcntl::{OFlag, open};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tracefleet::report::Protection;

/// The environment variable that replaces cgroup discovery: a cgroup v2 directory to make the
/// follower's cgroups in, or `none`.
pub const ROOT_ENV: &str = "TRACEFLEET_CGROUP_ROOT";

/// The leaf a follower moves itself into so that its own cgroup v2 may enable controllers for
/// its children (the "no internal processes" rule of cgroup v2).
const FOLLOWER_LEAF: &str = "tracefleet-follower";

/// How long a kill-all waits for the slot to be empty.
const KILL_WAIT: Duration = Duration::from_secs(3);

/// Limits on a step's processes together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCaps {
    /// Memory of all the step's processes together (bytes; swap is not allowed beyond it).
    pub memory_bytes: u64,
    /// Processes and threads of the step together.
    pub pids: u64,
}

impl StepCaps {
    /// Half of the device's memory (at least 64 MiB) and 512 processes.
    pub fn for_device(mem_total_bytes: u64) -> Self {
        Self {
            memory_bytes: (mem_total_bytes / 2).max(64 << 20),
            pids: 512,
        }
    }
}

/// Where the follower's own cgroups are: directories (mount point joined with the path in
/// `/proc/self/cgroup`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Its cgroup v2 directory, when a cgroup2 hierarchy is mounted.
    pub v2: Option<PathBuf>,
    /// Its cgroup v1 `memory` directory.
    pub memory: Option<PathBuf>,
    /// Its cgroup v1 `pids` directory.
    pub pids: Option<PathBuf>,
    /// Its cgroup v1 `freezer` directory.
    pub freezer: Option<PathBuf>,
}

/// The layout described by the texts of `/proc/self/cgroup` and `/proc/self/mountinfo`.
pub fn parse_layout(proc_cgroup: &str, mountinfo: &str) -> Layout {
    // (mount root, mount point, fstype, super options)
    let mounts: Vec<(&str, &str, &str, &str)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let opts = right.next().unwrap_or("");
            Some((*left.get(3)?, *left.get(4)?, fstype, opts))
        })
        .collect();
    let dir = |root: &str, point: &str, path: &str| {
        let rel = path.strip_prefix(root).unwrap_or(path);
        let rel = if root == "/" { path } else { rel };
        Path::new(point).join(rel.trim_start_matches('/'))
    };
    let mut layout = Layout::default();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            layout.v2 = mounts
                .iter()
                .find(|m| m.2 == "cgroup2")
                .map(|m| dir(m.0, m.1, path));
            continue;
        }
        for c in controllers.split(',') {
            let slot = match c {
                "memory" => &mut layout.memory,
                "pids" => &mut layout.pids,
                "freezer" => &mut layout.freezer,
                _ => continue,
            };
            *slot = mounts
                .iter()
                .find(|m| m.2 == "cgroup" && m.3.split(',').any(|o| o == c))
                .map(|m| dir(m.0, m.1, path));
        }
    }
    layout
}

/// The layout of the calling process (empty where `/proc` cannot be read).
pub fn current_layout() -> Layout {
    let read = |p| std::fs::read_to_string(p).unwrap_or_default();
    parse_layout(&read("/proc/self/cgroup"), &read("/proc/self/mountinfo"))
}

/// A short stable name of `state_dir` for the follower's cgroup directory (FNV-1a, 64 bits).
pub fn state_key(state_dir: &Path) -> String {
    let canonical = state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_owned());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canonical.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("tracefleet-{h:016x}")
}

/// One hierarchy the step cgroups are made in, with what it gives.
#[derive(Debug, Clone)]
struct Hier {
    /// `<own>/tracefleet-<key>`.
    top: PathBuf,
    v2: bool,
    memory: bool,
    pids: bool,
    /// cgroup v2 `cgroup.kill` or the v1 freezer.
    kill: bool,
}

/// Where the step cgroups of the follower go on this machine, or why nowhere.
#[derive(Debug, Clone)]
pub struct Plan {
    hiers: Vec<Hier>,
    /// Why a capability is missing, for the report.
    missing: Vec<String>,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn words(p: &Path) -> Vec<String> {
    read(p).split_whitespace().map(str::to_owned).collect()
}

/// Makes `dir` a cgroup (if it is not one) and checks that it is one.
fn make_cgroup(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    if dir.join("cgroup.procs").is_file() {
        Ok(())
    } else {
        let _ = std::fs::remove_dir(dir);
        Err(format!(
            "{} is not a cgroup (no cgroup.procs)",
            dir.display()
        ))
    }
}

/// Enables `controllers` for the children of the cgroup v2 `dir`, where available; returns
/// those enabled.
fn enable(dir: &Path, controllers: &[&str]) -> Vec<String> {
    let available = words(&dir.join("cgroup.controllers"));
    for c in controllers {
        let enabled = words(&dir.join("cgroup.subtree_control"));
        if available.iter().any(|a| a == c) && !enabled.iter().any(|e| e == c) {
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
    words(&dir.join("cgroup.subtree_control"))
        .into_iter()
        .filter(|c| controllers.contains(&c.as_str()))
        .collect()
}

/// Prepares the follower's cgroup v2 `own` directory to hold step cgroups with `memory` and
/// `pids`: when the controllers are available to it but not enabled for its children and the
/// follower is the only process in it, the follower moves into a leaf of its own first.
fn prepare_v2(own: &Path) -> PathBuf {
    // A follower that already moved itself (the agent, from run to run) uses the parent.
    let own = if own.file_name().is_some_and(|n| n == FOLLOWER_LEAF) {
        own.parent().unwrap_or(own).to_owned()
    } else {
        own.to_owned()
    };
    let wanted = ["memory", "pids"];
    let available = words(&own.join("cgroup.controllers"));
    let enabled = words(&own.join("cgroup.subtree_control"));
    let missing = wanted
        .iter()
        .any(|c| available.iter().any(|a| a == c) && !enabled.iter().any(|e| e == c));
    let procs = words(&own.join("cgroup.procs"));
    let me = std::process::id().to_string();
    if missing && procs == [me.clone()] {
        let leaf = own.join(FOLLOWER_LEAF);
        if make_cgroup(&leaf).is_ok() {
            let _ = std::fs::write(leaf.join("cgroup.procs"), &me);
        }
    }
    own
}

/// Moves the calling process into a leaf of its own cgroup v2 when it is alone there and the
/// `memory` or `pids` controllers could then be enabled for its children (see
/// [`Plan::new`]); the runs it starts find their cgroup's parent free for step cgroups.
pub fn settle() {
    if std::env::var_os(ROOT_ENV).is_none()
        && let Some(own) = current_layout().v2
    {
        prepare_v2(&own);
    }
}

impl Plan {
    /// Where to make step cgroups for the state directory `key` names: under `override_root`
    /// (a cgroup v2 directory) when given, else beside the follower's own cgroups in `layout`.
    pub fn new(layout: &Layout, override_root: Option<&str>, key: &str) -> Self {
        let mut hiers = Vec::new();
        let mut missing = Vec::new();
        let v2_own = match override_root {
            Some("none") => {
                missing.push(format!("disabled by {ROOT_ENV}=none"));
                return Self { hiers, missing };
            }
            Some(dir) => Some(PathBuf::from(dir)),
            None => layout.v2.as_deref().map(prepare_v2),
        };
        let (mut memory, mut pids, mut killable) = (false, false, false);
        if let Some(own) = v2_own {
            let top = own.join(key);
            match make_cgroup(&top) {
                Ok(()) => {
                    let from_own = if override_root.is_some() {
                        words(&own.join("cgroup.subtree_control"))
                    } else {
                        enable(&own, &["memory", "pids"])
                    };
                    let on = enable(&top, &["memory", "pids"]);
                    let has =
                        |c: &str| on.iter().any(|x| x == c) && from_own.iter().any(|x| x == c);
                    let h = Hier {
                        v2: true,
                        memory: has("memory"),
                        pids: has("pids"),
                        kill: top.join("cgroup.kill").is_file(),
                        top,
                    };
                    (memory, pids, killable) = (h.memory, h.pids, h.kill);
                    hiers.push(h);
                }
                Err(e) => missing.push(format!("cgroup v2: {e}")),
            }
        }
        if override_root.is_none() {
            for (dir, role) in [
                (&layout.memory, "memory"),
                (&layout.pids, "pids"),
                (&layout.freezer, "freezer"),
            ] {
                let needed = match role {
                    "memory" => !memory,
                    "pids" => !pids,
                    _ => !killable,
                };
                let Some(dir) = dir.as_ref().filter(|_| needed) else {
                    continue;
                };
                let top = dir.join(key);
                match make_cgroup(&top) {
                    Ok(()) => {
                        if role == "memory" {
                            // Charges of children count in their parents (v1's default is
                            // per cgroup on old kernels).
                            let _ = std::fs::write(top.join("memory.use_hierarchy"), "1");
                        }
                        let h = Hier {
                            top,
                            v2: false,
                            memory: role == "memory",
                            pids: role == "pids",
                            kill: role == "freezer",
                        };
                        memory |= h.memory;
                        pids |= h.pids;
                        killable |= h.kill;
                        hiers.push(h);
                    }
                    Err(e) => missing.push(format!("cgroup v1 {role}: {e}")),
                }
            }
        }
        if hiers.is_empty() && missing.is_empty() {
            missing.push("no cgroup hierarchy is mounted".into());
        }
        Self { hiers, missing }
    }

    /// The directories holding the run cgroups, one per hierarchy.
    pub fn tops(&self) -> Vec<PathBuf> {
        self.hiers.iter().map(|h| h.top.clone()).collect()
    }

    /// Makes the cgroups of run `run_id` with `slots` slots capped at `caps`.
    ///
    /// # Errors
    /// When no cgroup can be made (the step then runs without one; the report says so).
    pub fn setup(&self, run_id: &str, slots: usize, caps: StepCaps) -> Result<Setup, String> {
        if self.hiers.is_empty() {
            return Err(self.missing.join("; "));
        }
        let mut made = Vec::new();
        for i in 0..slots.max(1) {
            let mut dirs = Vec::new();
            for h in &self.hiers {
                let run = h.top.join(run_id);
                make_cgroup(&run)?;
                if h.v2 {
                    enable(&run, &["memory", "pids"]);
                } else if h.memory {
                    let _ = std::fs::write(run.join("memory.use_hierarchy"), "1");
                }
                let slot = run.join(format!("s{i}"));
                make_cgroup(&slot)?;
                let set = |file: &str, v: String| {
                    std::fs::write(slot.join(file), v)
                        .map_err(|e| format!("cannot set {}/{file}: {e}", slot.display()))
                };
                match (h.v2, h.memory, h.pids) {
                    (true, mem, pids) => {
                        if mem {
                            set("memory.max", caps.memory_bytes.to_string())?;
                            if slot.join("memory.swap.max").is_file() {
                                set("memory.swap.max", "0".into())?;
                            }
                        }
                        if pids {
                            set("pids.max", caps.pids.to_string())?;
                        }
                    }
                    (false, true, _) => {
                        set("memory.limit_in_bytes", caps.memory_bytes.to_string())?;
                        if slot.join("memory.memsw.limit_in_bytes").is_file() {
                            set("memory.memsw.limit_in_bytes", caps.memory_bytes.to_string())?;
                        }
                    }
                    (false, false, true) => set("pids.max", caps.pids.to_string())?,
                    _ => {}
                }
                dirs.push((h.clone(), slot));
            }
            made.push(Mutex::new(Slot::open(dirs)?));
        }
        Ok(Setup {
            run_dirs: self.hiers.iter().map(|h| h.top.join(run_id)).collect(),
            slots: made,
            next: AtomicUsize::new(1),
            caps,
            plan: self.clone(),
        })
    }

    /// The report's entries for a run that has no cgroups, saying why.
    pub fn unavailable(&self, reason: &str, caps: StepCaps) -> Vec<Protection> {
        let why = format!("no writable cgroup: {reason}");
        vec![
            Protection {
                name: "cgroup".into(),
                active: false,
                detail: format!(
                    "not in force ({why}): processes a step leaves behind (setsid, double fork) are not killed"
                ),
            },
            Protection {
                name: "memory cap".into(),
                active: false,
                detail: format!(
                    "{} MiB per step not enforced ({why}); only the per-process address-space limit holds",
                    caps.memory_bytes >> 20
                ),
            },
            Protection {
                name: "pids cap".into(),
                active: false,
                detail: format!("{} per step not enforced ({why})", caps.pids),
            },
        ]
    }
}

/// A run's step cgroups.
#[derive(Debug)]
pub struct Setup {
    run_dirs: Vec<PathBuf>,
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    caps: StepCaps,
    plan: Plan,
}

impl Setup {
    /// Slot 0, the main host's.
    pub fn first_slot(&self) -> usize {
        0
    }

    /// Another slot, for a forked host (round robin; a slot is locked while a step runs).
    pub fn next_slot(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()
    }

    /// Slot `i`, to lock while a step runs in it.
    pub fn slot(&self, i: usize) -> &Mutex<Slot> {
        &self.slots[i % self.slots.len()]
    }

    /// What is in force, for the report.
    pub fn protections(&self) -> Vec<Protection> {
        let h = &self.plan.hiers;
        let version = |v2: bool| if v2 { "cgroup v2" } else { "cgroup v1" };
        let find = |f: fn(&Hier) -> bool| h.iter().find(|x| f(x));
        let why = if self.plan.missing.is_empty() {
            "not available to the follower".to_owned()
        } else {
            self.plan.missing.join("; ")
        };
        let mut out = Vec::new();
        out.push(match find(|x| x.kill) {
            Some(k) => Protection {
                name: "cgroup".into(),
                active: true,
                detail: format!(
                    "each Bash step in a cgroup under {}; every process left in it (setsid, double fork included) is killed at the step's end ({}) and at the next start after a follower's death",
                    k.top.display(),
                    if k.v2 { "cgroup.kill" } else { "cgroup v1 freezer" }
                ),
            },
            None => Protection {
                name: "cgroup".into(),
                active: true,
                detail: format!(
                    "each Bash step in a cgroup under {}; processes left in it are killed one by one at the step's end (no cgroup.kill or freezer: {why})",
                    h[0].top.display()
                ),
            },
        });
        out.push(match find(|x| x.memory) {
            Some(m) => Protection {
                name: "memory cap".into(),
                active: true,
                detail: format!(
                    "{} memory {} MiB per step, all its processes together, no swap",
                    version(m.v2),
                    self.caps.memory_bytes >> 20
                ),
            },
            None => Protection {
                name: "memory cap".into(),
                active: false,
                detail: format!(
                    "{} MiB per step not enforced (no memory controller: {why})",
                    self.caps.memory_bytes >> 20
                ),
            },
        });
        out.push(match find(|x| x.pids) {
            Some(p) => Protection {
                name: "pids cap".into(),
                active: true,
                detail: format!(
                    "{} pids {} per step, all its processes and threads together (root included)",
                    version(p.v2),
                    self.caps.pids
                ),
            },
            None => Protection {
                name: "pids cap".into(),
                active: false,
                detail: format!(
                    "{} per step not enforced (no pids controller: {why})",
                    self.caps.pids
                ),
            },
        });
        out
    }

    /// Kills everything in the run's cgroups and removes them (the run's end).
    pub fn remove(&self) {
        for s in &self.slots {
            if let Ok(s) = s.lock() {
                s.kill_all();
            }
        }
        remove_tree(&self.run_dirs);
        // The state directory's own cgroup too, once no run of it has one (another running
        // follower's run keeps it: rmdir fails on a cgroup with children).
        for top in self.plan.tops() {
            let _ = std::fs::remove_dir(top);
        }
    }
}

impl Drop for Setup {
    /// A run that ends early (an error before its end) leaves nothing running either.
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes each run directory's slots and then itself (empty cgroups only).
fn remove_tree(run_dirs: &[PathBuf]) {
    for run in run_dirs {
        if let Ok(entries) = std::fs::read_dir(run) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(run);
    }
}

/// One place for a running step: the same cgroup in each hierarchy, with its files open.
#[derive(Debug)]
pub struct Slot {
    /// `cgroup.procs` of each hierarchy (read and write).
    procs: Vec<OwnedFd>,
    /// cgroup v2 `cgroup.kill`.
    kill: Option<OwnedFd>,
    /// cgroup v1 `freezer.state`.
    freezer: Option<OwnedFd>,
}

fn open_file(p: &Path, flags: OFlag) -> Result<OwnedFd, String> {
    open(p, flags | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("cannot open {}: {e}", p.display()))
}

impl Slot {
    fn open(dirs: Vec<(Hier, PathBuf)>) -> Result<Self, String> {
        let mut slot = Slot {
            procs: Vec::new(),
            kill: None,
            freezer: None,
        };
        for (h, dir) in dirs {
            slot.procs
                .push(open_file(&dir.join("cgroup.procs"), OFlag::O_RDWR)?);
            if h.kill && h.v2 && slot.kill.is_none() {
                slot.kill = Some(open_file(&dir.join("cgroup.kill"), OFlag::O_WRONLY)?);
            } else if h.kill && !h.v2 && slot.freezer.is_none() {
                slot.freezer = Some(open_file(&dir.join("freezer.state"), OFlag::O_RDWR)?);
            }
        }
        Ok(slot)
    }

    /// Opens the slot at `dir` in each of `tops`' run directory (for killing leftovers).
    fn at(dirs: &[PathBuf]) -> Self {
        let mut slot = Slot {
            procs: Vec::new(),
            kill: None,
            freezer: None,
        };
        for dir in dirs {
            if let Ok(fd) = open_file(&dir.join("cgroup.procs"), OFlag::O_RDWR) {
                slot.procs.push(fd);
            }
            if slot.kill.is_none() {
                slot.kill = open_file(&dir.join("cgroup.kill"), OFlag::O_WRONLY).ok();
            }
            if slot.freezer.is_none() {
                slot.freezer = open_file(&dir.join("freezer.state"), OFlag::O_RDWR).ok();
            }
        }
        slot
    }

    /// The descriptors a step's process writes `0` to between fork and exec, joining the slot
    /// in every hierarchy (async-signal-safe: a `write(2)` each).
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    fn members(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for fd in &self.procs {
            let mut buf = vec![0u8; 64 * 1024];
            if let Ok(n) = rustix::io::pread(fd.as_fd(), &mut buf, 0) {
                out.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Kills every process in the slot and waits (up to 3 s) until none runs; returns whether
    /// none does. (A killed process whose new parent has not reaped it yet is listed until it
    /// is, but runs no more.)
    pub fn kill_all(&self) -> bool {
        let end = Instant::now() + KILL_WAIT;
        loop {
            let members: Vec<i32> = self.members().into_iter().filter(|p| running(*p)).collect();
            if members.is_empty() {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            if let Some(k) = &self.kill {
                let _ = rustix::io::write(k, b"1");
            } else if let Some(f) = &self.freezer {
                // Frozen, no process can fork while it is being killed.
                let _ = rustix::io::write(f, b"FROZEN");
                let frozen_by = Instant::now() + Duration::from_millis(500);
                while Instant::now() < frozen_by {
                    let mut buf = [0u8; 32];
                    match rustix::io::pread(f.as_fd(), &mut buf, 0) {
                        Ok(n) if buf[..n].starts_with(b"FROZEN") => break,
                        _ => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for pid in self.members() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                let _ = rustix::io::write(f, b"THAWED");
            } else {
                for pid in members {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether process `pid` exists and has not exited (a zombie has: its pidfd is readable).
fn running(pid: i32) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    let fd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return false,
        // No pidfds (older than Linux 5.3): running while it exists.
        Err(_) => return kill(Pid::from_raw(pid.as_raw_nonzero().get()), None).is_ok(),
    };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    !matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}

/// The names of the subdirectories of any of `dirs` (the same cgroup in each hierarchy), in
/// order, each once; a directory that cannot be read has none.
fn subdirs(dirs: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|d| d.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Kills and removes the cgroups left by runs of the state directory that no process holds
/// (`may_clean(run_id)` says whether a run's lock is free): the leftovers of a follower that
/// died. Returns the runs cleaned.
pub fn sweep(tops: &[PathBuf], may_clean: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut runs = subdirs(tops);
    runs.retain(|r| may_clean(r));
    for run in &runs {
        let run_dirs: Vec<PathBuf> = tops.iter().map(|t| t.join(run)).collect();
        for s in subdirs(&run_dirs) {
            let dirs: Vec<PathBuf> = run_dirs.iter().map(|d| d.join(&s)).collect();
            Slot::at(&dirs).kill_all();
        }
        remove_tree(&run_dirs);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn a_hybrid_layout_names_each_hierarchys_directory() {
        let l = parse_layout(
            "8:pids:/\n6:freezer:/\n4:memory:/process_api/97e3\n1:cpu:/\n0::/\n",
            MOUNTINFO,
        );
        assert_eq!(l.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(
            l.memory.as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory/process_api/97e3"))
        );
        assert_eq!(l.pids.as_deref(), Some(Path::new("/sys/fs/cgroup/pids")));
        assert_eq!(
            l.freezer.as_deref(),
            Some(Path::new("/sys/fs/cgroup/freezer"))
        );
    }

    #[test]
    fn a_pure_v2_layout_has_only_its_own_directory() {
        let l = parse_layout(
            "0::/system.slice/follower.service\n",
            "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        assert_eq!(
            l.v2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/system.slice/follower.service"))
        );
        assert_eq!((l.memory, l.pids, l.freezer), (None, None, None));
        assert_eq!(parse_layout("", ""), Layout::default());
    }

    #[test]
    fn a_directory_that_is_not_a_cgroup_gives_no_plan_and_says_why() {
        let d = tempfile::tempdir().unwrap();
        let plan = Plan::new(
            &Layout::default(),
            Some(d.path().to_str().unwrap()),
            "tracefleet-x",
        );
        let err = plan
            .setup("r", 1, StepCaps::for_device(1 << 30))
            .unwrap_err();
        assert!(err.contains("is not a cgroup"), "{err}");
        assert!(!d.path().join("tracefleet-x").exists());
        let none = Plan::new(&Layout::default(), Some("none"), "k");
        assert!(
            none.setup("r", 1, StepCaps::for_device(0))
                .unwrap_err()
                .contains("none")
        );
    }

    #[test]
    fn the_state_key_is_stable_and_differs_by_directory() {
        assert_eq!(
            state_key(Path::new("/nonexistent/a")),
            state_key(Path::new("/nonexistent/a"))
        );
        assert_ne!(
            state_key(Path::new("/nonexistent/a")),
            state_key(Path::new("/nonexistent/b"))
        );
    }
}
