//! Prompt-prefix reuse and batched items (as llama-server's `cache_prompt` and parallel slots
//! with continuous batching).
//!
//! The inference thread keeps one context per loaded model ([`Kept`]) with a unified KV cache.
//! Sequence 0 holds a prompt prefix between requests; a batch of requests:
//! 1. tokenises every prompt and takes their longest common prefix (at least one token of each
//!    prompt is left out of it, so every item has logits of its own to sample from);
//! 2. keeps the longest common token prefix of that and what sequence 0 holds, removes the rest
//!    from the cache and decodes only the missing part into sequence 0 (the cache reuse);
//! 3. gives each item a sequence of its own (1..=parallel), sharing sequence 0's prefix cells
//!    (`llama_memory_seq_cp`: in a unified cache the cells are shared, not copied), and decodes
//!    all the items' prompt suffixes and then their generated tokens in one `llama_decode` per
//!    step over every active sequence; a finished item frees its sequence and cells, and the
//!    next item takes them (continuous batching);
//! 4. leaves the prefix in sequence 0 for the next request.
//!
//! A batch whose prefix plus one item does not fit in the kept context recreates it larger (up
//! to the model's training context): the cache is reset. Results keep the requests' order; an
//! item's failure (its prompt, its grammar, a timeout) is its own. Each distinct grammar is
//! built once per batch and cloned (its state copied, not reparsed) for each item.
//!
//! Greedy outputs are those of one request at a time: the same prompt tokens at the same
//! positions, the same sampling; only floating-point summation order may differ between batch
//! shapes.

use super::{
    InferError, Loaded, PROMPT_BATCH, build_sampler_chain, find_stop, llama_err, prompt_tokens,
    rate,
};
use crate::effects::{GenerateRequest, Generation};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::time::Instant;
use tracefleet::report::LlmUsage;

use super::prompt::masked_softmax;

/// The context kept for a loaded model and the tokens its sequence 0 holds.
pub(super) struct Kept<'m> {
    ctx: LlamaContext<'m>,
    /// Tokens at positions `0..tokens.len()` of sequence 0.
    tokens: Vec<LlamaToken>,
    /// Cells in the KV cache.
    n_ctx: u32,
    /// Sequences besides 0.
    parallel: u32,
}

/// How a batch runs.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchSettings {
    /// CPU threads.
    pub n_threads: u32,
    /// Items decoded together (sequences besides the prefix's).
    pub parallel: u32,
    /// Cells of the kept context when it is created (grown when a batch needs more).
    pub ctx_tokens: u32,
}

/// One item being generated.
struct Active {
    item: usize,
    seq: i32,
    /// Position of the next token fed.
    pos: usize,
    /// The token to feed in the next decode, once the prompt suffix is in.
    next: Option<LlamaToken>,
    grammar: Option<LlamaSampler>,
    chain: LlamaSampler,
    out: Vec<u8>,
    n_generated: u32,
    confidence: f64,
    deadline: Instant,
    /// Cells reserved for it (suffix + max_tokens).
    reserved: usize,
    cached: u32,
    done: bool,
}

/// One token of a decode step: token, position, sequence, logits wanted, owner (index into the
/// active items).
type Entry = (LlamaToken, usize, i32, bool, usize);

