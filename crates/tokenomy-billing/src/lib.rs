//! tokenomy-billing: the charging path between the HTTP layer and the ledger.
//!
//! Why it is its own crate: the HTTP crate should know requests and responses, the ledger
//! crate double-entry rules, the receipts crate formats and proofs. What ties them together
//! per request — who is calling (API keys), may they (scopes, rate limits), what the request
//! may cost at worst (prices), holding that before generating, settling the exact cost after
//! and signing the receipt that lands in the log in the same transaction — is policy, and it
//! lives here, testable without a socket or a model.
//!
//! The request path: [`Billing::authenticate`] → [`Billing::admit`] (RPM/TPM) →
//! [`Billing::hold`] (worst case; 402 when short) → generate → [`Billing::settle`] (exact cost,
//! receipt appended in the same ledger transaction) or [`Billing::void`] (engine failure).
//!
//! Architecture Invariant: no charge without a receipt and no receipt without a charge — the
//! receipt is the ledger's log leaf for the posting, written in the posting's transaction.
//! Architecture Invariant: no network I/O here besides the ledger store it is handed; files
//! only in the node's data dir (keys, config, last checkpoint).

pub mod config;
pub mod keys;
pub mod log;
pub mod ratelimit;
mod node;
mod rates;
pub mod usage;

use std::path::PathBuf;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokenomy_ledger::{
    cost_micros, Account, AccountId, AccountKind, AnyStore, CheckReport, FreshTransferId, KeyId, KeyRecord, LedgerError, LedgerStore, Page, Price,
    Transfer, TransferState, KeyLimitsChange, KeySpend, SpendCaps,
};
use tokenomy_receipts::{Receipt, ReceiptBundle, ReceiptKind, SignerKey, TlogProof, VerifierKey};

pub use config::NodeConfig;
pub use node::{FirstRun, OpenOptions, FIRST_RUN_FILE, FIRST_RUN_GRANT_KEY};
pub use ratelimit::{Allowance, Limited, Limits};

pub const SCOPE_INFERENCE: &str = "inference";
pub const SCOPE_ADMIN: &str = "admin";
/// May send the key's account's credits to another customer account (`POST /v1/transfers`).
/// Never granted by default: an inference key that leaks can spend tokens, not move money.
pub const SCOPE_TRANSFER: &str = "transfer";
/// Most attempts of one `Idempotency-Key` whose holds were voided (each failed, nothing
/// charged) before the key is refused: see `Billing::place_idempotent`.
pub const IDEMPOTENT_ATTEMPTS_MAX: u32 = 8;

/// Why a billing step refused; the HTTP layer maps each kind to a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillingError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// Invalid, and the request field (as the API names it) that is.
    #[error("{1}")]
    InvalidParam(&'static str, String),
    #[error("{0}")]
    Conflict(String),
    #[error("Insufficient credits: this request may cost up to {needed_micros} micro-credits and the account is short by {shortfall_micros}. Add credits, or ask for less (a lower max_tokens: a chat request without it holds the rest of the model's context).")]
    InsufficientQuota { needed_micros: i64, shortfall_micros: i64 },
    /// Asked of a node that cannot answer it (a receipt another node of the ledger issued).
    #[error("{0}")]
    Misdirected(String),
    /// A transfer the debited account cannot cover.
    #[error("Insufficient funds: the debited account is short by {shortfall_micros} micro-credits.")]
    InsufficientFunds { shortfall_micros: i64 },
    #[error(
        "This API key's {period} spend cap of {cap_micros} micro-credits would be exceeded: {remaining_micros} remain \
         this {unit} (in-flight requests included) and this request may cost up to {needed_micros}. The cap resets at \
         00:00 UTC{on}; lower max_tokens or use a key with a higher cap.",
        unit = if *period == "daily" { "day" } else { "month" },
        on = if *period == "daily" { "" } else { " on the 1st" }
    )]
    SpendCapExceeded { period: &'static str, cap_micros: i64, remaining_micros: i64, needed_micros: i64 },
    #[error("Rate limit of {} per minute reached for this key; retry in {:.1} s", .0.limit, .0.retry_after_ms as f64 / 1000.0)]
    RateLimited(Limited),
    /// An `Idempotency-Key` that cannot run this request, `code` saying whether to retry
    /// (`idempotency_key_in_use`) or not (`…_processed`, `…_reused`, `…_exhausted`).
    #[error("{message}")]
    Idempotency { code: &'static str, message: String },
    /// The charge was served but the ledger did not take its settlement: it is retried in the
    /// background (and after a restart, from `DATA_DIR/unsettled/`), under this receipt id.
    #[error("settling the charge failed ({reason}); it is being retried, under receipt {receipt_id}")]
    SettlementDeferred { receipt_id: String, reason: String },
    /// A request that may use more tokens than its key's TPM allows in a whole minute: no wait
    /// lets it through (OpenAI's "Request too large").
    #[error(
        "Request too large for this key's limit of {tpm} tokens per minute: it may use {tokens} (its prompt and \
         max_tokens, over all its choices). Lower max_tokens or shorten the prompt; waiting will not help."
    )]
    RequestTooLarge { tokens: u64, tpm: u32 },
    /// The ledger's receipts log no longer holds entries this node read (and may have signed):
    /// the database was restored from a backup or failed over to a replica that lost commits.
    /// The node stops charging: its checkpoints would commit to charges the ledger lacks.
    #[error("This node stopped charging: {0}. The ledger's database went back (a restored backup or a failover that lost commits); an operator must bring it back to the state this node signed, then restart the node.")]
    LogRewritten(String),
    /// The ledger's store cannot be reached (or did not answer in time): try again shortly.
    #[error("The ledger is unavailable ({0}); retry shortly.")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<LedgerError> for BillingError {
    fn from(e: LedgerError) -> BillingError {
        use LedgerError as L;
        match e {
            L::InvalidAmount { .. } | L::SelfTransfer | L::InvalidArgument(_) | L::KindNotAllowed { .. } | L::Overflow => {
                BillingError::Invalid(e.to_string())
            }
            L::UnknownAccount(_) | L::UnknownTransfer(_) | L::UnknownKey(_) => BillingError::NotFound(e.to_string()),
            L::NameTaken(_) => BillingError::Conflict(e.to_string()),
            L::InsufficientFunds { shortfall_micros } => BillingError::InsufficientFunds { shortfall_micros },
            L::SpendCapExceeded { period, cap_micros, remaining_micros, requested_micros } => {
                BillingError::SpendCapExceeded { period, cap_micros, remaining_micros, needed_micros: requested_micros }
            }
            // (The code inference requests and `/v1/transfers` answer with; admin mints and
            // transfers meet it here.)
            L::IdempotencyConflict { .. } => BillingError::Idempotency { code: "idempotency_key_reused", message: e.to_string() },
            L::NotPending { .. } | L::SettleExceedsHold { .. } | L::HoldExpired(_) => {
                BillingError::Conflict(e.to_string())
            }
            L::Storage(_) | L::Closed => BillingError::Unavailable(e.to_string()),
            L::InvariantViolation(_) => BillingError::Internal(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, BillingError>;

/// An authenticated API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: KeyId,
    pub account: AccountId,
    pub scopes: Vec<String>,
    pub limits: Limits,
    /// The key's spend caps; a capped key's holds go through `hold_for_key`.
    pub caps: SpendCaps,
    /// Its spending counters as read when it authenticated.
    pub spend: KeySpend,
}

impl Principal {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
    pub fn is_admin(&self) -> bool {
        self.has_scope(SCOPE_ADMIN)
    }
}

/// What a request may cost, known before generating.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    pub request_id: String,
    pub model: String,
    pub prompt_tokens: u64,
    /// Completion tokens the request may produce, over all its choices.
    pub completion_tokens_max: u64,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
}

fn idempotency(code: &'static str, message: &str) -> BillingError {
    BillingError::Idempotency { code, message: message.into() }
}

/// Pauses before each new attempt of a settlement that failed in the store (a lost
/// connection, a database restarting, a file locked by another process) while its request
/// waits; after the last, it is retried in the background (`Billing::settle`). Only storage
/// errors are retried: the others (the hold expired or was voided) are final.
pub const SETTLE_RETRY_PAUSES_MS: [u64; 3] = [100, 400, 1_500];
/// Pause between background attempts of a settlement.
pub const SETTLE_RETRY_BACKGROUND_MS: u64 = 2_000;
/// Settlements retried in the background at once, at most: past it a failed one is logged
/// and its hold left to expire (voided: the request goes unpaid, nobody is overcharged).
pub const SETTLE_RETRIES_MAX: usize = 256;

/// How long `/ready` waits for the ledger.
pub const READY_PROBE_MS: u64 = 2_000;

/// A placed hold; consumed by [`Billing::settle`] or [`Billing::void`].
#[derive(Debug)]
pub struct Hold {
    pub principal: Principal,
    pub request_id: String,
    pub receipt_id: String,
    pub model: String,
    pub price: Price,
    pub held_micros: i64,
    pub started_at_ms: i64,
    /// Tokens reserved against the key's TPM until the request is settled, voided or dropped.
    tpm: rates::TpmReservation,
    hold: Option<Transfer>,
    /// Keeps the hold alive while the request is served; dropped with the `Hold`.
    _live: Option<LiveGuard>,
}

/// The holds of requests this node is serving, with their current expiry: the upkeep task
/// extends them before they could expire, so an answer that takes longer than
/// `hold_timeout_ms` is still charged. A crashed node extends nothing, and its holds expire.
#[derive(Debug, Default)]
pub(crate) struct LiveHolds(Mutex<HashMap<tokenomy_ledger::TransferId, i64>>);

/// Removes its hold from [`LiveHolds`] when the request's `Hold` is settled, voided or dropped.
#[derive(Debug)]
struct LiveGuard {
    live: Arc<LiveHolds>,
    id: tokenomy_ledger::TransferId,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live.0.lock().expect("live holds").remove(&self.id);
    }
}

