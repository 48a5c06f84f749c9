//! In-process inference through llama.cpp (`llama-cpp-2`). The only module that sees its types.
//!
//! One inference thread owns the backend, the model and every context; the rest of the
//! follower talks to it through [`Inference`], a channel handle. Requests are served one at a
//! time in arrival order (FIFO: steps running in parallel take turns). This follows what
//! llama.cpp requires: `LlamaBackend::init()` succeeds once per
//! process (we keep it in a `OnceLock`), contexts borrow the model and must not be created
//! concurrently, and a grammar sampler's `sample()` already accepts the token (accepting again
//! aborts).
//!
//! Models are loaded lazily, on the first request that needs one, memory-mapped, and kept for
//! the next request; one model is resident at a time (asking for another unloads the first),
//! and a model idle for [`InferConfig::idle_unload`] is unloaded. While a model is resident the
//! thread keeps one context for it ([`InferConfig::ctx_tokens`], counted in the RAM estimate)
//! whose KV cache carries a prompt prefix from one request to the next, and decodes the items
//! of a batch ([`Inference::generate_batch`]) together: see `batch.rs`.
//! [`InferConfig::prompt_cache`] `false` keeps the earlier path, a fresh context per request. Every model was checked
//! before the thread sees it ([`ModelSpec::from_file`]: a complete GGUF file, every tensor
//! inside it).
//!
//! Resource policy, checked before every request: the model must fit in the RAM the device
//! has available (an estimate from the GGUF header: weights, f16 KV cache for the context, a
//! compute reserve) plus [`ResourcePolicy::ram_reserve_bytes`], and no thermal zone or GPU may
//! be over [`ResourcePolicy::max_temp_c`]. Otherwise the request is deferred — re-checked every
//! [`ResourcePolicy::poll`] — for up to [`ResourcePolicy::defer_max`] (and never past the
//! step's timeout), then refused with [`InferError::Deferred`] saying why; the step's
//! `on_error` policy (retry, escalate, …) then applies.
//!
//! Threads are set explicitly (default: the physical cores), because llama.cpp's default of 4
//! oversubscribes small devices and collapses throughput under contention. With the `cuda`
//! feature, `n_gpu_layers` is sized to a share of the GPU's free memory ([`GpuLayers::Auto`]).

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tracefleet::gguf::GgufInfo;
use tracefleet::report::LlmUsage;

mod batch;
mod policy;
mod prompt;
#[cfg(test)]
mod tests;

use policy::resolve_gpu_layers;
pub use policy::{ResourcePolicy, default_parallel, gpu_layers_within, refusal};
#[cfg(test)]
use prompt::neutralise_specials;
use prompt::{build_prompt, masked_softmax, special_token_texts};

use crate::effects::{GenerateRequest, Generation};
use crate::models::ram_needed;

/// Tokens decoded per `decode` call while reading the prompt.
const PROMPT_BATCH: usize = 512;

/// How many layers llama.cpp offloads to the GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GpuLayers {
    /// Exactly this many (0 = CPU only).
    Fixed(u32),
    /// As many as fit in this share (0..=1) of the first GPU's free memory (NVML); 0 without the
    /// `cuda` feature or without a GPU.
    Auto {
        /// Share of free VRAM the model may take.
        vram_fraction: f64,
    },
}

/// How models are run.
#[derive(Debug, Clone, PartialEq)]
pub struct InferConfig {
    /// CPU threads for generation and prompt processing.
    pub n_threads: u32,
    /// GPU offload.
    pub gpu_layers: GpuLayers,
    /// Unload a model after this long without requests (`None`: keep it).
    pub idle_unload: Option<Duration>,
    /// Resource policy.
    pub limits: ResourcePolicy,
    /// Keep a context per loaded model and its KV cache between requests, reusing the longest
    /// common prompt prefix (`false`: a fresh context per request and no batching, the code
    /// before prefix reuse, kept to measure against).
    pub prompt_cache: bool,
    /// Items of a batch ([`Inference::generate_batch`]) decoded together as parallel
    /// sequences, 1 to 63.
    pub parallel: u32,
    /// Cells (tokens) of the kept context's KV cache, shared by the prefix and every parallel
    /// sequence; counted in the RAM estimate. A batch that needs more grows it (up to the
    /// model's training context), resetting the cache.
    pub ctx_tokens: u32,
}

