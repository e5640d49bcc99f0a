//! Per-key rate limits: requests per minute and tokens per minute, exact on one node and
//! across the nodes of one PostgreSQL ledger.
//!
//! GCRA (the generic cell rate algorithm): each key keeps a "theoretical arrival time" (TAT)
//! per limit, its [`KeyRate`] (in microseconds). A request of cost `c` moves TAT to `max(TAT, now) + c × T` where
//! `T` is one minute divided by the limit; it is allowed when the new TAT is at most one minute
//! ahead of now, so a full minute's allowance may be used in a burst. Tokens are known only
//! after the generation, so TPM reserves a request's prompt and `max_tokens` on the token
//! clock when it is placed (refused while the key is in debt, so requests running at once
//! overshoot by at most one), and settles to the exact tokens afterwards: more used moves the
//! clock on; fewer gives back the unused tail of the reservation, as far as it is still ahead of
//! now, so that no settlement takes back time another request reserved after it.
//!
//! A limit an admin changes applies at the key's next step: the clocks remember the limits
//! they were last stepped under, and a clock on another limit's scale is first put on the new
//! one, keeping the requests (or tokens) it stands for ([`rescale`]): one request under 1 RPM
//! is the whole minute, under 100 RPM one hundredth of it.
//!
//! Why the reservations are on the clock and not a counter beside it: the clocks are the
//! whole state, two integers per key. One node keeps them in memory ([`RateLimiter`]); the
//! nodes of one PostgreSQL ledger keep them in one row per key and step them under its lock
//! (`PgStore::update_key_rate`). A node that dies before settling leaves its reservation
//! on the clock, where it runs out with time (at most one minute): a counter would keep it
//! forever. The steps are plain functions of the clocks, the time passed in: tested without
//! threads, clocks or a database.

use std::collections::HashMap;

use tokenomy_ledger::{KeyId, KeyRate};

const WINDOW_US: i64 = 60_000_000;

/// Keys tracked at most by one node's [`RateLimiter`]; idle keys (clocks in the past) are
/// dropped first.
pub const TRACKED_KEYS_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
}