impl LiveHolds {
    fn guard(self: &Arc<Self>, t: &Transfer) -> LiveGuard {
        self.guard_id(t.id, t.expires_at_ms)
    }

    fn guard_id(self: &Arc<Self>, id: tokenomy_ledger::TransferId, expires_at_ms: i64) -> LiveGuard {
        self.0.lock().expect("live holds").insert(id, expires_at_ms);
        LiveGuard { live: self.clone(), id }
    }

    /// Holds whose expiry is less than half a timeout away.
    fn due(&self, now_ms: i64, timeout_ms: i64) -> Vec<tokenomy_ledger::TransferId> {
        let live = self.0.lock().expect("live holds");
        live.iter().filter(|(_, &exp)| exp - now_ms < timeout_ms / 2).map(|(id, _)| *id).collect()
    }

    /// Records holds the ledger extended to `until_ms` (only once it did: a failed extension
    /// is tried again on the next tick). Holds settled meanwhile are gone and stay gone.
    fn extended(&self, ids: &[tokenomy_ledger::TransferId], until_ms: i64) {
        let mut live = self.0.lock().expect("live holds");
        for id in ids {
            if let Some(exp) = live.get_mut(id) {
                *exp = (*exp).max(until_ms);
            }
        }
    }
}

impl Hold {
    /// Whether a ledger hold was placed (false for a free model): the request gets a receipt.
    pub fn is_charged(&self) -> bool {
        self.hold.is_some()
    }
}

/// What was served, known after generating.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub usage: tokenomy_core::Usage,
    pub model_sha256: [u8; 32],
    pub request_sha256: [u8; 32],
    pub output_sha256: [u8; 32],
}

/// A posted charge and its receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRef {
    pub receipt_id: String,
    pub log_index: u64,
    /// Micro-credits posted (positive).
    pub amount_micros: i64,
    pub transfer_id: String,
}

/// The node: ledger store, configuration, signing key, log view and limiters.
pub struct Billing {
    store: AnyStore,
    config: NodeConfig,
    signer: SignerKey,
    data_dir: PathBuf,
    log: tokio::sync::Mutex<log::LogState>,
    /// The keys' rate-limit clocks: this node's, or the ledger's when nodes share it.
    rates: rates::RateClocks,
    live: Arc<LiveHolds>,
    /// Settlements being retried in the background (at most [`SETTLE_RETRIES_MAX`]).
    settle_retries: Arc<std::sync::atomic::AtomicUsize>,
    /// Why this node stopped charging: the ledger's receipts log went back under it (see
    /// [`BillingError::LogRewritten`]). Set once; only a restart (which checks the log against
    /// the last signed checkpoint) clears it.
    halted: std::sync::OnceLock<String>,
    /// `DATA_DIR/lock`, locked while this `Billing` lives: one process per data dir. Two
    /// would each keep their own view of the receipts log and sign checkpoints of it with
    /// the same key, and on SQLite run two writers and two indexers over one ledger.
    _data_dir_lock: std::fs::File,
    /// `DATA_DIR/user.key`, read at the first keyless request under `--no-auth` (not at every one).
    local_user_key: std::sync::OnceLock<String>,
    /// The start of the ledger key of each hold this node places for a request without an
    /// `Idempotency-Key` (`req:NODE:`, NODE from its signing key): a restart finds the holds
    /// of its earlier run by it ([`hold_prefix`]).
    req_hold_prefix: String,
    /// On PostgreSQL, how far this node has published ([`Billing::publish`]); held while
    /// publishing.
    published: tokio::sync::Mutex<Publication>,
}

/// How far a node has published its receipts to a shared ledger: its signatures of the log's
/// entries before `signed_through`, its checkpoint of size `checkpoint_size`.
#[derive(Debug, Default)]
pub(crate) struct Publication {
    pub signed_through: u64,
    pub checkpoint_size: u64,
}

/// `req:` and 12 hex digits of the SHA-256 of the node's verifier key: short (a ledger key has
/// at most 128 bytes) and the same at every start of one data dir.
pub(crate) fn hold_prefix(verifier: &str) -> String {
    use sha2::Digest;
    format!("req:{}:", hex::encode(&sha2::Sha256::digest(verifier.as_bytes())[..6]))
}

impl std::fmt::Debug for Billing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Billing").field("store", &self.store).field("origin", &self.signer.name()).finish_non_exhaustive()
    }
}

fn hex_id(s: &str) -> Option<u128> {
    (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u128::from_str_radix(s, 16).ok()).flatten()
}

/// The ledger keys the node makes for requests, customers' transfers, refunds and late
/// charges begin with these; an operator's own idempotency key may not, so that it can never
/// stand for (and be answered with) one of them.
const RESERVED_KEY_PREFIXES: [&str; 5] = ["req:", "idem:", "send:", "refund:", "late:"];

fn operator_key(key: &str) -> Result<()> {
    if let Some(p) = RESERVED_KEY_PREFIXES.iter().find(|p| key.starts_with(*p)) {
        return Err(BillingError::InvalidParam("idempotency_key", format!("an idempotency key may not begin with {p:?}, which the node's own keys use")));
    }
    Ok(())
}

/// The `transfer` scope and spend caps exclude each other: caps count what a key holds for
/// requests, so a capped key that could also send credits would spend past its cap. An agent
/// that pays others gets an account of its own, whose balance is its budget.
fn transfer_scope_allowed(caps: SpendCaps) -> Result<()> {
    if caps.is_capped() {
        return Err(BillingError::Invalid(
            "a key with the \"transfer\" scope has no spend caps (caps count requests, not transfers): give it an account of its own, whose balance is its budget".into(),
        ));
    }
    Ok(())
}

pub fn parse_account_id(s: &str) -> Result<AccountId> {
    hex_id(s).map(AccountId).ok_or_else(|| BillingError::Invalid(format!("malformed account id {s:?}: expected 32 hex digits")))
}

pub fn parse_key_id(s: &str) -> Result<KeyId> {
    hex_id(s).map(KeyId).ok_or_else(|| BillingError::Invalid(format!("malformed key id {s:?}: expected 32 hex digits")))
}

pub fn parse_account_kind(s: &str) -> Result<AccountKind> {
    match s {
        "user" => Ok(AccountKind::User),
        "agent" => Ok(AccountKind::Agent),
        _ => Err(BillingError::Invalid(format!("account kind must be \"user\" or \"agent\", got {s:?}"))),
    }
}

impl Billing {
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    pub fn verifier(&self) -> VerifierKey {
        self.signer.verifier()
    }

    pub fn origin(&self) -> &str {
        self.signer.name()
    }

    pub fn price(&self, model: &str) -> Price {
        self.config.price(model)
    }

    // ----------------------------------------------------------------- keys and limits

    /// The key behind a bearer token; 401 for a missing, unknown or revoked key.
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal> {
        let token = bearer.ok_or_else(|| {
            BillingError::Unauthorized("Missing API key. Send `Authorization: Bearer <key>` (or, as Anthropic's clients do, `x-api-key: <key>`; see DATA_DIR/user.key on this node).".into())
        })?;
        let invalid = || BillingError::Unauthorized("Invalid API key.".into());
        if token.is_empty() || token.len() > keys::KEY_LEN_MAX_BYTES {
            return Err(invalid());
        }
        let hash = keys::hash(token);
        let rec = self.store.find_key_by_hash(hash).await?.ok_or_else(invalid)?;
        if !keys::hashes_equal(&rec.key_hash, &hash) || rec.revoked_at_ms.is_some() {
            return Err(invalid());
        }
        Ok(principal(&rec))
    }

