//! Pure ledger domain: identifiers, accounts, transfers, pricing, and the
//! balance rules every store applies. No I/O happens here; stores load rows,
//! call the `apply_*` functions on in-memory copies, and persist the result.

use std::fmt;

/// Micro-credits per credit. Money is always an `i64` count of micro-credits.
pub const MICROS_PER_CREDIT: i64 = 1_000_000;
/// Tokens per "mtok" in a [`Price`].
pub const TOKENS_PER_MTOK: i128 = 1_000_000;
/// Largest amount a single transfer may move: one billion credits.
pub const MAX_AMOUNT_MICROS: i64 = 1_000_000_000 * MICROS_PER_CREDIT;
/// Longest account name, in bytes.
pub const MAX_NAME_LEN_BYTES: usize = 128;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN_BYTES: usize = 128;
/// Longest hold timeout: one day.
pub const MAX_TIMEOUT_MS: i64 = 24 * 60 * 60 * 1000;
/// Largest leaf a `Leaf` closure may return, in bytes.
pub const MAX_LEAF_LEN_BYTES: usize = 4096;
/// Largest statement / log page.
pub const MAX_PAGE_LEN: u32 = 1000;
/// Most scopes on one API key, and longest scope string in bytes.
pub const MAX_SCOPES: usize = 32;
pub const MAX_SCOPE_LEN_BYTES: usize = 64;
/// Idempotency keys the ledger derives itself start with this; callers may not use it.
pub const RESERVED_KEY_PREFIX: char = '~';

/// Account identifier. A `u128`: the top 48 bits are the creation time in ms,
/// the low 80 bits random, so ids sort by creation time (like a ULID) and fit
/// a 16-byte big-endian column (`BLOB` / `BYTEA`) whose byte order is numeric order.
/// `1` and `2` are the two system accounts, created when a store opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountId(pub u128);
/// Transfer identifier; same layout as [`AccountId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransferId(pub u128);
/// API-key identifier; same layout as [`AccountId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub u128);

/// The treasury: source of minted credits; its balance is minus the money supply.
pub const TREASURY: AccountId = AccountId(1);
/// Operator revenue: the credit side of every usage charge.
pub const OPERATOR_REVENUE: AccountId = AccountId(2);
/// The system accounts' names, as every store creates them.
pub const TREASURY_NAME: &str = "treasury";
pub const OPERATOR_REVENUE_NAME: &str = "operator-revenue";

macro_rules! id_bytes {
    ($t:ty) => {
        impl $t {
            pub fn to_bytes(self) -> [u8; 16] {
                self.0.to_be_bytes()
            }
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                let arr: [u8; 16] = bytes.try_into().ok()?;
                Some(Self(u128::from_be_bytes(arr)))
            }
            /// Time-ordered random id (48-bit ms timestamp, 80 random bits).
            pub fn generate(now_ms: i64) -> Self {
                let ts = (now_ms.max(0) as u128) & ((1u128 << 48) - 1);
                let rnd = rand::random::<u128>() & ((1u128 << 80) - 1);
                Self((ts << 80) | rnd | 0x100) // never collides with system ids
            }
        }
        impl fmt::Display for $t {
            /// 32 lowercase hex digits (by hand: a settlement's key is formatted from its hold's
            /// id on the writer's hot path, and `{:032x}` cost 2 % of it).
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut hex = [0u8; 32];
                for (i, digit) in hex.iter_mut().enumerate() {
                    *digit = b"0123456789abcdef"[((self.0 >> (124 - 4 * i)) & 0xf) as usize];
                }
                f.write_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"))
            }
        }
    };
}
id_bytes!(AccountId);
id_bytes!(TransferId);
id_bytes!(KeyId);

/// A transfer id the caller draws before placing a hold ([`LedgerStore::hold_as`]): the hold
/// gets it when that call creates it, so the caller can tell its own hold from one that
/// another request (on any node) placed under the same idempotency key. Only
/// [`generate`](Self::generate) makes one, so a caller cannot name an existing transfer's id:
/// these ids are as unique as those the stores draw themselves (80 random bits per ms).
///
/// [`LedgerStore::hold_as`]: crate::LedgerStore::hold_as
/// (Neither `Clone` nor `Copy`: one id, one hold.)
#[derive(Debug, PartialEq, Eq)]
pub struct FreshTransferId(TransferId);

impl FreshTransferId {
    pub fn generate(now_ms: i64) -> Self {
        Self(TransferId::generate(now_ms))
    }
    pub fn id(&self) -> TransferId {
        self.0
    }
}

macro_rules! code_enum {
    ($name:ident { $($v:ident = $n:expr),+ $(,)? }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($v),+ }
        impl $name {
            pub fn as_i16(self) -> i16 { match self { $(Self::$v => $n),+ } }
            pub fn from_i16(n: i16) -> Option<Self> { match n { $($n => Some(Self::$v),)+ _ => None } }
        }
    };
}
code_enum!(AccountKind { User = 0, Agent = 1, OperatorRevenue = 2, Treasury = 3 });
code_enum!(TransferCode { Mint = 0, UsageCharge = 1, Transfer = 2, Refund = 3 });
code_enum!(TransferState { Pending = 0, Posted = 1, Voided = 2 });

