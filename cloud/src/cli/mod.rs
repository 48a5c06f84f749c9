//! The `learner` command line, one module per command family: each defines its commands'
//! arguments (clap) and maps them onto the library, then prints what comes back. What holds
//! invariants — rollouts, regeneration, the database — is library code.
//!
//! - [`build`]: `compile`, `keys`, `sign`, `cosign`, `trust`, `bundle`;
//! - [`fleet`]: the listings (`fleet`, `devices`, `runs`, `memory`, `costs`);
//! - [`rollout`]: `rollout start|forward|status|abort`, `regenerate`;
//! - [`command`]: `command DEVICE run|stop|abort|kill`;
//! - [`serve`]: `serve`, `simulate`;
//! - [`audit`]: `audit list|verify|export`, and how the others record what they did.

pub mod audit;
pub mod build;
pub mod command;
pub mod fleet;
pub mod rollout;
pub mod serve;

use anyhow::Result;
use learner::config::LearnerConfig;
use learner::db::LearnerDb;
use std::path::{Path, PathBuf};

/// Where a listing reads from, and how it prints.
#[derive(clap::Args)]
pub struct ListArgs {
    /// The learner's config.
    #[arg(long, value_name = "learner.toml")]
    pub config: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Loads `config` and opens the database it names.
pub fn open(config: &Path) -> Result<(LearnerConfig, LearnerDb)> {
    let config = LearnerConfig::load(config)?;
    let db = config.open_db()?;
    Ok((config, db))
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub use tracefleet::time::unix_now;

pub use learner::authoring::read_limited;

/// Text from a device as a terminal may show it: control characters (terminal escapes, line
/// breaks) and Unicode bidirectional overrides written as escapes (`\u{1b}`, `\u{202e}`), the
/// rest unchanged. Stored data stays as it arrived; `--json` output is JSON-escaped anyway.
pub fn shown(s: &str) -> String {
    s.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_text_cannot_drive_the_terminal() {
        assert_eq!(super::shown("ok"), "ok");
        assert_eq!(
            super::shown("a\u{1b}[31mred\u{202e}x\n"),
            "a\\u{1b}[31mred\\u{202e}x\\u{a}"
        );
    }
}
