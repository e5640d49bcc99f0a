//! tokenomy-ledger: a double-entry ledger of prepaid credits, modelled on
//! TigerBeetle.
//!
//! Why it is shaped this way:
//!
//! * **Every token is billed before it is served.** A request first places a
//!   *hold* (a pending transfer user → operator revenue) for its worst-case
//!   cost, then *settles* the real cost and releases the rest. A crash between
//!   the two leaves a hold with a timeout, which [`LedgerStore::expire_holds`]
//!   voids at startup and periodically, so no money is ever stranded.
//! * **Money is an `i64` of micro-credits**, never a float; pricing computes
//!   the exact product in `i128` and rounds up once ([`domain::cost_micros`]).
//! * **Double entry**: each transfer debits exactly what it credits, so the
//!   posted balances of all accounts always sum to zero (the treasury is minus
//!   the money supply). [`LedgerStore::check`] re-derives every balance from
//!   history and proves this by reading back.
//! * **The rules live once, in [`domain`]** (pure functions over in-memory
//!   accounts, no I/O); each store only loads rows, applies the rules and
//!   persists the result in one transaction, asserting invariants on every
//!   write (`debug_assert!` plus a real check that returns an error).
//! * **Idempotency keys** make every write safe to retry across crashes and
//!   network failures: same key and parameters return the original transfer.
//! * **Balances are maintained columns**, updated in the same transaction as
//!   the transfer, so a budget check is one row read, never a history scan.
//! * **A limit on everything** (amounts, names, keys, pages, leaves, batches,
//!   channel depth) so that no input can make the ledger do unbounded work.
//! * **Two stores, one conformance suite**: [`SqliteStore`] for a single node
//!   (one writer thread, group commit: many operations share one fsync; the
//!   idempotency keys and statement entries indexed in bulk, in a second file,
//!   by a thread of their own; a Bloom filter of every key tells a new key new
//!   without a lookup there) and
//!   [`PgStore`] for shared deployments (row locks in a fixed order).
//! * An optional **leaf closure** lets the receipts log (a transparency log
//!   of charges) be appended in the *same* transaction as the charge, so a
//!   charge and its log entry exist together or not at all.

pub mod any;
pub mod domain;
pub mod pg;
pub mod sqlite;
mod sqlite_index;
mod sqlite_keys;
mod sqlite_raw;
mod sqlite_writer;
pub mod testing;

use std::future::Future;
use std::sync::Arc;

pub use any::AnyStore;
pub use domain::*;
pub use pg::{KeptDoc, KeptLimits, PgStore};
pub use sqlite::{Durability, SqliteStore};

/// Builds the log leaf for a posted transfer, given the log index it will get.
/// Runs inside the store's write transaction (on SQLite, on the writer
/// thread), so it must be fast, pure and must not block. It is an `Arc` rather
/// than a borrowed `&dyn Fn` because SQLite's group-commit writer thread runs
/// it after the caller's future may have been dropped; a borrow cannot cross
/// that boundary soundly. The result must be at most [`MAX_LEAF_LEN_BYTES`].
pub type Leaf = Arc<dyn Fn(u64, &Transfer) -> Vec<u8> + Send + Sync>;