impl AccountKind {
    /// The kind as the API names it (`user`, `agent`, `operator_revenue`, `treasury`).
    pub fn api_name(self) -> &'static str {
        match self {
            AccountKind::User => "user",
            AccountKind::Agent => "agent",
            AccountKind::OperatorRevenue => "operator_revenue",
            AccountKind::Treasury => "treasury",
        }
    }

    /// User and Agent accounts must never spend money they do not have.
    pub fn must_stay_funded(self) -> bool {
        matches!(self, AccountKind::User | AccountKind::Agent)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub kind: AccountKind,
    /// Posted balance: credits minus debits of posted transfers.
    pub balance_micros: i64,
    /// Debits held by pending transfers (holds).
    pub pending_micros: i64,
    pub created_at_ms: i64,
}

impl Account {
    /// What the account may still spend or hold.
    pub fn available_micros(&self) -> i64 {
        self.balance_micros - self.pending_micros
    }
}

/// One double-entry transfer. A hold (`hold == true`) moves no posted money:
/// it reserves `amount_micros` on the debit account until it is settled
/// (a separate posted transfer with `pending_id` = the hold) or voided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub id: TransferId,
    pub idempotency_key: String,
    pub debit_account: AccountId,
    pub credit_account: AccountId,
    pub amount_micros: i64,
    pub code: TransferCode,
    pub state: TransferState,
    /// True for a pending reservation (TigerBeetle's `flags.pending`).
    pub hold: bool,
    /// Hold lifetime; 0 for non-holds.
    pub timeout_ms: i64,
    /// `created_at_ms + timeout_ms` for holds; 0 otherwise.
    pub expires_at_ms: i64,
    pub created_at_ms: i64,
    /// For a settlement: the hold it posts.
    pub pending_id: Option<TransferId>,
    /// The API key whose spend caps this hold (and its settlement) counts against
    /// ([`KeySpend`]); None for transfers not placed through `hold_for_key`.
    pub key_id: Option<KeyId>,
}

impl Transfer {
    /// True when this transfer moved posted money (counts toward balances).
    pub fn is_posted_movement(&self) -> bool {
        !self.hold && self.state == TransferState::Posted
    }
    /// True when this transfer currently holds money on its debit account.
    pub fn is_pending_hold(&self) -> bool {
        self.hold && self.state == TransferState::Pending
    }
}

/// What a caller asks for; compared field by field on an idempotent retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRequest {
    pub idempotency_key: String,
    pub debit_account: AccountId,
    pub credit_account: AccountId,
    pub amount_micros: i64,
    pub code: TransferCode,
    pub hold: bool,
    pub timeout_ms: i64,
    /// See [`Transfer::key_id`].
    pub key_id: Option<KeyId>,
    /// The id the transfer gets if this request creates it (a hold placed with
    /// [`FreshTransferId`]); `None`: drawn when it is created. Not compared on a retry.
    pub(crate) id: Option<TransferId>,
}

impl TransferRequest {
    /// Same key and same parameters: the retry gets the original back.
    pub fn matches(&self, t: &Transfer) -> bool {
        debug_assert_eq!(self.idempotency_key, t.idempotency_key);
        self.debit_account == t.debit_account
            && self.credit_account == t.credit_account
            && self.amount_micros == t.amount_micros
            && self.code == t.code
            && self.hold == t.hold
            && self.timeout_ms == t.timeout_ms
            && self.key_id == t.key_id
    }

    /// Whether a request with this key is answered with `t`, the transfer the key already
    /// has: the same request ([`matches`](Self::matches)), or any hold between the same
    /// accounts when `t` is a voided hold, which moved nothing (a request whose first attempt
    /// was refused and which then asks again for another amount, as one that went to an
    /// upstream does, learns that attempt was voided and takes the key's next attempt).
    pub fn replays(&self, t: &Transfer) -> bool {
        let voided_hold = t.hold && t.state == TransferState::Voided;
        self.matches(t)
            || (voided_hold && self.hold && self.debit_account == t.debit_account && self.credit_account == t.credit_account && self.code == t.code)
    }

    /// Build the transfer this request creates (state Pending for holds).
    pub fn into_transfer(self, now_ms: i64, pending_id: Option<TransferId>) -> Transfer {
        let state = if self.hold { TransferState::Pending } else { TransferState::Posted };
        let expires_at_ms = if self.hold { now_ms + self.timeout_ms } else { 0 };
        Transfer {
            id: self.id.unwrap_or_else(|| TransferId::generate(now_ms)),
            idempotency_key: self.idempotency_key,
            debit_account: self.debit_account,
            credit_account: self.credit_account,
            amount_micros: self.amount_micros,
            code: self.code,
            state,
            hold: self.hold,
            timeout_ms: self.timeout_ms,
            expires_at_ms,
            created_at_ms: now_ms,
            pending_id,
            key_id: self.key_id,
        }
    }
}

/// Result of settling a hold: the hold (now Posted or Voided), the posted
/// charge (None when 0 was settled), what went back to the account, and the
/// log index of the charge's leaf when a leaf closure was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub hold: Transfer,
    pub posted: Option<Transfer>,
    pub released_micros: i64,
    pub log_index: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass back as `after_cursor` for the next page; None when this page is the last.
    pub next_cursor: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub log_index: u64,
    pub transfer_id: TransferId,
    pub account_id: AccountId,
    pub leaf_bytes: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub account: AccountId,
    pub key_hash: [u8; 32],
    pub scopes: Vec<String>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub caps: SpendCaps,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    /// The key's spending counters as stored (maintained only for holds placed
    /// through `hold_for_key`; see [`KeySpend`]).
    pub spend: KeySpend,
}

