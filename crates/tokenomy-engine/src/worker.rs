//! The worker thread: owns one model's llama.cpp context and carries out the scheduler's plans.
//!
//! It is the only code that calls `llama_decode`. Per step: take new submissions (bounded
//! channel), drop cancelled jobs, ask the scheduler for a plan, apply its KV operations, decode
//! one batch, then sample for every sequence that needs a token and stream the text out.

use tokenomy_chat::reasoning::{ReasoningSplitter, Start};
use tokenomy_core::ReasoningMode;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokenomy_core::{Event, FinishReason, LogprobEntry, Outcome, PromptLogprob, TokenId, TokenLogprob, Usage};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::sampler::{self, Sampler};
use crate::scheduler::{decode_groups, BatchEntry, JobId, JobSpec, KvOp, Limits, Scheduler, SeqId};
use crate::text::TextStream;

/// A job as handed to the worker.
pub struct Submission {
    pub spec: JobSpec,
    pub sampler: Sampler,
    pub stops: Vec<String>,
    pub logprobs_top: Option<u8>,
    pub ignore_eos: bool,
    pub reasoning: tokenomy_core::ReasoningMode,
    /// Reasoning tokens allowed before `close_reasoning` is forced.
    pub reasoning_budget: Option<u32>,
    /// The tokens that close a think block (`\n</think>\n\n`).
    pub close_reasoning: Vec<TokenId>,
    pub constraint: Option<crate::constraint::Constraint>,
    pub answer_end: Option<tokenomy_core::AnswerEnd>,
    pub events: mpsc::UnboundedSender<Event>,
    pub outcome: oneshot::Sender<Outcome>,
}

struct Running {
    sub: Submission,
    text: TextStream,
    output: String,
    usage: Usage,
    /// Log-probabilities of prompt tokens 1.. (token 0 has none).
    /// The prompt's logprobs while it is prefilled (echo); taken when the first token is sampled.
    prompt_logprobs: Option<Vec<LogprobEntry>>,
    /// Tracks the think block so reasoning tokens are counted exactly.
    reasoning: Option<ReasoningSplitter>,
    /// Tokens to emit next instead of sampling (the think block closed at its budget).
    forced: std::collections::VecDeque<TokenId>,
    budget_spent: bool,
    /// Holds a place in the engine (waiting or running), until it ends.
    queued: bool,
}

impl Running {
    fn leave_queue(&mut self, queued: &crate::Queued) {
        if std::mem::take(&mut self.queued) {
            queued.release(1);
        }
    }

    /// Once the think block has used its budget, the tokens that close it come next.
    fn close_reasoning_at_budget(&mut self) {
        let (Some(budget), Some(r)) = (self.sub.reasoning_budget, self.reasoning.as_ref()) else { return };
        if !self.budget_spent && r.in_reasoning() && self.usage.reasoning_tokens >= budget {
            self.budget_spent = true;
            self.forced.extend(self.sub.close_reasoning.iter().copied());
        }
    }
}

pub struct WorkerConfig {
    pub limits: Limits,
    pub threads: i32,
    pub prefix_reuse: bool,
    /// Shared with the engine's `generate`, which takes the places this worker releases.
    pub queued: Arc<crate::Queued>,
}

/// Runs until every sender of `rx` is dropped. Calls `ready` once the context exists.
pub fn run(
    model: Arc<LlamaModel>,
    config: WorkerConfig,
    rx: Receiver<Submission>,
    metrics: Arc<Metrics>,
    ready: impl FnOnce(Result<(), String>),
) {
    let _alive = crate::WorkerAlive(config.queued.clone());
    let backend = crate::backend();
    let limits = config.limits;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(limits.kv_cells_max))
        .with_n_batch(limits.step_tokens_max)
        .with_n_ubatch(limits.step_tokens_max.min(512))
        .with_n_seq_max(limits.slots as u32)
        // One KV stream per slot: a sequence's attention spans only its own cells (in a
        // unified cache every token attends over, or at least scans the mask of, every cell in
        // use), and its cells sit where they would if it ran alone, so batched results round
        // as solo ones do. Prefixes move between slots by stream copies (`KvOp::CopyPrefix`).
        .with_kv_unified(false)
        .with_n_threads(config.threads)
        .with_n_threads_batch(config.threads);
    let ctx = match model.new_context(backend, params) {
        Ok(ctx) => ctx,
        Err(e) => return ready(Err(format!("cannot create a llama.cpp context: {e}"))),
    };
    ready(Ok(()));
    let mut w = Worker {
        model: &model,
        ctx,
        sched: Scheduler::new(limits, config.prefix_reuse),
        jobs: HashMap::new(),
        batch: LlamaBatch::new(limits.step_tokens_max as usize, 1),
        eog: eog_tokens(&model),
        logits: Vec::new(),
        metrics,
        queued: config.queued,
    };
    w.run(rx);
}

