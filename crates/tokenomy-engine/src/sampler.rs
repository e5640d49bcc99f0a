//! Token sampling over raw logits, in plain Rust.
//!
//! Order of operations (the same as llama.cpp's default chain, restricted to what the OpenAI
//! API exposes): logit bias → repetition / presence / frequency penalties → greedy when
//! temperature is 0 → top-k → top-p → min-p → temperature → a draw from a seeded RNG.
//! Log-probabilities reported to clients are the model's own (log-softmax of the raw logits),
//! independent of the sampling transforms.

use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;
use tokenomy_core::{SamplingParams, TokenId};

/// How many recent tokens the repetition penalty looks at (llama.cpp's `penalty_last_n`).
pub const REPETITION_WINDOW_TOKENS: usize = 64;

/// Per-sequence sampling state: the RNG and counts of generated tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    generated_counts: HashMap<TokenId, u32>,
    recent: Vec<TokenId>,
}

impl Sampler {
    /// `prompt` seeds the repetition window.
    pub fn new(params: SamplingParams, prompt: &[TokenId]) -> Sampler {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let start = prompt.len().saturating_sub(REPETITION_WINDOW_TOKENS);
        Sampler { params, rng, generated_counts: HashMap::new(), recent: prompt[start..].to_vec() }
    }

    /// Records a sampled token (for penalties).
    pub fn accept(&mut self, token: TokenId) {
        *self.generated_counts.entry(token).or_insert(0) += 1;
        self.recent.push(token);
        if self.recent.len() > REPETITION_WINDOW_TOKENS * 2 {
            self.recent.drain(..self.recent.len() - REPETITION_WINDOW_TOKENS);
        }
    }

    /// Picks the next token from `logits` (one value per vocabulary entry).
    /// `banned` tokens (e.g. end-of-generation under `ignore_eos`) are never chosen.
    pub fn sample(&mut self, logits: &[f32], banned: &[TokenId]) -> TokenId {
        self.sample_restricted(logits, banned, None::<fn(&mut [f32]) -> Result<(), ()>>).unwrap_or(0)
    }

    /// [`Sampler::sample`], with `restrict` setting the logits of forbidden tokens to −∞ (a
    /// grammar's mask) on the sampler's own working copy, so the row is copied once.
    pub fn sample_restricted<E>(
        &mut self,
        logits: &[f32],
        banned: &[TokenId],
        restrict: Option<impl FnOnce(&mut [f32]) -> Result<(), E>>,
    ) -> Result<TokenId, E> {
        let mut adjusted = logits.to_vec();
        self.apply_bias_and_penalties(&mut adjusted);
        for &t in banned {
            if let Some(l) = adjusted.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let restricted = restrict.is_some();
        if let Some(r) = restrict {
            r(&mut adjusted)?;
        }
        if self.params.temperature <= 0.0 {
            return Ok(argmax(&adjusted));
        }
        let max = adjusted.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return Ok(if restricted { argmax(&adjusted) } else { argmax(logits) });
        }
        let p = &self.params;
        let draw: f32 = self.rng.gen();
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // No truncation: draw straight from the softmax, O(vocab), no sort.
            return Ok(draw_unsorted(&adjusted, max, p.temperature, draw));
        }
        let mut candidates: Vec<(TokenId, f32)> =
            adjusted.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as TokenId, l)).collect();
        truncate_top_k(&mut candidates, p.top_k as usize);
        // Probabilities at temperature 1, normalised over the top-k survivors.
        let total: f32 = candidates.iter().map(|c| (c.1 - max).exp()).sum();
        if p.min_p > 0.0 {
            let cut = max + p.min_p.ln();
            candidates.retain(|c| c.1 >= cut);
        }
        if p.top_p < 1.0 {
            nucleus(&mut candidates, max, total, p.top_p);
        }
        let probs: Vec<f32> = {
            let e: Vec<f32> = candidates.iter().map(|c| ((c.1 - max) / p.temperature).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.into_iter().map(|x| x / sum).collect()
        };
        Ok(pick(&candidates, &probs, draw))
    }

    fn apply_bias_and_penalties(&self, logits: &mut [f32]) {
        for &(t, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let start = self.recent.len().saturating_sub(REPETITION_WINDOW_TOKENS);
            let mut seen: Vec<TokenId> = self.recent[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &count) in &self.generated_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }
}

/// Index of the largest logit; the lowest index wins a tie (as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as TokenId
}

fn truncate_top_k(candidates: &mut Vec<(TokenId, f32)>, k: usize) {
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        candidates.truncate(k);
    }
}

/// One token drawn from softmax(`logits` / `temperature`) without sorting.
fn draw_unsorted(logits: &[f32], max: f32, temperature: f32, draw: f32) -> TokenId {
    let sum: f32 = logits.iter().map(|&l| ((l - max) / temperature).exp()).sum();
    let target = draw * sum;
    let mut cumulative = 0.0;
    let mut last = 0;
    for (i, &l) in logits.iter().enumerate() {
        let e = ((l - max) / temperature).exp();
        if e > 0.0 {
            cumulative += e;
            last = i;
            if target < cumulative {
                return i as TokenId;
            }
        }
    }
    last as TokenId
}