/// The kept context's default size, tokens.
pub const DEFAULT_CTX_TOKENS: u32 = 4096;

impl Default for InferConfig {
    /// Physical cores, automatic GPU layers in 80% of free VRAM, unload after 5 minutes idle,
    /// default limits, prompt cache on, [`default_parallel`] sequences in a context of
    /// [`DEFAULT_CTX_TOKENS`].
    fn default() -> Self {
        let n_threads = crate::telemetry::physical_cores();
        Self {
            n_threads,
            gpu_layers: GpuLayers::Auto { vram_fraction: 0.8 },
            idle_unload: Some(Duration::from_secs(300)),
            limits: ResourcePolicy::default(),
            prompt_cache: true,
            parallel: default_parallel(n_threads),
            ctx_tokens: DEFAULT_CTX_TOKENS,
        }
    }
}

/// A model the inference thread may load: checked before it gets here.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name steps ask for.
    pub name: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// Its header.
    pub info: GgufInfo,
    /// File size, bytes.
    pub size: u64,
}

impl ModelSpec {
    /// Checks `path` (a complete GGUF file: header readable, every tensor's data inside the
    /// file) and describes it as model `name`.
    ///
    /// # Errors
    /// [`InferError::BadModelFile`] saying what was expected and what was found.
    pub fn from_file(name: &str, path: &Path) -> Result<Self, InferError> {
        let info = crate::models::check_file(path).map_err(|e| InferError::BadModelFile {
            path: path.to_owned(),
            reason: match e {
                crate::models::ModelError::BadFile { reason, .. } => reason,
                other => other.to_string(),
            },
        })?;
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        Ok(Self {
            name: name.to_owned(),
            path: path.to_owned(),
            info,
            size,
        })
    }
}

/// The name a model file is known by: its file name without `.gguf`.
pub fn model_name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_owned())
        .unwrap_or_default()
}

/// Why inference failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// The model file is not a usable GGUF file.
    #[error("model file {path}: {reason}")]
    BadModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong: expected vs found.
        reason: String,
    },
    /// llama.cpp refused the model or a request.
    #[error("llama.cpp: {0}")]
    Llama(String),
    /// The step asked for a model this run does not have.
    #[error("model `{asked}` is not available to this run: it has {available}")]
    UnknownModel {
        /// Asked for.
        asked: String,
        /// Configured.
        available: String,
    },
    /// The prompt does not fit in the model's context.
    #[error(
        "prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the model's context of {n_ctx_train} tokens"
    )]
    ContextOverflow {
        /// Prompt length in tokens.
        prompt_tokens: usize,
        /// Requested generation bound.
        max_tokens: u32,
        /// The model's training context.
        n_ctx_train: u32,
    },
    /// Past the step's timeout.
    #[error("generation timed out after {0:?}")]
    Timeout(Duration),
    /// The grammar did not parse.
    #[error("the step's GBNF grammar was refused by llama.cpp: {0}")]
    Grammar(String),
    /// The step's JSON Schema could not be turned into a grammar.
    #[error("llama.cpp could not turn the step's json_schema into a grammar: {0}")]
    Schema(String),
    /// The device lacked the resources for longer than the deferral allows.
    #[error("model `{model}` deferred for {waited:?}, then refused: {reason}")]
    Deferred {
        /// The model.
        model: String,
        /// How long the request waited.
        waited: Duration,
        /// What was short, with the figures.
        reason: String,
    },
    /// The inference thread is gone.
    #[error("the inference thread stopped")]
    ThreadGone,
}

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

fn backend() -> Result<&'static LlamaBackend, InferError> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| InferError::Llama(e.clone()))
}

