//! Fixtures for the crate's unit tests (compiled only for them): fixed keys, a trust root
//! that vouches for them, signed traces, and a store in a temporary directory with that root
//! installed. Real formats and the real SQLite store throughout; the clock is the `NOW` the
//! tests pass in.

use crate::store::Store;
use tracefleet::signed::{self, KeyRole, SecretKey};
use tracefleet::trust::{self, RoleKey, RoleKeys, TrustRoot};

/// The time the tests run at (unix seconds); keys, root and traces are valid around it.
pub const NOW: u64 = 1_000;

/// Every key, root and signed trace here expires then.
pub const EXPIRES: u64 = 100_000;

/// A fixed key of `role` (the same seed gives the same key).
pub fn key(role: KeyRole, seed: u8) -> SecretKey {
    SecretKey::from_seed(role, [seed; 32])
}

/// The trace-signing key the test root trusts.
pub fn traces_key() -> SecretKey {
    key(KeyRole::Traces, 2)
}

/// Trust root `version`, signed by the one root key, trusting [`traces_key`] (threshold 1).
pub fn root_file(version: u32) -> Vec<u8> {
    let role = |k: &SecretKey| RoleKeys {
        threshold: 1,
        keys: vec![RoleKey {
            public_key: k.public().to_bytes(),
            expires_at: EXPIRES,
        }],
    };
    let root_key = key(KeyRole::Root, 1);
    let root = TrustRoot {
        version,
        created_at: NOW - 1,
        expires_at: EXPIRES,
        root: role(&root_key),
        traces: role(&traces_key()),
        commands: role(&key(KeyRole::Commands, 3)),
    };
    trust::sign_root(&root, &[&root_key]).expect("a valid root")
}

/// Trace `id` `version` (one Bash step), compiled and signed by `key`.
pub fn signed_trace(id: &str, version: &str, key: &SecretKey) -> Vec<u8> {
    let src = format!(
        "---\ntrace_id: {id}\nversion: \"{version}\"\ngoal_signature: g\n---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo 1\n```\n"
    );
    let trace = tracefleet::compile_source("t.trace.md", &src)
        .unwrap_or_else(|d| panic!("{d}"))
        .0;
    let compiled = tracefleet::encode_compiled(&trace);
    signed::encode_signed(&signed::sign(&compiled, key, NOW - 1, EXPIRES).expect("compiled"))
}

/// A store in `dir` with trust root 1 ([`root_file`]) installed.
pub fn store_with_root(dir: &std::path::Path) -> Store {
    let mut store = Store::open(dir).expect("store");
    store
        .add_trust_roots(None, &[(1, &root_file(1))], "2026-01-01T00:00:00Z")
        .expect("root");
    store
}
