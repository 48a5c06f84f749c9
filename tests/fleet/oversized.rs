//! One oversized MQTT message never stops the fleet (issue #19, class 1). Against Mosquitto
//! configured as docs/mosquitto was before (messages up to 2,000,000 bytes), a message that
//! `learner serve` or an agent cannot take is read, refused, acknowledged, logged and counted,
//! and the link goes on — also across restarts, when the persistent session delivers what it
//! holds first thing. The broker config the project ships refuses what the clients refuse.

use super::*;
use tracefleet_e2e::mqtt_publish_as;

/// Mosquitto as docs/mosquitto/tracefleet.conf configured it before.
const OLD_LIMIT: &str = "allow_anonymous true\nmessage_size_limit 2000000\n";
/// Under the old limit and about twice what any client accepts.
const HUGE: usize = 1_999_000;

/// A real report of services-audit, run here by hand as pi-01 (its JSON).
fn a_real_report(ws: &Workspace, signed: &str) -> serde_json::Value {
    let r = ws.follower(&["install", signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = ws.follower(&["run", "services-audit", "--device-id", "pi-01", "--json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    serde_json::from_str(&r.stdout).expect("report json")
}

/// The `n`th made-up run id.
fn run_id(n: u8) -> String {
    format!("00000000-0000-7000-8000-0000000000{n:02x}")
}

/// Waits (30 s at most) until the learner has stored `n` runs.
fn wait_runs(ws: &Workspace, n: usize) {
    ws.wait_until(30, &format!("{n} stored run(s)"), || {
        (stored_runs(ws).len() >= n).then_some(())
    });
}

/// Publishes `report` on pi-01's reports topic until the learner has stored a run: a fresh
/// `serve` subscribes after it connects, and what is published before is not kept for it.
/// (Stored once, however often it arrives.)
fn publish_until_stored(ws: &Workspace, port: u16, report: &[u8]) {
    let topic = Topic::Reports("pi-01".into()).name();
    ws.wait_until(30, "serve subscribed and the first report stored", || {
        mqtt_publish(port, "pi-01", None, &topic, report.to_vec()).expect("publish");
        (!stored_runs(ws).is_empty()).then_some(())
    });
}

/// The learner's count of pi-01's messages refused as `kind`, and the last one's detail.
fn refused(ws: &Workspace, kind: &str) -> (i64, String) {
    runs(ws)["refused"]
        .as_array()
        .expect("refused")
        .iter()
        .find(|r| r["device_id"] == "pi-01" && r["kind"] == kind)
        .map_or((0, String::new()), |r| {
            (
                r["count"].as_i64().expect("count"),
                r["last_detail"].as_str().expect("detail").to_owned(),
            )
        })
}

/// Lines of the workspace's `<name>.log` that contain `what`.
fn log_lines(ws: &Workspace, name: &str, what: &str) -> Vec<String> {
    std::fs::read_to_string(ws.path(&format!("{name}.log")))
        .expect("log")
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

/// Asserts that daemon `name` connected to the broker once per start (`starts`): its link
/// never failed, and rumqttc never refused a packet's size.
fn connected_once_per_start(ws: &Workspace, name: &str, starts: usize) {
    let log = std::fs::read_to_string(ws.path(&format!("{name}.log"))).expect("log");
    assert!(!log.contains("size limit exceeded"), "{log}");
    assert_eq!(
        log_lines(ws, name, "connected to the broker").len(),
        starts,
        "{log}"
    );
}

#[test]
fn an_oversized_report_is_acked_counted_and_dropped_and_serve_goes_on_across_restarts() {
    let ws = Workspace::new();
    let broker = Broker::start_with(&ws, OLD_LIMIT);
    let signed = fleet(&ws, &broker);
    let real = a_real_report(&ws, &signed);
    let reports = Topic::Reports("pi-01".into()).name();
    let publish = |payload: Vec<u8>| {
        mqtt_publish_as(broker.port, "pi-01", None, &reports, payload, false).expect("publish");
    };
    let learner = serve(&ws);
    // A stored report: serve's persistent session holds its subscriptions.
    publish_until_stored(&ws, broker.port, &report_as(&real, "pi-01", &run_id(1)));
    assert_eq!(learner.terminate(), Some(0));

    // While serve is down its session queues a message twice the size any client takes,
    // one a byte over the limit, then a good report: serve gets them first thing.
    publish(vec![wire::WIRE_FORMAT_VERSION; HUGE]);
    publish(vec![wire::WIRE_FORMAT_VERSION; wire::MAX_MESSAGE_BYTES + 1]);
    publish(report_as(&real, "pi-01", &run_id(2)));
    let learner = serve(&ws);
    wait_runs(&ws, 2);
    // And while it runs.
    publish(vec![wire::WIRE_FORMAT_VERSION; HUGE]);
    publish(report_as(&real, "pi-01", &run_id(3)));
    wait_runs(&ws, 3);
    let (count, detail) = refused(&ws, "too_large");
    assert_eq!(count, 3, "{detail}");
    assert!(
        detail.contains(&format!("payload of {HUGE} bytes")),
        "{detail}"
    );

    // Acknowledged: a restarted serve gets none of them again.
    assert_eq!(learner.terminate(), Some(0));
    let _learner = serve(&ws);
    publish(report_as(&real, "pi-01", &run_id(4)));
    wait_runs(&ws, 4);
    assert_eq!(refused(&ws, "too_large").0, 3);
    let dropped = log_lines(&ws, "learner", "message dropped");
    assert_eq!(dropped.len(), 3, "{dropped:#?}");
    assert!(
        dropped
            .iter()
            .all(|l| l.contains(&reports) && l.contains("bytes=")),
        "{dropped:#?}"
    );
    connected_once_per_start(&ws, "learner", 3);
}

#[test]
fn the_shipped_broker_limit_refuses_what_the_clients_refuse() {
    use tracefleet::{link::MAX_PACKET_BYTES, signed::MAX_SIGNED_BYTES};
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    let signed = fleet(&ws, &broker);
    let real = a_real_report(&ws, &signed);
    let reports = Topic::Reports("pi-01".into()).name();
    let publish = |topic: &str, size: usize| {
        mqtt_publish_as(broker.port, "pi-01", None, topic, vec![1; size], false)
    };
    let _learner = serve(&ws);
    publish_until_stored(&ws, broker.port, &report_as(&real, "pi-01", &run_id(1)));

    // The largest signed trace, on the longest trace topic, passes.
    let longest = Topic::GroupTrace("g".repeat(64), "t".repeat(64)).name();
    publish(&longest, MAX_SIGNED_BYTES).expect("the largest message a client accepts");
    // As large on a reports topic, it passes too, for serve to refuse (over 1 MiB).
    publish(&reports, MAX_SIGNED_BYTES).expect("publish");
    // Larger than any client sends or accepts: the broker disconnects the sender.
    for size in [MAX_PACKET_BYTES, HUGE] {
        assert!(publish(&reports, size).is_err(), "{size} bytes accepted");
    }
    mqtt_publish(
        broker.port,
        "pi-01",
        None,
        &reports,
        report_as(&real, "pi-01", &run_id(2)),
    )
    .expect("publish");
    wait_runs(&ws, 2);
    // Only the one the broker let through reached serve (queued in order before the report).
    let (count, detail) = refused(&ws, "too_large");
    assert_eq!(count, 1, "{detail}");
    assert!(
        detail.contains(&format!("payload of {MAX_SIGNED_BYTES} bytes")),
        "{detail}"
    );
}

#[test]
fn an_oversized_trace_or_command_is_refused_and_acked_and_the_agent_goes_on_across_restarts() {
    let ws = Workspace::new();
    let broker = Broker::start_with(&ws, OLD_LIMIT);
    let signed = fleet(&ws, &broker);
    let _learner = serve(&ws);
    let device = agent(&ws);
    // Online: the agent's persistent session holds its subscriptions.
    wait_online(&ws, true);
    assert_eq!(device.terminate(), Some(0));

    // While it is down: a retained trace twice the size any client takes, and commands (one
    // as large, one a byte over the limit) queued in its session; then a real rollout.
    let publish = |topic: Topic, size: usize, retain: bool| {
        mqtt_publish_as(
            broker.port,
            "hostile",
            None,
            &topic.name(),
            vec![1; size],
            retain,
        )
        .expect("publish");
    };
    publish(Topic::FleetTrace("huge".into()), HUGE, true);
    publish(Topic::Commands("pi-01".into()), HUGE, false);
    publish(
        Topic::Commands("pi-01".into()),
        wire::MAX_MESSAGE_BYTES + 1,
        false,
    );
    roll_out_to_canary_group(&ws, &signed);
    let device = agent(&ws);
    wait_installed(&ws);
    command_run(&ws, "pi-01", "services-audit");
    wait_runs(&ws, 1);
    // The refused trace is acked to the learner as refused, with its size.
    let detail = ws.wait_until(30, "the refusal ack of the huge trace", || {
        runs(&ws)["acks"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|a| a["trace_id"] == "huge" && a["outcome"] == "refused")
            })
            .map(|a| a["detail"].as_str().unwrap_or_default().to_owned())
    });
    assert!(detail.contains(&HUGE.to_string()), "{detail}");

    // Restarted, it gets the retained trace again on subscribing: refused again, and it
    // still takes commands.
    assert_eq!(device.terminate(), Some(0));
    let _device = agent(&ws);
    command_run(&ws, "pi-01", "services-audit");
    wait_runs(&ws, 2);

    // Logged with topic and size, and counted in the device's install log.
    let commands = log_lines(&ws, "follower", "command refused");
    assert_eq!(commands.len(), 2, "{commands:#?}");
    for size in [HUGE, wire::MAX_MESSAGE_BYTES + 1] {
        assert!(
            commands
                .iter()
                .any(|l| l.contains(&format!("bytes={size}")) && l.contains("/commands")),
            "{commands:#?}"
        );
    }
    connected_once_per_start(&ws, "follower", 3);
    let store = rusqlite::Connection::open_with_flags(
        ws.path("state/follower.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("store");
    let refusals = |kind: &str, name: &str| -> i64 {
        store
            .query_row(
                "SELECT COUNT(*) FROM install_log WHERE outcome = 'refused' AND kind = ?1 AND name = ?2",
                [kind, name],
                |r| r.get(0),
            )
            .expect("install_log")
    };
    assert_eq!(refusals("command", "pi-01"), 2);
    assert!(
        refusals("trace", "huge") >= 2,
        "refused once per connection"
    );
}
