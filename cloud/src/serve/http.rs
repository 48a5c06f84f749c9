//! `learner serve`'s HTTP side, with `[http]` in learner.toml: `GET /metrics` in the
//! Prometheus text exposition format (0.0.4, rendered by `metrics-exporter-prometheus`),
//! behind a bearer token unless `metrics_public = true`.
//!
//! The fleet's figures are read from the database at each scrape
//! ([`crate::db::LearnerDb::metrics_snapshot`]), so they are what the database says; the ingest
//! batch durations are measured in this process (`tracefleet_ingest_batch_seconds`, a
//! histogram). Label cardinality is bounded by what operators create: `trace` and `version`
//! are the trace versions the learner has statistics, runs or acks for (retire old versions
//! to shrink it), `outcome`, `state` and `kind` take a handful of fixed values; no label
//! holds a device id or a run id.

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

/// The recorder the figures are rendered with, and the database read at each scrape.
pub struct Metrics {
    recorder: PrometheusRecorder,
    db: Mutex<LearnerDb>,
}

impl Metrics {
    /// A recorder and a second connection to the learner's database at `db_path`.
    ///
    /// # Errors
    /// When the database cannot be opened.
    pub fn open(db_path: &Path) -> anyhow::Result<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("tracefleet_ingest_batch_seconds".into()),
                &BATCH_BUCKETS,
            )
            .context("histogram buckets")?
            .build_recorder();
        metrics::with_local_recorder(&recorder, describe);
        Ok(Self {
            recorder,
            db: Mutex::new(LearnerDb::open(db_path)?),
        })
    }

    /// Records one ingest transaction's duration.
    pub fn ingest_batch(&self, seconds: f64, messages: usize) {
        metrics::with_local_recorder(&self.recorder, || {
            metrics::histogram!("tracefleet_ingest_batch_seconds").record(seconds);
            metrics::counter!("tracefleet_messages_received_total").increment(messages as u64);
        });
    }

    /// The exposition text: the database's figures now, and this process's histogram.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn render(&self) -> anyhow::Result<String> {
        let snapshot = self
            .db
            .lock()
            .map_err(|_| anyhow::anyhow!("the metrics database connection was poisoned"))?
            .metrics_snapshot()?;
        metrics::with_local_recorder(&self.recorder, || set(&snapshot));
        Ok(self.recorder.handle().render())
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
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
        "Runs reported, by trace, version and outcome."
    );
    describe_gauge!(
        "tracefleet_trace_confidence",
        "A trace version's fleet confidence (0..1)."
    );
    describe_gauge!(
        "tracefleet_trace_fidelity",
        "Reference answers the devices' models repeated / scored, per trace version (0..1)."
    );
    describe_gauge!(
        "tracefleet_rollout_devices",
        "Devices per trace version by install outcome (installed, already_installed, refused)."
    );
    describe_gauge!(
        "tracefleet_rollouts",
        "Rollouts by state (running, done, halted, aborted)."
    );
    describe_counter!(
        "tracefleet_regenerations_total",
        "Regenerations by outcome."
    );
    describe_gauge!(
        "tracefleet_regeneration_cost_dollars",
        "Dollars spent on regenerations so far (the backend's prices; only grows)."
    );
    describe_gauge!(
        "tracefleet_escalations_open",
        "Escalations recorded and not acknowledged."
    );
    describe_counter!(
        "tracefleet_refused_messages_total",
        "Messages ingest refused, by kind (too_large, malformed, impersonation, not_for_us)."
    );
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
    for (trace, version, state, n) in &s.rollout_devices {
        gauge!("tracefleet_rollout_devices", "trace" => trace.clone(), "version" => version.clone(), "state" => state.clone())
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
    gauge!("tracefleet_escalations_open").set(s.escalations as f64);
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

/// Answers on `listener` (bound to `config.listen`) until the task is dropped.
///
/// # Errors
/// The token file cannot be read, or the server fails.
pub async fn serve(
    config: &HttpConfig,
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse as _;
    let token = match (&config.token_file, config.metrics_public) {
        (_, true) => None,
        (Some(path), false) => Some(read_token(path)?),
        (None, false) => anyhow::bail!(
            "[http]: expected token_file (the bearer token scrapers send) or metrics_public = true"
        ),
    };
    let expected = token.map(|t| format!("Bearer {t}"));
    let handler = move |headers: HeaderMap| {
        let metrics = metrics.clone();
        let expected = expected.clone();
        async move {
            if let Some(expected) = &expected {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                // Compared as digests: the time taken says nothing about the token.
                use sha2::Digest as _;
                if sha2::Sha256::digest(given.as_bytes())
                    != sha2::Sha256::digest(expected.as_bytes())
                {
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