/// Optional limits on what one API key may spend per UTC calendar day and month,
/// in-flight holds included (so concurrent requests cannot overshoot them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpendCaps {
    pub day_micros: Option<i64>,
    pub month_micros: Option<i64>,
}

impl SpendCaps {
    pub fn is_capped(&self) -> bool {
        self.day_micros.is_some() || self.month_micros.is_some()
    }

    pub fn validate(&self) -> Result<()> {
        for cap in [self.day_micros, self.month_micros].into_iter().flatten() {
            if !(0..=MAX_AMOUNT_MICROS).contains(&cap) {
                return Err(LedgerError::InvalidArgument(format!("spend cap must be in 0..={MAX_AMOUNT_MICROS} micros")));
            }
        }
        Ok(())
    }
}

/// A change to a key's limits: a field `None` keeps what is stored, `Some(v)` sets it
/// (`Some(None)`: no limit). A store applies it in one statement, so two changes of different
/// fields made at once both land (a read, then a write of all four, would lose one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyLimitsChange {
    pub rpm: Option<Option<u32>>,
    pub tpm: Option<Option<u32>>,
    pub day_micros: Option<Option<i64>>,
    pub month_micros: Option<Option<i64>>,
}

impl KeyLimitsChange {
    /// All four limits replaced (`None` = no limit).
    pub fn all(rpm: Option<u32>, tpm: Option<u32>, caps: SpendCaps) -> KeyLimitsChange {
        KeyLimitsChange { rpm: Some(rpm), tpm: Some(tpm), day_micros: Some(caps.day_micros), month_micros: Some(caps.month_micros) }
    }

    /// The values it sets are valid (the ones it keeps were validated when set).
    pub fn validate(&self) -> Result<()> {
        validate_rates(self.rpm.flatten(), self.tpm.flatten())?;
        SpendCaps { day_micros: self.day_micros.flatten(), month_micros: self.month_micros.flatten() }.validate()
    }
}

/// A key's RPM and TPM, when set, are positive (no limit is `None`, not 0).
pub fn validate_rates(rpm: Option<u32>, tpm: Option<u32>) -> Result<()> {
    if rpm == Some(0) || tpm == Some(0) {
        return Err(LedgerError::InvalidArgument("rpm and tpm must be positive (omit them for no limit)".into()));
    }
    Ok(())
}

/// A key's maintained spending counters (one row with the key; no history scan):
/// what its pending holds reserve, and what it posted in the UTC day and month
/// numbered `day` / `month` ([`utc_day`], [`utc_month`]). A counter whose period
/// has passed reads as 0 ([`KeySpend::at`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeySpend {
    pub pending_micros: i64,
    pub day: i64,
    pub day_micros: i64,
    pub month: i64,
    pub month_micros: i64,
}

/// Days since 1970-01-01 (UTC) of a Unix-epoch millisecond time.
pub fn utc_day(now_ms: i64) -> i64 {
    now_ms.div_euclid(86_400_000)
}

/// Months since 1970-01 (UTC) of a Unix-epoch millisecond time (civil calendar).
pub fn utc_month(now_ms: i64) -> i64 {
    // Howard Hinnant's civil_from_days.
    let z = utc_day(now_ms) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // 1..=12
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year - 1970) * 12 + (month - 1)
}

impl KeySpend {
    /// The counters as seen at `now_ms`: a period that has passed starts again at 0. A time
    /// in a period before the stored one (a settlement retried after midnight with its
    /// request's time, two nodes' clocks) counts in the stored one: periods never go back,
    /// so the current period's spend is never wiped.
    pub fn at(self, now_ms: i64) -> KeySpend {
        let (day, month) = (utc_day(now_ms).max(self.day), utc_month(now_ms).max(self.month));
        KeySpend {
            pending_micros: self.pending_micros,
            day,
            day_micros: if self.day == day { self.day_micros } else { 0 },
            month,
            month_micros: if self.month == month { self.month_micros } else { 0 },
        }
    }

    /// Reserves `amount` for a hold, unless it could take the key past a cap
    /// (posted this period + every pending hold + this one).
    pub fn apply_hold(&mut self, caps: SpendCaps, amount_micros: i64, now_ms: i64) -> Result<()> {
        let s = self.at(now_ms);
        let committed = add(s.pending_micros, amount_micros)?;
        for (period, cap, spent) in [("daily", caps.day_micros, s.day_micros), ("monthly", caps.month_micros, s.month_micros)] {
            let Some(cap) = cap else { continue };
            let total = add(spent, committed)?;
            if total > cap {
                let remaining_micros = cap.saturating_sub(add(spent, s.pending_micros)?).max(0);
                return Err(LedgerError::SpendCapExceeded { period, cap_micros: cap, remaining_micros, requested_micros: amount_micros });
            }
        }
        *self = KeySpend { pending_micros: committed, ..s };
        Ok(())
    }

    /// Releases a hold of `held` and counts `posted` (≤ held) as spent at `now_ms`.
    pub fn apply_settle(&mut self, held_micros: i64, posted_micros: i64, now_ms: i64) -> Result<()> {
        let mut s = self.at(now_ms);
        s.pending_micros = sub(s.pending_micros, held_micros)?;
        s.day_micros = add(s.day_micros, posted_micros)?;
        s.month_micros = add(s.month_micros, posted_micros)?;
        if s.pending_micros < 0 {
            return Err(LedgerError::InvariantViolation("key pending < 0".into()));
        }
        *self = s;
        Ok(())
    }

