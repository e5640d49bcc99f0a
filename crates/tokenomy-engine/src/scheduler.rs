//! The scheduler's state: which sequence occupies which KV slot, which tokens go into the next
//! `llama_decode`, and what is cached. A plain struct with no threads and no llama.cpp calls,
//! so every decision is unit-tested; the worker thread (`worker.rs`) only carries out its plans.
//!
//! Continuous batching: every step feeds one token for each decoding sequence plus chunks of
//! waiting prompts, up to `step_tokens_max`. New requests join between steps.
//!
//! Prefix cache: every slot (one sequence, one KV stream of its own) remembers the exact tokens
//! whose KV it holds. A new request takes a free slot that keeps the running slots consecutive
//! (see `compact`), among those the one whose cache shares the longest prefix with its prompt,
//! or copies a longer prefix from any other slot (`KvOp::CopyPrefix`: the
//! worker copies that slot's stream and drops what follows the prefix), and only the rest of
//! its prompt is computed. A request whose prompt shares a prefix
//! with a running request that is still computing it waits in the queue until that prefix is
//! in the cache (when at least [`SHARED_WAIT_TOKENS_MIN`] tokens would otherwise be computed
//! twice): eight agents sending the same system prompt at once compute it once, not eight times.
//!
//! Architecture Invariant: `reserved_cells() <= kv_cells_max` after every call.

use std::cmp::Reverse;
use std::collections::VecDeque;
use tokenomy_core::TokenId;

pub type JobId = u64;

/// A queued request waits for a running one to finish computing a shared prefix only when it
/// would otherwise compute at least this many of that prefix's tokens itself.
pub const SHARED_WAIT_TOKENS_MIN: usize = 16;
/// Flash attention on the CPU runs a sequence's prompt chunk of at least this many tokens
/// through its tiled kernel (f32 sums), shorter ones through the per-token kernel (f16 sums).
/// A chunk that leaves its prompt unfinished is at least this long, and leaves at least this
/// much, so every prompt of at least this length is computed by the tiled kernel however it
/// is cut into chunks, alone or batched. Applies when a step leaves prefills room for two.
pub const PREFILL_CHUNK_MIN: usize = 64;
/// A prefix is copied from another slot only when it saves computing at least this many
/// tokens: a copy moves that slot's whole KV stream, which for a few tokens (a chat
/// template's opening) costs more than computing them.
pub const PREFIX_COPY_TOKENS_MIN: usize = 16;
pub type SeqId = i32;

/// A request waiting for, or holding, a slot.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub id: JobId,
    pub prompt: Vec<TokenId>,
    pub max_tokens: u32,
    /// Compute logits for every prompt token (prompt log-probabilities).
    pub echo_logits: bool,
    /// Its prefix-cache namespace: it shares cached tokens only with jobs of the same salt.
    pub cache_salt: u64,
}

#[derive(Debug)]
struct Job {
    spec: JobSpec,
    /// Prompt tokens already in the KV cache.
    prompt_done: usize,
    /// Of those, how many came from the prefix cache.
    cached_tokens: u32,
    /// The last sampled token, to be fed at the next step.
    next_token: Option<TokenId>,
    generated: u32,
}

#[derive(Debug, Default)]
struct Slot {
    /// Exactly the tokens whose KV this sequence holds, at positions 0..len.
    cached: Vec<TokenId>,
    /// The cache salt of the job that computed them.
    salt: u64,
    job: Option<Job>,
    last_used_step: u64,
}

/// A KV-cache operation the worker must apply before the batch of the same plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Drop positions `from..` of `seq`.
    Truncate { seq: SeqId, from: u32 },
    /// Drop all of `dst`, then share positions `0..len` of `src` into it.
    CopyPrefix { src: SeqId, dst: SeqId, len: u32 },
}

/// One token of the next batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    pub job: JobId,
    pub seq: SeqId,
    pub token: TokenId,
    pub pos: u32,
    /// Whether logits are needed at this position.
    pub logits: bool,
    /// This position's logits predict the next token to sample (not just a prompt logprob).
    pub samples: bool,
}

/// What to do in one step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub kv_ops: Vec<KvOp>,
    pub batch: Vec<BatchEntry>,
    /// Jobs that got a slot in this step, with their cached prefix length.
    pub admitted: Vec<(JobId, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub slots: usize,
    pub kv_cells_max: u32,
    pub step_tokens_max: u32,
    pub queue_max: usize,
    /// Tokens one sequence may hold (prompt + completion).
    pub ctx_tokens_max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    QueueFull,
    TooLarge { needed: u32, limit: u32 },
}

pub struct Scheduler {
    limits: Limits,
    slots: Vec<Slot>,
    waiting: VecDeque<JobSpec>,
    step: u64,
    /// False for caches that cannot drop a suffix (sliding-window attention, recurrent state).
    prefix_reuse: bool,
}

