//! [`AnyStore`]: the closed set of stores, so that callers that pick a store at run time (from
//! `--database`) hold one concrete type. `LedgerStore` returns `impl Future`, which is not
//! object safe; a closed enum dispatched by `match` is the TensorZero way and costs nothing.

use crate::*;

/// The store chosen at start: embedded SQLite or shared PostgreSQL.
#[derive(Clone)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Pg(PgStore),
}

impl std::fmt::Debug for AnyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AnyStore::Sqlite(_) => "AnyStore::Sqlite",
            AnyStore::Pg(_) => "AnyStore::Pg",
        })
    }
}

/// How long a PostgreSQL operation may take, by default, before it fails as a storage error. A server that
/// hangs (a partition, a stopped primary) accepts connections and answers nothing: without a
/// limit every request would wait forever. Failing is safe on every path: an operation whose
/// commit landed after all is found again by its retry (holds and settlements are
/// idempotent per id, mints and transfers per key), and a hold nobody settles expires.
pub const PG_OPERATION_TIMEOUT_MS: u64 = 15_000;
/// The ledger check reads every transfer: it gets longer.
pub const PG_CHECK_TIMEOUT_MS: u64 = 600_000;

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        dispatch!($self, 0, $s => $e)
    };
    ($self:ident, $limit_ms_min:expr, $s:ident => $e:expr) => {
        async move {
            match $self {
                AnyStore::Sqlite($s) => $e.await,
                AnyStore::Pg($s) => pg_within($s, $limit_ms_min, $e).await,
            }
        }
    };
}

/// Runs `op` on `pg` within the store's operation timeout (at least `limit_ms_min`): a
/// storage error once it runs out (see [`PG_OPERATION_TIMEOUT_MS`]).
pub async fn pg_within<T>(pg: &PgStore, limit_ms_min: u64, op: impl Future<Output = Result<T>>) -> Result<T> {
    let limit_ms = pg.operation_timeout_ms().max(limit_ms_min);
    match tokio::time::timeout(std::time::Duration::from_millis(limit_ms), op).await {
        Ok(r) => r,
        Err(_) => Err(LedgerError::Storage(format!("the PostgreSQL ledger did not answer within {limit_ms} ms"))),
    }
}

/// A PostgreSQL hold, given the operation timeout. The hold runs on a task of its own, so one
/// that lands after the caller gave up (its batch was stuck behind a hung server) is seen and
/// voided at once: the request was refused, and its credits are not left held for a hold
/// timeout (nor its `Idempotency-Key` reported in progress).
#[allow(clippy::too_many_arguments)]
async fn pg_hold_in_time(
    s: PgStore,
    id: FreshTransferId,
    account: AccountId,
    key: Option<KeyId>,
    amount_micros: i64,
    idempotency_key: String,
    timeout_ms: i64,
    now_ms: i64,
) -> Result<Transfer> {
    let limit_ms = s.operation_timeout_ms();
    let mine = id.id();
    let store = s.clone();
    let mut placing = tokio::spawn(async move { store.hold_as(id, account, key, amount_micros, &idempotency_key, timeout_ms, now_ms).await });
    match tokio::time::timeout(std::time::Duration::from_millis(limit_ms), &mut placing).await {
        Ok(joined) => joined.map_err(|e| LedgerError::Storage(format!("placing a hold: {e}")))?,
        Err(_) => {
            tokio::spawn(async move {
                if let Ok(Ok(t)) = placing.await {
                    // Only this request's own hold (another request with the key has its own).
                    if t.id == mine && t.state == TransferState::Pending {
                        if let Err(e) = s.void(t.id).await {
                            tracing::error!(hold = %t.id, error = %e, "voiding a hold placed after its request gave up");
                        }
                    }
                }
            });
            Err(LedgerError::Storage(format!("the PostgreSQL ledger did not answer within {limit_ms} ms")))
        }
    }
}

impl AnyStore {
    /// Whether the store answers and would take writes (for a readiness probe): SQLite reads
    /// the treasury ([`broken`](Self::broken) says whether its writer stopped); PostgreSQL
    /// also checks that the server is a primary whose sessions may write.
    pub async fn probe(&self) -> Result<()> {
        match self {
            AnyStore::Sqlite(s) => s.get_account(TREASURY).await.map(drop),
            AnyStore::Pg(s) => s.probe_writable().await,
        }
    }

    /// Why the store takes no more writes until the node restarts, if it does not.
    pub fn broken(&self) -> Option<&'static str> {
        match self {
            AnyStore::Sqlite(s) if s.refuses_writes() => Some("the SQLite ledger stopped taking writes after a disk failure; restart the node"),
            _ => None,
        }
    }
}

