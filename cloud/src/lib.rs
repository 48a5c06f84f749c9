//! `learner`: the tracefleet cloud companion.
//!
//! It compiles trace sources, generates keys and signs compiled traces ([`keys`]), creates
//! trust roots and USB bundles ([`authoring`]), and runs
//! the learner's side of the fleet link: `learner serve` ([`serve`]) ingests what devices
//! publish into the learner's database ([`db`], which owns the schema and every SQL
//! statement) and drives staged rollouts ([`rollout`]) and the stuck-run watchdog
//! ([`stuck`]) over an external MQTT broker or the one embedded in it ([`broker`]);
//! `learner command` publishes signed commands ([`publish`]). It regenerates failing traces
//! through a model ([`regen`]) — by itself when `serve` sees a trace fail — and keeps the
//! fleet's experiences and what learning cost ([`memory`]). `learner.toml` is read once, by
//! [`config`]; [`simulate`] runs many simulated followers for tests and benchmarks.
//!
//! Modules depend on each other without circles (non-test code): `db` on no other module
//! of the crate; `stuck` → `db`; `rollout` → (`db`, `keys`); `regen` → (`db`, `rollout`,
//! `keys`); `memory` → (`db`, `regen`); `audit` → `keys`; `authoring` → `keys`; `config` → (`db`, `broker`,
//! `stuck`, `regen`); `publish`, `simulate` → `config`; `serve` → (`config`, `db`,
//! `rollout`, `stuck`, `regen`, `keys`, `broker`).

pub mod audit;
pub mod authoring;
pub mod broker;
pub mod config;
pub mod db;
pub mod keys;
pub mod memory;
pub mod publish;
pub mod regen;
pub mod rollout;
pub mod serve;
pub mod simulate;
pub mod stuck;
