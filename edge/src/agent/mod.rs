//! `follower agent`: the device's side of the fleet link (MQTT topics and payloads in
//! `tracefleet::wire`).
//!
//! One task, one loop over a closed `Event` enum: MQTT events (rumqttc, persistent session,
//! QoS 1, manual acks), the heartbeat tick, the schedule, run processes exiting, and shutdown
//! (SIGTERM/SIGINT), which is a future like the others.
//!
//! - **Outbox.** Reports, acks and escalations are rows of the store's outbox, written in the
//!   same transaction as what they report (see [`crate::store::Store::finish_run`]). The agent
//!   publishes them with QoS 1 and deletes a row only when the broker's PUBACK for it arrives.
//!   rumqttc announces each QoS 1 publish it writes (`Outgoing::Publish(pkid)`) in the order
//!   they were submitted, which maps packet ids to rows. After a reconnect the agent drops
//!   rumqttc's own retransmission queue and publishes every row still in the outbox again,
//!   so a broker that lost the session loses nothing; the learner ingests idempotently by
//!   run id, so a message sent twice counts once. The bookkeeping (window, packet ids ↔
//!   rows, what a PUBACK or a reconnect means) is [`outbox::Outbox`], without I/O; this
//!   loop reads the store, publishes and feeds it events.
//! - **Clocks.** The heartbeat, the outbox's one-second look and the schedule are
//!   [`timers::Timers`], tested in paused time.
//! - **Traces** arrive retained on the fleet and group topics and, for a canary, its own trace
//!   topic; each is verified and installed by [`crate::install::install_signed`], as by
//!   `follower install`, and acknowledged through the outbox.
//!   The MQTT message is acknowledged only after that (a crash before it gets it again).
//! - **Commands** are verified against the trust root's command keys, for this device, within
//!   their expiry and with a counter above the last accepted one (stored before acting).
//!   `run` starts `follower run` as a child process (its own Landlock domain, journal and
//!   report); `stop`, `abort` and `kill` signal it (SIGTERM, a second SIGTERM, SIGKILL), the
//!   same signals an operator would send.
//! - **Refusals.** Every incoming message is acknowledged once handled, whether it was used
//!   or refused: a refused trace or command (bad signature, replay, over its size limit —
//!   the MQTT client reads packets of any size, `tracefleet::link`, so an oversized message
//!   is refused here, never by failing the connection) is logged with its topic and size and
//!   recorded in the store's install log (`refused`); a refused trace is also acked to the
//!   learner as `Refused`. Nothing a broker delivers can wedge the link.

pub mod outbox;
pub mod timers;

use crate::install::{InstallError, SignedRefused, install_signed};
use crate::store::{OutboxKind, Store, StoreError};
use outbox::{Offer, Outbox};
use rumqttc::{AsyncClient, EventLoop, Incoming, LastWill, Outgoing, QoS};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;
use timers::{Tick, Timers};
use tracefleet::ids::DeviceId;
use tracefleet::link::BrokerConfig;
use tracefleet::time::{rfc3339_now, unix_now};
use tracefleet::wire::{self, Ack, AckOutcome, Action, Heartbeat, Status, Topic};

/// `follower.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This device's id: its MQTT client id and the level of its topics
    /// (env `TRACEFLEET_DEVICE_ID`), checked when the file is read.
    pub device_id: DeviceId,
    /// Groups whose traces this device installs (rollout waves target groups).
    #[serde(default)]
    pub groups: Vec<String>,
    /// The broker.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Seconds between heartbeats (default 30).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// Extra arguments for every `follower run` the agent starts (`--model`, `--threads`,
    /// `--read-root` …).
    #[serde(default)]
    pub run_args: Vec<String>,
    /// Traces run on a schedule.
    #[serde(default)]
    pub schedule: Vec<Scheduled>,
}

fn default_heartbeat() -> u64 {
    30
}

/// One `[[schedule]]` entry: run `trace` every `every` (humantime: `15m`, `1h`, `1day`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheduled {
    /// An installed trace id.
    pub trace: String,
    /// The period (humantime text in the file; at least [`MIN_SCHEDULE_PERIOD`]).
    #[serde(deserialize_with = "schedule_period")]
    pub every: Duration,
    /// Inputs.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
}

/// The shortest schedule period: a shorter one (`0s`) would start runs back to back.
pub const MIN_SCHEDULE_PERIOD: Duration = Duration::from_secs(1);