/// `follower models bench` parameters (llama-bench's `-p`, `-n`, `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchParams {
    /// Prompt tokens per prompt-processing test (llama-bench `pp512`).
    pub n_prompt: u32,
    /// Tokens per generation test (llama-bench `tg128`).
    pub n_gen: u32,
    /// Repetitions of each test.
    pub repetitions: u32,
}

/// Throughput of each repetition, tokens per second.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchReport {
    /// Model name.
    pub model: String,
    /// Threads used.
    pub n_threads: u32,
    /// Layers offloaded.
    pub n_gpu_layers: u32,
    /// Seconds the model took to load (0 when it was resident).
    pub load_secs: f64,
    /// Prompt processing, one figure per repetition.
    pub prompt_tokens_per_sec: Vec<f64>,
    /// Generation, one figure per repetition.
    pub generation_tokens_per_sec: Vec<f64>,
}

/// One result per request of a batch, or why the batch did not run.
type BatchResult = Result<Vec<Result<Generation, InferError>>, InferError>;

enum Job {
    Generate(Vec<GenerateRequest>, mpsc::Sender<BatchResult>),
    Bench(
        Option<String>,
        BenchParams,
        mpsc::Sender<Result<BenchReport, InferError>>,
    ),
}

impl Job {
    fn model(&self) -> Option<&str> {
        match self {
            Job::Generate(reqs, _) => reqs.first().and_then(|r| r.model.as_deref()),
            Job::Bench(m, _, _) => m.as_deref(),
        }
    }

    fn fail(self, e: InferError) {
        match self {
            Job::Generate(_, reply) => drop(reply.send(Err(e))),
            Job::Bench(_, _, reply) => drop(reply.send(Err(e))),
        }
    }
}

/// What the inference thread does after a model's session.
enum Next {
    /// Serve this job (for another model).
    Job(Job),
    /// The model was idle: unload it.
    Idle,
    /// Every handle is gone.
    Stop,
}

/// A handle to the inference thread. Dropping it stops the thread and frees the model.
pub struct Inference {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    names: Vec<String>,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inference({})", self.names.join(", "))
    }
}

impl Inference {
    /// Starts the inference thread for `models` (loaded when first asked for). `default` is
    /// the model a request without a name gets.
    ///
    /// # Errors
    /// [`InferError::Llama`] when the thread cannot start.
    pub fn start(
        config: InferConfig,
        models: Vec<ModelSpec>,
        default: Option<String>,
    ) -> Result<Self, InferError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let names = models.iter().map(|m| m.name.clone()).collect();
        let worker = Worker {
            config,
            models,
            default,
        };
        let thread = std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || worker.run(&rx))
            .map_err(|e| InferError::Llama(format!("cannot start the inference thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            names,
        })
    }

    /// The models this handle can serve.
    pub fn model_names(&self) -> &[String] {
        &self.names
    }

    /// Runs one request on the inference thread and waits for the answer.
    ///
    /// # Errors
    /// See [`InferError`].
    pub fn generate(&self, request: &GenerateRequest) -> Result<Generation, InferError> {
        self.generate_batch(std::slice::from_ref(request))?
            .pop()
            .unwrap_or(Err(InferError::ThreadGone))
    }

    /// Runs `requests` as one batch: their shared prompt prefix decoded once (or kept from
    /// the cache), the items decoded together as up to [`InferConfig::parallel`] sequences.
    /// They run on the first request's model. One result per request, in order; an item's
    /// failure is its own.
    ///
    /// # Errors
    /// Why the whole batch did not run: the model is unknown, deferred and refused, or it
    /// could not be loaded ([`InferError`]).
    pub fn generate_batch(
        &self,
        requests: &[GenerateRequest],
    ) -> Result<Vec<Result<Generation, InferError>>, InferError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let (reply_tx, reply_rx) = mpsc::channel();
        self.send(Job::Generate(requests.to_vec(), reply_tx))?;
        reply_rx.recv().map_err(|_| InferError::ThreadGone)?
    }

    /// Measures prompt processing and generation speed the way llama.cpp's `llama-bench`
    /// does (random tokens; `n_prompt` tokens decoded in one batch, then `n_gen` tokens one
    /// at a time; a warm-up run first; the KV cache cleared before each repetition).
    ///
    /// # Errors
    /// See [`InferError`].
    pub fn bench(
        &self,
        model: Option<&str>,
        params: BenchParams,
    ) -> Result<BenchReport, InferError> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.send(Job::Bench(model.map(str::to_owned), params, reply_tx))?;
        reply_rx.recv().map_err(|_| InferError::ThreadGone)?
    }

    fn send(&self, job: Job) -> Result<(), InferError> {
        self.tx
            .as_ref()
            .ok_or(InferError::ThreadGone)?
            .send(job)
            .map_err(|_| InferError::ThreadGone)
    }
}

