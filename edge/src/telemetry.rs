//! What the device has to work with: memory and load from `/proc`, temperatures from
//! `/sys/class/thermal`, NVIDIA GPUs through NVML (`nvml-wrapper`, which loads
//! `libnvidia-ml.so` at run time).
//!
//! Nothing here fails: a device without thermal zones reports none, one without an NVIDIA
//! driver reports `gpu_status: "absent: …"` once, without logging an error per sample.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use std::path::Path;
use std::sync::OnceLock;
use tracefleet::report::{GpuSample, Telemetry, ThermalZone};

/// Where the NVIDIA kernel driver shows itself; without it NVML cannot work, and the
/// library search that `Nvml::init` does (some 90 failed opens) is skipped.
const NVIDIA_DRIVER_PROC: &str = "/proc/driver/nvidia";

/// NVML, loaded once per process (or why not).
fn nvml() -> &'static Result<Nvml, String> {
    static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();
    NVML.get_or_init(|| {
        if !Path::new(NVIDIA_DRIVER_PROC).exists() {
            return Err(format!("no NVIDIA driver ({NVIDIA_DRIVER_PROC} missing)"));
        }
        Nvml::init().map_err(|e| e.to_string())
    })
}

/// Samples the device now.
pub fn sample() -> Telemetry {
    let (mem_total_bytes, mem_available_bytes) = std::fs::read_to_string("/proc/meminfo")
        .map(|t| parse_meminfo(&t))
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| parse_loadavg(&t))
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    let (gpus, gpu_status) = match nvml() {
        Ok(nvml) => (gpu_samples(nvml), "present".to_owned()),
        Err(e) => (Vec::new(), format!("absent: NVML unavailable ({e})")),
    };
    Telemetry {
        mem_total_bytes,
        mem_available_bytes,
        load,
        cpus,
        thermal: thermal_zones(Path::new("/sys/class/thermal")),
        gpus,
        gpu_status,
    }
}

fn gpu_samples(nvml: &Nvml) -> Vec<GpuSample> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok())
        .map(|d| {
            let memory = d.memory_info().ok();
            GpuSample {
                name: d.name().unwrap_or_else(|_| "unknown".into()),
                temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                power_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                utilization_pct: d.utilization_rates().ok().map(|u| u.gpu),
            }
        })
        .collect()
}

/// `(MemTotal, MemAvailable)` in bytes from /proc/meminfo text (values are in kB).
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb.saturating_mul(1024))
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// Physical cores this process may run on: the distinct (package, core) pairs of the CPUs in
/// its affinity set, from `/sys/devices/system/cpu/cpuN/topology`; at most the available
/// parallelism, and that when the topology cannot be read. llama.cpp runs best with one thread
/// per physical core (SMT siblings share the vector units it saturates).
pub fn physical_cores() -> u32 {
    let available = std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| parse_cpu_list(v.trim()))
        })
        .unwrap_or_default();
    let cores = count_cores(Path::new("/sys/devices/system/cpu"), &allowed);
    if cores == 0 {
        available
    } else {
        cores.min(available)
    }
}

/// CPU numbers in a kernel CPU list (`0-3,8,10-11`).
pub fn parse_cpu_list(text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
            // A hostile or broken list cannot make this loop long: CPUs number in thousands.
            out.extend((a..=b.min(a.saturating_add(65_535))).take(65_536));
        }
    }
    out
}

/// Distinct (package, core) pairs among `cpus` under a sysfs cpu directory; 0 when unreadable.
pub fn count_cores(root: &Path, cpus: &[u32]) -> u32 {
    let mut seen = std::collections::BTreeSet::new();
    for cpu in cpus {
        let topo = root.join(format!("cpu{cpu}/topology"));
        let read = |f: &str| {
            std::fs::read_to_string(topo.join(f))
                .ok()
                .map(|s| s.trim().to_owned())
        };
        if let (Some(package), Some(core)) = (read("physical_package_id"), read("core_id")) {
            seen.insert((package, core));
        }
    }
    u32::try_from(seen.len()).unwrap_or(u32::MAX)
}