/// What one sampling step decided for an item.
enum Sampled {
    Continue(LlamaToken),
    Done(&'static str),
    Failed(InferError),
}

/// Runs `reqs` as one batch on `loaded` (see the module docs); `room(n_ctx)` waits until the
/// device can take a context of `n_ctx` cells (the resource policy) or refuses. One result per
/// request, in order.
pub(super) fn generate_batch<'m>(
    backend: &LlamaBackend,
    loaded: &'m Loaded,
    kept: &mut Option<Kept<'m>>,
    settings: BatchSettings,
    reqs: &[GenerateRequest],
    room: &dyn Fn(u32) -> Result<(), InferError>,
) -> Vec<Result<Generation, InferError>> {
    let model = &loaded.model;
    let n_ctx_train = model.n_ctx_train();
    let mut results: Vec<Option<Result<Generation, InferError>>> =
        reqs.iter().map(|_| None).collect();

    // Prompts and grammars.
    let mut prompts: Vec<Vec<LlamaToken>> = Vec::with_capacity(reqs.len());
    let mut grammars: Vec<Option<String>> = Vec::with_capacity(reqs.len());
    let mut schemas: HashMap<&str, Result<String, String>> = HashMap::new();
    for (i, req) in reqs.iter().enumerate() {
        let grammar = match (&req.grammar, &req.json_schema) {
            (Some(g), _) => Ok(Some(g.clone())),
            (None, Some(schema)) => schemas
                .entry(schema.as_str())
                .or_insert_with(|| {
                    llama_cpp_2::json_schema_to_grammar(schema).map_err(|e| e.to_string())
                })
                .clone()
                .map(Some)
                .map_err(InferError::Schema),
            (None, None) => Ok(None),
        };
        let tokens = grammar.and_then(|g| {
            grammars.push(g);
            prompt_tokens(loaded, req)
        });
        if grammars.len() == i {
            grammars.push(None);
        }
        match tokens {
            Ok(t) => prompts.push(t),
            Err(e) => {
                prompts.push(Vec::new());
                results[i] = Some(Err(e));
            }
        }
    }
    let valid: Vec<usize> = (0..reqs.len()).filter(|&i| results[i].is_none()).collect();
    let Some(plen) = shared_prefix(valid.iter().map(|&i| prompts[i].as_slice())) else {
        return finish(results);
    };
    let prefix = &prompts[valid[0]][..plen];
    let max_need = valid
        .iter()
        .map(|&i| item_cells(prompts[i].len() - plen, reqs[i].max_tokens))
        .max()
        .unwrap_or(0);

    // The kept context, created or grown (a reset) when the batch does not fit.
    let target = u32::try_from(plen + max_need)
        .unwrap_or(u32::MAX)
        .min(n_ctx_train);
    let parallel = settings.parallel.clamp(1, 63);
    if kept
        .as_ref()
        .is_none_or(|k| k.n_ctx < target || k.parallel != parallel)
    {
        *kept = None;
        let n_ctx = settings
            .ctx_tokens
            .max(target)
            .next_multiple_of(256)
            .min(n_ctx_train);
        match room(n_ctx).and_then(|()| new_context(backend, loaded, settings, n_ctx, parallel)) {
            Ok(k) => *kept = Some(k),
            Err(e) => {
                let why = e.to_string();
                for &i in &valid {
                    results[i] = Some(Err(InferError::Llama(why.clone())));
                }
                return finish(results);
            }
        }
    }
    let Some(k) = kept.as_mut() else {
        return finish(results);
    };

    // Reuse the cached prefix; decode only the rest of it.
    let started = Instant::now();
    let reused = reuse_prefix(k, prefix);
    let mut prompt_decoded = plen - reused;
    if let Err(e) = decode_prefix(k, prefix, reused) {
        k.ctx.clear_kv_cache();
        k.tokens.clear();
        let why = e.to_string();
        for &i in &valid {
            results[i] = Some(Err(InferError::Llama(why.clone())));
        }
        return finish(results);
    }
    let mut prompt_secs = started.elapsed().as_secs_f64();
    let mut gen_secs = 0.0;

    // Items in slots, one decode per step over all of them.
    let mut pristine: HashMap<String, Result<LlamaSampler, String>> = HashMap::new();
    let mut queue: VecDeque<usize> = valid.iter().copied().collect();
    let mut free: Vec<i32> = (1..=i32::try_from(parallel).unwrap_or(1)).rev().collect();
    let mut active: Vec<Active> = Vec::new();
    let mut used = plen;
    let mut charged_prefix = false;
    let n_ctx = usize::try_from(k.n_ctx).unwrap_or(usize::MAX);
    let mut batch = LlamaBatch::new(PROMPT_BATCH, 1);
    loop {
        let mut entries: Vec<Entry> = Vec::new();
        while let (Some(&i), Some(&seq)) = (queue.front(), free.last()) {
            let suffix = &prompts[i][plen..];
            let need = item_cells(suffix.len(), reqs[i].max_tokens);
            if used + need > n_ctx && !(active.is_empty() && entries.is_empty()) {
                break;
            }
            queue.pop_front();
            let grammar = match &grammars[i] {
                None => None,
                Some(text) => match pristine.entry(text.clone()).or_insert_with(|| {
                    LlamaSampler::grammar(model, text, "root").map_err(|e| e.to_string())
                }) {
                    Ok(g) => Some(g.clone()),
                    Err(e) => {
                        results[i] = Some(Err(InferError::Grammar(e.clone())));
                        continue;
                    }
                },
            };
            free.pop();
            if plen > 0 {
                let _ = k
                    .ctx
                    .copy_kv_cache_seq(0, seq, None, u32::try_from(plen).ok());
            }
            let owner = active.len();
            for (j, &t) in suffix.iter().enumerate() {
                entries.push((t, plen + j, seq, j + 1 == suffix.len(), owner));
            }
            let cached = if charged_prefix {
                plen
            } else {
                charged_prefix = true;
                reused
            };
            prompt_decoded += suffix.len();
            active.push(Active {
                item: i,
                seq,
                pos: prompts[i].len(),
                next: None,
                grammar,
                chain: build_sampler_chain(&reqs[i]),
                out: Vec::new(),
                n_generated: 0,
                confidence: 1.0,
                deadline: Instant::now() + reqs[i].timeout,
                reserved: need,
                cached: u32::try_from(cached).unwrap_or(u32::MAX),
                done: false,
            });
            used += need;
        }
        let prompt_step = !entries.is_empty();
        for (owner, a) in active.iter_mut().enumerate() {
            if let Some(t) = a.next.take() {
                entries.push((t, a.pos, a.seq, true, owner));
                a.pos += 1;
            }
        }
        if entries.is_empty() {
            break;
        }
        for chunk in entries.chunks(PROMPT_BATCH) {
            let t = Instant::now();
            let decoded = decode_chunk(&mut k.ctx, &mut batch, chunk);
            let secs = t.elapsed().as_secs_f64();
            if prompt_step {
                prompt_secs += secs;
            } else {
                gen_secs += secs;
            }
            if let Err(e) = decoded {
                // The whole step failed: every item in it fails, the others go on.
                let why = e.to_string();
                for a in active.iter_mut().filter(|a| !a.done) {
                    a.done = true;
                    results[a.item] = Some(Err(InferError::Llama(why.clone())));
                }
                break;
            }
            for (j, &(_, _, _, logits, owner)) in chunk.iter().enumerate() {
                if !logits {
                    continue;
                }
                let a = &mut active[owner];
                if a.done {
                    continue;
                }
                let req = &reqs[a.item];
                match sample(&k.ctx, i32::try_from(j).unwrap_or(0), a, req, loaded) {
                    Sampled::Continue(t) => a.next = Some(t),
                    Sampled::Done(stop_reason) => {
                        a.done = true;
                        results[a.item] = Some(Ok(generation(a, loaded, &prompts, stop_reason)));
                    }
                    Sampled::Failed(e) => {
                        a.done = true;
                        results[a.item] = Some(Err(e));
                    }
                }
            }
        }
        // Finished items free their sequence and cells.
        for a in active.iter().filter(|a| a.done) {
            let _ = k
                .ctx
                .clear_kv_cache_seq(u32::try_from(a.seq).ok(), None, None);
            free.push(a.seq);
            used -= a.reserved;
        }
        if active.iter().any(|a| a.done) {
            // Owners index `active`: only drop finished items between steps.
            active.retain(|a| !a.done);
        }
    }
    for s in 1..=parallel {
        let _ = k.ctx.clear_kv_cache_seq(Some(s), None, None);
    }
    let generated: u64 = results
        .iter()
        .flatten()
        .flatten()
        .map(|g| u64::from(g.usage.completion_tokens))
        .sum();
    #[allow(clippy::cast_precision_loss)]
    let (prompt_rate, gen_rate) = (
        rate(prompt_decoded as f64, prompt_secs),
        rate(generated as f64, gen_secs),
    );
    for g in results.iter_mut().flatten().flatten() {
        g.usage.prompt_tokens_per_sec = prompt_rate;
        g.usage.generation_tokens_per_sec = gen_rate;
    }
    finish(results)
}