struct Worker<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    sched: Scheduler,
    jobs: HashMap<JobId, Running>,
    batch: LlamaBatch<'static>,
    /// End-of-generation tokens, banned under `ignore_eos` (computed once: it scans the vocabulary).
    eog: Vec<TokenId>,
    /// A copy of the logits row being sampled, reused from token to token (a fresh
    /// vocabulary-sized `Vec` is an mmap and page faults every time).
    logits: Vec<f32>,
    metrics: Arc<Metrics>,
    queued: Arc<crate::Queued>,
}

impl Worker<'_> {
    fn run(&mut self, rx: Receiver<Submission>) {
        loop {
            if !self.intake(&rx) {
                return;
            }
            if self.queued.cancelling() {
                self.cancel_all();
            }
            self.drop_cancelled();
            let plan = self.sched.plan();
            for (id, cached) in &plan.admitted {
                if let Some(job) = self.jobs.get_mut(id) {
                    job.usage.cached_tokens = *cached;
                    job.usage.prompt_tokens = *cached;
                    let _ = job.sub.events.send(Event::Admitted { cached_tokens: *cached });
                }
            }
            self.apply_kv_ops(&plan.kv_ops);
            self.publish_gauges();
            if plan.batch.is_empty() {
                continue;
            }
            for group in decode_groups(&plan.batch) {
                let entries: Vec<BatchEntry> = group.iter().map(|&i| plan.batch[i].clone()).collect();
                let started = std::time::Instant::now();
                let decoded = self.decode(&entries);
                let decode_ms = started.elapsed().as_secs_f64() * 1e3;
                match decoded {
                    Ok(()) => {
                        self.count_prompt_tokens(&entries);
                        self.consume_outputs(&entries);
                        let sample_ms = started.elapsed().as_secs_f64() * 1e3 - decode_ms;
                        tracing::debug!(tokens = entries.len(), seqs = ?seq_lens(&entries), decode_ms, sample_ms, "llama_decode");
                    }
                    Err(e) => {
                        self.fail_all(&e);
                        break;
                    }
                }
            }
        }
    }

    /// Moves submissions into the scheduler. Blocks when there is nothing to do.
    /// Returns false when the engine was dropped (what still ran is cancelled).
    fn intake(&mut self, rx: &Receiver<Submission>) -> bool {
        if self.sched.is_idle() {
            // The last step's gauges still count the jobs it finished.
            self.publish_gauges();
            match rx.recv() {
                Ok(sub) => self.accept(sub),
                Err(_) => return false,
            }
        }
        // The channel holds no more than the queue places `generate` reserved.
        loop {
            match rx.try_recv() {
                Ok(sub) => self.accept(sub),
                Err(TryRecvError::Empty) => break,
                // The engine was dropped: nobody submits or waits any more (see `Drop for
                // LoadedModel`), so what still runs is cancelled rather than finished.
                Err(TryRecvError::Disconnected) => {
                    self.cancel_all();
                    return false;
                }
            }
        }
        true
    }

    fn accept(&mut self, sub: Submission) {
        let spec = sub.spec.clone();
        let id = spec.id;
        if let Err(e) = self.sched.submit(spec) {
            let msg = format!("rejected by the scheduler: {e:?}");
            let _ = sub.outcome.send(Outcome { finish_reason: FinishReason::Error, usage: Usage::default(), text: String::new(), error: Some(msg), stop_sequence: None });
            self.queued.release(1);
            return;
        }
        let text = TextStream::new(sub.stops.clone());
        // prompt_tokens grows as prompt tokens are reused (admission) or decoded, so a job
        // cancelled while waiting or mid-prompt is metered for what was processed only.
        let usage = Usage::default();
        let reasoning = match sub.reasoning {
            ReasoningMode::Off => None,
            ReasoningMode::OpenedByPrompt => Some(ReasoningSplitter::new(Start::InReasoning)),
            ReasoningMode::Detect => Some(ReasoningSplitter::new(Start::Detect)),
        };
        let forced = std::collections::VecDeque::new();
        let job = Running { sub, text, output: String::new(), usage, prompt_logprobs: Some(Vec::new()), reasoning, forced, budget_spent: false, queued: true };
        self.jobs.insert(id, job);
    }

    fn cancel_all(&mut self) {
        let all: Vec<JobId> = self.jobs.keys().copied().collect();
        self.cancel(all);
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<JobId> = self.jobs.iter().filter(|(_, j)| j.sub.events.is_closed()).map(|(id, _)| *id).collect();
        self.cancel(gone);
    }

    /// Ends jobs, waiting or running, as `Cancelled` (metered for what was processed).
    fn cancel(&mut self, ids: Vec<JobId>) {
        for id in ids {
            self.sched.remove_waiting(id);
            self.finish(id, FinishReason::Cancelled, None);
        }
    }

    fn apply_kv_ops(&mut self, ops: &[KvOp]) {
        for op in ops {
            match *op {
                KvOp::Truncate { seq, from } => {
                    if !matches!(self.ctx.clear_kv_cache_seq(Some(seq as u32), Some(from), None), Ok(true)) {
                        // Partial removal unsupported (e.g. sliding-window caches): drop all.
                        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
                    }
                }
                KvOp::CopyPrefix { src, dst, len } => {
                    // Across streams llama.cpp copies a whole stream (done at the next decode,
                    // before its tokens are written): copy, then drop what follows the prefix.
                    let _ = self.ctx.copy_kv_cache_seq(src, dst, None, None);
                    let _ = self.ctx.clear_kv_cache_seq(Some(dst as u32), Some(len), None);
                }
            }
        }
    }

    fn decode(&mut self, entries: &[BatchEntry]) -> Result<(), String> {
        self.batch.clear();
        for e in entries {
            self.batch
                .add(LlamaToken(e.token), e.pos as i32, &[e.seq], e.logits)
                .map_err(|err| format!("batch: {err}"))?;
        }
        self.ctx.decode(&mut self.batch).map_err(|err| format!("llama_decode failed: {err}"))?;
        self.metrics.add_decoded(entries.len() as u64);
        Ok(())
    }

    fn count_prompt_tokens(&mut self, entries: &[BatchEntry]) {
        for e in entries {
            if let Some(job) = self.jobs.get_mut(&e.job) {
                if (e.pos as usize) < job.sub.spec.prompt.len() {
                    job.usage.prompt_tokens += 1;
                }
            }
        }
    }

    fn consume_outputs(&mut self, entries: &[BatchEntry]) {
        for (i, e) in entries.iter().enumerate() {
            if !e.logits || !self.jobs.contains_key(&e.job) {
                continue;
            }
            let mut logits = std::mem::take(&mut self.logits);
            logits.clear();
            logits.extend_from_slice(self.ctx.get_logits_ith(i as i32));
            if e.samples {
                self.sample(e.job, &logits);
            } else {
                self.prompt_logprob(e, &logits);
            }
            self.logits = logits;
        }
    }

    fn prompt_logprob(&mut self, e: &BatchEntry, logits: &[f32]) {
        let model = self.model;
        let job = self.jobs.get_mut(&e.job).expect("checked");
        if !job.sub.spec.echo_logits {
            return;
        }
        let (Some(&next), Some(lps)) = (job.sub.spec.prompt.get(e.pos as usize + 1), job.prompt_logprobs.as_mut()) else { return };
        lps.push(logprob_entry(model, logits, next, job.sub.logprobs_top.unwrap_or(0) as usize));
    }

    fn sample(&mut self, id: JobId, logits: &[f32]) {
        let model = self.model;
        let job = self.jobs.get_mut(&id).expect("checked");
        // Once, with the first token: later samples have no prompt left to score.
        if let (true, Some(lps)) = (job.sub.spec.echo_logits, job.prompt_logprobs.take()) {
            let first = token_text(model, job.sub.spec.prompt[0]);
            let mut all = vec![PromptLogprob { text: first, entry: None }];
            all.extend(lps.into_iter().map(|e| PromptLogprob { text: e.chosen.text.clone(), entry: Some(e) }));
            let _ = job.sub.events.send(Event::PromptLogprobs(all));
        }
        if job.sub.spec.max_tokens == 0 {
            return self.finish(id, FinishReason::Length, None);
        }
        job.close_reasoning_at_budget();
        let banned: &[TokenId] = if job.sub.ignore_eos { &self.eog } else { &[] };
        let restrict = job.sub.constraint.as_mut().map(|c| move |l: &mut [f32]| c.mask(l));
        let token = match job.forced.pop_front() {
            Some(t) => t,
            None => match job.sub.sampler.sample_restricted(logits, banned, restrict) {
                Ok(t) => t,
                Err(e) => return self.finish(id, FinishReason::Error, Some(format!("constraint: {e}"))),
            },
        };
        job.sub.sampler.accept(token);
        let constraint_done = match job.sub.constraint.as_mut() {
            Some(c) => {
                if let Err(e) = c.accept(token) {
                    return self.finish(id, FinishReason::Error, Some(format!("constraint: {e}")));
                }
                c.is_done()
            }
            None => false,
        };
        job.usage.completion_tokens += 1;
        if model.vocab().is_eog(LlamaToken(token)) && !job.sub.ignore_eos {
            return self.finish(id, FinishReason::Stop, None);
        }
        let logprob = job.sub.logprobs_top.map(|n| logprob_entry(model, logits, token, n as usize));
        let piece = model.vocab().token_to_piece(LlamaToken(token), false, None);
        if let Some(r) = job.reasoning.as_mut() {
            // A token is reasoning if the think block is open before or after it (so the
            // tokens that open and close the block count too).
            let before = r.in_reasoning();
            r.push(&String::from_utf8_lossy(&piece));
            if before || r.in_reasoning() {
                job.usage.reasoning_tokens += 1;
            }
        }
        let released = job.text.push(&piece);
        job.output.push_str(&released.text);
        let answered = job.sub.answer_end.as_mut().is_some_and(|end| (end.0)(&released.text));
        let _ = job.sub.events.send(Event::Token { text: released.text, logprob });
        if released.stopped || constraint_done || answered {
            return self.finish(id, FinishReason::Stop, None);
        }
        if !self.sched.on_sampled(id, token) {
            self.finish(id, FinishReason::Length, None);
        }
    }

    fn finish(&mut self, id: JobId, reason: FinishReason, error: Option<String>) {
        self.sched.finish(id);
        let Some(mut job) = self.jobs.remove(&id) else { return };
        job.leave_queue(&self.queued);
        let tail = job.text.finish();
        if !tail.is_empty() {
            job.output.push_str(&tail);
            let _ = job.sub.events.send(Event::Token { text: tail, logprob: None });
        }
        self.metrics.add_finished(&job.usage);
        let stop_sequence = job.text.matched_stop().map(str::to_string);
        let outcome = Outcome { finish_reason: reason, usage: job.usage, text: job.output, error, stop_sequence };
        let _ = job.sub.outcome.send(outcome);
    }

    fn fail_all(&mut self, error: &str) {
        tracing::error!(%error, "decode failed; clearing the KV cache and failing running jobs");
        let ids = self.sched.reset_caches();
        self.ctx.clear_kv_cache();
        for id in ids {
            self.finish(id, FinishReason::Error, Some(error.to_string()));
        }
    }

    fn publish_gauges(&self) {
        self.metrics.set_gauges(
            self.queued.len().saturating_sub(self.sched.running_len()) as u64,
            self.sched.running_len() as u64,
            self.sched.reserved_cells() as u64,
            self.sched.cached_cells() as u64,
        );
    }
}

