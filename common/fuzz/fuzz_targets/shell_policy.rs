//! Fuzzes the shell policy check (brush-parser's tokenizer and parser included): any command
//! text gives `Ok` or a `ShellError`, never a panic or a hang.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let allowed = ["grep".to_owned(), "sort".to_owned()];
        let _ = tracefleet::shell::check(text, Some(&allowed), true);
        let _ = tracefleet::shell::check(text, Some(&allowed), false);
    }
});