/// A `[[schedule]]` period: humantime text (`15m`, `1h`, `1day`) of at least
/// [`MIN_SCHEDULE_PERIOD`].
fn schedule_period<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    use serde::de::Error;
    let text = String::deserialize(d)?;
    let period = humantime::parse_duration(&text)
        .map_err(|e| D::Error::custom(format!("every {text:?}: {e} (expected e.g. \"15m\")")))?;
    if period < MIN_SCHEDULE_PERIOD {
        return Err(D::Error::custom(format!(
            "every {text:?}: expected a period of at least 1s, found {period:?}"
        )));
    }
    Ok(period)
}

impl AgentConfig {
    /// Reads and checks a config file; `TRACEFLEET_DEVICE_ID` and the `TRACEFLEET_MQTT_*`
    /// variables override it.
    ///
    /// # Errors
    /// A message naming the file and what is wrong in it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut c: AgentConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        if let Ok(id) = std::env::var("TRACEFLEET_DEVICE_ID") {
            c.device_id = id
                .parse()
                .context("TRACEFLEET_DEVICE_ID (which overrides device_id)")?;
        }
        c.broker.apply_env()?;
        for g in &c.groups {
            wire::check_name("group", g).with_context(|| format!("{}: groups", path.display()))?;
        }
        Ok(c)
    }
}

/// Everything the agent reacts to.
#[derive(Debug)]
enum Event {
    /// From the MQTT event loop.
    Mqtt(Result<rumqttc::Event, rumqttc::ConnectionError>),
    /// Time for a heartbeat.
    Heartbeat,
    /// Time to look for outbox rows other processes wrote (a `follower run` by hand).
    OutboxTick,
    /// A scheduled trace is due (index into the schedule).
    Due(usize),
    /// A run process ended.
    RunExited(String, std::io::Result<std::process::ExitStatus>),
    /// SIGTERM or SIGINT.
    Shutdown,
    /// Shutting down, and the time to send what is left is up.
    DrainTimeout,
}

/// A run process the agent started.
struct Running {
    trace_id: String,
    pid: nix::unistd::Pid,
    started_at: u64,
    /// SIGTERMs sent (1 = stop, 2 = abort).
    terms: u8,
}

