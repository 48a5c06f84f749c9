//! Fuzzes the trace source compiler: any text must give a trace or diagnostics, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((trace, _)) = tracefleet::compile_source("fuzz.trace.md", text) {
            // What compiles must round-trip through the compiled form.
            let bytes = tracefleet::encode_compiled(&trace);
            let back = tracefleet::decode_compiled(&bytes).expect("round trip");
            assert_eq!(back, trace);
        }
    }
});
