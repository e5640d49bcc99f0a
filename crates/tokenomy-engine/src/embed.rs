//! Embeddings: each model gets, on its first embedding request, a second llama.cpp context of
//! its own (embeddings on, pooled) on a thread of its own, fed by a bounded queue.
//!
//! Why not the generation worker's context: pooling is fixed when a context is made, and an
//! embedding must see its whole input in one micro-batch, which the scheduler's chunked prefill
//! never gives it. A separate context shares the model's weights (the `Arc<LlamaModel>`), costs
//! only its small KV and compute buffers, and is made only when someone asks for embeddings.
//!
//! Pooling is the GGUF's own (`{arch}.pooling_type`, as embedding models such as
//! Qwen3-Embedding or nomic-embed declare it) or, for a chat model that declares none, the mean
//! of the last hidden states. Vectors are L2-normalised, as OpenAI's are.

use std::num::NonZeroU32;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokenomy_core::{BackendError, TokenId};
use tokio::sync::oneshot;

/// Embedding requests that may wait for a model's embedding thread; past it, 429.
pub const EMBED_QUEUE_MAX: usize = 16;
/// Tokens one input may hold (the embedding context's micro-batch), at most.
pub const EMBED_INPUT_TOKENS_MAX: u32 = 1024;

pub(crate) type Vectors = Result<Vec<Vec<f32>>, BackendError>;

struct Job {
    inputs: Vec<Vec<TokenId>>,
    reply: oneshot::Sender<Vectors>,
}

/// A model's embedding thread; dropping it closes the queue and joins the thread.
pub(crate) struct Embedder {
    tx: Option<SyncSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Tokens one input may hold.
    pub(crate) input_tokens_max: u32,
}

impl Embedder {
    pub(crate) fn start(model: Arc<LlamaModel>, ctx_tokens_max: u32, threads: i32) -> Result<Embedder, String> {
        let input_tokens_max = ctx_tokens_max.min(EMBED_INPUT_TOKENS_MAX).max(1);
        let (tx, rx) = sync_channel(EMBED_QUEUE_MAX);
        let thread = std::thread::Builder::new()
            .name("tokenomy-embed".into())
            .spawn(move || run(&model, input_tokens_max, threads, rx))
            .map_err(|e| format!("cannot start the embedding thread: {e}"))?;
        Ok(Embedder { tx: Some(tx), thread: Some(thread), input_tokens_max })
    }

    /// Queues `inputs` (each at most `input_tokens_max` tokens, checked by the caller); the
    /// vectors come on the receiver, in the inputs' order.
    pub(crate) fn submit(&self, inputs: Vec<Vec<TokenId>>) -> Result<oneshot::Receiver<Vectors>, BackendError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().expect("open until dropped");
        match tx.try_send(Job { inputs, reply }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(BackendError::Overloaded(format!("{EMBED_QUEUE_MAX} embedding requests are already waiting"))),
            Err(TrySendError::Disconnected(_)) => Err(BackendError::Internal("the embedding thread stopped".into())),
        }
    }
}

impl Drop for Embedder {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The GGUF's pooling when it declares one, the mean otherwise.
fn pooling(model: &LlamaModel) -> LlamaPoolingType {
    let arch = model.meta_val_str("general.architecture").unwrap_or_default();
    match model.meta_val_str(&format!("{arch}.pooling_type")) {
        Ok(_) => LlamaPoolingType::Unspecified,
        Err(_) => LlamaPoolingType::Mean,
    }
}

fn run(model: &LlamaModel, input_tokens_max: u32, threads: i32, rx: Receiver<Job>) {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(input_tokens_max))
        .with_n_batch(input_tokens_max)
        .with_n_ubatch(input_tokens_max)
        .with_n_seq_max(1)
        .with_embeddings(true)
        .with_pooling_type(pooling(model))
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = match model.new_context(crate::backend(), params) {
        Ok(ctx) => ctx,
        Err(e) => {
            let why = format!("cannot create the embedding context: {e}");
            tracing::error!("{why}");
            for job in rx {
                let _ = job.reply.send(Err(BackendError::Internal(why.clone())));
            }
            return;
        }
    };
    let mut batch = LlamaBatch::new(input_tokens_max as usize, 1);
    for job in rx {
        if job.reply.is_closed() {
            continue; // the client left while it waited
        }
        let vectors = job
            .inputs
            .iter()
            .map(|input| {
                assert!(!input.is_empty() && input.len() <= input_tokens_max as usize, "inputs are checked by Engine::embed");
                embed_one(&mut ctx, &mut batch, input)
            })
            .collect();
        let _ = job.reply.send(vectors);
    }
}

fn embed_one(ctx: &mut llama_cpp_2::context::LlamaContext<'_>, batch: &mut LlamaBatch, input: &[TokenId]) -> Result<Vec<f32>, BackendError> {
    ctx.clear_kv_cache();
    batch.clear();
    for (pos, &t) in input.iter().enumerate() {
        batch.add(LlamaToken(t), pos as i32, &[0], true).map_err(|e| BackendError::Internal(e.to_string()))?;
    }
    ctx.decode(batch).map_err(|e| BackendError::Internal(format!("embedding decode: {e}")))?;
    let v = ctx.embeddings_seq_ith(0).map_err(|_| BackendError::Internal("the model gave no pooled embedding".into()))?;
    Ok(normalized(v))
}

/// `v` scaled to unit length (a zero vector stays zero).
pub(crate) fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn vectors_are_unit_length() {
        let v = super::normalized(&[3.0, 4.0]);
        assert_eq!(v, vec![0.6, 0.8]);
        assert_eq!(super::normalized(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}