impl LedgerStore for AnyStore {
    fn create_account(&self, name: &str, kind: AccountKind) -> impl Future<Output = Result<Account>> + Send {
        dispatch!(self, s => s.create_account(name, kind))
    }
    fn get_account(&self, id: AccountId) -> impl Future<Output = Result<Account>> + Send {
        dispatch!(self, s => s.get_account(id))
    }
    fn list_accounts(&self, after: Option<AccountId>, limit: u32) -> impl Future<Output = Result<Vec<Account>>> + Send {
        dispatch!(self, s => s.list_accounts(after, limit))
    }
    fn mint(&self, account: AccountId, amount_micros: i64, idempotency_key: &str, leaf: Option<Leaf>) -> impl Future<Output = Result<Transfer>> + Send {
        dispatch!(self, s => s.mint(account, amount_micros, idempotency_key, leaf))
    }
    fn refund(&self, account: AccountId, amount_micros: i64, idempotency_key: &str, leaf: Option<Leaf>) -> impl Future<Output = Result<Transfer>> + Send {
        dispatch!(self, s => s.refund(account, amount_micros, idempotency_key, leaf))
    }
    fn transfer(
        &self,
        from: AccountId,
        to: AccountId,
        amount_micros: i64,
        idempotency_key: &str,
        leaf: Option<Leaf>,
    ) -> impl Future<Output = Result<Transfer>> + Send {
        dispatch!(self, s => s.transfer(from, to, amount_micros, idempotency_key, leaf))
    }
    fn hold_as(
        &self,
        id: FreshTransferId,
        account: AccountId,
        key: Option<KeyId>,
        amount_micros: i64,
        idempotency_key: &str,
        timeout_ms: i64,
        now_ms: i64,
    ) -> impl Future<Output = Result<Transfer>> + Send {
        let key_text = idempotency_key.to_string();
        async move {
            match self {
                AnyStore::Sqlite(s) => s.hold_as(id, account, key, amount_micros, &key_text, timeout_ms, now_ms).await,
                AnyStore::Pg(s) => pg_hold_in_time(s.clone(), id, account, key, amount_micros, key_text, timeout_ms, now_ms).await,
            }
        }
    }
    fn settle(&self, hold_id: TransferId, amount_micros: i64, now_ms: i64, leaf: Option<Leaf>) -> impl Future<Output = Result<Settled>> + Send {
        dispatch!(self, s => s.settle(hold_id, amount_micros, now_ms, leaf))
    }
    fn void(&self, hold_id: TransferId) -> impl Future<Output = Result<Transfer>> + Send {
        dispatch!(self, s => s.void(hold_id))
    }
    fn extend_holds(&self, hold_ids: &[TransferId], expires_at_ms: i64) -> impl Future<Output = Result<u64>> + Send {
        dispatch!(self, s => s.extend_holds(hold_ids, expires_at_ms))
    }

    fn expire_holds(&self, now_ms: i64) -> impl Future<Output = Result<u64>> + Send {
        dispatch!(self, s => s.expire_holds(now_ms))
    }
    fn statement(&self, account: AccountId, after_cursor: Option<u64>, limit: u32) -> impl Future<Output = Result<Page<Transfer>>> + Send {
        dispatch!(self, s => s.statement(account, after_cursor, limit))
    }
    fn statement_newest_first(&self, account: AccountId, before_cursor: Option<u64>, limit: u32) -> impl Future<Output = Result<Page<Transfer>>> + Send {
        dispatch!(self, s => s.statement_newest_first(account, before_cursor, limit))
    }
    fn check(&self) -> impl Future<Output = Result<CheckReport>> + Send {
        dispatch!(self, PG_CHECK_TIMEOUT_MS, s => s.check())
    }
    fn log_entries(&self, from_index: u64, limit: u32) -> impl Future<Output = Result<Vec<LogEntry>>> + Send {
        dispatch!(self, s => s.log_entries(from_index, limit))
    }
    fn log_size(&self) -> impl Future<Output = Result<u64>> + Send {
        dispatch!(self, s => s.log_size())
    }
    fn create_key(
        &self,
        account: AccountId,
        key_hash: [u8; 32],
        scopes: &[String],
        rpm: Option<u32>,
        tpm: Option<u32>,
        caps: SpendCaps,
    ) -> impl Future<Output = Result<KeyId>> + Send {
        dispatch!(self, s => s.create_key(account, key_hash, scopes, rpm, tpm, caps))
    }
    fn find_key_by_hash(&self, key_hash: [u8; 32]) -> impl Future<Output = Result<Option<KeyRecord>>> + Send {
        dispatch!(self, s => s.find_key_by_hash(key_hash))
    }
    fn revoke_key(&self, key_id: KeyId) -> impl Future<Output = Result<()>> + Send {
        dispatch!(self, s => s.revoke_key(key_id))
    }
    fn set_key_limits(&self, key_id: KeyId, change: KeyLimitsChange) -> impl Future<Output = Result<KeyRecord>> + Send {
        dispatch!(self, s => s.set_key_limits(key_id, change))
    }
    fn get_key(&self, key_id: KeyId) -> impl Future<Output = Result<KeyRecord>> + Send {
        dispatch!(self, s => s.get_key(key_id))
    }
    fn list_keys(&self, account: AccountId) -> impl Future<Output = Result<Vec<KeyRecord>>> + Send {
        dispatch!(self, s => s.list_keys(account))
    }
}