    /// Releases a hold of `held` (voided or expired): nothing is spent.
    pub fn apply_void(&mut self, held_micros: i64) -> Result<()> {
        self.pending_micros = sub(self.pending_micros, held_micros)?;
        if self.pending_micros < 0 {
            return Err(LedgerError::InvariantViolation("key pending < 0".into()));
        }
        Ok(())
    }
}

/// A key's rate-limit clocks: the theoretical arrival times (Unix microseconds) of the GCRA that the
/// billing crate runs for its requests per minute and tokens per minute. The ledger only keeps
/// them; what they mean, and every step that moves them, is `tokenomy_billing::ratelimit`. On
/// PostgreSQL they are a row that every node of the ledger steps under a row lock
/// ([`crate::PgStore::update_key_rate`]), so a key's limits hold across nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyRate {
    pub requests_tat_us: i64,
    pub tokens_tat_us: i64,
    /// The RPM and TPM the clocks were last stepped under (0: never), so that a limit changed
    /// since is applied to them at once rather than read through the old limit's scale.
    pub rpm: u32,
    pub tpm: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CheckReport {
    pub ok: bool,
    pub accounts: u64,
    pub transfers: u64,
    /// Sum of all posted balances; must be 0.
    pub sum_micros: i128,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("amount must be in 1..={MAX_AMOUNT_MICROS} micros, got {amount_micros}")]
    InvalidAmount { amount_micros: i64 },
    #[error("cannot transfer from an account to itself")]
    SelfTransfer,
    #[error("unknown account {0}")]
    UnknownAccount(AccountId),
    #[error("unknown transfer {0}")]
    UnknownTransfer(TransferId),
    #[error("unknown api key {0}")]
    UnknownKey(KeyId),
    #[error("insufficient funds: short by {shortfall_micros} micros")]
    InsufficientFunds { shortfall_micros: i64 },
    #[error("idempotency key {key:?} was used with different parameters")]
    IdempotencyConflict { key: String },
    #[error("account {account} is the {} account, which may not be {role} here", kind.api_name())]
    KindNotAllowed { account: AccountId, kind: AccountKind, role: &'static str },
    #[error("transfer {id} is {state:?}, not a pending hold")]
    NotPending { id: TransferId, state: TransferState },
    #[error("cannot settle {requested_micros} micros on a hold of {held_micros}")]
    SettleExceedsHold { held_micros: i64, requested_micros: i64 },
    #[error(
        "this API key's {period} spend cap of {cap_micros} micro-credits would be exceeded: \
         {remaining_micros} remain, the request may cost up to {requested_micros}"
    )]
    SpendCapExceeded { period: &'static str, cap_micros: i64, remaining_micros: i64, requested_micros: i64 },
    #[error("hold {0} has expired")]
    HoldExpired(TransferId),
    #[error("arithmetic overflow")]
    Overflow,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Another account has this name (names are handles: unique).
    #[error("an account is already named {0:?}: names are handles, so each is unique")]
    NameTaken(String),
    #[error("invariant violated: {0}")]
    InvariantViolation(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("store is closed")]
    Closed,
}

pub type Result<T> = std::result::Result<T, LedgerError>;

// ---------------------------------------------------------------- validation

pub fn validate_amount(amount_micros: i64) -> Result<()> {
    if amount_micros <= 0 || amount_micros > MAX_AMOUNT_MICROS {
        return Err(LedgerError::InvalidAmount { amount_micros });
    }
    Ok(())
}

pub fn validate_idempotency_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN_BYTES {
        return Err(LedgerError::InvalidArgument(format!(
            "idempotency key must be 1..={MAX_IDEMPOTENCY_KEY_LEN_BYTES} bytes"
        )));
    }
    if key.starts_with(RESERVED_KEY_PREFIX) {
        return Err(LedgerError::InvalidArgument("idempotency keys may not start with '~'".into()));
    }
    Ok(())
}

/// A new account's name: a handle the admin CLI finds it by (`accounts show NAME`), so it must read as
/// one (printable, no surrounding blanks), not as an account id (32 hex digits) and not as a
/// system account's name. (Uniqueness is checked by each store, in the creating write.)
/// Unicode format characters that change how a name is shown without being seen: the
/// bidirectional embeddings, overrides and isolates, zero-width characters, the BOM.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{061C}' | '\u{00AD}')
}

pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why: &str| Err(LedgerError::InvalidArgument(format!("account name {name:?} {why}")));
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN_BYTES {
        return bad(&format!("must have 1..={MAX_NAME_LEN_BYTES} bytes, not all blank"));
    }
    if name.chars().any(char::is_control) || name.trim() != name {
        return bad("may not hold control characters (newlines, tabs) or begin or end with blanks");
    }
    if name.chars().any(is_invisible_format) {
        return bad("may not hold invisible formatting characters (bidirectional overrides, zero-width characters), which make one name look like another");
    }
    if name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad("reads as an account id (32 hex digits): add a prefix such as cust-");
    }
    // The system accounts' names, and `operator_revenue` (its kind's API name) too.
    let system = [TREASURY_NAME, OPERATOR_REVENUE_NAME, AccountKind::OperatorRevenue.api_name()];
    if system.iter().any(|n| n.eq_ignore_ascii_case(name)) {
        return bad("is a system account's name");
    }
    Ok(())
}


