//! `follower eval`: how well a model answers one judgement step on a labelled set — accuracy,
//! coverage and selective accuracy at a confidence threshold, macro-F1 and the confusion
//! matrix, expected calibration error, throughput — beside the majority-class baseline. Only
//! the model runs: no other step of the trace, no file or process effect.

use super::run::InferArgs;
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use follower::exec::judgement;
use follower::infer::{Inference, ModelSpec, model_name_of};
use follower::runner::{load_trace, registered_spec};
use follower::store::Store;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tracefleet::ids::VarName;
use tracefleet::judgement::{Example, Expect, Scored, Scores};
use tracefleet::time::rfc3339_now;
use tracefleet::trace::{LlmCall, Tool};

/// Items sent to the inference thread as one batch.
const EVAL_BATCH: usize = 64;

/// Largest dataset file read (bytes).
const MAX_DATASET_BYTES: u64 = 64 << 20;

/// `follower eval` arguments.
#[derive(Args)]
pub struct EvalArgs {
    /// The trace: an installed trace id, a signed file, a compiled trace or a trace source
    /// (only the model runs, so sources need no --allow-unsigned).
    trace: PathBuf,
    /// The judgement (LLM) step to evaluate.
    #[arg(long)]
    step: u32,
    /// The labelled set: JSON Lines, each `{"vars": {"NAME": "VALUE", …}, "expect": ANSWER}`
    /// (`"expect_regex": PATTERN` instead of `expect`; for a json_schema step `expect` is an
    /// object of the fields compared).
    #[arg(long, value_name = "FILE.jsonl")]
    dataset: PathBuf,
    /// A registered model name or a GGUF file (default: the model the step names, else the
    /// only registered model).
    #[arg(long, value_name = "NAME|FILE.gguf")]
    model: Option<String>,
    /// Few-shot examples in the prompt: the step's first K examples (a step without examples
    /// takes the dataset's first K items, which are then not scored). Default: the step's
    /// `few_shot`.
    #[arg(long, value_name = "K")]
    few_shot: Option<u32>,
    /// Confidence under which an answer counts as not given (default: the step's
    /// `min_answer_confidence`; none: every answer is given).
    #[arg(long, value_name = "0..1")]
    threshold: Option<f64>,
    /// Score only the first N items.
    #[arg(long)]
    limit: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    infer: InferArgs,
}

/// What `--json` prints.
#[derive(Serialize)]
struct EvalReport {
    trace_id: String,
    trace_version: String,
    step: u32,
    model: String,
    dataset: String,
    few_shot: usize,
    #[serde(flatten)]
    scores: Scores,
    /// Items whose generation failed (counted as wrong answers).
    errors: usize,
    items_per_sec: f64,
    /// Every item's whole prompt, cached or not.
    prompt_tokens: u64,
    /// Of those, the tokens not decoded for the item itself (prefix kept in the cache or
    /// shared with other items of its batch).
    cached_prompt_tokens: u64,
    /// Every item's whole prompt over the wall time, tokens per second (the rate a
    /// one-at-a-time, cache-less decoder would need to match).
    prompt_equivalent_tokens_per_sec: f64,
    generated_tokens: u64,
    wall_secs: f64,
    /// Coverage and selective accuracy at each of [`CURVE_THRESHOLDS`] (the risk–coverage
    /// view of selective prediction, to choose a `min_answer_confidence`).
    selective_curve: Vec<CurvePoint>,
    /// Items answered otherwise than expected: how many, and the first
    /// [`tracefleet::judgement::MAX_DISAGREEMENTS_KEPT`] (what the learner's dry run sends back
    /// to the model that wrote the examples).
    wrong: usize,
    disagreements: Vec<Disagreement>,
}

/// An item the model answered otherwise than expected.
#[derive(Serialize)]
struct Disagreement {
    /// Its index among the items scored (0-based).
    item: usize,
    /// The model's answer, trimmed.
    answer: String,
}

/// Thresholds `--json` reports the selective curve at.
const CURVE_THRESHOLDS: [f64; 9] = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999];

/// One point of the selective curve.
#[derive(Serialize)]
struct CurvePoint {
    threshold: f64,
    coverage: f64,
    selective_accuracy: f64,
}

