//! `learner serve`: one tokio task, one loop over a closed `Event` enum — the MQTT
//! connection, the one-second tick, shutdown — with shutdown passed in as a future (as
//! `follower agent` does, edge/src/agent/mod.rs).
//!
//! It subscribes to every device's topics (through the shared group when there is one) and
//! ingests what arrives in batches — what has already arrived when a message is read, up to
//! [`INGEST_BATCH`], one transaction ([`crate::db::LearnerDb::ingest_batch`]) — each message
//! acknowledged in order after its batch commits (MQTT 3.1.1 §4.6), so a learner killed in
//! between gets them again. Every tick it does the leader's [`duties`] and publishes what
//! they return.

pub mod duties;
pub mod http;

use crate::config::LearnerConfig;
use crate::db::now_secs;
use duties::{Duties, Outgoing};
use rumqttc::{AsyncClient, Incoming, QoS};
use std::future::Future;
use std::time::Duration;
use tracefleet::wire;

/// Most messages ingested in one transaction.
pub const INGEST_BATCH: usize = 512;

/// What the loop waits for.
enum Event {
    /// From the MQTT event loop.
    Mqtt(Result<rumqttc::Event, rumqttc::ConnectionError>),
    /// The one-second tick: the leader's duties.
    Tick,
    /// Time to stop.
    Shutdown,
}

/// `learner serve`: connects to the broker and ingests until SIGTERM/SIGINT.
///
/// # Errors
/// When the database or the broker settings cannot be used.
pub fn serve(config: &LearnerConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        run(config, shutdown).await
    })
}

