//! `learner`: the tracefleet cloud companion.
//!
//! This version compiles trace sources, generates keys and signs compiled traces
//! ([`keys`]), and runs the learner's side of the fleet link ([`fleet`]: ingest, commands,
//! publishing traces); staged rollouts and regeneration come with later versions.

pub mod fleet;
pub mod keys;