pub fn validate_timeout(timeout_ms: i64) -> Result<()> {
    if timeout_ms <= 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(LedgerError::InvalidArgument(format!("timeout_ms must be in 1..={MAX_TIMEOUT_MS}")));
    }
    Ok(())
}

pub fn validate_page_limit(limit: u32) -> Result<()> {
    if limit == 0 || limit > MAX_PAGE_LEN {
        return Err(LedgerError::InvalidArgument(format!("limit must be in 1..={MAX_PAGE_LEN}")));
    }
    Ok(())
}

pub fn validate_scopes(scopes: &[String]) -> Result<()> {
    let bad = |s: &String| {
        s.is_empty() || s.len() > MAX_SCOPE_LEN_BYTES || !s.bytes().all(|b| b.is_ascii_graphic() && b != b',')
    };
    if scopes.len() > MAX_SCOPES || scopes.iter().any(bad) {
        return Err(LedgerError::InvalidArgument("scopes: at most 32 printable strings without ','".into()));
    }
    Ok(())
}

/// Only User and Agent accounts are created by callers; the two system
/// accounts exist once, created by the store on open.
pub fn validate_new_account_kind(kind: AccountKind) -> Result<()> {
    if !kind.must_stay_funded() {
        return Err(LedgerError::InvalidArgument(format!("{kind:?} is a system account; it exists once")));
    }
    Ok(())
}

/// Idempotency key the ledger derives for the posted half of a settlement.
pub fn settle_key(hold_id: TransferId) -> String {
    format!("{RESERVED_KEY_PREFIX}post:{hold_id}")
}

// ---------------------------------------------------------------- balance rules

fn require_kind(a: &Account, ok: bool, role: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(LedgerError::KindNotAllowed { account: a.id, kind: a.kind, role })
    }
}

/// Who may be debited by a posted or pending transfer of `code`.
pub fn check_roles(debit: &Account, credit: &Account, code: TransferCode) -> Result<()> {
    let debit_ok = match code {
        TransferCode::Mint => debit.kind == AccountKind::Treasury,
        // A refund gives back what a usage charge took: it reverses revenue, it is not new money.
        TransferCode::Refund => debit.kind == AccountKind::OperatorRevenue,
        TransferCode::UsageCharge | TransferCode::Transfer => debit.kind.must_stay_funded(),
    };
    require_kind(debit, debit_ok, "debited")?;
    let credit_ok = match code {
        TransferCode::UsageCharge => credit.kind == AccountKind::OperatorRevenue,
        // New money goes to customers only: minted into revenue it would be income no one paid.
        TransferCode::Mint | TransferCode::Refund => credit.kind.must_stay_funded(),
        TransferCode::Transfer => credit.kind != AccountKind::Treasury,
    };
    require_kind(credit, credit_ok, "credited")?;
    if debit.id == credit.id {
        return Err(LedgerError::SelfTransfer);
    }
    Ok(())
}

fn require_funds(a: &Account, amount_micros: i64) -> Result<()> {
    // Customers never spend more than they have, and revenue never gives back (refunds) more
    // than it took in: both are the debited account's shortfall, not a broken invariant.
    let bounded = a.kind.must_stay_funded() || a.kind == AccountKind::OperatorRevenue;
    if bounded && a.available_micros() < amount_micros {
        let shortfall_micros = amount_micros - a.available_micros().max(0);
        return Err(LedgerError::InsufficientFunds { shortfall_micros });
    }
    Ok(())
}

fn add(a: i64, b: i64) -> Result<i64> {
    a.checked_add(b).ok_or(LedgerError::Overflow)
}

fn sub(a: i64, b: i64) -> Result<i64> {
    a.checked_sub(b).ok_or(LedgerError::Overflow)
}

/// Post `amount` from `debit` to `credit` (mint, transfer).
pub fn apply_posted(debit: &mut Account, credit: &mut Account, amount_micros: i64) -> Result<()> {
    validate_amount(amount_micros)?;
    require_funds(debit, amount_micros)?;
    let before = debit.balance_micros as i128 + credit.balance_micros as i128;
    debit.balance_micros = sub(debit.balance_micros, amount_micros)?;
    credit.balance_micros = add(credit.balance_micros, amount_micros)?;
    debug_assert_eq!(before, debit.balance_micros as i128 + credit.balance_micros as i128);
    check_account(debit).and(check_account(credit))
}

/// Reserve `amount` on `debit` (a hold).
pub fn apply_hold(debit: &mut Account, amount_micros: i64) -> Result<()> {
    validate_amount(amount_micros)?;
    require_funds(debit, amount_micros)?;
    debit.pending_micros = add(debit.pending_micros, amount_micros)?;
    check_account(debit)
}

/// Release a hold of `held` and post `posted` (0..=held) from `debit` to `credit`.
pub fn apply_settle(debit: &mut Account, credit: &mut Account, held_micros: i64, posted_micros: i64) -> Result<()> {
    if posted_micros < 0 || posted_micros > held_micros {
        return Err(LedgerError::SettleExceedsHold { held_micros, requested_micros: posted_micros });
    }
    apply_void(debit, held_micros)?;
    if posted_micros > 0 {
        apply_posted(debit, credit, posted_micros)?;
    }
    Ok(())
}

/// Release a hold of `held` without moving money.
pub fn apply_void(debit: &mut Account, held_micros: i64) -> Result<()> {
    debit.pending_micros = sub(debit.pending_micros, held_micros)?;
    if debit.pending_micros < 0 {
        return Err(LedgerError::InvariantViolation(format!("pending < 0 on {}", debit.id)));
    }
    check_account(debit)
}

