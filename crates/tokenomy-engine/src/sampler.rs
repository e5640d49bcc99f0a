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
    /// The working copy of a logits row, kept between tokens: a fresh vocabulary-sized
    /// `Vec` per token is an mmap, page faults and an munmap (above glibc's mmap threshold).
    scratch: Vec<f32>,
}

impl Sampler {
    /// `prompt` seeds the repetition window.
    pub fn new(params: SamplingParams, prompt: &[TokenId]) -> Sampler {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let start = prompt.len().saturating_sub(REPETITION_WINDOW_TOKENS);
        Sampler { params, rng, generated_counts: HashMap::new(), recent: prompt[start..].to_vec(), scratch: Vec::new() }
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
        if restrict.is_none() && self.is_plain_greedy() {
            // The common greedy case needs no working copy: the best token, unless banned.
            let best = argmax(logits);
            if !banned.contains(&best) {
                return Ok(best);
            }
        }
        let mut adjusted = std::mem::take(&mut self.scratch);
        adjusted.clear();
        adjusted.extend_from_slice(logits);
        let token = self.sample_adjusted(logits, &mut adjusted, banned, restrict);
        self.scratch = adjusted;
        token
    }

    /// Greedy with nothing that changes the logits (bias, penalties).
    fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature <= 0.0
            && p.logit_bias.is_empty()
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
    }

    /// [`Sampler::sample_restricted`] on `adjusted`, a copy of `logits` it may change.
    fn sample_adjusted<E>(
        &mut self,
        logits: &[f32],
        adjusted: &mut [f32],
        banned: &[TokenId],
        restrict: Option<impl FnOnce(&mut [f32]) -> Result<(), E>>,
    ) -> Result<TokenId, E> {
        self.apply_bias_and_penalties(adjusted);
        for &t in banned {
            if let Some(l) = adjusted.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let restricted = restrict.is_some();
        if let Some(r) = restrict {
            r(adjusted)?;
        }
        if self.params.temperature <= 0.0 {
            return Ok(argmax(adjusted));
        }
        let max = max_f32(adjusted);
        if !max.is_finite() {
            return Ok(if restricted { argmax(adjusted) } else { argmax(logits) });
        }
        let p = &self.params;
        let draw: f32 = self.rng.gen();
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // No truncation: draw straight from the softmax, O(vocab), no sort.
            return Ok(draw_unsorted(adjusted, max, p.temperature, draw));
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
/// NaNs are skipped; 0 when there is no number at all. Two passes that vectorise (the max
/// over 16 lanes, then the first index holding it) instead of one compare-and-branch chain.
pub fn argmax(logits: &[f32]) -> TokenId {
    let max = max_f32(logits);
    logits.iter().position(|&l| l == max).unwrap_or(0) as TokenId
}

/// The largest non-NaN value (−∞ for none).
fn max_f32(xs: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    rest.iter().chain(acc.iter()).fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

fn truncate_top_k(candidates: &mut Vec<(TokenId, f32)>, k: usize) {
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        candidates.truncate(k);
    }
}

/// One token drawn from softmax(`logits` / `temperature`) without sorting. Overwrites
/// `logits` with the unnormalised weights. This runs for every sequence between two decode
/// steps, on a vocabulary of up to ~150 000 tokens, while the engine's threads wait: so the
/// weights come from [`exp_f32`] (a loop the compiler vectorises), are summed per block of
/// [`DRAW_BLOCK`], and the draw scans block sums before it scans tokens.
fn draw_unsorted(logits: &mut [f32], max: f32, temperature: f32, draw: f32) -> TokenId {
    // Divide (not multiply by 1/t): a denormal temperature would make 1/t infinite, and 0 × ∞ NaN.
    for l in logits.iter_mut() {
        *l = exp_f32((*l - max) / temperature);
    }
    let block_sums: Vec<f32> = logits.chunks(DRAW_BLOCK).map(sum_f32).collect();
    let target = draw * block_sums.iter().sum::<f32>();
    let mut cumulative = 0.0;
    let mut start = 0;
    for (b, &s) in block_sums.iter().enumerate() {
        if target < cumulative + s {
            start = b * DRAW_BLOCK;
            break;
        }
        cumulative += s;
        start = (b + 1) * DRAW_BLOCK;
    }
    // Block sums and the running sum below round differently: scan on past the block if needed.
    for (i, &e) in logits.iter().enumerate().skip(start) {
        if e > 0.0 {
            cumulative += e;
            if target < cumulative {
                return i as TokenId;
            }
        }
    }
    // Rounding left the target beyond the total: the last token with any weight.
    logits.iter().rposition(|&e| e > 0.0).unwrap_or(0) as TokenId
}

/// Tokens per block sum in [`draw_unsorted`].
const DRAW_BLOCK: usize = 256;

/// A sum in eight lanes, so that it vectorises (a plain `f32` sum is one serial chain).
fn sum_f32(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (lane, x) in lanes.iter_mut().zip(c) {
            *lane += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `e^x` in `f32`, branch-free so that loops over it vectorise: Cephes' `expf` (range
/// reduction by ln 2, degree-6 polynomial; relative error below 2e-7). Exactly 0 below −87
/// (so −∞, a banned token, weighs nothing); inputs are clamped at 88 (`e^88` ≈ 1.7e38).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 × 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e_r = p * r * r + r + 1.0;
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((n_bits.wrapping_add(127) << 23) as u32);
    if x < -87.0 { 0.0 } else { e_r * scale }
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

    /// The two-pass argmax agrees with a plain scan on rows that end inside and at the edge
    /// of its 16 lanes, with the maximum first, in the middle and last, and a later tie.
    #[test]
    fn argmax_agrees_with_a_scan() {
        let scan = |v: &[f32]| {
            let mut best = 0;
            for (i, &l) in v.iter().enumerate() {
                if l > v[best] {
                    best = i;
                }
            }
            best as TokenId
        };
        for len in [1, 15, 16, 17, 33, 49_152] {
            for at in [0, len / 2, len - 1] {
                let mut v: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
                v[at] = 10.0;
                v[len - 1] = 10.0;
                assert_eq!(argmax(&v), scan(&v), "len {len}, max at {at}");
                assert_eq!(argmax(&v), at as TokenId);
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, f32::NAN]), 2, "NaNs are skipped");
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    /// Greedy without a working copy still honours a ban (`ignore_eos`) and bias.
    #[test]
    fn greedy_skips_a_banned_best_token_and_applies_bias() {
        let mut s = Sampler::new(params(0.0), &[]);
        assert_eq!(s.sample(&[0.0, 5.0, 3.0], &[1]), 2);
        assert_eq!(s.sample(&[0.0, 5.0, 3.0], &[]), 1);
        let mut biased = Sampler::new(SamplingParams { logit_bias: vec![(0, 9.0)], ..params(0.0) }, &[]);
        assert_eq!(biased.sample(&[0.0, 5.0, 3.0], &[]), 0);
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
    fn exp_f32_matches_the_standard_library() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            let rel = ((f64::from(exp_f32(x)) - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(200.0).is_finite());
    }

    #[test]
    fn the_block_draw_picks_the_token_a_plain_scan_picks() {
        // A vocabulary-sized row: the block scan must land where a token-by-token scan does.
        let logits: Vec<f32> = (0..151_936).map(|i| ((i as f32 * 0.618).sin() * 9.0).floor()).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from((l - max) / 0.8).exp()).collect();
        let total: f64 = weights.iter().sum();
        for k in 0..200 {
            let draw = (k as f32 + 0.5) / 200.0;
            let got = draw_unsorted(&mut logits.clone(), max, 0.8, draw) as usize;
            // the exact cumulative mass before and after the chosen token brackets the draw
            let before: f64 = weights[..got].iter().sum::<f64>() / total;
            let after = before + weights[got] / total;
            let d = f64::from(draw);
            assert!(before - 1e-4 <= d && d < after + 1e-4, "draw {d}: token {got} covers {before}..{after}");
        }
        // a vanishing temperature is greedy, not NaN
        assert_eq!(draw_unsorted(&mut vec![0.5, 2.0, 1.0], 2.0, 1e-40, 0.7), 1);
        // a lone weighted token at the very end is drawn from either end of the draw range
        let mut one_hot = vec![f32::NEG_INFINITY; 1000];
        one_hot[999] = 0.0;
        assert_eq!(draw_unsorted(&mut one_hot.clone(), 0.0, 1.0, 0.999_999), 999);
        assert_eq!(draw_unsorted(&mut one_hot, 0.0, 1.0, 0.0), 999);
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