impl Limits {
    pub fn is_limited(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
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

/// A request's tokens reserved on its key's token clock, for [`settle_tokens`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation {
    pub tokens: u64,
    /// The TPM it was reserved under (0: none, nothing reserved): a limit changed meanwhile
    /// does not change what is given back.
    pub tpm: u32,
    /// Where the token clock stood right after it: the reservation's tail ends there.
    pub end_us: i64,
}

/// The clocks count microseconds, so that a limit of up to 60 million a minute keeps its
/// rate (a millisecond clock would round every request up to a whole millisecond, capping
/// any RPM at 60 000); the API speaks milliseconds, rounded up.
fn us(ms: i64) -> i64 {
    ms.saturating_mul(1_000)
}

fn ms_ceil(us: i64) -> i64 {
    us.div_euclid(1_000) + i64::from(us.rem_euclid(1_000) != 0)
}

fn interval_us(limit: u32) -> f64 {
    WINDOW_US as f64 / f64::from(limit.max(1))
}

/// How far `tokens` move a key's TPM clock.
fn tokens_us(tpm: u32, tokens: u64) -> i64 {
    (tokens as f64 * interval_us(tpm)).ceil() as i64
}

fn remaining(limit: u32, tat_us: i64, now_us: i64) -> u32 {
    let used_us = (tat_us - now_us).max(0) as f64;
    ((WINDOW_US as f64 - used_us) / interval_us(limit)).floor().clamp(0.0, f64::from(limit)) as u32
}

/// A clock `tat` that runs `from`'s intervals, on `to`'s: what is ahead of now keeps the
/// requests (or tokens) it stands for, so a raised limit leaves that much more room, and a
/// lowered one waits longer, though never past a window (or past the wait it had already).
fn scale(tat: i64, now: i64, from: u32, to: u32) -> i64 {
    let ahead = i128::from((tat - now).max(0));
    let scaled = (ahead * i128::from(from) / i128::from(to.max(1))).min(ahead.max(i128::from(WINDOW_US)));
    now.saturating_add(scaled as i64)
}

/// Puts the clocks on `limits`' scale (see the module's notes), and records the limits.
fn rescale(s: &mut KeyRate, limits: Limits, now: i64) {
    if let Some(rpm) = limits.rpm {
        if s.rpm != 0 && s.rpm != rpm {
            s.requests_tat_us = scale(s.requests_tat_us, now, s.rpm, rpm);
        }
        s.rpm = rpm;
    }
    if let Some(tpm) = limits.tpm {
        if s.tpm != 0 && s.tpm != tpm {
            s.tokens_tat_us = scale(s.tokens_tat_us, now, s.tpm, tpm);
        }
        s.tpm = tpm;
    }
}

/// How far ahead of now the key's used and reserved tokens reach.
fn tokens_ahead_us(s: &KeyRate, now_us: i64) -> i64 {
    (s.tokens_tat_us - now_us).max(0)
}

/// Refused for tokens: in debt `ahead_us` beyond now, back inside the window just after.
fn tokens_limited(ahead_us: i64, allowance: Allowance) -> Limited {
    Limited { limit: "tokens", retry_after_ms: ms_ceil(ahead_us - WINDOW_US + 1), allowance }
}

/// Admits one request at `now_ms` (its RPM step, and no TPM debt beyond the window), or says
/// how long to wait.
pub fn admit(s: &mut KeyRate, limits: Limits, now_ms: i64) -> Result<Allowance, Limited> {
    let now = us(now_ms);
    rescale(s, limits, now);
    let mut a = Allowance { limit_requests: limits.rpm, limit_tokens: limits.tpm, ..Allowance::default() };
    if let Some(tpm) = limits.tpm {
        // In debt beyond the window: wait until the debt is back inside it.
        let ahead = tokens_ahead_us(s, now);
        a.remaining_tokens = remaining(tpm, now + ahead, now);
        a.reset_tokens_ms = ms_ceil(ahead);
        if ahead >= WINDOW_US {
            return Err(tokens_limited(ahead, a));
        }
    }
    if let Some(rpm) = limits.rpm {
        let tat = s.requests_tat_us.max(now) + interval_us(rpm).ceil() as i64;
        if tat - now > WINDOW_US {
            a.remaining_requests = 0;
            a.reset_requests_ms = ms_ceil(s.requests_tat_us - now);
            return Err(Limited { limit: "requests", retry_after_ms: ms_ceil(tat - now - WINDOW_US), allowance: a });
        }
        s.requests_tat_us = tat;
        a.remaining_requests = remaining(rpm, tat, now);
        a.reset_requests_ms = ms_ceil(tat - now);
    }
    Ok(a)
}

/// The key's TPM allowance now (its reservations and debt counted): for the headers of a
/// response, which should show what is left after the request, not before it.
pub fn tokens_now(s: &KeyRate, limits: Limits, now_ms: i64, a: &mut Allowance) {
    let Some(tpm) = limits.tpm else { return };
    let now = us(now_ms);
    let mut s = *s;
    rescale(&mut s, limits, now);
    let s = &s;
    let ahead = tokens_ahead_us(s, now);
    a.remaining_tokens = remaining(tpm, now + ahead, now);
    a.reset_tokens_ms = ms_ceil(ahead);
}

/// What the key may still do at `now_ms`, its clocks left as they are (for `GET /v1/me`).
pub fn peek(s: &KeyRate, limits: Limits, now_ms: i64) -> Allowance {
    let now = us(now_ms);
    let mut s = *s;
    rescale(&mut s, limits, now);
    let s = &s;
    let mut a = Allowance { limit_requests: limits.rpm, limit_tokens: limits.tpm, ..Allowance::default() };
    if let Some(rpm) = limits.rpm {
        a.remaining_requests = remaining(rpm, s.requests_tat_us, now);
        a.reset_requests_ms = ms_ceil((s.requests_tat_us - now).max(0));
    }
    tokens_now(s, limits, now_ms, &mut a);
    a
}

/// Reserves a request's tokens (its prompt and `max_tokens`; at most one window's worth, so
/// any request can run) when it is placed, so that requests running at once count against
/// the TPM before they finish; refused while the key's reservations and debt fill the window.
pub fn reserve_tokens(s: &mut KeyRate, limits: Limits, tokens: u64, now_ms: i64) -> Result<Reservation, Limited> {
    let Some(tpm) = limits.tpm else { return Ok(Reservation::default()) };
    let now = us(now_ms);
    rescale(s, limits, now);
    let ahead = tokens_ahead_us(s, now);
    if ahead >= WINDOW_US {
        return Err(tokens_limited(ahead, Allowance { limit_tokens: Some(tpm), reset_tokens_ms: ms_ceil(ahead), ..Allowance::default() }));
    }
    let tokens = tokens.min(u64::from(tpm));
    s.tokens_tat_us = s.tokens_tat_us.max(now).saturating_add(tokens_us(tpm, tokens));
    Ok(Reservation { tokens, tpm, end_us: s.tokens_tat_us })
}

/// Replaces a reservation by the tokens the request used (0 when it served nothing): more
/// than reserved moves the clock on by the rest; fewer gives back the reservation's unused
/// tail, as far as that tail is still ahead of now (what has passed was held, and is gone).
pub fn settle_tokens(s: &mut KeyRate, r: Reservation, used: u64, now_ms: i64) {
    if r.tpm == 0 {
        return;
    }
    let now = us(now_ms);
    // On the clock's scale now (its TPM changed since the reservation, if `s.tpm` says so).
    let tpm = if s.tpm == 0 { r.tpm } else { s.tpm };
    let end_us = scale(r.end_us, now, r.tpm, tpm);
    let (reserved_us, used_us) = (tokens_us(tpm, r.tokens), tokens_us(tpm, used));
    if used_us >= reserved_us {
        s.tokens_tat_us = s.tokens_tat_us.max(now).saturating_add(used_us - reserved_us);
    } else {
        let give_back_us = (reserved_us - used_us).min((end_us - now).max(0));
        s.tokens_tat_us -= give_back_us;
    }
}

/// One node's clocks, in memory: for a ledger whose only user is this node (SQLite).
#[derive(Debug, Default)]
pub struct RateLimiter {
    keys: HashMap<KeyId, KeyRate>,
}

impl RateLimiter {
    /// Runs `step` on `key`'s clocks; `None` when every tracked key is busy and `key` is new
    /// (refuse briefly rather than forget someone's debt).
    pub fn step<R>(&mut self, key: KeyId, now_ms: i64, step: impl FnOnce(&mut KeyRate) -> R) -> Option<R> {
        if !self.bound(key, now_ms) {
            return None;
        }
        Some(step(self.keys.entry(key).or_default()))
    }

