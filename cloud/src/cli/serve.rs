//! The daemons: `serve` (the library's [`learner::serve::serve`]) and `simulate` (many
//! simulated followers, or the broker-throughput baseline, [`learner::simulate`]).

use anyhow::Result;
use std::path::PathBuf;
use std::time::Duration;

// `learner serve`'s arguments.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The learner's TOML config (db, client_id, [broker]).
    #[arg(long, value_name = "learner.toml")]
    pub config: PathBuf,
}

/// `learner serve`.
pub fn serve(a: &ServeArgs, audit: &super::audit::Audit) -> Result<()> {
    let mut config = learner::config::LearnerConfig::load(&a.config)?;
    // `--audit-dir` above `[audit] dir`; none found: serve says so and goes on.
    if let Ok(log) = audit.log(config.audit_dir.as_deref()) {
        config.audit_dir = Some(log.dir().to_owned());
    }
    learner::serve::serve(&config)
}

#[derive(clap::Args)]
pub struct SimulateArgs {
    /// How many devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Device id prefix (`PREFIX-0000` …).
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Groups by position: `canary=10,wave1=100` puts the first 10 devices in canary, the
    /// next 100 in wave1, the rest in none.
    #[arg(long, value_delimiter = ',', value_parser = parse_group_count)]
    groups: Vec<(String, usize)>,
    /// Runs of this trace fail (repeatable).
    #[arg(long)]
    fail: Vec<String>,
    /// Run each trace once right after installing it (rollouts move on by themselves).
    #[arg(long)]
    run_on_install: bool,
    /// Reports each device sends at start (load).
    #[arg(long, default_value_t = 0)]
    reports: usize,
    /// Stop after this long (default: at SIGINT).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 30)]
    heartbeat_secs: u64,
    /// Instead: measure the broker's own QoS 1 throughput with the same load — `--devices`
    /// publishers sending `--reports` messages each of the size of a report — received by
    /// one plain subscriber (acking at once, storing nothing); print it and exit.
    #[arg(long)]
    broker_baseline: bool,
    /// The learner's config (broker).
    #[arg(long, value_name = "learner.toml")]
    config: PathBuf,
}

fn parse_group_count(s: &str) -> Result<(String, usize), String> {
    let (g, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected GROUP=COUNT"))?;
    tracefleet::wire::check_name("group", g).map_err(|e| e.to_string())?;
    Ok((
        g.to_owned(),
        n.parse()
            .map_err(|_| format!("{s:?}: expected GROUP=COUNT"))?,
    ))
}

/// `learner simulate`.
pub fn simulate(a: SimulateArgs) -> Result<()> {
    let config = learner::config::LearnerConfig::load(&a.config)?;
    if a.broker_baseline {
        let size = learner::simulate::baseline_size();
        let rate = learner::simulate::broker_baseline(&config, a.devices, a.reports, size)?;
        println!(
            "broker: {} publishers x {} QoS 1 messages of {size} bytes, {rate:.0} msg/s end to end",
            a.devices, a.reports
        );
        return Ok(());
    }
    tracefleet::wire::check_name("device id prefix", &a.prefix)?;
    let devices = a.devices;
    let sim = learner::simulate::Simulation {
        devices: a.devices,
        prefix: a.prefix,
        groups: a.groups,
        fail: a.fail,
        run_on_install: a.run_on_install,
        reports: a.reports,
        duration: a.duration,
        heartbeat_secs: a.heartbeat_secs,
    };
    let t = learner::simulate::run(&config, &sim)?;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "simulated {devices} devices: {} connected, {} traces installed, {} reports sent, {} PUBACKs",
        n(&t.connected),
        n(&t.installed),
        n(&t.reports),
        n(&t.pubacks)
    );
    Ok(())
}
