//! An audit log file (`audit.jsonl`) as `learner audit verify` reads it, whatever is on disk:
//! the first byte picks whether a head is checked and whether a key is pinned, the rest is the
//! log. Verification must name a broken entry or accept, never panic; what it accepts must
//! verify again under the key and head it reports.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, log)) = data.split_first() else {
        return;
    };
    let head = (mode & 1 == 1).then(|| learner::audit::Head {
        seq: u64::from(mode >> 1),
        hash: "0".repeat(64),
    });
    let pinned = (mode & 0x80 != 0).then(|| "ab".repeat(32));
    if let Ok(v) = learner::audit::verify(log, pinned.as_deref(), head.as_ref()) {
        let again = learner::audit::verify(log, v.key.as_deref(), v.head.as_ref())
            .expect("an accepted log verifies again under its own key and head");
        assert_eq!(again.entries, v.entries);
    }
});
