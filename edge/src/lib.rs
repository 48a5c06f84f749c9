//! `follower`: the tracefleet runtime on an edge device.
//!
//! It verifies signed traces against the device's trusted keys and executes them offline:
//! deterministic tool steps directly ([`host`], contained by [`sandbox`]), judgement steps with a GGUF model in-process
//! ([`infer`]). The interpreter ([`exec`]) is a functional core over the [`exec::Host`] trait;
//! runs are journaled step by step in the device store ([`store`]). [`agent`] is the device's
//! side of the fleet link (MQTT). [`models`] is the device's registry of GGUF files, checked
//! before llama.cpp sees them. [`identity`] is the device's key for confidential traces.

pub mod agent;
pub mod effects;
pub mod exec;
pub mod files;
pub mod host;
pub mod identity;
pub mod infer;
pub mod install;
pub mod models;
pub mod runner;
pub mod sandbox;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod testkit;
