//! Fuzzes the shell policy check (brush-parser's tokenizer and parser included): any command
//! text gives `Ok` or a `ShellError`, never a panic or a hang. Also the direct-exec fast path:
//! an argument vector it accepts has a non-empty first word and no word holds a character
//! that the shell would have treated specially outside quotes, unless the text quoted it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let allowed = ["grep".to_owned(), "sort".to_owned()];
        let _ = tracefleet::shell::check(text, Some(&allowed), true);
        let _ = tracefleet::shell::check(text, Some(&allowed), false);
        let env = [("TF_VAR_x".to_owned(), "a b;|$(x)".to_owned())];
        if let Some(argv) = tracefleet::shell::direct_argv(text, &env) {
            assert!(!argv[0].is_empty(), "{text:?} gave an empty program name");
            let operators = ['|', '&', ';', '<', '>', '(', ')', '`', '$', '\\', '\n', '*', '?'];
            if !text.contains(['\'', '"']) {
                assert!(
                    !text.contains(operators),
                    "{text:?} holds shell syntax but was taken as {argv:?}"
                );
            }
        }
    }
});
