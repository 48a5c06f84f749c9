//! The sandbox around Bash steps, tried with real processes: step cgroups (escapees killed,
//! memory and processes capped for the step as a whole, a dead follower's leftovers killed at
//! the next start), sockets refused, read roots holding for Bash, and a report that says what
//! was in force. Where this machine gives the follower no writable cgroup, the cgroup-specific
//! assertions are skipped with a message (the report must then say so).

use super::{report, signal, spawn_run, started_run_id, trace, wait_for};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tracefleet_e2e::{Workspace, bin};

/// Runs `follower run SRC --allow-unsigned --json --base-dir w` with `env` and extra `args`.
fn run(ws: &Workspace, src: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    run_in(ws, "w", src, args, env)
}

/// [`run`] in base directory `base`.
fn run_in(
    ws: &Workspace,
    base: &str,
    src: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    Command::new(bin("follower"))
        .args(["run", src, "--allow-unsigned", "--json", "--base-dir", base])
        .args(args)
        .current_dir(ws.path("."))
        .env("TRACEFLEET_STATE_DIR", ws.state_dir())
        .envs(env.iter().copied())
        .output()
        .expect("follower run")
}

/// The report's protection `name` (panics when it is missing).
fn protection<'a>(rep: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    rep["protections"]
        .as_array()
        .expect("protections")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no protection {name:?} in {}", rep["protections"]))
}

/// Whether the report says `name` was in force; when it was not, prints why the cgroup part of
/// a test is skipped.
fn in_force(rep: &serde_json::Value, name: &str) -> bool {
    let p = protection(rep, name);
    let on = p["active"] == true;
    if !on {
        eprintln!(
            "SKIPPED the {name} assertions: not in force on this machine ({})",
            p["detail"]
        );
        assert!(
            p["detail"].as_str().unwrap_or_default().contains("not"),
            "an inactive protection must say why: {p}"
        );
    }
    on
}

