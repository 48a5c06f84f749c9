//! Kernel-enforced containment of a run, beneath the host's own path policy.
//!
//! - **Landlock** ([landlock.io](https://landlock.io), the `landlock` crate, best effort):
//!   [`restrict_current_thread`] restricts the thread that executes the trace, and so every
//!   process a Bash step starts from it (a child inherits its parent thread's domain): full
//!   access beneath the run's base directory; read (and execute) beneath the read roots, the
//!   system directories programs need ([`SYSTEM_DIRS`]) and the files of `/etc` they load
//!   ([`ETC_FILES`], not the rest of `/etc` unless it is a read root); read/write of a few
//!   devices ([`DEVICES`]). With ABI ≥ 4 TCP bind/connect are denied unless the trace declares
//!   `requires_internet`; with ABI ≥ 6 signals and abstract UNIX sockets cannot reach outside
//!   the domain. Nothing else of the file system can be opened — the device store and the trust
//!   root included. On a kernel without Landlock this is reported, not fatal.
//! - **Resource limits** ([`ResourceLimits`], `setrlimit(2)`): applied to each Bash step's
//!   process before it executes `/bin/sh` (see `host/process.rs`).
//! - **Step cgroups** ([`cgroup`]): each Bash step in a cgroup, capped in memory and processes
//!   as a whole, killed as a whole at its end and after a follower's death.
//! - **seccomp** ([`seccomp`]): no sockets for Bash steps unless the trace declares
//!   `requires_internet`.
//!
//! What was active goes into the report as [`Protection`]s.

pub mod cgroup;
pub mod seccomp;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};
use std::path::{Path, PathBuf};
use tracefleet::report::Protection;

/// Directories a shell step may read and execute from, whatever the trace's read roots:
/// programs and their libraries.
pub const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64"];

/// Files (and directories) of `/etc` a shell step may read whatever the read roots: what the
/// dynamic loader, the C library (users, groups, time zone, name resolution) and common tools
/// load. Secrets (`/etc/shadow`, keys) are not among them.
pub const ETC_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/os-release",
    "/etc/debian_version",
    "/etc/hostname",
    "/etc/magic",
    "/etc/ssl/certs",
    "/etc/ca-certificates",
];

/// Devices a shell step may read and write.
pub const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// The highest Landlock ABI this follower asks for; older kernels get what they support.
const TARGET_ABI: ABI = ABI::V6;

/// Limits applied to each Bash step's process (and inherited by what it starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `RLIMIT_CPU`, seconds of CPU time per process (the step's timeout bounds wall time).
    pub cpu_secs: u64,
    /// `RLIMIT_AS`, bytes of address space per process.
    pub address_space_bytes: u64,
    /// `RLIMIT_FSIZE`, largest file a process may write, in bytes.
    pub file_size_bytes: u64,
    /// `RLIMIT_NPROC`, processes of the follower's user (not enforced for root: the step's
    /// pids cgroup is what holds there).
    pub processes: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            cpu_secs: 600,
            address_space_bytes: 4 << 30,
            file_size_bytes: 1 << 30,
            processes: 4096,
        }
    }
}

impl ResourceLimits {
    /// The report's description of these limits for a follower running as `root` or not
    /// (`RLIMIT_NPROC` does not apply to root).
    pub fn protection(&self, root: bool) -> Protection {
        Protection {
            name: "rlimits".into(),
            active: true,
            detail: format!(
                "per Bash process: cpu {} s, address space {} MiB, file size {} MiB; {}",
                self.cpu_secs,
                self.address_space_bytes >> 20,
                self.file_size_bytes >> 20,
                if root {
                    "processes: RLIMIT_NPROC not enforced (the follower runs as root)".to_owned()
                } else {
                    format!("processes of the follower's user {}", self.processes)
                }
            ),
        }
    }
}

pub use cgroup::StepCaps;

/// The environment variable behind `--step-memory-mib`: a step's memory cap in MiB (default:
/// half the device's memory).
pub const STEP_MEMORY_ENV: &str = "TRACEFLEET_STEP_MEMORY_MIB";
/// The environment variable behind `--step-pids`: a step's process cap (default 512).
pub const STEP_PIDS_ENV: &str = "TRACEFLEET_STEP_PIDS";