    /// `key`'s clocks (zero for a key never seen).
    pub fn get(&self, key: KeyId) -> KeyRate {
        self.keys.get(&key).copied().unwrap_or_default()
    }

    /// Makes room for `key` by dropping idle keys (their state is the default anyway);
    /// false if every tracked key is still busy.
    fn bound(&mut self, key: KeyId, now_ms: i64) -> bool {
        if self.keys.len() >= TRACKED_KEYS_MAX && !self.keys.contains_key(&key) {
            self.keys.retain(|_, s| s.requests_tat_us > us(now_ms) || s.tokens_tat_us > us(now_ms));
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
            assert_eq!(r.step(K, 0, |s| admit(s, l, 0)).unwrap().unwrap().remaining_requests, left);
        }
        let e = r.step(K, 0, |s| admit(s, l, 0)).unwrap().unwrap_err();
        assert_eq!((e.limit, e.retry_after_ms), ("requests", 20_000));
        assert!(r.step(K, 19_999, |s| admit(s, l, 19_999)).unwrap().is_err());
        assert!(r.step(K, 20_000, |s| admit(s, l, 20_000)).unwrap().is_ok());
        // Another key is independent.
        assert!(r.step(KeyId(8), 0, |s| admit(s, l, 0)).unwrap().is_ok());
    }

    #[test]
    fn limits_of_more_than_one_a_millisecond_keep_their_rate() {
        // 600 000 a minute is 10 a millisecond: sustained for 10 s, every request gets in (a
        // millisecond clock would count each as a whole millisecond and refuse after 6 s).
        let s = &mut KeyRate::default();
        let l = Limits { rpm: Some(600_000), tpm: Some(600_000_000) };
        for i in 0..100_000 {
            let now = i / 10;
            admit(s, l, now).unwrap();
            let r = reserve_tokens(s, l, 456, now).unwrap();
            settle_tokens(s, r, 300, now);
        }
        assert!(s.requests_tat_us <= us(10_000), "{s:?}");
        assert!(s.tokens_tat_us <= us(10_000) + 1_000, "{s:?}");
    }

