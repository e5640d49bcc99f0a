//! The local inference engine: GGUF models on llama.cpp's kernels, everything above them ours.
//!
//! llama.cpp (through `llama-cpp-2`) gives us model loading, tokenization and one call:
//! `llama_decode` of a batch of tokens over many sequences. Above that line the engine is
//! plain Rust: chat templates ([`template`]), sampling ([`sampler`]), incremental detokenizing
//! with stop strings ([`text`]), and a continuous-batching scheduler ([`scheduler`]) whose state
//! is a plain struct tested without threads. One worker thread per model ([`worker`]) owns the
//! llama.cpp context and carries out the scheduler's plans.
//!
//! Architecture Invariant: the engine does no network I/O; it implements
//! [`tokenomy_core::Backend`] and knows nothing of HTTP or wire formats.

mod constraint;
pub mod embed;
pub mod gguf;
pub mod metrics;
mod prompt;
pub mod sampler;
pub mod scheduler;
pub mod template;
pub mod text;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};
use tokenomy_core::{
    Backend, BackendError, ChatMessage, ChatPrompt, Generation, GenerateRequest, ModelInfo, TokenId,
};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::sampler::Sampler;
use crate::scheduler::{JobSpec, Limits};
use crate::template::ChatTemplate;
use crate::worker::{Submission, WorkerConfig};

/// llama.cpp's process-wide backend, initialised once.
pub(crate) fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let mut b = LlamaBackend::init().expect("llama backend initialises once");
        if std::env::var_os("TOKENOMY_LLAMA_LOG").is_none() {
            b.void_logs();
        }
        b
    })
}

/// How to load and serve one model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The name clients use in `"model"`.
    pub name: String,
    pub path: PathBuf,
    /// A chat template to use instead of (or in the absence of) the GGUF's own.
    pub chat_template: Option<String>,
    pub threads: i32,
    /// Concurrent sequences (KV slots).
    pub slots: usize,
    /// Tokens one sequence may hold (prompt + completion); `None` = the model's training context, at most 8192.
    pub ctx_tokens_max: Option<u32>,
    /// KV cells in all, split evenly between the slots (each slot has its own KV stream, which
    /// also holds its prefix cache); `None` = slots × ctx_tokens_max. A sequence holds at most
    /// `kv_cells_max / slots` tokens.
    pub kv_cells_max: Option<u32>,
    pub step_tokens_max: u32,
    pub queue_max: usize,
    /// Layers whose weights (and KV) go to the GPU; `None` = llama.cpp's default, every layer
    /// when the build has a GPU backend (`--features cuda`, `vulkan` or `metal`) and a device
    /// is present, none otherwise. `Some(n > 0)` where llama.cpp finds no GPU is an error.
    pub gpu_layers: Option<u32>,
}

impl ModelConfig {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            path: path.into(),
            chat_template: None,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get() as i32),
            slots: 8,
            ctx_tokens_max: None,
            kv_cells_max: None,
            step_tokens_max: 512,
            queue_max: 64,
            gpu_layers: None,
        }
    }
}

struct LoadedModel {
    info: ModelInfo,
    /// The GGUF file's sha256, hashed on a background thread so loading is not delayed.
    sha256: Arc<OnceLock<String>>,
    model: Arc<LlamaModel>,
    template: Option<ChatTemplate>,
    specials: prompt::Specials,
    grammars: constraint::Compiler,
    tx: SyncSender<Submission>,
    /// Joined when the model is dropped (see `Drop for LoadedModel`).
    worker: Option<std::thread::JoinHandle<()>>,
    queued: Arc<Queued>,
    limits: Limits,
    metrics: Arc<Metrics>,
    threads: i32,
    /// The embedding context, made on the first embedding request (see [`embed`]).
    embedder: std::sync::Mutex<Option<Arc<embed::Embedder>>>,
}