impl Drop for Inference {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Loaded {
    name: String,
    spec: ModelSpec,
    model: LlamaModel,
    specials: Vec<String>,
    n_gpu_layers: u32,
}

struct Worker {
    config: InferConfig,
    models: Vec<ModelSpec>,
    default: Option<String>,
}

impl Worker {
    /// Serves jobs: loads the model the next job asks for (the previous one is dropped
    /// first), then serves that model's jobs in a session that keeps its context.
    fn run(self, rx: &mpsc::Receiver<Job>) {
        let mut pending: Option<Job> = None;
        loop {
            let job = match pending.take() {
                Some(j) => j,
                None => match rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                },
            };
            let started = Instant::now();
            let loaded = match self.load_for(&job) {
                Ok(l) => l,
                Err(e) => {
                    job.fail(e);
                    continue;
                }
            };
            let load_secs = started.elapsed().as_secs_f64();
            match self.session(&loaded, job, load_secs, rx) {
                Next::Job(j) => pending = Some(j),
                Next::Idle => {
                    tracing::info!(model = %loaded.name, "model unloaded after being idle")
                }
                Next::Stop => break,
            }
        }
    }

    /// Serves `first` and every following job for the same model with one kept context;
    /// returns on a job for another model, after [`InferConfig::idle_unload`], or when every
    /// handle is gone.
    fn session(
        &self,
        loaded: &Loaded,
        first: Job,
        load_secs: f64,
        rx: &mpsc::Receiver<Job>,
    ) -> Next {
        let mut kept: Option<batch::Kept<'_>> = None;
        let mut job = first;
        let mut load_secs = load_secs;
        loop {
            match job {
                Job::Generate(reqs, reply) => {
                    let _ = reply.send(self.serve(loaded, &mut kept, &reqs));
                }
                Job::Bench(_, params, reply) => {
                    // Its own context: free the kept one's memory first.
                    kept = None;
                    let deadline = Instant::now() + self.config.limits.defer_max;
                    let result = self
                        .wait_for(&loaded.name, 0, deadline)
                        .and_then(|()| backend())
                        .and_then(|b| bench(b, loaded, self.config.n_threads, params, load_secs));
                    let _ = reply.send(result);
                }
            }
            load_secs = 0.0;
            let next = match self.config.idle_unload {
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(idle) => rx.recv_timeout(idle),
            };
            job = match next {
                Ok(j) if j.model().or(self.default.as_deref()) == Some(loaded.name.as_str()) => j,
                Ok(j) => return Next::Job(j),
                Err(mpsc::RecvTimeoutError::Timeout) => return Next::Idle,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Next::Stop,
            };
        }
    }