/// The per-account constraint: User/Agent never below zero available,
/// OperatorRevenue never negative, system accounts never hold.
pub fn account_ok(a: &Account) -> bool {
    match a.kind {
        AccountKind::User | AccountKind::Agent => a.pending_micros >= 0 && a.available_micros() >= 0,
        AccountKind::OperatorRevenue => a.balance_micros >= 0 && a.pending_micros == 0,
        AccountKind::Treasury => a.pending_micros == 0,
    }
}

/// The per-account constraint, checked after every change.
pub fn check_account(a: &Account) -> Result<()> {
    let ok = account_ok(a);
    debug_assert!(ok, "account constraint violated: {a:?}");
    if !ok {
        return Err(LedgerError::InvariantViolation(format!("account constraint violated: {a:?}")));
    }
    Ok(())
}

// ---------------------------------------------------------------- invariants

/// The two postings of a transfer: (debit, -amount), (credit, +amount).
pub fn postings(t: &Transfer) -> [(AccountId, i64); 2] {
    [(t.debit_account, -t.amount_micros), (t.credit_account, t.amount_micros)]
}

/// Every transfer debits exactly what it credits, between two accounts, for a positive amount.
pub fn check_transfer(t: &Transfer) -> std::result::Result<(), String> {
    let sum: i128 = postings(t).iter().map(|p| p.1 as i128).sum();
    if sum != 0 || t.amount_micros <= 0 || t.debit_account == t.credit_account {
        return Err(format!("transfer {} is unbalanced or degenerate", t.id));
    }
    if t.hold != (t.timeout_ms > 0) || (t.pending_id.is_some() && t.hold) {
        return Err(format!("transfer {} has inconsistent hold fields", t.id));
    }
    Ok(())
}

/// Sums recomputed from transfer history for one account (by `check()` only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountTotals {
    pub posted_debits_micros: i128,
    pub posted_credits_micros: i128,
    pub pending_debits_micros: i128,
    /// Posted debits that are refunds (the only debits operator revenue may have).
    pub refund_debits_micros: i128,
}

/// Picks one sum of [`AccountTotals`] (used by stores' `check()` queries).
pub type TotalsField = fn(&mut AccountTotals) -> &mut i128;

/// Whole-ledger invariants over read-back state. `totals` is keyed by account;
/// missing accounts have no transfers. `bad_transfers` counts rows that failed
/// [`check_transfer`]-equivalent SQL; `log` is (count, min, max) of log indices.
pub fn check_ledger(
    accounts: &[Account],
    totals: &std::collections::HashMap<AccountId, AccountTotals>,
    transfers: u64,
    bad_transfers: u64,
    pending_transfers_micros: i128,
    log: (u64, Option<u64>, Option<u64>),
) -> CheckReport {
    let mut problems = Vec::new();
    let sum_micros: i128 = accounts.iter().map(|a| a.balance_micros as i128).sum();
    let sum_pending: i128 = accounts.iter().map(|a| a.pending_micros as i128).sum();
    if sum_micros != 0 {
        problems.push(format!("sum of posted balances is {sum_micros}, not 0"));
    }
    if sum_pending != pending_transfers_micros {
        problems.push(format!("sum of pending {sum_pending} != pending holds {pending_transfers_micros}"));
    }
    if bad_transfers > 0 {
        problems.push(format!("{bad_transfers} unbalanced or degenerate transfers"));
    }
    for a in accounts {
        check_account_against_totals(a, totals.get(&a.id).copied().unwrap_or_default(), &mut problems);
    }
    check_log_dense(log, &mut problems);
    CheckReport { ok: problems.is_empty(), accounts: accounts.len() as u64, transfers, sum_micros, problems }
}

fn check_account_against_totals(a: &Account, t: AccountTotals, problems: &mut Vec<String>) {
    let expect_balance = t.posted_credits_micros - t.posted_debits_micros;
    if expect_balance != a.balance_micros as i128 {
        problems.push(format!("account {}: balance {} != history {expect_balance}", a.id, a.balance_micros));
    }
    if t.pending_debits_micros != a.pending_micros as i128 {
        problems.push(format!("account {}: pending {} != holds {}", a.id, a.pending_micros, t.pending_debits_micros));
    }
    if a.kind == AccountKind::OperatorRevenue && t.posted_debits_micros != t.refund_debits_micros {
        problems.push(format!("operator revenue {} was debited other than by refunds", a.id));
    }
    if !account_ok(a) {
        problems.push(format!("account constraint violated: {a:?}"));
    }
}

/// Every log entry names a posted transfer (a receipt exists only for money that moved: never
/// for a pending or voided hold). `orphans`: entries whose transfer is not a posted non-hold
/// transfer. Each store also makes entries and receipted postings one to one (PostgreSQL:
/// `log_entries.transfer_id` is unique; SQLite: the transfer names its entry and `check`
/// compares both ways), written in the same transaction as the posting.
pub fn check_log_postings(orphans: u64, report: &mut CheckReport) {
    if orphans > 0 {
        report.problems.push(format!("{orphans} log entries name no posted transfer"));
    }
    report.ok = report.problems.is_empty();
}

