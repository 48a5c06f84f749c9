//! Fuzzes the trust-root decoder and the initial and update checks: arbitrary bytes never
//! panic, and a root is never accepted as an update to a root whose keys did not sign it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tracefleet::signed::{KeyRole, SecretKey};
use tracefleet::trust::{self, RoleKey, RoleKeys, TrustRoot};

fuzz_target!(|data: &[u8]| {
    let _ = trust::decode_root(data);
    let _ = trust::verify_initial(data, 0);
    let key = SecretKey::from_seed(KeyRole::Root, [3u8; 32]);
    let role = |k: &SecretKey| RoleKeys {
        threshold: 1,
        keys: vec![RoleKey { public_key: k.public().to_bytes(), expires_at: u64::MAX }],
    };
    let current = TrustRoot {
        version: 1,
        created_at: 0,
        expires_at: u64::MAX,
        root: role(&key),
        traces: role(&key),
        commands: role(&key),
    };
    if trust::verify_update(&current, data).is_ok() {
        panic!("accepted a root update not signed by the current root key's secret");
    }
});