/// Cells an item takes beside the shared prefix: its prompt suffix and its generation bound
/// (+1 for the token fed after the last one sampled).
fn item_cells(suffix: usize, max_tokens: u32) -> usize {
    suffix + usize::try_from(max_tokens).unwrap_or(usize::MAX / 2) + 1
}

/// The longest common prefix of `prompts`, leaving at least one token of the shortest out;
/// `None` when there are none.
pub(super) fn shared_prefix<'a>(
    mut prompts: impl Iterator<Item = &'a [LlamaToken]>,
) -> Option<usize> {
    let first = prompts.next()?;
    let mut len = first.len();
    let mut shortest = first.len();
    for p in prompts {
        len = common_len(&first[..len], p);
        shortest = shortest.min(p.len());
    }
    Some(len.min(shortest.saturating_sub(1)))
}

fn common_len(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn finish(
    results: Vec<Option<Result<Generation, InferError>>>,
) -> Vec<Result<Generation, InferError>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(InferError::Llama("the item was not run".into()))))
        .collect()
}

fn new_context<'m>(
    backend: &LlamaBackend,
    loaded: &'m Loaded,
    settings: BatchSettings,
    n_ctx: u32,
    parallel: u32,
) -> Result<Kept<'m>, InferError> {
    let threads = i32::try_from(settings.n_threads.max(1)).unwrap_or(1);
    #[allow(clippy::cast_possible_truncation)]
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(PROMPT_BATCH as u32)
        .with_n_ubatch(PROMPT_BATCH as u32)
        .with_n_seq_max(parallel + 1)
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let ctx = loaded
        .model
        .new_context(backend, params)
        .map_err(|e| llama_err("creating a context")(&e))?;
    tracing::debug!(model = %loaded.name, n_ctx, parallel, "inference context created");
    Ok(Kept {
        n_ctx: ctx.n_ctx(),
        ctx,
        tokens: Vec::new(),
        parallel,
    })
}