/// The ledger's storage contract. All futures are `Send`, so stores can be
/// used from any tokio task. Every write is one atomic transaction.
pub trait LedgerStore: Send + Sync + 'static {
    /// Creates a User or Agent account with zero balance.
    fn create_account(&self, name: &str, kind: AccountKind) -> impl Future<Output = Result<Account>> + Send;
    fn get_account(&self, id: AccountId) -> impl Future<Output = Result<Account>> + Send;
    /// Up to `limit` accounts (at most [`MAX_PAGE_LEN`]) in id order (creation order, to the
    /// millisecond), after
    /// `after` when given; the system accounts come first.
    fn list_accounts(&self, after: Option<AccountId>, limit: u32) -> impl Future<Output = Result<Vec<Account>>> + Send;
    /// Posted transfer treasury → `account`.
    fn mint(
        &self,
        account: AccountId,
        amount_micros: i64,
        idempotency_key: &str,
        leaf: Option<Leaf>,
    ) -> impl Future<Output = Result<Transfer>> + Send;
    /// Posted transfer between two funded accounts (or to operator revenue).
    fn transfer(
        &self,
        from: AccountId,
        to: AccountId,
        amount_micros: i64,
        idempotency_key: &str,
        leaf: Option<Leaf>,
    ) -> impl Future<Output = Result<Transfer>> + Send;
    /// Posted refund operator revenue → `account` (a funded account): a usage charge given back.
    fn refund(
        &self,
        account: AccountId,
        amount_micros: i64,
        idempotency_key: &str,
        leaf: Option<Leaf>,
    ) -> impl Future<Output = Result<Transfer>> + Send;
    /// Pending usage charge `account` → operator revenue, expiring at `now_ms + timeout_ms`.
    fn hold(
        &self,
        account: AccountId,
        amount_micros: i64,
        idempotency_key: &str,
        timeout_ms: i64,
        now_ms: i64,
    ) -> impl Future<Output = Result<Transfer>> + Send {
        self.hold_as(FreshTransferId::generate(now_ms), account, None, amount_micros, idempotency_key, timeout_ms, now_ms)
    }
    /// [`hold`](Self::hold) on behalf of an API key with spend caps: in the same
    /// transaction the key's [`KeySpend`] reserves the amount, and the hold fails
    /// with [`LedgerError::SpendCapExceeded`] if posted spend this UTC day/month
    /// plus every pending hold of the key plus this one could exceed a cap. Its
    /// settlement counts as spent, its void or expiry releases the reservation.
    /// (Keys without caps use `hold`: their requests touch no key row.)
    fn hold_for_key(
        &self,
        account: AccountId,
        key: KeyId,
        amount_micros: i64,
        idempotency_key: &str,
        timeout_ms: i64,
        now_ms: i64,
    ) -> impl Future<Output = Result<Transfer>> + Send {
        self.hold_as(FreshTransferId::generate(now_ms), account, Some(key), amount_micros, idempotency_key, timeout_ms, now_ms)
    }
    /// [`hold`](Self::hold), or [`hold_for_key`](Self::hold_for_key) when `key` is given,
    /// whose transfer gets `id` when this call creates it. The returned transfer's id is
    /// `id.id()` exactly when this call placed the hold; any other id means a hold under the
    /// same idempotency key was already there (placed by an earlier call, or by a concurrent
    /// one on another node of the same ledger).
    #[allow(clippy::too_many_arguments)]
    fn hold_as(
        &self,
        id: FreshTransferId,
        account: AccountId,
        key: Option<KeyId>,
        amount_micros: i64,
        idempotency_key: &str,
        timeout_ms: i64,
        now_ms: i64,
    ) -> impl Future<Output = Result<Transfer>> + Send;
    /// Posts `amount_micros` (≤ held) of a hold and voids the rest. Idempotent
    /// per hold: settling again with the same amount returns the same result.
    fn settle(
        &self,
        hold_id: TransferId,
        amount_micros: i64,
        now_ms: i64,
        leaf: Option<Leaf>,
    ) -> impl Future<Output = Result<Settled>> + Send;
    /// Releases a pending hold. Voiding a voided hold is a no-op.
    fn void(&self, hold_id: TransferId) -> impl Future<Output = Result<Transfer>> + Send;
    /// Voids up to [`sqlite::MAX_EXPIRE_PER_CALL`] holds whose timeout passed; returns how many.
    fn expire_holds(&self, now_ms: i64) -> impl Future<Output = Result<u64>> + Send;
    /// Moves the expiry of those of `hold_ids` still pending to `expires_at_ms` (never
    /// earlier): a node keeps the holds of requests it is still serving alive, so a long answer
    /// is charged however long it takes, while a crashed node's holds still expire. At most
    /// [`sqlite::MAX_EXPIRE_PER_CALL`] ids; returns how many holds were extended.
    fn extend_holds(&self, hold_ids: &[TransferId], expires_at_ms: i64) -> impl Future<Output = Result<u64>> + Send;
    /// Transfers touching `account`, oldest first, after `after_cursor`.
    fn statement(
        &self,
        account: AccountId,
        after_cursor: Option<u64>,
        limit: u32,
    ) -> impl Future<Output = Result<Page<Transfer>>> + Send;
    /// Transfers touching `account`, newest first, before `before_cursor` (the `next_cursor`
    /// of the previous page): what a person looking at their account asks for first.
    fn statement_newest_first(
        &self,
        account: AccountId,
        before_cursor: Option<u64>,
        limit: u32,
    ) -> impl Future<Output = Result<Page<Transfer>>> + Send;
    /// Re-derives every invariant from stored history.
    fn check(&self) -> impl Future<Output = Result<CheckReport>> + Send;
    fn log_entries(&self, from_index: u64, limit: u32) -> impl Future<Output = Result<Vec<LogEntry>>> + Send;
    fn log_size(&self) -> impl Future<Output = Result<u64>> + Send;
    fn create_key(
        &self,
        account: AccountId,
        key_hash: [u8; 32],
        scopes: &[String],
        rpm: Option<u32>,
        tpm: Option<u32>,
        caps: SpendCaps,
    ) -> impl Future<Output = Result<KeyId>> + Send;
    /// The live (not revoked) key with this hash.
    fn find_key_by_hash(&self, key_hash: [u8; 32]) -> impl Future<Output = Result<Option<KeyRecord>>> + Send;
    fn revoke_key(&self, key_id: KeyId) -> impl Future<Output = Result<()>> + Send;
    /// Changes a key's RPM/TPM limits and spend caps: those `change` names, atomically (see
    /// [`KeyLimitsChange`]). Its spend counters are kept: a cap set today counts what
    /// `hold_for_key` holds posted today. Returns the key as stored.
    fn set_key_limits(&self, key_id: KeyId, change: KeyLimitsChange) -> impl Future<Output = Result<KeyRecord>> + Send;
    /// All keys of an account, revoked ones included.
    fn list_keys(&self, account: AccountId) -> impl Future<Output = Result<Vec<KeyRecord>>> + Send;
    /// One key, revoked or not.
    fn get_key(&self, key_id: KeyId) -> impl Future<Output = Result<KeyRecord>> + Send;
}

