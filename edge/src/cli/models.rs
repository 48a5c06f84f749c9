//! `follower models list|add|verify|remove|bench`: the device's registry of GGUF models, and
//! llama-bench's measurement of one.

use super::run::InferArgs;
use anyhow::{Result, bail};
use clap::Subcommand;
use follower::infer::{BenchParams, Inference, ModelSpec};
use follower::runner::registered_spec;
use follower::store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracefleet::time::rfc3339_now;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Registered models: name, architecture, quantization, size, context, RAM needed.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a GGUF file (complete, every tensor inside it; hash against the manifest or
    /// --sha256) and register it: hard-linked, else copied, into <state-dir>/models/.
    Add {
        /// The GGUF file.
        file: PathBuf,
        /// Register under this name (default: the manifest's name for the file, else the file
        /// name without `.gguf`).
        #[arg(long)]
        name: Option<String>,
        /// The SHA-256 the file must have (hex).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// A model manifest (`models/models.toml`): the file must match its entry.
        #[arg(long, value_name = "models.toml")]
        manifest: Option<PathBuf>,
    },
    /// Hash registered models again (all, or those named); exit 1 if one differs or is broken.
    Verify {
        /// Model names.
        names: Vec<String>,
    },
    /// Unregister a model and delete its file.
    Remove {
        /// The model name.
        name: String,
    },
    /// Measure prompt processing and generation speed the way llama.cpp's `llama-bench` does
    /// (random tokens, a warm-up, mean ± sd of the repetitions).
    Bench {
        /// A registered model (default: the only one).
        name: Option<String>,
        /// A GGUF file instead of a registered model.
        #[arg(long, conflicts_with = "name", value_name = "FILE.gguf")]
        model: Option<PathBuf>,
        /// Prompt tokens (llama-bench -p).
        #[arg(short = 'p', long, default_value_t = 512)]
        n_prompt: u32,
        /// Generated tokens (llama-bench -n).
        #[arg(short = 'n', long, default_value_t = 128)]
        n_gen: u32,
        /// Repetitions (llama-bench -r).
        #[arg(short = 'r', long, default_value_t = 5)]
        repetitions: u32,
        /// Print JSON (every repetition's figures).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        infer: InferArgs,
    },
}

pub fn command(state_dir: &Path, cmd: ModelsCommand) -> Result<ExitCode> {
    use follower::models;
    let store = Store::open(state_dir)?;
    match cmd {
        ModelsCommand::List { json } => {
            let rows = store.models()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no models registered (add one with `follower models add FILE.gguf`)");
            } else {
                println!(
                    "{:<32} {:<8} {:<10} {:>9} {:>8} {:>9}  sha256",
                    "name", "arch", "quant", "size MiB", "context", "RAM MiB"
                );
                for m in rows {
                    println!(
                        "{:<32} {:<8} {:<10} {:>9} {:>8} {:>9}  {}",
                        m.name,
                        m.architecture,
                        m.quantization,
                        m.size >> 20,
                        m.context_length,
                        m.ram_needed_bytes >> 20,
                        &m.sha256[..m.sha256.len().min(16)]
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Add {
            file,
            name,
            sha256,
            manifest,
        } => {
            let row = models::add(
                &store,
                state_dir,
                &file,
                &models::AddOptions {
                    name,
                    sha256,
                    manifest,
                },
                &rfc3339_now(),
            )?;
            println!(
                "added model {} ({} {}, {} MiB, context {}, needs ~{} MiB RAM) sha256 {}",
                row.name,
                row.architecture,
                row.quantization,
                row.size >> 20,
                row.context_length,
                row.ram_needed_bytes >> 20,
                row.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Verify { names } => {
            let rows = store.models()?;
            let picked: Vec<_> = if names.is_empty() {
                rows
            } else {
                names
                    .iter()
                    .map(|n| models::find(&store, n))
                    .collect::<Result<_, _>>()?
            };
            let mut bad = 0;
            for row in &picked {
                match models::verify(&store, state_dir, row, true, &rfc3339_now()) {
                    Ok(_) => println!("ok      {}  sha256 {}", row.name, row.sha256),
                    Err(e) => {
                        bad += 1;
                        println!("FAILED  {}  {e}", row.name);
                    }
                }
            }
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ModelsCommand::Remove { name } => {
            let row = models::find(&store, &name)?;
            store.remove_model(&name)?;
            let still_used = store.models()?.iter().any(|m| m.file == row.file);
            if !still_used {
                let path = models::models_dir(state_dir).join(&row.file);
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    bail!(
                        "model {name} unregistered, but {} stays: {e}",
                        path.display()
                    );
                }
            }
            println!("removed model {name}");
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Bench {
            name,
            model,
            n_prompt,
            n_gen,
            repetitions,
            json,
            infer,
        } => {
            let spec = match (&model, &name) {
                (Some(file), _) => {
                    ModelSpec::from_file(&follower::infer::model_name_of(file), file)?
                }
                (None, n) => {
                    let row = match n {
                        Some(n) => models::find(&store, n)?,
                        None => models::only(&store)?,
                    };
                    registered_spec(&store, state_dir, &row, &rfc3339_now())?
                }
            };
            drop(store);
            let name = spec.name.clone();
            let inference = Inference::start(infer.config(), vec![spec], Some(name.clone()))?;
            let report = inference.bench(
                Some(&name),
                BenchParams {
                    n_prompt,
                    n_gen,
                    repetitions: repetitions.max(1),
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let line = |test: String, v: &[f64]| {
                    let (mean, sd) = mean_sd(v);
                    println!(
                        "{:<32} {:>7} {:>4} {:>10} {:>10.2} ± {:.2}",
                        report.model, report.n_threads, report.n_gpu_layers, test, mean, sd
                    );
                };
                println!(
                    "{:<32} {:>7} {:>4} {:>10} {:>17}",
                    "model", "threads", "ngl", "test", "tokens/s"
                );
                if n_prompt > 0 {
                    line(format!("pp{n_prompt}"), &report.prompt_tokens_per_sec);
                }
                if n_gen > 0 {
                    line(format!("tg{n_gen}"), &report.generation_tokens_per_sec);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Mean and sample standard deviation.
fn mean_sd(v: &[f64]) -> (f64, f64) {
    #[allow(clippy::cast_precision_loss)]
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}
