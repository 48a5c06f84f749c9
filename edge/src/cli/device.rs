//! `follower check`, `escalations` and `telemetry`: the state of this device — its store,
//! the escalations waiting to be sent, its resources now.

use anyhow::Result;
use follower::store::Store;
use std::path::Path;
use std::process::ExitCode;

/// `follower check`: SQLite integrity, and every installed trace still verifies.
pub fn check(state_dir: &Path) -> Result<ExitCode> {
    let store = Store::open(state_dir)?;
    let integrity = store.integrity_check()?;
    let mut problems = Vec::new();
    if integrity != "ok" {
        problems.push(format!("SQLite integrity check: {integrity}"));
    }
    let root = store.trust_root()?;
    let traces = store.installed_traces()?;
    for (id, version, bytes) in &traces {
        match &root {
            None => problems.push(format!(
                "{id} {version} is installed but there is no trust root"
            )),
            // As a run verifies it (a confidential trace decrypted with the identity).
            Some(_) => match follower::runner::verify_signed(&store, bytes) {
                Ok((v, _)) if v.trace.id.as_str() == id && v.trace.version == *version => {}
                Ok((v, _)) => problems.push(format!(
                    "{id} {version}: stored bytes hold {} {}",
                    v.trace.id, v.trace.version
                )),
                Err(e) => problems.push(format!("{id} {version}: {e:#}")),
            },
        }
    }
    if problems.is_empty() {
        println!(
            "ok: integrity ok, trust root {}, {} installed trace(s) verify",
            root.map_or("none".into(), |(r, _)| format!("v{}", r.version)),
            traces.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            println!("problem: {p}");
        }
        Ok(ExitCode::from(1))
    }
}

/// `follower escalations`: oldest first.
pub fn escalations(state_dir: &Path) -> Result<ExitCode> {
    let store = Store::open(state_dir)?;
    for (trace_id, reason) in store.escalations()? {
        println!("{trace_id}: {reason}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `follower telemetry [--json]`.
pub fn telemetry(json: bool) -> Result<ExitCode> {
    let t = follower::telemetry::sample();
    if json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        print_telemetry(&t);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_telemetry(t: &tracefleet::report::Telemetry) {
    #[allow(clippy::cast_precision_loss)]
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    println!(
        "memory: {:.2} GiB available of {:.2} GiB",
        gib(t.mem_available_bytes),
        gib(t.mem_total_bytes)
    );
    println!(
        "cpus: {}, load {:.2} {:.2} {:.2}",
        t.cpus, t.load[0], t.load[1], t.load[2]
    );
    if t.thermal.is_empty() {
        println!("thermal: no thermal zones");
    }
    for z in &t.thermal {
        println!("thermal: {} {:.1} °C", z.zone, z.celsius);
    }
    if t.gpus.is_empty() {
        println!("gpu: {}", t.gpu_status);
    }
    for g in &t.gpus {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
        println!(
            "gpu: {} — {} °C, memory {} / {} MiB, {} W, {} % busy",
            g.name,
            opt(g.temperature_c.map(|c| c.to_string())),
            opt(g.memory_used_bytes.map(|b| (b >> 20).to_string())),
            opt(g.memory_total_bytes.map(|b| (b >> 20).to_string())),
            opt(g.power_watts.map(|w| format!("{w:.0}"))),
            opt(g.utilization_pct.map(|u| u.to_string())),
        );
    }
}
