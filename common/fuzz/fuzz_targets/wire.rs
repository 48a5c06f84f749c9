//! Fuzzes every decoder of the fleet link (MQTT payloads and topic names from the network):
//! any bytes give a value or a `WireError`/`CommandError`, never a panic; a parsed topic names
//! itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tracefleet::signed::{KeyRole, SecretKey};
use tracefleet::trust::{RoleKey, RoleKeys, TrustRoot};
use tracefleet::wire::{self, Ack, EscalationMessage, SignedCommand, Status, Topic};

fuzz_target!(|data: &[u8]| {
    if let Ok(topic) = std::str::from_utf8(data) {
        if let Ok(t) = Topic::parse(topic) {
            assert_eq!(t.name(), topic);
        }
    }
    let _ = wire::decode::<Status>(data, "status");
    let _ = wire::decode::<Ack>(data, "ack");
    let _ = wire::decode::<EscalationMessage>(data, "escalation");
    let _ = wire::decode::<SignedCommand>(data, "signed command");
    let _ = wire::decode_heartbeat(data);
    let _ = wire::decode_report(data);
    let key = SecretKey::from_seed(KeyRole::Commands, [3; 32]);
    let keys = |k: &SecretKey| RoleKeys {
        threshold: 1,
        keys: vec![RoleKey {
            public_key: k.public().to_bytes(),
            expires_at: u64::MAX,
        }],
    };
    let root = TrustRoot {
        version: 1,
        created_at: 0,
        expires_at: u64::MAX,
        root: keys(&SecretKey::from_seed(KeyRole::Root, [1; 32])),
        traces: keys(&SecretKey::from_seed(KeyRole::Traces, [2; 32])),
        commands: keys(&key),
    };
    let _ = wire::verify_command(data, &root, "pi-01", 0, 1);
});