    #[test]
    fn peeking_moves_no_clock() {
        let s = &mut KeyRate::default();
        let l = Limits { rpm: Some(3), tpm: Some(600) };
        assert_eq!(peek(s, l, 0).remaining_requests, 3);
        admit(s, l, 0).unwrap();
        let r = reserve_tokens(s, l, 100, 0).unwrap();
        settle_tokens(s, r, 40, 0);
        let before = *s;
        let a = peek(s, l, 0);
        assert_eq!((a.remaining_requests, a.reset_requests_ms, a.remaining_tokens, a.reset_tokens_ms), (2, 20_000, 560, 4_000));
        assert_eq!(*s, before);
    }

    #[test]
    fn tpm_admits_until_in_debt_then_waits_exactly() {
        let s = &mut KeyRate::default();
        let l = Limits { rpm: None, tpm: Some(600) }; // 100 ms per token
        assert!(admit(s, l, 0).is_ok());
        let r = reserve_tokens(s, l, 0, 0).unwrap();
        settle_tokens(s, r, 599, 0);
        assert_eq!(admit(s, l, 0).unwrap().remaining_tokens, 1);
        let r = reserve_tokens(s, l, 0, 0).unwrap();
        settle_tokens(s, r, 1_000, 0); // a big answer: 1 599 tokens in debt
        let e = admit(s, l, 0).unwrap_err();
        assert_eq!(e.limit, "tokens");
        assert_eq!(e.retry_after_ms, 159_900 - 60_000 + 1);
        assert!(admit(s, l, 99_901).is_ok());
    }

    #[test]
    fn requests_placed_at_once_reserve_their_tokens_and_settle_to_what_they_used() {
        let s = &mut KeyRate::default();
        let l = Limits { rpm: None, tpm: Some(100) }; // 600 ms per token
        // Eight requests of 56 tokens (prompt + max_tokens) at once: the first two fit the
        // window, the rest are told when to come back.
        let placed: Vec<_> = (0..8).map(|_| reserve_tokens(s, l, 56, 0)).collect();
        assert_eq!(placed.iter().filter(|p| p.is_ok()).count(), 2, "{placed:?}");
        assert!(placed[2..].iter().all(|p| matches!(p, Err(Limited { limit: "tokens", retry_after_ms: 7_201, .. }))));
        // Both used 20: the window has 60 tokens left, and the admission check agrees.
        settle_tokens(s, placed[0].unwrap(), 20, 0);
        settle_tokens(s, placed[1].unwrap(), 20, 0);
        assert_eq!(admit(s, l, 0).unwrap().remaining_tokens, 60);
        // A request larger than the whole budget reserves the budget, so it can still run.
        let s = &mut KeyRate::default();
        let big = reserve_tokens(s, l, 5_000, 0).unwrap();
        assert_eq!(big.tokens, 100);
        assert!(reserve_tokens(s, l, 1, 0).is_err());
        settle_tokens(s, big, 0, 0); // it failed: nothing used
        assert_eq!(reserve_tokens(s, l, 1, 0).unwrap().tokens, 1);
    }

    #[test]
    fn a_settlement_gives_back_only_its_own_tail_still_ahead() {
        let l = Limits { rpm: None, tpm: Some(100) }; // 600 ms per token
        let s = &mut KeyRate::default();
        let a = reserve_tokens(s, l, 56, 0).unwrap(); // A: [0, 33.6 s)
        let b = reserve_tokens(s, l, 56, 10_000).unwrap(); // B, queued after it: [33.6, 67.2 s)
        assert_eq!(b.end_us, 67_200_000);
        // A fails at 11 s: what was still ahead of its reservation comes back, and B keeps
        // all of its own (56 tokens, 33.6 s ahead).
        settle_tokens(s, a, 0, 11_000);
        assert_eq!(s.tokens_tat_us - 11_000_000, 33_600_000);
        settle_tokens(s, b, 56, 12_000);
        assert_eq!(s.tokens_tat_us, 44_600_000, "used as reserved: nothing moves");

        // A slow request settling after its reservation ran out with the clock gives nothing
        // back: those tokens were held while they counted.
        let s = &mut KeyRate::default();
        let slow = reserve_tokens(s, l, 56, 0).unwrap();
        let other = reserve_tokens(s, l, 56, 40_000).unwrap();
        settle_tokens(s, slow, 20, 41_000);
        assert_eq!(s.tokens_tat_us, other.end_us);
        // Used more than reserved (the reservation was capped at the budget): the rest is debt.
        let s = &mut KeyRate::default();
        let capped = reserve_tokens(s, l, 5_000, 0).unwrap();
        settle_tokens(s, capped, 150, 1_000);
        assert_eq!(s.tokens_tat_us, 90_000_000);
        assert_eq!(admit(s, l, 1_000).unwrap_err().retry_after_ms, 90_000 - 1_000 - 60_000 + 1);
    }

