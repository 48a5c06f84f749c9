//! `learner`: the tracefleet cloud companion.
//!
//! This version compiles trace sources, generates keys and signs compiled traces
//! ([`keys`]); ingest, rollouts and regeneration come with later versions.

pub mod keys;
