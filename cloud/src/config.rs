//! `learner.toml`: the one loader. The file is read into a raw serde form (unknown keys
//! refused in every table the learner owns), then resolved once into [`LearnerConfig`]:
//! relative paths made absolute against the file's directory, the broker chosen (an external
//! `[broker]` or the `[embedded]` one), durations parsed into `Duration`s, `[regenerate]`
//! and `[dry_run]` checked. A bad value is an error at load naming the file, the setting,
//! what was found and what was expected; nothing is parsed again later.

use crate::db::LearnerDb;
use anyhow::Context as _;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tracefleet::link::BrokerConfig;
use tracefleet::wire;

/// `learner.toml`, resolved: relative paths made absolute, the broker chosen.
#[derive(Debug, Clone)]
pub struct LearnerConfig {
    /// The learner's database (default `learner.db` beside the config file).
    pub db: Option<PathBuf>,
    /// MQTT client id (default `tracefleet-learner`); unique per `serve` instance.
    pub client_id: String,
    /// MQTT shared-subscription group (`$share/<group>/…`): several `serve` instances with
    /// this group and one database split the devices' messages between them; one of them
    /// (the lease holder) drives rollouts, the watchdog and regeneration.
    pub shared_group: Option<String>,
    /// Where the learner's clients (`serve`, `command`, `simulate`) reach the broker: the
    /// `[broker]` table, or the embedded broker's address.
    pub broker: BrokerConfig,
    /// The broker `serve` runs itself, when the file has no `[broker]` table.
    pub embedded: Option<crate::broker::EmbeddedBroker>,
    /// Stuck runs: when to abort and kill them, and the key to sign that with.
    pub stuck: crate::stuck::StuckConfig,
    /// The model that regenerates traces.
    pub backend: Option<crate::regen::backend::BackendConfig>,
    /// Automatic regeneration in `serve` (`[regenerate]`; needs `[backend]`).
    pub regenerate: Option<crate::regen::auto::Auto>,
    /// Dry runs of regenerated candidates (`[dry_run]`).
    pub dry_run: Option<crate::regen::dry_run::DryRunner>,
    /// The audit log's directory (`[audit] dir`, relative to the file); `None`: the default
    /// of [`crate::audit::AuditLog::locate`].
    pub audit_dir: Option<PathBuf>,
    /// `serve`'s HTTP side (`[http]`): `/metrics`.
    pub http: Option<crate::serve::http::HttpConfig>,
}

/// The `[http]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    /// `HOST:PORT` to listen on.
    listen: String,
    /// The bearer token's file (relative to learner.toml).
    token_file: Option<PathBuf>,
    /// `/metrics` without a token.
    #[serde(default)]
    metrics_public: bool,
}

/// The `[audit]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    /// The audit log's directory.
    dir: PathBuf,
}

/// `learner.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLearnerConfig {
    db: Option<PathBuf>,
    #[serde(default = "default_client_id")]
    client_id: String,
    shared_group: Option<String>,
    /// An external broker.
    broker: Option<BrokerConfig>,
    /// The embedded broker's settings (the default without `[broker]`).
    embedded: Option<crate::broker::EmbeddedBroker>,
    #[serde(default)]
    stuck: RawStuck,
    backend: Option<crate::regen::backend::BackendConfig>,
    regenerate: Option<crate::regen::auto::AutoConfig>,
    dry_run: Option<crate::regen::dry_run::DryRunConfig>,
    audit: Option<RawAudit>,
    http: Option<RawHttp>,
}

fn default_client_id() -> String {
    "tracefleet-learner".into()
}

/// The `[stuck]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStuck {
    /// The secret command-signing key `serve` signs abort and kill with; without it, stuck
    /// runs are only recorded.
    commands_key: Option<PathBuf>,
    /// Shortest time a run may take before it counts as stuck (humantime, default `10m`).
    #[serde(default = "default_min_after")]
    min_after: String,
    /// Time between abort and kill, and between kill and giving up (default `30s`).
    #[serde(default = "default_grace")]
    grace: String,
}