    /// `a` with its token figures as they stand now (see [`ratelimit::tokens_now`]).
    pub async fn allowance_now(&self, p: &Principal, mut a: Allowance) -> Allowance {
        if p.limits.tpm.is_none() {
            return a;
        }
        match self.rates.last_seen(p.key_id).await {
            Ok(s) => ratelimit::tokens_now(&s, p.limits, tokenomy_ledger::now_ms(), &mut a),
            Err(e) => tracing::warn!(error = %e, "rate clocks unreadable; headers show the admission's figures"),
        }
        a
    }

    /// What the key may still do now under its RPM/TPM limits, without using any of it.
    pub async fn allowance(&self, p: &Principal) -> Result<Allowance> {
        if !p.limits.is_limited() {
            return Ok(Allowance::default());
        }
        let s = self.rates.read(p.key_id).await?;
        Ok(ratelimit::peek(&s, p.limits, tokenomy_ledger::now_ms()))
    }

    /// Admits one request under the key's RPM/TPM limits.
    pub async fn admit(&self, p: &Principal) -> Result<Allowance> {
        if !p.limits.is_limited() {
            return Ok(Allowance::default());
        }
        let now = tokenomy_ledger::now_ms();
        let limits = p.limits;
        if limits.rpm.is_none() {
            // Only the TPM debt to check: admission moves no clock, so a read will do.
            let mut s = self.rates.read(p.key_id).await?;
            return ratelimit::admit(&mut s, limits, now).map_err(BillingError::RateLimited);
        }
        self.rates.step(p.key_id, now, move |s| ratelimit::admit(s, limits, now)).await?.map_err(BillingError::RateLimited)
    }

    pub async fn create_key(
        &self,
        account: AccountId,
        scopes: &[String],
        rpm: Option<u32>,
        tpm: Option<u32>,
        caps: SpendCaps,
    ) -> Result<(KeyId, String)> {
        for s in scopes {
            if ![SCOPE_INFERENCE, SCOPE_ADMIN, SCOPE_TRANSFER].contains(&s.as_str()) {
                return Err(BillingError::Invalid(format!("unknown scope {s:?}: use \"inference\", \"transfer\" and/or \"admin\"")));
            }
        }
        if scopes.iter().any(|s| s == SCOPE_TRANSFER) {
            transfer_scope_allowed(caps)?;
        }
        if scopes.is_empty() {
            return Err(BillingError::Invalid("a key needs at least one scope".into()));
        }
        let mut scopes = scopes.to_vec();
        scopes.sort();
        scopes.dedup();
        let scopes = &scopes[..];
        tokenomy_ledger::validate_rates(rpm, tpm)?;
        let acc = self.store.get_account(account).await?;
        if scopes.iter().any(|s| s == SCOPE_INFERENCE || s == SCOPE_TRANSFER) && !acc.kind.must_stay_funded() {
            return Err(BillingError::Invalid("inference and transfer keys belong to user or agent accounts".into()));
        }
        if scopes.iter().any(|s| s == SCOPE_ADMIN) && acc.kind.must_stay_funded() {
            // An admin key may mint: on a customer's account it would let the customer pay
            // themselves.
            return Err(BillingError::Invalid(format!(
                "admin keys belong to the operator's accounts, not to a customer's ({} account): create it on {} ({})",
                acc.kind.api_name(),
                tokenomy_ledger::OPERATOR_REVENUE_NAME,
                tokenomy_ledger::OPERATOR_REVENUE
            )));
        }
        let (key, hash) = keys::generate();
        let id = self.store.create_key(account, hash, scopes, rpm, tpm, caps).await?;
        Ok((id, key))
    }

    /// Changes a key's RPM/TPM limits and spend caps (those `change` names, in one write);
    /// effective from its next request.
    pub async fn set_key_limits(&self, key: KeyId, change: KeyLimitsChange) -> Result<KeyRecord> {
        let rec = self.store.get_key(key).await?;
        if rec.revoked_at_ms.is_some() {
            return Err(BillingError::Conflict(format!("key {key} is revoked: its limits no longer apply to anything")));
        }
        if rec.scopes.iter().any(|s| s == SCOPE_TRANSFER) {
            let caps = SpendCaps {
                day_micros: change.day_micros.unwrap_or(rec.caps.day_micros),
                month_micros: change.month_micros.unwrap_or(rec.caps.month_micros),
            };
            transfer_scope_allowed(caps)?;
        }
        Ok(self.store.set_key_limits(key, change).await?)
    }

    /// One key (revoked or not), by id.
    pub async fn key(&self, key: KeyId) -> Result<KeyRecord> {
        Ok(self.store.get_key(key).await?)
    }

    pub async fn revoke_key(&self, key: KeyId) -> Result<()> {
        Ok(self.store.revoke_key(key).await?)
    }

    pub async fn list_keys(&self, account: AccountId) -> Result<Vec<KeyRecord>> {
        self.store.get_account(account).await?;
        Ok(self.store.list_keys(account).await?)
    }

    // ----------------------------------------------------------------- accounts

    pub async fn create_account(&self, name: &str, kind: AccountKind) -> Result<Account> {
        Ok(self.store.create_account(name, kind).await?)
    }

    pub async fn account(&self, id: AccountId) -> Result<Account> {
        Ok(self.store.get_account(id).await?)
    }

    /// A page of accounts in id order, after `after`.
    pub async fn accounts(&self, after: Option<AccountId>, limit: u32) -> Result<Vec<Account>> {
        Ok(self.store.list_accounts(after, limit).await?)
    }

    pub async fn statement(&self, id: AccountId, after: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
        self.store.get_account(id).await?;
        Ok(self.store.statement(id, after, limit).await?)
    }

    /// The account's transfers newest first, before the cursor of the previous page.
    pub async fn statement_newest_first(&self, id: AccountId, before: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
        self.store.get_account(id).await?;
        Ok(self.store.statement_newest_first(id, before, limit).await?)
    }

    /// The receipt of each transfer that has one (a posted charge, a mint, a transfer), so a
    /// statement links each line to its proof.
    pub async fn receipt_ids(&self, transfers: &[tokenomy_ledger::TransferId]) -> Result<Vec<Option<String>>> {
        let mut log = self.log.lock().await;
        self.sync_log(&mut log).await?;
        Ok(transfers.iter().map(|t| log.receipt_for_transfer(*t)).collect())
    }

    /// What `account` (the whole ledger, for `None`) was charged for on the UTC days in
    /// `days`, by day and model, from the receipts log caught up now: every node's charges
    /// since the ledger began.
    pub async fn usage(&self, account: Option<AccountId>, days: std::ops::RangeInclusive<u32>) -> Result<Vec<(usage::BucketKey, usage::UsageTotals)>> {
        let mut log = self.log.lock().await;
        self.sync_log(&mut log).await?;
        Ok(log.usage().buckets(account, days))
    }

    /// Every account's usage buckets of the UTC days `days`, by account.
    pub async fn usage_by_account(&self, days: std::ops::RangeInclusive<u32>) -> Result<Vec<(AccountId, usage::BucketKey, usage::UsageTotals)>> {
        let mut log = self.log.lock().await;
        self.sync_log(&mut log).await?;
        Ok(log.usage().buckets_by_account(days))
    }

    /// Everything `account` (the whole ledger, for `None`) was charged for, and the first UTC
    /// day it was charged.
    pub async fn usage_totals(&self, account: Option<AccountId>) -> Result<(usage::UsageTotals, Option<u32>)> {
        let mut log = self.log.lock().await;
        self.sync_log(&mut log).await?;
        Ok(log.usage().totals(account))
    }

    pub async fn check(&self) -> Result<CheckReport> {
        Ok(self.store.check().await?)
    }

    /// Credits from the treasury, with a receipt.
    pub async fn mint(&self, to: AccountId, amount_micros: i64, idempotency_key: &str, actor: &Principal) -> Result<(Transfer, ReceiptRef)> {
        operator_key(idempotency_key)?;
        self.serving()?;
        let receipt = self.money_receipt(ReceiptKind::Mint, to, tokenomy_ledger::TREASURY, actor);
        let t = self.store.mint(to, amount_micros, idempotency_key, Some(leaf_for(receipt, amount_micros))).await?;
        Ok((t.clone(), self.receipt_of(&t).await?))
    }

    /// Credits between two accounts, with a receipt.
    pub async fn transfer(&self, from: AccountId, to: AccountId, amount_micros: i64, key: &str, actor: &Principal) -> Result<(Transfer, ReceiptRef)> {
        operator_key(key)?;
        self.serving()?;
        let receipt = self.money_receipt(ReceiptKind::Transfer, from, to, actor);
        let t = self.store.transfer(from, to, amount_micros, key, Some(leaf_for(receipt, -amount_micros))).await?;
        Ok((t.clone(), self.receipt_of(&t).await?))
    }

