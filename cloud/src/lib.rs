//! `learner`: the tracefleet cloud companion.
//!
//! This version compiles trace sources, generates keys and signs compiled traces
//! ([`keys`]), and runs the learner's side of the fleet link ([`fleet`]: ingest, commands,
//! publishing traces) with staged rollouts ([`rollout`]) over an external MQTT broker or
//! the one embedded in `learner serve` ([`broker`]), and regenerates failing traces through
//! a model ([`regen`]) — by itself when `serve` sees a trace fail — and keeps the fleet's
//! experiences and what learning cost ([`memory`]).

pub mod broker;
pub mod fleet;
pub mod keys;
pub mod memory;
pub mod regen;
pub mod rollout;
pub mod simulate;
pub mod stuck;