    #[test]
    fn a_reservation_never_settled_runs_out_with_the_clock() {
        // The node that placed it died: nobody gives it back, and it only delays the key by
        // what it reserved, counted from when it was placed.
        let l = Limits { rpm: None, tpm: Some(100) };
        let s = &mut KeyRate::default();
        let _lost = reserve_tokens(s, l, 100, 0).unwrap();
        assert!(admit(s, l, 0).is_err());
        assert_eq!(admit(s, l, 30_000).unwrap().remaining_tokens, 50);
        assert_eq!(admit(s, l, 60_000).unwrap().remaining_tokens, 100);
    }

    #[test]
    fn a_limit_changed_meanwhile_gives_back_what_was_reserved() {
        let s = &mut KeyRate::default();
        let r = reserve_tokens(s, Limits { rpm: None, tpm: Some(100) }, 50, 0).unwrap();
        // The key's TPM is raised to 6 000 while the request runs: its reservation (30 s on
        // the clock) is still given back whole.
        settle_tokens(s, r, 0, 0);
        assert_eq!(s.tokens_tat_us, 0);
        assert!(!Limits::default().is_limited());
        // Raised before it settles (the clock rescaled by the next step): still given back whole.
        let r = reserve_tokens(s, Limits { rpm: None, tpm: Some(100) }, 50, 0).unwrap();
        reserve_tokens(s, Limits { rpm: None, tpm: Some(6_000) }, 0, 0).unwrap();
        settle_tokens(s, r, 0, 0);
        assert_eq!(s.tokens_tat_us, 0, "{s:?}");
    }

    /// A limit changed by an admin applies at the key's next request: the requests already
    /// made count, not the old limit's time (one request under 1 RPM used the whole minute;
    /// under 100 RPM it is one of 100, so 99 more pass at once).
    #[test]
    fn a_changed_limit_applies_at_the_next_request() {
        let mut r = RateLimiter::default();
        let one = Limits { rpm: Some(1), tpm: Some(60) };
        r.step(K, 0, |s| admit(s, one, 0)).unwrap().unwrap();
        r.step(K, 0, |s| reserve_tokens(s, one, 60, 0)).unwrap().unwrap();
        assert!(r.step(K, 1, |s| admit(s, one, 1)).unwrap().is_err());
        let raised = Limits { rpm: Some(100), tpm: Some(6_000) };
        assert_eq!(peek(&r.get(K), raised, 1).remaining_requests, 99);
        for left in (0..99).rev() {
            assert_eq!(r.step(K, 1, |s| admit(s, raised, 1)).unwrap().unwrap().remaining_requests, left);
        }
        assert!(r.step(K, 1, |s| admit(s, raised, 1)).unwrap().is_err());
        let a = r.step(K, 1, |s| admit(s, Limits { rpm: None, tpm: Some(6_000) }, 1)).unwrap().unwrap();
        assert_eq!(a.remaining_tokens, 5_940, "60 of 6 000 tokens used");
        // Lowered: a key that made 100 requests is out under 10 RPM, for at most a window.
        let lowered = Limits { rpm: Some(10), tpm: None };
        assert!(r.step(K, 2, |s| admit(s, lowered, 2)).unwrap().is_err());
        assert!(r.step(K, 60_000, |s| admit(s, lowered, 60_000)).unwrap().is_ok());
    }
}