    /// A customer's key sends credits from its own account to another customer's (`to`, a user
    /// or agent account), with a v2 receipt both parties can fetch. Idempotent per account and
    /// `key` (the ledger key `send:ACCOUNT:KEY`, so two customers' keys never meet): a retry
    /// gets the same transfer and receipt, the same key with another recipient or amount a 409.
    pub async fn send(&self, p: &Principal, to: AccountId, amount_micros: i64, key: &str) -> Result<(Transfer, ReceiptRef)> {
        if !p.has_scope(SCOPE_TRANSFER) {
            return Err(BillingError::Forbidden("This key lacks the \"transfer\" scope: an operator grants it to a key of its own (`tokenomy keys create ACCOUNT --scope transfer`).".into()));
        }
        // Caps are counted on holds only; a capped key that could send would step around them.
        transfer_scope_allowed(p.caps)?;
        if !(1..=tokenomy_ledger::MAX_AMOUNT_MICROS).contains(&amount_micros) {
            let msg = format!("amount_micros is 1 to {} micro-credits, not {amount_micros}.", tokenomy_ledger::MAX_AMOUNT_MICROS);
            return Err(BillingError::InvalidParam("amount_micros", msg));
        }
        self.serving()?;
        let recipient = self.store.get_account(to).await.map_err(|e| match e {
            LedgerError::UnknownAccount(_) => BillingError::InvalidParam("to", format!("No account {to}.")),
            e => e.into(),
        })?;
        if !recipient.kind.must_stay_funded() {
            return Err(BillingError::InvalidParam("to", format!("Credits go to user or agent accounts, not to the {} account.", recipient.kind.api_name())));
        }
        if to == p.account {
            return Err(BillingError::InvalidParam("to", "A transfer goes to another account than the key's own.".into()));
        }
        let receipt = self.money_receipt(ReceiptKind::Transfer, p.account, to, p);
        let ledger_key = format!("send:{}:{key}", p.account);
        let t = match self.store.transfer(p.account, to, amount_micros, &ledger_key, Some(leaf_for(receipt, -amount_micros))).await {
            Err(LedgerError::IdempotencyConflict { .. }) => {
                return Err(idempotency("idempotency_key_reused", "This Idempotency-Key was already used for a transfer to another account or of another amount."))
            }
            r => r?,
        };
        Ok((t.clone(), self.receipt_of(&t).await?))
    }

    /// Gives back a usage charge, in whole or in part (`amount_micros`, all of it when `None`):
    /// the credits go from operator revenue to the account that paid, with a `refund` receipt
    /// whose `request_id` names the refunded request. A receipt is refunded once: the ledger
    /// key `refund:RECEIPT` makes a retry return the same refund, and another amount a 409.
    pub async fn refund(&self, receipt_id: &str, amount_micros: Option<i64>, actor: &Principal) -> Result<(Transfer, ReceiptRef)> {
        self.serving()?;
        let charge = self.logged_receipt(receipt_id).await?;
        if charge.kind != ReceiptKind::Usage {
            return Err(BillingError::Invalid(format!("Receipt {receipt_id:?} is a {}, not a usage charge: only charges are refunded.", charge.kind)));
        }
        let charged = -charge.amount_micros;
        let amount = amount_micros.unwrap_or(charged);
        if !(1..=charged).contains(&amount) {
            let msg = format!("A refund of receipt {receipt_id:?} is 1 to the {charged} micro-credits it charged, not {amount}.");
            return Err(BillingError::InvalidParam("amount_micros", msg));
        }
        let account = parse_account_id(&charge.account_id)?;
        let receipt = Receipt { request_id: charge.request_id.clone(), ..self.money_receipt(ReceiptKind::Refund, account, tokenomy_ledger::OPERATOR_REVENUE, actor) };
        let key = format!("refund:{receipt_id}");
        let t = match self.store.refund(account, amount, &key, Some(leaf_for(receipt, amount))).await {
            Err(LedgerError::IdempotencyConflict { .. }) => {
                return Err(BillingError::Conflict(format!("Receipt {receipt_id:?} was already refunded, by another amount: a charge is refunded once.")))
            }
            r => r?,
        };
        Ok((t.clone(), self.receipt_of(&t).await?))
    }

    /// A receipt of the log, as signed.
    async fn logged_receipt(&self, receipt_id: &str) -> Result<Receipt> {
        let not_found = || BillingError::NotFound(format!("No receipt {receipt_id:?}."));
        let mut log = self.log.lock().await;
        if log.find(receipt_id).is_none() {
            self.sync_log(&mut log).await?;
        }
        let (index, _) = log.find(receipt_id).ok_or_else(not_found)?;
        drop(log);
        let entry = self.store.log_entries(index, 1).await?.pop().ok_or_else(not_found)?;
        Receipt::from_canonical_bytes(&entry.leaf_bytes).map_err(|e| BillingError::Internal(e.to_string()))
    }

    /// The receipt of money moving from or to `account`, whose other party is `counterparty`
    /// (a v2 receipt: the log proves where the credits went, and either party may fetch it).
    fn money_receipt(&self, kind: ReceiptKind, account: AccountId, counterparty: AccountId, actor: &Principal) -> Receipt {
        let now = tokenomy_ledger::now_ms().max(0) as u64;
        Receipt {
            version: tokenomy_receipts::receipt::RECEIPT_VERSION_COUNTERPARTY,
            counterparty_id: counterparty.to_string(),
            kind,
            request_id: String::new(),
            model: String::new(),
            started_at_ms: now,
            ended_at_ms: now,
            ..self.blank_receipt(new_receipt_id(), account, actor.key_id)
        }
    }

    /// The receipt id of a posted transfer (the first one, when a retry hit an idempotency key).
    async fn receipt_of(&self, t: &Transfer) -> Result<ReceiptRef> {
        let mut log = self.log.lock().await;
        self.sync_log(&mut log).await?;
        let id = log.receipt_for_transfer(t.id).ok_or_else(|| BillingError::Internal(format!("transfer {} has no receipt in the log", t.id)))?;
        let (index, _) = log.find(&id).expect("indexed receipt");
        Ok(ReceiptRef { receipt_id: id, log_index: index, amount_micros: t.amount_micros, transfer_id: t.id.to_string() })
    }

    fn blank_receipt(&self, receipt_id: String, account: AccountId, key: KeyId) -> Receipt {
        Receipt {
            version: tokenomy_receipts::receipt::RECEIPT_VERSION,
            origin: self.signer.name().to_string(),
            receipt_id,
            request_id: String::new(),
            account_id: account.to_string(),
            counterparty_id: String::new(),
            key_id: key.to_string(),
            kind: ReceiptKind::Usage,
            model: String::new(),
            model_sha256: [0; 32],
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            reasoning_tokens: 0,
            price_input_micros_per_mtok: 0,
            price_cached_input_micros_per_mtok: 0,
            price_output_micros_per_mtok: 0,
            amount_micros: 0,
            transfer_id: String::new(),
            started_at_ms: 0,
            ended_at_ms: 0,
            request_sha256: [0; 32],
            output_sha256: [0; 32],
            log_index: 0,
        }
    }

    // ----------------------------------------------------------------- the request path

    /// The worst-case cost of a request at this model's price.
    pub fn worst_case_micros(&self, req: &ChargeRequest) -> Result<i64> {
        let usage = tokenomy_ledger::Usage { input_tokens: req.prompt_tokens, output_tokens: req.completion_tokens_max, ..Default::default() };
        Ok(cost_micros(usage, self.price(&req.model))?)
    }

    /// Places the hold for `req`'s worst case. 402 when the account cannot cover it.
    pub async fn hold(&self, p: &Principal, req: &ChargeRequest) -> Result<Hold> {
        if !p.has_scope(SCOPE_INFERENCE) {
            return Err(BillingError::Forbidden("This key lacks the \"inference\" scope.".into()));
        }
        self.serving()?;
        let worst = self.worst_case_micros(req)?;
        if worst > tokenomy_ledger::MAX_AMOUNT_MICROS {
            return Err(BillingError::Invalid(format!("this request could cost {worst} micro-credits, more than one charge may be; lower max_tokens")));
        }
        let now = tokenomy_ledger::now_ms();
        let reservation = match p.limits.tpm {
            None => ratelimit::Reservation::default(),
            Some(tpm) => {
                let tokens = req.prompt_tokens.saturating_add(req.completion_tokens_max);
                if tokens > u64::from(tpm) {
                    return Err(BillingError::RequestTooLarge { tokens, tpm });
                }
                let limits = p.limits;
                let reserve = move |s: &mut tokenomy_ledger::KeyRate| ratelimit::reserve_tokens(s, limits, tokens, now);
                self.rates.step(p.key_id, now, reserve).await?.map_err(BillingError::RateLimited)?
            }
        };
        let tpm = rates::TpmReservation { clocks: self.rates.clone(), key: p.key_id, reservation: Some(reservation) };
        let mut h = Hold {
            principal: p.clone(),
            request_id: req.request_id.clone(),
            receipt_id: format!("rcpt_{}", req.request_id),
            model: req.model.clone(),
            price: self.price(&req.model),
            held_micros: worst,
            started_at_ms: now,
            tpm,
            hold: None,
            _live: None,
        };
        if worst == 0 {
            return Ok(h); // a free model: nothing to hold, nothing to post, no receipt
        }
        let placed = match &req.idempotency_key {
            None => self.place(p, worst, &format!("{}{}", self.req_hold_prefix, req.request_id), now).await,
            Some(k) => self.place_idempotent(p, worst, k, now).await,
        };
        let t = match placed {
            Ok(t) => t,
            Err(e) => return Err(e), // refused: dropping `h` releases its reservation
        };
        h._live = Some(self.live.guard(&t));
        h.hold = Some(t);
        Ok(h)
    }

