//! Per-key rate limits: requests per minute and tokens per minute, exact on one node.
//!
//! GCRA (the generic cell rate algorithm): each key keeps a "theoretical arrival time" (TAT)
//! per limit. A request of cost `c` moves TAT to `max(TAT, now) + c × T` where `T` is one
//! minute divided by the limit; it is allowed when the new TAT is at most one minute ahead of
//! now, so a full minute's allowance may be used in a burst. Tokens are known only after the
//! generation, so TPM reserves a request's prompt and `max_tokens` when it is placed (refused
//! while the key is in debt, so requests running at once overshoot by at most one), and
//! settles the reservation to the exact tokens afterwards. A plain struct, the time passed
//! in: tested without threads or clocks.

use std::collections::HashMap;

use tokenomy_ledger::KeyId;

const WINDOW_MS: i64 = 60_000;

/// Keys tracked at most; idle keys (TAT in the past) are dropped first.
pub const TRACKED_KEYS_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
}

/// What the `x-ratelimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Allowance {
    pub limit_requests: Option<u32>,
    pub remaining_requests: u32,
    pub reset_requests_ms: i64,
    pub limit_tokens: Option<u32>,
    pub remaining_tokens: u32,
    pub reset_tokens_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Which limit: "requests" or "tokens".
    pub limit: &'static str,
    pub retry_after_ms: i64,
    pub allowance: Allowance,
}

#[derive(Debug, Default, Clone, Copy)]
struct KeyState {
    requests_tat_ms: i64,
    /// The TAT of the tokens requests have used.
    tokens_tat_ms: i64,
    /// The tokens of requests still running, reserved: kept off the TAT, which moves with
    /// the clock, so that settling one request never takes back another's reservation.
    tokens_reserved_ms: i64,
}

impl KeyState {
    /// How far ahead of now the key's used and reserved tokens reach.
    fn tokens_ahead_ms(&self, now_ms: i64) -> i64 {
        (self.tokens_tat_ms - now_ms).max(0) + self.tokens_reserved_ms
    }
}

#[derive(Debug, Default)]
pub struct RateLimiter {
    keys: HashMap<KeyId, KeyState>,
}

fn interval_ms(limit: u32) -> f64 {
    WINDOW_MS as f64 / f64::from(limit.max(1))
}

/// How far `tokens` move a key's TPM clock.
fn tokens_ms(tpm: u32, tokens: u64) -> i64 {
    (tokens as f64 * interval_ms(tpm)).ceil() as i64
}

fn remaining(limit: u32, tat_ms: i64, now_ms: i64) -> u32 {
    let used_ms = (tat_ms - now_ms).max(0) as f64;
    ((WINDOW_MS as f64 - used_ms) / interval_ms(limit)).floor().clamp(0.0, f64::from(limit)) as u32
}

impl RateLimiter {
    /// Admits one request of `key` at `now_ms`, or says how long to wait.
    pub fn admit(&mut self, key: KeyId, limits: Limits, now_ms: i64) -> Result<Allowance, Limited> {
        if limits.rpm.is_none() && limits.tpm.is_none() {
            return Ok(Allowance::default());
        }
        if !self.bound(key, now_ms) {
            // Every tracked key is busy: refuse briefly rather than forget someone's debt.
            return Err(Limited { limit: "requests", retry_after_ms: 1_000, allowance: Allowance::default() });
        }
        let s = self.keys.entry(key).or_default();
        let mut a = Allowance { limit_requests: limits.rpm, limit_tokens: limits.tpm, ..Allowance::default() };
        if let Some(tpm) = limits.tpm {
            // In debt beyond the window: wait until the debt is back inside it.
            let ahead = s.tokens_ahead_ms(now_ms);
            a.remaining_tokens = remaining(tpm, now_ms + ahead, now_ms);
            a.reset_tokens_ms = ahead;
            if ahead >= WINDOW_MS {
                return Err(Limited { limit: "tokens", retry_after_ms: ahead - WINDOW_MS + 1, allowance: a });
            }
        }
        if let Some(rpm) = limits.rpm {
            let tat = s.requests_tat_ms.max(now_ms) + interval_ms(rpm).ceil() as i64;
            if tat - now_ms > WINDOW_MS {
                a.remaining_requests = 0;
                a.reset_requests_ms = s.requests_tat_ms - now_ms;
                return Err(Limited { limit: "requests", retry_after_ms: tat - now_ms - WINDOW_MS, allowance: a });
            }
            s.requests_tat_ms = tat;
            a.remaining_requests = remaining(rpm, tat, now_ms);
            a.reset_requests_ms = tat - now_ms;
        }
        Ok(a)
    }