/// The serve loop, until `shutdown` completes.
///
/// # Errors
/// When the database, the embedded broker, the broker settings, the command key or the
/// regeneration backend cannot be used, or a subscription cannot be queued.
pub async fn run(config: &LearnerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut db = config.open_db()?;
    if let Some(embedded) = &config.embedded {
        crate::broker::start(embedded)?;
    }
    let options = config.broker.options(&config.client_id, None)?;
    // Room for the acks of several batches and the rollouts' publishes: acks are queued
    // without waiting (this task is the one that drains the queue, by polling).
    let (client, mut eventloop) = AsyncClient::new(options, 16 * INGEST_BATCH);
    let mut batch = Vec::with_capacity(INGEST_BATCH);
    let mut backoff = Duration::from_millis(250);
    let commands_key = match &config.stuck.commands_key {
        Some(path) => {
            let k = crate::keys::read_secret(path)?;
            if k.role != tracefleet::signed::KeyRole::Commands {
                anyhow::bail!(
                    "[stuck] commands_key {}: a {} key: expected a command-signing key",
                    path.display(),
                    k.role
                );
            }
            Some(k)
        }
        None => None,
    };
    // What serve does by itself (regenerations, rollout waves and halts, the watchdog's
    // commands) goes into the audit log when it has one (none without [audit] dir,
    // --audit-dir, XDG_STATE_HOME or HOME).
    let audit = match crate::audit::AuditLog::locate(None, config.audit_dir.as_deref()) {
        Ok(dir) => Some(crate::audit::AuditLog::new(
            dir,
            format!(
                "learner serve {} as {}",
                config.client_id,
                crate::audit::AuditLog::this_user()
            ),
        )),
        Err(e) => {
            tracing::warn!(error = %e, "no audit log: serve's own actions are not recorded");
            None
        }
    };
    let regenerations = match (&config.regenerate, &config.backend) {
        (Some(auto), Some(backend)) => Some(crate::regen::auto::Runner::new(
            auto.clone(),
            backend.clone(),
            config.dry_run.clone(),
            config.db_path(),
            audit.clone(),
        )?),
        _ => None,
    };
    let mut duties = Duties::new(
        &config.client_id,
        config.stuck.clone(),
        commands_key,
        regenerations,
    )
    .with_audit(audit);
    // `[http]`: /metrics, answered by its own task on this runtime; serve stops with an error
    // if that task ends (an exporter that died silently would look like a healthy fleet).
    let (metrics, mut http_task) = match &config.http {
        Some(h) => {
            let metrics = std::sync::Arc::new(http::Metrics::open(&config.db_path())?);
            // Read once, at start: a missing or short token is an error now, not at a scrape.
            let token = match (&h.token_file, h.metrics_public) {
                (Some(path), false) => Some(http::read_token(path)?),
                _ => None,
            };
            let listener = tokio::net::TcpListener::bind(h.listen)
                .await
                .map_err(|e| anyhow::anyhow!("[http] listen {}: {e}", h.listen))?;
            let (h, m) = (h.clone(), metrics.clone());
            let task = tokio::spawn(async move { http::serve(&h, token, listener, m).await });
            (Some(metrics), Some(task))
        }
        None => (None, None),
    };
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shared_group = config.shared_group.as_deref();
    let mut shutdown = std::pin::pin!(shutdown);
    tracing::info!(db = %config.db_path().display(), "learner serving");
    loop {
        let event = tokio::select! {
            _ = ticks.tick() => Event::Tick,
            ev = eventloop.poll() => Event::Mqtt(ev),
            () = &mut shutdown => Event::Shutdown,
            ended = async {
                match &mut http_task {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            } => {
                let why = match ended {
                    Ok(Ok(())) => "it ended".to_owned(),
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(e) => e.to_string(),
                };
                anyhow::bail!("the HTTP server ([http], /metrics) stopped: {why}");
            }
        };
        match event {
            Event::Tick => publish(&client, duties.tick(&mut db, now_secs())),
            Event::Mqtt(Ok(rumqttc::Event::Incoming(Incoming::ConnAck(_)))) => {
                backoff = Duration::from_millis(250);
                subscribe(&client, shared_group)?;
                publish(&client, duties.on_connect(&db, now_secs()));
            }
            Event::Mqtt(Ok(rumqttc::Event::Incoming(Incoming::Publish(p)))) => {
                // Whatever else has already arrived joins this message in one
                // transaction (the poll is cancel-safe: unread bytes stay buffered).
                batch.push(p);
                let mut reconnected = false;
                for _ in 0..4 * INGEST_BATCH {
                    if batch.len() >= INGEST_BATCH {
                        break;
                    }
                    match ready_event(&mut eventloop).await {
                        Some(Ok(rumqttc::Event::Incoming(Incoming::Publish(p)))) => batch.push(p),
                        Some(Ok(rumqttc::Event::Incoming(Incoming::ConnAck(_)))) => {
                            reconnected = true;
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "broker connection");
                            break;
                        }
                        None => break,
                    }
                }
                ingest_and_ack(&client, &mut db, &mut batch, metrics.as_deref());
                if reconnected {
                    subscribe(&client, shared_group)?;
                    publish(&client, duties.on_connect(&db, now_secs()));
                }
            }
            Event::Mqtt(Ok(_)) => {}
            Event::Mqtt(Err(e)) => {
                tracing::warn!(error = %e, "broker connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Event::Shutdown => break,
        }
    }
    if let Some(task) = http_task {
        task.abort();
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    Ok(())
}

/// The event that is ready now, if any: polls `eventloop` once, without waiting.
async fn ready_event(
    eventloop: &mut rumqttc::EventLoop,
) -> Option<Result<rumqttc::Event, rumqttc::ConnectionError>> {
    let mut poll = std::pin::pin!(eventloop.poll());
    match std::future::poll_fn(|cx| std::task::Poll::Ready(poll.as_mut().poll(cx))).await {
        std::task::Poll::Ready(event) => Some(event),
        std::task::Poll::Pending => None,
    }
}

/// On every (re)connection: subscribes to what devices publish (through the shared group
/// when there is one).
fn subscribe(client: &AsyncClient, shared_group: Option<&str>) -> anyhow::Result<()> {
    tracing::info!(shared_group, "connected to the broker");
    let kinds = ["heartbeat", "reports", "acks", "escalations", "status"];
    client.try_subscribe_many(kinds.iter().map(|k| {
        let topic = match shared_group {
            Some(g) => format!("$share/{g}/{}", wire::all_devices(k)),
            None => wire::all_devices(k),
        };
        rumqttc::SubscribeFilter::new(topic, QoS::AtLeastOnce)
    }))?;
    Ok(())
}

/// Queues `messages` (QoS 1).
fn publish(client: &AsyncClient, messages: Vec<Outgoing>) {
    for m in messages {
        if let Err(e) = client.try_publish(&m.topic, QoS::AtLeastOnce, m.retain, m.payload) {
            if m.retain {
                tracing::error!(error = %e, topic = %m.topic, "cannot publish a rollout wave");
            } else {
                tracing::error!(error = %e, "cannot send a command");
            }
        }
    }
}

/// Ingests `batch` in one transaction, then acknowledges every message of it, in order
/// (MQTT 3.1.1 §4.6) — a refused one too (too large, malformed: counted by the ingest,
/// never to be sent again). When the transaction fails nothing is acknowledged: the broker
/// sends the messages again on the next connection.
fn ingest_and_ack(
    client: &AsyncClient,
    db: &mut crate::db::LearnerDb,
    batch: &mut Vec<rumqttc::Publish>,
    metrics: Option<&http::Metrics>,
) {
    let messages: Vec<(&str, &[u8])> = batch
        .iter()
        .map(|p| (p.topic.as_str(), &p.payload[..]))
        .collect();
    let started = std::time::Instant::now();
    let stored = db.ingest_batch(&messages);
    if let (Some(m), Ok(_)) = (metrics, &stored) {
        m.ingest_batch(started.elapsed().as_secs_f64(), messages.len());
    }
    match stored {
        Ok(results) => {
            for (r, p) in results.into_iter().zip(batch.iter()) {
                match r {
                    Ok(what) => tracing::debug!(?what, "ingested"),
                    Err(e) => tracing::warn!(
                        error = %e,
                        topic = %p.topic,
                        bytes = p.payload.len(),
                        kind = e.kind(),
                        "message dropped (acknowledged, counted in refused_messages)"
                    ),
                }
                if let Err(e) = client.try_ack(p) {
                    tracing::error!(error = %e, "cannot queue an ack: the broker sends the message again on the next connection");
                }
            }
        }
        Err(e) => tracing::error!(error = %e, messages = batch.len(), "could not store messages"),
    }
    batch.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Plan, Wave};

    #[tokio::test(start_paused = true)]
    async fn the_loop_ticks_each_second_without_a_broker_and_ends_when_shutdown_completes() {
        let d = tempfile::tempdir().unwrap();
        // A broker that is not there: the loop retries with a backoff and still ticks.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let path = d.path().join("learner.toml");
        std::fs::write(
            &path,
            format!("client_id = \"serve-test\"\n[broker]\nhost = \"127.0.0.1\"\nport = {port}\n"),
        )
        .unwrap();
        let config = LearnerConfig::load(&path).unwrap();
        let mut db = config.open_db().unwrap();
        crate::rollout::start(
            &mut db,
            &Plan {
                trace_id: "t",
                version: "1.0.0",
                signed: b"signed",
                waves: &[Wave::Group("lab".into()), Wave::Group("*".into())],
                max_failure_rate: 0.2,
                min_runs: 1,
            },
            0,
        )
        .unwrap();
        let started = tokio::time::Instant::now();
        run(&config, tokio::time::sleep(Duration::from_secs(5)))
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(5), "{took:?}");
        assert!(took < Duration::from_secs(16), "{took:?}");
        // Ticks took the lead and drove the rollout through both (empty) waves.
        let r = &crate::rollout::list(&db).unwrap()[0];
        assert_eq!((r.state.as_str(), r.wave), ("done", 1));
        assert!(!db.lead("another", now_secs()).unwrap());
    }
}