/// Keeps the longest common prefix of what sequence 0 holds and `prefix`, drops the rest of
/// the cache's sequence 0 and every other sequence; how many tokens were kept.
fn reuse_prefix(k: &mut Kept<'_>, prefix: &[LlamaToken]) -> usize {
    for s in 1..=k.parallel {
        let _ = k.ctx.clear_kv_cache_seq(Some(s), None, None);
    }
    let keep = common_len(&k.tokens, prefix);
    let removed = k
        .ctx
        .clear_kv_cache_seq(Some(0), u32::try_from(keep).ok(), None)
        .unwrap_or(false);
    if removed {
        k.tokens.truncate(keep);
        keep
    } else {
        k.ctx.clear_kv_cache();
        k.tokens.clear();
        0
    }
}

/// Decodes `prefix[from..]` into sequence 0 (no logits) and records it as held.
fn decode_prefix(k: &mut Kept<'_>, prefix: &[LlamaToken], from: usize) -> Result<(), InferError> {
    let mut batch = LlamaBatch::new(PROMPT_BATCH, 1);
    for (c, chunk) in prefix[from..].chunks(PROMPT_BATCH).enumerate() {
        batch.clear();
        for (j, &t) in chunk.iter().enumerate() {
            let pos = from + c * PROMPT_BATCH + j;
            batch
                .add(t, i32::try_from(pos).unwrap_or(i32::MAX), &[0], false)
                .map_err(|e| llama_err("batch")(&e))?;
        }
        k.ctx
            .decode(&mut batch)
            .map_err(|e| llama_err("decoding the prompt")(&e))?;
        k.tokens.extend_from_slice(chunk);
    }
    Ok(())
}

