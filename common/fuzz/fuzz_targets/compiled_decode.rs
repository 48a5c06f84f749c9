//! Fuzzes the compiled-trace decoder with limits: arbitrary bytes never panic, and whatever
//! decodes re-encodes to the same bytes (the encoding is canonical).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(trace) = tracefleet::decode_compiled(data) {
        let again = tracefleet::encode_compiled(&trace);
        let back = tracefleet::decode_compiled(&again).expect("re-decode");
        assert_eq!(back, trace);
    }
});
