//! `tracefleet`: the trace language and the protocol, shared by the follower and the learner.
//!
//! This crate owns every wire and file format exactly once:
//! - [`source`]: the Markdown trace source (LLMunix-compatible) → syntax with line numbers;
//! - [`compile`]: checks and lowering to the typed IR in [`trace`]; [`compiled`]: the
//!   postcard-encoded compiled form with its format version byte;
//! - [`signed`]: ed25519 keys, key files and the signed-trace envelope with its verification;
//! - [`confidential`]: confidential traces, encrypted to device identities (age X25519);
//! - [`report`]: the run report (a superset of the LLMunix follower report);
//! - [`shell`]: a Bash step's shell policy (allowed commands, command substitution);
//! - [`wire`]: the fleet link's MQTT topics, payloads and signed commands;
//! - [`gguf`]: the header of a GGUF model file, read with every length checked;
//! - [`ids`]: validated identifiers (trace, device, run ids, versions, variable names);
//! - [`time`]: epoch seconds and RFC 3339, the fleet's two ways of writing time.
//!
//! It knows nothing of SQLite, llama.cpp or a device's file system layout, and of MQTT clients
//! only behind the `mqtt` feature ([`link`]: the broker settings both sides share):
//! it takes bytes (and the time, where it matters) and returns values or typed errors.

pub mod bundle;
pub mod compile;
pub mod compiled;
pub mod confidence;
pub mod confidential;
pub mod diag;
pub mod gguf;
pub mod ids;
pub mod invariants;
pub mod judgement;
#[cfg(feature = "mqtt")]
pub mod link;
pub mod report;
pub mod shell;
pub mod signed;
pub mod source;
pub mod time;
pub mod trace;
pub mod trust;
pub mod wire;

pub use compile::{compile_source, decode_compiled, encode_compiled};
pub use diag::{Diagnostic, Diagnostics, Severity};
pub use trace::Trace;