impl Scheduler {
    pub fn new(limits: Limits, prefix_reuse: bool) -> Scheduler {
        assert!(limits.slots > 0 && limits.step_tokens_max > 0);
        assert!(limits.ctx_tokens_max <= limits.kv_cells_max);
        let slots = (0..limits.slots).map(|_| Slot::default()).collect();
        Scheduler { limits, slots, waiting: VecDeque::new(), step: 0, prefix_reuse }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Queues a job. Rejects when the queue is full or the job could never fit.
    pub fn submit(&mut self, spec: JobSpec) -> Result<(), Reject> {
        let needed = job_cells(&spec);
        if needed > self.limits.ctx_tokens_max {
            return Err(Reject::TooLarge { needed, limit: self.limits.ctx_tokens_max });
        }
        // `queue_max` waiting beyond the slots: a burst that finds slots free is not refused
        // because its requests have not been admitted yet.
        if self.waiting.len() + self.running_len() >= self.limits.queue_max + self.limits.slots {
            return Err(Reject::QueueFull);
        }
        self.waiting.push_back(spec);
        Ok(())
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn running_len(&self) -> usize {
        self.slots.iter().filter(|s| s.job.is_some()).count()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running_len() == 0
    }

    /// Cells held by idle caches plus cells reserved by running jobs (their whole budget).
    pub fn reserved_cells(&self) -> u32 {
        self.slots.iter().map(slot_cells).sum()
    }

    pub fn cached_cells(&self) -> u32 {
        self.slots.iter().map(|s| s.cached.len() as u32).sum()
    }

    /// Removes a waiting job (cancelled before admission). Returns whether it was waiting.
    pub fn remove_waiting(&mut self, id: JobId) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|j| j.id != id);
        before != self.waiting.len()
    }

    /// Plans the next step: admits waiting jobs that fit, then fills the batch.
    pub fn plan(&mut self) -> Plan {
        self.step += 1;
        let mut plan = Plan::default();
        self.admit(&mut plan);
        self.compact(&mut plan.kv_ops);
        let mut budget = self.limits.step_tokens_max;
        self.plan_decodes(&mut plan, &mut budget);
        self.plan_prefills(&mut plan, &mut budget);
        // With one KV stream per sequence, llama.cpp cuts a batch into micro-batches of equal
        // runs of consecutive sequence ids, taken in batch order: in (seq, pos) order every
        // sequence's next token rides in the first one, and each prompt's rest follows in one.
        plan.batch.sort_by_key(|e| (e.seq, e.pos));
        debug_assert!(self.reserved_cells() <= self.limits.kv_cells_max);
        plan
    }

    /// Admits queued jobs in order while slots and cells allow; a job waiting for a shared
    /// prefix ([`Self::waits_for_prefix`]) is passed over (it keeps its place) for this step.
    fn admit(&mut self, plan: &mut Plan) {
        let mut k = 0;
        while let Some(spec) = self.waiting.get(k) {
            if self.waits_for_prefix(spec) {
                k += 1;
                continue;
            }
            let Some(dst) = self.free_slot_for(&spec.prompt, spec.cache_salt) else { break };
            let needed = job_cells(spec);
            if !self.make_room(needed, dst, &mut plan.kv_ops) {
                break;
            }
            let spec = self.waiting.remove(k).expect("k < len");
            // Prompt log-probabilities need logits at every prompt position: no reuse.
            let reuse = self.prefix_reuse && !spec.echo_logits;
            let cached = self.attach_prefix(dst, &spec.prompt, spec.cache_salt, reuse, &mut plan.kv_ops);
            plan.admitted.push((spec.id, cached));
            let slot = &mut self.slots[dst];
            slot.salt = spec.cache_salt;
            slot.job = Some(Job { prompt_done: cached as usize, cached_tokens: cached, next_token: None, generated: 0, spec });
            slot.last_used_step = self.step;
        }
    }

    /// Whether `spec` should stay queued because a running job is still computing a prefix
    /// they share, at least [`SHARED_WAIT_TOKENS_MIN`] tokens longer than any cached now.
    /// The running job's prefill makes progress every step, so the wait is bounded.
    fn waits_for_prefix(&self, spec: &JobSpec) -> bool {
        if !self.prefix_reuse || spec.echo_logits {
            return false;
        }
        let limit = spec.prompt.len().saturating_sub(1);
        let shared = |tokens: &[TokenId], salt: u64| if salt == spec.cache_salt { common_prefix(tokens, &spec.prompt).min(limit) } else { 0 };
        let cached = self.slots.iter().map(|s| shared(&s.cached, s.salt)).max().unwrap_or(0);
        let in_flight = self
            .slots
            .iter()
            .filter_map(|s| s.job.as_ref())
            .filter(|j| j.prompt_done < j.spec.prompt.len())
            .map(|j| shared(&j.spec.prompt, j.spec.cache_salt))
            .max()
            .unwrap_or(0);
        in_flight >= cached + SHARED_WAIT_TOKENS_MIN
    }

