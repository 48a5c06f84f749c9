//! Fuzzes the GGUF header reader: arbitrary bytes never panic or allocate by an untrusted
//! count, and a header that is accepted describes tensors the length check can judge.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if let Ok(info) = tracefleet::gguf::read_header(data, len) {
        assert!(info.data_offset % info.alignment == 0);
        for t in &info.tensors {
            assert!(!t.dims.is_empty() && t.dims.len() <= 4);
            assert!(t.nbytes <= len);
        }
        if info.check_len(len).is_ok() {
            assert!(info.data_end() <= len);
        }
        let _ = info.quantization();
        let _ = info.kv_cache_bytes(4096);
    }
});
