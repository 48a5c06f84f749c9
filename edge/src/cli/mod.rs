//! The `follower` command line's command families: each module maps its arguments onto the
//! library and prints the outcome; nothing here holds an invariant of its own.

pub mod device;
pub mod eval;
pub mod inspect;
pub mod install;
pub mod models;
pub mod run;
pub mod runs;
pub mod traces;
pub mod trust;
