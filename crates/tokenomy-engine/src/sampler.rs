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
        let mut adjusted = logits.to_vec();
        self.apply_bias_and_penalties(&mut adjusted);
        for &t in banned {
            if let Some(l) = adjusted.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if self.params.temperature <= 0.0 {
            return argmax(&adjusted);
        }
        let mut candidates: Vec<(TokenId, f32)> = adjusted
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as TokenId, l))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        truncate_top_k(&mut candidates, self.params.top_k as usize);
        let probs = softmax_sorted(&mut candidates, 1.0);
        let keep = nucleus_len(&probs, self.params.top_p, self.params.min_p);
        candidates.truncate(keep);
        let probs = softmax_sorted(&mut candidates, self.params.temperature);
        let draw: f32 = self.rng.gen();
        pick(&candidates, &probs, draw)
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

/// Sorts candidates by descending logit and returns their softmax at `temperature`.
fn softmax_sorted(candidates: &mut [(TokenId, f32)], temperature: f32) -> Vec<f32> {
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = candidates[0].1;
    let exps: Vec<f32> = candidates.iter().map(|c| ((c.1 - max) / temperature).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// How many of the (descending) probabilities survive top-p and min-p. Always at least one.
fn nucleus_len(probs: &[f32], top_p: f32, min_p: f32) -> usize {
    let floor = probs[0] * min_p;
    let mut cumulative = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        if i > 0 && p < floor {
            return i;
        }
        cumulative += p;
        if cumulative >= top_p {
            return i + 1;
        }
    }
    probs.len()
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

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        assert_eq!(nucleus_len(&[0.5, 0.3, 0.15, 0.05], 0.8, 0.0), 2);
        assert_eq!(nucleus_len(&[0.5, 0.3, 0.15, 0.05], 1.0, 0.2), 3);
        assert_eq!(nucleus_len(&[0.9, 0.1], 0.1, 0.0), 1);
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
