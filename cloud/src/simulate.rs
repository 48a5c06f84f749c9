//! `learner simulate`: many lightweight simulated followers in one process, for fleet tests
//! and benchmarks. Each is a real MQTT client (rumqttc) with its own persistent session,
//! speaking the fleet link exactly as `follower agent` does — status, heartbeats with its
//! groups, an ack for every pushed trace, a report for every run — but with deterministic
//! results instead of real runs: a run of a trace named in `fail` fails, every other succeeds.
//! Simulated devices do not verify signatures (they hold no trust root); they read the pushed
//! trace's id and version from its envelope.

use rumqttc::{AsyncClient, Incoming, QoS};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracefleet::report::{Report, RunStatus};
use tracefleet::wire::{self, Ack, AckOutcome, Action, Heartbeat, ReportMessage, Status, Topic};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// How many devices (`{prefix}-0000` …).
    pub devices: usize,
    /// Device id prefix.
    pub prefix: String,
    /// Groups by device index: the first `n` devices join the first group, the next `m` the
    /// second, …; the rest join none.
    pub groups: Vec<(String, usize)>,
    /// Trace ids whose runs fail.
    pub fail: Vec<String>,
    /// Run a trace right after installing it (so rollouts move on without commands).
    pub run_on_install: bool,
    /// Reports each device sends at start (load for benchmarks).
    pub reports: usize,
    /// Stop after this long (default: on SIGINT/SIGTERM).
    pub duration: Option<Duration>,
    /// Seconds between heartbeats.
    pub heartbeat_secs: u64,
}

/// Counters over all simulated devices.
#[derive(Debug, Default)]
pub struct Totals {
    /// Devices whose first connection was acknowledged.
    pub connected: AtomicU64,
    /// Traces installed (acks sent).
    pub installed: AtomicU64,
    /// Reports published.
    pub reports: AtomicU64,
    /// PUBACKs received for QoS 1 publishes.
    pub pubacks: AtomicU64,
}

use tracefleet::time::unix_now;

/// A deterministic report of a run of `trace_id` `version` on `device`.
#[must_use]
pub fn synthetic_report(
    device: &str,
    run_id: &str,
    trace_id: &str,
    version: &str,
    ok: bool,
) -> Report {
    let now = tracefleet::time::rfc3339_now();
    let mut r: Report = serde_json::from_value(serde_json::json!({
        "report_version": 1,
        "run_id": run_id,
        "device_id": device,
        "trace_id": trace_id,
        "trace_version": version,
        "goal_signature": "simulated",
        "status": if ok { "success" } else { "failed" },
        "total_steps": 1,
        "completed_steps": u32::from(ok),
        "failed_step": if ok { None } else { Some(1) },
        "error": if ok { None } else { Some("simulated failure") },
        "started_at": now,
        "finished_at": now,
        "execution_time_secs": 0.0,
        "estimated_cost": 0.0,
        "inputs": {},
        "preconditions": [],
        "all_preconditions_met": true,
        "step_results": [],
        "all_validations_passed": ok,
        "postconditions": [],
        "all_postconditions_met": ok,
        "escalations": [],
        "prompt_tokens": 0,
        "completion_tokens": 0
    }))
    .unwrap_or_else(|e| panic!("the synthetic report no longer matches Report: {e}"));
    r.status = if ok {
        RunStatus::Success
    } else {
        RunStatus::Failed
    };
    r
}

/// Runs the simulation against the broker in `config`.
///
/// # Errors
/// When the broker settings cannot be used.
pub fn run(config: &crate::config::LearnerConfig, sim: &Simulation) -> anyhow::Result<Arc<Totals>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let totals = Arc::new(Totals::default());
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        let mut index = 0usize;
        let mut group_of = Vec::with_capacity(sim.devices);
        for (g, n) in &sim.groups {
            group_of.extend(std::iter::repeat_n(Some(g.clone()), *n));
        }
        while group_of.len() < sim.devices {
            group_of.push(None);
        }
        for group in group_of.into_iter().take(sim.devices) {
            let device = format!("{}-{index:04}", sim.prefix);
            index += 1;
            if let Err(e) = device.parse::<tracefleet::ids::DeviceId>() {
                anyhow::bail!(
                    "--prefix {:?} makes device ids like {device:?}: {e}",
                    sim.prefix
                );
            }
            let options = config.broker.options(&device, None)?;
            tasks.spawn(device_loop(
                device,
                group.into_iter().collect(),
                options,
                sim.clone(),
                Arc::clone(&totals),
            ));
        }
        let stop = async {
            match sim.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        tokio::select! {
            () = stop => {}
            _ = async { while tasks.join_next().await.is_some() {} } => {}
        }
        tasks.abort_all();
        anyhow::Ok(())
    })?;
    Ok(totals)
}

