//! `learner serve`'s HTTP side, with `[http]` in learner.toml: `GET /metrics` in the
//! Prometheus text exposition format (0.0.4, rendered by `metrics-exporter-prometheus`),
//! behind a bearer token unless `metrics_public = true`.
//!
//! The fleet's figures are read from the database at a scrape (at most once a second; a
//! scrape within the second gets the same text) into a recorder made for that scrape, so a
//! series whose rows are gone (a rollout no longer halted) disappears instead of keeping its
//! last value ([`crate::db::LearnerDb::metrics_snapshot`]); the ingest batch durations and
//! messages are this process's own, in a recorder that lives with it. Label cardinality is
//! bounded by what operators do, not by what devices send: `trace` and `version` are the
//! versions the learner rolled out or kept a source of; `outcome`, `state` and `kind` take a
//! handful of fixed values; no label holds a device id or a run id.

use crate::db::LearnerDb;
use crate::db::metrics::Snapshot;
use anyhow::Context as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Upper bounds of the ingest batch histogram (seconds).
const BATCH_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Shortest bearer token accepted (bytes): a guessable token protects nothing.
pub const MIN_TOKEN_BYTES: usize = 16;

/// The `[http]` table, resolved.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Where to listen (`127.0.0.1:9464`; behind a reverse proxy for TLS).
    pub listen: SocketAddr,
    /// A file holding the bearer token scrapers send (`Authorization: Bearer …`), as
    /// Prometheus' `authorization.credentials_file` reads it.
    pub token_file: Option<PathBuf>,
    /// Serve `/metrics` without a token.
    pub metrics_public: bool,
}

/// How long a rendered text of the fleet's figures is served again.
const FLEET_CACHE: std::time::Duration = std::time::Duration::from_secs(1);

/// The last text rendered from the database, and when.
type Rendered = Option<(std::time::Instant, String)>;

/// This process's recorder (ingest), and the database read at each scrape with the last
/// text rendered from it.
pub struct Metrics {
    process: PrometheusRecorder,
    fleet: Mutex<(LearnerDb, Rendered)>,
}

impl Metrics {
    /// A recorder and a second connection to the learner's database at `db_path`.
    ///
    /// # Errors
    /// When the database cannot be opened.
    pub fn open(db_path: &Path) -> anyhow::Result<Self> {
        let process = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("tracefleet_ingest_batch_seconds".into()),
                &BATCH_BUCKETS,
            )
            .context("histogram buckets")?
            .build_recorder();
        metrics::with_local_recorder(&process, describe_process);
        Ok(Self {
            process,
            fleet: Mutex::new((LearnerDb::open(db_path)?, None)),
        })
    }

    /// Records one ingest transaction that committed: its duration and its messages.
    pub fn ingest_batch(&self, seconds: f64, messages: usize) {
        metrics::with_local_recorder(&self.process, || {
            metrics::histogram!("tracefleet_ingest_batch_seconds").record(seconds);
            metrics::counter!("tracefleet_messages_received_total").increment(messages as u64);
        });
    }

    /// The exposition text: the database's figures now, then this process's.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn render(&self) -> anyhow::Result<String> {
        let mut fleet = self
            .fleet
            .lock()
            .map_err(|_| anyhow::anyhow!("the metrics database connection was poisoned"))?;
        let text = match &fleet.1 {
            Some((at, text)) if at.elapsed() < FLEET_CACHE => text.clone(),
            _ => {
                let snapshot = fleet.0.metrics_snapshot()?;
                let text = render_fleet(&snapshot);
                fleet.1 = Some((std::time::Instant::now(), text.clone()));
                text
            }
        };
        Ok(text + &self.process.handle().render())
    }
}

/// The fleet's figures in a recorder of their own: only what `snapshot` holds.
#[must_use]
pub fn render_fleet(snapshot: &Snapshot) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        describe_fleet();
        set(snapshot);
    });
    recorder.handle().render()
}

fn describe_process() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "tracefleet_messages_received_total",
        "MQTT messages this serve instance ingested (its share with a shared subscription)."
    );
    describe_histogram!(
        "tracefleet_ingest_batch_seconds",
        Unit::Seconds,
        "Duration of one ingest transaction of this serve instance."
    );
}