    /// The hold of a request with an `Idempotency-Key`. Each attempt's hold has a ledger key
    /// of its own (the first `idem:ACCOUNT:KEY`, then `… #2`, `… #3`): an attempt that failed
    /// (its hold voided: nothing charged, nothing kept) lets the next one run; one that is
    /// running or was charged refuses it, so a key is charged at most once and run at most
    /// once at a time. A hold the ledger returns is this request's own when it carries the id
    /// this request drew for it; any other was placed by another request with the key, on
    /// this node or on another node of the same ledger, even within the same millisecond.
    async fn place_idempotent(&self, p: &Principal, worst: i64, k: &str, now: i64) -> Result<Transfer> {
        for attempt in 1..=IDEMPOTENT_ATTEMPTS_MAX {
            let key = match attempt {
                1 => format!("idem:{}:{k}", p.account),
                // (A space: no `Idempotency-Key` has one, so no key's attempt can be another key.)
                n => format!("idem:{}:{k} #{n}", p.account),
            };
            let id = FreshTransferId::generate(now);
            let mine = id.id();
            let t = self.place_as(id, p, worst, &key, now).await?;
            match t.state {
                TransferState::Pending if t.id == mine => return Ok(t),
                TransferState::Voided => continue,
                TransferState::Pending => {
                    return Err(idempotency("idempotency_key_in_use", "A request with this Idempotency-Key is still in progress; retry when it has finished."))
                }
                TransferState::Posted => {
                    return Err(idempotency(
                        "idempotency_key_processed",
                        "A request with this Idempotency-Key was already processed (on this node or another of its ledger); it was charged once and is not run again.",
                    ))
                }
            }
        }
        Err(BillingError::Idempotency { code: "idempotency_key_exhausted", message: format!("This Idempotency-Key failed {IDEMPOTENT_ATTEMPTS_MAX} times; use a new one.") })
    }

    /// Places a hold of `worst` under ledger key `key` (or returns the transfer that holds it).
    async fn place(&self, p: &Principal, worst: i64, key: &str, now: i64) -> Result<Transfer> {
        self.place_as(FreshTransferId::generate(now), p, worst, key, now).await
    }

    /// [`place`](Self::place), the hold getting `id` if this call creates it.
    async fn place_as(&self, id: FreshTransferId, p: &Principal, worst: i64, key: &str, now: i64) -> Result<Transfer> {
        let timeout = self.config.billing.hold_timeout_ms;
        let capped = p.caps.is_capped().then_some(p.key_id);
        let placed = self.store.hold_as(id, p.account, capped, worst, key, timeout, now).await;
        match placed {
            Err(LedgerError::InsufficientFunds { shortfall_micros }) => {
                Err(BillingError::InsufficientQuota { needed_micros: worst, shortfall_micros })
            }
            Err(LedgerError::IdempotencyConflict { .. }) => {
                Err(idempotency(
                    "idempotency_key_reused",
                    "This Idempotency-Key was already used for a different request (or for this one on a node of the ledger that prices it differently).",
                ))
            }
            r => Ok(r?),
        }
    }

    /// Posts the exact cost of what was served, releases the rest, and appends the receipt.
    /// `None` when nothing was charged (a free model or zero cost).
    pub async fn settle(&self, mut h: Hold, s: Served) -> Result<Option<ReceiptRef>> {
        let used = u64::from(s.usage.prompt_tokens) + u64::from(s.usage.completion_tokens);
        // The TPM settles beside the charge, not before it (on PostgreSQL each is a round trip).
        let mut tpm = h.tpm.take();
        let (_, charged) = tokio::join!(tpm.settle(used), self.charge(h, s));
        charged
    }

