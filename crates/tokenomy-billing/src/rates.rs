//! Where a node keeps its keys' rate-limit clocks ([`KeyRate`]): in memory when it is its
//! ledger's only user (SQLite: one process per data dir), in the ledger when nodes share it
//! (PostgreSQL), so that behind N nodes a key still gets its RPM and TPM, not N times them.
//! The steps themselves are [`crate::ratelimit`]'s plain functions, the same on both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokenomy_ledger::any::pg_within;
use tokenomy_ledger::{AnyStore, KeyId, KeyRate, PgStore};

use crate::ratelimit::{self, Allowance, Limited, RateLimiter, Reservation};
use crate::{BillingError, Result};

#[derive(Clone)]
pub(crate) enum RateClocks {
    Node(Arc<Mutex<RateLimiter>>),
    /// `seen`: each key's clocks as this node's last step left them, for the headers of its
    /// responses (informative: a read per response would cost a round trip for nothing).
    Ledger { pg: PgStore, seen: Arc<Mutex<HashMap<KeyId, KeyRate>>> },
}

impl std::fmt::Debug for RateClocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RateClocks::Node(_) => "RateClocks::Node",
            RateClocks::Ledger { .. } => "RateClocks::Ledger",
        })
    }
}

/// Every tracked key busy (a node's memory bound): refused briefly rather than forgetting
/// someone's debt.
fn busy() -> BillingError {
    BillingError::RateLimited(Limited { limit: "requests", retry_after_ms: 1_000, allowance: Allowance::default() })
}

impl RateClocks {
    pub(crate) fn for_store(store: &AnyStore) -> RateClocks {
        match store {
            AnyStore::Sqlite(_) => RateClocks::Node(Default::default()),
            AnyStore::Pg(pg) => RateClocks::Ledger { pg: pg.clone(), seen: Default::default() },
        }
    }

    /// Runs `step` on `key`'s clocks: at once in memory; in the ledger under the key's row lock.
    pub(crate) async fn step<R: Send>(&self, key: KeyId, now_ms: i64, step: impl FnOnce(&mut KeyRate) -> R + Send) -> Result<R> {
        match self {
            RateClocks::Node(l) => lock(l).step(key, now_ms, step).ok_or_else(busy),
            RateClocks::Ledger { pg, seen } => {
                let (out, after) = pg_within(pg, 0, pg.update_key_rate(key, |s| (step(s), *s))).await?;
                remember(seen, key, after);
                Ok(out)
            }
        }
    }

    /// `key`'s clocks as they stand now.
    pub(crate) async fn read(&self, key: KeyId) -> Result<KeyRate> {
        match self {
            RateClocks::Node(l) => Ok(lock(l).get(key)),
            RateClocks::Ledger { pg, seen } => {
                let rate = pg_within(pg, 0, pg.key_rate(key)).await?;
                remember(seen, key, rate);
                Ok(rate)
            }
        }
    }

    /// `key`'s clocks as this node last saw them (read if it never did): for headers.
    pub(crate) async fn last_seen(&self, key: KeyId) -> Result<KeyRate> {
        if let RateClocks::Ledger { seen, .. } = self {
            if let Some(s) = lock(seen).get(&key) {
                return Ok(*s);
            }
        }
        self.read(key).await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keeps what a step or read left `key`'s clocks at, forgetting them all past
/// [`ratelimit::TRACKED_KEYS_MAX`] keys (the ledger has them).
fn remember(seen: &Mutex<HashMap<KeyId, KeyRate>>, key: KeyId, s: KeyRate) {
    let mut seen = lock(seen);
    if seen.len() >= ratelimit::TRACKED_KEYS_MAX {
        seen.clear();
    }
    seen.insert(key, s);
}

/// A request's tokens reserved against its key's TPM: replaced by the tokens it used when its
/// hold is settled, and released as unused when the hold is voided, refused or dropped (a
/// request task that fails in any way), so no reservation outlives its request, except on a
/// node that dies, where it runs out with the clock.
#[derive(Debug)]
pub(crate) struct TpmReservation {
    pub(crate) clocks: RateClocks,
    pub(crate) key: KeyId,
    /// `None` once settled.
    pub(crate) reservation: Option<Reservation>,
}

impl TpmReservation {
    /// The reservation, moved out (this one is left settled): to settle it alongside the charge.
    pub(crate) fn take(&mut self) -> TpmReservation {
        TpmReservation { clocks: self.clocks.clone(), key: self.key, reservation: self.reservation.take() }
    }

    /// Settles the reservation to `used` tokens. A ledger that fails to take the settlement
    /// leaves the whole reservation on the clock: the key waits longer, never less.
    pub(crate) async fn settle(&mut self, used: u64) {
        let Some(r) = self.reservation.take().filter(|r| r.tpm > 0) else { return };
        let now = tokenomy_ledger::now_ms();
        if let Err(e) = self.clocks.step(self.key, now, move |s| ratelimit::settle_tokens(s, r, used, now)).await {
            tracing::warn!(error = %e, key = %self.key, "a TPM reservation was not settled; it runs out with the clock");
        }
    }
}

impl Drop for TpmReservation {
    fn drop(&mut self) {
        let Some(r) = self.reservation.take().filter(|r| r.tpm > 0) else { return };
        let now = tokenomy_ledger::now_ms();
        match &self.clocks {
            RateClocks::Node(l) => {
                lock(l).step(self.key, now, |s| ratelimit::settle_tokens(s, r, 0, now));
            }
            RateClocks::Ledger { .. } => {
                let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
                let mut rest = TpmReservation { clocks: self.clocks.clone(), key: self.key, reservation: Some(r) };
                rt.spawn(async move { rest.settle(0).await });
            }
        }
    }
}
