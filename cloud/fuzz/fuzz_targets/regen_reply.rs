//! A model's reply, from the HTTP body on: the first byte picks the wire format (Messages API
//! or OpenAI chat completions), the rest is the body. Whatever parses goes through what the
//! learner does with a reply: take the trace out of the text and compile it. Also the raw
//! bytes as reply text. Nothing may panic, hang or allocate without bound.
#![no_main]

use learner::regen::backend::{BackendConfig, Kind, parse_reply};
use libfuzzer_sys::fuzz_target;

fn config(kind: Kind) -> BackendConfig {
    BackendConfig {
        kind,
        base_url: None,
        model: "fuzz".into(),
        max_tokens: 1024,
        api_key_env: None,
        timeout_secs: 1,
        max_retries: 0,
        backoff_ms: 0,
        input_price_per_mtok: 3.0,
        output_price_per_mtok: 15.0,
    }
}

fn handle(text: &str) {
    if let Some(source) = learner::regen::extract_trace(text) {
        let _ = tracefleet::compile::compile_source("reply.trace.md", &source);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let kind = if first & 1 == 0 { Kind::Anthropic } else { Kind::Openai };
    if let Ok(c) = parse_reply(&config(kind), "fuzz", body, 1) {
        handle(&c.text);
    }
    if let Ok(text) = std::str::from_utf8(body) {
        handle(text);
    }
});