    /// The ledger half of [`settle`](Self::settle): posts the exact cost with its receipt.
    async fn charge(&self, h: Hold, s: Served) -> Result<Option<ReceiptRef>> {
        let u = &s.usage;
        let (prompt, cached, completion, reasoning) =
            (u64::from(u.prompt_tokens), u64::from(u.cached_tokens), u64::from(u.completion_tokens), u64::from(u.reasoning_tokens));
        let usage = tokenomy_ledger::Usage::from_openai(prompt, cached, completion, reasoning);
        let cost = cost_micros(usage, h.price)?;
        let Some(hold) = h.hold.as_ref() else { return Ok(None) };
        if cost > h.held_micros {
            // Never more than the hold: the worst case bounds what the engine may produce.
            tracing::error!(cost, held = h.held_micros, request_id = %h.request_id, "usage exceeded the hold; charging the hold");
        }
        let cost = cost.min(h.held_micros);
        let now = tokenomy_ledger::now_ms();
        if cost == 0 {
            self.store.void(hold.id).await?;
            return Ok(None);
        }
        let receipt = Receipt {
            request_id: h.request_id.clone(),
            model: h.model.clone(),
            model_sha256: s.model_sha256,
            prompt_tokens: prompt,
            cached_tokens: cached.min(prompt),
            completion_tokens: completion,
            reasoning_tokens: reasoning.min(completion),
            price_input_micros_per_mtok: h.price.input_micros_per_mtok.max(0) as u64,
            price_cached_input_micros_per_mtok: h.price.cached_input_micros_per_mtok.max(0) as u64,
            price_output_micros_per_mtok: h.price.output_micros_per_mtok.max(0) as u64,
            started_at_ms: h.started_at_ms.max(0) as u64,
            ended_at_ms: now.max(h.started_at_ms).max(0) as u64,
            request_sha256: s.request_sha256,
            output_sha256: s.output_sha256,
            ..self.blank_receipt(h.receipt_id.clone(), h.principal.account, h.principal.key_id)
        };
        let leaf = leaf_for(receipt.clone(), -cost);
        let mut attempt = 0;
        let settled = loop {
            match self.store.settle(hold.id, cost, now, Some(leaf.clone())).await {
                Err(LedgerError::Storage(e)) if attempt < SETTLE_RETRY_PAUSES_MS.len() => {
                    tracing::warn!(request_id = %h.request_id, error = %e, "settling a charge failed; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(SETTLE_RETRY_PAUSES_MS[attempt])).await;
                    attempt += 1;
                }
                Err(LedgerError::Storage(e)) => return Err(self.settle_later(h, cost, now, receipt, e)),
                // The store stalled for this node longer than the hold's timeout (its upkeep could
                // not extend it), and another node voided it as expired: the tokens were served,
                // so the account is charged directly, as a journalled settlement would be.
                Err(LedgerError::NotPending { state: TransferState::Voided, .. }) => {
                    tracing::warn!(request_id = %h.request_id, "the charge's hold was voided meanwhile; charging the account directly");
                    return match charge_late(&self.store, hold.id, &receipt, cost, leaf).await {
                        Ok(t) => Ok(Some(self.receipt_of(&t).await?)),
                        Err(LedgerError::Storage(e)) => Err(self.settle_later(h, cost, now, receipt, e)),
                        // Its credits went elsewhere once the hold no longer kept them: tried
                        // again for one hold timeout (credits added meanwhile pay it), as an
                        // account is never overdrawn.
                        Err(e @ LedgerError::InsufficientFunds { .. }) => Err(self.settle_later(h, cost, now, receipt, e.to_string())),
                        Err(e) => Err(e.into()),
                    };
                }
                r => break r?,
            }
        };
        receipt_ref(h.receipt_id, settled)
    }

    /// Hands a settlement that kept failing in the store to a task that tries it again
    /// every [`SETTLE_RETRY_BACKGROUND_MS`] for one hold timeout, keeping its hold alive
    /// meanwhile (the upkeep extends it while its `Hold` lives). The request is answered
    /// without its receipt (a streamed one already named it in its headers: it exists once
    /// this succeeds).
    fn settle_later(&self, h: Hold, cost: i64, now: i64, receipt: Receipt, e: String) -> BillingError {
        let Some(slot) = RetrySlot::take(&self.settle_retries) else {
            tracing::error!(request_id = %h.request_id, error = %e, "settling a charge failed, and {SETTLE_RETRIES_MAX} settlements are already being retried; its hold will expire unpaid");
            return BillingError::Internal(format!("settling the charge failed: {e}"));
        };
        tracing::error!(request_id = %h.request_id, error = %e, "settling a charge failed; retrying in the background");
        let hold_id = h.hold.as_ref().map(|t| t.id).expect("a charged request's hold");
        let job = Unsettled { hold_id: hold_id.to_string(), cost_micros: cost, now_ms: now, receipt };
        let journal = job.write(&self.data_dir);
        // The whole `Hold` rides along: its guard keeps the hold alive while it is retried.
        let receipt_id = job.receipt.receipt_id.clone();
        self.spawn_settle_retry(job, journal, (h, slot));
        BillingError::SettlementDeferred { receipt_id, reason: e }
    }

    /// Tries `job` again every [`SETTLE_RETRY_BACKGROUND_MS`] for one hold timeout, then
    /// removes its journal file (`None`: it has none). `keep` lives as long as the task.
    fn spawn_settle_retry(&self, job: Unsettled, journal: Option<PathBuf>, keep: impl Send + 'static) {
        let (store, deadline_ms) = (self.store.clone(), tokenomy_ledger::now_ms() + self.config.billing.hold_timeout_ms);
        let Some(hold_id) = job.hold_id() else {
            return tracing::error!(hold_id = %job.hold_id, "an unsettled charge names no hold; dropped");
        };
        tokio::spawn(async move {
            let _keep = keep;
            let request_id = &job.receipt.request_id;
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(SETTLE_RETRY_BACKGROUND_MS)).await;
                match job.post(&store, hold_id).await {
                    Err(e @ (LedgerError::Storage(_) | LedgerError::InsufficientFunds { .. })) if tokenomy_ledger::now_ms() < deadline_ms => {
                        tracing::warn!(%request_id, error = %e, "settling a charge failed again");
                        continue;
                    }
                    Ok(_) => tracing::info!(%request_id, receipt_id = %job.receipt.receipt_id, "charge settled after retrying"),
                    Err(e) => tracing::error!(%request_id, error = %e, amount_micros = job.cost_micros, "settling a charge failed for good; its hold will expire unpaid"),
                }
                if let Some(path) = &journal {
                    Unsettled::remove(path);
                }
                return;
            }
        });
    }

    /// Takes up the settlements a previous run of this data dir left retrying (stopped or
    /// crashed during a ledger outage), before anything expires holds: each is tried once now,
    /// and one the ledger still refuses is retried in the background, its hold kept alive.
    /// A file that does not hold a valid settlement is set aside (`.bad`) and logged. Returns
    /// how many still wait.
    pub(crate) async fn resume_unsettled(&self) -> usize {
        let dir = self.data_dir.join(UNSETTLED_DIR);
        let Ok(files) = std::fs::read_dir(&dir) else { return 0 };
        let mut waiting = 0;
        for path in files.filter_map(|f| f.ok()).map(|f| f.path()).filter(|p| p.extension().is_some_and(|x| x == "json")) {
            let job = match Unsettled::read(&path) {
                Ok(job) => job,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "an unsettled charge cannot be read; set aside as .bad");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    continue;
                }
            };
            let Some(hold_id) = job.hold_id() else { continue };
            tracing::warn!(request_id = %job.receipt.request_id, amount_micros = job.cost_micros, "settling a charge a previous run left unsettled");
            match job.post(&self.store, hold_id).await {
                Err(LedgerError::Storage(e)) => {
                    tracing::warn!(request_id = %job.receipt.request_id, error = %e, "settling it failed; retrying in the background");
                    let guard = self.live.guard_id(hold_id, tokenomy_ledger::now_ms());
                    self.spawn_settle_retry(job, Some(path), guard);
                    waiting += 1;
                    continue;
                }
                Ok(_) => tracing::info!(request_id = %job.receipt.request_id, "charge settled"),
                Err(e) => tracing::error!(request_id = %job.receipt.request_id, error = %e, amount_micros = job.cost_micros, "settling it failed for good; the charge goes unpaid"),
            }
            Unsettled::remove(&path);
        }
        waiting
    }

    /// Releases a hold without charging (the engine failed before serving anything).
    pub async fn void(&self, mut h: Hold) -> Result<()> {
        h.tpm.settle(0).await;
        if let Some(t) = h.hold.take() {
            self.store.void(t.id).await?;
        }
        Ok(())
    }

    // ----------------------------------------------------------------- the log

    /// Catches the log view up with the store; on a log that went back, halts the node.
    async fn sync_log(&self, log: &mut log::LogState) -> Result<()> {
        self.serving()?;
        let synced = log.sync(&self.store).await;
        self.halt_if_rewritten(synced)
    }

    /// Halts the node on [`BillingError::LogRewritten`] (its log view found the store's log
    /// gone back); passes everything else through.
    fn halt_if_rewritten<T>(&self, r: Result<T>) -> Result<T> {
        match r {
            Err(BillingError::LogRewritten(why)) => {
                if self.halted.set(why.clone()).is_ok() {
                    tracing::error!(%why, "the ledger's receipts log went back under this node: it stops charging");
                }
                Err(BillingError::LogRewritten(why))
            }
            r => r,
        }
    }

    /// Refuses work once the node halted (see [`BillingError::LogRewritten`]).
    fn serving(&self) -> Result<()> {
        match self.halted.get() {
            Some(why) => Err(BillingError::LogRewritten(why.clone())),
            None => Ok(()),
        }
    }

    /// The signed checkpoint covering every entry committed so far.
    pub async fn checkpoint(&self) -> Result<log::Signed> {
        let mut log = self.log.lock().await;
        self.sync_log(&mut log).await?;
        self.checkpoint_locked(&mut log).await
    }

    async fn checkpoint_locked(&self, log: &mut log::LogState) -> Result<log::Signed> {
        let before = log.last().map(|s| s.checkpoint.size);
        let signed = log.checkpoint(&self.signer, &self.store).await;
        let signed = self.halt_if_rewritten(signed)?;
        if before != Some(signed.checkpoint.size) {
            node::persist_checkpoint(&self.data_dir, &signed.note).map_err(|e| BillingError::Internal(format!("saving the checkpoint: {e}")))?;
        }
        Ok(signed)
    }

    /// Consistency proof between two tree sizes of the log.
    pub async fn consistency(&self, old: u64, new: u64) -> Result<Vec<tokenomy_receipts::Hash>> {
        let mut log = self.log.lock().await;
        self.sync_log(&mut log).await?;
        if old == 0 || old > new || new > log.size() {
            return Err(BillingError::Invalid(format!("need 0 < old <= new <= {} (the log size), got old={old} new={new}", log.size())));
        }
        let proof = log.consistency_proof(old, new, &self.store).await;
        self.halt_if_rewritten(proof)
    }

    /// The verifiable bundle of one receipt: fields, signed bytes, signature and a tlog-proof
    /// against the latest checkpoint. Another account's receipt is "not found".
    pub async fn receipt_bundle(&self, receipt_id: &str, viewer: &Principal) -> Result<String> {
        let not_found = || BillingError::NotFound(format!("No receipt {receipt_id:?} for this key."));
        let mut log = self.log.lock().await;
        if log.find(receipt_id).is_none() {
            self.sync_log(&mut log).await?;
        }
        let (index, account) = log.find(receipt_id).ok_or_else(not_found)?;
        let entry = self.store.log_entries(index, 1).await?.pop().ok_or_else(not_found)?;
        let receipt = Receipt::from_canonical_bytes(&entry.leaf_bytes).map_err(|e| BillingError::Internal(e.to_string()))?;
        // Its account, or the other party of a transfer (a v2 receipt), or the admin.
        let viewer_id = viewer.account.to_string();
        if account != viewer.account && receipt.counterparty_id != viewer_id && receipt.account_id != viewer_id && !viewer.is_admin() {
            return Err(not_found());
        }
        if receipt.origin != self.signer.name() {
            // Another node of this ledger issued it: its key signs it and its checkpoint.
            drop(log);
            return self.published_bundle(receipt, &entry.leaf_bytes).await;
        }
        let signed = self.checkpoint_locked(&mut log).await?;
        let hashes = log.inclusion_proof(index, signed.checkpoint.size, &self.store).await;
        let hashes = self.halt_if_rewritten(hashes)?;
        // The bytes about to be signed are the entry the tree holds (its tile was just read).
        let same = log.assert_entry(index, &entry.leaf_bytes, &self.store).await;
        self.halt_if_rewritten(same)?;
        drop(log);
        let (canonical, signature) = receipt.sign(&self.signer).map_err(|e| BillingError::Internal(e.to_string()))?;
        assert_eq!(canonical, entry.leaf_bytes, "a logged receipt re-encodes to its own bytes");
        let proof = TlogProof { extra: None, index, hashes, checkpoint_note: signed.note };
        Ok(ReceiptBundle::new(receipt, &canonical, &signature, &self.signer.verifier(), &proof).to_json())
    }

    /// The bundle of a receipt another node of the ledger issued, from what that node
    /// published ([`Billing::publish`]): its signature and an inclusion proof against its
    /// checkpoint, so the bundle verifies with that node's key, as if that node served it. A
    /// receipt its node has not published yet is waited for (see [`publish_wait_ms`]); then
    /// (its node may be down) the answer names that node (`421`).
    async fn published_bundle(&self, receipt: Receipt, canonical: &[u8]) -> Result<String> {
        let (origin, index) = (receipt.origin.clone(), receipt.log_index);
        let misdirected = |why: &str| {
            BillingError::Misdirected(format!("Receipt {:?} was issued by node {origin:?}, whose key signs it, and {why}.", receipt.receipt_id))
        };
        let corrupt = |what: String| BillingError::Internal(format!("what node {origin:?} published for log entry {index}: {what}"));
        let AnyStore::Pg(pg) = &self.store else {
            // (A node key replaced on a ledger of one node: only the old key signs it.)
            return Err(misdirected("this node does not hold that key: fetch it from a node that does"));
        };
        let interval_ms = self.config.billing.checkpoint_interval_ms;
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(publish_wait_ms(interval_ms));
        let (published, key, checkpoint) = loop {
            if let Some(p) = pg.published_receipt(&origin, index).await? {
                let key = VerifierKey::parse(&p.verifier_key).map_err(|e| corrupt(format!("its key: {e}")))?;
                let checkpoint = tokenomy_receipts::Checkpoint::open(&p.checkpoint_note, &key).map_err(|e| corrupt(format!("its checkpoint: {e}")))?;
                if checkpoint.size > index {
                    break (p, key, checkpoint);
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(misdirected("that node has not published it yet (a node publishes its receipts while it runs): fetch it from that node, or again later"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(interval_ms.min(250))).await;
        };
        // Its checkpoint covers the entry, so its signature was written before it.
        let signature = published.signature.as_deref().ok_or_else(|| corrupt("its checkpoint covers it, but its signature is missing".into()))?;
        let signature: [u8; 64] = signature.try_into().map_err(|_| corrupt("a signature not 64 bytes long".into()))?;
        if !tokenomy_receipts::verify_receipt_signature(canonical, &signature, &key) {
            return Err(corrupt("a signature that does not verify".into()));
        }
        let mut log = self.log.lock().await;
        if log.size() < checkpoint.size {
            self.sync_log(&mut log).await?;
        }
        let extends = log.extends(&checkpoint, &self.store).await;
        self.halt_if_rewritten(extends)?.map_err(|why| corrupt(format!("its checkpoint against this node's view of the log: {why}")))?;
        let hashes = log.inclusion_proof(index, checkpoint.size, &self.store).await;
        let hashes = self.halt_if_rewritten(hashes)?;
        drop(log);
        let proof = TlogProof { extra: None, index, hashes, checkpoint_note: published.checkpoint_note };
        Ok(ReceiptBundle::new(receipt, canonical, &signature, &key, &proof).to_json())
    }

    /// Signs a checkpoint of the log as it is now and, on PostgreSQL, publishes it to the
    /// ledger for the other nodes, after the signatures of this node's receipts it covers
    /// (each written once), so that any node of the ledger can serve this node's receipts,
    /// verifiable with this node's key (even once this node is gone). One publication at a
    /// time; the upkeep calls it at every tick, a stopping node once more.
    ///
    /// A call signs at most [`PUBLISH_ENTRIES_MAX`] entries (a first publication on a long
    /// log takes several): the size of the checkpoint it published (on SQLite, signed), or
    /// `None` while entries remain to be signed.
    pub async fn publish(&self) -> Result<Option<u64>> {
        let AnyStore::Pg(pg) = &self.store else { return Ok(Some(self.checkpoint().await?.checkpoint.size)) };
        let mut done = self.published.lock().await;
        let signed = self.checkpoint().await?;
        let size = signed.checkpoint.size;
        let until = size.min(done.signed_through + PUBLISH_ENTRIES_MAX);
        while done.signed_through < until {
            let from = done.signed_through;
            let entries = self.store.log_entries(from, PUBLISH_BATCH.min(until - from) as u32).await?;
            let Some(last) = entries.last().map(|e| e.log_index) else {
                return Err(BillingError::Internal(format!("the ledger's log has no entry {from} to publish")));
            };
            pg.publish_signatures(&self.own_signatures(&entries)?).await?;
            done.signed_through = last + 1;
        }
        if done.signed_through < size {
            return Ok(None);
        }
        if done.checkpoint_size < size {
            pg.publish_checkpoint(self.signer.name(), size, &signed.note).await?;
            done.checkpoint_size = size;
        }
        Ok(Some(size))
    }

    /// This node's signatures of the receipts among `entries` that it issued.
    fn own_signatures(&self, entries: &[tokenomy_ledger::LogEntry]) -> Result<Vec<(u64, [u8; 64])>> {
        let mut signatures = Vec::new();
        for e in entries {
            let r = Receipt::from_canonical_bytes(&e.leaf_bytes).map_err(|err| BillingError::Internal(format!("log entry {}: {err}", e.log_index)))?;
            if r.origin == self.signer.name() {
                let (canonical, signature) = r.sign(&self.signer).map_err(|err| BillingError::Internal(err.to_string()))?;
                assert_eq!(canonical, e.leaf_bytes, "a logged receipt re-encodes to its own bytes");
                signatures.push((e.log_index, signature));
            }
        }
        Ok(signatures)
    }

    /// Publishes until every receipt this node issued is published (a stopping node's last
    /// call: the other nodes then serve them once it is gone).
    pub async fn publish_all(&self) -> Result<u64> {
        loop {
            if let Some(size) = self.publish().await? {
                return Ok(size);
            }
        }
    }

    /// The keys of the ledger's nodes, this node's first: each verifies the receipts and
    /// checkpoints of the node whose name it carries.
    pub async fn node_keys(&self) -> Result<Vec<VerifierKey>> {
        let mut keys = vec![self.signer.verifier()];
        if let AnyStore::Pg(pg) = &self.store {
            for (origin, key) in pg.node_keys().await? {
                if origin != self.signer.name() {
                    keys.push(VerifierKey::parse(&key).map_err(|e| BillingError::Internal(format!("the key of node {origin:?}: {e}")))?);
                }
            }
        }
        Ok(keys)
    }

    /// Extends the holds of requests still being served that would expire within half a
    /// timeout; returns how many were extended.
    pub async fn extend_live_holds(&self) -> Result<u64> {
        let now = tokenomy_ledger::now_ms();
        let timeout = self.config.billing.hold_timeout_ms;
        let due = self.live.due(now, timeout);
        let mut n = 0;
        for ids in due.chunks(tokenomy_ledger::sqlite::MAX_EXPIRE_PER_CALL as usize) {
            n += self.store.extend_holds(ids, now + timeout).await?;
            self.live.extended(ids, now + timeout);
        }
        Ok(n)
    }

    /// Whether the ledger answers within [`READY_PROBE_MS`] and would take writes (for
    /// `/ready`, so a load balancer takes a node whose ledger is away, or is a PostgreSQL server
    /// that became a standby or read-only, out of rotation).
    pub async fn ledger_reachable(&self) -> Result<()> {
        self.serving()?;
        if let Some(why) = self.store.broken() {
            return Err(BillingError::Unavailable(why.into()));
        }
        let probe = self.store.probe();
        match tokio::time::timeout(std::time::Duration::from_millis(READY_PROBE_MS), probe).await {
            Ok(r) => r.map(drop).map_err(BillingError::from),
            Err(_) => Err(BillingError::Unavailable(format!("no answer within {READY_PROBE_MS} ms"))),
        }
    }

    /// Voids holds past their timeout (after a crash, or a request that never settled).
    pub async fn expire_holds(&self) -> Result<u64> {
        Ok(self.store.expire_holds(tokenomy_ledger::now_ms()).await?)
    }

    /// Background upkeep: a checkpoint at least every `checkpoint_interval_ms` while entries
    /// arrive (and the holds of requests in progress extended on the same tick), expired holds
    /// voided every `expire_interval_ms`. Ends when `self` is dropped.
    pub fn spawn_upkeep(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let cp = std::time::Duration::from_millis(self.config.billing.checkpoint_interval_ms);
        let ex_every = (self.config.billing.expire_interval_ms / self.config.billing.checkpoint_interval_ms).max(1);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cp);
            let mut n: u64 = 0;
            let (mut cp_errors, mut extend_errors) = (QuietErrors::default(), QuietErrors::default());
            loop {
                tick.tick().await;
                let Some(b) = weak.upgrade() else { return };
                // (Holds first: a first publication on a long log takes a few ticks' time.)
                extend_errors.note(b.extend_live_holds().await.err(), "extending the holds of requests in progress");
                cp_errors.note(b.publish().await.err(), "checkpoint");
                if n % ex_every == 0 {
                    match b.expire_holds().await {
                        Ok(0) => {}
                        Ok(k) => tracing::warn!(voided = k, "voided expired holds"),
                        Err(e) => tracing::error!(error = %e, "expiring holds"),
                    }
                }
                n += 1;
            }
        })
    }
}