/// Each key's maintained `pending_micros` equals the sum of its pending holds.
/// `keys`: (key, stored pending); `holds`: pending hold sums by `key_id`.
pub fn check_key_pending(
    keys: &[(KeyId, i64)],
    holds: &std::collections::HashMap<KeyId, i128>,
    report: &mut CheckReport,
) {
    for (id, pending) in keys {
        let held = holds.get(id).copied().unwrap_or(0);
        if held != *pending as i128 {
            report.problems.push(format!("key {id}: pending {pending} != its pending holds {held}"));
        }
    }
    for id in holds.keys().filter(|id| !keys.iter().any(|(k, _)| k == *id)) {
        report.problems.push(format!("pending holds name unknown key {id}"));
    }
    report.ok = report.problems.is_empty();
}

fn check_log_dense(log: (u64, Option<u64>, Option<u64>), problems: &mut Vec<String>) {
    let (count, min, max) = log;
    let dense = match (min, max) {
        (None, None) => count == 0,
        (Some(lo), Some(hi)) => lo == 0 && hi + 1 == count,
        _ => false,
    };
    if !dense {
        problems.push(format!("log indices not dense: count {count}, min {min:?}, max {max:?}"));
    }
}

// ---------------------------------------------------------------- pricing

/// Token counts of one request. The four fields are DISJOINT: `input_tokens`
/// excludes cached input, `output_tokens` excludes reasoning. (OpenAI reports
/// cached tokens inside prompt_tokens and reasoning inside completion_tokens;
/// use [`Usage::from_openai`] to split them.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Usage {
    /// From OpenAI-style totals, where cached ⊆ prompt and reasoning ⊆ completion.
    pub fn from_openai(prompt: u64, cached: u64, completion: u64, reasoning: u64) -> Usage {
        Usage {
            input_tokens: prompt.saturating_sub(cached),
            cached_input_tokens: cached.min(prompt),
            output_tokens: completion.saturating_sub(reasoning),
            reasoning_tokens: reasoning.min(completion),
        }
    }
}

/// Micro-credits per million tokens, by token class. Never negative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Price {
    pub input_micros_per_mtok: i64,
    pub cached_input_micros_per_mtok: i64,
    pub output_micros_per_mtok: i64,
}

