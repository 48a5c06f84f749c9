//! The end-to-end tests, one integration binary with a module per suite (one link step, one
//! process; `cargo test -p tracefleet-e2e SUITE::` runs one suite):
//! - [`e2e`]: compile, sign, install and run with the real binaries; trust, bundles, crashes;
//! - [`confidential`]: confidential traces: encrypted to device identities, refused by others;
//! - [`engine`]: the execution engine across real processes (sandbox, signals, resume);
//! - [`fleet`]: the fleet link with a real Mosquitto broker, `learner serve` and agents;
//! - [`models`]: GGUF models on the device with the real SmolLM2 model;
//! - [`judgement`]: judgement steps' fidelity and `follower eval` with the real models;
//! - [`newcomer`]: the set-up script, the help examples, the deployment guide's trace form.
//!
//! The helpers they share are the crate's library (`harness.rs`).

#[allow(dead_code)] // its parse checks serve the binaries' unit tests
mod examples;

mod confidential;
mod e2e;
mod engine;
mod fleet;
mod judgement;
mod models;
mod newcomer;