/// The agent's state.
struct Agent {
    config: AgentConfig,
    state_dir: PathBuf,
    follower: PathBuf,
    store: Store,
    client: AsyncClient,
    outbox: Outbox,
    connected: bool,
    running: HashMap<String, Running>,
    exited: tokio::sync::mpsc::UnboundedSender<(String, std::io::Result<std::process::ExitStatus>)>,
    shutting_down: bool,
    /// One fidelity measurement at a time (each loads a model): many traces installed at
    /// once (retained ones, on the first connection) are measured one after another.
    measuring: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Runs the agent until SIGTERM or SIGINT.
///
/// # Errors
/// When the store cannot be opened, the config's files cannot be read, or the store fails.
pub fn run(config: AgentConfig, state_dir: &Path) -> anyhow::Result<()> {
    // Before any thread or run starts: alone in its cgroup v2 (a systemd service with
    // `Delegate=`), the agent moves into a leaf so that its runs may cap their steps' memory
    // and processes below the service's cgroup.
    crate::sandbox::cgroup::settle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(agent_loop(config, state_dir))
}

async fn agent_loop(config: AgentConfig, state_dir: &Path) -> anyhow::Result<()> {
    let store = Store::open(state_dir)?;
    if store.trust_root()?.is_none() {
        anyhow::bail!(
            "this device has no trust root yet (run `follower trust init ROOT.tfr` before `follower agent`)"
        );
    }
    store.enroll(&config.device_id)?;
    // Devices provisioned before confidential traces get their identity here. A damaged
    // identity file stops confidential traces only: the agent runs on and says so.
    match crate::identity::ensure(state_dir) {
        Ok((identity, true)) => {
            tracing::info!(recipient = %identity.recipient(), "created this device's identity for confidential traces");
        }
        Ok((_, false)) => {}
        Err(e) => {
            tracing::error!(error = %e, "no identity for confidential traces: they will be refused until the file is fixed or removed");
        }
    }
    let will = LastWill::new(
        Topic::Status(config.device_id.to_string()).name(),
        wire::encode(&Status {
            online: false,
            at: unix_now(),
        }),
        QoS::AtLeastOnce,
        true,
    );
    let options = config.broker.options(&config.device_id, Some(will))?;
    let window = usize::from(config.broker.inflight.max(1));
    let (client, mut eventloop) = AsyncClient::new(options, window * 2 + 16);
    let (exited, mut exits) = tokio::sync::mpsc::unbounded_channel();
    let mut agent = Agent {
        follower: std::env::current_exe()?,
        state_dir: state_dir.to_owned(),
        store,
        client,
        outbox: Outbox::new(window),
        connected: false,
        running: HashMap::new(),
        exited,
        shutting_down: false,
        measuring: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
        config,
    };
    let periods: Vec<Duration> = agent.config.schedule.iter().map(|s| s.every).collect();
    let mut timers = Timers::new(Duration::from_secs(agent.config.heartbeat_secs), periods);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    tokio::pin!(shutdown);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(250);
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    tracing::info!(device = %agent.config.device_id, broker = %agent.config.broker.host, "agent starting");
    loop {
        let event = tokio::select! {
            r = async {
                if let Some(t) = retry_at {
                    tokio::time::sleep_until(t).await;
                }
                eventloop.poll().await
            } => Event::Mqtt(r),
            tick = timers.next() => match tick {
                Tick::Heartbeat => Event::Heartbeat,
                Tick::Outbox => Event::OutboxTick,
                Tick::Due(i) => Event::Due(i),
            },
            Some((run_id, status)) = exits.recv() => Event::RunExited(run_id, status),
            () = &mut shutdown, if !agent.shutting_down => Event::Shutdown,
            () = async {
                match drain_deadline {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => Event::DrainTimeout,
        };
        match event {
            Event::Mqtt(Ok(ev)) => {
                retry_at = None;
                backoff = Duration::from_millis(250);
                agent.on_mqtt(ev, &mut eventloop)?;
            }
            Event::Mqtt(Err(e)) => {
                if agent.connected {
                    tracing::warn!(error = %e, "lost the broker; reconnecting");
                } else {
                    tracing::debug!(error = %e, "broker unreachable");
                }
                agent.connected = false;
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Event::Heartbeat => agent.heartbeat()?,
            Event::OutboxTick => agent.fill_outbox()?,
            Event::Due(i) => {
                let s = agent.config.schedule[i].clone();
                if agent.running.values().any(|r| r.trace_id == s.trace) {
                    tracing::warn!(trace = %s.trace, "scheduled run skipped: the previous one is still running");
                } else if !agent.shutting_down {
                    agent.start_run(&s.trace, s.vars.into_iter().collect());
                }
            }
            Event::RunExited(run_id, status) => {
                agent.running.remove(&run_id);
                match status {
                    Ok(s) => tracing::info!(run = %run_id, status = %s, "run ended"),
                    Err(e) => tracing::warn!(run = %run_id, error = %e, "lost the run process"),
                }
                agent.fill_outbox()?;
            }
            Event::DrainTimeout => {}
            Event::Shutdown => {
                tracing::info!("shutting down: stopping runs, sending what is left");
                agent.shutting_down = true;
                for r in agent.running.values_mut() {
                    let _ = nix::sys::signal::kill(r.pid, nix::sys::signal::Signal::SIGTERM);
                    r.terms = r.terms.max(1);
                }
            }
        }
        if agent.shutting_down && agent.running.is_empty() {
            let deadline = *drain_deadline.get_or_insert_with(|| {
                if agent.connected {
                    agent.publish_status(false);
                }
                tokio::time::Instant::now() + Duration::from_secs(5)
            });
            let drained = agent.outbox.in_flight() == 0;
            if drained || tokio::time::Instant::now() >= deadline {
                let _ = agent.client.try_disconnect();
                // Let the event loop write the DISCONNECT.
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while let Ok(ev) = eventloop.poll().await {
                        if matches!(ev, rumqttc::Event::Outgoing(Outgoing::Disconnect)) {
                            break;
                        }
                    }
                })
                .await;
                tracing::info!(left = agent.store.outbox_len()?, "agent stopped");
                return Ok(());
            }
        }
    }
}

impl Agent {
    fn on_mqtt(&mut self, ev: rumqttc::Event, eventloop: &mut EventLoop) -> anyhow::Result<()> {
        match ev {
            rumqttc::Event::Incoming(Incoming::ConnAck(ack)) => {
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the broker"
                );
                self.connected = true;
                // Whatever rumqttc kept for retransmission is in the outbox too: send the
                // outbox again instead, so packet ids map to rows from a clean start. That
                // includes the events rumqttc still queues from the old connection (the
                // `Outgoing::Publish` of a publish whose write failed, PUBACKs read just
                // before the error: rumqttc 0.25 hands them out after this ConnAck), which
                // would otherwise be matched against this connection's publishes — rows
                // mapped to the wrong packet ids, the window never emptying — and a packet-id
                // collision it would wait on forever.
                eventloop.pending.clear();
                eventloop.state.events.clear();
                eventloop.state.collision = None;
                self.outbox.connected();
                let topics =
                    wire::device_subscriptions(&self.config.device_id, &self.config.groups);
                self.client.try_subscribe_many(
                    topics
                        .into_iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce)),
                )?;
                self.publish_status(true);
                self.heartbeat()?;
                self.fill_outbox()?;
            }
            rumqttc::Event::Incoming(Incoming::Publish(p)) => {
                self.on_publish(&p);
                // Acknowledged only now: what it asked for is stored (or refused for good).
                let _ = self.client.try_ack(&p);
                self.fill_outbox()?;
            }
            rumqttc::Event::Incoming(Incoming::PubAck(ack)) => {
                if let Some(id) = self.outbox.acked(ack.pkid) {
                    self.store.outbox_delete(id)?;
                }
                self.fill_outbox()?;
            }
            rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) => self.outbox.written(pkid),
            rumqttc::Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                // The broker acked out of order and a packet id is still taken: rumqttc holds
                // this publish (still the oldest submitted) and sends it, announced with
                // `Outgoing::Publish`, once that id's PUBACK frees it; no new publish goes out
                // meanwhile, so the mapping stays in order.
                tracing::debug!(pkid, "packet id collision; waiting for its PUBACK");
            }
            _ => {}
        }
        Ok(())
    }

    /// Publishes outbox rows until the window is full.
    fn fill_outbox(&mut self) -> anyhow::Result<()> {
        if !self.connected {
            return Ok(());
        }
        let Some(want) = self.outbox.want() else {
            return Ok(());
        };
        let rows = self
            .store
            .outbox_after(want.after, u32::try_from(want.limit).unwrap_or(u32::MAX))?;
        for m in rows {
            match self.outbox.offer(m.id) {
                Offer::Publish => {}
                Offer::InFlight => continue,
                Offer::WindowFull => break,
            }
            let topic = m.kind.topic(&self.config.device_id).name();
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, m.payload)
                .is_err()
            {
                break;
            }
            self.outbox.published(m.id);
        }
        Ok(())
    }

    fn publish_status(&mut self, online: bool) {
        let topic = Topic::Status(self.config.device_id.to_string()).name();
        let payload = wire::encode(&Status {
            online,
            at: unix_now(),
        });
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, payload)
            .is_ok()
        {
            self.outbox.published_other();
        }
    }

    fn heartbeat(&mut self) -> anyhow::Result<()> {
        if !self.connected {
            return Ok(());
        }
        let installed = self
            .store
            .installed_traces()?
            .into_iter()
            .map(|(trace_id, version, _)| wire::InstalledTrace {
                trace_id,
                version: version.to_string(),
            })
            .collect();
        let running = self
            .running
            .iter()
            .map(|(run_id, r)| wire::RunningRun {
                run_id: run_id.clone(),
                trace_id: r.trace_id.clone(),
                started_at: r.started_at,
            })
            .collect();
        let hb = Heartbeat {
            device_id: self.config.device_id.clone(),
            sent_at: unix_now(),
            follower_version: env!("CARGO_PKG_VERSION").into(),
            groups: self.config.groups.clone(),
            installed,
            running,
            telemetry: crate::telemetry::sample(),
            // Read for each heartbeat: a replaced identity reaches the learner without a
            // restart (a damaged one is reported at start and sent as none).
            recipient: crate::identity::load(&self.state_dir)
                .ok()
                .flatten()
                .map(|i| i.recipient().to_string()),
        };
        let topic = Topic::Heartbeat(self.config.device_id.to_string()).name();
        let _ = self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, wire::encode(&hb));
        Ok(())
    }

    fn on_publish(&mut self, p: &rumqttc::Publish) {
        let topic = match Topic::parse(&p.topic) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, topic = %p.topic, bytes = p.payload.len(), "message on an unknown topic dropped");
                return;
            }
        };
        let result = match &topic {
            Topic::FleetTrace(id) | Topic::GroupTrace(_, id) | Topic::DeviceTrace(_, id) => {
                if p.payload.is_empty() {
                    Ok(()) // A retained trace withdrawn.
                } else {
                    self.on_trace(id, &p.payload)
                }
            }
            Topic::Commands(device) if self.config.device_id == device.as_str() => {
                self.on_command(&p.topic, &p.payload)
            }
            _ => {
                tracing::warn!(topic = %topic.name(), "message for someone else dropped");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, topic = %topic.name(), bytes = p.payload.len(), "could not handle a message");
        }
    }

    /// Verifies and installs a pushed trace; the ack goes through the outbox.
    fn on_trace(&mut self, topic_id: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let now = rfc3339_now();
        let mut measure = false;
        let (outcome, version) = match self.install(topic_id, bytes) {
            Ok((v, Some(judged))) => {
                measure = judged;
                (AckOutcome::Installed, Some(v))
            }
            Ok((v, None)) => (AckOutcome::AlreadyInstalled, Some(v)),
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::warn!(trace = topic_id, bytes = bytes.len(), %reason, "pushed trace refused");
                self.store.log_refusal("trace", topic_id, &reason, &now)?;
                let v = wire::pushed_trace_version(bytes).map(|(_, v)| v.to_string());
                (AckOutcome::Refused(reason), v)
            }
        };
        if outcome == AckOutcome::Installed {
            tracing::info!(trace = topic_id, version = ?version, "installed a pushed trace");
        }
        let ack = Ack {
            trace_id: topic_id.to_owned(),
            version,
            outcome,
            at: unix_now(),
        };
        self.store
            .enqueue(OutboxKind::Ack, &wire::encode(&ack), &now)?;
        if measure {
            self.measure_fidelity(topic_id);
        }
        Ok(())
    }

    /// Starts `follower traces fidelity TRACE` (with the run arguments) for a trace just
    /// installed, so its judgement steps' fidelity with this device's model is stored before
    /// the first run needs it; one at a time, after those queued before. Not waited for: a
    /// run that starts meanwhile measures itself.
    fn measure_fidelity(&self, trace_id: &str) {
        let mut cmd = tokio::process::Command::new(&self.follower);
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .args(["traces", "fidelity", trace_id])
            .args(&self.config.run_args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let slot = self.measuring.clone();
        let trace = trace_id.to_owned();
        tokio::spawn(async move {
            let Ok(_turn) = slot.acquire_owned().await else {
                return;
            };
            match cmd.spawn() {
                Ok(mut child) => match child.wait().await {
                    Ok(s) if s.success() => {
                        tracing::info!(%trace, "fidelity measured after install");
                    }
                    Ok(s) => {
                        tracing::warn!(%trace, status = %s, "fidelity after install not measured (the first run measures it)")
                    }
                    Err(e) => {
                        tracing::warn!(%trace, error = %e, "fidelity after install not measured")
                    }
                },
                Err(e) => {
                    tracing::warn!(%trace, error = %e, "cannot start the fidelity measurement")
                }
            }
        });
    }

    /// Returns the version and, when it was new, whether it has judgement steps to measure
    /// (`None`: installed already — not an error: retained traces arrive again on every
    /// reconnect).
    fn install(&mut self, topic_id: &str, bytes: &[u8]) -> anyhow::Result<(String, Option<bool>)> {
        match install_signed(
            &mut self.store,
            bytes,
            Some(topic_id),
            unix_now(),
            &rfc3339_now(),
        ) {
            Ok(t) => Ok((t.version.to_string(), Some(t.judged))),
            Err(SignedRefused { error, .. }) => match error {
                InstallError::NoRoot => anyhow::bail!("no trust root"),
                InstallError::Store(StoreError::Rollback {
                    trace_id,
                    installed,
                    offered,
                }) => {
                    if installed == offered {
                        return Ok((offered.to_string(), None));
                    }
                    anyhow::bail!(
                        "{trace_id} {offered} is older than the installed {installed}, and versions never go backwards"
                    )
                }
                other => Err(other.into()),
            },
        }
    }

    fn on_command(&mut self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
        let (root, _) = self
            .store
            .trust_root()?
            .ok_or_else(|| anyhow::anyhow!("no trust root"))?;
        let last = self.store.command_counter()?;
        let (command, _) =
            match wire::verify_command(payload, &root, &self.config.device_id, last, unix_now()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, topic, bytes = payload.len(), "command refused");
                    self.store.log_refusal(
                        "command",
                        &self.config.device_id,
                        &e.to_string(),
                        &rfc3339_now(),
                    )?;
                    return Ok(());
                }
            };
        if !self.store.accept_command_counter(command.counter)? {
            return Ok(());
        }
        tracing::info!(counter = command.counter, action = ?command.action, "command accepted");
        match command.action {
            Action::Run { trace_id, vars } => {
                if self.shutting_down {
                    tracing::warn!(trace = %trace_id, "not starting a run while shutting down");
                } else {
                    self.start_run(&trace_id, vars);
                }
            }
            Action::Stop(run) => self.signal(run.as_deref(), 1),
            Action::Abort(run) => self.signal(run.as_deref(), 2),
            Action::Kill(run) => self.signal(run.as_deref(), 3),
        }
        Ok(())
    }

    /// `level` 1 = stop (one SIGTERM), 2 = abort (two), 3 = kill (SIGKILL).
    fn signal(&mut self, run: Option<&str>, level: u8) {
        use nix::sys::signal::{Signal, kill};
        for (id, r) in &mut self.running {
            if run.is_some_and(|want| want != id) {
                continue;
            }
            if level >= 3 {
                let _ = kill(r.pid, Signal::SIGKILL);
                continue;
            }
            while r.terms < level {
                let _ = kill(r.pid, Signal::SIGTERM);
                r.terms += 1;
                if r.terms < level {
                    // The follower counts signals; give it time to see the first.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn start_run(&mut self, trace_id: &str, vars: Vec<(String, String)>) {
        let run_id = uuid::Uuid::now_v7().to_string();
        let mut cmd = tokio::process::Command::new(&self.follower);
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("run")
            .arg(trace_id)
            .arg("--run-id")
            .arg(&run_id)
            .arg("--device-id")
            .arg(self.config.device_id.as_str())
            .args(
                vars.iter()
                    .flat_map(|(k, v)| ["--var".to_owned(), format!("{k}={v}")]),
            )
            .args(&self.config.run_args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        match cmd.spawn() {
            Ok(mut child) => {
                let Some(pid) = child
                    .id()
                    .and_then(|p| i32::try_from(p).ok())
                    .map(nix::unistd::Pid::from_raw)
                else {
                    return;
                };
                tracing::info!(run = %run_id, trace = trace_id, "run started");
                self.running.insert(
                    run_id.clone(),
                    Running {
                        trace_id: trace_id.to_owned(),
                        pid,
                        started_at: unix_now(),
                        terms: 0,
                    },
                );
                let tx = self.exited.clone();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    let _ = tx.send((run_id, status));
                });
            }
            Err(e) => {
                tracing::error!(trace = trace_id, error = %e, "cannot start a run");
                let _ = self.store.record_escalation(
                    trace_id,
                    None,
                    &format!("the agent could not start a run: {e}"),
                    &rfc3339_now(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_period_must_parse_and_be_at_least_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("follower.toml");
        let config = |every: &str| {
            format!(
                "device_id = \"pi-01\"\n[broker]\nhost = \"localhost\"\n[[schedule]]\ntrace = \"t\"\nevery = \"{every}\"\n"
            )
        };
        std::fs::write(&p, config("15m")).unwrap();
        let c = AgentConfig::load(&p).unwrap();
        assert_eq!(c.schedule[0].every, Duration::from_secs(900));
        for (bad, says) in [("0s", "at least 1s"), ("soon", "expected e.g.")] {
            std::fs::write(&p, config(bad)).unwrap();
            let e = format!("{:#}", AgentConfig::load(&p).unwrap_err());
            assert!(
                e.contains("follower.toml") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_example_follower_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/systemd/follower.toml");
        let c = AgentConfig::load(&p).unwrap();
        assert_eq!(c.device_id, "pi-01");
        assert_eq!(c.groups, ["canary"]);
        assert_eq!(c.schedule.len(), 1);
        assert!(c.run_args.iter().any(|a| a == "--max-temp"));
    }
}
