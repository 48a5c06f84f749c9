//! The execution engine across real processes: sandbox escapes, signals, run time limits,
//! and resuming a run after SIGKILL.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tracefleet_e2e::{Workspace, bin};

mod sandbox;

/// Writes a trace source into the workspace with the given steps (Bash commands, each
/// waiting for the one before it).
fn trace(ws: &Workspace, name: &str, steps: &[&str]) -> String {
    let steps: Vec<(&str, Option<&str>, u32)> = steps.iter().map(|c| (*c, None, 20)).collect();
    write_trace(ws, name, 1, &steps)
}

/// Writes a trace source with `max_parallel` and steps of (command, `Dependencies` line,
/// timeout in seconds).
fn write_trace(
    ws: &Workspace,
    name: &str,
    max_parallel: u32,
    steps: &[(&str, Option<&str>, u32)],
) -> String {
    let mut src = format!(
        "---\ntrace_id: {name}\nversion: \"1.0.0\"\ngoal_signature: engine test {name}\nmax_parallel: {max_parallel}\n---\n"
    );
    for (i, (cmd, deps, timeout)) in steps.iter().enumerate() {
        let cmd = cmd.replace('\\', "\\\\").replace('"', "\\\"");
        src.push_str(&format!(
            "### Step {n}: step {n}\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"{cmd}\"\ntimeout_secs: {timeout}\n```\n",
            n = i + 1
        ));
        if let Some(d) = deps {
            src.push_str(&format!("**Dependencies**: {d}\n"));
        }
    }
    let file = format!("{name}.trace.md");
    std::fs::write(ws.path(&file), src).expect("write trace");
    file
}

/// Starts `follower run` in the background.
fn spawn_run(ws: &Workspace, args: &[&str]) -> Child {
    Command::new(bin("follower"))
        .arg("run")
        .args(args)
        .current_dir(ws.path("."))
        .env("TRACEFLEET_STATE_DIR", ws.state_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn follower")
}

/// Waits until `path` exists (a step got there).
fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
}

