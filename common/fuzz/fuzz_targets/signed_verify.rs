//! Fuzzes the signed-trace envelope decoder and verifier: arbitrary bytes never panic and are
//! never accepted without a valid signature from the trusted key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tracefleet::signed::{self, KeyRole, SecretKey};

fuzz_target!(|data: &[u8]| {
    let _ = signed::decode_signed(data);
    let trusted = SecretKey::from_seed(KeyRole::Traces, [7u8; 32]).public();
    // A fuzzer that forges an ed25519 signature has found a real bug.
    if signed::verify(data, &[trusted], 1, 0, None).is_ok() {
        panic!("accepted an envelope not signed by the trusted key's secret");
    }
});
