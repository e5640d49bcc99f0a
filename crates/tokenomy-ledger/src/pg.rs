//! PostgreSQL store: each operation is one transaction.
//!
//! `hold` and `settle` (the charging hot path) are batched: many of them run
//! in one transaction with a fixed number of round trips (see `pg_batch.rs`);
//! the other writes run one transaction each.
//!
//! Locking order (fixed, so concurrent operations and batches cannot deadlock):
//! 1. the holds' `transfers` rows (`SELECT … FOR UPDATE`, ascending id);
//! 2. customer accounts (User/Agent) by ascending id, `SELECT … FOR UPDATE`;
//! 3. the API key row of a `hold_for_key` hold (`FOR UPDATE`);
//! 4. the single `log_head` row, which assigns the next log index;
//! 5. the system accounts (treasury, operator revenue), touched last and only
//!    by an atomic `balance += delta` UPDATE, so their hot rows are held for
//!    the shortest time.
//!
//! Concurrent inserts of the same idempotency key, deadlocks and
//! serialization failures roll back and retry (at most [`MAX_RETRIES`]).

use std::collections::HashMap;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use crate::domain::*;
use crate::sqlite::{log_account, new_key_record, MAX_EXPIRE_PER_CALL};
use crate::{hold_request, posted_request, run_leaf, settle_precheck, settle_request, Leaf, LedgerStore};

const SCHEMA: &str = include_str!("sql/pg_schema.sql");
/// The version `SCHEMA` brings a database to; a database of a later version is refused (an
/// older node would not maintain what the newer schema relies on, such as `pending_holds`).
const SCHEMA_VERSION: i32 = 7;
/// How long a new connection may take, its TCP connect and PostgreSQL's startup handshake
/// (authentication included) together, before it fails as a storage error.
pub const PG_CONNECTION_CREATE_TIMEOUT_MS: u64 = 10_000;
/// Attempts per operation on a retryable conflict.
pub const MAX_RETRIES: u32 = 5;
const ACCOUNT_COLS: &str = "id, name, kind, balance_micros, pending_micros, created_at_ms";
const TRANSFER_COLS: &str = "id, idempotency_key, debit_account, credit_account, amount_micros, code, state, \
     hold, timeout_ms, expires_at_ms, created_at_ms, pending_id, key_id";
use crate::sqlite::KEY_COLS;
const RETRY_MARK: &str = "retryable: ";

#[path = "pg_batch.rs"]
mod batch;
pub use batch::{BATCHERS, MAX_PG_BATCH, PG_CHANNEL_CAPACITY};
mod kept;
pub use kept::{KeptDoc, KeptLimits};
mod published;
pub use published::PublishedReceipt;

/// Cheap to clone; clones share the connection pool and the batch tasks.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Queue of the batch tasks that run `hold` and `settle` (see [`batch`]);
    /// None: every operation runs in its own transaction.
    jobs: Option<tokio::sync::mpsc::Sender<batch::Job>>,
    /// How long one operation may take through [`crate::AnyStore`] (see
    /// [`crate::any::PG_OPERATION_TIMEOUT_MS`]).
    operation_timeout_ms: u64,
}

fn pg_err(e: tokio_postgres::Error) -> LedgerError {
    let retryable = [SqlState::UNIQUE_VIOLATION, SqlState::T_R_DEADLOCK_DETECTED, SqlState::T_R_SERIALIZATION_FAILURE];
    match e.code() {
        Some(code) if retryable.contains(code) => LedgerError::Storage(format!("{RETRY_MARK}{e}")),
        _ => LedgerError::Storage(error_chain(&e)),
    }
}

/// A pool's failure to connect, with its cause (a wrong password, a database that does not
/// exist, a server that refuses), which the pool's own message leaves out.
pub(crate) fn pool_err(e: deadpool_postgres::PoolError) -> LedgerError {
    if let deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Create) = e {
        return LedgerError::Storage(format!(
            "the PostgreSQL server did not complete a connection within {PG_CONNECTION_CREATE_TIMEOUT_MS} ms (it accepts connections and answers nothing: is it hung, or not PostgreSQL?)"
        ));
    }
    LedgerError::Storage(error_chain(&e))
}

/// An error and its causes, each once: `db error: ERROR: password authentication failed …`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// A `key_rates` row read as `requests_tat_us, tokens_tat_us, rpm, tpm`.
fn key_rate_of(row: &tokio_postgres::Row) -> Result<KeyRate> {
    let limit = |i: usize| -> Result<u32> { Ok(u32::try_from(col::<i64>(row, i)?).unwrap_or(0)) };
    Ok(KeyRate { requests_tat_us: col(row, 0)?, tokens_tat_us: col(row, 1)?, rpm: limit(2)?, tpm: limit(3)? })
}

fn is_retryable(e: &LedgerError) -> bool {
    matches!(e, LedgerError::Storage(m) if m.starts_with(RETRY_MARK))
}

impl PgStore {
    /// Opens a pool of `pool_size` connections on `url` (public schema).
    pub async fn open(url: &str, pool_size: usize) -> Result<Self> {
        Self::open_in_schema(url, "public", pool_size).await
    }

    /// Opens a pool whose connections use `schema` (created if missing);
    /// tests use one schema each for isolation.
    pub async fn open_in_schema(url: &str, schema: &str, pool_size: usize) -> Result<Self> {
        if schema.is_empty() || schema.len() > 63 || !schema.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(LedgerError::InvalidArgument("schema must be 1..=63 of [A-Za-z0-9_]".into()));
        }
        if pool_size == 0 || pool_size > 256 {
            return Err(LedgerError::InvalidArgument("pool_size must be in 1..=256".into()));
        }
        let mut cfg: tokio_postgres::Config = url.parse().map_err(|e| {
            LedgerError::InvalidArgument(format!("the database URL is not a PostgreSQL one ({e}); expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"))
        })?;
        cfg.options(format!("-c search_path={schema}"));
        // A server that is down refuses at once; one that hangs is given this long to connect.
        cfg.connect_timeout(std::time::Duration::from_secs(5));
        cfg.keepalives_idle(std::time::Duration::from_secs(30));
        let mgr = Manager::from_config(cfg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        // One that accepts the connection and then answers nothing (a hung server, a port that
        // is not PostgreSQL's) would otherwise hold its creator forever: at start, a node that
        // never binds and says nothing.
        let create_timeout = Some(std::time::Duration::from_millis(PG_CONNECTION_CREATE_TIMEOUT_MS));
        let pool = Pool::builder(mgr).max_size(pool_size).runtime(deadpool_postgres::Runtime::Tokio1).create_timeout(create_timeout).build().map_err(|e| LedgerError::Storage(e.to_string()))?;
        let mut store = PgStore { pool, jobs: None, operation_timeout_ms: crate::any::PG_OPERATION_TIMEOUT_MS };
        store.migrate(schema).await?;
        store.jobs = Some(batch::spawn(store.pool.clone()));
        Ok(store)
    }