async fn device_loop(
    device: String,
    groups: Vec<String>,
    options: rumqttc::MqttOptions,
    sim: Simulation,
    totals: Arc<Totals>,
) {
    let (client, mut events) = AsyncClient::new(options, 256);
    // Checked when the fleet was laid out.
    let Ok(device_id) = device.parse::<tracefleet::ids::DeviceId>() else {
        return;
    };
    let mut installed: BTreeMap<String, String> = BTreeMap::new();
    if sim.reports > 0 {
        // The load's trace, as if installed from a bundle: the heartbeat lists it, so the
        // learner counts its reports as a real device's.
        installed.insert("simulated-load".to_owned(), "1.0.0".to_owned());
    }
    let mut heartbeat = tokio::time::interval(Duration::from_secs(sim.heartbeat_secs.max(1)));
    let mut first = true;
    let mut runs = 0u64;
    let publish = |topic: Topic, payload: Vec<u8>, retain: bool| {
        let _ = client.try_publish(topic.name(), QoS::AtLeastOnce, retain, payload);
    };
    let beat = |installed: &BTreeMap<String, String>| Heartbeat {
        device_id: device_id.clone(),
        sent_at: unix_now(),
        follower_version: format!("simulated {}", env!("CARGO_PKG_VERSION")),
        groups: groups.clone(),
        installed: installed
            .iter()
            .map(|(t, v)| wire::InstalledTrace {
                trace_id: t.clone(),
                version: v.clone(),
            })
            .collect(),
        running: Vec::new(),
        telemetry: tracefleet::report::Telemetry::default(),
        // A simulated device decrypts nothing.
        recipient: None,
    };
    let report = |trace: &str, version: &str, runs: &mut u64| {
        *runs += 1;
        let run_id = uuid::Uuid::now_v7().to_string();
        let ok = !sim.fail.iter().any(|f| f == trace);
        let r = synthetic_report(&device, &run_id, trace, version, ok);
        let m = ReportMessage {
            run_id,
            report_json: serde_json::to_string(&r).unwrap_or_default(),
        };
        totals.reports.fetch_add(1, Ordering::Relaxed);
        publish(Topic::Reports(device.clone()), wire::encode(&m), false);
    };
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                publish(Topic::Heartbeat(device.clone()), wire::encode(&beat(&installed)), false);
            }
            ev = events.poll() => match ev {
                Ok(rumqttc::Event::Incoming(Incoming::ConnAck(_))) => {
                    let _ = client.try_subscribe_many(
                        wire::device_subscriptions(&device, &groups)
                            .into_iter()
                            .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce)),
                    );
                    publish(Topic::Status(device.clone()), wire::encode(&Status { online: true, at: unix_now() }), true);
                    publish(Topic::Heartbeat(device.clone()), wire::encode(&beat(&installed)), false);
                    if first {
                        first = false;
                        totals.connected.fetch_add(1, Ordering::Relaxed);
                        // The load goes out from its own task, waiting for room in the
                        // client's queue (this task must go on polling the connection).
                        let (load, device, totals) = (client.clone(), device.clone(), Arc::clone(&totals));
                        let n = sim.reports;
                        tokio::spawn(async move {
                            for _ in 0..n {
                                let run_id = uuid::Uuid::now_v7().to_string();
                                let r = synthetic_report(&device, &run_id, "simulated-load", "1.0.0", true);
                                let m = ReportMessage {
                                    run_id,
                                    report_json: serde_json::to_string(&r).unwrap_or_default(),
                                };
                                if load
                                    .publish(Topic::Reports(device.clone()).name(), QoS::AtLeastOnce, false, wire::encode(&m))
                                    .await
                                    .is_err()
                                {
                                    break;
                                }
                                totals.reports.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                }
                Ok(rumqttc::Event::Incoming(Incoming::PubAck(_))) => {
                    totals.pubacks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(rumqttc::Event::Incoming(Incoming::Publish(p))) => {
                    match Topic::parse(&p.topic) {
                        Ok(Topic::FleetTrace(id) | Topic::GroupTrace(_, id) | Topic::DeviceTrace(_, id)) if !p.payload.is_empty() => {
                            if let Some((_, version)) = wire::pushed_trace_version(&p.payload) {
                                let version = version.to_string();
                                let fresh = installed.insert(id.clone(), version.clone()).as_ref() != Some(&version);
                                let ack = Ack {
                                    trace_id: id.clone(),
                                    version: Some(version.clone()),
                                    outcome: if fresh { AckOutcome::Installed } else { AckOutcome::AlreadyInstalled },
                                    at: unix_now(),
                                };
                                totals.installed.fetch_add(u64::from(fresh), Ordering::Relaxed);
                                publish(Topic::Acks(device.clone()), wire::encode(&ack), false);
                                publish(Topic::Heartbeat(device.clone()), wire::encode(&beat(&installed)), false);
                                if fresh && sim.run_on_install {
                                    report(&id, &version, &mut runs);
                                }
                            }
                        }
                        Ok(Topic::Commands(_)) => {
                            let command = wire::decode::<wire::SignedCommand>(&p.payload, "signed command")
                                .ok()
                                .and_then(|s| postcard::from_bytes::<wire::Command>(&s.command).ok());
                            if let Some(wire::Command { action: Action::Run { trace_id, .. }, .. }) = command {
                                let version = installed.get(&trace_id).cloned().unwrap_or_default();
                                report(&trace_id, &version, &mut runs);
                            }
                        }
                        _ => {}
                    }
                    let _ = client.try_ack(&p);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// Bytes of a simulated device's report message (the baseline publishes messages this size).
#[must_use]
pub fn baseline_size() -> usize {
    let r = synthetic_report(
        "sim-0000",
        &uuid::Uuid::now_v7().to_string(),
        "simulated-load",
        "1.0.0",
        true,
    );
    wire::encode(&ReportMessage {
        run_id: r.run_id.clone(),
        report_json: serde_json::to_string(&r).unwrap_or_default(),
    })
    .len()
}

/// Measures the broker's own throughput under a simulation's load: `devices` publishers
/// (rumqttc, as the simulated devices, all on one thread as in `simulate`) each publish
/// `per_device` QoS 1 messages of `size` bytes to a private topic, received by one
/// subscriber on a thread of its own (as `serve` is a process of its own) that acknowledges
/// at once and stores nothing. Returns messages per second from before the publishers
/// connect to the last message received.
///
/// # Errors
/// When the broker cannot be reached or the messages do not all arrive within two minutes.
pub fn broker_baseline(
    config: &crate::config::LearnerConfig,
    devices: usize,
    per_device: usize,
    size: usize,
) -> anyhow::Result<f64> {
    let count = devices * per_device;
    let topic = format!("{}/bench/{}", wire::TOPIC_PREFIX, std::process::id());
    let mut sub_opts = config.broker.options("tracefleet-bench-sub", None)?;
    sub_opts.set_clean_session(true).set_manual_acks(false);
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let filter = format!("{topic}/+");
    let receiver = std::thread::spawn(move || -> anyhow::Result<Instant> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (sub, mut events) = AsyncClient::new(sub_opts, 16);
            sub.subscribe(filter, QoS::AtLeastOnce).await?;
            let mut got = 0usize;
            let receive = async {
                while got < count {
                    match events.poll().await? {
                        rumqttc::Event::Incoming(Incoming::SubAck(_)) => {
                            let _ = subscribed_tx.send(());
                        }
                        rumqttc::Event::Incoming(Incoming::Publish(_)) => got += 1,
                        _ => {}
                    }
                }
                anyhow::Ok(Instant::now())
            };
            tokio::time::timeout(Duration::from_secs(120), receive)
                .await
                .map_err(|_| {
                    anyhow::anyhow!("the broker did not pass {count} messages within two minutes")
                })?
        })
    });
    subscribed
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow::anyhow!("the baseline subscriber did not subscribe within 10 s"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let start = Instant::now();
    let _publishers = rt.block_on(async {
        let mut publishers = tokio::task::JoinSet::new();
        for i in 0..devices {
            let mut opts = config
                .broker
                .options(&format!("tracefleet-bench-pub-{i}"), None)?;
            opts.set_clean_session(true);
            let (publisher, mut events) = AsyncClient::new(opts, 256);
            let topic = format!("{topic}/{i}");
            publishers.spawn(async move {
                // Both run until the measurement ends (the driver acks what is in flight).
                let sender = async {
                    for _ in 0..per_device {
                        let payload = vec![b'x'; size];
                        if publisher
                            .publish(&topic, QoS::AtLeastOnce, false, payload)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    std::future::pending::<()>().await;
                };
                let driver = async {
                    loop {
                        if events.poll().await.is_err() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                };
                tokio::join!(sender, driver);
            });
        }
        // Drive the publishers until the receiver is done.
        while !receiver.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        anyhow::Ok(publishers)
    })?;
    let end = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the baseline subscriber panicked"))??;
    #[allow(clippy::cast_precision_loss)]
    Ok(count as f64 / end.duration_since(start).as_secs_f64())
}