    /// The free slot that keeps the running slots one run of consecutive indices (see
    /// [`Self::compact`]), then whose cache loses the fewest tokens `prompt` does not share
    /// (counted in [`PREFIX_COPY_TOKENS_MIN`]s: fewer are not worth keeping, as they are not
    /// worth copying), then shares the longest prefix with `prompt`, then the least recently
    /// used, then the lowest index. So a conversation's next turn lands on its own cache, and a
    /// request that shares only a system prompt with another conversation takes an empty or
    /// stale slot (the shared prefix is copied there) instead of overwriting that one.
    fn free_slot_for(&self, prompt: &[TokenId], salt: u64) -> Option<usize> {
        // 2: a hole in the run, 1: next to it (or nothing runs), 0: elsewhere (moved later).
        let run = self.running_range();
        let place = |i: usize| match run {
            Some((lo, hi)) if lo < i && i < hi => 2,
            Some((lo, hi)) if i + 1 == lo || i == hi + 1 => 1,
            Some(_) => 0,
            None => 1,
        };
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.job.is_none())
            .max_by_key(|(i, s)| {
                let common = salted_prefix(s, salt, prompt);
                let lost = (s.cached.len() - common) / PREFIX_COPY_TOKENS_MIN;
                (place(*i), Reverse(lost), common, Reverse(s.last_used_step), Reverse(*i))
            })
            .map(|(i, _)| i)
    }

    /// The lowest and highest index of a slot with a job.
    fn running_range(&self) -> Option<(usize, usize)> {
        let mut running = self.slots.iter().enumerate().filter(|(_, s)| s.job.is_some()).map(|(i, _)| i);
        let lo = running.next()?;
        Some((lo, running.last().unwrap_or(lo)))
    }

    /// Keeps the running slots one run of consecutive indices: with a KV stream per sequence,
    /// llama.cpp decodes only consecutive sequence ids together, so running slots 0, 2 and 5
    /// would cost three passes over the weights per step instead of one. The job in the
    /// highest running slot moves down into a free slot inside the run (a stream copy); the
    /// slot it leaves keeps its tokens as a prefix cache.
    /// The hole's own cache (often the conversation that just ended there, whose next turn
    /// may come) first moves to the free slot above the run holding the least useful cache.
    fn compact(&mut self, ops: &mut Vec<KvOp>) {
        while let Some((lo, hi)) = self.running_range() {
            let Some(hole) = (lo..hi).find(|&k| self.slots[k].job.is_none()) else { return };
            self.keep_cache_of(hole, hi, ops);
            let cached = self.slots[hi].cached.clone();
            ops.push(match cached.len() {
                0 => KvOp::Truncate { seq: hole as SeqId, from: 0 },
                len => KvOp::CopyPrefix { src: hi as SeqId, dst: hole as SeqId, len: len as u32 },
            });
            let (job, salt) = (self.slots[hi].job.take(), self.slots[hi].salt);
            let dst = &mut self.slots[hole];
            (dst.cached, dst.salt, dst.job, dst.last_used_step) = (cached, salt, job, self.step);
            if self.reserved_cells() > self.limits.kv_cells_max {
                // (Only where the cells are fewer than slots × context: drop the left copy.)
                self.slots[hi].cached.clear();
                ops.push(KvOp::Truncate { seq: hi as SeqId, from: 0 });
            }
        }
    }

    /// Copies free slot `hole`'s cache into the free slot above `hi` with the least useful
    /// cache (none, then the least recently used), when the cells allow.
    fn keep_cache_of(&mut self, hole: usize, hi: usize, ops: &mut Vec<KvOp>) {
        let len = self.slots[hole].cached.len();
        if len == 0 {
            return;
        }
        let spare = (hi + 1..self.slots.len())
            .filter(|&k| self.slots[k].job.is_none())
            .min_by_key(|&k| (!self.slots[k].cached.is_empty(), self.slots[k].last_used_step));
        let Some(spare) = spare else { return };
        if self.reserved_cells() - self.slots[spare].cached.len() as u32 + len as u32 > self.limits.kv_cells_max {
            return;
        }
        ops.push(KvOp::CopyPrefix { src: hole as SeqId, dst: spare as SeqId, len: len as u32 });
        let (cached, salt, used) = (self.slots[hole].cached.clone(), self.slots[hole].salt, self.slots[hole].last_used_step);
        (self.slots[spare].cached, self.slots[spare].salt, self.slots[spare].last_used_step) = (cached, salt, used);
    }

    /// Evicts idle caches (least recently used first, never `keep`) until `needed` more cells
    /// fit. Returns false if they cannot.
    fn make_room(&mut self, needed: u32, keep: usize, ops: &mut Vec<KvOp>) -> bool {
        let dst_cached = self.slots[keep].cached.len() as u32;
        loop {
            let reserved = self.reserved_cells() - dst_cached;
            if reserved + needed <= self.limits.kv_cells_max {
                return true;
            }
            let victim = self
                .slots
                .iter()
                .enumerate()
                .filter(|(i, s)| *i != keep && s.job.is_none() && !s.cached.is_empty())
                .min_by_key(|(_, s)| s.last_used_step)
                .map(|(i, _)| i);
            match victim {
                Some(v) => {
                    self.slots[v].cached.clear();
                    ops.push(KvOp::Truncate { seq: v as SeqId, from: 0 });
                }
                None => return false,
            }
        }
    }

    /// Points slot `dst` at the longest cached prefix of `prompt`; returns its length.
    /// At least one prompt token is always left to compute, to get logits.
    fn attach_prefix(&mut self, dst: usize, prompt: &[TokenId], salt: u64, reuse: bool, ops: &mut Vec<KvOp>) -> u32 {
        let limit = if reuse { prompt.len().saturating_sub(1) } else { 0 };
        let own = salted_prefix(&self.slots[dst], salt, prompt).min(limit);
        let (src, best) = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (i, salted_prefix(s, salt, prompt).min(limit)))
            .max_by_key(|&(i, len)| (len, i == dst))
            .expect("at least one slot");
        let dst_seq = dst as SeqId;
        if best >= own + PREFIX_COPY_TOKENS_MIN && src != dst {
            ops.push(KvOp::CopyPrefix { src: src as SeqId, dst: dst_seq, len: best as u32 });
            self.slots[dst].cached = prompt[..best].to_vec();
            return best as u32;
        }
        ops.push(KvOp::Truncate { seq: dst_seq, from: own as u32 });
        self.slots[dst].cached.truncate(own);
        own as u32
    }

    fn plan_decodes(&mut self, plan: &mut Plan, budget: &mut u32) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(job) = slot.job.as_mut() else { continue };
            let Some(token) = job.next_token.take() else { continue };
            let pos = slot.cached.len() as u32;
            plan.batch.push(BatchEntry { job: job.spec.id, seq: i as SeqId, token, pos, logits: true, samples: true });
            slot.cached.push(token);
            slot.last_used_step = self.step;
            *budget -= 1;
        }
    }

    fn plan_prefills(&mut self, plan: &mut Plan, budget: &mut u32) {
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].job.as_ref().is_some_and(|j| j.prompt_done < j.spec.prompt.len()))
            .collect();
        order.sort_by_key(|&i| self.slots[i].job.as_ref().map(|j| j.spec.id));
        let room_min = self.limits.step_tokens_max as usize - self.limits.slots.min(self.limits.step_tokens_max as usize);
        let chunk_min = if room_min >= 2 * PREFILL_CHUNK_MIN { PREFILL_CHUNK_MIN } else { 1 };
        for i in order {
            if *budget == 0 {
                break;
            }
            let slot = &mut self.slots[i];
            let job = slot.job.as_mut().expect("filtered");
            let remaining = job.spec.prompt.len() - job.prompt_done;
            let Some(take) = chunk_len(remaining, *budget as usize, chunk_min) else { continue };
            for k in 0..take {
                let p = job.prompt_done + k;
                let last = p + 1 == job.spec.prompt.len();
                let token = job.spec.prompt[p];
                let logits = last || job.spec.echo_logits;
                plan.batch.push(BatchEntry { job: job.spec.id, seq: i as SeqId, token, pos: p as u32, logits, samples: last });
                slot.cached.push(token);
            }
            job.prompt_done += take;
            slot.last_used_step = self.step;
            *budget -= take as u32;
        }
    }

    /// Records the token sampled for `job`. Returns `false` if the job has used its budget
    /// (the caller then finishes it with `finish`).
    pub fn on_sampled(&mut self, job: JobId, token: TokenId) -> bool {
        let slot = self.slot_of_mut(job).expect("sampled for a running job");
        let j = slot.job.as_mut().expect("running");
        j.generated += 1;
        // submit() checked prompt + max_tokens against the context, so this bounds both.
        let more = j.generated < j.spec.max_tokens;
        if more {
            j.next_token = Some(token);
        }
        more
    }

    /// Ends a running job; its slot keeps the KV of every token it fed, for later reuse.
    pub fn finish(&mut self, job: JobId) -> Option<(u32, u32)> {
        let slot = self.slot_of_mut(job)?;
        let j = slot.job.take().expect("running");
        // A job cut before its prompt was done leaves a partial cache: still a valid prefix.
        Some((j.cached_tokens, j.generated))
    }

    /// Drops every cache (after a failed decode the KV state is unknown).
    pub fn reset_caches(&mut self) -> Vec<JobId> {
        let mut ids = Vec::new();
        for s in &mut self.slots {
            s.cached.clear();
            if let Some(j) = s.job.take() {
                ids.push(j.spec.id);
            }
        }
        ids
    }

    fn slot_of_mut(&mut self, job: JobId) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.job.as_ref().is_some_and(|j| j.spec.id == job))
    }
}

