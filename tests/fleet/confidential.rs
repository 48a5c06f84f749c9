//! A confidential trace rolled out to a group: the agent's heartbeat carries the device's
//! identity, `learner sign --encrypt-to @GROUP` encrypts to the identities the learner knows,
//! and the device installs and runs it on a signed command.

use super::*;

#[test]
fn a_confidential_trace_reaches_its_group_encrypted_to_the_identities_from_heartbeats() {
    let ws = Workspace::new();
    let broker = Broker::start(&ws);
    let _plain = fleet(&ws, &broker);
    let _learner = serve(&ws);
    let _agent = agent(&ws);
    let me = ws.follower(&["identity"]).stdout.trim().to_owned();
    assert!(me.starts_with("age1"), "{me}");
    ws.wait_until(30, "pi-01's identity at the learner", || {
        devices(&ws)
            .as_array()
            .and_then(|d| d.iter().find(|d| d["device_id"] == "pi-01"))
            .filter(|d| d["recipient"] == me.as_str())
            .map(|_| ())
    });
    let r = ws.learner(&["devices", "list", "--config", "learner.toml"]);
    assert!(r.stdout.contains(&me), "{r:?}");

    // A group no device is in has no identity to encrypt to.
    let sign = |to: &str, out: &str| {
        ws.learner(&[
            "sign",
            "services-audit.tfc",
            "--key",
            "traces.key",
            "--encrypt-to",
            to,
            "--config",
            "learner.toml",
            "-o",
            out,
        ])
    };
    let r = sign("@nobody", "none.tfs");
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("no device of group \"nobody\""), "{r:?}");
    let r = sign("@canary", "confidential.tfs");
    assert_eq!(r.code, Some(0), "{r:?}");
    let bytes = std::fs::read(ws.path("confidential.tfs")).unwrap();
    let s = tracefleet::signed::decode_signed(&bytes).unwrap();
    assert_eq!(s.sealed.expect("sealed").recipients, vec![me.clone()]);
    // The audit log records to whom.
    let r = ws.learner(&["audit", "list", "--json"]);
    assert!(r.stdout.contains(&me), "{r:?}");

    roll_out_to_canary_group(&ws, "confidential.tfs");
    wait_installed(&ws);
    command_run(&ws, "pi-01", "services-audit");
    let stored = wait_stored_runs(&ws, 1);
    assert_eq!(stored[0].1, "success", "{stored:?}");
}