fn decode_chunk(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch,
    chunk: &[Entry],
) -> Result<(), InferError> {
    batch.clear();
    for &(t, pos, seq, logits, _) in chunk {
        batch
            .add(t, i32::try_from(pos).unwrap_or(i32::MAX), &[seq], logits)
            .map_err(|e| llama_err("batch")(&e))?;
    }
    ctx.decode(batch).map_err(|e| llama_err("decoding")(&e))
}

/// One sampling step of `a` from the logits at batch index `j`: the grammar masks the
/// vocabulary, the answer's confidence is read from the masked distribution at temperature 1,
/// then the chain picks the token; each sampler accepts it exactly once (never `sample()`,
/// which accepts as well).
fn sample(
    ctx: &LlamaContext<'_>,
    j: i32,
    a: &mut Active,
    req: &GenerateRequest,
    loaded: &Loaded,
) -> Sampled {
    if a.n_generated >= req.max_tokens {
        return Sampled::Done("max_tokens");
    }
    if Instant::now() > a.deadline {
        return Sampled::Failed(InferError::Timeout(req.timeout));
    }
    let vocab = loaded.model.vocab();
    let mut candidates = ctx.token_data_array_ith(j);
    if let Some(g) = a.grammar.as_mut() {
        candidates.apply_sampler(g);
    }
    let probabilities = masked_softmax(candidates.data.iter().map(|d| d.logit()));
    a.chain.apply(&mut candidates);
    let Some(token) = candidates.selected_token() else {
        return Sampled::Failed(InferError::Llama(
            "the sampler chose no token (the grammar allows none here?)".into(),
        ));
    };
    if let Some(g) = a.grammar.as_mut() {
        // Candidates are built in token-id order and the grammar only masks them.
        a.confidence *= usize::try_from(token.0)
            .ok()
            .and_then(|i| probabilities.get(i))
            .copied()
            .unwrap_or(0.0);
        g.accept(token);
    }
    a.chain.accept(token);
    if vocab.is_eog(token) {
        return Sampled::Done("eos");
    }
    a.n_generated += 1;
    a.out
        .extend_from_slice(&vocab.token_to_piece(token, false, None));
    if let Some(cut) = find_stop(&a.out, &req.stop) {
        a.out.truncate(cut);
        return Sampled::Done("stop_string");
    }
    if a.n_generated >= req.max_tokens {
        return Sampled::Done("max_tokens");
    }
    Sampled::Continue(token)
}

fn generation(
    a: &Active,
    loaded: &Loaded,
    prompts: &[Vec<LlamaToken>],
    stop_reason: &str,
) -> Generation {
    Generation {
        text: String::from_utf8_lossy(&a.out).into_owned(),
        usage: LlmUsage {
            model: loaded.name.clone(),
            prompt_tokens: u32::try_from(prompts[a.item].len()).unwrap_or(u32::MAX),
            cached_prompt_tokens: a.cached,
            completion_tokens: a.n_generated,
            prompt_tokens_per_sec: 0.0,
            generation_tokens_per_sec: 0.0,
            stop_reason: stop_reason.into(),
            grammar: a.grammar.is_some(),
            answer_confidence: a.grammar.is_some().then_some(a.confidence),
            uncertain: false,
        },
    }
}
