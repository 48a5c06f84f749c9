//! `learner serve`'s `/metrics` with a real Mosquitto, agent and rollout: the bearer token,
//! the Prometheus text format as `promtool check metrics` reads it, and figures that match
//! the learner's database after a known sequence.

use super::*;
use std::io::{Read as _, Write as _};

const TOKEN: &str = "scrape-token-0123456789abcdef";

/// `GET /metrics` with `authorization` (a header value); the status code and the body.
fn get_metrics(port: u16, authorization: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample whose line starts with `name` and holds every `label`.
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_need_the_token_pass_promtool_and_match_the_database() {
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    let signed = fleet(&ws, &broker);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    std::fs::write(ws.path("scrape.token"), format!("{TOKEN}\n")).unwrap();
    let mut config = std::fs::read_to_string(ws.path("learner.toml")).unwrap();
    config.push_str(&format!(
        "\n[http]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"scrape.token\"\n"
    ));
    std::fs::write(ws.path("learner.toml"), config).unwrap();
    let _learner = serve(&ws);
    let _agent = agent(&ws);
    roll_out_to_canary_group(&ws, &signed);
    wait_installed(&ws);
    command_run(&ws, "pi-01", "services-audit");
    command_run(&ws, "pi-01", "services-audit");
    wait_stored_runs(&ws, 2);

    // No token, a wrong one: 401, and nothing of the fleet in the answer.
    let bearer = format!("Bearer {TOKEN}");
    ws.wait_until(10, "/metrics answering", || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(drop)
    });
    for auth in [None, Some("Bearer wrong-token-0123456789"), Some(TOKEN)] {
        let (status, body) = get_metrics(port, auth);
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert!(!body.contains("tracefleet_"), "{body}");
    }
    let body = ws.wait_until(
        30,
        "the device online and the rollout done in /metrics",
        || {
            let (status, body) = get_metrics(port, Some(&bearer));
            assert_eq!(status, 200, "{body}");
            let online = sample(&body, "tracefleet_devices", &["status=\"online\""]);
            let done = sample(&body, "tracefleet_rollouts", &["state=\"done\""]);
            (online == Some(1.0) && done == Some(1.0)).then_some(body)
        },
    );

    // The exposition format as Prometheus reads it.
    std::fs::write(ws.path("metrics.txt"), &body).unwrap();
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(ws.path("metrics.txt")).unwrap())
        .output()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    assert!(
        promtool.status.success(),
        "{}{}\n{body}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );

    // The alert rules shipped in docs/ load.
    let rules = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_root().join("docs/prometheus/alerts.yml"))
        .output()
        .expect("promtool");
    assert!(rules.status.success(), "{rules:?}");

    // The figures are the database's.
    let stored = runs(&ws);
    let reports = stored["runs"].as_array().expect("runs").len();
    assert_eq!(reports, 2);
    assert_eq!(
        sample(&body, "tracefleet_reports_ingested_total", &[]),
        Some(reports as f64),
        "{body}"
    );
    let trace = ["trace=\"services-audit\"", "version=\"1.0.0\""];
    let with = |extra: &'static str| {
        let mut l = trace.to_vec();
        l.push(extra);
        l
    };
    assert_eq!(
        sample(&body, "tracefleet_runs_total", &with("outcome=\"success\"")),
        Some(2.0),
        "{body}"
    );
    let confidence = stored["trace_stats"][0]["confidence"].as_f64().expect("c");
    let exposed = sample(&body, "tracefleet_trace_confidence", &trace).expect("confidence");
    assert!(
        (exposed - confidence).abs() < 1e-9,
        "{exposed} vs {confidence}"
    );
    assert_eq!(
        sample(
            &body,
            "tracefleet_rollout_devices",
            &with("outcome=\"installed\"")
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "tracefleet_rollouts", &["state=\"done\""]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "tracefleet_escalations_total", &[]),
        Some(0.0)
    );
    // The rollout is done: no running one is left over from before.
    assert_eq!(
        sample(&body, "tracefleet_rollouts", &["state=\"running\""]),
        None,
        "{body}"
    );

    // A third run shows at the next scrape (the scheme in any case, RFC 7235).
    command_run(&ws, "pi-01", "services-audit");
    wait_stored_runs(&ws, 3);
    let lower = format!("bearer {TOKEN}");
    ws.wait_until(10, "the third run in /metrics", || {
        let (status, body) = get_metrics(port, Some(&lower));
        assert_eq!(status, 200, "{body}");
        (sample(&body, "tracefleet_reports_ingested_total", &[]) == Some(3.0)).then_some(())
    });
    // This instance's own ingest: every message it stored (the ack, the reports, heartbeats:
    // at least 3), in batches no more numerous than the messages.
    let batches = sample(&body, "tracefleet_ingest_batch_seconds_count", &[]).expect("histogram");
    let received = sample(&body, "tracefleet_messages_received_total", &[]).expect("received");
    assert!(
        received >= 3.0 && (1.0..=received).contains(&batches),
        "{body}"
    );
}