/// The three load averages from /proc/loadavg text.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

/// Every `thermal_zone*` under `root` with a readable temperature (millidegrees Celsius).
pub fn thermal_zones(root: &Path) -> Vec<ThermalZone> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut zones: Vec<(String, ThermalZone)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| {
            let dir = e.path();
            let milli: i64 = std::fs::read_to_string(dir.join("temp"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let zone = std::fs::read_to_string(dir.join("type")).map_or_else(
                |_| e.file_name().to_string_lossy().into_owned(),
                |t| t.trim().to_owned(),
            );
            #[allow(clippy::cast_precision_loss)]
            let celsius = milli as f64 / 1000.0;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                ThermalZone { zone, celsius },
            ))
        })
        .collect();
    zones.sort_by(|a, b| a.0.cmp(&b.0));
    zones.into_iter().map(|(_, z)| z).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let meminfo = "MemTotal:        1919664 kB\nMemFree:          101216 kB\nMemAvailable:     912344 kB\n";
        assert_eq!(parse_meminfo(meminfo), (1_919_664 * 1024, 912_344 * 1024));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/190 1234\n"),
            Some([0.52, 0.58, 0.59])
        );
        assert_eq!(parse_loadavg("0.5"), None);
    }

    #[test]
    fn thermal_zones_are_read_in_order_and_broken_ones_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for (name, ty, temp) in [
            ("thermal_zone1", Some("gpu-thermal"), "41250"),
            ("thermal_zone0", Some("cpu-thermal"), "52600\n"),
            ("thermal_zone2", None, "38000"),
            ("thermal_zone3", Some("broken"), "n/a"),
            ("cooling_device0", Some("fan"), "1"),
        ] {
            let z = dir.path().join(name);
            std::fs::create_dir(&z).unwrap();
            std::fs::write(z.join("temp"), temp).unwrap();
            if let Some(t) = ty {
                std::fs::write(z.join("type"), format!("{t}\n")).unwrap();
            }
        }
        let zones = thermal_zones(dir.path());
        let got: Vec<(&str, f64)> = zones.iter().map(|z| (z.zone.as_str(), z.celsius)).collect();
        assert_eq!(
            got,
            vec![
                ("cpu-thermal", 52.6),
                ("gpu-thermal", 41.25),
                ("thermal_zone2", 38.0)
            ]
        );
        assert!(thermal_zones(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn physical_cores_count_smt_siblings_once() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list(""), Vec::<u32>::new());
        let dir = tempfile::tempdir().unwrap();
        // Two cores with two hardware threads each: cpu0/cpu2 and cpu1/cpu3 are siblings.
        for (cpu, core) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
            let t = dir.path().join(format!("cpu{cpu}/topology"));
            std::fs::create_dir_all(&t).unwrap();
            std::fs::write(t.join("physical_package_id"), "0\n").unwrap();
            std::fs::write(t.join("core_id"), format!("{core}\n")).unwrap();
        }
        assert_eq!(count_cores(dir.path(), &[0, 1, 2, 3]), 2);
        assert_eq!(count_cores(dir.path(), &[0, 2]), 1);
        assert_eq!(count_cores(dir.path(), &[7]), 0);
        let here = physical_cores();
        assert!(here >= 1 && here <= sample().cpus.max(1));
    }

    #[test]
    fn a_sample_of_this_machine_has_memory_and_cpus() {
        let t = sample();
        assert!(t.mem_total_bytes > 0 && t.mem_available_bytes <= t.mem_total_bytes);
        assert!(t.cpus >= 1);
        assert!(t.gpu_status == "present" || t.gpu_status.starts_with("absent: "));
        assert_eq!(t.gpu_status == "present", nvml().is_ok());
    }
}