/// How many of a prompt's `remaining` tokens to compute with `budget` left in the step: all
/// that fit, except that a chunk leaving the prompt unfinished, and what it leaves, are at
/// least `min` tokens (`None`: wait for the next step).
fn chunk_len(remaining: usize, budget: usize, min: usize) -> Option<usize> {
    if remaining <= budget {
        return Some(remaining);
    }
    let take = budget.min(remaining.saturating_sub(min));
    (take >= min).then_some(take)
}

/// The `llama_decode` calls a planned batch (in (seq, pos) order) is run in, as lists of
/// batch indices: every sequence with fewer than [`PREFILL_CHUNK_MIN`] tokens together, first
/// (decoding sequences: their next tokens come sooner), then each longer one alone (beside
/// others, llama.cpp would cut it into runs as long as the shortest sequence with it, some too
/// short for the tiled kernel).
pub fn decode_groups(batch: &[BatchEntry]) -> Vec<Vec<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, e) in batch.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if batch[r.start].seq == e.seq => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    let (long, short): (Vec<_>, Vec<_>) = runs.into_iter().partition(|r| r.len() >= PREFILL_CHUNK_MIN);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    if !short.is_empty() {
        groups.push(short.into_iter().flatten().collect());
    }
    groups.extend(long.into_iter().map(|r| r.collect()));
    groups
}