fn default_min_after() -> String {
    "10m".into()
}
fn default_grace() -> String {
    "30s".into()
}

impl Default for RawStuck {
    fn default() -> Self {
        RawStuck {
            commands_key: None,
            min_after: default_min_after(),
            grace: default_grace(),
        }
    }
}

impl RawStuck {
    /// Paths against `dir`, durations parsed.
    fn resolve(self, dir: &Path) -> Result<crate::stuck::StuckConfig, String> {
        let p = |what: &str, v: &str| {
            humantime::parse_duration(v)
                .map_err(|e| format!("[stuck] {what} {v:?}: {e} (expected e.g. 10m, 30s)"))
        };
        Ok(crate::stuck::StuckConfig {
            commands_key: self.commands_key.map(|k| dir.join(k)),
            min_after: p("min_after", &self.min_after)?,
            grace: p("grace", &self.grace)?,
        })
    }
}

impl LearnerConfig {
    /// Reads a config file (`TRACEFLEET_MQTT_*` override its broker settings); relative
    /// paths in it are relative to the file.
    ///
    /// # Errors
    /// A message naming the file and what is wrong.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: RawLearnerConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let (broker, embedded) = match (raw.broker, raw.embedded) {
            (Some(_), Some(_)) => anyhow::bail!(
                "{}: both [broker] (an external broker) and [embedded]: expected one of them",
                path.display()
            ),
            (Some(b), None) => (b, None),
            (None, e) => {
                let e = e.unwrap_or_default();
                let addr = crate::broker::client_address(&e);
                let b = BrokerConfig {
                    host: addr.ip().to_string(),
                    port: Some(addr.port()),
                    ..BrokerConfig::default()
                };
                (b, Some(e))
            }
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let at = |e: String| anyhow::anyhow!("{}: {e}", path.display());
        if let Some(g) = &raw.shared_group {
            wire::check_name("shared_group", g).map_err(|e| at(e.to_string()))?;
        }
        let regenerate = match raw.regenerate {
            Some(r) => {
                if raw.backend.is_none() {
                    anyhow::bail!(
                        "{}: [regenerate] without [backend]: expected the model to ask (kind, model, base_url, …)",
                        path.display()
                    );
                }
                Some(r.resolve(dir).map_err(at)?)
            }
            None => None,
        };
        let dry_run = match raw.dry_run {
            Some(d) => Some(
                d.resolve(dir, std::env::temp_dir().join("tracefleet-dry-run"))
                    .map_err(at)?,
            ),
            None => None,
        };
        let http = match raw.http {
            Some(h) => {
                let listen = h.listen.parse().map_err(|e| {
                    at(format!(
                        "[http] listen {:?}: {e}: expected HOST:PORT (e.g. \"127.0.0.1:9464\")",
                        h.listen
                    ))
                })?;
                match (&h.token_file, h.metrics_public) {
                    (None, false) => return Err(at("[http]: expected token_file (the bearer token scrapers send) or metrics_public = true".into())),
                    (Some(_), true) => return Err(at("[http]: both token_file and metrics_public = true: expected one of them".into())),
                    _ => {}
                }
                Some(crate::serve::http::HttpConfig {
                    listen,
                    token_file: h.token_file.map(|t| dir.join(t)),
                    metrics_public: h.metrics_public,
                })
            }
            None => None,
        };
        let mut c = LearnerConfig {
            db: raw.db,
            client_id: raw.client_id,
            shared_group: raw.shared_group,
            broker,
            embedded,
            stuck: crate::stuck::StuckConfig::default(),
            backend: raw.backend,
            regenerate,
            dry_run,
            audit_dir: raw.audit.map(|a| dir.join(a.dir)),
            http,
        };
        c.broker.apply_env()?;
        c.db = Some(dir.join(c.db.take().unwrap_or_else(|| "learner.db".into())));
        c.stuck = raw.stuck.resolve(dir).map_err(at)?;
        Ok(c)
    }

    /// The database path.
    #[must_use]
    pub fn db_path(&self) -> PathBuf {
        self.db.clone().unwrap_or_else(|| "learner.db".into())
    }

    /// Opens (creating and migrating) the database this config names.
    ///
    /// # Errors
    /// As [`LearnerDb::open`].
    pub fn open_db(&self) -> Result<LearnerDb, crate::db::DbError> {
        LearnerDb::open(&self.db_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_example_learner_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/systemd/learner.toml");
        let c = LearnerConfig::load(&p).unwrap();
        assert_eq!(
            c.db_path(),
            Path::new("/var/lib/tracefleet-learner/learner.db")
        );
        assert!(c.embedded.is_none());
        assert_eq!(c.broker.host, "broker.example");
        assert_eq!(c.backend.unwrap().model, "claude-sonnet-4-5");
        assert_eq!(
            c.stuck.commands_key.as_deref(),
            Some(Path::new("/etc/tracefleet/commands.key"))
        );
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("learner.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn durations_are_parsed_once_at_load_and_a_bad_one_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let c = LearnerConfig::load(&write(d.path(), "")).unwrap();
        let defaults = crate::stuck::StuckConfig::default();
        assert_eq!(
            (c.stuck.min_after, c.stuck.grace),
            (defaults.min_after, defaults.grace)
        );
        assert_eq!(defaults.min_after, Duration::from_secs(600));
        let c = LearnerConfig::load(&write(
            d.path(),
            "[stuck]\nmin_after = \"2s\"\ngrace = \"1m\"\ncommands_key = \"c.key\"\n",
        ))
        .unwrap();
        assert_eq!(c.stuck.min_after, Duration::from_secs(2));
        assert_eq!(c.stuck.grace, Duration::from_secs(60));
        assert_eq!(c.stuck.commands_key, Some(d.path().join("c.key")));
        let p = write(d.path(), "[stuck]\ngrace = \"soon\"\n");
        let e = LearnerConfig::load(&p).unwrap_err().to_string();
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        assert!(e.contains("[stuck] grace \"soon\""), "{e}");
        assert!(e.contains("expected"), "{e}");
        let e = LearnerConfig::load(&write(d.path(), "[stuck]\nevery = \"1h\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("every"), "{e:#}");
    }

    #[test]
    fn the_http_table_needs_an_address_and_a_token_or_public_metrics() {
        let d = tempfile::tempdir().unwrap();
        let c = LearnerConfig::load(&write(
            d.path(),
            "[http]\nlisten = \"127.0.0.1:9464\"\ntoken_file = \"t.token\"\n",
        ))
        .unwrap();
        let h = c.http.unwrap();
        assert_eq!(h.listen.port(), 9464);
        assert_eq!(h.token_file, Some(d.path().join("t.token")));
        assert!(!h.metrics_public);
        let c = LearnerConfig::load(&write(
            d.path(),
            "[http]\nlisten = \"[::1]:80\"\nmetrics_public = true\n",
        ))
        .unwrap();
        assert!(c.http.unwrap().metrics_public);
        let e = LearnerConfig::load(&write(d.path(), "[http]\nlisten = \"127.0.0.1:1\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected token_file"), "{e}");
        let e = LearnerConfig::load(&write(
            d.path(),
            "[http]\nlisten = \"127.0.0.1:1\"\ntoken_file = \"t\"\nmetrics_public = true\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("expected one of them"), "{e}");
        let e = LearnerConfig::load(&write(
            d.path(),
            "[http]\nlisten = \"localhost\"\nmetrics_public = true\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("[http] listen \"localhost\"") && e.contains("expected HOST:PORT"),
            "{e}"
        );
        // A short token is refused when serve starts.
        std::fs::write(d.path().join("t.token"), "short\n").unwrap();
        let e = crate::serve::http::read_token(&d.path().join("t.token"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected at least 16"), "{e}");
    }
}
