//! Fuzzes the bundle header decoder: arbitrary bytes never panic, never allocate past the
//! header limit, and every name that decodes is a safe file name.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, manifest, len)) = tracefleet::bundle::read_header(&mut &data[..]) {
        assert!(len as usize <= data.len());
        for e in &manifest.entries {
            let n = e.name.as_str();
            assert!(!n.contains('/') && !n.starts_with('.') && !n.is_empty());
        }
    }
});