fn describe_fleet() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "tracefleet_devices",
        "Devices the learner knows, by status (online, offline)."
    );
    describe_counter!(
        "tracefleet_reports_ingested_total",
        "Run reports stored (each run once)."
    );
    describe_counter!(
        "tracefleet_runs_total",
        "Runs reported of the versions the learner rolled out, by trace, version and outcome."
    );
    describe_gauge!(
        "tracefleet_trace_confidence",
        "Fleet confidence (0..1) of each trace's newest rolled-out version."
    );
    describe_gauge!(
        "tracefleet_trace_fidelity",
        "Reference answers the devices' models repeated / scored (0..1), each trace's newest rolled-out version."
    );
    describe_gauge!(
        "tracefleet_rollout_devices",
        "Devices per rolled-out version by install outcome (installed, already_installed, refused)."
    );
    describe_gauge!(
        "tracefleet_rollouts",
        "Rollouts by state (running, done, halted, aborting, aborted, superseded)."
    );
    describe_counter!(
        "tracefleet_regenerations_total",
        "Regenerations by outcome."
    );
    describe_gauge!(
        "tracefleet_regeneration_cost_dollars",
        "Dollars spent on regenerations so far (the backend's prices; only grows)."
    );
    describe_counter!(
        "tracefleet_escalations_total",
        "Escalations devices raised."
    );
    describe_counter!(
        "tracefleet_refused_messages_total",
        "Messages ingest refused, by kind (too_large, malformed, impersonation, not_for_us)."
    );
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^53
fn set(s: &Snapshot) {
    use metrics::{counter, gauge};
    gauge!("tracefleet_devices", "status" => "online").set(s.devices_online as f64);
    gauge!("tracefleet_devices", "status" => "offline").set(s.devices_offline as f64);
    counter!("tracefleet_reports_ingested_total").absolute(s.reports);
    for (trace, version, outcome, n) in &s.runs {
        counter!("tracefleet_runs_total", "trace" => trace.clone(), "version" => version.clone(), "outcome" => outcome.clone())
            .absolute(*n);
    }
    for v in &s.versions {
        let labels = [
            ("trace", v.trace_id.clone()),
            ("version", v.version.clone()),
        ];
        gauge!("tracefleet_trace_confidence", &labels).set(v.confidence);
        if let Some(f) = v.fidelity {
            gauge!("tracefleet_trace_fidelity", &labels).set(f);
        }
    }
    for (trace, version, outcome, n) in &s.rollout_devices {
        gauge!("tracefleet_rollout_devices", "trace" => trace.clone(), "version" => version.clone(), "outcome" => outcome.clone())
            .set(*n as f64);
    }
    for (state, n) in &s.rollouts {
        gauge!("tracefleet_rollouts", "state" => state.clone()).set(*n as f64);
    }
    for (outcome, n) in &s.regenerations {
        counter!("tracefleet_regenerations_total", "outcome" => outcome.clone()).absolute(*n);
    }
    // The recorder's counters hold integers: the cost is a gauge that only grows.
    gauge!("tracefleet_regeneration_cost_dollars").set(s.regeneration_cost);
    counter!("tracefleet_escalations_total").absolute(s.escalations);
    for (kind, n) in &s.refused {
        counter!("tracefleet_refused_messages_total", "kind" => kind.clone()).absolute(*n);
    }
}

/// Reads the bearer token: the file's content without surrounding whitespace.
///
/// # Errors
/// Unreadable, or shorter than [`MIN_TOKEN_BYTES`].
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("[http] token_file {}", path.display()))?;
    let token = text.trim().to_owned();
    if token.len() < MIN_TOKEN_BYTES {
        anyhow::bail!(
            "[http] token_file {}: a token of {} bytes: expected at least {MIN_TOKEN_BYTES} (e.g. `openssl rand -hex 32`)",
            path.display(),
            token.len()
        );
    }
    Ok(token)
}

/// Whether `authorization` (a header value) is `Bearer <token>` (the scheme in any case,
/// RFC 7235); compared as SHA-256 digests, so the time taken says nothing about the token.
#[must_use]
pub fn authorized(authorization: &str, token: &str) -> bool {
    use sha2::Digest as _;
    let Some((scheme, credentials)) = authorization.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && sha2::Sha256::digest(credentials.trim().as_bytes())
            == sha2::Sha256::digest(token.as_bytes())
}

/// Answers on `listener` (bound to `config.listen`) until the task is dropped; `token` is
/// what scrapers must send (`None`: `metrics_public`).
///
/// # Errors
/// The server fails.
pub async fn serve(
    config: &HttpConfig,
    token: Option<String>,
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse as _;
    let handler = move |headers: HeaderMap| {
        let metrics = metrics.clone();
        let token = token.clone();
        async move {
            if let Some(token) = &token {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !authorized(given, token) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        "a bearer token is required: Authorization: Bearer TOKEN ([http] token_file)\n",
                    )
                        .into_response();
                }
            }
            match tokio::task::spawn_blocking(move || metrics.render()).await {
                Ok(Ok(text)) => (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
                    .into_response(),
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "/metrics");
                    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
                }
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(handler));
    tracing::info!(listen = %config.listen, public = config.metrics_public, "serving /metrics");
    axum::serve(listener, app).await.context("HTTP")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
        let t = "scrape-token-0123456789";
        assert!(authorized("Bearer scrape-token-0123456789", t));
        assert!(authorized("bearer  scrape-token-0123456789 ", t));
        assert!(!authorized("Bearer scrape-token-012345678", t));
        assert!(!authorized("Basic scrape-token-0123456789", t));
        assert!(!authorized("scrape-token-0123456789", t));
        assert!(!authorized("", t));
    }

    #[test]
    fn a_series_whose_rows_are_gone_is_no_longer_exposed() {
        let mut s = Snapshot {
            rollouts: vec![("halted".into(), 1)],
            ..Snapshot::default()
        };
        let halted = "tracefleet_rollouts{state=\"halted\"} 1";
        assert!(render_fleet(&s).contains(halted), "{}", render_fleet(&s));
        s.rollouts = vec![("aborted".into(), 1)];
        let text = render_fleet(&s);
        assert!(
            !text.contains("state=\"halted\"") && text.contains("state=\"aborted\"} 1"),
            "{text}"
        );
        // The figures, as set.
        s.escalations = 3;
        s.devices_online = 2;
        let text = render_fleet(&s);
        assert!(text.contains("tracefleet_escalations_total 3"), "{text}");
        assert!(
            text.contains("tracefleet_devices{status=\"online\"} 2"),
            "{text}"
        );
    }
}