/// Cells a job may use: its prompt plus its completion budget.
fn job_cells(spec: &JobSpec) -> u32 {
    (spec.prompt.len() as u32).saturating_add(spec.max_tokens)
}

fn slot_cells(s: &Slot) -> u32 {
    match &s.job {
        Some(j) => job_cells(&j.spec).max(s.cached.len() as u32),
        None => s.cached.len() as u32,
    }
}

/// The prefix of `prompt` that `slot` holds, for a job of cache salt `salt`: none when its
/// tokens were computed under another salt (another account's).
fn salted_prefix(slot: &Slot, salt: u64, prompt: &[TokenId]) -> usize {
    if slot.salt == salt {
        common_prefix(&slot.cached, prompt)
    } else {
        0
    }
}

fn common_prefix(a: &[TokenId], b: &[TokenId]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { slots: 2, kv_cells_max: 64, step_tokens_max: 8, queue_max: 4, ctx_tokens_max: 32 }
    }

    fn job(id: JobId, prompt: &[TokenId], max_tokens: u32) -> JobSpec {
        JobSpec { id, prompt: prompt.to_vec(), max_tokens, echo_logits: false, cache_salt: 0 }
    }

    /// Runs plans, "sampling" token 100+job for every sampling entry, until all jobs finish.
    fn run_to_end(s: &mut Scheduler) -> Vec<Plan> {
        let mut plans = Vec::new();
        while !s.is_idle() {
            let plan = s.plan();
            for e in plan.batch.iter().filter(|e| e.samples) {
                if !s.on_sampled(e.job, 100 + e.job as TokenId) {
                    s.finish(e.job);
                }
            }
            plans.push(plan);
            assert!(plans.len() < 100, "no progress");
        }
        plans
    }

    #[test]
    fn prompt_chunks_and_what_they_leave_are_at_least_a_tile() {
        let m = PREFILL_CHUNK_MIN;
        assert_eq!(chunk_len(200, 512, m), Some(200));
        assert_eq!(chunk_len(30, 512, m), Some(30), "a short prompt goes whole");
        assert_eq!(chunk_len(200, 150, m), Some(136), "leaves a tile, not 50");
        assert_eq!(chunk_len(200, 40, m), None, "too little room: next step");
        assert_eq!(chunk_len(100, 90, m), None, "cannot cut 100 into two tiles");
        assert_eq!(chunk_len(600, 512, m), Some(512));
        assert_eq!(chunk_len(530, 512, m), Some(466));
        assert_eq!(chunk_len(20, 8, 1), Some(8), "small steps cut anywhere");
        // In plans: eight prompts of 200 arriving together, 512 tokens a step.
        let mut s = Scheduler::new(Limits { slots: 8, kv_cells_max: 8 * 256, step_tokens_max: 512, queue_max: 8, ctx_tokens_max: 256 }, true);
        for id in 1..=8 {
            s.submit(job(id, &vec![id as TokenId; 200], 1)).unwrap();
        }
        let mut chunks = Vec::new();
        for plan in run_to_end(&mut s) {
            let mut per_seq = std::collections::BTreeMap::<SeqId, usize>::new();
            for e in plan.batch.iter().filter(|e| e.pos < 200) {
                *per_seq.entry(e.seq).or_default() += 1;
            }
            chunks.extend(per_seq.into_values());
        }
        assert_eq!(chunks.iter().sum::<usize>(), 8 * 200);
        assert!(chunks.iter().all(|&n| n >= m), "{chunks:?}");
        assert!(chunks.len() > 8, "some prompts were cut: {chunks:?}");
    }

    #[test]
    fn decode_groups_run_long_chunks_alone_and_the_rest_together() {
        let e = |seq: SeqId, pos: u32| BatchEntry { job: seq as JobId, seq, token: 1, pos, logits: false, samples: false };
        let mut batch = vec![e(0, 50)];
        batch.extend((0..100).map(|p| e(1, p)));
        batch.push(e(2, 7));
        batch.extend((0..10).map(|p| e(3, p)));
        batch.extend((0..64).map(|p| e(4, p)));
        let groups = decode_groups(&batch);
        let short: Vec<usize> = [0].into_iter().chain(101..112).collect();
        assert_eq!(groups, vec![short, (1..101).collect(), (112..176).collect()]);
        assert!(decode_groups(&[]).is_empty());
    }

    #[test]
    fn batches_are_in_sequence_order() {
        let mut s = Scheduler::new(limits(), true);
        s.submit(job(1, &[1; 3], 4)).unwrap();
        s.plan();
        s.on_sampled(1, 9);
        s.submit(job(2, &[2; 3], 4)).unwrap();
        // Slot 0 decodes, slot 1 prefills: in (seq, pos) order whatever the planning order.
        let plan = s.plan();
        let order: Vec<(SeqId, u32)> = plan.batch.iter().map(|e| (e.seq, e.pos)).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
    }

    #[test]
    fn prompt_is_chunked_by_the_step_budget() {
        let mut s = Scheduler::new(limits(), true);
        s.submit(job(1, &[1; 20], 2)).unwrap();
        let plans = run_to_end(&mut s);
        let sizes: Vec<usize> = plans.iter().map(|p| p.batch.len()).collect();
        assert_eq!(sizes, vec![8, 8, 4, 1]);
        let last = &plans[2].batch[3];
        assert!(last.logits && last.samples && last.pos == 19);
        assert!(!plans[0].batch[0].logits);
    }

    #[test]
    fn decodes_of_running_jobs_share_a_step_with_a_new_prefill() {
        let mut s = Scheduler::new(limits(), true);
        s.submit(job(1, &[1, 2], 5)).unwrap();
        let p1 = s.plan();
        assert_eq!(p1.batch.len(), 2);
        assert!(s.on_sampled(1, 7));
        s.submit(job(2, &[3, 4, 5], 5)).unwrap();
        let p2 = s.plan();
        let seqs: Vec<(SeqId, TokenId, u32)> = p2.batch.iter().map(|e| (e.seq, e.token, e.pos)).collect();
        assert_eq!(seqs, vec![(0, 7, 2), (1, 3, 0), (1, 4, 1), (1, 5, 2)]);
    }

    /// 24 shared tokens, then one of its own.
    fn agent(id: JobId, own: TokenId) -> JobSpec {
        let mut prompt: Vec<TokenId> = (1..=24).collect();
        prompt.push(own);
        job(id, &prompt, 2)
    }

    #[test]
    fn requests_arriving_together_compute_their_shared_prefix_once() {
        let mut s = Scheduler::new(limits(), true);
        s.submit(agent(1, 50)).unwrap();
        s.submit(agent(2, 60)).unwrap();
        let plans = run_to_end(&mut s);
        // Job 2 waits while job 1 computes the prefix (8 tokens a step), then copies what is
        // cached: it is admitted once fewer than SHARED_WAIT_TOKENS_MIN shared tokens remain.
        let admitted: Vec<(usize, JobId, u32)> =
            plans.iter().enumerate().flat_map(|(k, p)| p.admitted.iter().map(move |(j, c)| (k, *j, *c))).collect();
        assert_eq!(admitted, vec![(0, 1, 0), (2, 2, 16)]);
        assert!(plans[2].kv_ops.contains(&KvOp::CopyPrefix { src: 0, dst: 1, len: 16 }));
        let fed = |id: JobId| plans.iter().flat_map(|p| &p.batch).filter(|e| e.job == id).count();
        assert_eq!((fed(1), fed(2)), (25 + 1, 25 - 16 + 1), "prompt tokens computed, plus one fed-back sample each");
    }

    #[test]
    fn only_requests_that_share_a_prefix_in_flight_wait() {
        let mut s = Scheduler::new(limits(), true);
        s.submit(agent(1, 50)).unwrap();
        s.submit(agent(2, 60)).unwrap();
        s.submit(job(3, &[90; 10], 2)).unwrap();
        let p = s.plan();
        let admitted: Vec<JobId> = p.admitted.iter().map(|a| a.0).collect();
        assert_eq!(admitted, vec![1, 3], "job 3 shares nothing: it passes job 2, which keeps its place");
        assert_eq!(s.waiting_len(), 1);
        // Prompt log-probabilities never reuse a cache, so they never wait for one.
        let mut s = Scheduler::new(limits(), true);
        s.submit(agent(1, 50)).unwrap();
        s.submit(JobSpec { echo_logits: true, ..agent(2, 60) }).unwrap();
        assert_eq!(s.plan().admitted.len(), 2);
        // Nor do models whose cache cannot be shared.
        let mut s = Scheduler::new(limits(), false);
        s.submit(agent(1, 50)).unwrap();
        s.submit(agent(2, 60)).unwrap();
        assert_eq!(s.plan().admitted.len(), 2);
    }

    #[test]
    fn a_shared_prefix_is_copied_from_another_slot() {
        let mut s = Scheduler::new(limits(), true);
        s.submit(job(1, &[1, 2, 3, 4, 5], 1)).unwrap();
        run_to_end(&mut s);
        // slot 0 now caches [1,2,3,4,5]; a second concurrent job keeps slot 0 busy
        s.submit(job(2, &[9, 9], 3)).unwrap();
        s.submit(job(3, &[1, 2, 3, 4, 6], 1)).unwrap();
        let plan = s.plan();
        // job 2 takes the LRU/empty slot 1 (no shared prefix), job 3 reuses slot 0 by itself
        assert_eq!(plan.admitted, vec![(2, 0), (3, 4)]);
        assert!(plan.kv_ops.contains(&KvOp::Truncate { seq: 0, from: 4 }));
        let fed: Vec<TokenId> = plan.batch.iter().filter(|e| e.job == 3).map(|e| e.token).collect();
        assert_eq!(fed, vec![6]);
    }

    #[test]
    fn a_cache_is_shared_only_under_its_own_salt() {
        let mut s = Scheduler::new(limits(), true);
        let prompt: Vec<TokenId> = (1..=24).collect();
        let salted = |id: JobId, salt: u64| JobSpec { cache_salt: salt, ..job(id, &prompt, 1) };
        s.submit(salted(1, 7)).unwrap();
        run_to_end(&mut s);
        // Another account's identical prompt reuses nothing (its own slot, computed whole)...
        s.submit(salted(2, 8)).unwrap();
        let plan = s.plan();
        assert_eq!(plan.admitted, vec![(2, 0)]);
        assert!(!plan.kv_ops.iter().any(|op| matches!(op, KvOp::CopyPrefix { .. })), "{:?}", plan.kv_ops);
        run_to_end(&mut s);
        // ...and does not wait for another account's prefix in flight either; the same
        // account's next request reuses its own.
        s.submit(salted(3, 7)).unwrap();
        assert_eq!(run_to_end(&mut s)[0].admitted, vec![(3, 23)]);
        let prefill = |salt| JobSpec { cache_salt: salt, ..job(10 + salt, &(100..130).collect::<Vec<_>>(), 1) };
        s.submit(prefill(1)).unwrap();
        s.plan(); // job 11 starts computing its 30-token prompt, 8 tokens a step
        s.submit(prefill(2)).unwrap();
        assert!(!s.waits_for_prefix(&prefill(2)), "no waiting on another salt's prefix");
        assert!(s.waits_for_prefix(&prefill(1)), "but on the same salt's");
    }

    #[test]
    fn two_conversations_sharing_a_system_prompt_keep_their_own_caches() {
        let mut s = Scheduler::new(limits(), true);
        let system: Vec<TokenId> = (1..=8).collect();
        let turn0 = |own: TokenId| -> Vec<TokenId> { system.iter().copied().chain((0..17).map(|k| own + k)).collect() };
        let (a0, b0) = (turn0(40), turn0(70));
        s.submit(job(1, &a0, 1)).unwrap();
        run_to_end(&mut s);
        // B shares only the system prompt with A's cache: it takes the empty slot.
        s.submit(job(2, &b0, 1)).unwrap();
        assert_eq!(run_to_end(&mut s)[0].admitted, vec![(2, 0)]);
        // Each next turn (its prompt, its answer, a new question) finds its own cache whole
        // (the prompt: an answer of one token is sampled, never fed back).
        let next = |t0: &[TokenId], answer: TokenId| -> Vec<TokenId> { t0.iter().copied().chain([answer, 99, 98]).collect() };
        s.submit(job(3, &next(&a0, 101), 1)).unwrap();
        assert_eq!(run_to_end(&mut s)[0].admitted, vec![(3, 25)]);
        s.submit(job(4, &next(&b0, 102), 1)).unwrap();
        assert_eq!(run_to_end(&mut s)[0].admitted, vec![(4, 25)], "A's next turn did not take B's cache");
    }

    #[test]
    fn copy_prefix_from_a_running_slot() {
        let mut s = Scheduler::new(limits(), true);
        let p1: Vec<TokenId> = (1..=20).collect();
        s.submit(job(1, &p1, 10)).unwrap();
        for _ in 0..3 {
            s.plan(); // 8 + 8 + 4 prompt tokens: job 1's prompt is cached, it is decoding
        }
        let mut p2 = p1[..18].to_vec();
        p2.extend([90, 91]);
        s.submit(job(2, &p2, 1)).unwrap();
        let plan = s.plan();
        assert_eq!(plan.admitted, vec![(2, 18)]);
        assert_eq!(plan.kv_ops, vec![KvOp::CopyPrefix { src: 0, dst: 1, len: 18 }]);
    }

    #[test]
    fn a_job_moves_down_into_a_hole_left_by_one_that_ended() {
        let mut s = Scheduler::new(Limits { slots: 4, kv_cells_max: 4 * 32, step_tokens_max: 16, queue_max: 8, ctx_tokens_max: 32 }, true);
        for id in 1..=3 {
            s.submit(job(id, &[id as TokenId; 4], 8)).unwrap();
        }
        let seqs: Vec<SeqId> = s.plan().batch.iter().filter(|e| e.samples).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2]);
        s.on_sampled(3, 7);
        s.finish(2);
        let plan = s.plan();
        // Job 2's cache moves up to the free slot 3 first, then job 3 moves down into slot 1.
        let moves = vec![KvOp::CopyPrefix { src: 1, dst: 3, len: 4 }, KvOp::CopyPrefix { src: 2, dst: 1, len: 4 }];
        assert_eq!(plan.kv_ops, moves);
        // Job 3 decodes from its new slot, at the next position; slot 2 keeps its tokens.
        assert_eq!(plan.batch.iter().map(|e| (e.job, e.seq, e.pos)).collect::<Vec<_>>(), vec![(3, 1, 4)]);
        assert_eq!(s.slots[2].cached, vec![3; 4]);
        assert_eq!(s.slots[3].cached, vec![2; 4]);
    }

    #[test]
    fn running_slots_stay_one_run_under_random_traffic() {
        let mut s = Scheduler::new(Limits { slots: 6, kv_cells_max: 6 * 48, step_tokens_max: 24, queue_max: 64, ctx_tokens_max: 48 }, true);
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut id = 0;
        for _ in 0..400 {
            if next() % 3 == 0 && s.waiting_len() < 8 {
                id += 1;
                let shared = (next() % 24) as usize;
                let mut prompt: Vec<TokenId> = (0..shared as TokenId).collect();
                prompt.extend((0..1 + next() % 8).map(|k| (1000 + id * 10 + k) as TokenId));
                s.submit(job(id, &prompt, 1 + (next() % 12) as u32)).unwrap();
            }
            let plan = s.plan();
            let running: Vec<usize> = (0..6).filter(|&k| s.slots[k].job.is_some()).collect();
            assert!(running.windows(2).all(|w| w[1] == w[0] + 1), "running slots {running:?}");
            assert!(plan.batch.iter().all(|e| running.contains(&(e.seq as usize))));
            assert!(s.reserved_cells() <= s.limits.kv_cells_max);
            for e in plan.batch.iter().filter(|e| e.samples) {
                if !s.on_sampled(e.job, 5) {
                    s.finish(e.job);
                }
            }
            if next() % 5 == 0 {
                if let Some(j) = s.slots.iter().filter_map(|sl| sl.job.as_ref()).map(|j| j.spec.id).nth((next() % 3) as usize) {
                    s.finish(j); // a cancelled request
                }
            }
        }
        assert!(id > 100);
    }

    #[test]
    fn a_short_shared_prefix_is_computed_not_copied() {
        let mut s = Scheduler::new(limits(), true);
        s.submit(job(1, &[1, 2, 3, 4], 10)).unwrap();
        s.plan();
        s.submit(job(2, &[1, 2, 3, 8], 1)).unwrap();
        let plan = s.plan();
        assert!(3 < PREFIX_COPY_TOKENS_MIN);
        assert_eq!(plan.admitted, vec![(2, 0)]);
        assert_eq!(plan.kv_ops, vec![KvOp::Truncate { seq: 1, from: 0 }]);
    }

    #[test]
    fn a_full_prompt_match_still_computes_its_last_token() {
        let mut s = Scheduler::new(limits(), true);
        s.submit(job(1, &[1, 2, 3], 1)).unwrap();
        run_to_end(&mut s);
        s.submit(job(2, &[1, 2, 3], 1)).unwrap();
        let plan = s.plan();
        assert_eq!(plan.admitted, vec![(2, 2)]);
        assert_eq!(plan.batch.len(), 1);
        assert_eq!(plan.batch[0].pos, 2);
    }

    #[test]
    fn admission_waits_for_kv_room_and_queue_is_bounded() {
        let mut s = Scheduler::new(Limits { kv_cells_max: 40, ..limits() }, true);
        s.submit(job(1, &[1; 10], 20)).unwrap();
        s.submit(job(2, &[2; 10], 20)).unwrap();
        let plan = s.plan();
        assert_eq!(plan.admitted.len(), 1, "second job must wait: 30 + 30 > 40");
        assert!(s.reserved_cells() <= 40);
        s.submit(job(3, &[3], 1)).unwrap();
        s.submit(job(4, &[3], 1)).unwrap();
        s.submit(job(5, &[3], 1)).unwrap();
        s.submit(job(6, &[3], 1)).unwrap();
        assert_eq!(s.submit(job(8, &[3], 1)), Err(Reject::QueueFull), "1 running and 5 waiting: 2 slots and 4 queue places");
        assert_eq!(s.submit(job(7, &[1; 30], 10)), Err(Reject::TooLarge { needed: 40, limit: 32 }));
        run_to_end(&mut s);
        assert!(s.reserved_cells() <= 40);
    }

    #[test]
    fn idle_caches_are_evicted_lru_when_room_is_needed() {
        let mut s = Scheduler::new(Limits { kv_cells_max: 32, ..limits() }, true);
        s.submit(job(1, &[1; 20], 1)).unwrap();
        run_to_end(&mut s);
        assert_eq!(s.cached_cells(), 20);
        s.submit(job(2, &[2; 20], 5)).unwrap();
        let plan = s.plan();
        assert_eq!(plan.admitted, vec![(2, 0)]);
        assert!(plan.kv_ops.contains(&KvOp::Truncate { seq: 0, from: 0 }), "{:?}", plan.kv_ops);
        assert!(s.reserved_cells() <= 32);
    }

    #[test]
    fn without_prefix_reuse_or_with_echo_the_whole_prompt_is_computed() {
        for (reuse, echo) in [(false, false), (true, true)] {
            let mut s = Scheduler::new(limits(), reuse);
            s.submit(job(1, &[1, 2, 3], 1)).unwrap();
            run_to_end(&mut s);
            s.submit(JobSpec { echo_logits: echo, ..job(2, &[1, 2, 3], 1) }).unwrap();
            let plan = s.plan();
            assert_eq!(plan.admitted, vec![(2, 0)]);
            assert_eq!(plan.kv_ops, vec![KvOp::Truncate { seq: 0, from: 0 }]);
            assert_eq!(plan.batch.len(), 3);
            assert_eq!(plan.batch.iter().filter(|e| e.logits).count(), if echo { 3 } else { 1 });
        }
    }

    #[test]
    fn max_tokens_and_context_end_a_job() {
        let mut s = Scheduler::new(limits(), true);
        s.submit(job(1, &[1, 2], 3)).unwrap();
        let plans = run_to_end(&mut s);
        let sampled: usize = plans.iter().map(|p| p.batch.iter().filter(|e| e.samples).count()).sum();
        assert_eq!(sampled, 3);
    }
}