fn principal(rec: &KeyRecord) -> Principal {
    Principal {
        key_id: rec.id,
        account: rec.account,
        scopes: rec.scopes.clone(),
        limits: Limits { rpm: rec.rpm, tpm: rec.tpm },
        caps: rec.caps,
        spend: rec.spend,
    }
}

fn new_receipt_id() -> String {
    format!("rcpt_{:032x}", rand::random::<u128>())
}

/// What a settlement posted, for the response.
fn receipt_ref(receipt_id: String, settled: tokenomy_ledger::Settled) -> Result<Option<ReceiptRef>> {
    let posted = settled.posted.ok_or_else(|| BillingError::Internal("settle posted nothing".into()))?;
    let log_index = settled.log_index.ok_or_else(|| BillingError::Internal("settle logged nothing".into()))?;
    Ok(Some(ReceiptRef { receipt_id, log_index, amount_micros: posted.amount_micros, transfer_id: posted.id.to_string() }))
}

/// Log entries read per query while publishing this node's receipt signatures.
const PUBLISH_BATCH: u64 = 1_000;

/// Log entries one [`Billing::publish`] call reads and signs its own of at most (about two
/// seconds' work; a node settles far fewer a second).
pub const PUBLISH_ENTRIES_MAX: u64 = 50_000;