/// Keeps the smallest prefix, by descending probability (ties: lower id first), whose mass
/// (normalised by `total`) reaches `top_p`; at least one token. Sorts only what it keeps:
/// the best 64, 256, … candidates are selected and sorted until the mass is reached.
fn nucleus(candidates: &mut Vec<(TokenId, f32)>, max: f32, total: f32, top_p: f32) {
    let desc = |a: &(TokenId, f32), b: &(TokenId, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut k = 64;
    loop {
        let n = k.min(candidates.len());
        if n < candidates.len() {
            candidates.select_nth_unstable_by(n - 1, desc);
        }
        candidates[..n].sort_unstable_by(desc);
        let mut cumulative = 0.0;
        for i in 0..n {
            cumulative += (candidates[i].1 - max).exp() / total;
            if cumulative >= top_p {
                candidates.truncate(i + 1);
                return;
            }
        }
        if n == candidates.len() {
            return;
        }
        k *= 4;
    }
}

fn pick(candidates: &[(TokenId, f32)], probs: &[f32], draw: f32) -> TokenId {
    let mut cumulative = 0.0;
    for (c, &p) in candidates.iter().zip(probs) {
        cumulative += p;
        if draw < cumulative {
            return c.0;
        }
    }
    candidates[candidates.len() - 1].0
}

/// Log-softmax of `logits` at one token, and the `top_n` best tokens with theirs.
pub fn logprobs(logits: &[f32], chosen: TokenId, top_n: usize) -> (f32, Vec<(TokenId, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let lp = |t: TokenId| (logits[t as usize] as f64 - log_z) as f32;
    let mut top = Vec::new();
    if top_n > 0 {
        let mut idx: Vec<(TokenId, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as TokenId, l)).collect();
        let n = top_n.min(idx.len());
        idx.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
        idx.truncate(n);
        idx.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        top = idx.into_iter().map(|(t, _)| (t, lp(t))).collect();
    }
    (lp(chosen), top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..Default::default() }
    }

    #[test]
    fn greedy_is_argmax_and_first_index_wins_ties() {
        let mut s = Sampler::new(params(0.0), &[]);
        assert_eq!(s.sample(&[0.1, 2.0, 2.0, -1.0], &[]), 1);
    }

    #[test]
    fn banned_tokens_are_never_chosen() {
        let mut s = Sampler::new(params(0.0), &[]);
        assert_eq!(s.sample(&[0.1, 2.0, 1.0], &[1]), 2);
    }

    #[test]
    fn logit_bias_can_force_a_token() {
        let mut p = params(1.0);
        p.logit_bias = vec![(0, 100.0)];
        let mut s = Sampler::new(p, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 5.0, 5.0], &[]), 0);
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draws = |seed| {
            let mut p = params(1.0);
            p.seed = Some(seed);
            let mut s = Sampler::new(p, &[]);
            (0..30).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draws(1), draws(1));
        assert_ne!(draws(1), draws(2));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut p = params(1.5);
        p.top_k = 1;
        let mut s = Sampler::new(p, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.9, 0.95], &[]), 1);
        }
    }

    fn kept(logits: &[f32], top_p: f32) -> Vec<TokenId> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        let mut c: Vec<(TokenId, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as TokenId, l)).collect();
        nucleus(&mut c, max, total, top_p);
        c.into_iter().map(|x| x.0).collect()
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        assert_eq!(kept(&l, 0.8), vec![0, 1]);
        assert_eq!(kept(&l, 0.81), vec![0, 1, 2]);
        assert_eq!(kept(&[0.9f32.ln(), 0.1f32.ln()], 0.1), vec![0]);
        // a large vocabulary: the progressive partial sort keeps exactly the sorted prefix
        let big: Vec<f32> = (0..5_000).map(|i| ((i * 7919) % 5_000) as f32 / 500.0).collect();
        let mut order: Vec<TokenId> = (0..5_000).collect();
        order.sort_by(|&a, &b| big[b as usize].total_cmp(&big[a as usize]).then(a.cmp(&b)));
        let k = kept(&big, 0.9);
        assert_eq!(k, order[..k.len()].to_vec());
        // min-p: tokens below min_p × p(max) are never drawn
        let mut p = params(1.0);
        p.min_p = 0.5;
        let mut s = Sampler::new(p, &[]);
        for _ in 0..200 {
            assert!(s.sample(&[0.0, 0.0, -1.0, -5.0], &[]) < 2);
        }
    }

    #[test]
    fn unfiltered_sampling_follows_the_softmax() {
        let mut s = Sampler::new(params(1.0), &[]);
        let mut counts = [0u32; 3];
        for _ in 0..6_000 {
            counts[s.sample(&[0.0, 2.0f32.ln(), f32::NEG_INFINITY], &[]) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let ratio = f64::from(counts[1]) / f64::from(counts[0]);
        assert!((1.8..2.2).contains(&ratio), "{counts:?}");
    }

    #[test]
    fn penalties_lower_repeated_tokens() {
        let mut p = params(0.0);
        p.frequency_penalty = 2.0;
        let mut s = Sampler::new(p, &[]);
        s.accept(0);
        assert_eq!(s.sample(&[1.0, 0.5], &[]), 1);
        let mut p = params(0.0);
        p.repetition_penalty = 3.0;
        let mut s = Sampler::new(p, &[0]);
        assert_eq!(s.sample(&[1.0, 0.5], &[]), 1);
    }

    #[test]
    fn logprobs_are_a_distribution() {
        let logits = [1.0, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 2, 3);
        let total: f32 = top.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(top[0].0, 2);
        assert!((lp - top[0].1).abs() < 1e-6);
    }
}