    /// One batch of generation requests on the resident model.
    fn serve<'m>(
        &self,
        loaded: &'m Loaded,
        kept: &mut Option<batch::Kept<'m>>,
        reqs: &[GenerateRequest],
    ) -> BatchResult {
        let timeout = reqs.iter().map(|r| r.timeout).min().unwrap_or_default();
        let deadline = Instant::now() + timeout;
        let backend = backend()?;
        let threads = self.config.n_threads;
        if !self.config.prompt_cache {
            *kept = None;
            let max_tokens = reqs.iter().map(|r| r.max_tokens).max().unwrap_or(0);
            let need = loaded
                .spec
                .info
                .kv_cache_bytes(u64::from(max_tokens) + 512)
                .unwrap_or(0);
            self.wait_for(&loaded.name, need, deadline)?;
            return Ok(reqs
                .iter()
                .map(|r| generate(backend, loaded, threads, r, Instant::now() + r.timeout))
                .collect());
        }
        let room = |n_ctx: u32| {
            let need = loaded
                .spec
                .info
                .kv_cache_bytes(u64::from(n_ctx))
                .unwrap_or(0);
            self.wait_for(&loaded.name, need, deadline)
        };
        self.wait_for(&loaded.name, 0, deadline)?;
        let settings = batch::BatchSettings {
            n_threads: threads,
            parallel: self.config.parallel,
            ctx_tokens: self.config.ctx_tokens,
        };
        Ok(batch::generate_batch(
            backend, loaded, kept, settings, reqs, &room,
        ))
    }

    /// Loads the model `job` asks for once the device can take it (the resource policy, with
    /// the context the job needs counted).
    fn load_for(&self, job: &Job) -> Result<Loaded, InferError> {
        let spec = self.resolve(job.model())?;
        let n_ctx = match job {
            Job::Generate(reqs, _) if !self.config.prompt_cache => {
                u64::from(reqs.iter().map(|r| r.max_tokens).max().unwrap_or(0)) + 512
            }
            Job::Generate(..) => u64::from(self.config.ctx_tokens),
            Job::Bench(_, p, _) => u64::from(p.n_prompt + p.n_gen),
        };
        let deadline = match job {
            Job::Generate(reqs, _) => {
                Instant::now() + reqs.iter().map(|r| r.timeout).min().unwrap_or_default()
            }
            Job::Bench(..) => Instant::now() + self.config.limits.defer_max,
        };
        self.wait_for(
            &spec.name,
            ram_needed(&spec.info, spec.size, n_ctx),
            deadline,
        )?;
        let backend = backend()?;
        let n_gpu_layers = resolve_gpu_layers(&self.config, &spec, n_ctx);
        let model = load(backend, &spec, n_gpu_layers)?;
        Ok(Loaded {
            name: spec.name.clone(),
            specials: special_token_texts(&model),
            spec,
            model,
            n_gpu_layers,
        })
    }

    /// The model `asked` names, or the default.
    fn resolve(&self, asked: Option<&str>) -> Result<ModelSpec, InferError> {
        let name = asked
            .or(self.default.as_deref())
            .ok_or_else(|| InferError::UnknownModel {
                asked: "(the step names none)".into(),
                available: self.available(),
            })?;
        self.models
            .iter()
            .find(|m| m.name == name)
            .cloned()
            .ok_or_else(|| InferError::UnknownModel {
                asked: name.to_owned(),
                available: self.available(),
            })
    }

    /// Waits until the device can take `need` more bytes of RAM for model `name` and is not
    /// too hot (see the module docs): re-checked every [`ResourcePolicy::poll`], refused
    /// with the reason past [`ResourcePolicy::defer_max`] or `deadline`.
    fn wait_for(&self, name: &str, need: u64, deadline: Instant) -> Result<(), InferError> {
        let started = Instant::now();
        let give_up = deadline.min(started + self.config.limits.defer_max);
        loop {
            let Some(reason) = refusal(&crate::telemetry::sample(), need, &self.config.limits)
            else {
                return Ok(());
            };
            if Instant::now() + self.config.limits.poll > give_up {
                return Err(InferError::Deferred {
                    model: name.to_owned(),
                    waited: started.elapsed(),
                    reason,
                });
            }
            tracing::info!(model = %name, %reason, "model request deferred");
            std::thread::sleep(self.config.limits.poll);
        }
    }

    fn available(&self) -> String {
        if self.models.is_empty() {
            "no model (configure one: --model FILE.gguf, TRACEFLEET_MODEL, or `follower models add`)".into()
        } else {
            self.models
                .iter()
                .map(|m| format!("`{}`", m.name))
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// Loads `spec` (memory-mapped), with a progress bar on a terminal.
fn load(
    backend: &LlamaBackend,
    spec: &ModelSpec,
    n_gpu_layers: u32,
) -> Result<LlamaModel, InferError> {
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(100);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {percent}%")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(spec.name.clone());
    let progress = bar.clone();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(n_gpu_layers)
        .with_progress_callback(move |p| {
            progress.set_position((p.clamp(0.0, 1.0) * 100.0) as u64);
            true
        });
    let model = LlamaModel::load_from_file(backend, &spec.path, &params).map_err(|e| {
        InferError::Llama(format!(
            "cannot load {}: {e} (corrupt or unsupported GGUF?)",
            spec.path.display()
        ))
    });
    bar.finish_and_clear();
    let model = model?;
    tracing::info!(
        model = %spec.name,
        n_gpu_layers,
        secs = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(model)
}

/// A small deterministic generator for benchmark tokens (xorshift64*).
struct TokenRng(u64);

impl TokenRng {
    fn next(&mut self, n_vocab: i32) -> LlamaToken {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33;
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        LlamaToken::new((r % u64::from(n_vocab.max(1).unsigned_abs())) as i32)
    }
}

fn bench(
    backend: &LlamaBackend,
    loaded: &Loaded,
    n_threads: u32,
    params: BenchParams,
    load_secs: f64,
) -> Result<BenchReport, InferError> {
    let model = &loaded.model;
    let n_vocab = model.n_vocab();
    let bos = model.vocab().should_add_bos().then(|| model.vocab().bos());
    let threads = i32::try_from(n_threads.max(1)).unwrap_or(1);
    // llama-bench's defaults: n_batch 2048, n_ubatch 512, n_ctx = n_prompt + n_gen.
    let n_ctx = (params.n_prompt + params.n_gen).max(16);
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(2048)
        .with_n_ubatch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model
        .new_context(backend, ctx_params)
        .map_err(|e| llama_err("creating a context")(&e))?;
    let mut rng = TokenRng(0x9E37_79B9_7F4A_7C15);
    let prompt = |ctx: &mut LlamaContext<'_>, n: u32, rng: &mut TokenRng| {
        let n = usize::try_from(n).unwrap_or(0);
        let mut batch = LlamaBatch::new(n.max(1), 1);
        for i in 0..n {
            let t = match (i, bos) {
                (0, Some(b)) => b,
                _ => rng.next(n_vocab),
            };
            batch
                .add(t, i32::try_from(i).unwrap_or(i32::MAX), &[0], i + 1 == n)
                .map_err(|e| llama_err("batch")(&e))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| llama_err("decoding the prompt")(&e))?;
        ctx.synchronize();
        Ok::<(), InferError>(())
    };
    let gen_run = |ctx: &mut LlamaContext<'_>, n: u32, rng: &mut TokenRng| {
        let mut token = bos.unwrap_or_else(|| rng.next(n_vocab));
        let mut batch = LlamaBatch::new(1, 1);
        for i in 0..n {
            batch.clear();
            batch
                .add(token, i32::try_from(i).unwrap_or(i32::MAX), &[0], true)
                .map_err(|e| llama_err("batch")(&e))?;
            ctx.decode(&mut batch)
                .map_err(|e| llama_err("decoding")(&e))?;
            ctx.synchronize();
            token = rng.next(n_vocab);
        }
        Ok::<(), InferError>(())
    };
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    if params.n_prompt > 0 {
        // Warm-up, as llama-bench: a short prompt.
        prompt(&mut ctx, params.n_prompt.min(32), &mut rng)?;
        for _ in 0..params.repetitions {
            ctx.clear_kv_cache();
            let t = Instant::now();
            prompt(&mut ctx, params.n_prompt, &mut rng)?;
            pp.push(f64::from(params.n_prompt) / t.elapsed().as_secs_f64());
        }
    }
    if params.n_gen > 0 {
        ctx.clear_kv_cache();
        gen_run(&mut ctx, 1, &mut rng)?;
        for _ in 0..params.repetitions {
            ctx.clear_kv_cache();
            let t = Instant::now();
            gen_run(&mut ctx, params.n_gen, &mut rng)?;
            tg.push(f64::from(params.n_gen) / t.elapsed().as_secs_f64());
        }
    }
    Ok(BenchReport {
        model: loaded.name.clone(),
        n_threads,
        n_gpu_layers: loaded.n_gpu_layers,
        load_secs,
        prompt_tokens_per_sec: pp,
        generation_tokens_per_sec: tg,
    })
}

fn llama_err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> InferError + '_ {
    move |e| InferError::Llama(format!("{what}: {e}"))
}