    /// The key's TPM allowance now (its reservations and debt counted): for the headers of a
    /// response, which should show what is left after the request, not before it.
    pub fn tokens_now(&self, key: KeyId, limits: Limits, now_ms: i64, a: &mut Allowance) {
        let (Some(tpm), Some(s)) = (limits.tpm, self.keys.get(&key)) else { return };
        let ahead = s.tokens_ahead_ms(now_ms);
        a.remaining_tokens = remaining(tpm, now_ms + ahead, now_ms);
        a.reset_tokens_ms = ahead;
    }

    /// Reserves a request's tokens (its prompt and `max_tokens`; at most one window's worth,
    /// so any request can run) when it is placed, so that requests running at once count
    /// against the TPM before they finish; refused while the key's reservations and debt fill
    /// the window. Returns the tokens reserved, for [`settle_tokens`](Self::settle_tokens).
    pub fn reserve_tokens(&mut self, key: KeyId, limits: Limits, tokens: u64, now_ms: i64) -> Result<u64, Limited> {
        let Some(tpm) = limits.tpm else { return Ok(0) };
        let s = self.keys.entry(key).or_default();
        let ahead = s.tokens_ahead_ms(now_ms);
        if ahead >= WINDOW_MS {
            let allowance = Allowance { limit_tokens: Some(tpm), reset_tokens_ms: ahead, ..Allowance::default() };
            return Err(Limited { limit: "tokens", retry_after_ms: ahead - WINDOW_MS + 1, allowance });
        }
        let reserved = tokens.min(u64::from(tpm));
        s.tokens_reserved_ms = s.tokens_reserved_ms.saturating_add(tokens_ms(tpm, reserved));
        Ok(reserved)
    }

    /// Replaces a reservation by the tokens the request used (0 when it served nothing).
    pub fn settle_tokens(&mut self, key: KeyId, limits: Limits, reserved: u64, used: u64, now_ms: i64) {
        let Some(tpm) = limits.tpm else { return };
        let s = self.keys.entry(key).or_default();
        s.tokens_reserved_ms = (s.tokens_reserved_ms - tokens_ms(tpm, reserved)).max(0);
        s.tokens_tat_ms = s.tokens_tat_ms.max(now_ms).saturating_add(tokens_ms(tpm, used));
    }