/// How long a node waits for another node to publish a receipt it is asked for before it names
/// that node instead: three publishing intervals (`checkpoint_interval_ms`, which should be
/// the same on every node of a ledger), at least 1 s and at most 10 s.
pub fn publish_wait_ms(checkpoint_interval_ms: u64) -> u64 {
    checkpoint_interval_ms.saturating_mul(3).clamp(1_000, 10_000)
}

/// Where settlements retried in the background wait on disk (`DATA_DIR/unsettled/HOLD.json`)
/// until they land, so a node stopped or crashed during a ledger outage still posts them.
pub const UNSETTLED_DIR: &str = "unsettled";

/// A settlement being retried: everything needed to post it again after a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Unsettled {
    hold_id: String,
    cost_micros: i64,
    now_ms: i64,
    /// The receipt to log, before the ledger gives it a transfer id and log index.
    receipt: Receipt,
}

impl Unsettled {
    fn hold_id(&self) -> Option<tokenomy_ledger::TransferId> {
        u128::from_str_radix(&self.hold_id, 16).ok().map(tokenomy_ledger::TransferId)
    }

    /// Posts the charge: settles its hold, or, when the hold was voided meanwhile (it expired
    /// while this node was down, and another node of the ledger swept it), charges the
    /// account directly (a transfer to operator revenue under the key `late:HOLD`, so a retry
    /// posts it once) with the same receipt: the tokens were served, and the client holds
    /// the receipt's id. Refused only if the account can no longer pay.
    async fn post(&self, store: &AnyStore, hold_id: tokenomy_ledger::TransferId) -> std::result::Result<(), LedgerError> {
        let leaf = leaf_for(self.receipt.clone(), -self.cost_micros);
        match store.settle(hold_id, self.cost_micros, self.now_ms, Some(leaf.clone())).await {
            Err(LedgerError::NotPending { state: TransferState::Voided, .. }) => {
                tracing::warn!(request_id = %self.receipt.request_id, "the charge's hold was voided meanwhile; charging the account directly");
                charge_late(store, hold_id, &self.receipt, self.cost_micros, leaf).await.map(drop)
            }
            r => r.map(drop),
        }
    }

    /// Removes a journal file once its charge is posted (or can never be).
    fn remove(path: &std::path::Path) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a settled charge's journal file");
        }
    }

    /// A journal file, checked: its hold id parses and its receipt encodes (the ledger's
    /// writer would otherwise meet a receipt it cannot log).
    fn read(path: &std::path::Path) -> std::result::Result<Unsettled, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let job: Unsettled = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        job.hold_id().ok_or("no hold id")?;
        let sample = Receipt { log_index: 0, transfer_id: job.hold_id.clone(), amount_micros: -job.cost_micros, ..job.receipt.clone() };
        sample.canonical_bytes().map_err(|e| e.to_string())?;
        Ok(job)
    }

    /// Writes the journal file (durably); `None` (logged) when it cannot.
    fn write(&self, data_dir: &std::path::Path) -> Option<PathBuf> {
        let dir = data_dir.join(UNSETTLED_DIR);
        let path = dir.join(format!("{}.json", self.hold_id));
        // The file, then its directory entry, reach the disk before the request is answered.
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| node::write_file(&path, &serde_json::to_string(self).expect("serializes"), true))
            .and_then(|()| std::fs::File::open(&dir)?.sync_all());
        match written {
            Ok(()) => Some(path),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot journal an unsettled charge: a restart before it lands loses it");
                None
            }
        }
    }
}

/// An upkeep step's errors, logged without flooding the log while the ledger is away (a tick
/// a second): an error is logged when it differs from the last one or a minute after it was,
/// with how many repeats went unlogged, and the step's recovery once.
#[derive(Default)]
struct QuietErrors {
    last: Option<(String, std::time::Instant)>,
    repeats: u64,
}

impl QuietErrors {
    fn note(&mut self, e: Option<BillingError>, what: &str) {
        match (e, &self.last) {
            (None, None) => {}
            (None, Some(_)) => {
                tracing::info!(repeats = self.repeats, "{what}: working again");
                (self.last, self.repeats) = (None, 0);
            }
            (Some(e), Some((msg, at))) if *msg == e.to_string() && at.elapsed() < std::time::Duration::from_secs(60) => self.repeats += 1,
            (Some(e), _) => {
                tracing::error!(error = %e, repeats = self.repeats, "{what}");
                (self.last, self.repeats) = (Some((e.to_string(), std::time::Instant::now())), 0);
            }
        }
    }
}

/// The charge of tokens served under a hold that was voided before its settlement landed: a
/// transfer from the account to operator revenue under the key `late:HOLD` (so that every
/// retry posts it once), with the receipt the client was promised.
async fn charge_late(store: &AnyStore, hold_id: tokenomy_ledger::TransferId, receipt: &Receipt, cost_micros: i64, leaf: tokenomy_ledger::Leaf) -> std::result::Result<Transfer, LedgerError> {
    let account = u128::from_str_radix(&receipt.account_id, 16).map(AccountId).map_err(|_| LedgerError::UnknownTransfer(hold_id))?;
    let key = format!("late:{hold_id}");
    store.transfer(account, tokenomy_ledger::OPERATOR_REVENUE, cost_micros, &key, Some(leaf)).await
}

/// A place among the [`SETTLE_RETRIES_MAX`] settlements retried in the background; freed on drop.
struct RetrySlot(Arc<std::sync::atomic::AtomicUsize>);

impl RetrySlot {
    fn take(count: &Arc<std::sync::atomic::AtomicUsize>) -> Option<Self> {
        use std::sync::atomic::Ordering::SeqCst;
        count.fetch_update(SeqCst, SeqCst, |n| (n < SETTLE_RETRIES_MAX).then_some(n + 1)).ok().map(|_| RetrySlot(count.clone()))
    }
}

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The log leaf of a posting: the receipt with the ledger's transfer id and log index filled in.
fn leaf_for(receipt: Receipt, amount_micros: i64) -> tokenomy_ledger::Leaf {
    Arc::new(move |log_index: u64, t: &Transfer| {
        let r = Receipt { log_index, transfer_id: t.id.to_string(), amount_micros, ..receipt.clone() };
        r.canonical_bytes().expect("receipts built by the node are valid")
    })
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upkeep_error_that_repeats_is_counted_not_logged_again() {
        let mut q = QuietErrors::default();
        let away = || Some(BillingError::Unavailable("connection refused".into()));
        q.note(away(), "checkpoint");
        for _ in 0..5 {
            q.note(away(), "checkpoint");
        }
        assert_eq!(q.repeats, 5, "logged once, then counted");
        q.note(Some(BillingError::Unavailable("timed out".into())), "checkpoint");
        assert_eq!(q.repeats, 0, "another error is logged at once");
        q.note(None, "checkpoint");
        assert!(q.last.is_none() && q.repeats == 0, "recovered");
    }
}
