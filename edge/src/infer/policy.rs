//! The resource policy of model requests — RAM available against the GGUF-derived estimate
//! plus a reserve, the hottest thermal zone or GPU against a limit — and how many layers fit
//! in a VRAM budget. Pure functions of telemetry and the model's header, no llama.cpp.

use super::{GpuLayers, InferConfig, ModelSpec};
use std::time::Duration;
use tracefleet::gguf::GgufInfo;
use tracefleet::report::Telemetry;

/// When a model request must wait, and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourcePolicy {
    /// RAM kept free for the rest of the device, bytes.
    pub ram_reserve_bytes: u64,
    /// Hottest thermal zone or GPU allowed, °C.
    pub max_temp_c: f64,
    /// Longest a request waits for resources before it is refused.
    pub defer_max: Duration,
    /// How often a deferred request checks again.
    pub poll: Duration,
}

impl Default for ResourcePolicy {
    fn default() -> Self {
        Self {
            ram_reserve_bytes: 64 << 20,
            max_temp_c: 85.0,
            defer_max: Duration::from_secs(120),
            poll: Duration::from_secs(2),
        }
    }
}

/// Why the device cannot take a model request now, or `None` when it can: `need` bytes of
/// RAM (0 when the model is resident and needs no more) against what `t` says is available,
/// and the hottest temperature against the limit.
pub fn refusal(t: &Telemetry, need: u64, limits: &ResourcePolicy) -> Option<String> {
    let mib = |b: u64| b >> 20;
    if t.mem_total_bytes > 0
        && need.saturating_add(limits.ram_reserve_bytes) > t.mem_available_bytes
    {
        return Some(format!(
            "needs ~{} MiB of RAM plus the {} MiB reserve, the device has {} MiB available",
            mib(need),
            mib(limits.ram_reserve_bytes),
            mib(t.mem_available_bytes)
        ));
    }
    let zones = t.thermal.iter().map(|z| (z.zone.clone(), z.celsius));
    let gpus = t.gpus.iter().filter_map(|g| {
        g.temperature_c
            .map(|c| (format!("GPU {}", g.name), f64::from(c)))
    });
    if let Some((zone, c)) = zones
        .chain(gpus)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|(_, c)| *c > limits.max_temp_c)
    {
        return Some(format!(
            "the device is at {c:.1} °C ({zone}), over its limit of {:.1} °C",
            limits.max_temp_c
        ));
    }
    None
}

/// Layers to offload for a model: as many of its `block_count` layers (+1 for the output
/// layer, llama.cpp's convention) as fit in `budget` bytes, each costing its share of the
/// weights and of the KV cache for `n_ctx` tokens.
pub fn gpu_layers_within(budget: u64, info: &GgufInfo, size: u64, n_ctx: u64) -> u32 {
    let Some(layers) = info.arch_uint("block_count").filter(|&l| l > 0) else {
        return 0;
    };
    let per_layer = size / (layers + 1) + info.kv_cache_bytes(n_ctx).unwrap_or(0) / layers;
    let n = budget / per_layer.max(1);
    u32::try_from(n.min(layers + 1)).unwrap_or(0)
}

pub(super) fn resolve_gpu_layers(config: &InferConfig, spec: &ModelSpec, n_ctx: u64) -> u32 {
    match config.gpu_layers {
        GpuLayers::Fixed(n) => n,
        GpuLayers::Auto { vram_fraction } => {
            if !cfg!(feature = "cuda") {
                return 0;
            }
            let t = crate::telemetry::sample();
            let Some(free) = t
                .gpus
                .first()
                .and_then(|g| Some(g.memory_total_bytes?.saturating_sub(g.memory_used_bytes?)))
            else {
                return 0;
            };
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let budget = (free as f64 * vram_fraction.clamp(0.0, 1.0)) as u64;
            gpu_layers_within(budget, &spec.info, spec.size, n_ctx)
        }
    }
}

/// Default items decoded together: four sequences per core (a decode step over several
/// sequences costs little more than over one, its weights read once), 2 to 16. Memory is
/// bounded by the kept context's size ([`super::InferConfig::ctx_tokens`]), which every
/// sequence shares, not by this.
pub fn default_parallel(cores: u32) -> u32 {
    cores.saturating_mul(4).clamp(2, 16)
}