    /// Sets how long one operation may take through [`crate::AnyStore`] before it fails.
    pub fn with_operation_timeout_ms(mut self, ms: u64) -> Self {
        self.operation_timeout_ms = ms.max(1);
        self
    }

    pub fn operation_timeout_ms(&self) -> u64 {
        self.operation_timeout_ms
    }

    async fn migrate(&self, schema: &str) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.batch_execute("SELECT pg_advisory_xact_lock(7357001)").await.map_err(pg_err)?;
        // The idempotent schema's "already exists, skipping" notices would fill every start's log.
        tx.batch_execute("SET LOCAL client_min_messages = warning").await.map_err(pg_err)?;
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).await.map_err(pg_err)?;
        let exists: bool = tx.query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[]).await.map_err(pg_err)?.get(0);
        if exists {
            let rows = tx.query("SELECT max(version) FROM schema_version", &[]).await.map_err(pg_err)?;
            if let Some(v) = rows.first().and_then(|r| r.get::<_, Option<i32>>(0)).filter(|&v| v > SCHEMA_VERSION) {
                return Err(LedgerError::Storage(format!(
                    "the database has ledger schema version {v}, newer than this tokenomy's {SCHEMA_VERSION}: upgrade tokenomy"
                )));
            }
        }
        tx.batch_execute(SCHEMA).await.map_err(pg_err)?;
        let now = crate::now_ms();
        for (id, name, kind) in [
            (TREASURY, TREASURY_NAME, AccountKind::Treasury),
            (OPERATOR_REVENUE, OPERATOR_REVENUE_NAME, AccountKind::OperatorRevenue),
        ] {
            tx.execute(
                "INSERT INTO accounts (id, name, kind, balance_micros, pending_micros, created_at_ms) \
                 VALUES ($1, $2, $3, 0, 0, $4) ON CONFLICT (id) DO NOTHING",
                &[&&id.to_bytes()[..], &name, &kind.as_i16(), &now],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)
    }

    /// Runs `step` on `key`'s rate-limit clocks with their row locked, and stores what it
    /// leaves them at: one step at a time per key across every node of the ledger. A key
    /// without a row starts at zero clocks (a key never limited).
    ///
    /// Two round trips, the row locked for one: `BEGIN` and the locking read go out together,
    /// then the write and `COMMIT` (a request's path takes two or three steps, so each round
    /// trip saved is one less on every limited request). The commit does not wait for the
    /// disk: these clocks are soft state, unlike the ledger's transfers.
    pub async fn update_key_rate<R, F>(&self, key: KeyId, step: F) -> Result<R>
    where
        F: FnOnce(&mut KeyRate) -> R,
    {
        const LOCK: &str = "SELECT requests_tat_us, tokens_tat_us, rpm, tpm FROM key_rates WHERE key_id = $1 FOR UPDATE";
        const CREATE: &str = "INSERT INTO key_rates (key_id, requests_tat_us, tokens_tat_us) VALUES ($1, 0, 0) ON CONFLICT (key_id) DO NOTHING";
        const STORE: &str = "UPDATE key_rates SET requests_tat_us = $2, tokens_tat_us = $3, rpm = $4, tpm = $5 WHERE key_id = $1";
        let mut conn = OpenTx(Some(self.client().await?));
        let client = conn.0.as_ref().expect("just set");
        let (lock, create, store) = tokio::try_join!(client.prepare_cached(LOCK), client.prepare_cached(CREATE), client.prepare_cached(STORE)).map_err(pg_err)?;
        let id = &key.to_bytes()[..];
        let id_arg: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
        // Soft state: a database crash may lose the last fraction of a second of steps (a key
        // gets a little more for a moment), so its commits need not wait for the disk.
        let begin = client.batch_execute("BEGIN; SET LOCAL synchronous_commit = off");
        let (_, mut rows) = tokio::try_join!(begin, client.query(&lock, &id_arg)).map_err(pg_err)?;
        if rows.is_empty() {
            // The key's first step: create its row (or wait for the one another node is
            // creating), then lock it.
            client.execute(&create, &id_arg).await.map_err(pg_err)?;
            rows = client.query(&lock, &id_arg).await.map_err(pg_err)?;
        }
        let row = rows.first().ok_or_else(|| LedgerError::Storage("key_rates row missing after insert".into()))?;
        let before = key_rate_of(row)?;
        let mut rate = before;
        let out = step(&mut rate);
        if rate == before {
            client.batch_execute("COMMIT").await.map_err(pg_err)?;
        } else {
            let (r, t, rpm, tpm) = (rate.requests_tat_us, rate.tokens_tat_us, i64::from(rate.rpm), i64::from(rate.tpm));
            let args: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [&id, &r, &t, &rpm, &tpm];
            tokio::try_join!(client.execute(&store, &args), client.batch_execute("COMMIT")).map_err(pg_err)?;
        }
        conn.0.take(); // committed: the connection goes back to the pool
        Ok(out)
    }

    /// Voids the pending holds whose ledger keys start with `prefix` (at most
    /// [`MAX_EXPIRE_PER_CALL`] a call): a node's own holds of an earlier run, when their keys
    /// name the node (a restarted node's requests of before died with it).
    pub async fn void_pending_with_key_prefix(&self, prefix: &str) -> Result<u64> {
        let sql = "SELECT p.id FROM pending_holds p JOIN transfers t ON t.id = p.id AND t.hold AND t.state = 0 \
                   WHERE starts_with(t.idempotency_key, $1) LIMIT $2";
        let (prefix, limit) = (prefix.to_owned(), MAX_EXPIRE_PER_CALL as i64);
        let ids: Vec<TransferId> = self
            .in_tx(|tx| {
                let prefix = prefix.clone();
                Box::pin(async move { query(tx, sql, &[&prefix, &limit]).await?.iter().map(|r| id_col(r, 0, TransferId::from_slice)).collect() })
            })
            .await?;
        self.void_each(ids).await
    }

    /// Voids each of `ids`, each in a short transaction of its own; a hold settled meanwhile
    /// is skipped. How many were voided.
    async fn void_each(&self, ids: Vec<TransferId>) -> Result<u64> {
        let mut voided = 0;
        for id in ids {
            match self.void(id).await {
                Ok(_) => voided += 1,
                Err(LedgerError::NotPending { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(voided)
    }

    /// Records that log name `origin` belongs to the node key `verifier_key` (a signed-note
    /// verifier key) on this ledger, or finds that it already does. Another key under the same
    /// name is refused, naming it: nodes of one ledger each sign with a name of their own.
    pub async fn claim_origin(&self, origin: &str, verifier_key: &str) -> Result<()> {
        let client = self.client().await?;
        let insert = "INSERT INTO node_origins (origin, verifier_key, created_at_ms) VALUES ($1, $2, $3) ON CONFLICT (origin) DO NOTHING";
        client.execute(insert, &[&origin, &verifier_key, &crate::now_ms()]).await.map_err(pg_err)?;
        let row = client.query_one("SELECT verifier_key FROM node_origins WHERE origin = $1", &[&origin]).await.map_err(pg_err)?;
        let owner: String = col(&row, 0)?;
        if owner != verifier_key {
            return Err(LedgerError::InvalidArgument(format!(
                "the log name (origin) {origin:?} already belongs to another node of this ledger, whose key is {owner}; \
                 each node signs with a name of its own: start this one with another --origin (or none, for a name of its own)"
            )));
        }
        Ok(())
    }

    /// Whether the server would take this ledger's writes: it answers, it is a primary (not a
    /// standby in recovery) and its sessions are not read-only (`default_transaction_read_only`).
    /// A failover that leaves nodes on a demoted server lets reads through and fails every
    /// hold: a readiness probe that only reads would keep such a node in rotation.
    pub async fn probe_writable(&self) -> Result<()> {
        let client = self.client().await?;
        let sql = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on', \
                   EXISTS (SELECT 1 FROM accounts WHERE id = $1)";
        let row = client.query_one(sql, &[&&TREASURY.to_bytes()[..]]).await.map_err(pg_err)?;
        let (standby, read_only, ledger): (bool, bool, bool) = (col(&row, 0)?, col(&row, 1)?, col(&row, 2)?);
        match () {
            _ if standby => Err(LedgerError::Storage("the PostgreSQL server is a standby (in recovery): it takes no writes".into())),
            _ if read_only => Err(LedgerError::Storage("the PostgreSQL server's sessions are read-only (transaction_read_only): it takes no writes".into())),
            _ if !ledger => Err(LedgerError::Storage("the PostgreSQL database holds no ledger (no treasury account)".into())),
            _ => Ok(()),
        }
    }

    /// `key`'s rate-limit clocks as stored (zero for a key without a row), without a lock.
    pub async fn key_rate(&self, key: KeyId) -> Result<KeyRate> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT requests_tat_us, tokens_tat_us, rpm, tpm FROM key_rates WHERE key_id = $1").await.map_err(pg_err)?;
        let rows = client.query(&stmt, &[&&key.to_bytes()[..]]).await.map_err(pg_err)?;
        match rows.first() {
            Some(row) => key_rate_of(row),
            None => Ok(KeyRate::default()),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Client> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Runs one operation in its own transaction, retrying retryable conflicts.
    async fn in_tx<T, F>(&self, op: F) -> Result<T>
    where
        F: for<'a> Fn(&'a Transaction<'a>) -> futures_lite::BoxFuture<'a, Result<T>> + Send + Sync,
        T: Send,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let result = match op(&tx).await {
                Ok(v) => tx.commit().await.map_err(pg_err).map(|_| v),
                Err(e) => {
                    let _ = tx.rollback().await;
                    Err(e)
                }
            };
            match result {
                Err(e) if is_retryable(&e) && attempt < MAX_RETRIES => continue,
                other => return other,
            }
        }
    }
}

/// A pooled connection inside a transaction opened by hand (see
/// [`PgStore::update_key_rate`]): dropped before its `COMMIT` answered (an error, or the caller
/// gave up), the connection is closed rather than returned to the pool, so the server rolls the
/// transaction back and no later user of the pool finds itself inside it.
struct OpenTx(Option<deadpool_postgres::Client>);

impl Drop for OpenTx {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

mod futures_lite {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

// ------------------------------------------------------------------ row codecs

fn col<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(pg_err)
}

fn id_col<T>(row: &Row, i: usize, make: fn(&[u8]) -> Option<T>) -> Result<T> {
    let bytes: &[u8] = col(row, i)?;
    make(bytes).ok_or_else(|| LedgerError::Storage("bad id column".into()))
}

fn enum_col<T>(row: &Row, i: usize, make: fn(i16) -> Option<T>) -> Result<T> {
    make(col(row, i)?).ok_or_else(|| LedgerError::Storage("bad enum column".into()))
}

fn row_account(row: &Row) -> Result<Account> {
    Ok(Account {
        id: id_col(row, 0, AccountId::from_slice)?,
        name: col(row, 1)?,
        kind: enum_col(row, 2, AccountKind::from_i16)?,
        balance_micros: col(row, 3)?,
        pending_micros: col(row, 4)?,
        created_at_ms: col(row, 5)?,
    })
}

fn row_transfer(row: &Row, o: usize) -> Result<Transfer> {
    let pending: Option<&[u8]> = col(row, o + 11)?;
    let key: Option<&[u8]> = col(row, o + 12)?;
    Ok(Transfer {
        id: id_col(row, o, TransferId::from_slice)?,
        idempotency_key: col(row, o + 1)?,
        debit_account: id_col(row, o + 2, AccountId::from_slice)?,
        credit_account: id_col(row, o + 3, AccountId::from_slice)?,
        amount_micros: col(row, o + 4)?,
        code: enum_col(row, o + 5, TransferCode::from_i16)?,
        state: enum_col(row, o + 6, TransferState::from_i16)?,
        hold: col(row, o + 7)?,
        timeout_ms: col(row, o + 8)?,
        expires_at_ms: col(row, o + 9)?,
        created_at_ms: col(row, o + 10)?,
        pending_id: pending.and_then(TransferId::from_slice),
        key_id: key.and_then(KeyId::from_slice),
    })
}

fn row_key(row: &Row) -> Result<KeyRecord> {
    let hash: &[u8] = col(row, 2)?;
    let scopes: &str = col(row, 3)?;
    let small = |v: Option<i64>| v.map(|x| u32::try_from(x).unwrap_or(u32::MAX));
    Ok(KeyRecord {
        id: id_col(row, 0, KeyId::from_slice)?,
        account: id_col(row, 1, AccountId::from_slice)?,
        key_hash: hash.try_into().map_err(|_| LedgerError::Storage("bad key hash".into()))?,
        scopes: scopes.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        rpm: small(col(row, 4)?),
        tpm: small(col(row, 5)?),
        caps: SpendCaps { day_micros: col(row, 6)?, month_micros: col(row, 9)? },
        created_at_ms: col(row, 7)?,
        revoked_at_ms: col(row, 8)?,
        spend: KeySpend {
            pending_micros: col(row, 10)?,
            day: col(row, 11)?,
            day_micros: col(row, 12)?,
            month: col(row, 13)?,
            month_micros: col(row, 14)?,
        },
    })
}

// ------------------------------------------------------------------ row access

async fn query(tx: &Transaction<'_>, sql: &str, args: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Result<Vec<Row>> {
    let stmt = tx.prepare_cached(sql).await.map_err(pg_err)?;
    tx.query(&stmt, args).await.map_err(pg_err)
}

async fn execute(tx: &Transaction<'_>, sql: &str, args: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Result<u64> {
    let stmt = tx.prepare_cached(sql).await.map_err(pg_err)?;
    tx.execute(&stmt, args).await.map_err(pg_err)
}

fn is_system(id: AccountId) -> bool {
    id == TREASURY || id == OPERATOR_REVENUE
}

/// Loads accounts: customer rows locked FOR UPDATE in ascending id order,
/// system rows read without a lock (they are changed by atomic deltas).
async fn load_accounts(tx: &Transaction<'_>, ids: &[AccountId]) -> Result<Vec<Account>> {
    let mut sorted: Vec<AccountId> = ids.iter().copied().filter(|id| !is_system(*id)).collect();
    sorted.sort();
    sorted.dedup();
    let keys: Vec<Vec<u8>> = sorted.iter().map(|id| id.to_bytes().to_vec()).collect();
    let sql = format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE");
    let mut found: Vec<Account> = query(tx, &sql, &[&keys]).await?.iter().map(row_account).collect::<Result<_>>()?;
    let system: Vec<Vec<u8>> = ids.iter().filter(|id| is_system(**id)).map(|id| id.to_bytes().to_vec()).collect();
    if !system.is_empty() {
        let sql = format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ANY($1)");
        for row in query(tx, &sql, &[&system]).await? {
            found.push(row_account(&row)?);
        }
    }
    ids.iter()
        .map(|id| found.iter().find(|a| a.id == *id).cloned().ok_or(LedgerError::UnknownAccount(*id)))
        .collect()
}

/// Writes `after - before` as an atomic delta and checks the row it produced.
async fn store_delta(tx: &Transaction<'_>, before: &Account, after: &Account) -> Result<()> {
    check_account(after)?;
    let d_balance = after.balance_micros.checked_sub(before.balance_micros).ok_or(LedgerError::Overflow)?;
    let d_pending = after.pending_micros.checked_sub(before.pending_micros).ok_or(LedgerError::Overflow)?;
    if d_balance == 0 && d_pending == 0 {
        return Ok(());
    }
    let sql = format!(
        "UPDATE accounts SET balance_micros = balance_micros + $2, pending_micros = pending_micros + $3 \
         WHERE id = $1 RETURNING {ACCOUNT_COLS}"
    );
    let rows = query(tx, &sql, &[&&after.id.to_bytes()[..], &d_balance, &d_pending]).await?;
    let row = rows.first().ok_or(LedgerError::UnknownAccount(after.id))?;
    let stored = row_account(row)?;
    debug_assert!(is_system(after.id) || stored == *after, "locked row changed under us");
    check_account(&stored)
}

async fn transfer_by_key(tx: &Transaction<'_>, key: &str) -> Result<Option<Transfer>> {
    let sql = format!("SELECT {TRANSFER_COLS} FROM transfers WHERE idempotency_key = $1");
    query(tx, &sql, &[&key]).await?.first().map(|r| row_transfer(r, 0)).transpose()
}

async fn transfer_for_update(tx: &Transaction<'_>, id: TransferId) -> Result<Transfer> {
    let sql = format!("SELECT {TRANSFER_COLS} FROM transfers WHERE id = $1 FOR UPDATE");
    let rows = query(tx, &sql, &[&&id.to_bytes()[..]]).await?;
    rows.first().map(|r| row_transfer(r, 0)).transpose()?.ok_or(LedgerError::UnknownTransfer(id))
}

async fn insert_transfer(tx: &Transaction<'_>, t: &Transfer) -> Result<()> {
    check_transfer(t).map_err(LedgerError::InvariantViolation)?;
    let sql = format!("INSERT INTO transfers ({TRANSFER_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)");
    let pending = t.pending_id.map(|p| p.to_bytes().to_vec());
    let key = t.key_id.map(|k| k.to_bytes().to_vec());
    let args: [&(dyn tokio_postgres::types::ToSql + Sync); 13] = [
        &&t.id.to_bytes()[..],
        &t.idempotency_key,
        &&t.debit_account.to_bytes()[..],
        &&t.credit_account.to_bytes()[..],
        &t.amount_micros,
        &t.code.as_i16(),
        &t.state.as_i16(),
        &t.hold,
        &t.timeout_ms,
        &t.expires_at_ms,
        &t.created_at_ms,
        &pending,
        &key,
    ];
    execute(tx, &sql, &args).await?;
    if t.hold && t.state == TransferState::Pending {
        let sql = "INSERT INTO pending_holds (id, expires_at_ms) VALUES ($1, $2)";
        execute(tx, sql, &[&&t.id.to_bytes()[..], &t.expires_at_ms]).await?;
    }
    Ok(())
}

async fn set_state(tx: &Transaction<'_>, t: &mut Transfer, state: TransferState) -> Result<()> {
    debug_assert_eq!(t.state, TransferState::Pending);
    execute(tx, "UPDATE transfers SET state = $2 WHERE id = $1", &[&&t.id.to_bytes()[..], &state.as_i16()]).await?;
    // (A hold missing from `pending_holds` — written by a node of schema version 2 running
    // against version 3, which is not supported — is settled all the same; `check` reports it.)
    execute(tx, "DELETE FROM pending_holds WHERE id = $1", &[&&t.id.to_bytes()[..]]).await?;
    t.state = state;
    Ok(())
}

async fn append_log(tx: &Transaction<'_>, leaf: &Leaf, t: &Transfer) -> Result<u64> {
    let rows = query(tx, "UPDATE log_head SET next_index = next_index + 1 WHERE id = 1 RETURNING next_index - 1", &[]).await?;
    let index: i64 = col(rows.first().ok_or_else(|| LedgerError::Storage("log_head missing".into()))?, 0)?;
    let bytes = run_leaf(leaf, index as u64, t)?;
    let sql = "INSERT INTO log_entries (log_index, transfer_id, account_id, leaf_bytes) VALUES ($1,$2,$3,$4)";
    execute(tx, sql, &[&index, &&t.id.to_bytes()[..], &&log_account(t).to_bytes()[..], &bytes]).await?;
    Ok(index as u64)
}

/// A key's caps and spend counters, its row locked (lock order step 3); the key must
/// be live and belong to `account` when given.
async fn key_spend_for_update(tx: &Transaction<'_>, id: KeyId, account: Option<AccountId>) -> Result<(SpendCaps, KeySpend)> {
    let sql = format!("SELECT {KEY_COLS} FROM api_keys WHERE id = $1 FOR UPDATE");
    let rows = query(tx, &sql, &[&&id.to_bytes()[..]]).await?;
    let rec = rows.first().map(row_key).transpose()?.ok_or(LedgerError::UnknownKey(id))?;
    if account.is_some_and(|a| a != rec.account || rec.revoked_at_ms.is_some()) {
        return Err(LedgerError::UnknownKey(id));
    }
    Ok((rec.caps, rec.spend))
}

async fn store_key_spend(tx: &Transaction<'_>, id: KeyId, s: &KeySpend) -> Result<()> {
    assert!(s.pending_micros >= 0, "key pending below zero");
    let sql = "UPDATE api_keys SET pending_micros = $2, spend_day = $3, spend_day_micros = $4, spend_month = $5, \
               spend_month_micros = $6 WHERE id = $1";
    let n = execute(tx, sql, &[&&id.to_bytes()[..], &s.pending_micros, &s.day, &s.day_micros, &s.month, &s.month_micros]).await?;
    if n != 1 {
        return Err(LedgerError::UnknownKey(id));
    }
    Ok(())
}

async fn log_index_of(tx: &Transaction<'_>, id: TransferId) -> Result<Option<u64>> {
    let rows = query(tx, "SELECT log_index FROM log_entries WHERE transfer_id = $1", &[&&id.to_bytes()[..]]).await?;
    rows.first().map(|r| col::<i64>(r, 0).map(|i| i as u64)).transpose()
}

// ------------------------------------------------------------------ operations

fn replay(req: &TransferRequest, existing: Transfer) -> Result<Transfer> {
    if req.replays(&existing) {
        Ok(existing)
    } else {
        Err(LedgerError::IdempotencyConflict { key: req.idempotency_key.clone() })
    }
}

async fn op_posted(tx: &Transaction<'_>, req: TransferRequest, leaf: Option<Leaf>, now: i64) -> Result<Transfer> {
    if let Some(existing) = transfer_by_key(tx, &req.idempotency_key).await? {
        return replay(&req, existing);
    }
    let before = load_accounts(tx, &[req.debit_account, req.credit_account]).await?;
    let (mut debit, mut credit) = (before[0].clone(), before[1].clone());
    check_roles(&debit, &credit, req.code)?;
    apply_posted(&mut debit, &mut credit, req.amount_micros)?;
    let t = req.into_transfer(now, None);
    insert_transfer(tx, &t).await?;
    store_pair(tx, &before, &debit, &credit, leaf.as_ref().map(|l| (l, &t))).await?;
    Ok(t)
}

/// Stores customer rows first, then appends the log entry (locking `log_head`),
/// then system rows last: the module's lock order, shared with the batch path.
async fn store_pair(
    tx: &Transaction<'_>,
    before: &[Account],
    debit: &Account,
    credit: &Account,
    log: Option<(&Leaf, &Transfer)>,
) -> Result<Option<u64>> {
    let mut pairs = [(&before[0], debit), (&before[1], credit)];
    pairs.sort_by_key(|(_, a)| (is_system(a.id), a.id));
    for (b, a) in pairs.iter().filter(|(_, a)| !is_system(a.id)) {
        store_delta(tx, b, a).await?;
    }
    let index = match log {
        Some((leaf, t)) => Some(append_log(tx, leaf, t).await?),
        None => None,
    };
    for (b, a) in pairs.iter().filter(|(_, a)| is_system(a.id)) {
        store_delta(tx, b, a).await?;
    }
    Ok(index)
}

async fn op_hold(tx: &Transaction<'_>, req: TransferRequest, now: i64) -> Result<Transfer> {
    if let Some(existing) = transfer_by_key(tx, &req.idempotency_key).await? {
        return replay(&req, existing);
    }
    let before = load_accounts(tx, &[req.debit_account, req.credit_account]).await?;
    let mut debit = before[0].clone();
    check_roles(&debit, &before[1], req.code)?;
    apply_hold(&mut debit, req.amount_micros)?;
    let key = match req.key_id {
        Some(id) => {
            let (caps, mut spend) = key_spend_for_update(tx, id, Some(req.debit_account)).await?;
            spend.apply_hold(caps, req.amount_micros, now)?;
            Some((id, spend))
        }
        None => None,
    };
    let t = req.into_transfer(now, None);
    insert_transfer(tx, &t).await?;
    store_delta(tx, &before[0], &debit).await?;
    if let Some((id, spend)) = &key {
        store_key_spend(tx, *id, spend).await?;
    }
    Ok(t)
}

async fn op_settle(tx: &Transaction<'_>, hold_id: TransferId, amount: i64, now: i64, leaf: Option<Leaf>) -> Result<Settled> {
    let mut hold = transfer_for_update(tx, hold_id).await?;
    let prior = match hold.state {
        TransferState::Posted => transfer_by_key(tx, &settle_key(hold.id)).await?,
        _ => None,
    };
    if settle_precheck(&hold, amount, now, prior.as_ref().map(|t| t.amount_micros))?.is_some() {
        let log_index = match &prior {
            Some(p) => log_index_of(tx, p.id).await?,
            None => None,
        };
        let released_micros = hold.amount_micros - amount;
        return Ok(Settled { hold, posted: prior, released_micros, log_index });
    }
    let before = load_accounts(tx, &[hold.debit_account, hold.credit_account]).await?;
    let (mut debit, mut credit) = (before[0].clone(), before[1].clone());
    apply_settle(&mut debit, &mut credit, hold.amount_micros, amount)?;
    if let Some(id) = hold.key_id {
        let (_, mut spend) = key_spend_for_update(tx, id, None).await?;
        spend.apply_settle(hold.amount_micros, amount, now)?;
        store_key_spend(tx, id, &spend).await?;
    }
    let state = if amount > 0 { TransferState::Posted } else { TransferState::Voided };
    set_state(tx, &mut hold, state).await?;
    let released_micros = hold.amount_micros - amount;
    let posted = match amount {
        0 => None,
        _ => Some(settle_request(&hold, amount).into_transfer(now, Some(hold.id))),
    };
    if let Some(p) = &posted {
        insert_transfer(tx, p).await?;
    }
    let log = match (&posted, &leaf) {
        (Some(p), Some(leaf)) => Some((leaf, p)),
        _ => None,
    };
    let log_index = store_pair(tx, &before, &debit, &credit, log).await?;
    Ok(Settled { hold, posted, released_micros, log_index })
}

async fn op_void(tx: &Transaction<'_>, hold_id: TransferId) -> Result<Transfer> {
    let mut hold = transfer_for_update(tx, hold_id).await?;
    match (hold.hold, hold.state) {
        (true, TransferState::Voided) => return Ok(hold),
        (true, TransferState::Pending) => {}
        (_, state) => return Err(LedgerError::NotPending { id: hold.id, state }),
    }
    let before = load_accounts(tx, &[hold.debit_account]).await?;
    let mut debit = before[0].clone();
    apply_void(&mut debit, hold.amount_micros)?;
    if let Some(id) = hold.key_id {
        let (_, mut spend) = key_spend_for_update(tx, id, None).await?;
        spend.apply_void(hold.amount_micros)?;
        store_key_spend(tx, id, &spend).await?;
    }
    set_state(tx, &mut hold, TransferState::Voided).await?;
    store_delta(tx, &before[0], &debit).await?;
    Ok(hold)
}

// ------------------------------------------------------------------ reads

async fn read_check(tx: &Transaction<'_>) -> Result<CheckReport> {
    let sql = format!("SELECT {ACCOUNT_COLS} FROM accounts");
    let accounts: Vec<Account> = query(tx, &sql, &[]).await?.iter().map(row_account).collect::<Result<_>>()?;
    let mut totals: HashMap<AccountId, AccountTotals> = HashMap::new();
    let queries: [(&str, TotalsField); 4] = [
        ("SELECT debit_account, SUM(amount_micros)::BIGINT FROM transfers WHERE NOT hold AND state = 1 GROUP BY 1", |t| {
            &mut t.posted_debits_micros
        }),
        ("SELECT credit_account, SUM(amount_micros)::BIGINT FROM transfers WHERE NOT hold AND state = 1 GROUP BY 1", |t| {
            &mut t.posted_credits_micros
        }),
        ("SELECT debit_account, SUM(amount_micros)::BIGINT FROM transfers WHERE hold AND state = 0 GROUP BY 1", |t| {
            &mut t.pending_debits_micros
        }),
        ("SELECT debit_account, SUM(amount_micros)::BIGINT FROM transfers WHERE NOT hold AND state = 1 AND code = 3 GROUP BY 1", |t| {
            &mut t.refund_debits_micros
        }),
    ];
    for (sql, field) in queries {
        for row in query(tx, sql, &[]).await? {
            let id = id_col(&row, 0, AccountId::from_slice)?;
            *field(totals.entry(id).or_default()) += col::<i64>(&row, 1)? as i128;
        }
    }
    let scalar = |rows: Vec<Row>| -> Result<i64> { col(rows.first().ok_or(LedgerError::Overflow)?, 0) };
    let transfers = scalar(query(tx, "SELECT COUNT(*) FROM transfers", &[]).await?)? as u64;
    let bad = scalar(query(tx, BAD_TRANSFERS_SQL, &[]).await?)? as u64;
    let pending_sql = "SELECT COALESCE(SUM(amount_micros), 0)::BIGINT FROM transfers WHERE hold AND state = 0";
    let pending = scalar(query(tx, pending_sql, &[]).await?)? as i128;
    let rows = query(tx, "SELECT COUNT(*), MIN(log_index), MAX(log_index) FROM log_entries", &[]).await?;
    let row = rows.first().ok_or(LedgerError::Overflow)?;
    let log = (col::<i64>(row, 0)? as u64, col::<Option<i64>>(row, 1)?.map(|v| v as u64), col::<Option<i64>>(row, 2)?.map(|v| v as u64));
    let mut report = check_ledger(&accounts, &totals, transfers, bad, pending, log);
    let head = scalar(query(tx, "SELECT next_index FROM log_head WHERE id = 1", &[]).await?)? as u64;
    if head != log.0 {
        report.problems.push(format!("log_head {head} != log size {}", log.0));
        report.ok = false;
    }
    let keys: Vec<(KeyId, i64)> = query(tx, "SELECT id, pending_micros FROM api_keys", &[])
        .await?
        .iter()
        .map(|r| Ok((id_col(r, 0, KeyId::from_slice)?, col(r, 1)?)))
        .collect::<Result<_>>()?;
    let sql = "SELECT key_id, SUM(amount_micros)::BIGINT FROM transfers WHERE hold AND state = 0 AND key_id IS NOT NULL GROUP BY 1";
    let holds: HashMap<KeyId, i128> = query(tx, sql, &[])
        .await?
        .iter()
        .map(|r| Ok((id_col(r, 0, KeyId::from_slice)?, col::<i64>(r, 1)? as i128)))
        .collect::<Result<_>>()?;
    check_key_pending(&keys, &holds, &mut report);
    let orphans = scalar(query(tx, LOG_ORPHANS_SQL, &[]).await?)? as u64;
    check_log_postings(orphans, &mut report);
    let unlisted = scalar(query(tx, PENDING_UNLISTED_SQL, &[]).await?)?;
    if unlisted != 0 {
        report.problems.push(format!("{unlisted} pending holds differ between transfers and pending_holds"));
        report.ok = false;
    }
    Ok(report)
}

/// Pending holds missing from `pending_holds` (or with another expiry), plus rows of
/// `pending_holds` that name no pending hold.
const PENDING_UNLISTED_SQL: &str = "SELECT (SELECT COUNT(*) FROM (SELECT id, expires_at_ms FROM transfers \
    WHERE hold AND state = 0 EXCEPT ALL SELECT id, expires_at_ms FROM pending_holds) a) \
    + (SELECT COUNT(*) FROM (SELECT id, expires_at_ms FROM pending_holds \
    EXCEPT ALL SELECT id, expires_at_ms FROM transfers WHERE hold AND state = 0) b)";

const LOG_ORPHANS_SQL: &str = "SELECT COUNT(*) FROM log_entries l WHERE NOT EXISTS \
    (SELECT 1 FROM transfers t WHERE t.id = l.transfer_id AND NOT t.hold AND t.state = 1)";

const BAD_TRANSFERS_SQL: &str = "SELECT COUNT(*) FROM transfers t WHERE t.amount_micros <= 0 \
    OR t.debit_account = t.credit_account OR t.hold <> (t.timeout_ms > 0) \
    OR (t.hold AND t.state = 1 AND NOT EXISTS (SELECT 1 FROM transfers p \
        WHERE p.idempotency_key = '~post:' || encode(t.id, 'hex') AND p.pending_id = t.id \
        AND p.amount_micros <= t.amount_micros))";

async fn read_statement(tx: &Transaction<'_>, account: AccountId, after: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
    load_accounts(tx, &[account]).await?;
    let sql = format!(
        "SELECT seq, {TRANSFER_COLS} FROM transfers WHERE (debit_account = $1 OR credit_account = $1) \
         AND seq > $2 ORDER BY seq LIMIT $3"
    );
    let after = after.unwrap_or(0) as i64;
    let rows = query(tx, &sql, &[&&account.to_bytes()[..], &after, &(limit as i64 + 1)]).await?;
    page_of(&rows, limit)
}

/// Up to `limit + 1` rows of `(seq, transfer…)` as a page of `limit`, whose cursor (the last
/// seq on it) is there only when the extra row says another page follows.
fn page_of(rows: &[Row], limit: u32) -> Result<Page<Transfer>> {
    let mut items = Vec::with_capacity(rows.len());
    let mut last = 0i64;
    for row in rows.iter().take(limit as usize) {
        last = col(row, 0)?;
        items.push(row_transfer(row, 1)?);
    }
    let next_cursor = (rows.len() > limit as usize).then_some(last as u64);
    Ok(Page { items, next_cursor })
}

async fn read_statement_newest_first(tx: &Transaction<'_>, account: AccountId, before: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
    load_accounts(tx, &[account]).await?;
    let sql = format!(
        "SELECT seq, {TRANSFER_COLS} FROM transfers WHERE (debit_account = $1 OR credit_account = $1) \
         AND seq < $2 ORDER BY seq DESC LIMIT $3"
    );
    let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let rows = query(tx, &sql, &[&&account.to_bytes()[..], &before, &(limit as i64 + 1)]).await?;
    page_of(&rows, limit)
}

async fn read_keys(tx: &Transaction<'_>, sql_where: &'static str, arg: Vec<u8>) -> Result<Vec<KeyRecord>> {
    let sql = format!("SELECT {KEY_COLS} FROM api_keys WHERE {sql_where} ORDER BY created_at_ms, id");
    query(tx, &sql, &[&arg]).await?.iter().map(row_key).collect()
}

// ------------------------------------------------------------------ trait

impl LedgerStore for PgStore {
    async fn create_account(&self, name: &str, kind: AccountKind) -> Result<Account> {
        validate_name(name)?;
        validate_new_account_kind(kind)?;
        let now = crate::now_ms();
        let a = Account { id: AccountId::generate(now), name: name.to_owned(), kind, balance_micros: 0, pending_micros: 0, created_at_ms: now };
        let sql = "INSERT INTO accounts (id, name, kind, balance_micros, pending_micros, created_at_ms) VALUES ($1,$2,$3,0,0,$4)";
        let a2 = a.clone();
        self.in_tx(move |tx| {
            let a = a2.clone();
            Box::pin(async move {
                // One creator of a name at a time across the nodes: the check and the insert
                // run under a transaction lock on the name's hash.
                execute(tx, "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", &[&a.name]).await?;
                if !query(tx, "SELECT 1 FROM accounts WHERE name = $1 LIMIT 1", &[&a.name]).await?.is_empty() {
                    return Err(LedgerError::NameTaken(a.name.clone()));
                }
                execute(tx, sql, &[&&a.id.to_bytes()[..], &a.name, &a.kind.as_i16(), &a.created_at_ms]).await
            })
        })
        .await?;
        Ok(a)
    }

    async fn get_account(&self, id: AccountId) -> Result<Account> {
        self.in_tx(move |tx| {
            Box::pin(async move {
                let sql = format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE id = $1");
                let rows = query(tx, &sql, &[&&id.to_bytes()[..]]).await?;
                rows.first().map(row_account).transpose()?.ok_or(LedgerError::UnknownAccount(id))
            })
        })
        .await
    }

    async fn list_accounts(&self, after: Option<AccountId>, limit: u32) -> Result<Vec<Account>> {
        validate_page_limit(limit)?;
        let after = after.map_or(0, |a| a.0).to_be_bytes();
        self.in_tx(move |tx| {
            Box::pin(async move {
                let sql = format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE id > $1 ORDER BY id LIMIT $2");
                let rows = query(tx, &sql, &[&&after[..], &i64::from(limit)]).await?;
                rows.iter().map(row_account).collect()
            })
        })
        .await
    }

    async fn mint(&self, account: AccountId, amount_micros: i64, key: &str, leaf: Option<Leaf>) -> Result<Transfer> {
        let req = posted_request(TREASURY, account, amount_micros, key, TransferCode::Mint)?;
        let now = crate::now_ms();
        self.in_tx(|tx| Box::pin(op_posted(tx, req.clone(), leaf.clone(), now))).await
    }

    async fn refund(&self, account: AccountId, amount_micros: i64, key: &str, leaf: Option<Leaf>) -> Result<Transfer> {
        let req = posted_request(OPERATOR_REVENUE, account, amount_micros, key, TransferCode::Refund)?;
        let now = crate::now_ms();
        self.in_tx(|tx| Box::pin(op_posted(tx, req.clone(), leaf.clone(), now))).await
    }

    async fn transfer(&self, from: AccountId, to: AccountId, amount_micros: i64, key: &str, leaf: Option<Leaf>) -> Result<Transfer> {
        let req = posted_request(from, to, amount_micros, key, TransferCode::Transfer)?;
        let now = crate::now_ms();
        self.in_tx(|tx| Box::pin(op_posted(tx, req.clone(), leaf.clone(), now))).await
    }

    async fn hold_as(
        &self,
        id: FreshTransferId,
        account: AccountId,
        key_id: Option<KeyId>,
        amount_micros: i64,
        key: &str,
        timeout_ms: i64,
        now_ms: i64,
    ) -> Result<Transfer> {
        let req = hold_request(id, account, amount_micros, key, timeout_ms, key_id)?;
        // Not batched for capped keys: they are the exception, and their row lock orders them anyway.
        if let (Some(jobs), None) = (&self.jobs, key_id) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let job = batch::Job { op: batch::Op::Hold { req, now: now_ms }, reply: batch::Reply::Hold(tx) };
            jobs.send(job).await.map_err(|_| LedgerError::Closed)?;
            return rx.await.map_err(|_| LedgerError::Closed)?;
        }
        self.in_tx(|tx| Box::pin(op_hold(tx, req.clone(), now_ms))).await
    }

    async fn settle(&self, hold_id: TransferId, amount_micros: i64, now_ms: i64, leaf: Option<Leaf>) -> Result<Settled> {
        if let Some(jobs) = &self.jobs {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let op = batch::Op::Settle { hold_id, amount: amount_micros, now: now_ms, leaf };
            jobs.send(batch::Job { op, reply: batch::Reply::Settle(tx) }).await.map_err(|_| LedgerError::Closed)?;
            return rx.await.map_err(|_| LedgerError::Closed)?;
        }
        self.in_tx(|tx| Box::pin(op_settle(tx, hold_id, amount_micros, now_ms, leaf.clone()))).await
    }

    async fn void(&self, hold_id: TransferId) -> Result<Transfer> {
        self.in_tx(|tx| Box::pin(op_void(tx, hold_id))).await
    }

    async fn extend_holds(&self, hold_ids: &[TransferId], expires_at_ms: i64) -> Result<u64> {
        let ids = crate::extend_request(hold_ids)?;
        let sql = "WITH t AS (UPDATE transfers SET expires_at_ms = $1 WHERE id = ANY($2) AND hold AND state = 0 \
                   AND expires_at_ms < $1 RETURNING id) \
                   UPDATE pending_holds p SET expires_at_ms = $1 FROM t WHERE p.id = t.id";
        self.in_tx(move |tx| {
            let ids = ids.clone();
            Box::pin(async move { execute(tx, sql, &[&expires_at_ms, &ids]).await })
        })
        .await
    }

    async fn expire_holds(&self, now_ms: i64) -> Result<u64> {
        // Only rows naming a pending hold (rows naming a settled one cannot come from this
        // version, but are dropped when expired rather than swept again at every call).
        let sql = "SELECT p.id FROM pending_holds p JOIN transfers t ON t.id = p.id AND t.hold AND t.state = 0 \
                   WHERE p.expires_at_ms <= $1 ORDER BY p.expires_at_ms LIMIT $2";
        let stale = "DELETE FROM pending_holds p WHERE p.expires_at_ms <= $1 AND NOT EXISTS \
                     (SELECT 1 FROM transfers t WHERE t.id = p.id AND t.hold AND t.state = 0)";
        let limit = MAX_EXPIRE_PER_CALL as i64;
        let ids: Vec<TransferId> = self
            .in_tx(|tx| {
                Box::pin(async move {
                    execute(tx, stale, &[&now_ms]).await?;
                    query(tx, sql, &[&now_ms, &limit]).await?.iter().map(|r| id_col(r, 0, TransferId::from_slice)).collect()
                })
            })
            .await?;
        self.void_each(ids).await
    }

    async fn statement(&self, account: AccountId, after_cursor: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
        validate_page_limit(limit)?;
        self.in_tx(|tx| Box::pin(read_statement(tx, account, after_cursor, limit))).await
    }

    async fn statement_newest_first(&self, account: AccountId, before_cursor: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
        validate_page_limit(limit)?;
        self.in_tx(|tx| Box::pin(read_statement_newest_first(tx, account, before_cursor, limit))).await
    }

    async fn check(&self) -> Result<CheckReport> {
        self.in_tx(|tx| {
            Box::pin(async move {
                tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.map_err(pg_err)?;
                read_check(tx).await
            })
        })
        .await
    }

    async fn log_entries(&self, from_index: u64, limit: u32) -> Result<Vec<LogEntry>> {
        validate_page_limit(limit)?;
        let sql = "SELECT log_index, transfer_id, account_id, leaf_bytes FROM log_entries \
                   WHERE log_index >= $1 ORDER BY log_index LIMIT $2";
        let from = i64::try_from(from_index).unwrap_or(i64::MAX);
        self.in_tx(|tx| {
            Box::pin(async move {
                let rows = query(tx, sql, &[&from, &(limit as i64)]).await?;
                rows.iter()
                    .map(|r| {
                        Ok(LogEntry {
                            log_index: col::<i64>(r, 0)? as u64,
                            transfer_id: id_col(r, 1, TransferId::from_slice)?,
                            account_id: id_col(r, 2, AccountId::from_slice)?,
                            leaf_bytes: col(r, 3)?,
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    async fn log_size(&self) -> Result<u64> {
        self.in_tx(|tx| {
            Box::pin(async move {
                let rows = query(tx, "SELECT COUNT(*) FROM log_entries", &[]).await?;
                Ok(col::<i64>(rows.first().ok_or(LedgerError::Overflow)?, 0)? as u64)
            })
        })
        .await
    }

    async fn create_key(
        &self,
        account: AccountId,
        key_hash: [u8; 32],
        scopes: &[String],
        rpm: Option<u32>,
        tpm: Option<u32>,
        caps: SpendCaps,
    ) -> Result<KeyId> {
        let rec = new_key_record(account, key_hash, scopes, rpm, tpm, caps)?;
        let sql = format!("INSERT INTO api_keys ({KEY_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,NULL,$9,0,0,0,0,0)");
        let result = self
            .in_tx(|tx| {
                let (rec, sql) = (rec.clone(), sql.clone());
                Box::pin(async move {
                    load_accounts(tx, &[rec.account]).await?;
                    let (rpm, tpm) = (rec.rpm.map(i64::from), rec.tpm.map(i64::from));
                    let args: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
                        &&rec.id.to_bytes()[..],
                        &&rec.account.to_bytes()[..],
                        &&rec.key_hash[..],
                        &rec.scopes.join(","),
                        &rpm,
                        &tpm,
                        &rec.caps.day_micros,
                        &rec.created_at_ms,
                        &rec.caps.month_micros,
                    ];
                    execute(tx, &sql, &args).await
                })
            })
            .await;
        match result {
            Ok(_) => Ok(rec.id),
            Err(e) if is_retryable(&e) => Err(LedgerError::InvalidArgument("key hash exists".into())),
            Err(e) => Err(e),
        }
    }

    async fn find_key_by_hash(&self, key_hash: [u8; 32]) -> Result<Option<KeyRecord>> {
        let keys = self
            .in_tx(|tx| Box::pin(read_keys(tx, "key_hash = $1 AND revoked_at_ms IS NULL", key_hash.to_vec())))
            .await?;
        Ok(keys.into_iter().next())
    }

    async fn revoke_key(&self, key_id: KeyId) -> Result<()> {
        let now = crate::now_ms();
        let sql = "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1";
        let n = self.in_tx(|tx| Box::pin(async move { execute(tx, sql, &[&&key_id.to_bytes()[..], &now]).await })).await?;
        if n == 0 {
            return Err(LedgerError::UnknownKey(key_id));
        }
        Ok(())
    }

    async fn set_key_limits(&self, key_id: KeyId, ch: KeyLimitsChange) -> Result<KeyRecord> {
        ch.validate()?;
        let sql = format!(
            "UPDATE api_keys SET rpm = CASE WHEN $2 THEN $3 ELSE rpm END, tpm = CASE WHEN $4 THEN $5 ELSE tpm END, \
             spend_cap_day_micros = CASE WHEN $6 THEN $7 ELSE spend_cap_day_micros END, \
             spend_cap_month_micros = CASE WHEN $8 THEN $9 ELSE spend_cap_month_micros END \
             WHERE id = $1 RETURNING {KEY_COLS}"
        );
        let (rpm, tpm) = (ch.rpm.flatten().map(i64::from), ch.tpm.flatten().map(i64::from));
        let (set_rpm, set_tpm, set_day, set_month) =
            (ch.rpm.is_some(), ch.tpm.is_some(), ch.day_micros.is_some(), ch.month_micros.is_some());
        let (day, month) = (ch.day_micros.flatten(), ch.month_micros.flatten());
        let rows = self
            .in_tx(|tx| {
                let sql = sql.clone();
                Box::pin(async move {
                    let id = &key_id.to_bytes()[..];
                    query(tx, &sql, &[&id, &set_rpm, &rpm, &set_tpm, &tpm, &set_day, &day, &set_month, &month]).await
                })
            })
            .await?;
        rows.first().map(row_key).transpose()?.ok_or(LedgerError::UnknownKey(key_id))
    }

    async fn list_keys(&self, account: AccountId) -> Result<Vec<KeyRecord>> {
        let id = account.to_bytes().to_vec();
        self.in_tx(|tx| Box::pin(read_keys(tx, "account_id = $1", id.clone()))).await
    }

    async fn get_key(&self, key_id: KeyId) -> Result<KeyRecord> {
        let id = key_id.to_bytes().to_vec();
        let mut keys = self.in_tx(|tx| Box::pin(read_keys(tx, "id = $1", id.clone()))).await?;
        keys.pop().ok_or(LedgerError::UnknownKey(key_id))
    }
}