/// Cost of `usage` at `price`, in micro-credits.
///
/// Rounding rule: the exact sum Σ tokens × price (micro-credits × tokens/Mtok)
/// is computed in `i128`, then divided by 1 000 000 rounding UP, once, at the
/// end. So any non-zero usage at a non-zero price costs at least 1 micro, and
/// splitting a bill never loses money to truncation. Reasoning tokens bill as
/// output. Overflow (impossible for sane inputs) returns `Overflow`; negative
/// prices return `InvalidArgument`.
pub fn cost_micros(usage: Usage, price: Price) -> Result<i64> {
    let prices = [price.input_micros_per_mtok, price.cached_input_micros_per_mtok, price.output_micros_per_mtok];
    if prices.iter().any(|p| *p < 0) {
        return Err(LedgerError::InvalidArgument("prices must be >= 0".into()));
    }
    let output_tokens = usage.output_tokens as i128 + usage.reasoning_tokens as i128;
    let terms = [
        (usage.input_tokens as i128, price.input_micros_per_mtok as i128),
        (usage.cached_input_tokens as i128, price.cached_input_micros_per_mtok as i128),
        (output_tokens, price.output_micros_per_mtok as i128),
    ];
    let mut exact: i128 = 0;
    for (tokens, p) in terms {
        let term = tokens.checked_mul(p).ok_or(LedgerError::Overflow)?;
        exact = exact.checked_add(term).ok_or(LedgerError::Overflow)?;
    }
    debug_assert!(exact >= 0);
    let ceil = exact.checked_add(TOKENS_PER_MTOK - 1).ok_or(LedgerError::Overflow)? / TOKENS_PER_MTOK;
    i64::try_from(ceil).map_err(|_| LedgerError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_look_like_others_are_refused() {
        assert!(validate_name("acme").is_ok() && validate_name("Zoë Café").is_ok() && validate_name("東京").is_ok());
        for spoof in ["evil\u{202E}gnp.exe", "ad\u{200B}min", "\u{FEFF}acme", "a\u{2066}b"] {
            let e = validate_name(spoof).unwrap_err().to_string();
            assert!(e.contains("invisible formatting"), "{spoof:?}: {e}");
        }
    }

    #[test]
    fn ids_print_as_32_hex_digits() {
        for v in [0, 1, 0xabc, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210, 1 << 127] {
            assert_eq!(TransferId(v).to_string(), format!("{v:032x}"));
            assert_eq!(AccountId(v).to_string(), format!("{v:032x}"));
        }
    }

    fn user(balance: i64, pending: i64) -> Account {
        Account {
            id: AccountId(9),
            name: "u".into(),
            kind: AccountKind::User,
            balance_micros: balance,
            pending_micros: pending,
            created_at_ms: 0,
        }
    }

    #[test]
    fn cost_rounds_up_once_at_the_end() {
        let price = Price { input_micros_per_mtok: 1, cached_input_micros_per_mtok: 1, output_micros_per_mtok: 1 };
        // 3 classes × 1 token × 1 micro/Mtok = 3e-6 micros → ceil → 1 (not 3 × ceil(1e-6) = 3).
        let u = Usage { input_tokens: 1, cached_input_tokens: 1, output_tokens: 1, reasoning_tokens: 0 };
        assert_eq!(cost_micros(u, price).unwrap(), 1);
        assert_eq!(cost_micros(Usage::default(), price).unwrap(), 0);
        let exact = Usage { input_tokens: 2_000_000, ..Default::default() };
        assert_eq!(cost_micros(exact, price).unwrap(), 2);
        let just_over = Usage { input_tokens: 2_000_001, ..Default::default() };
        assert_eq!(cost_micros(just_over, price).unwrap(), 3);
    }

    #[test]
    fn reasoning_bills_as_output() {
        let price = Price { input_micros_per_mtok: 0, cached_input_micros_per_mtok: 0, output_micros_per_mtok: 10_000_000 };
        let a = Usage { output_tokens: 100, reasoning_tokens: 50, ..Default::default() };
        let b = Usage { output_tokens: 150, ..Default::default() };
        assert_eq!(cost_micros(a, price).unwrap(), cost_micros(b, price).unwrap());
        assert_eq!(cost_micros(b, price).unwrap(), 1500);
    }

    #[test]
    fn cost_overflow_is_an_error_and_negative_price_rejected() {
        let price = Price { input_micros_per_mtok: i64::MAX, cached_input_micros_per_mtok: i64::MAX, output_micros_per_mtok: i64::MAX };
        let u = Usage { input_tokens: u64::MAX, cached_input_tokens: u64::MAX, output_tokens: u64::MAX, reasoning_tokens: u64::MAX };
        assert_eq!(cost_micros(u, price), Err(LedgerError::Overflow));
        let neg = Price { input_micros_per_mtok: -1, ..Default::default() };
        assert!(matches!(cost_micros(Usage::default(), neg), Err(LedgerError::InvalidArgument(_))));
    }

    #[test]
    fn from_openai_splits_subsets() {
        let u = Usage::from_openai(100, 30, 50, 20);
        assert_eq!(u, Usage { input_tokens: 70, cached_input_tokens: 30, output_tokens: 30, reasoning_tokens: 20 });
    }

    #[test]
    fn hold_reports_shortfall() {
        let mut a = user(100, 40);
        assert_eq!(apply_hold(&mut a, 70), Err(LedgerError::InsufficientFunds { shortfall_micros: 10 }));
        apply_hold(&mut a, 60).unwrap();
        assert_eq!(a.available_micros(), 0);
    }

    #[test]
    fn settle_posts_part_and_releases_rest() {
        let mut a = user(100, 50);
        let mut op = Account { id: OPERATOR_REVENUE, kind: AccountKind::OperatorRevenue, ..user(0, 0) };
        apply_settle(&mut a, &mut op, 50, 20).unwrap();
        assert_eq!((a.balance_micros, a.pending_micros, op.balance_micros), (80, 0, 20));
        assert!(apply_settle(&mut a, &mut op, 10, 11).is_err());
    }

    #[test]
    fn roles() {
        let u = user(0, 0);
        let t = Account { id: TREASURY, kind: AccountKind::Treasury, ..user(0, 0) };
        let op = Account { id: OPERATOR_REVENUE, kind: AccountKind::OperatorRevenue, ..user(0, 0) };
        assert!(check_roles(&t, &u, TransferCode::Mint).is_ok());
        assert!(check_roles(&u, &op, TransferCode::UsageCharge).is_ok());
        assert!(check_roles(&op, &u, TransferCode::Transfer).is_err());
        assert!(check_roles(&u, &t, TransferCode::Transfer).is_err());
        assert_eq!(check_roles(&u, &u, TransferCode::Transfer), Err(LedgerError::SelfTransfer));
        // A refund reverses revenue to a customer; it is not new money from the treasury.
        assert!(check_roles(&op, &u, TransferCode::Refund).is_ok());
        assert!(check_roles(&t, &u, TransferCode::Refund).is_err());
        assert!(check_roles(&op, &t, TransferCode::Refund).is_err());
    }

    #[test]
    fn revenue_is_debited_only_by_refunds_and_never_below_zero() {
        let op = Account { id: OPERATOR_REVENUE, kind: AccountKind::OperatorRevenue, balance_micros: 5, ..user(0, 0) };
        let totals = |debits, refunds| AccountTotals { posted_credits_micros: 5 + debits, posted_debits_micros: debits, refund_debits_micros: refunds, ..Default::default() };
        let problems = |t| {
            let mut p = Vec::new();
            check_account_against_totals(&op, t, &mut p);
            p
        };
        assert_eq!(problems(totals(3, 3)), Vec::<String>::new());
        assert_eq!(problems(totals(3, 1)).len(), 1, "a debit of revenue that is not a refund");
        assert_eq!(require_funds(&op, 6), Err(LedgerError::InsufficientFunds { shortfall_micros: 1 }));
    }

    proptest::proptest! {
        #[test]
        fn cost_is_ceil_of_exact(i in 0u64..1u64<<40, c in 0u64..1u64<<40, o in 0u64..1u64<<40, r in 0u64..1u64<<40,
                                 pi in 0i64..1i64<<40, pc in 0i64..1i64<<40, po in 0i64..1i64<<40) {
            let u = Usage { input_tokens: i, cached_input_tokens: c, output_tokens: o, reasoning_tokens: r };
            let p = Price { input_micros_per_mtok: pi, cached_input_micros_per_mtok: pc, output_micros_per_mtok: po };
            let exact = i as i128 * pi as i128 + c as i128 * pc as i128 + (o as i128 + r as i128) * po as i128;
            let cost = cost_micros(u, p).unwrap() as i128;
            proptest::prop_assert!(cost * 1_000_000 >= exact);
            proptest::prop_assert!((cost - 1) * 1_000_000 < exact || cost == 0);
        }
    }
}