    /// Makes room for `key` by dropping idle keys (their state is the default anyway);
    /// false if every tracked key is still busy.
    fn bound(&mut self, key: KeyId, now_ms: i64) -> bool {
        if self.keys.len() >= TRACKED_KEYS_MAX && !self.keys.contains_key(&key) {
            self.keys.retain(|_, s| s.requests_tat_ms > now_ms || s.tokens_ahead_ms(now_ms) > 0);
        }
        self.keys.len() < TRACKED_KEYS_MAX || self.keys.contains_key(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: KeyId = KeyId(7);

    #[test]
    fn rpm_allows_a_minute_burst_then_paces() {
        let mut r = RateLimiter::default();
        let l = Limits { rpm: Some(3), tpm: None };
        for left in [2, 1, 0] {
            assert_eq!(r.admit(K, l, 0).unwrap().remaining_requests, left);
        }
        let e = r.admit(K, l, 0).unwrap_err();
        assert_eq!((e.limit, e.retry_after_ms), ("requests", 20_000));
        assert!(r.admit(K, l, 19_999).is_err());
        assert!(r.admit(K, l, 20_000).is_ok());
        // Another key is independent.
        assert!(r.admit(KeyId(8), l, 0).is_ok());
    }

    #[test]
    fn tpm_admits_until_in_debt_then_waits_exactly() {
        let mut r = RateLimiter::default();
        let l = Limits { rpm: None, tpm: Some(600) }; // 100 ms per token
        assert!(r.admit(K, l, 0).is_ok());
        r.settle_tokens(K, l, 0, 599, 0);
        assert_eq!(r.admit(K, l, 0).unwrap().remaining_tokens, 1);
        r.settle_tokens(K, l, 0, 1_000, 0); // a big answer: 1 599 tokens in debt
        let e = r.admit(K, l, 0).unwrap_err();
        assert_eq!(e.limit, "tokens");
        assert_eq!(e.retry_after_ms, 159_900 - 60_000 + 1);
        assert!(r.admit(K, l, 99_901).is_ok());
    }

    #[test]
    fn requests_placed_at_once_reserve_their_tokens_and_settle_to_what_they_used() {
        let mut r = RateLimiter::default();
        let l = Limits { rpm: None, tpm: Some(100) }; // 600 ms per token
        // Eight requests of 56 tokens (prompt + max_tokens) at once: the first two fit the
        // window, the rest are told when to come back.
        let placed: Vec<_> = (0..8).map(|_| r.reserve_tokens(K, l, 56, 0)).collect();
        assert_eq!(placed.iter().filter(|p| p.is_ok()).count(), 2, "{placed:?}");
        assert!(placed[2..].iter().all(|p| matches!(p, Err(Limited { limit: "tokens", retry_after_ms: 7_201, .. }))));
        // Both used 20: the window has 60 tokens left, and the admission check agrees.
        r.settle_tokens(K, l, 56, 20, 0);
        r.settle_tokens(K, l, 56, 20, 0);
        assert_eq!(r.admit(K, l, 0).unwrap().remaining_tokens, 60);
        // A request larger than the whole budget reserves the budget, so it can still run.
        let mut r = RateLimiter::default();
        assert_eq!(r.reserve_tokens(K, l, 5_000, 0), Ok(100));
        assert!(r.reserve_tokens(K, l, 1, 0).is_err());
        r.settle_tokens(K, l, 100, 0, 0); // it failed: nothing used
        assert_eq!(r.reserve_tokens(K, l, 1, 0), Ok(1));
    }

    #[test]
    fn a_slow_request_settling_late_leaves_the_others_reservations_alone() {
        let mut r = RateLimiter::default();
        let l = Limits { rpm: None, tpm: Some(100) }; // 600 ms per token
        assert!(r.reserve_tokens(K, l, 56, 0).is_ok()); // A, slow
        assert!(r.reserve_tokens(K, l, 56, 40_000).is_ok()); // B
        assert!(r.reserve_tokens(K, l, 56, 40_000).is_err(), "A is still running: its tokens still count");
        r.settle_tokens(K, l, 56, 20, 41_000); // A ends having used 20
        assert!(r.reserve_tokens(K, l, 56, 41_000).is_ok()); // C
        // B and C still running (112 tokens reserved) and A's 20: the window is full.
        assert!(r.reserve_tokens(K, l, 56, 41_000).is_err());
        r.settle_tokens(K, l, 56, 56, 42_000);
        r.settle_tokens(K, l, 56, 56, 42_000);
        assert_eq!(r.keys[&K].tokens_reserved_ms, 0, "every reservation released");
        // 132 tokens used this minute: in debt until the excess is paid back in time.
        let e = r.admit(K, l, 42_000).unwrap_err();
        assert_eq!((e.limit, e.retry_after_ms), ("tokens", 120_200 - 42_000 - 60_000 + 1));
        assert!(r.admit(K, l, 42_000 + e.retry_after_ms).is_ok());
    }

    #[test]
    fn unlimited_keys_are_not_tracked() {
        let mut r = RateLimiter::default();
        assert!(r.admit(K, Limits { rpm: None, tpm: None }, 0).is_ok());
        assert!(r.keys.is_empty());
    }
}