/// (sequence, tokens) of a decode call, for the step trace.
fn seq_lens(entries: &[BatchEntry]) -> Vec<(SeqId, usize)> {
    let mut out: Vec<(SeqId, usize)> = Vec::new();
    for e in entries {
        match out.last_mut() {
            Some((s, n)) if *s == e.seq => *n += 1,
            _ => out.push((e.seq, 1)),
        }
    }
    out
}

fn eog_tokens(model: &LlamaModel) -> Vec<TokenId> {
    let vocab = model.vocab();
    (0..vocab.n_tokens()).filter(|&t| vocab.is_eog(LlamaToken(t))).collect()
}

/// A token's piece as clients see it in logprobs (special tokens rendered).
fn token_bytes(model: &LlamaModel, token: TokenId) -> Vec<u8> {
    model.vocab().token_to_piece(LlamaToken(token), true, None)
}

fn token_text(model: &LlamaModel, token: TokenId) -> String {
    String::from_utf8_lossy(&token_bytes(model, token)).into_owned()
}

fn token_logprob(model: &LlamaModel, token: TokenId, logprob: f32) -> TokenLogprob {
    let bytes = token_bytes(model, token);
    TokenLogprob { token, text: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob }
}

fn logprob_entry(model: &LlamaModel, logits: &[f32], chosen: TokenId, top_n: usize) -> LogprobEntry {
    let (lp, top) = sampler::logprobs(logits, chosen, top_n);
    LogprobEntry {
        chosen: token_logprob(model, chosen, lp),
        top: top.into_iter().map(|(t, l)| token_logprob(model, t, l)).collect(),
    }
}