/// Generations handed to a model's worker and not yet ended, waiting or running: the count
/// that `--parallel` + `--queue-max` bound (at most `queue_max` wait once every slot runs; a
/// burst that finds slots free is not refused for not being admitted yet). A request reserves
/// places for all its generations (prompts × `n`) at once in [`Backend::generate`], and the
/// worker releases each when its generation ends (finished, cancelled, rejected).
#[derive(Debug, Default)]
pub(crate) struct Queued {
    waiting: AtomicUsize,
    /// Set when the worker thread ends (also by a panic): its places will never come back.
    stopped: std::sync::atomic::AtomicBool,
    /// Set by [`Backend::cancel_all`]: the worker cancels what it has, `generate` refuses more.
    cancelling: std::sync::atomic::AtomicBool,
}

/// Marks the worker stopped when dropped: held by the worker thread for its whole life.
pub(crate) struct WorkerAlive(pub(crate) Arc<Queued>);

impl Drop for WorkerAlive {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::SeqCst);
    }
}

impl Queued {
    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub(crate) fn cancelling(&self) -> bool {
        self.cancelling.load(Ordering::SeqCst)
    }

    /// Takes `n` places if all fit under `max`.
    fn reserve(&self, n: usize, max: usize) -> bool {
        self.waiting.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w + n <= max).then_some(w + n)).is_ok()
    }

    pub(crate) fn release(&self, n: usize) {
        let before = self.waiting.fetch_sub(n, Ordering::SeqCst);
        assert!(before >= n, "released {n} queue places of {before}");
    }

    pub(crate) fn len(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// Stops the model's worker and waits until it has freed its llama.cpp context: closing its
/// queue makes it cancel what still runs and return. Without the wait, the last `Arc<Engine>`
/// dropped on the way out of `main` leaves the worker freeing its context while the process
/// exits: on a CUDA build the runtime is torn down under it and llama.cpp aborts the process
/// (seen on an H200: a clean SIGTERM ended in SIGABRT).
impl Drop for LoadedModel {
    fn drop(&mut self) {
        drop(std::mem::replace(&mut self.tx, sync_channel(0).0));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// The local engine: one worker per loaded model.
pub struct Engine {
    models: Vec<LoadedModel>,
    next_job: AtomicU64,
}

impl Engine {
    /// Loads every model and starts its worker. Fails with a message naming the model.
    pub fn load(configs: &[ModelConfig]) -> Result<Engine, String> {
        let models = configs.iter().map(load_model).collect::<Result<Vec<_>, _>>()?;
        Ok(Engine { models, next_job: AtomicU64::new(1) })
    }

    fn get(&self, name: &str) -> Result<&LoadedModel, BackendError> {
        self.models.iter().find(|m| m.info.name == name).ok_or_else(|| BackendError::UnknownModel(name.to_string()))
    }

    /// What the worker needs to run one generation, and the caller's ends of its channels.
    fn submission(&self, m: &LoadedModel, request: GenerateRequest) -> Result<(Submission, Generation), BackendError> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (outcome_tx, outcome) = oneshot::channel();
        let p = request.params;
        let constraint = match &p.grammar {
            Some(g) => Some(m.grammars.matcher(&m.model, g).map_err(BackendError::InvalidRequest)?.lazy(&p.grammar_triggers)),
            None => None,
        };
        let spec = JobSpec {
            id: self.next_job.fetch_add(1, Ordering::Relaxed),
            prompt: request.prompt,
            max_tokens: p.max_tokens,
            echo_logits: request.echo_logprobs,
            cache_salt: request.cache_salt,
        };
        let sub = Submission {
            sampler: Sampler::new(p.clone(), &spec.prompt),
            spec,
            stops: p.stop,
            logprobs_top: p.logprobs,
            ignore_eos: p.ignore_eos,
            reasoning: p.reasoning,
            reasoning_budget: p.reasoning_budget,
            close_reasoning: match p.reasoning_budget {
                Some(_) => m.model.vocab().tokenize(b"\n</think>\n\n", false, true).into_iter().map(|t| t.0).collect(),
                None => Vec::new(),
            },
            constraint,
            answer_end: request.answer_end,
            events: events_tx,
            outcome: outcome_tx,
        };
        Ok((sub, Generation { events, outcome }))
    }

    /// `text` tokenized by llama.cpp alone, special tokens parsed: what the engine's own cut at
    /// special tokens ([`Backend::tokenize`], [`Backend::render_chat`]) must agree with. Public
    /// so that tests hold the engine to it; quadratic in the special tokens the text holds.
    #[doc(hidden)]
    pub fn tokenize_by_llama_cpp(&self, model: &str, text: &str) -> Result<Vec<TokenId>, BackendError> {
        let m = self.get(model)?;
        Ok(m.model.vocab().tokenize(text.as_bytes(), true, true).into_iter().map(|t| t.0).collect())
    }

    /// Per-sequence context limit of a model.
    pub fn ctx_tokens_max(&self, model: &str) -> Result<u32, BackendError> {
        Ok(self.get(model)?.limits.ctx_tokens_max)
    }
}

impl LoadedModel {
    /// The model's embedding thread, started on first use.
    fn embedder(&self) -> Result<Arc<embed::Embedder>, BackendError> {
        let mut e = self.embedder.lock().expect("embedder lock");
        if e.is_none() {
            let started = embed::Embedder::start(self.model.clone(), self.limits.ctx_tokens_max, self.threads).map_err(BackendError::Internal)?;
            *e = Some(Arc::new(started));
        }
        Ok(e.as_ref().expect("just set").clone())
    }
}

fn load_model(cfg: &ModelConfig) -> Result<LoadedModel, String> {
    let summary = gguf::inspect(&cfg.path)?;
    let params = model_params(cfg.gpu_layers)?;
    let model = LlamaModel::load_from_file(backend(), &cfg.path, &params)
        .map_err(|e| format!("cannot load {}: {e}", cfg.path.display()))?;
    let model = Arc::new(model);
    let template = chat_template(&model, cfg)?;
    let train_ctx = model.n_ctx_train().max(1);
    let (ctx_tokens_max, kv_cells_max) = kv_layout(cfg, train_ctx)?;
    let limits = Limits { slots: cfg.slots, kv_cells_max, step_tokens_max: cfg.step_tokens_max, queue_max: cfg.queue_max, ctx_tokens_max };
    let metrics = Arc::new(Metrics::default());
    let info = ModelInfo {
        name: cfg.name.clone(),
        architecture: summary.architecture.clone(),
        context_length: ctx_tokens_max,
        sha256: None,
        has_chat_template: template.is_some(),
        vocab_size: u32::try_from(model.n_vocab()).unwrap_or(0),
        generations_max: u32::try_from(limits.queue_max).unwrap_or(u32::MAX),
    };
    let prefix_reuse = summary.sliding_window.is_none() && !model.is_recurrent() && !model.is_hybrid();
    let queued = Arc::new(Queued::default());
    let sha256 = Arc::new(OnceLock::new());
    let (cell, path) = (sha256.clone(), cfg.path.clone());
    std::thread::Builder::new()
        .name("tokenomy-sha256".into())
        .spawn(move || match file_sha256(&path) {
            Ok(hex) => drop(cell.set(hex)),
            Err(e) => tracing::warn!(error = %e, "cannot hash the model file"),
        })
        .map_err(|e| format!("cannot start the hashing thread: {e}"))?;
    let specials = prompt::Specials::of(&model);
    // Last, so that no error return leaves a worker unjoined (`Drop for LoadedModel`).
    let (tx, worker) = spawn_worker(model.clone(), WorkerConfig { limits, threads: cfg.threads, prefix_reuse, queued: queued.clone() }, metrics.clone())?;
    let worker = Some(worker);
    let embedder = Default::default();
    Ok(LoadedModel { info, sha256, model, template, specials, grammars: Default::default(), tx, worker, queued, limits, metrics, threads: cfg.threads, embedder })
}

/// llama.cpp's model parameters for `--n-gpu-layers`; logs the devices llama.cpp found.
fn model_params(gpu_layers: Option<u32>) -> Result<LlamaModelParams, String> {
    let gpus: Vec<String> = llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| d.device_type != llama_cpp_2::LlamaBackendDeviceType::Cpu)
        .map(|d| format!("{} ({}, {} MiB free)", d.name, d.description, d.memory_free >> 20))
        .collect();
    let offload = backend().supports_gpu_offload();
    tracing::info!(gpu_offload = offload, devices = ?gpus, gpu_layers = ?gpu_layers, "llama.cpp devices");
    match gpu_layers {
        Some(n) if n > 0 && !offload => Err(format!(
            "--n-gpu-layers {n}: llama.cpp found no GPU (this build has no GPU backend, or none is visible to it); \
             build tokenomy with `--features cuda` (or vulkan, metal) on a machine with a GPU, or pass --n-gpu-layers 0"
        )),
        Some(n) => Ok(LlamaModelParams::default().with_n_gpu_layers(n)),
        None => Ok(LlamaModelParams::default()),
    }
}

/// Cells of one KV stream come in multiples of this (llama.cpp pads each stream to it).
const KV_STREAM_CELLS_ALIGN: u32 = 256;

/// Per-sequence context and total KV cells: each of the `slots` KV streams gets an equal
/// share of the cells (llama.cpp splits `n_ctx` so, padding each share to 256), and a
/// sequence fits in its stream. The total never exceeds what was asked for.
fn kv_layout(cfg: &ModelConfig, train_ctx: u32) -> Result<(u32, u32), String> {
    let slots = u32::try_from(cfg.slots).ok().filter(|&n| (1..=256).contains(&n)).ok_or("slots must be in 1..=256")?;
    let ctx = cfg.ctx_tokens_max.unwrap_or(train_ctx.min(8192)).min(train_ctx).max(1);
    let per_slot_wanted = ctx.div_ceil(KV_STREAM_CELLS_ALIGN) * KV_STREAM_CELLS_ALIGN;
    let total = cfg.kv_cells_max.unwrap_or(per_slot_wanted.saturating_mul(slots));
    let per_slot = total / slots / KV_STREAM_CELLS_ALIGN * KV_STREAM_CELLS_ALIGN;
    if per_slot == 0 {
        return Err(format!("{total} KV cells for {slots} slots: each slot needs at least {KV_STREAM_CELLS_ALIGN}"));
    }
    if cfg.ctx_tokens_max.is_some() && ctx > per_slot {
        return Err(format!(
            "a context of {ctx} tokens (--ctx-size) does not fit the {per_slot} KV cells of each of {slots} slots \
             (--parallel; {total} cells in all, --kv-cells, a multiple of {KV_STREAM_CELLS_ALIGN} each): \
             raise --kv-cells or lower --ctx-size or --parallel"
        ));
    }
    Ok((ctx.min(per_slot), per_slot * slots))
}

type WorkerHandles = (SyncSender<Submission>, std::thread::JoinHandle<()>);

fn spawn_worker(model: Arc<LlamaModel>, config: WorkerConfig, metrics: Arc<Metrics>) -> Result<WorkerHandles, String> {
    let (tx, rx) = sync_channel(config.limits.queue_max + config.limits.slots);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("tokenomy-worker".into())
        .spawn(move || worker::run(model, config, rx, metrics, move |r| drop(ready_tx.send(r))))
        .map_err(|e| format!("cannot start the worker thread: {e}"))?;
    ready_rx.recv().map_err(|_| "the worker thread died while starting".to_string())??;
    Ok((tx, worker))
}

fn chat_template(model: &LlamaModel, cfg: &ModelConfig) -> Result<Option<ChatTemplate>, String> {
    let source = match &cfg.chat_template {
        Some(arg) => Some(match template::builtin(arg) {
            Some(builtin) => builtin.to_string(),
            None => std::fs::read_to_string(arg).map_err(|e| format!("--chat-template {arg}: {e}"))?,
        }),
        None => model.meta_val_str("tokenizer.chat_template").ok(),
    };
    let Some(source) = source else { return Ok(None) };
    let vocab = model.vocab();
    let piece = |t: LlamaToken| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let bos = if vocab.bos().0 >= 0 { piece(vocab.bos()) } else { String::new() };
    let eos = if vocab.eos().0 >= 0 { piece(vocab.eos()) } else { String::new() };
    ChatTemplate::new(&source, &bos, &eos).map(Some).map_err(|e| format!("model {}: {e}", cfg.name))
}

/// sha256 of a file, hex.
pub fn file_sha256(path: &Path) -> Result<String, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

impl Backend for Engine {
    fn models(&self) -> Vec<ModelInfo> {
        self.models
            .iter()
            .map(|m| ModelInfo { sha256: m.sha256.get().cloned(), ..m.info.clone() })
            .collect()
    }

    fn ready(&self) -> bool {
        !self.models.is_empty()
    }

    fn tokenize(&self, model: &str, text: &str, add_special: bool) -> Result<Vec<TokenId>, BackendError> {
        let m = self.get(model)?;
        // Cut at special tokens here, not by llama.cpp (quadratic in them; see `prompt`).
        Ok(m.specials.tokenize(&m.model, text, &[], add_special))
    }

    fn detokenize(&self, model: &str, tokens: &[TokenId]) -> Result<String, BackendError> {
        let m = self.get(model)?;
        let vocab = m.model.vocab();
        let n = vocab.n_tokens();
        let mut bytes = Vec::new();
        for &t in tokens {
            if t < 0 || t >= n {
                return Err(BackendError::InvalidRequest(format!("token id {t} is outside the vocabulary (0..{n})")));
            }
            bytes.extend(vocab.token_to_piece(LlamaToken(t), false, None));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn render_chat(&self, model: &str, messages: &[ChatMessage], tools: &[serde_json::Value]) -> Result<ChatPrompt, BackendError> {
        let m = self.get(model)?;
        let template = m.template.as_ref().ok_or_else(|| {
            BackendError::InvalidRequest(format!(
                "the model `{model}` has no chat template in its GGUF file; use /v1/completions, or start the server with --chat-template chatml|gemma|FILE"
            ))
        })?;
        let (messages, tools): (Vec<ChatMessage>, Vec<serde_json::Value>) =
            (m.specials.wrap_messages(messages), tools.iter().map(|t| m.specials.wrap_value(t)).collect());
        let marked = template.render(&messages, &tools).map_err(BackendError::InvalidRequest)?;
        let (mut text, mut plain) = prompt::unmark(&marked);
        // The tokenizer adds BOS itself (add_special); a template that also writes it would double it.
        let bos = template.bos_token();
        if !bos.is_empty() && m.model.vocab().should_add_bos() && text.starts_with(bos) {
            text.drain(..bos.len());
            plain.iter_mut().for_each(|r| *r = r.start.saturating_sub(bos.len())..r.end.saturating_sub(bos.len()));
        }
        let tokens = m.specials.tokenize(&m.model, &text, &plain, true);
        Ok(ChatPrompt { text, tokens })
    }

    fn embed(&self, model: &str, inputs: Vec<Vec<TokenId>>) -> Result<oneshot::Receiver<Result<Vec<Vec<f32>>, BackendError>>, BackendError> {
        let m = self.get(model)?;
        let e = m.embedder()?;
        for (i, input) in inputs.iter().enumerate() {
            if input.is_empty() {
                return Err(BackendError::InvalidParam("input", format!("input {i} is empty: there is nothing to embed")));
            }
            if input.len() > e.input_tokens_max as usize {
                let msg = format!("input {i} has {} tokens; `{model}` embeds at most {} tokens per input", input.len(), e.input_tokens_max);
                return Err(BackendError::InvalidParam("input", msg));
            }
            if let Some(t) = input.iter().find(|t| !(0..m.model.vocab().n_tokens()).contains(*t)) {
                return Err(BackendError::InvalidParam("input", format!("token id {t} is outside the vocabulary")));
            }
        }
        e.submit(inputs)
    }

    fn generate(&self, requests: Vec<GenerateRequest>) -> Result<Vec<Generation>, BackendError> {
        let Some(first) = requests.first() else { return Ok(Vec::new()) };
        let m = self.get(&first.model)?;
        if let Some(other) = requests.iter().find(|r| r.model != first.model) {
            return Err(BackendError::InvalidRequest(format!("one request cannot mix models (`{}` and `{}`)", first.model, other.model)));
        }
        let (wanted, queue_max) = (requests.len(), m.limits.queue_max);
        if wanted > queue_max {
            let msg = format!("this request asks for {wanted} generations (prompts × n) and `{}` queues at most {queue_max} (--queue-max)", m.info.name);
            return Err(BackendError::InvalidParam("n", msg));
        }
        let mut subs = Vec::with_capacity(wanted);
        let mut generations = Vec::with_capacity(wanted);
        for request in requests {
            validate_prompt(m, &request)?;
            let (sub, generation) = self.submission(m, request)?;
            subs.push(sub);
            generations.push(generation);
        }
        if m.queued.stopped() {
            return Err(BackendError::Internal("the model's worker has stopped".into()));
        }
        if m.queued.cancelling() {
            return Err(BackendError::Overloaded("the node is shutting down".into()));
        }
        let slots = m.limits.slots;
        if !m.queued.reserve(wanted, queue_max + slots) {
            let waiting = m.queued.len().saturating_sub(slots);
            return Err(BackendError::Overloaded(format!(
                "`{}` is busy: its {slots} slots run (--parallel) and {waiting} of its {queue_max} queue places are taken (--queue-max)",
                m.info.name,
            )));
        }
        let mut unsent = wanted;
        for sub in subs {
            if let Err(e) = m.tx.try_send(sub) {
                // Those sent are cancelled by the worker once it sees their receivers dropped.
                m.queued.release(unsent);
                return Err(BackendError::Internal(match e {
                    TrySendError::Disconnected(_) => "the model's worker has stopped".into(),
                    TrySendError::Full(_) => "the model's queue is full although its places were reserved".into(),
                }));
            }
            unsent -= 1;
        }
        Ok(generations)
    }

    fn has_room(&self, model: &str, wanted: usize) -> bool {
        self.get(model).is_ok_and(|m| !m.queued.cancelling() && m.queued.len() + wanted <= m.limits.queue_max + m.limits.slots)
    }

    fn cancel_all(&self) {
        for m in &self.models {
            m.queued.cancelling.store(true, Ordering::SeqCst);
        }
    }

    fn metrics_text(&self) -> String {
        let mut out = String::new();
        for m in &self.models {
            m.metrics.render(&m.info.name, &mut out);
        }
        out
    }
}

fn validate_prompt(m: &LoadedModel, request: &GenerateRequest) -> Result<(), BackendError> {
    if request.prompt.is_empty() {
        return Err(BackendError::InvalidRequest("the prompt is empty".into()));
    }
    let n_vocab = m.model.n_vocab();
    if let Some(bad) = request.prompt.iter().find(|&&t| t < 0 || t >= n_vocab) {
        return Err(BackendError::InvalidRequest(format!("token id {bad} is outside the vocabulary (0..{n_vocab})")));
    }
    if let Some((bad, _)) = request.params.logit_bias.iter().find(|&&(t, _)| t < 0 || t >= n_vocab) {
        let msg = format!("logit_bias names token id {bad}, outside the vocabulary of `{}` (0..{n_vocab})", m.info.name);
        return Err(BackendError::InvalidParam("logit_bias", msg));
    }
    BackendError::check_context(m.limits.ctx_tokens_max, request.prompt.len(), request.params.max_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(slots: usize, ctx: Option<u32>, kv: Option<u32>) -> Result<(u32, u32), String> {
        let cfg = ModelConfig { slots, ctx_tokens_max: ctx, kv_cells_max: kv, ..ModelConfig::new("m", "m.gguf") };
        kv_layout(&cfg, 8192)
    }

    #[test]
    fn each_slot_gets_a_whole_context_by_default_and_never_more_cells_than_asked() {
        assert_eq!(layout(8, Some(1024), None), Ok((1024, 8 * 1024)));
        assert_eq!(layout(8, None, None), Ok((8192, 8 * 8192)));
        assert_eq!(layout(2, Some(1000), None), Ok((1000, 2 * 1024)), "streams come in multiples of 256");
        assert_eq!(layout(4, None, Some(1024)), Ok((256, 1024)), "no context asked: it shrinks to the share");
        assert_eq!(layout(3, None, Some(1000)), Ok((256, 768)), "rounded down, never above the cap");
        let err = layout(4, Some(512), Some(1024)).unwrap_err();
        assert!(err.contains("does not fit the 256 KV cells of each of 4 slots"), "{err}");
        assert!(layout(8, Some(256), Some(1024)).unwrap_err().contains("at least 256"));
        assert!(layout(0, None, None).is_err());
    }
}
