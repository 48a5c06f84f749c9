//! Verifying a signed trace (decode the envelope, SHA-256 the content, ed25519 `verify_strict`,
//! decode the compiled trace, check the header) against the raw ed25519 verification of the
//! same signature, side by side in one run. Run: `cargo bench -p tracefleet --bench verify`.
//! Results: docs/benchmarks.md.

#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tracefleet::signed::{self, KeyRole, SecretKey};

fn bench(c: &mut Criterion) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../traces/dpkg-log-triage.trace.md"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let (trace, _) = tracefleet::compile_source(path, &text).unwrap();
    let compiled = tracefleet::encode_compiled(&trace);
    let key = SecretKey::from_seed(KeyRole::Traces, [7; 32]);
    let signed_trace = signed::sign(&compiled, &key, 1, u64::MAX).unwrap();
    let bytes = signed::encode_signed(&signed_trace);
    let public = key.public();
    let message = signed::signing_message_for(&signed_trace.header);
    let sig = ed25519_dalek::Signature::from_bytes(
        &signed_trace.signatures[0]
            .signature
            .clone()
            .try_into()
            .unwrap(),
    );

    let mut g = c.benchmark_group(format!(
        "verify ({} B signed trace, {} steps)",
        bytes.len(),
        trace.steps.len()
    ));
    g.bench_function("raw ed25519 verify_strict", |b| {
        b.iter(|| {
            public
                .key
                .verify_strict(black_box(&message), black_box(&sig))
                .unwrap()
        })
    });
    g.bench_function("signed::verify + decode", |b| {
        b.iter(|| {
            signed::verify(black_box(&bytes), std::slice::from_ref(&public), 1, 2, None).unwrap()
        })
    });
    g.bench_function("part: sha256 of the compiled trace", |b| {
        use sha2::Digest;
        b.iter(|| sha2::Sha256::digest(black_box(&compiled)))
    });
    g.bench_function("part: decode the compiled trace", |b| {
        b.iter(|| tracefleet::decode_compiled(black_box(&compiled)).unwrap())
    });
    g.bench_function("part: decode the envelope", |b| {
        b.iter(|| signed::decode_signed(black_box(&bytes)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