/// Wall-clock milliseconds since the Unix epoch (for operations without `now_ms`).
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Calls a leaf closure, enforcing its size limit and containing a panic.
pub(crate) fn run_leaf(leaf: &Leaf, log_index: u64, t: &Transfer) -> Result<Vec<u8>> {
    let bytes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| leaf(log_index, t)))
        .map_err(|_| LedgerError::InvalidArgument("leaf closure panicked".into()))?;
    if bytes.len() > MAX_LEAF_LEN_BYTES {
        return Err(LedgerError::InvalidArgument(format!("leaf exceeds {MAX_LEAF_LEN_BYTES} bytes")));
    }
    Ok(bytes)
}

/// Bounds an [`LedgerStore::extend_holds`] call.
pub(crate) fn extend_request(hold_ids: &[TransferId]) -> Result<Vec<Vec<u8>>> {
    if hold_ids.len() as u64 > sqlite::MAX_EXPIRE_PER_CALL {
        return Err(LedgerError::InvalidArgument(format!("at most {} holds per extend", sqlite::MAX_EXPIRE_PER_CALL)));
    }
    Ok(hold_ids.iter().map(|id| id.to_bytes().to_vec()).collect())
}

/// Validates the caller's side of a hold before any I/O.
pub(crate) fn hold_request(
    id: FreshTransferId,
    account: AccountId,
    amount_micros: i64,
    key: &str,
    timeout_ms: i64,
    key_id: Option<KeyId>,
) -> Result<TransferRequest> {
    validate_amount(amount_micros)?;
    validate_idempotency_key(key)?;
    validate_timeout(timeout_ms)?;
    Ok(TransferRequest {
        idempotency_key: key.to_owned(),
        debit_account: account,
        credit_account: OPERATOR_REVENUE,
        amount_micros,
        code: TransferCode::UsageCharge,
        hold: true,
        timeout_ms,
        key_id,
        id: Some(id.id()),
    })
}

/// Validates the caller's side of a mint or transfer before any I/O.
pub(crate) fn posted_request(
    from: AccountId,
    to: AccountId,
    amount_micros: i64,
    key: &str,
    code: TransferCode,
) -> Result<TransferRequest> {
    validate_amount(amount_micros)?;
    validate_idempotency_key(key)?;
    if from == to && code == TransferCode::Mint {
        // The treasury minting to itself: it is the account that may not be credited.
        return Err(LedgerError::InvalidArgument("credits are minted from the treasury to a user or agent account, not to the treasury".into()));
    }
    if from == to {
        return Err(LedgerError::SelfTransfer);
    }
    Ok(TransferRequest {
        idempotency_key: key.to_owned(),
        debit_account: from,
        credit_account: to,
        amount_micros,
        code,
        hold: false,
        timeout_ms: 0,
        key_id: None,
        id: None,
    })
}

/// The posted half of a settlement, derived from its hold.
pub(crate) fn settle_request(hold: &Transfer, amount_micros: i64) -> TransferRequest {
    TransferRequest {
        idempotency_key: settle_key(hold.id),
        debit_account: hold.debit_account,
        credit_account: hold.credit_account,
        amount_micros,
        code: hold.code,
        hold: false,
        timeout_ms: 0,
        key_id: hold.key_id,
        id: None,
    }
}

/// Validates a settle against the hold as stored. `Ok(None)`: do it;
/// `Ok(Some(()))`: already done identically (caller returns the original).
pub(crate) fn settle_precheck(hold: &Transfer, amount_micros: i64, now_ms: i64, posted_amount: Option<i64>) -> Result<Option<()>> {
    if !hold.hold {
        return Err(LedgerError::NotPending { id: hold.id, state: hold.state });
    }
    if amount_micros < 0 || amount_micros > hold.amount_micros {
        return Err(LedgerError::SettleExceedsHold { held_micros: hold.amount_micros, requested_micros: amount_micros });
    }
    match hold.state {
        TransferState::Pending if now_ms >= hold.expires_at_ms => Err(LedgerError::HoldExpired(hold.id)),
        TransferState::Pending => Ok(None),
        TransferState::Posted if posted_amount == Some(amount_micros) => Ok(Some(())),
        TransferState::Posted => Err(LedgerError::IdempotencyConflict { key: settle_key(hold.id) }),
        TransferState::Voided if amount_micros == 0 => Ok(Some(())),
        TransferState::Voided => Err(LedgerError::NotPending { id: hold.id, state: hold.state }),
    }
}