fn generate(
    backend: &LlamaBackend,
    loaded: &Loaded,
    n_threads: u32,
    req: &GenerateRequest,
    deadline: Instant,
) -> Result<Generation, InferError> {
    let started = Instant::now();
    let model = &loaded.model;
    let vocab = model.vocab();

    let tokens = prompt_tokens(loaded, req)?;
    let n_ctx_train = model.n_ctx_train();
    let needed = u64::try_from(tokens.len())
        .unwrap_or(u64::MAX)
        .saturating_add(u64::from(req.max_tokens))
        .saturating_add(8);
    let n_ctx = u32::try_from(needed.next_multiple_of(256))
        .unwrap_or(n_ctx_train)
        .min(n_ctx_train);
    let threads = i32::try_from(n_threads.max(1)).unwrap_or(1);
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(PROMPT_BATCH as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model
        .new_context(backend, ctx_params)
        .map_err(|e| llama_err("creating a context")(&e))?;

    let mut grammar = build_grammar(model, req)?;
    let mut sampler = build_sampler_chain(req);

    // Prompt processing, in batches; logits only for the last prompt token.
    let mut batch = LlamaBatch::new(PROMPT_BATCH, 1);
    let last = tokens.len() - 1;
    for (chunk_index, chunk) in tokens.chunks(PROMPT_BATCH).enumerate() {
        batch.clear();
        for (j, &t) in chunk.iter().enumerate() {
            let pos = chunk_index * PROMPT_BATCH + j;
            batch
                .add(t, i32::try_from(pos).unwrap_or(i32::MAX), &[0], pos == last)
                .map_err(|e| llama_err("batch")(&e))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| llama_err("decoding the prompt")(&e))?;
    }
    let prompt_secs = started.elapsed().as_secs_f64();

    // Generation.
    let gen_start = Instant::now();
    let mut out: Vec<u8> = Vec::new();
    let mut n_generated: u32 = 0;
    let mut pos = tokens.len();
    let mut stop_reason = "max_tokens";
    let mut logits_index = batch.n_tokens() - 1;
    let mut confidence = 1.0f64;
    while n_generated < req.max_tokens {
        if Instant::now() > deadline {
            return Err(InferError::Timeout(req.timeout));
        }
        // The grammar masks the vocabulary, the answer's confidence is read from the masked
        // distribution at temperature 1, then the chain picks the token. Each sampler
        // accepts the token exactly once (never `sample()`, which accepts as well).
        let mut candidates = ctx.token_data_array_ith(logits_index);
        if let Some(g) = grammar.as_mut() {
            candidates.apply_sampler(g);
        }
        let allowed = candidates.data.iter().map(|d| d.logit());
        let probabilities = masked_softmax(allowed);
        sampler.apply(&mut candidates);
        let Some(token) = candidates.selected_token() else {
            return Err(InferError::Llama(
                "the sampler chose no token (the grammar allows none here?)".into(),
            ));
        };
        if grammar.is_some() {
            // Candidates are built in token-id order and the grammar only masks them.
            let p = usize::try_from(token.0)
                .ok()
                .and_then(|i| probabilities.get(i))
                .copied()
                .unwrap_or(0.0);
            confidence *= p;
        }
        if let Some(g) = grammar.as_mut() {
            g.accept(token);
        }
        sampler.accept(token);
        if vocab.is_eog(token) {
            stop_reason = "eos";
            break;
        }
        n_generated += 1;
        out.extend_from_slice(&vocab.token_to_piece(token, false, None));
        if let Some(cut) = find_stop(&out, &req.stop) {
            out.truncate(cut);
            stop_reason = "stop_string";
            break;
        }
        batch.clear();
        batch
            .add(token, i32::try_from(pos).unwrap_or(i32::MAX), &[0], true)
            .map_err(|e| llama_err("batch")(&e))?;
        pos += 1;
        ctx.decode(&mut batch)
            .map_err(|e| llama_err("decoding")(&e))?;
        logits_index = batch.n_tokens() - 1;
    }
    let gen_secs = gen_start.elapsed().as_secs_f64();
    let prompt_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    Ok(Generation {
        text: String::from_utf8_lossy(&out).into_owned(),
        usage: LlmUsage {
            model: loaded.name.clone(),
            prompt_tokens,
            cached_prompt_tokens: 0,
            completion_tokens: n_generated,
            prompt_tokens_per_sec: rate(f64::from(prompt_tokens), prompt_secs),
            generation_tokens_per_sec: rate(f64::from(n_generated), gen_secs),
            stop_reason: stop_reason.into(),
            grammar: grammar.is_some(),
            answer_confidence: grammar.is_some().then_some(confidence),
            uncertain: false,
        },
    })
}

/// The tokens of `req`'s prompt (chat template applied, special-token text in the data
/// neutralised).
///
/// # Errors
/// [`InferError::ContextOverflow`] when the prompt plus `max_tokens` (and a margin of 8) does
/// not fit in the model's training context, or the prompt is empty; the template's errors.
fn prompt_tokens(loaded: &Loaded, req: &GenerateRequest) -> Result<Vec<LlamaToken>, InferError> {
    let model = &loaded.model;
    let prompt = build_prompt(model, &loaded.specials, req)?;
    let tokens = model.vocab().tokenize(prompt.as_bytes(), true, true);
    let n_ctx_train = model.n_ctx_train();
    let needed = u64::try_from(tokens.len())
        .unwrap_or(u64::MAX)
        .saturating_add(u64::from(req.max_tokens))
        .saturating_add(8);
    if needed > u64::from(n_ctx_train) || tokens.is_empty() {
        return Err(InferError::ContextOverflow {
            prompt_tokens: tokens.len(),
            max_tokens: req.max_tokens,
            n_ctx_train,
        });
    }
    Ok(tokens)
}

/// The grammar sampler (from `grammar`, or `json_schema` through llama.cpp's converter), kept
/// apart from the chain so the answer's confidence can be read after its mask.
fn build_grammar(
    model: &LlamaModel,
    req: &GenerateRequest,
) -> Result<Option<LlamaSampler>, InferError> {
    let from_schema = req
        .json_schema
        .as_deref()
        .map(|schema| {
            llama_cpp_2::json_schema_to_grammar(schema)
                .map_err(|e| InferError::Schema(e.to_string()))
        })
        .transpose()?;
    req.grammar
        .as_ref()
        .or(from_schema.as_ref())
        .map(|g| {
            LlamaSampler::grammar(model, g, "root").map_err(|e| InferError::Grammar(e.to_string()))
        })
        .transpose()
}

/// The chain that picks the token: greedy, or top-p + temperature + seeded draw.
fn build_sampler_chain(req: &GenerateRequest) -> LlamaSampler {
    if req.temperature > 0.0 {
        LlamaSampler::chain_simple([
            LlamaSampler::top_p(req.top_p, 1),
            LlamaSampler::temp(req.temperature),
            LlamaSampler::dist(req.seed),
        ])
    } else {
        LlamaSampler::greedy()
    }
}

/// Byte offset where the earliest stop string begins in `out`, if any occurs.
fn find_stop(out: &[u8], stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| out.windows(s.len()).position(|w| w == s.as_bytes()))
        .min()
}

fn rate(n: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        (n / secs * 10.0).round() / 10.0
    } else {
        0.0
    }
}