/// Runs `follower eval`.
///
/// # Errors
/// Bad input (exit 2 through `main`): the trace, step, dataset or model.
pub fn eval(state_dir: &Path, args: &EvalArgs) -> Result<ExitCode> {
    let store = Store::open(state_dir)?;
    let loaded = load_trace(&store, &args.trace, true, &mut |w| eprintln!("{w}"))?;
    let trace = loaded.trace;
    let step = trace
        .steps
        .iter()
        .find(|s| s.number == args.step)
        .ok_or_else(|| {
            anyhow!(
                "trace {} has no step {}: its steps are {}",
                trace.id,
                args.step,
                trace
                    .steps
                    .iter()
                    .map(|s| s.number.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let Tool::Llm(call) = &step.tool else {
        bail!(
            "step {} of {} is a {} step: expected an LLM (judgement) step",
            step.number,
            trace.id,
            step.tool.name()
        );
    };
    let mut call = call.clone();
    let mut items = read_dataset(&args.dataset, &call)?;
    let few_shot = args.few_shot.unwrap_or(call.judgement.few_shot) as usize;
    if call.judgement.examples.is_empty() && few_shot > 0 {
        // Shots from the dataset's head, never scored.
        if few_shot >= items.len() {
            bail!(
                "--few-shot {few_shot} with {} dataset items and no examples in the step: expected fewer shots than items",
                items.len()
            );
        }
        call.judgement.examples = items.drain(..few_shot).collect();
    } else if few_shot > call.judgement.examples.len() {
        bail!(
            "--few-shot {few_shot}: step {} has only {} examples",
            step.number,
            call.judgement.examples.len()
        );
    }
    call.judgement.few_shot = u32::try_from(few_shot).unwrap_or(u32::MAX);
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    if items.is_empty() {
        bail!("{}: no items to score", args.dataset.display());
    }
    let threshold = args
        .threshold
        .or(call.judgement.min_answer_confidence.map(f64::from));
    if let Some(t) = threshold
        && !(0.0..=1.0).contains(&t)
    {
        bail!("--threshold {t}: expected 0 to 1");
    }

    let spec = model_spec(&store, state_dir, args.model.as_deref(), &call)?;
    drop(store);
    let model = spec.name.clone();
    call.model = Some(model.clone());
    let inference = Inference::start(args.infer.config(), vec![spec], Some(model.clone()))?;
    let timeout = Duration::from_secs(u64::from(step.timeout_secs).max(60));

    let bar = indicatif::ProgressBar::new(items.len() as u64);
    let started = Instant::now();
    let (mut scored, mut errors) = (Vec::with_capacity(items.len()), 0usize);
    let (mut prompt_tokens, mut cached_prompt_tokens, mut generated_tokens) = (0u64, 0u64, 0u64);
    // In batches (prefix shared, items decoded together); the bar moves between them.
    for chunk in items.chunks(EVAL_BATCH) {
        let requests = chunk
            .iter()
            .map(|item| {
                judgement::request(&call, |v| item.var(v), timeout)
                    .map_err(|v| anyhow!("variable `{{{v}}}` has no value"))
            })
            .collect::<Result<Vec<_>>>()?;
        let answers = match inference.generate_batch(&requests) {
            Ok(answers) => answers,
            Err(e) => bail!("the model could not run: {e}"),
        };
        for (item, generated) in chunk.iter().zip(answers) {
            let (answer, confidence) = match generated {
                Ok(g) => {
                    prompt_tokens += u64::from(g.usage.prompt_tokens);
                    cached_prompt_tokens += u64::from(g.usage.cached_prompt_tokens);
                    generated_tokens += u64::from(g.usage.completion_tokens);
                    (g.text, g.usage.answer_confidence)
                }
                Err(e) => {
                    errors += 1;
                    tracing::warn!(error = %e, "an item's generation failed");
                    (format!("(error: {e})"), Some(0.0))
                }
            };
            scored.push(Scored {
                expected: item.expect.label().to_owned(),
                correct: item.expect.agrees(&answer),
                answer: answer.trim().to_owned(),
                confidence,
            });
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let wall_secs = started.elapsed().as_secs_f64();
    let wrong: Vec<Disagreement> = scored
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.correct)
        .map(|(item, s)| Disagreement {
            item,
            answer: s.answer.clone(),
        })
        .collect();
    let scores = Scores::compute(&scored, threshold);
    let selective_curve = CURVE_THRESHOLDS
        .iter()
        .map(|&t| {
            let s = Scores::compute(&scored, Some(t));
            CurvePoint {
                threshold: t,
                coverage: s.coverage,
                selective_accuracy: s.selective_accuracy,
            }
        })
        .collect();
    let report = EvalReport {
        trace_id: trace.id.to_string(),
        trace_version: trace.version.to_string(),
        step: step.number,
        model,
        dataset: args.dataset.display().to_string(),
        few_shot,
        items_per_sec: if wall_secs > 0.0 {
            scored.len() as f64 / wall_secs
        } else {
            0.0
        },
        scores,
        errors,
        prompt_tokens,
        cached_prompt_tokens,
        prompt_equivalent_tokens_per_sec: if wall_secs > 0.0 {
            prompt_tokens as f64 / wall_secs
        } else {
            0.0
        },
        generated_tokens,
        wall_secs,
        selective_curve,
        wrong: wrong.len(),
        disagreements: wrong
            .into_iter()
            .take(tracefleet::judgement::MAX_DISAGREEMENTS_KEPT)
            .collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &EvalReport) {
    let s = &r.scores;
    println!(
        "{} {} step {} · model {} · {} · few-shot {}",
        r.trace_id, r.trace_version, r.step, r.model, r.dataset, r.few_shot
    );
    println!(
        "items {}  answered {}  coverage {:.3}{}",
        s.items,
        s.answered,
        s.coverage,
        s.threshold
            .map_or_else(String::new, |t| format!(" (confidence ≥ {t:.2})"))
    );
    println!(
        "accuracy {:.3}  selective accuracy {:.3}  majority baseline {:.3}  macro-F1 {:.3}  ECE {}",
        s.accuracy,
        s.selective_accuracy,
        s.majority_baseline,
        s.macro_f1,
        s.ece.map_or_else(|| "-".into(), |e| format!("{e:.3}"))
    );
    println!(
        "{:.2} items/s  prompt tokens {} ({} cached)  generated tokens {}  {:.1} s{}",
        r.items_per_sec,
        r.prompt_tokens,
        r.cached_prompt_tokens,
        r.generated_tokens,
        r.wall_secs,
        if r.errors > 0 {
            format!("  ({} items failed to generate)", r.errors)
        } else {
            String::new()
        }
    );
    let answers: std::collections::BTreeSet<&str> = s
        .confusion
        .values()
        .flat_map(|row| row.keys().map(String::as_str))
        .collect();
    if answers.len() <= 12 {
        println!("confusion (rows: expected, columns: answered):");
        let w = answers.iter().map(|a| a.len()).max().unwrap_or(4).max(6);
        print!("  {:>w$}", "");
        for a in &answers {
            print!(" {a:>w$}");
        }
        println!();
        for (expected, row) in &s.confusion {
            print!("  {expected:>w$}");
            for a in &answers {
                print!(" {:>w$}", row.get(*a).copied().unwrap_or(0));
            }
            println!();
        }
    }
}

/// The model to evaluate with: a GGUF file, a registered name, else the step's model or the
/// only registered one.
fn model_spec(
    store: &Store,
    state_dir: &Path,
    model: Option<&str>,
    call: &LlmCall,
) -> Result<ModelSpec> {
    let now = rfc3339_now();
    match model {
        Some(m) if Path::new(m).is_file() => {
            let file = Path::new(m);
            Ok(ModelSpec::from_file(&model_name_of(file), file)?)
        }
        Some(name) => {
            let row = follower::models::find(store, name)?;
            registered_spec(store, state_dir, &row, &now)
        }
        None => {
            let row = match &call.model {
                Some(name) => follower::models::find(store, name)?,
                None => follower::models::only(store)?,
            };
            registered_spec(store, state_dir, &row, &now)
        }
    }
    .context("the model to evaluate with (--model NAME|FILE.gguf)")
}

/// One labelled item as read from the dataset.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    #[serde(default)]
    vars: std::collections::BTreeMap<String, serde_json::Value>,
    expect: Option<serde_json::Value>,
    expect_regex: Option<String>,
}

/// Reads a JSON Lines labelled set for `call`: every line an item binding every variable of
/// the step's prompt and system message.
fn read_dataset(path: &Path, call: &LlmCall) -> Result<Vec<Example>> {
    let bytes = follower::files::read_limited(path, MAX_DATASET_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: not UTF-8 (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let used = call.message_variables();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let raw: RawItem = serde_json::from_str(line).map_err(|e| {
            anyhow!("{at}: expected {{\"vars\": {{…}}, \"expect\": …}} as JSON: {e}")
        })?;
        let mut vars = Vec::new();
        for (name, value) in raw.vars {
            let value = match value {
                serde_json::Value::String(s) => s,
                other @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                    other.to_string()
                }
                other => bail!("{at}: variable `{name}`: expected text, found {other}"),
            };
            let name: VarName = name.parse().map_err(|e| anyhow!("{at}: {e}"))?;
            vars.push((name, value));
        }
        vars.sort();
        if let Some(missing) = used
            .iter()
            .find(|u| !vars.iter().any(|(v, _)| v.as_str() == **u))
        {
            bail!("{at}: the item does not bind `{{{missing}}}`, which the step's prompt uses");
        }
        let expect = match (raw.expect, raw.expect_regex) {
            (Some(serde_json::Value::Object(fields)), None) if call.json_schema.is_some() => {
                Expect::Fields(serde_json::Value::Object(fields).to_string())
            }
            (Some(serde_json::Value::String(s)), None) if call.json_schema.is_none() => {
                Expect::Text(s)
            }
            (None, Some(r)) => {
                regex::Regex::new(&r).map_err(|e| anyhow!("{at}: expect_regex: {e}"))?;
                Expect::Regex(r)
            }
            (Some(other), None) => bail!(
                "{at}: expect is {other}: expected {}",
                if call.json_schema.is_some() {
                    "an object of the fields compared (the step has a json_schema)"
                } else {
                    "the answer as a string"
                }
            ),
            _ => bail!("{at}: expected exactly one of `expect` and `expect_regex`"),
        };
        out.push(Example { vars, expect });
    }
    Ok(out)
}
