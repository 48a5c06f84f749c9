//! The fleet link end to end: a real Mosquitto broker on a free loopback port, the real
//! `learner serve` and `follower agent` processes, signed traces and commands.

use std::path::Path;
use std::process::Command;
use tracefleet::wire::{self, ReportMessage, Topic};
use tracefleet_e2e::{
    Broker, Daemon, FakeMessagesApi, Workspace, mqtt_publish, repo_root, shipped_size_limit,
};

mod confidential;
mod metrics;
mod oversized;

/// Keys (traces, commands), a trust root naming both, the follower provisioned with it, and
/// the learner's and the agent's configs for `broker`. Returns the signed services-audit trace.
fn fleet(ws: &Workspace, broker: &Broker) -> String {
    fleet_at(ws, broker.port)
}

/// [`fleet`] with the broker on `port` (an embedded one, say).
fn fleet_at(ws: &Workspace, port: u16) -> String {
    let traces = ws.key("traces");
    let r = ws.learner(&[
        "keys",
        "generate",
        "--role",
        "commands",
        "--out",
        "commands.key",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.learner(&["keys", "generate", "--role", "root", "--out", "root.key"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.learner(&[
        "trust",
        "create",
        "--version",
        "1",
        "--expires",
        "30d",
        "--root-key",
        "root.key.pub",
        "--traces-key",
        "traces.key.pub",
        "--commands-key",
        "commands.key.pub",
        "--sign",
        "root.key",
        "-o",
        "root-v1.tfr",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.follower(&["trust", "init", "root-v1.tfr"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    // With an authenticating broker (see `passwords`), each logs in as itself.
    let login = |user: &str| {
        if ws.path("passwd").exists() {
            format!(
                "username = \"{user}\"\npassword_file = \"{}\"\n",
                ws.path(&format!("{user}.pw")).display()
            )
        } else {
            String::new()
        }
    };
    std::fs::write(
        ws.path("learner.toml"),
        format!(
            "db = \"learner.db\"\n[broker]\nport = {port}\n{}",
            login("tracefleet-learner")
        ),
    )
    .expect("learner.toml");
    std::fs::write(
        ws.path("follower.toml"),
        format!(
            "device_id = \"pi-01\"\ngroups = [\"canary\"]\nheartbeat_secs = 1\n[broker]\nport = {port}\nkeep_alive_secs = 5\n{}",
            login("pi-01")
        ),
    )
    .expect("follower.toml");
    ws.sign("services-audit.trace.md", &traces)
}

fn runs(ws: &Workspace) -> serde_json::Value {
    let r = ws.learner(&["runs", "list", "--config", "learner.toml", "--json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    serde_json::from_str(&r.stdout).expect("json")
}

fn devices(ws: &Workspace) -> serde_json::Value {
    let r = ws.learner(&["devices", "list", "--config", "learner.toml", "--json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    serde_json::from_str(&r.stdout).expect("json")
}

/// Waits until the learner says pi-01 is online (or offline).
fn wait_online(ws: &Workspace, online: bool) {
    ws.wait_until(30, &format!("pi-01 online = {online}"), || {
        devices(ws)
            .as_array()
            .filter(|d| {
                d.iter()
                    .any(|d| d["device_id"] == "pi-01" && d["online"] == online)
            })
            .map(|_| ())
    });
}

/// Waits until the learner has stored at least `n` runs; returns them.
fn wait_stored_runs(ws: &Workspace, n: usize) -> Vec<(String, String)> {
    ws.wait_until(60, &format!("{n} stored run(s)"), || {
        let s = stored_runs(ws);
        (s.len() >= n).then_some(s)
    })
}

fn serve(ws: &Workspace) -> Daemon {
    ws.daemon("learner", &["serve", "--config", "learner.toml"])
}

fn agent(ws: &Workspace) -> Daemon {
    ws.daemon("follower", &["agent", "--config", "follower.toml"])
}

/// Run ids the learner stored, each once (the table's key), with their statuses.
fn stored_runs(ws: &Workspace) -> Vec<(String, String)> {
    runs(ws)["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| {
            (
                r["run_id"].as_str().expect("id").to_owned(),
                r["status"].as_str().expect("status").to_owned(),
            )
        })
        .collect()
}

/// Rolls `signed` out to the `canary` group (pi-01's), one wave.
fn roll_out_to_canary_group(ws: &Workspace, signed: &str) {
    let r = ws.learner(&[
        "rollout",
        "start",
        signed,
        "--waves",
        "canary",
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
}

/// Waits for pi-01's ack of an installed trace.
fn wait_installed(ws: &Workspace) {
    ws.wait_until(30, "the install ack", || {
        runs(ws)["acks"]
            .as_array()
            .filter(|a| {
                a.iter()
                    .any(|a| a["device_id"] == "pi-01" && a["outcome"] == "installed")
            })
            .map(|_| ())
    });
}

#[test]
fn an_offline_device_gets_a_rollout_when_it_connects_and_runs_it_on_a_signed_command() {
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    let signed = fleet(&ws, &broker);
    let _learner = serve(&ws);

    // Published while the device is offline: retained on its group's topic.
    roll_out_to_canary_group(&ws, &signed);
    let agent = agent(&ws);
    wait_installed(&ws);
    let r = ws.follower(&["traces", "list"]);
    assert!(r.stdout.contains("services-audit"), "{r:?}");
    wait_online(&ws, true);

    // A signed command runs it; the report arrives once.
    command_run(&ws, "pi-01", "services-audit");
    let stored = wait_stored_runs(&ws, 1);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].1, "success", "{stored:?}");
    let stats = runs(&ws)["trace_stats"].clone();
    assert_eq!(stats[0]["runs"], 1, "{stats}");
    assert!((stats[0]["confidence"].as_f64().expect("c") - 0.775).abs() < 1e-9);
    // The device's own store shows the same run.
    let local = ws.follower(&["runs", "list"]);
    assert!(local.stdout.contains(&stored[0].0), "{local:?}");

    // A command signed by a trace key is refused: nothing runs.
    let r = ws.learner(&[
        "command",
        "pi-01",
        "run",
        "services-audit",
        "--key",
        "traces.key",
        "--config",
        "learner.toml",
    ]);
    assert_ne!(r.code, Some(0), "a trace key must not sign commands: {r:?}");

    // Shutdown: the device says it is offline, and its outbox is empty.
    assert_eq!(agent.terminate(), Some(0));
    wait_online(&ws, false);
    assert_eq!(ws.run_count(), 1);
}

#[test]
fn the_embedded_broker_carries_a_rollout_commands_and_reports_across_a_learner_restart() {
    let ws = Workspace::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let signed = fleet_at(&ws, port);
    // No [broker]: `serve` runs its own.
    std::fs::write(
        ws.path("learner.toml"),
        format!("db = \"learner.db\"\n[embedded]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .expect("learner.toml");
    let learner = serve(&ws);
    roll_out_to_canary_group(&ws, &signed);
    // The device connects after the wave went out: it gets the retained trace.
    let _agent = agent(&ws);
    wait_installed(&ws);
    wait_online(&ws, true);
    command_run(&ws, "pi-01", "services-audit");
    wait_stored_runs(&ws, 1);

    // The learner stops, and its broker with it; a run meanwhile waits in the device's
    // outbox and arrives once the learner is back.
    assert_eq!(learner.terminate(), Some(0));
    let r = ws.follower(&["run", "services-audit"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let _learner = serve(&ws);
    let stored = wait_stored_runs(&ws, 2);
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(stored.iter().all(|(_, s)| s == "success"), "{stored:?}");
    // And commands still reach the device through the new broker.
    wait_online(&ws, true);
    command_run(&ws, "pi-01", "services-audit");
    wait_stored_runs(&ws, 3);
    let log = std::fs::read_to_string(ws.path("learner.log")).expect("log");
    assert_eq!(
        log.matches("embedded MQTT broker (rumqttd) started")
            .count(),
        2,
        "{log}"
    );

    // A second learner on the same address is refused, saying why.
    let r = ws.learner(&["serve", "--config", "learner.toml"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("cannot listen on"), "{r:?}");
}

/// Runs `openssl` in the workspace.
fn openssl(ws: &Workspace, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(ws.path(""))
        .output()
        .expect("openssl: install it (scripts/setup.sh does)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A CA (`{name}.crt`, `{name}.key`) and, signed by it, a certificate for 127.0.0.1 and
/// localhost (`{name}-broker.crt`, `{name}-broker.key`).
fn certificates(ws: &Workspace, name: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let (ca_key, ca_crt) = (format!("{name}.key"), format!("{name}.crt"));
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-days",
        "2",
        "-subj",
        "/CN=tracefleet test CA",
    ]);
    openssl(ws, &a);
    let (key, csr, crt) = (
        format!("{name}-broker.key"),
        format!("{name}-broker.csr"),
        format!("{name}-broker.crt"),
    );
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
    openssl(ws, &a);
    std::fs::write(
        ws.path("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("san.ext");
    openssl(
        ws,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

#[test]
fn the_link_runs_over_tls_and_refuses_a_broker_it_cannot_verify() {
    let ws = Workspace::new();
    certificates(&ws, "ca");
    certificates(&ws, "other-ca");
    let broker = Broker::start_with(
        &ws,
        &format!(
            "allow_anonymous true\ncertfile {}\nkeyfile {}\n{}",
            ws.path("ca-broker.crt").display(),
            ws.path("ca-broker.key").display(),
            shipped_size_limit()
        ),
    );
    let signed = fleet(&ws, &broker);
    // Both sides check the broker's certificate against the CA.
    for file in ["learner.toml", "follower.toml"] {
        let mut toml = std::fs::read_to_string(ws.path(file)).expect("toml");
        toml.push_str(&format!("ca_file = \"{}\"\n", ws.path("ca.crt").display()));
        std::fs::write(ws.path(file), toml).expect("toml");
    }
    let r = ws.follower(&["install", &signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let _learner = serve(&ws);
    let _agent = agent(&ws);
    wait_online(&ws, true);
    command_run(&ws, "pi-01", "services-audit");
    let stored = wait_stored_runs(&ws, 1);
    assert_eq!(stored[0].1, "success", "{stored:?}");

    // A client that trusts another CA does not talk to this broker.
    let wrong = std::fs::read_to_string(ws.path("learner.toml"))
        .expect("toml")
        .replace(
            &ws.path("ca.crt").display().to_string(),
            &ws.path("other-ca.crt").display().to_string(),
        );
    std::fs::write(ws.path("learner-wrong-ca.toml"), wrong).expect("toml");
    let r = ws.learner(&[
        "command",
        "pi-01",
        "run",
        "services-audit",
        "--key",
        "commands.key",
        "--config",
        "learner-wrong-ca.toml",
    ]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.to_lowercase().contains("certificate"), "{r:?}");
    assert_eq!(
        stored_runs(&ws).len(),
        1,
        "nothing ran on the refused command"
    );
}

#[test]
fn reports_written_while_the_broker_is_down_or_the_agent_killed_arrive_exactly_once() {
    let ws = Workspace::new();
    let mut broker = Broker::start(&ws);
    let signed = fleet(&ws, &broker);
    let r = ws.follower(&["install", &signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let _learner = serve(&ws);
    let agent1 = agent(&ws);
    ws.wait_until(30, "the device online", || {
        devices(&ws)
            .as_array()
            .filter(|d| !d.is_empty())
            .map(|_| ())
    });

    // A run started by hand on the enrolled device is reported by the idle agent.
    let r = ws.follower(&["run", "services-audit"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    ws.wait_until(30, "the hand-started run's report", || {
        (stored_runs(&ws).len() == 1).then_some(())
    });

    // Runs on the device while the broker is down: their reports wait in the outbox.
    broker.stop();
    for _ in 0..3 {
        let r = ws.follower(&["run", "services-audit"]);
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    broker.restart();
    ws.wait_until(60, "4 reports after a broker restart", || {
        (stored_runs(&ws).len() == 4).then_some(())
    });

    // The agent killed outright, runs meanwhile, the broker restarted again, a new agent.
    drop(agent1);
    for _ in 0..2 {
        let r = ws.follower(&["run", "services-audit"]);
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    broker.restart();
    let _agent2 = agent(&ws);
    ws.wait_until(60, "6 reports", || {
        (stored_runs(&ws).len() == 6).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let stored = stored_runs(&ws);
    assert_eq!(stored.len(), 6, "{stored:?}");
    assert!(stored.iter().all(|(_, s)| s == "success"), "{stored:?}");
    let stats = runs(&ws)["trace_stats"].clone();
    assert_eq!(stats[0]["runs"], 6, "each report counted once: {stats}");
    let local: Vec<String> = ws
        .follower(&["runs", "list"])
        .stdout
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
        .collect();
    for (id, _) in &stored {
        assert!(local.contains(id), "{id} not a local run: {local:?}");
    }
    assert!(Path::new(&ws.path("state/follower.db")).exists());
}

/// Runs the learner stored, read straight from its database (cheap enough to poll while
/// thousands arrive).
fn learner_run_count(ws: &Workspace) -> i64 {
    rusqlite::Connection::open_with_flags(
        ws.path("learner.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .and_then(|c| c.query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0)))
    .unwrap_or(0)
}

#[test]
fn ten_thousand_reports_arrive_exactly_once_through_two_broker_restarts_and_a_killed_agent() {
    const N: usize = 10_000;
    let ws = Workspace::new();
    let mut broker = Broker::start(&ws);
    let signed = fleet(&ws, &broker);
    let r = ws.follower(&["install", &signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let _learner = serve(&ws);
    let agent1 = agent(&ws);
    wait_online(&ws, true);
    // One real run: the report the device's other runs are made from.
    let r = ws.follower(&["run", "services-audit"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let real_id = wait_stored_runs(&ws, 1)[0].0.clone();
    let real = ws.follower(&["runs", "show", &real_id]);
    let real: serde_json::Value = serde_json::from_str(&real.stdout).expect("report json");

    // N more runs' reports go into the device's outbox (where `follower run` writes them on an
    // enrolled device) in blocks, while the broker restarts twice and the agent is SIGKILLed.
    let store = follower::store::Store::open(&ws.state_dir()).expect("the device's store");
    let write_block = |from: usize, to: usize| {
        for i in from..to {
            let mut r = real.clone();
            let run_id = format!("bulk-{i:05}");
            r["run_id"] = run_id.clone().into();
            let m = ReportMessage {
                run_id,
                report_json: r.to_string(),
            };
            store
                .enqueue(
                    follower::store::OutboxKind::Report,
                    &wire::encode(&m),
                    "2026-11-21T00:00:00Z",
                )
                .expect("enqueue");
        }
    };
    let at_least = |n: usize, what: &str| {
        let n = i64::try_from(n).expect("count");
        ws.wait_until(120, what, || (learner_run_count(&ws) >= n).then_some(()));
    };
    // 1. Written while the broker is down: all of them wait in the outbox across the restart.
    broker.stop();
    write_block(0, 3_000);
    assert!(store.outbox_len().expect("outbox") >= 3_000);
    broker.restart();
    // 2. Restarted again while the agent sends them (however many are in flight then).
    at_least(1 + 300, "the first reports");
    broker.restart();
    // 3. The agent SIGKILLed; written while it is dead: all wait for the next agent.
    at_least(1 + 1_000, "reports after the second broker restart");
    drop(agent1);
    write_block(3_000, 6_000);
    assert!(store.outbox_len().expect("outbox") >= 3_000);
    let _agent2 = agent(&ws);
    // 4. The rest while the new agent drains the outbox.
    write_block(6_000, N);
    at_least(1 + N, "every report");

    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(learner_run_count(&ws), 1 + i64::try_from(N).expect("n"));
    let stats = runs(&ws)["trace_stats"].clone();
    assert_eq!(stats[0]["runs"], 1 + N, "each report counted once: {stats}");
    assert_eq!(
        store.outbox_len().expect("outbox"),
        0,
        "every report acknowledged and removed from the device's outbox"
    );
    // Reports sent again around the restarts and the kill were recognised, not stored twice.
    let log = std::fs::read_to_string(ws.path("learner.log")).expect("log");
    assert!(!log.contains("could not store"), "{log}");
}

/// A Mosquitto password file (`ws/passwd`) with each user's password (`<user>-secret`) also
/// in `<user>.pw` for the configs.
fn passwords(ws: &Workspace, users: &[&str]) {
    for (i, u) in users.iter().enumerate() {
        let pw = format!("{u}-secret");
        std::fs::write(ws.path(&format!("{u}.pw")), &pw).expect("pw");
        let mut c = Command::new("mosquitto_passwd");
        if i == 0 {
            c.arg("-c");
        }
        let st = c
            .args(["-b", ws.path("passwd").to_str().expect("utf-8"), u, &pw])
            .status()
            .expect("mosquitto_passwd");
        assert!(st.success());
    }
}

#[test]
fn a_device_cannot_report_as_another_and_hostile_payloads_are_dropped() {
    let ws = Workspace::new();
    passwords(&ws, &["tracefleet-learner", "pi-01", "pi-02"]);
    let acl = repo_root().join("docs/mosquitto/tracefleet.acl");
    let broker = Broker::start_with(
        &ws,
        &format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\n{}",
            ws.path("passwd").display(),
            acl.display(),
            shipped_size_limit()
        ),
    );
    let signed = fleet(&ws, &broker);
    let r = ws.follower(&["install", &signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let mut learner = serve(&ws);
    let _agent = agent(&ws);
    wait_online(&ws, true);
    command_run(&ws, "pi-01", "services-audit");
    let stored = wait_stored_runs(&ws, 1);
    let real = ws.follower(&["runs", "show", &stored[0].0]);
    let real: serde_json::Value = serde_json::from_str(&real.stdout).expect("report json");

    // pi-02 forges reports: on pi-01's topic (the ACL drops it), and on its own topic
    // claiming to be pi-01 (the learner refuses it).
    let forged = |device: &str, run_id: &str| report_as(&real, device, run_id);
    let pi02 = Some(("pi-02", "pi-02-secret"));
    let a = "00000000-0000-7000-8000-00000000000a";
    let b = "00000000-0000-7000-8000-00000000000b";
    mqtt_publish(
        broker.port,
        "pi-02",
        pi02,
        &Topic::Reports("pi-01".into()).name(),
        forged("pi-01", a),
    )
    .expect("the broker acknowledges (and drops) a denied publish");
    mqtt_publish(
        broker.port,
        "pi-02",
        pi02,
        &Topic::Reports("pi-02".into()).name(),
        forged("pi-01", b),
    )
    .expect("publish");
    // Hostile payloads on a device's own topics: dropped, the learner goes on.
    let pi01 = Some(("pi-01", "pi-01-secret"));
    for (topic, payload) in [
        (Topic::Reports("pi-01".into()), vec![1u8, 0xff, 0xff, 0xff]),
        (
            Topic::Heartbeat("pi-01".into()),
            b"\x01not postcard at all".to_vec(),
        ),
        (Topic::Acks("pi-01".into()), vec![9u8; 64]),
        (Topic::Status("pi-01".into()), Vec::new()),
    ] {
        mqtt_publish(broker.port, "pi-01-tester", pi01, &topic.name(), payload).expect("publish");
    }
    // Without credentials, nothing gets in.
    assert!(
        mqtt_publish(
            broker.port,
            "anon",
            None,
            &Topic::Reports("pi-01".into()).name(),
            forged("pi-01", a)
        )
        .is_err()
    );

    // A second real run still arrives: the learner is alive and stored nothing else.
    command_run(&ws, "pi-01", "services-audit");
    let stored = wait_stored_runs(&ws, 2);
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(
        stored.iter().all(|(id, _)| id != a && id != b),
        "{stored:?}"
    );
    assert!(
        learner.child.try_wait().expect("wait").is_none(),
        "the learner died"
    );
    let log = std::fs::read_to_string(ws.path("learner.log")).expect("log");
    assert!(log.contains("claims to be from"), "{log}");
    assert!(log.contains("message dropped"), "{log}");
}

/// The report message of `report` (a run report's JSON) made out as `device`'s run `run_id`.
fn report_as(report: &serde_json::Value, device: &str, run_id: &str) -> Vec<u8> {
    let mut r = report.clone();
    r["device_id"] = device.into();
    r["run_id"] = run_id.into();
    wire::encode(&ReportMessage {
        run_id: run_id.into(),
        report_json: r.to_string(),
    })
}

/// Compiles and signs a one-step trace `canary-check` at `version` whose command is `command`.
fn canary_trace(ws: &Workspace, version: &str, command: &str) -> String {
    let src = format!("canary-{version}.trace.md");
    std::fs::write(
        ws.path(&src),
        format!(
            "---\ntrace_id: canary-check\nversion: \"{version}\"\ngoal_signature: check the canary\n---\n### Step 1: check\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"{command}\"\n```\n"
        ),
    )
    .expect("trace");
    let compiled = format!("canary-{version}.tfc");
    let signed = format!("canary-{version}.tfs");
    let r = ws.learner(&["compile", &src, "-o", &compiled]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.learner(&["sign", &compiled, "--key", "traces.key", "-o", &signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    signed
}

fn rollout_state(ws: &Workspace, version: &str) -> Option<serde_json::Value> {
    let r = ws.learner(&["rollout", "status", "--config", "learner.toml", "--json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let all: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    all.as_array()?
        .iter()
        .find(|x| x["version"] == version)
        .cloned()
}

fn command_run(ws: &Workspace, device: &str, trace: &str) {
    let r = ws.learner(&[
        "command",
        device,
        "run",
        trace,
        "--key",
        "commands.key",
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
}

/// Starts a canary → wave1 rollout of `signed` that halts on `abort_if`.
fn start_rollout(ws: &Workspace, signed: &str, abort_if: &str) {
    let r = ws.learner(&[
        "rollout",
        "start",
        signed,
        "--waves",
        "canary,wave1",
        "--abort-if",
        abort_if,
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
}

/// Starts a rollout of `signed` to a canary set of 10% of wave1 picked by the learner, then
/// the rest of wave1.
fn start_picked_canary_rollout(ws: &Workspace, signed: &str) {
    let r = ws.learner(&[
        "rollout",
        "start",
        signed,
        "--canary",
        "10%",
        "--waves",
        "wave1",
        "--abort-if",
        "failure-rate>0.2 over 2 runs",
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("canary["), "{r:?}");
}

/// Starts a canary → wave1 rollout of `signed` and waits for the canary's install ack.
fn start_canary_rollout(ws: &Workspace, signed: &str, version: &str) {
    start_rollout(ws, signed, "failure-rate>0.5 over 1 runs");
    ws.wait_until(30, &format!("the canary's ack of {version}"), || {
        runs(ws)["acks"]
            .as_array()
            .filter(|a| {
                a.iter()
                    .any(|a| a["device_id"] == "pi-01" && a["version"] == version)
            })
            .map(|_| ())
    });
}

fn wait_rollout(ws: &Workspace, version: &str, state: &str) -> serde_json::Value {
    ws.wait_until(60, &format!("rollout of {version} {state}"), || {
        rollout_state(ws, version).filter(|r| r["state"] == state)
    })
}

#[test]
fn a_failing_canary_halts_the_rollout_before_the_next_wave_and_a_roll_forward_reaches_everyone() {
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    fleet(&ws, &broker);
    // A second device, in the next wave, with its own store.
    let r = ws.follower(&["--state-dir", "state2", "trust", "init", "root-v1.tfr"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    std::fs::write(
        ws.path("follower2.toml"),
        std::fs::read_to_string(ws.path("follower.toml"))
            .expect("follower.toml")
            .replace("pi-01", "pi-02")
            .replace("canary", "wave1"),
    )
    .expect("follower2.toml");
    let _learner = serve(&ws);
    let _pi01 = agent(&ws);
    let _pi02 = ws.daemon(
        "follower",
        &[
            "--state-dir",
            "state2",
            "agent",
            "--config",
            "follower2.toml",
        ],
    );
    ws.wait_until(30, "both devices' heartbeats", || {
        (devices(&ws).as_array().map_or(0, Vec::len) == 2).then_some(())
    });

    let acked = |device: &str, version: &str| {
        runs(&ws)["acks"].as_array().is_some_and(|a| {
            a.iter().any(|a| {
                a["device_id"] == device && a["version"] == version && a["outcome"] == "installed"
            })
        })
    };
    // A good version goes out to both waves: the last good content.
    let good = canary_trace(&ws, "1.0.0", "true");
    start_canary_rollout(&ws, &good, "1.0.0");
    command_run(&ws, "pi-01", "canary-check");
    ws.wait_until(60, "wave1's ack of 1.0.0", || {
        acked("pi-02", "1.0.0").then_some(())
    });
    command_run(&ws, "pi-02", "canary-check");
    wait_rollout(&ws, "1.0.0", "done");

    // A bad one fails on the canary: halted before wave1.
    let bad = canary_trace(&ws, "1.1.0", "false");
    start_canary_rollout(&ws, &bad, "1.1.0");
    command_run(&ws, "pi-01", "canary-check");
    let halted = wait_rollout(&ws, "1.1.0", "halted");
    assert_eq!(halted["wave"], 0, "{halted}");
    assert!(
        halted["reason"]
            .as_str()
            .expect("reason")
            .contains("failure rate 1.00"),
        "{halted}"
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        !acked("pi-02", "1.1.0"),
        "the next wave must never receive the bad version: {}",
        runs(&ws)["acks"]
    );
    let r = ws.follower(&["--state-dir", "state2", "traces", "list"]);
    assert!(
        r.stdout.contains("1.0.0") && !r.stdout.contains("1.1.0"),
        "{r:?}"
    );

    // Roll forward: 1.0.0's content re-signed as 1.1.1 (versions never go backwards), first
    // to one canary the learner picks (sent on that device's own topic), then the fleet.
    let r = ws.learner(&[
        "rollout",
        "forward",
        "canary-check",
        "--key",
        "traces.key",
        "--canary",
        "1",
        "--waves",
        "*",
        "--abort-if",
        "failure-rate>0.5 over 1 runs",
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout.contains("content of 1.0.0") && r.stdout.contains("as 1.1.1"),
        "{r:?}"
    );
    let canary = rollout_state(&ws, "1.1.1").expect("the roll-forward")["waves"][0][0]
        .as_str()
        .expect("one canary")
        .to_owned();
    let other = if canary == "pi-01" { "pi-02" } else { "pi-01" };
    ws.wait_until(30, "the canary's ack of 1.1.1", || {
        acked(&canary, "1.1.1").then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        !acked(other, "1.1.1"),
        "the fleet wave waits for the canary's run"
    );
    command_run(&ws, &canary, "canary-check");
    ws.wait_until(60, "the fleet's ack of 1.1.1", || {
        acked(other, "1.1.1").then_some(())
    });
    let done = wait_rollout(&ws, "1.1.1", "done");
    assert_eq!(done["runs"], 1, "{done}");
    assert_eq!(done["failures"], 0, "{done}");
    for state in ["state", "state2"] {
        let r = ws.follower(&["--state-dir", state, "traces", "list"]);
        assert!(r.stdout.contains("1.1.1"), "{state}: {r:?}");
    }
    // Nothing older than the newest completed rollout is left to roll forward past.
    let r = ws.learner(&[
        "rollout",
        "forward",
        "no-such-trace",
        "--key",
        "traces.key",
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("no completed rollout"), "{r:?}");
    // What the operator did is in the audit log, in order; the refused forward is not.
    let entries = audit_entries(&ws);
    let by_serve = |e: &&serde_json::Value| {
        e["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("learner serve"))
    };
    let done: Vec<String> = entries
        .iter()
        .filter(|e| !by_serve(e))
        .filter(|e| {
            e["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("rollout") || a.starts_with("command"))
        })
        .map(action_and_subject)
        .collect();
    assert_eq!(
        done,
        [
            "rollout start canary-check 1.0.0",
            "command run pi-01",
            "command run pi-02",
            "rollout start canary-check 1.1.0",
            "command run pi-01",
            "rollout forward canary-check 1.1.1",
            &format!("command run {canary}"),
        ],
        "{done:?}"
    );
    // What serve did with the rollouts by itself is there too: the waves it published and
    // the halt, with the figures that fired it.
    let by_itself: Vec<String> = entries
        .iter()
        .filter(by_serve)
        .map(action_and_subject)
        .collect();
    for expected in [
        "rollout wave canary-check 1.0.0",
        "rollout halt canary-check 1.1.0",
        "rollout wave canary-check 1.1.1",
    ] {
        assert!(
            by_itself.iter().any(|e| e == expected),
            "{expected} in {by_itself:?}"
        );
    }
    let halt = entries
        .iter()
        .find(|e| e["action"] == "rollout halt")
        .expect("halt entry");
    assert!(
        halt["detail"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("halted before the next wave")),
        "{halt}"
    );
}

/// A fleet of one device, pi-01, whose run of `canary-check` 1.0.0 (one Bash step running
/// `command`) failed and is stored by the learner; the daemons live as long as the result.
struct FailedRun {
    _broker: Broker,
    _learner: Daemon,
    _agent: Daemon,
    /// The source of 1.0.0 (`canary-1.0.0.trace.md`).
    source: String,
}

fn fleet_with_a_failed_run(ws: &Workspace, command: &str) -> FailedRun {
    let broker = Broker::start(ws);
    fleet(ws, &broker);
    let learner = serve(ws);
    let agent = agent(ws);
    wait_online(ws, true);
    let bad = canary_trace(ws, "1.0.0", command);
    start_canary_rollout(ws, &bad, "1.0.0");
    command_run(ws, "pi-01", "canary-check");
    let stored = wait_stored_runs(ws, 1);
    assert_eq!(stored[0].1, "failed", "{stored:?}");
    FailedRun {
        _broker: broker,
        _learner: learner,
        _agent: agent,
        source: std::fs::read_to_string(ws.path("canary-1.0.0.trace.md")).expect("source"),
    }
}

/// Appends `tables` (`[backend]`, `[dry_run]` …) to the workspace's learner.toml.
fn configure_learner(ws: &Workspace, tables: &str) {
    let mut toml = std::fs::read_to_string(ws.path("learner.toml")).expect("toml");
    toml.push_str(tables);
    std::fs::write(ws.path("learner.toml"), toml).expect("toml");
}

#[test]
fn a_failing_trace_is_regenerated_through_the_messages_api_canaried_and_its_confidence_recovers() {
    let ws = Workspace::new();
    // Version 1.0.0 fails on the device.
    let failed = fleet_with_a_failed_run(&ws, "false");

    // The model: rate-limited once, then a reply that does not compile, then the fix.
    let fixed = failed
        .source
        .replace("command: \"false\"", "command: \"true\"");
    let broken = fixed.replace("tool: Bash", "tool: Shell");
    let api = FakeMessagesApi::start(vec![
        (
            429,
            Some("0"),
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#.into(),
        ),
        FakeMessagesApi::reply(
            &format!("Here it is:\n\n````markdown\n{broken}````"),
            3000,
            400,
        ),
        FakeMessagesApi::reply(&fixed, 3600, 380),
    ]);
    configure_learner(
        &ws,
        &format!(
            "[backend]\nkind = \"anthropic\"\nbase_url = \"{}\"\nmodel = \"claude-test\"\napi_key_env = \"TEST_ANTHROPIC_KEY\"\nbackoff_ms = 10\ninput_price_per_mtok = 3.0\noutput_price_per_mtok = 15.0\n",
            api.base_url
        ),
    );
    let r = ws.learner_env(
        &[
            "regenerate",
            "canary-check",
            "--source",
            "canary-1.0.0.trace.md",
            "--key",
            "traces.key",
            "--waves",
            "canary",
            "--abort-if",
            "failure-rate>0.5 over 1 runs",
            "--config",
            "learner.toml",
        ],
        &[("TEST_ANTHROPIC_KEY", "sk-test")],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("version 1.1.0 in 2 round(s)"), "{r:?}");
    {
        let requests = api.requests.lock().expect("lock");
        assert_eq!(requests.len(), 3, "a 429, a broken reply, the fix");
        assert!(requests.iter().all(|(key, _)| key == "sk-test"));
        let first = requests[0].1["messages"][0]["content"]
            .as_str()
            .expect("turn");
        assert!(first.contains("check the canary"), "the goal: {first}");
        assert!(first.contains("failed step 1"), "the failing run: {first}");
        let repair = requests[2].1["messages"][2]["content"]
            .as_str()
            .expect("turn");
        assert!(
            repair.contains("does not compile") && repair.contains("Shell"),
            "{repair}"
        );
    }
    assert!(ws.path("canary-check-1.1.0.trace.md").exists());

    // Canaried on the one device, it runs and succeeds: the new version's confidence is up.
    ws.wait_until(30, "the ack of 1.1.0", || {
        runs(&ws)["acks"].as_array().and_then(|a| {
            a.iter()
                .any(|a| a["version"] == "1.1.0" && a["outcome"] == "installed")
                .then_some(())
        })
    });
    command_run(&ws, "pi-01", "canary-check");
    wait_stored_runs(&ws, 2);
    let all = runs(&ws);
    let stat = |v: &str| {
        all["trace_stats"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["version"] == v).cloned())
            .expect("stats")
    };
    assert_eq!(stat("1.1.0")["successes"], 1, "{all}");
    assert!(
        stat("1.1.0")["confidence"].as_f64() > stat("1.0.0")["confidence"].as_f64(),
        "{all}"
    );
    let regen = &all["regenerations"][0];
    assert_eq!(regen["outcome"], "compiled", "{regen}");
    assert_eq!(regen["from_version"], "1.0.0", "{regen}");
    assert_eq!(regen["to_version"], "1.1.0");
    assert_eq!(regen["rounds"], 2);
    assert_eq!(regen["input_tokens"], 6600);
    assert_eq!(regen["failures"], 1);
    assert!(
        (regen["cost"].as_f64().expect("cost") - (6600.0 * 3.0 + 780.0 * 15.0) / 1e6).abs() < 1e-9
    );
}

#[test]
fn serve_regenerates_on_its_own_a_trace_whose_run_escalated_and_writes_a_first_trace_for_a_new_goal()
 {
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    fleet(&ws, &broker);
    // Version 1.0.0 escalates on the device: its one step fails.
    let step = |command: &str, on_error: &str| {
        format!(
            "### Step 1: check\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"{command}\"\n```\n{on_error}"
        )
    };
    let v1 = format!(
        "---\ntrace_id: canary-check\nversion: \"1.0.0\"\ngoal_signature: check the canary\n---\n{}",
        step(
            "false",
            "**Error Handling**:\n```yaml\non_error: {action: human_escalate, escalation_message: \"the canary check fails\"}\n```\n"
        )
    );
    std::fs::write(ws.path("canary-1.0.0.trace.md"), &v1).expect("source");
    let r = ws.learner(&["compile", "canary-1.0.0.trace.md", "-o", "canary-1.0.0.tfc"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.learner(&[
        "sign",
        "canary-1.0.0.tfc",
        "--key",
        "traces.key",
        "-o",
        "canary-1.0.0.tfs",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    // A source that is not what was signed is refused, and nothing is rolled out.
    std::fs::write(ws.path("other.trace.md"), v1.replace("false", "true")).expect("source");
    let r = ws.learner(&[
        "rollout",
        "start",
        "canary-1.0.0.tfs",
        "--source",
        "other.trace.md",
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("not to the trace signed in"), "{r:?}");
    assert_eq!(rollout_state(&ws, "1.0.0"), None);

    // The model: the fix for canary-check, then a first trace for the new goal.
    let fixed = format!(
        "---\ntrace_id: canary-check\nversion: \"1.0.0\"\ngoal_signature: check the canary\n---\n{}",
        step("true", "")
    );
    let goal = "count the files in the spool directory";
    let first = format!(
        "---\ntrace_id: count-the-files-in-the-spool-directory\ngoal_signature: {goal}\n---\n{}",
        step("ls | wc -l", "")
    );
    let api = FakeMessagesApi::start(vec![
        FakeMessagesApi::reply(&format!("````markdown\n{fixed}````"), 2000, 300),
        FakeMessagesApi::reply(&first, 1500, 200),
    ]);
    configure_learner(
        &ws,
        &format!(
            "[backend]\nkind = \"anthropic\"\nbase_url = \"{}\"\nmodel = \"claude-test\"\napi_key_env = \"TEST_ANTHROPIC_KEY\"\nbackoff_ms = 10\n\n[regenerate]\nkeys = [\"traces.key\"]\nbelow_confidence = 0.0\nout_dir = \"regenerated\"\n",
            api.base_url
        ),
    );
    let _learner = ws.daemon_env(
        "learner",
        &["serve", "--config", "learner.toml"],
        &[("TEST_ANTHROPIC_KEY", "sk-test")],
    );
    let _agent = agent(&ws);
    wait_online(&ws, true);
    let r = ws.learner(&[
        "rollout",
        "start",
        "canary-1.0.0.tfs",
        "--source",
        "canary-1.0.0.trace.md",
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    wait_installed(&ws);
    command_run(&ws, "pi-01", "canary-check");

    // The escalation sets the learner off: 1.1.0, from the kept source and the failed run,
    // canaried on the one device, then the fleet.
    let regen = ws.wait_until(60, "the automatic regeneration", || {
        runs(&ws)["regenerations"]
            .as_array()
            .and_then(|r| r.first().cloned())
    });
    assert_eq!(regen["outcome"], "compiled", "{regen}");
    assert_eq!(regen["from_version"], "1.0.0", "{regen}");
    assert_eq!(regen["rounds"], 1, "{regen}");
    assert_eq!(regen["to_version"], "1.1.0");
    assert_eq!(regen["failures"], 1);
    assert!(
        regen["trigger"].as_str().is_some_and(
            |t| t.starts_with("escalation from pi-01") && t.contains("the canary check fails")
        ),
        "{regen}"
    );
    {
        let requests = api.requests.lock().expect("lock");
        let prompt = requests[0].1["messages"][0]["content"]
            .as_str()
            .expect("turn");
        assert!(
            prompt.contains("command: \"false\""),
            "the kept source: {prompt}"
        );
        assert!(prompt.contains("failed step 1"), "the failed run: {prompt}");
    }
    let source = std::fs::read_to_string(ws.path("regenerated/canary-check-1.1.0.trace.md"))
        .expect("the new source");
    assert!(source.contains("version: \"1.1.0\"") && source.contains("command: \"true\""));
    ws.wait_until(30, "the ack of 1.1.0", || {
        runs(&ws)["acks"].as_array().and_then(|a| {
            a.iter()
                .any(|a| a["version"] == "1.1.0" && a["outcome"] == "installed")
                .then_some(())
        })
    });
    command_run(&ws, "pi-01", "canary-check");
    wait_rollout(&ws, "1.1.0", "done");
    // Good runs do not set it off again.
    command_run(&ws, "pi-01", "canary-check");
    wait_stored_runs(&ws, 3);

    // A goal no installed trace matches: the device escalates, the learner writes version 1.0.0.
    let r = ws.follower(&["run", "--goal", goal]);
    assert_eq!(r.code, Some(2), "{r:?}");
    let regen = ws.wait_until(60, "the first version for the goal", || {
        runs(&ws)["regenerations"]
            .as_array()
            .and_then(|r| r.get(1).cloned())
    });
    assert_eq!(
        regen["trace_id"], "count-the-files-in-the-spool-directory",
        "{regen}"
    );
    assert_eq!(regen["from_version"], serde_json::Value::Null);
    assert_eq!(regen["to_version"], "1.0.0", "{regen}");
    assert_eq!(regen["trigger"], "new goal from pi-01");
    {
        let requests = api.requests.lock().expect("lock");
        let prompt = requests[1].1["messages"][0]["content"]
            .as_str()
            .expect("turn");
        assert!(
            prompt.contains(goal) && prompt.contains("write the first version"),
            "{prompt}"
        );
    }
    ws.wait_until(30, "the new trace installed", || {
        runs(&ws)["acks"].as_array().and_then(|a| {
            a.iter()
                .any(|a| {
                    a["trace_id"] == "count-the-files-in-the-spool-directory"
                        && a["outcome"] == "installed"
                })
                .then_some(())
        })
    });
    assert_eq!(
        runs(&ws)["regenerations"].as_array().map(Vec::len),
        Some(2),
        "nothing regenerated twice"
    );
    assert_eq!(api.requests.lock().expect("lock").len(), 2);

    // The experiences: every run and both regenerations, exported LLMunix-style and queried.
    let r = ws.learner(&[
        "memory",
        "export",
        "-o",
        "memory_log.md",
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let log = std::fs::read_to_string(ws.path("memory_log.md")).expect("memory_log.md");
    let runs_stored = stored_runs(&ws).len();
    assert_eq!(
        log.matches("\nexperience_id: run-").count(),
        runs_stored,
        "{log}"
    );
    assert_eq!(log.matches("\nexperience_id: regen-").count(), 2, "{log}");
    assert!(
        log.contains("final_outcome: failure")
            && log.contains("Escalated from step 1: the canary check fails"),
        "{log}"
    );
    let r = ws.learner(&[
        "memory",
        "query",
        "--outcome",
        "regenerated",
        "--config",
        "learner.toml",
        "--json",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let q: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let traces: Vec<&str> = q
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["trace_id"].as_str())
        .collect();
    assert_eq!(
        traces,
        ["canary-check", "count-the-files-in-the-spool-directory"]
    );
    let r = ws.learner(&["costs", "--config", "learner.toml", "--json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let costs: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let canary = costs
        .as_array()
        .and_then(|c| c.iter().find(|c| c["trace_id"] == "canary-check"))
        .expect("canary-check costs");
    assert_eq!(canary["regenerations"], 1, "{canary}");
    assert_eq!(canary["learner_input_tokens"], 2000, "{canary}");
    assert_eq!(canary["runs"], 3, "{canary}");
    assert_eq!(canary["successes"], 2, "{canary}");
    assert!(
        canary["learner_median_secs"]
            .as_f64()
            .is_some_and(|s| s > 0.0),
        "{canary}"
    );
    // Both regenerations `serve` made by itself are in the audit log, as its own actions.
    let regenerated: Vec<serde_json::Value> = audit_entries(&ws)
        .into_iter()
        .filter(|e| e["action"] == "regenerate")
        .collect();
    let subjects: Vec<&str> = regenerated
        .iter()
        .map(|e| e["subject"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        subjects,
        [
            "canary-check 1.1.0",
            "count-the-files-in-the-spool-directory 1.0.0"
        ],
        "{regenerated:?}"
    );
    for e in &regenerated {
        assert!(
            e["actor"]
                .as_str()
                .is_some_and(|a| a.starts_with("learner serve ")),
            "{e}"
        );
    }
    assert_eq!(
        regenerated[0]["detail"]["from_version"], "1.0.0",
        "{}",
        regenerated[0]
    );
}

/// The learner's audit log (`learner audit list --json`), after checking that it verifies.
/// An audit entry as `ACTION SUBJECT`.
fn action_and_subject(e: &serde_json::Value) -> String {
    format!(
        "{} {}",
        e["action"].as_str().unwrap_or_default(),
        e["subject"].as_str().unwrap_or_default()
    )
}

fn audit_entries(ws: &Workspace) -> Vec<serde_json::Value> {
    let r = ws.learner(&["audit", "verify"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.learner(&["audit", "list", "--json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    serde_json::from_str(&r.stdout).expect("json")
}

#[test]
fn regeneration_through_an_openai_compatible_server_gives_up_on_replies_that_never_compile_and_rolls_nothing_out()
 {
    let ws = Workspace::new();
    let failed = fleet_with_a_failed_run(&ws, "false");
    let broken = failed.source.replace("tool: Bash", "tool: Shell");
    let api = FakeMessagesApi::start_openai(vec![
        FakeMessagesApi::openai_reply("I would rather not.", 900, 10),
        FakeMessagesApi::openai_reply(&broken, 1000, 120),
    ]);
    configure_learner(
        &ws,
        &format!(
            "[backend]\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodel = \"qwen2.5-coder\"\napi_key_env = \"TEST_OPENAI_KEY\"\n",
            api.base_url
        ),
    );
    let r = ws.learner_env(
        &[
            "regenerate",
            "canary-check",
            "--source",
            "canary-1.0.0.trace.md",
            "--key",
            "traces.key",
            "--rounds",
            "2",
            "--config",
            "learner.toml",
        ],
        &[("TEST_OPENAI_KEY", "sk-local")],
    );
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("did not compile after 2 rounds") && r.stderr.contains("Shell"),
        "{r:?}"
    );
    {
        let requests = api.requests.lock().expect("lock");
        assert_eq!(requests.len(), 2);
        assert!(requests.iter().all(|(key, _)| key == "Bearer sk-local"));
        let messages = requests[1].1["messages"].as_array().expect("messages");
        assert_eq!(messages[0]["role"], "system", "the system prompt first");
        assert_eq!(messages[2]["content"], "I would rather not.");
        assert!(
            messages[3]["content"]
                .as_str()
                .is_some_and(|c| c.contains("no trace")),
            "{messages:?}"
        );
    }
    let all = runs(&ws);
    let regen = &all["regenerations"][0];
    assert_eq!(regen["outcome"], "gave_up", "{regen}");
    assert_eq!(regen["rounds"], 2);
    assert_eq!(regen["input_tokens"], 1900);
    assert_eq!(regen["to_version"], serde_json::Value::Null);
    assert!(rollout_state(&ws, "1.1.0").is_none(), "nothing rolled out");
    assert!(
        !ws.path("canary-check-1.1.0.tfs").exists(),
        "nothing signed"
    );
}

#[test]
fn a_candidate_that_compiles_but_fails_its_dry_run_goes_back_to_the_model_before_anything_is_signed()
 {
    let ws = Workspace::new();
    let failed = fleet_with_a_failed_run(&ws, "test -f ready.flag");
    let source = &failed.source;
    // The first reply compiles and fails the same way; the second creates the flag first.
    let same = source.replace("version: \"1.0.0\"", "version: \"1.0.1\"");
    let fixed = source.replace(
        "test -f ready.flag",
        "touch ready.flag && test -f ready.flag",
    );
    let api = FakeMessagesApi::start(vec![
        FakeMessagesApi::reply(&same, 1000, 100),
        FakeMessagesApi::reply(&fixed, 1200, 110),
    ]);
    configure_learner(
        &ws,
        &format!(
            "[backend]\nkind = \"anthropic\"\nbase_url = \"{}\"\nmodel = \"claude-test\"\napi_key_env = \"TEST_ANTHROPIC_KEY\"\n\n[dry_run]\nfollower = \"{}\"\ntimeout = \"30s\"\n",
            api.base_url,
            tracefleet_e2e::bin("follower").display()
        ),
    );
    let tmp = ws.path("tmp").display().to_string();
    std::fs::create_dir_all(&tmp).expect("tmp");
    let r = ws.learner_env(
        &[
            "regenerate",
            "canary-check",
            "--source",
            "canary-1.0.0.trace.md",
            "--key",
            "traces.key",
            "--config",
            "learner.toml",
        ],
        &[("TEST_ANTHROPIC_KEY", "sk-test"), ("TMPDIR", &tmp)],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("dry run passed"), "{r:?}");
    assert!(r.stdout.contains("version 1.1.0 in 2 round(s)"), "{r:?}");
    {
        let requests = api.requests.lock().expect("lock");
        let feedback = requests[1].1["messages"][2]["content"]
            .as_str()
            .expect("turn");
        assert!(
            feedback.contains("compiles, but a dry run of it")
                && feedback.contains("failed: step 1"),
            "{feedback}"
        );
    }
    let regen = &runs(&ws)["regenerations"][0];
    assert_eq!(regen["outcome"], "compiled", "{regen}");
    assert!(
        regen["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("dry run passed")),
        "{regen}"
    );
    let kept = std::fs::read_to_string(ws.path("canary-check-1.1.0.trace.md")).expect("source");
    assert!(kept.contains("touch ready.flag"), "{kept}");
    // The dry runs' scratch directories are gone.
    let scratch = std::fs::read_dir(ws.path("tmp/tracefleet-dry-run"))
        .expect("the scratch root")
        .count();
    assert_eq!(scratch, 0);
}

#[test]
fn two_serve_instances_split_ingest_through_a_shared_subscription_and_the_survivor_takes_the_lead()
{
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    fleet(&ws, &broker);
    // Two instances, one database (learner.db beside both configs), one shared group.
    let base = std::fs::read_to_string(ws.path("learner.toml")).expect("toml");
    for (file, id) in [
        ("learner.toml", "learner-a"),
        ("learner-b.toml", "learner-b"),
    ] {
        std::fs::write(
            ws.path(file),
            format!("client_id = \"{id}\"\nshared_group = \"learners\"\n{base}"),
        )
        .expect("toml");
    }
    // `serve` as `name` (logging to `<name>.log`, ingest at debug) with `config`.
    let start = |name: &str, config: &str| {
        ws.daemon_as(
            name,
            "learner",
            &["serve", "--config", config],
            &[("RUST_LOG", "info,learner=debug")],
        )
    };
    // Waits until `<name>.log` says `what`.
    let wait_log = |name: &str, what: &str| {
        ws.wait_until(30, &format!("{name}: {what}"), || {
            std::fs::read_to_string(ws.path(&format!("{name}.log")))
                .ok()
                .filter(|l| l.contains(what))
        });
    };
    let a = start("serve-a", "learner.toml");
    wait_log("serve-a", "leader=true");
    let _b = start("serve-b", "learner-b.toml");
    wait_log("serve-b", "connected to the broker");
    let _sim = ws.daemon(
        "learner",
        &[
            "simulate",
            "--devices",
            "20",
            "--prefix",
            "sim",
            "--reports",
            "50",
            "--heartbeat-secs",
            "1",
            "--config",
            "learner.toml",
        ],
    );
    ws.wait_until(120, "1,000 reports stored", || {
        (learner_run_count(&ws) >= 1000).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(learner_run_count(&ws), 1000, "each report stored once");
    let stored_by = |log: &str| {
        std::fs::read_to_string(ws.path(log))
            .expect("log")
            .matches("what=Report(")
            .count()
    };
    let (by_a, by_b) = (stored_by("serve-a.log"), stored_by("serve-b.log"));
    assert!(by_a > 0 && by_b > 0, "both ingest: {by_a} + {by_b}");
    assert!(by_a + by_b >= 1000, "{by_a} + {by_b}");
    assert!(
        !std::fs::read_to_string(ws.path("serve-b.log"))
            .expect("log")
            .contains("leader=true"),
        "one leader"
    );

    // The leader dies: the other takes the lead once the lease runs out, and drives a
    // rollout to a real device.
    drop(a);
    let _agent = agent(&ws);
    wait_log("serve-b", "leader=true");
    let signed = canary_trace(&ws, "1.0.0", "true");
    let r = ws.learner(&["rollout", "start", &signed, "--config", "learner-b.toml"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    wait_log("follower", "installed a pushed trace");
    // The broker keeps routing a share of the group's messages to the dead instance's
    // persistent session, where they wait: nothing is lost, and they arrive when it is
    // restarted (systemd's Restart=always), now as a follower of the new leader.
    let _a = start("serve-a", "learner.toml");
    wait_installed(&ws);
    let a_log = std::fs::read_to_string(ws.path("serve-a.log")).expect("log");
    assert_eq!(
        a_log.matches("leader=true").count(),
        1,
        "it led only before it died"
    );
}

#[test]
fn simulated_fleet_a_bad_version_stops_at_the_canaries_and_a_good_one_reaches_every_device() {
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    fleet(&ws, &broker);
    let _learner = serve(&ws);
    let _sim = ws.daemon(
        "learner",
        &[
            "simulate",
            "--devices",
            "40",
            "--groups",
            "wave1=40",
            "--fail",
            "canary-check",
            "--run-on-install",
            "--heartbeat-secs",
            "1",
            "--config",
            "learner.toml",
        ],
    );
    // A device's groups (which the canaries are picked from) arrive with its heartbeat.
    ws.wait_until(60, "40 simulated devices' heartbeats", || {
        let heard = devices(&ws).as_array().map_or(0, |d| {
            d.iter()
                .filter(|d| !d["follower_version"].is_null())
                .count()
        });
        (heard == 40).then_some(())
    });
    let acks_of = |version: &str| {
        runs(&ws)["acks"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|a| a["version"] == version).count())
    };
    // The simulated devices fail every run of canary-check: the canaries — 10% of the 40,
    // picked by the learner — stop it.
    let bad = canary_trace(&ws, "1.0.0", "true");
    start_picked_canary_rollout(&ws, &bad);
    let halted = wait_rollout(&ws, "1.0.0", "halted");
    assert_eq!(halted["wave"], 0, "{halted}");
    let canaries: Vec<String> = halted["waves"][0]
        .as_array()
        .expect("a canary set")
        .iter()
        .map(|d| d.as_str().expect("device").to_owned())
        .collect();
    assert_eq!(canaries.len(), 4, "{halted}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut got: Vec<String> = runs(&ws)["acks"]
        .as_array()
        .expect("acks")
        .iter()
        .filter(|a| a["version"] == "1.0.0")
        .map(|a| a["device_id"].as_str().expect("device").to_owned())
        .collect();
    got.sort();
    let mut want = canaries.clone();
    want.sort();
    assert_eq!(got, want, "only the canaries received it");

    // Another trace, which the simulated devices run successfully, reaches all 40.
    let src = "good.trace.md";
    std::fs::write(
        ws.path(src),
        "---\ntrace_id: fleet-check\nversion: \"2.0.0\"\ngoal_signature: check the fleet\n---\n### Step 1: check\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"true\"\n```\n",
    )
    .expect("trace");
    let r = ws.learner(&["compile", src, "-o", "good.tfc"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.learner(&["sign", "good.tfc", "--key", "traces.key", "-o", "good.tfs"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    start_picked_canary_rollout(&ws, "good.tfs");
    let done = wait_rollout(&ws, "2.0.0", "done");
    // Canary duty depends on the trace: another trace, other canaries.
    let other = done["waves"][0].as_array().expect("a canary set");
    assert_eq!(other.len(), 4, "{done}");
    assert_ne!(
        *other,
        halted["waves"][0].as_array().cloned().unwrap_or_default()
    );
    assert_eq!(done["failures"], 0, "{done}");
    assert_eq!(acks_of("2.0.0"), 40);
}

#[test]
fn a_stuck_run_is_aborted_by_the_learner() {
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    fleet(&ws, &broker);
    let mut learner_toml = std::fs::read_to_string(ws.path("learner.toml")).expect("toml");
    learner_toml.push_str(
        "[stuck]\ncommands_key = \"commands.key\"\nmin_after = \"2s\"\ngrace = \"30s\"\n",
    );
    std::fs::write(ws.path("learner.toml"), learner_toml).expect("toml");
    let slow = canary_trace(&ws, "3.0.0", "sleep 120");
    let r = ws.follower(&["install", &slow]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let _learner = serve(&ws);
    let _agent = agent(&ws);
    wait_online(&ws, true);
    let t = std::time::Instant::now();
    command_run(&ws, "pi-01", "canary-check");
    // Past 2 s the learner sends abort; the follower aborts the step and stops the run —
    // not before min_after, and long before the step's own 120 s.
    ws.wait_until(60, "the stuck run stopped", || {
        let r = ws.follower(&["runs", "list"]);
        r.stdout
            .lines()
            .any(|l| l.contains("stopped"))
            .then_some(())
    });
    let took = t.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(2),
        "aborted after {took:?}, before min_after (2 s)"
    );
    let log = std::fs::read_to_string(ws.path("learner.log")).expect("log");
    assert!(
        log.contains("stuck run") && log.contains("abort_sent"),
        "{log}"
    );
    // The abort sufficed: no kill, so no escalation for a person.
    assert!(!log.contains("kill_sent"), "{log}");
    let agent_log = std::fs::read_to_string(ws.path("follower.log")).expect("log");
    assert!(agent_log.contains("Abort"), "{agent_log}");
    assert!(!agent_log.contains("Kill"), "{agent_log}");
    let escalations = runs(&ws)["escalations"].to_string();
    assert!(!escalations.contains("stuck"), "{escalations}");
    // The watchdog's command is in the audit log, as serve's own action.
    let watchdog: Vec<serde_json::Value> = audit_entries(&ws)
        .into_iter()
        .filter(|e| {
            e["actor"]
                .as_str()
                .is_some_and(|a| a.starts_with("learner serve "))
        })
        .collect();
    assert_eq!(watchdog.len(), 1, "{watchdog:?}");
    assert_eq!(watchdog[0]["action"], "command abort", "{watchdog:?}");
    assert_eq!(watchdog[0]["subject"], "pi-01", "{watchdog:?}");
}

/// A fleet whose device's one model is the test model (registered), and a trace
/// `judge-services` whose judgement step's reference answers that model does not repeat (0 of
/// 3): the broker, the source's path (relative) and the signed trace's.
fn fleet_with_a_judgement_its_model_fails(ws: &Workspace) -> (Broker, String, String) {
    use crate::judgement::{UDP, examples, trace};
    let broker = Broker::start(ws);
    let _ = fleet(ws, &broker);
    let m = tracefleet_e2e::model();
    let r = ws.follower(&["models", "add", m.to_str().expect("utf-8 path")]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let src = trace(ws, "judge-services", &examples(&UDP, "udp"));
    let signed = ws.sign(ws.path(&src).to_str().expect("utf-8 path"), "traces.key");
    (broker, src, signed)
}

#[test]
fn a_devices_judgement_fidelity_reaches_the_learner_and_learner_fleet() {
    let ws = Workspace::new();
    let (_broker, _, signed) = fleet_with_a_judgement_its_model_fails(&ws);
    let _learner = serve(&ws);
    roll_out_to_canary_group(&ws, &signed);
    let _agent = agent(&ws);
    wait_installed(&ws);
    wait_online(&ws, true);
    // The agent measures the fidelity when it installs the trace, before any run.
    let known = ws.wait_until(120, "the fidelity measured at install", || {
        let r = ws.follower(&["traces", "list", "--json"]);
        let listed: serde_json::Value = serde_json::from_str(&r.stdout).ok()?;
        let f = listed[0]["fidelity"][0].clone();
        (f["step"] == 1).then_some(f)
    });
    assert_eq!(
        (known["agreements"].as_u64(), known["total"].as_u64()),
        (Some(0), Some(3)),
        "{known}"
    );
    command_run(&ws, "pi-01", "judge-services");
    let stored = wait_stored_runs(&ws, 1);
    assert_eq!(
        stored[0].1, "failed",
        "escalated before the step: {stored:?}"
    );

    let fidelity = runs(&ws)["fidelity"].clone();
    assert_eq!(fidelity[0]["device_id"], "pi-01", "{fidelity}");
    assert_eq!(fidelity[0]["trace_id"], "judge-services");
    assert_eq!(fidelity[0]["step"], 1);
    assert_eq!(fidelity[0]["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(
        (
            fidelity[0]["agreements"].as_u64(),
            fidelity[0]["total"].as_u64()
        ),
        (Some(0), Some(3))
    );
    let r = ws.learner(&["fleet", "--config", "learner.toml"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("pi-01"))
        .unwrap_or_else(|| panic!("{r:?}"));
    assert!(
        line.contains("judge-services") && line.ends_with("0/3 LOW"),
        "{line}"
    );
    let r = ws.learner(&["fleet", "--config", "learner.toml", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rows[0]["fidelity"]["agreements"], 0, "{rows}");
    // The device lists it too.
    let r = ws.follower(&["traces", "list"]);
    assert!(
        r.stdout.contains(
            "step 1 fidelity 0/3 (0.00) with SmolLM2-135M-Instruct.Q4_1 (below its minimum)"
        ),
        "{r:?}"
    );
}

#[test]
fn low_fidelity_on_a_device_sets_serve_regenerating_with_the_disagreements_in_the_prompt() {
    use crate::judgement::UDP;
    let ws = Workspace::new();
    // Its source is kept by the learner (`rollout start --source`).
    let (_broker, src, signed) = fleet_with_a_judgement_its_model_fails(&ws);
    let source = std::fs::read_to_string(ws.path(&src)).expect("source");
    let fixed = source.replace("expect: udp", "expect_regex: \"^(tcp|udp)$\"");
    let api = FakeMessagesApi::start(vec![FakeMessagesApi::reply(&fixed, 2000, 300)]);
    // Only the fidelity trigger: not the escalation of the run, not its confidence.
    configure_learner(
        &ws,
        &format!(
            "[backend]\nkind = \"anthropic\"\nbase_url = \"{}\"\nmodel = \"claude-test\"\napi_key_env = \"TEST_ANTHROPIC_KEY\"\nbackoff_ms = 10\n\n[regenerate]\nkeys = [\"traces.key\"]\nbelow_confidence = 0.0\non_escalation = false\nout_dir = \"regenerated\"\n",
            api.base_url
        ),
    );
    let _learner = ws.daemon_env(
        "learner",
        &["serve", "--config", "learner.toml"],
        &[("TEST_ANTHROPIC_KEY", "sk-test")],
    );
    let r = ws.learner(&[
        "rollout",
        "start",
        &signed,
        "--source",
        &src,
        "--waves",
        "canary",
        "--config",
        "learner.toml",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let _agent = agent(&ws);
    wait_installed(&ws);
    wait_online(&ws, true);
    command_run(&ws, "pi-01", "judge-services");

    let regen = ws.wait_until(90, "the regeneration low fidelity sets off", || {
        runs(&ws)["regenerations"]
            .as_array()
            .and_then(|r| r.first().cloned())
    });
    assert_eq!(regen["outcome"], "compiled", "{regen}");
    assert_eq!(regen["from_version"], "1.0.0", "{regen}");
    assert_eq!(regen["to_version"], "1.1.0", "{regen}");
    assert_eq!(
        regen["trigger"],
        "fidelity below min_fidelity on 1 of 1 device(s): step 1 with SmolLM2-135M-Instruct.Q4_1 on pi-01: 0/3 (0.00 < 0.80)",
        "{regen}"
    );
    let requests = api.requests.lock().expect("lock");
    let first = requests[0].1["messages"][0]["content"]
        .as_str()
        .expect("turn");
    assert!(
        first.contains("step 1 of version 1.0.0 on pi-01, model SmolLM2-135M-Instruct.Q4_1: agrees with 0 of 3 reference answers (0.00 < 0.80)"),
        "{first}"
    );
    for entry in UDP {
        assert!(
            first.contains(&format!(
                "vars {{entry: {entry:?}}}; expected \"udp\"; the model answered \"tcp\""
            )),
            "{entry}: {first}"
        );
    }
}

/// Every byte of `path` and its SQLite companions (`-wal`, `-journal`), lossily as text.
fn sqlite_bytes(path: &Path) -> String {
    ["", "-wal", "-journal"]
        .iter()
        .filter_map(|suffix| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            std::fs::read(p).ok()
        })
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

#[test]
fn a_sensitive_steps_output_stays_on_the_device_and_the_learner_gets_its_hash() {
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    fleet(&ws, &broker);
    let _learner = serve(&ws);
    let _agent = agent(&ws);
    wait_online(&ws, true);
    // Made at run time: the trace itself (which the learner stores) never holds it.
    let secret = "TOP-SECRET-4711";
    std::fs::write(
        ws.path("secret.trace.md"),
        "---\ntrace_id: secret-check\nversion: \"1.0.0\"\ngoal_signature: read the secret\n---\n\
             ### Step 1: read it\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"printf 'TOP-%s-%s\\\\n' SECRET 4711\"\noutput_variable: token\nsensitive: true\n```\n\
             ### Step 2: use it\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"echo {token} | tr A-Z a-z\"\n```\n"
    )
    .expect("trace");
    let r = ws.learner(&["compile", "secret.trace.md", "-o", "secret.tfc"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.learner(&[
        "sign",
        "secret.tfc",
        "--key",
        "traces.key",
        "-o",
        "secret.tfs",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    start_canary_rollout(&ws, "secret.tfs", "1.0.0");
    command_run(&ws, "pi-01", "secret-check");
    let stored = wait_stored_runs(&ws, 1);
    assert_eq!(stored[0].1, "success", "{stored:?}");

    let db = rusqlite::Connection::open(ws.path("learner.db")).expect("learner.db");
    let report: String = db
        .query_row("SELECT report_json FROM runs", [], |r| r.get(0))
        .expect("the stored report");
    let report: serde_json::Value = serde_json::from_str(&report).expect("json");
    let steps = report["step_results"].as_array().expect("steps");
    // Step 1 arrives as a hash and a length; step 2, which used its full output, as output.
    assert_eq!(steps[0]["output"], "", "{report}");
    assert_eq!(
        steps[0]["output_bytes"],
        secret.len() + 1,
        "echo's line: {report}"
    );
    assert_eq!(
        steps[0]["output_sha256"],
        // sha256("TOP-SECRET-4711\n")
        "a3a047881fc1ed55310a458a139e106c282cf8e909471223866dd7c4df5f95e2",
        "{report}"
    );
    assert_eq!(
        steps[1]["output"].as_str().map(str::trim),
        Some(secret.to_lowercase().as_str()),
        "{report}"
    );
    assert!(steps[1].get("output_sha256").is_none(), "{report}");
    drop(db);
    // Not a byte of it in the learner's database; the device keeps it in its journal.
    assert!(!sqlite_bytes(&ws.path("learner.db")).contains(secret));
    assert!(sqlite_bytes(&ws.state_dir().join("follower.db")).contains(secret));
}