fn report(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "report: {e}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn statuses(r: &serde_json::Value) -> Vec<String> {
    r["step_results"]
        .as_array()
        .expect("step_results")
        .iter()
        .map(|s| s["status"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The id of the run that a background `follower run` started (its base directory is
/// `<state>/runs/<run-id>`), once it exists.
fn started_run_id(ws: &Workspace) -> String {
    let runs = ws.state_dir().join("runs");
    let start = Instant::now();
    loop {
        let found = std::fs::read_dir(&runs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned());
        if let Some(id) = found {
            return id;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no run started");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The only run's id.
fn only_run_id(ws: &Workspace) -> String {
    let r = ws.follower(&["runs", "list"]);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{r:?}");
    lines[0]
        .split_whitespace()
        .next()
        .expect("run id")
        .to_owned()
}

#[test]
fn a_run_killed_with_sigkill_resumes_and_runs_each_completed_step_exactly_once() {
    let ws = Workspace::new();
    let steps = [
        "echo 1 >> steps.log",
        "echo 2 >> steps.log",
        "echo 3 >> steps.log",
        // Step 4 signals that it started, then waits for the test.
        "touch step4-started; while [ ! -f go ]; do sleep 0.05; done; echo 4 >> steps.log",
        "echo 5 >> steps.log",
        "echo 6 >> steps.log",
    ];
    let src = trace(&ws, "six-steps", &steps);
    let mut child = spawn_run(&ws, &[&src, "--allow-unsigned", "--json"]);
    let id = started_run_id(&ws);
    let base = ws.state_dir().join("runs").join(&id);
    wait_for(&base.join("step4-started"));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert_eq!(
        std::fs::read_to_string(base.join("steps.log")).unwrap(),
        "1\n2\n3\n"
    );
    // The journal knows the run did not finish, and which step was in flight.
    let list = ws.follower(&["runs", "list"]);
    assert!(list.stdout.contains("running"), "{list:?}");
    let show = ws.follower(&["runs", "show", &id]);
    assert_eq!(show.code, Some(0), "{show:?}");
    for line in ["step 3: success", "step 4: started, not finished"] {
        assert!(show.stdout.contains(line), "{line}: {show:?}");
    }
    assert!(!show.stdout.contains("step 5"), "{show:?}");

    std::fs::write(base.join("go"), "").unwrap();
    let r = Command::new(bin("follower"))
        .args(["resume", &id, "--allow-unsigned", "--json"])
        .env("TRACEFLEET_STATE_DIR", ws.state_dir())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    let rep = report(&r);
    assert_eq!(rep["run_id"], id.as_str());
    assert_eq!(rep["status"], "success");
    assert_eq!(rep["resumes"], 1);
    assert_eq!(rep["completed_steps"], 6);
    assert_eq!(statuses(&rep), vec!["success"; 6]);
    // Each completed step ran exactly once; the interrupted one ran again, to completion.
    assert_eq!(
        std::fs::read_to_string(base.join("steps.log")).unwrap(),
        "1\n2\n3\n4\n5\n6\n"
    );
    // A finished run cannot be resumed again.
    let again = ws.follower(&["resume", &id, "--allow-unsigned"]);
    assert_eq!(again.code, Some(2), "{again:?}");
    assert!(again.stderr.contains("cannot be resumed"), "{again:?}");
}

#[test]
fn follower_run_after_a_crash_continues_the_unfinished_run() {
    let ws = Workspace::new();
    let src = trace(
        &ws,
        "crash-then-run",
        &[
            "echo a >> steps.log",
            "touch started; while [ ! -f go ]; do sleep 0.05; done; echo b >> steps.log",
            "echo c >> steps.log",
        ],
    );
    let mut child = spawn_run(&ws, &[&src, "--allow-unsigned", "--json"]);
    let id = started_run_id(&ws);
    let base = ws.state_dir().join("runs").join(&id);
    wait_for(&base.join("started"));
    child.kill().unwrap();
    let _ = child.wait();
    std::fs::write(base.join("go"), "").unwrap();

    let r = ws.follower(&["run", &src, "--allow-unsigned"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains(&format!("resuming run {id}")), "{r:?}");
    assert_eq!(only_run_id(&ws), id);
    assert_eq!(
        std::fs::read_to_string(base.join("steps.log")).unwrap(),
        "a\nb\nc\n"
    );
    let list = ws.follower(&["runs", "list"]);
    assert!(list.stdout.contains("success"), "{list:?}");
}

#[test]
fn sigterm_stops_after_the_current_step_and_a_second_aborts_it() {
    // One signal: the running step finishes, nothing after it starts; resume finishes.
    let ws = Workspace::new();
    let src = trace(
        &ws,
        "stoppable",
        &[
            "touch started; while [ ! -f go ]; do sleep 0.05; done; echo 1 >> steps.log",
            "echo 2 >> steps.log",
        ],
    );
    let child = spawn_run(
        &ws,
        &[&src, "--allow-unsigned", "--json", "--base-dir", "w"],
    );
    wait_for(&ws.path("w/started"));
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(ws.path("w/go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let rep = report(&out);
    assert_eq!(rep["status"], "stopped");
    assert_eq!(statuses(&rep), vec!["success", "not_run"]);
    assert_eq!(
        std::fs::read_to_string(ws.path("w/steps.log")).unwrap(),
        "1\n"
    );
    let id = rep["run_id"].as_str().unwrap().to_owned();
    let r = ws.follower(&["resume", &id, "--allow-unsigned"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(
        std::fs::read_to_string(ws.path("w/steps.log")).unwrap(),
        "1\n2\n"
    );

    // Two signals: the running step is aborted (its process group killed) and runs again on
    // resume.
    let ws = Workspace::new();
    let src = trace(
        &ws,
        "abortable",
        &[
            "touch started; sleep 600 & wait; echo 1 >> steps.log",
            "echo 2 >> steps.log",
        ],
    );
    let child = spawn_run(
        &ws,
        &[&src, "--allow-unsigned", "--json", "--base-dir", "w"],
    );
    wait_for(&ws.path("w/started"));
    let t = Instant::now();
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(100));
    signal(&child, "INT");
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "abort took {:?}",
        t.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let rep = report(&out);
    assert_eq!(rep["status"], "stopped");
    assert_eq!(statuses(&rep), vec!["failed", "not_run"]);
    assert!(
        rep["step_results"][0]["error"]
            .as_str()
            .unwrap()
            .contains("aborted on request"),
        "{rep}"
    );
    assert!(!ws.path("w/steps.log").exists());
    // No `sleep 600` survived the abort.
    let ps = Command::new("pgrep").args(["-f", "sleep 600"]).output();
    if let Ok(ps) = ps {
        let pids = String::from_utf8_lossy(&ps.stdout);
        for pid in pids.split_whitespace() {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            assert!(
                !cwd.starts_with(ws.path(".")),
                "sleep {pid} of the aborted step survived"
            );
        }
    }
}

#[test]
fn a_run_past_its_time_limit_fails_and_its_step_is_killed() {
    let ws = Workspace::new();
    let src = trace(&ws, "slow", &["sleep 600", "echo never > never.txt"]);
    let t = Instant::now();
    let r = Command::new(bin("follower"))
        .args([
            "run",
            &src,
            "--allow-unsigned",
            "--json",
            "--base-dir",
            "w",
            "--timeout",
            "1s",
        ])
        .current_dir(ws.path("."))
        .env("TRACEFLEET_STATE_DIR", ws.state_dir())
        .output()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(r.status.code(), Some(1));
    let rep = report(&r);
    assert_eq!(rep["status"], "failed");
    assert!(
        rep["error"].as_str().unwrap().contains("time limit of 1s"),
        "{rep}"
    );
    assert_eq!(statuses(&rep), vec!["failed", "not_run"]);
    assert!(!ws.path("w/never.txt").exists());
}

#[test]
fn sandbox_escapes_are_refused_and_the_report_lists_the_protections() {
    let ws = Workspace::new();
    std::fs::create_dir_all(ws.path("outside")).unwrap();
    let outside = ws.path("outside");
    let outside = outside.to_str().unwrap();
    // Each attempt must fail; `|| true` keeps the step going so that every one is tried,
    // and the step's output records what happened.
    let src = trace(
        &ws,
        "escapes",
        &[&format!(
            "(echo x > {outside}/abs.txt) 2>/dev/null && echo WROTE-ABS || echo refused-abs; \
             (echo x > ../../escape.txt) 2>/dev/null && echo WROTE-DOTDOT || echo refused-dotdot; \
             ln -s {outside} link && (echo x > link/sym.txt) 2>/dev/null && echo WROTE-SYMLINK || echo refused-symlink; \
             cat ../../follower.db >/dev/null 2>&1 && echo READ-STORE || echo refused-store; \
             env"
        )],
    );
    let r = Command::new(bin("follower"))
        .args(["run", &src, "--allow-unsigned", "--json"])
        .current_dir(ws.path("."))
        .env("TRACEFLEET_STATE_DIR", ws.state_dir())
        .env("SECRET_TOKEN", "hunter2")
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    let rep = report(&r);
    let out = rep["step_results"][0]["output"].as_str().unwrap();
    for refused in [
        "refused-abs",
        "refused-dotdot",
        "refused-symlink",
        "refused-store",
    ] {
        assert!(out.contains(refused), "{refused}: {out}");
    }
    assert!(!out.contains("hunter2"), "environment leaked: {out}");
    assert!(!out.contains("TRACEFLEET_STATE_DIR"), "{out}");
    assert_eq!(std::fs::read_dir(ws.path("outside")).unwrap().count(), 0);
    assert!(!ws.state_dir().join("escape.txt").exists());

    // The device's resources at the start and end of the run.
    for key in ["telemetry_start", "telemetry_end"] {
        assert!(
            rep[key]["mem_total_bytes"].as_u64().unwrap() > 0,
            "{key}: {rep}"
        );
        assert!(rep[key]["gpu_status"].as_str().is_some(), "{key}: {rep}");
    }
    let protections = rep["protections"].as_array().unwrap();
    let active = |name: &str| {
        protections
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {protections:?}"))["active"]
            == true
    };
    for p in [
        "path policy",
        "scrubbed environment",
        "rlimits",
        "landlock",
        "landlock network",
        "timeouts",
    ] {
        assert!(active(p), "{p} inactive: {protections:?}");
    }

    // The file tools refuse the same escapes through the host's path policy.
    let src = "---\ntrace_id: file-escape\nversion: \"1.0.0\"\ngoal_signature: g\n---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Write\nparameters:\n  file_path: ../../escape.txt\n  content: x\n```\n";
    std::fs::write(ws.path("fe.trace.md"), src).unwrap();
    let r = ws.follower(&["run", "fe.trace.md", "--allow-unsigned"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(!ws.state_dir().join("escape.txt").exists());

    // Disallowed commands and substitutions never start.
    for (cmd, extra, expected) in [
        (
            "cat x | nc -l 9",
            "allowed_commands: [cat]\n",
            "command `nc` is not in allowed_commands",
        ),
        ("echo $(id)", "", "command substitution '$('"),
        ("echo `id`", "", "command substitution '`'"),
    ] {
        let src = format!(
            "---\ntrace_id: policy\nversion: \"1.0.0\"\ngoal_signature: g\n---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"{cmd}\"\n{extra}```\n"
        );
        std::fs::write(ws.path("p.trace.md"), src).unwrap();
        let r = ws.follower(&["run", "p.trace.md", "--allow-unsigned", "--base-dir", "pw"]);
        assert_eq!(r.code, Some(2), "{cmd}: {r:?}");
        assert!(r.stderr.contains(expected), "{cmd}: {r:?}");
        assert!(!ws.path("pw").exists(), "{cmd}: the run started");
    }
}

#[test]
fn independent_steps_run_in_parallel_up_to_max_parallel() {
    // Steps 1 and 2 each wait for the other to have started: only concurrent execution
    // finishes them. Step 3 waits for both.
    let meet = [
        (
            "touch a; while [ ! -f b ]; do sleep 0.01; done",
            Some("None"),
            3,
        ),
        (
            "touch b; while [ ! -f a ]; do sleep 0.01; done",
            Some("None"),
            3,
        ),
        ("echo both > c", Some("Step 1, Step 2"), 3),
    ];
    let ws = Workspace::new();
    let src = write_trace(&ws, "meet", 2, &meet);
    let r = ws.follower(&["run", &src, "--allow-unsigned", "--base-dir", "w"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(std::fs::read_to_string(ws.path("w/c")).unwrap(), "both\n");

    // The same trace one step at a time cannot meet: step 1 times out.
    let src = write_trace(&ws, "meet-serial", 1, &meet);
    let r = ws.follower(&[
        "run",
        &src,
        "--allow-unsigned",
        "--base-dir",
        "w1",
        "--json",
    ]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(!ws.path("w1/c").exists());

    // Never more than max_parallel at once: each step counts the steps running beside it.
    let count = "touch run.$$; sleep 0.4; ls run.* | wc -l > seen.$$; sleep 0.4; rm run.$$";
    let src = write_trace(
        &ws,
        "capped",
        2,
        &[
            (count, Some("None"), 10),
            (count, Some("None"), 10),
            (count, Some("None"), 10),
            (count, Some("None"), 10),
        ],
    );
    let r = ws.follower(&["run", &src, "--allow-unsigned", "--base-dir", "w2"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let seen: Vec<u32> = std::fs::read_dir(ws.path("w2"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("seen."))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        seen.iter().all(|&n| n <= 2),
        "more than 2 at once: {seen:?}"
    );
    assert!(seen.contains(&2), "never 2 at once: {seen:?}");
}

#[test]
fn a_failure_in_a_parallel_branch_stops_new_steps_and_lets_running_ones_finish() {
    let ws = Workspace::new();
    let src = write_trace(
        &ws,
        "branch-fails",
        2,
        &[
            ("sleep 0.3; echo slow-done > slow", Some("None"), 10),
            ("exit 3", Some("None"), 10),
            ("echo never > never", Some("Step 1, Step 2"), 10),
        ],
    );
    let r = Command::new(bin("follower"))
        .args(["run", &src, "--allow-unsigned", "--base-dir", "w", "--json"])
        .current_dir(ws.path("."))
        .env("TRACEFLEET_STATE_DIR", ws.state_dir())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let rep = report(&r);
    assert_eq!(rep["failed_step"], 2);
    assert_eq!(statuses(&rep), vec!["success", "failed", "not_run"]);
    assert_eq!(
        std::fs::read_to_string(ws.path("w/slow")).unwrap(),
        "slow-done\n"
    );
    assert!(!ws.path("w/never").exists());
}

/// A real HTTP/1.1 server on a loopback port: `GET /ok.json` answers 200 with a JSON body,
/// anything else 404. Counts the requests it served.
fn http_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let (status, body) = if request.starts_with("GET /ok.json ") {
                ("200 OK", r#"{"ok": true, "fleet": "pi-lab"}"#)
            } else {
                ("404 Not Found", "no such page")
            };
            let mut s = stream;
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, served)
}

fn fetch_trace(ws: &Workspace, name: &str, url: &str, internet: bool) -> String {
    let src = format!(
        "---\ntrace_id: {name}\nversion: \"1.0.0\"\ngoal_signature: g\nmetadata:\n  requires_internet: {internet}\n---\n### Step 1: fetch\n**Tool Call**:\n```yaml\ntool: WebFetch\nparameters:\n  url: \"{url}\"\ntimeout_secs: 10\n```\n**Validation**:\n```yaml\n- type: json_schema\n  parameters:\n    schema: {{type: object, required: [ok]}}\n```\n"
    );
    let file = format!("{name}.trace.md");
    std::fs::write(ws.path(&file), src).expect("write trace");
    file
}

#[test]
fn webfetch_needs_declared_internet_fails_offline_fast_and_fetches_over_real_http() {
    let ws = Workspace::new();
    let (port, served) = http_server();
    let run = |file: &str| {
        let out = Command::new(bin("follower"))
            .args(["run", file, "--allow-unsigned", "--json", "--fresh"])
            .current_dir(ws.path("."))
            .env("TRACEFLEET_STATE_DIR", ws.state_dir())
            .output()
            .unwrap();
        (out.status.code(), report(&out))
    };

    // Declared and reachable: fetched, validated.
    let ok = fetch_trace(
        &ws,
        "fetch-ok",
        &format!("http://127.0.0.1:{port}/ok.json"),
        true,
    );
    let (code, rep) = run(&ok);
    assert_eq!(code, Some(0), "{rep}");
    assert!(
        rep["step_results"][0]["output"]
            .as_str()
            .unwrap()
            .contains("pi-lab")
    );
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A 404 fails the step and names the status.
    let missing = fetch_trace(
        &ws,
        "fetch-404",
        &format!("http://127.0.0.1:{port}/gone"),
        true,
    );
    let (code, rep) = run(&missing);
    assert_eq!(code, Some(1), "{rep}");
    assert!(
        rep["step_results"][0]["error"]
            .as_str()
            .unwrap()
            .contains("HTTP 404"),
        "{rep}"
    );

    // Not declared: a precondition failure, and nothing is requested.
    let before = served.load(std::sync::atomic::Ordering::SeqCst);
    let undeclared = fetch_trace(
        &ws,
        "fetch-undeclared",
        &format!("http://127.0.0.1:{port}/ok.json"),
        false,
    );
    let (code, rep) = run(&undeclared);
    assert_eq!(code, Some(1), "{rep}");
    assert_eq!(rep["all_preconditions_met"], false);
    assert!(
        rep["error"].as_str().unwrap().contains("requires_internet"),
        "{rep}"
    );
    assert_eq!(statuses(&rep), vec!["not_run"]);
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), before);

    // A host that cannot be resolved (offline, or no such name): a precondition failure
    // within the resolution limit, not a hang.
    let t = Instant::now();
    let offline = fetch_trace(
        &ws,
        "fetch-offline",
        "https://tracefleet-test.invalid/x.json",
        true,
    );
    let (code, rep) = run(&offline);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(code, Some(1), "{rep}");
    assert!(
        rep["error"]
            .as_str()
            .unwrap()
            .contains("tracefleet-test.invalid"),
        "{rep}"
    );
    assert_eq!(statuses(&rep), vec!["not_run"]);
}

/// Starts a background `follower run` of `src`, waits for `marker` in `base`, and kills the
/// follower with SIGKILL there (a crash in the middle of a step).
fn crash_at(ws: &Workspace, args: &[&str], marker: &Path) {
    let _ = std::fs::remove_file(marker);
    let mut child = spawn_run(ws, args);
    wait_for(marker);
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

#[test]
fn with_base_dir_a_killed_run_resumes_in_that_directory_and_only_there() {
    let ws = Workspace::new();
    let src = trace(
        &ws,
        "crash-base-dir",
        &[
            "echo a >> steps.log",
            "touch started; while [ ! -f go ]; do sleep 0.05; done; echo b >> steps.log",
            "echo c >> steps.log",
        ],
    );
    let site = ws.path("site");
    let site_s = site.to_str().unwrap();
    crash_at(
        &ws,
        &[&src, "--allow-unsigned", "--base-dir", site_s],
        &site.join("started"),
    );
    std::fs::write(site.join("go"), "").unwrap();

    // Another directory is another run: it starts anew there.
    let other = ws.path("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("go"), "").unwrap();
    let r = ws.follower(&[
        "run",
        &src,
        "--allow-unsigned",
        "--base-dir",
        other.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(!r.stderr.contains("resuming run"), "{r:?}");
    assert_eq!(
        std::fs::read_to_string(other.join("steps.log")).unwrap(),
        "a\nb\nc\n"
    );

    // The same directory continues the unfinished run: step 1 is not repeated.
    let r = ws.follower(&["run", &src, "--allow-unsigned", "--base-dir", site_s]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("resuming run"), "{r:?}");
    assert_eq!(
        std::fs::read_to_string(site.join("steps.log")).unwrap(),
        "a\nb\nc\n"
    );
}

#[test]
fn a_run_whose_process_dies_twice_at_the_same_step_is_not_resumed_automatically() {
    let ws = Workspace::new();
    let src = trace(
        &ws,
        "crash-loop",
        &[
            "echo a >> steps.log",
            // Waits for the test, at most 30 s (so old code fails instead of hanging).
            "echo try >> attempts.log; touch started; timeout 30 sh -c 'while [ ! -f go ]; do sleep 0.05; done'",
            "echo c >> steps.log",
        ],
    );
    let site = ws.path("site");
    let site_s = site.to_str().unwrap();
    let args = [src.as_str(), "--allow-unsigned", "--base-dir", site_s];
    // First death at step 2; the next `follower run` resumes it (interrupted once there)...
    crash_at(&ws, &args, &site.join("started"));
    crash_at(&ws, &args, &site.join("started"));
    // ...and dies there again: the third is refused, and nothing runs.
    let r = ws.follower(&["run", &src, "--allow-unsigned", "--base-dir", site_s]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("interrupted 2 times in a row at step 2"),
        "{r:?}"
    );
    assert!(r.stderr.contains("follower resume"), "{r:?}");
    // Asking again does not count again, and still runs nothing.
    let again = ws.follower(&["run", &src, "--allow-unsigned", "--base-dir", site_s]);
    assert!(again.stderr.contains("2 times"), "{again:?}");
    assert_eq!(
        std::fs::read_to_string(site.join("attempts.log")).unwrap(),
        "try\ntry\n"
    );
    assert_eq!(
        std::fs::read_to_string(site.join("steps.log")).unwrap(),
        "a\n"
    );

    // The operator's explicit resume runs it, from step 2.
    std::fs::write(site.join("go"), "").unwrap();
    let id = only_run_id(&ws);
    let r = ws.follower(&["resume", &id, "--allow-unsigned"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(
        std::fs::read_to_string(site.join("steps.log")).unwrap(),
        "a\nc\n"
    );
}

#[test]
fn a_journal_write_failing_on_a_full_disk_exits_1_and_the_run_continues_once_there_is_room() {
    // A real full disk: the state directory on a 512 KiB tmpfs in a private mount namespace
    // (needs root, as CI runs).
    if !Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("skipped: `unshare -m` is not permitted here (needs root)");
        return;
    }
    let ws = Workspace::new();
    let src = trace(
        &ws,
        "full-disk",
        &[
            "echo 1 >> steps.log",
            // 2 MB of output: its journal record does not fit.
            "echo 2 >> steps.log; yes x | head -c 2000000",
            "echo 3 >> steps.log",
        ],
    );
    let state = ws.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let site = ws.path("site");
    let script = format!(
        "mount -t tmpfs -o size=512k tmpfs '{state}' || exit 99
         '{f}' run '{src}' --allow-unsigned --base-dir '{site}'; echo \"first=$?\"
         mount -o remount,size=16m '{state}'
         '{f}' run '{src}' --allow-unsigned --base-dir '{site}'; echo \"second=$?\"",
        state = state.display(),
        f = bin("follower").display(),
        site = site.display(),
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .current_dir(ws.path("."))
        .env("TRACEFLEET_STATE_DIR", &state)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("first=1"), "{stdout}\n{stderr}");
    assert!(stderr.contains("journaling the run"), "{stderr}");
    assert!(stderr.contains("full"), "{stderr}");
    assert!(stdout.contains("second=0"), "{stdout}\n{stderr}");
    assert!(stderr.contains("resuming run"), "{stderr}");
    // Step 1 ran once; step 2, whose record was lost, ran again; then step 3.
    assert_eq!(
        std::fs::read_to_string(site.join("steps.log")).unwrap(),
        "1\n2\n2\n3\n"
    );
}

#[test]
fn follower_check_fails_on_a_store_truncated_to_zero_bytes() {
    let ws = Workspace::new();
    let src = trace(&ws, "zero-store", &["echo a"]);
    let r = ws.follower(&["run", &src, "--allow-unsigned"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(ws.follower(&["check"]).code, Some(0));
    let db = ws.state_dir().join("follower.db");
    std::fs::File::create(&db).unwrap();
    for extra in ["follower.db-wal", "follower.db-shm"] {
        let _ = std::fs::remove_file(ws.state_dir().join(extra));
    }
    let r = ws.follower(&["check"]);
    assert_ne!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("holds no schema"), "{r:?}");
    assert_eq!(
        std::fs::metadata(&db).unwrap().len(),
        0,
        "refusing wrote nothing"
    );
}