/// Whether `pid` runs (exists and is not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn pid_in(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Kills what a failed test left running.
fn kill_left(pids: &[u32]) {
    for p in pids {
        if running(*p) {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
    }
}

/// Waits up to 5 s for none of `pids` to run.
fn all_gone(pids: &[u32]) -> bool {
    let start = Instant::now();
    while pids.iter().any(|p| running(*p)) {
        if start.elapsed() > Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn setsid_and_double_fork_escapees_are_killed_at_the_step_s_end() {
    let ws = Workspace::new();
    let src = trace(
        &ws,
        "escapees",
        &[
            "setsid sleep 300 >/dev/null 2>&1 & echo $! > setsid.pid; \
             (sh -c 'sleep 300 & echo $! > fork2.pid' >/dev/null 2>&1 &); \
             while [ ! -s fork2.pid ]; do sleep 0.01; done",
            // While step 2 runs, the test looks at step 1's escapees.
            "touch step2; sleep 8",
        ],
    );
    let child = spawn_run(
        &ws,
        &[&src, "--allow-unsigned", "--json", "--base-dir", "w"],
    );
    wait_for(&ws.path("w/step2"));
    let pids = [
        pid_in(&ws.path("w/setsid.pid")),
        pid_in(&ws.path("w/fork2.pid")),
    ];
    let gone = all_gone(&pids);
    let r = child.wait_with_output().unwrap();
    kill_left(&pids);
    let rep = report(&r);
    if !in_force(&rep, "cgroup") {
        return;
    }
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    assert!(gone, "escapees {pids:?} outlived their step");
}

#[test]
fn memory_is_capped_for_all_of_a_step_s_processes_together() {
    let ws = Workspace::new();
    // Four processes of 48 MiB each, held at once (dd blocks writing its buffer into the
    // pipe until the reader wakes), under a 128 MiB cap for the step: not all can succeed.
    let src = trace(
        &ws,
        "memory",
        &[
            "for i in 1 2 3 4; do (dd if=/dev/zero bs=48M count=1 status=none && echo ok >> done.txt) | (sleep 2; cat >/dev/null) & done; wait; echo finished",
        ],
    );
    let r = run(&ws, &src, &[], &[("TRACEFLEET_STEP_MEMORY_MIB", "128")]);
    let rep = report(&r);
    let done = std::fs::read_to_string(ws.path("w/done.txt")).unwrap_or_default();
    if !in_force(&rep, "memory cap") {
        return;
    }
    assert!(
        protection(&rep, "memory cap")["detail"]
            .as_str()
            .unwrap()
            .contains("128 MiB"),
        "{rep}"
    );
    let succeeded = done.lines().count();
    assert!(
        succeeded < 4,
        "all four 48 MiB processes succeeded under a 128 MiB cap: {rep}"
    );
}

#[test]
fn processes_are_capped_for_a_step_even_as_root() {
    let ws = Workspace::new();
    let src = trace(
        &ws,
        "pids",
        &["i=0; while [ $i -lt 40 ]; do sleep 2 & echo $! >> pids.txt; i=$((i+1)); done; wait"],
    );
    // The option (as follower.toml's `run_args` passes it); the environment is the other test's.
    let r = run(&ws, &src, &["--step-pids", "16"], &[]);
    let rep = report(&r);
    let started = std::fs::read_to_string(ws.path("w/pids.txt"))
        .unwrap_or_default()
        .lines()
        .count();
    let rlimits = protection(&rep, "rlimits")["detail"].as_str().unwrap();
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    if root {
        // The per-user process limit does not hold for root: the report must not claim it.
        assert!(rlimits.contains("not enforced"), "{rlimits}");
    }
    if !in_force(&rep, "pids cap") {
        return;
    }
    assert!(
        protection(&rep, "pids cap")["detail"]
            .as_str()
            .unwrap()
            .contains("pids 16"),
        "{rep}"
    );
    assert!(
        started < 40,
        "40 processes started under a cap of 16: {rep}"
    );
    assert_eq!(r.status.code(), Some(1), "the step's fork failed: {r:?}");
}

/// A trace of one Bash step `command`, with `requires_internet` as given.
fn net_trace(ws: &Workspace, name: &str, command: &str, internet: bool) -> String {
    let cmd = command.replace('\\', "\\\\").replace('"', "\\\"");
    let src = format!(
        "---\ntrace_id: {name}\nversion: \"1.0.0\"\ngoal_signature: {name}\nmetadata:\n  requires_internet: {internet}\n---\n### Step 1: try\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"{cmd}\"\ntimeout_secs: 20\n```\n"
    );
    let file = format!("{name}.trace.md");
    std::fs::write(ws.path(&file), src).expect("write trace");
    file
}

#[test]
fn sockets_are_refused_unless_the_trace_requires_internet() {
    let ws = Workspace::new();
    std::fs::create_dir_all(ws.path("outside")).unwrap();
    let sock = ws.path("outside/s.sock");
    let unix = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    unix.set_nonblocking(true).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let command = format!(
        "perl -MIO::Socket::UNIX -e 'IO::Socket::UNIX->new(Peer => shift) or die qq(unix: $!\\n); print qq(CONNECTED-UNIX\\n)' {}; \
         bash -c 'echo hi > /dev/udp/127.0.0.1/{}' && echo SENT-UDP; \
         bash -c 'echo hi > /dev/tcp/127.0.0.1/{}' && echo CONNECTED-TCP; true",
        sock.display(),
        udp.local_addr().unwrap().port(),
        tcp.local_addr().unwrap().port()
    );
    let src = net_trace(&ws, "sockets", &command, false);
    let r = run(&ws, &src, &[], &[]);
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    let rep = report(&r);
    let out = rep["step_results"][0]["output"].as_str().unwrap();
    for reached in ["CONNECTED-UNIX", "SENT-UDP", "CONNECTED-TCP"] {
        assert!(!out.contains(reached), "{reached}: {rep}");
    }
    let mut buf = [0u8; 16];
    assert!(udp.recv(&mut buf).is_err(), "a UDP datagram arrived");
    assert!(unix.accept().is_err(), "a UNIX connection arrived");
    assert!(tcp.accept().is_err(), "a TCP connection arrived");
    assert_eq!(protection(&rep, "seccomp sockets")["active"], true, "{rep}");

    // A trace that declares requires_internet keeps its sockets (and the report says so).
    let src = net_trace(&ws, "sockets-allowed", &command, true);
    let r = run_in(&ws, "w2", &src, &[], &[]);
    let rep = report(&r);
    let out = rep["step_results"][0]["output"].as_str().unwrap();
    assert!(out.contains("CONNECTED-TCP"), "{rep}");
    assert!(udp.recv(&mut buf).is_ok(), "no UDP datagram arrived: {rep}");
    let seccomp = protection(&rep, "seccomp sockets");
    assert_eq!(seccomp["active"], false, "{rep}");
    assert!(
        seccomp["detail"]
            .as_str()
            .unwrap()
            .contains("requires_internet"),
        "{rep}"
    );
    assert_eq!(protection(&rep, "landlock network")["active"], false);
}

#[test]
fn read_roots_bound_what_bash_reads() {
    let ws = Workspace::new();
    std::fs::create_dir_all(ws.path("logs")).unwrap();
    std::fs::create_dir_all(ws.path("elsewhere")).unwrap();
    std::fs::write(ws.path("logs/app.log"), "LOG-LINE\n").unwrap();
    std::fs::write(ws.path("elsewhere/secret.txt"), "SECRET\n").unwrap();
    let logs = ws.path("logs");
    let command = format!(
        "cat {logs}/app.log; \
         cat /etc/shadow >/dev/null 2>&1 && echo READ-SHADOW || echo refused-shadow; \
         cat {secret} 2>/dev/null || echo refused-secret; \
         ls /usr/bin >/dev/null && id -un",
        logs = logs.display(),
        secret = ws.path("elsewhere/secret.txt").display()
    );
    let src = trace(&ws, "read-roots", &[&command]);
    let r = run(&ws, &src, &["--read-root", logs.to_str().unwrap()], &[]);
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    let rep = report(&r);
    let out = rep["step_results"][0]["output"].as_str().unwrap();
    assert!(out.contains("LOG-LINE"), "the read root is readable: {out}");
    assert!(out.contains("refused-shadow"), "{out}");
    assert!(
        out.contains("refused-secret") && !out.contains("SECRET\n"),
        "{out}"
    );
    // Programs still run and find their users and libraries.
    assert!(out.lines().last().is_some_and(|l| !l.is_empty()), "{out}");

    // A trace's read_paths narrow what Bash reads the same way.
    let src = "---\ntrace_id: read-paths\nversion: \"1.0.0\"\ngoal_signature: g\nread_paths: [/var/log]\n---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"cat /etc/shadow >/dev/null 2>&1 && echo READ-SHADOW || echo refused-shadow\"\n```\n";
    std::fs::write(ws.path("rp.trace.md"), src).unwrap();
    let r = run_in(&ws, "w2", "rp.trace.md", &[], &[]);
    let rep = report(&r);
    let out = rep["step_results"][0]["output"].as_str().unwrap();
    assert!(out.contains("refused-shadow"), "{rep}");
}

#[test]
fn the_report_says_what_was_in_force_and_what_was_not() {
    let ws = Workspace::new();
    let src = trace(&ws, "in-force", &["echo x"]);
    let r = run(
        &ws,
        &src,
        &[],
        &[
            ("TRACEFLEET_STEP_MEMORY_MIB", "300"),
            ("TRACEFLEET_STEP_PIDS", "77"),
        ],
    );
    let rep = report(&r);
    for name in [
        "landlock",
        "landlock network",
        "landlock scope",
        "seccomp sockets",
    ] {
        assert_eq!(protection(&rep, name)["active"], true, "{name}: {rep}");
    }
    if in_force(&rep, "memory cap") {
        let d = protection(&rep, "memory cap")["detail"].as_str().unwrap();
        assert!(d.contains("300 MiB") && d.contains("cgroup v"), "{d}");
    }
    if in_force(&rep, "pids cap") {
        let d = protection(&rep, "pids cap")["detail"].as_str().unwrap();
        assert!(d.contains("pids 77"), "{d}");
    }

    // No writable cgroup (here: the override names a file, not a cgroup): the report says
    // that containment is not in force, and why.
    std::fs::write(ws.path("not-a-cgroup"), "").unwrap();
    let not_cgroup = ws.path("not-a-cgroup");
    let not_cgroup = not_cgroup.to_str().unwrap();
    let r = run_in(
        &ws,
        "w2",
        &src,
        &[],
        &[("TRACEFLEET_CGROUP_ROOT", not_cgroup)],
    );
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    let rep = report(&r);
    for name in ["cgroup", "memory cap", "pids cap"] {
        let p = protection(&rep, name);
        assert_eq!(p["active"], false, "{name}: {rep}");
        let d = p["detail"].as_str().unwrap();
        assert!(d.contains("no writable cgroup"), "{name}: {d}");
        assert!(d.contains("not-a-cgroup"), "{name} says why: {d}");
    }
    // A cap of nothing is a usage error naming the option, before anything runs.
    let r = run(&ws, &src, &["--step-memory-mib", "0"], &[]);
    assert_eq!(r.status.code(), Some(2), "{r:?}");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("--step-memory-mib"),
        "{r:?}"
    );
}

#[test]
fn a_dead_follower_s_leftover_processes_are_killed_at_the_next_start() {
    let ws = Workspace::new();
    // The first attempt leaves a ticking escapee behind and waits; the resumed one ends.
    let src = trace(
        &ws,
        "leftover",
        &["if [ -f started ]; then exit 0; fi; \
           setsid sh -c 'while :; do echo tick >> ticks; sleep 0.05; done' >/dev/null 2>&1 & echo $! > esc.pid; \
           touch started; sleep 300"],
    );
    let mut child = spawn_run(&ws, &[&src, "--allow-unsigned", "--json"]);
    let id = started_run_id(&ws);
    let base = ws.state_dir().join("runs").join(&id);
    wait_for(&base.join("started"));
    signal(&child, "KILL");
    let _ = child.wait();
    let esc = pid_in(&base.join("esc.pid"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        running(esc),
        "the premise: the escapee outlives the follower's SIGKILL"
    );

    let r = Command::new(bin("follower"))
        .args(["resume", &id, "--allow-unsigned", "--json"])
        .env("TRACEFLEET_STATE_DIR", ws.state_dir())
        .output()
        .unwrap();
    let rep = report(&r);
    if !in_force(&rep, "cgroup") {
        kill_left(&[esc]);
        return;
    }
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    let gone = all_gone(&[esc]);
    kill_left(&[esc]);
    assert!(
        gone,
        "the dead follower's escapee still runs after the next start"
    );
    // Its effect does not go on beside the resumed run.
    let ticks = std::fs::read_to_string(base.join("ticks")).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read_to_string(base.join("ticks")).unwrap_or_default(),
        ticks
    );
}
