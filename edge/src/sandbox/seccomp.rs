//! A seccomp filter for Bash steps' processes (the `seccompiler` crate, applied between fork
//! and exec, inherited by everything the step starts).
//!
//! - Unless the trace declares `requires_internet`, `socket(2)` fails with `EACCES` for every
//!   address family: no UNIX-domain socket (abstract or on a path, wherever it is), no TCP, no
//!   UDP, no raw or netlink socket. `socketpair(2)` stays allowed (an unnamed pair reaches
//!   nothing outside the step).
//! - Always: `io_uring_setup(2)` fails with `EPERM` (io_uring could open sockets past the filter).
//!
//! Landlock complements it (TCP rules, abstract-socket scoping); neither limits pathname UNIX
//! sockets alone.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;
use tracefleet::report::Protection;

/// The filters for a run (each applied in turn between fork and exec), with the report's
/// entry.
pub fn programs(network: bool) -> (Vec<BpfProgram>, Protection) {
    let arch = match TargetArch::try_from(std::env::consts::ARCH) {
        Ok(a) => a,
        Err(_) => {
            return (
                Vec::new(),
                Protection {
                    name: "seccomp sockets".into(),
                    active: false,
                    detail: format!(
                        "not in force: no seccomp filter for {} (Bash steps may open sockets)",
                        std::env::consts::ARCH
                    ),
                },
            );
        }
    };
    let one = |syscall: i64, errno: i32| -> Result<BpfProgram, String> {
        SeccompFilter::new(
            BTreeMap::from([(syscall, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )
        .and_then(TryInto::<BpfProgram>::try_into)
        .map_err(|e| e.to_string())
    };
    let mut progs = Vec::new();
    let built = (|| -> Result<(), String> {
        progs.push(one(nix::libc::SYS_io_uring_setup, nix::libc::EPERM)?);
        if !network {
            progs.push(one(nix::libc::SYS_socket, nix::libc::EACCES)?);
        }
        Ok(())
    })();
    let protection = match built {
        Err(e) => {
            progs.clear();
            Protection {
                name: "seccomp sockets".into(),
                active: false,
                detail: format!("not in force: the filter could not be built: {e}"),
            }
        }
        Ok(()) if network => Protection {
            name: "seccomp sockets".into(),
            active: false,
            detail: "sockets allowed: the trace declares requires_internet (io_uring refused)"
                .into(),
        },
        Ok(()) => Protection {
            name: "seccomp sockets".into(),
            active: true,
            detail: "Bash steps cannot create sockets (UNIX, TCP, UDP, raw, netlink: EACCES) nor io_uring instances".into(),
        },
    };
    (progs, protection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_filtered_unless_the_trace_requires_internet() {
        let (progs, p) = programs(false);
        if std::env::consts::ARCH == "x86_64" || std::env::consts::ARCH == "aarch64" {
            assert_eq!(progs.len(), 2, "io_uring and socket filters");
            assert!(p.active, "{p:?}");
        }
        let (progs, p) = programs(true);
        assert!(progs.len() <= 1, "io_uring only");
        assert!(!p.active && p.detail.contains("requires_internet"), "{p:?}");
    }
}