impl StepCaps {
    /// The device's defaults ([`StepCaps::for_device`]) with what the command line (or the
    /// environment, or the agent's `run_args`) set: memory in MiB, processes.
    pub fn with_overrides(
        mem_total_bytes: u64,
        memory_mib: Option<u64>,
        pids: Option<u64>,
    ) -> Self {
        let mut caps = Self::for_device(mem_total_bytes);
        if let Some(mib) = memory_mib {
            caps.memory_bytes = mib.saturating_mul(1 << 20);
        }
        if let Some(n) = pids {
            caps.pids = n;
        }
        caps
    }
}

/// What contains a run's Bash steps besides rlimits and Landlock: its step cgroups (none where
/// none could be made) and seccomp programs (applied in turn in each step's process).
#[derive(Debug, Clone, Default)]
pub struct Containment {
    /// The run's step cgroups.
    pub cgroups: Option<std::sync::Arc<cgroup::Setup>>,
    /// The seccomp programs.
    pub seccomp: std::sync::Arc<Vec<seccompiler::BpfProgram>>,
}

/// What the run may reach.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Full access beneath it.
    pub base_dir: PathBuf,
    /// Read-only roots.
    pub read_roots: Vec<PathBuf>,
    /// Whether TCP connections stay allowed (`requires_internet`).
    pub network: bool,
}

/// Restricts the calling thread (and the processes it will start) to `policy` with Landlock,
/// as far as the kernel supports it.
///
/// Returns what is in force, for the report. Never fails the run: an unsupported kernel is
/// reported as an inactive protection; an error building the ruleset is reported the same
/// way with its reason.
pub fn restrict_current_thread(policy: &Policy) -> Vec<Protection> {
    match try_restrict(policy) {
        Ok(p) => p,
        Err(e) => vec![Protection {
            name: "landlock".into(),
            active: false,
            detail: format!("not applied: {e}"),
        }],
    }
}

fn try_restrict(policy: &Policy) -> Result<Vec<Protection>, landlock::RulesetError> {
    let abi = TARGET_ABI;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?;
    if !policy.network {
        ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
    }
    let ruleset = ruleset.scope(Scope::from_all(abi))?;
    let read: Vec<&Path> = policy
        .read_roots
        .iter()
        .map(PathBuf::as_path)
        .chain(SYSTEM_DIRS.iter().map(Path::new))
        .chain(ETC_FILES.iter().map(Path::new))
        .collect();
    let status = ruleset
        .create()?
        .add_rules(path_beneath_rules(
            [&policy.base_dir],
            AccessFs::from_all(abi),
        ))?
        .add_rules(path_beneath_rules(read, AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(
            DEVICES,
            AccessFs::ReadFile | AccessFs::WriteFile,
        ))?
        .restrict_self()?;
    let abi_text = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => format!("{effective_abi:?}"),
        LandlockStatus::NotEnabled => "not enabled in this kernel".into(),
        LandlockStatus::NotImplemented => "not built into this kernel".into(),
    };
    let (active, how) = match status.ruleset {
        RulesetStatus::FullyEnforced => (true, "fully enforced"),
        RulesetStatus::PartiallyEnforced => (true, "partially enforced (older kernel ABI)"),
        _ => (false, "not enforced"),
    };
    let net_abi = matches!(status.landlock, LandlockStatus::Available { effective_abi, .. } if effective_abi >= ABI::V4);
    let scope_abi = matches!(status.landlock, LandlockStatus::Available { effective_abi, .. } if effective_abi >= ABI::V6);
    let mut out = vec![Protection {
        name: "landlock".into(),
        active,
        detail: format!(
            "{how}, ABI {abi_text}: read/write {}; read {}",
            policy.base_dir.display(),
            policy
                .read_roots
                .iter()
                .map(|p| p.display().to_string())
                .chain(SYSTEM_DIRS.iter().map(|s| (*s).to_owned()))
                .collect::<Vec<_>>()
                .join(", ")
                + " and the loader, user, time-zone and resolver files of /etc"
        ),
    }];
    out.push(Protection {
        name: "landlock network".into(),
        active: active && net_abi && !policy.network,
        detail: if policy.network {
            "TCP allowed: the trace declares requires_internet".into()
        } else if net_abi {
            "TCP bind and connect denied".into()
        } else {
            "needs Landlock ABI 4".into()
        },
    });
    out.push(Protection {
        name: "landlock scope".into(),
        active: active && scope_abi,
        detail: if scope_abi {
            "signals and abstract UNIX sockets cannot reach outside the run".into()
        } else {
            "needs Landlock ABI 6".into()
        },
    });
    Ok(out)
}
