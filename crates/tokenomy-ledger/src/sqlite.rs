//! SQLite store: one file in WAL mode, one writer thread, group commit.
//!
//! Every write is a job sent over a bounded channel to the single writer
//! thread (`sqlite_writer.rs`). The writer takes the first queued job, then
//! drains up to [`MAX_BATCH`] more without waiting, and runs them all inside ONE
//! `BEGIN IMMEDIATE … COMMIT`. Each job validates everything (leaf closure
//! included) before its first write, so a job that fails (insufficient funds,
//! conflict…) wrote nothing and the others commit; a job that fails after
//! writing (a storage error) rolls the whole batch back (see `write`). Replies
//! are sent only once the batch is durable, so no caller is told about a write
//! that is not; if the COMMIT fails, every job in the batch gets the error.
//! Concurrent settlements therefore share one fsync. The exceptions are holds,
//! voids and hold extensions, answered at their batch's COMMIT: losing one in a
//! power cut ends the same way as the recovery of a stopped node, which voids
//! every expired hold (`sqlite_writer::Ack::OnCommit`). Measured at 64 writers:
//! 1.25× settled charges/s (docs/benchmarks.md, session 12).
//!
//! Schema version 3 keeps `transfers` free of indexes whose entries scatter over their key
//! space: idempotency keys and per-account statement entries live in tables filled in bulk,
//! and `check` proves them exact. Since version 4 those tables are in a second file next to
//! the ledger (`<ledger>-index.<ext>`), derived data filled by a thread of its own
//! (`sqlite_index.rs`), so that the writer thread, the store's bottleneck, does not fill them.
//! Since version 5 the commit path fills no index that only `check` needed: one settlement
//! per hold and one log entry per posting follow from derived keys and `transfers.log_index`,
//! and `check` proves both by joins (see `migrate_v5`). Since version 6 `transfers.id` has
//! no index either: ids are looked up like keys, in the writer's tail or the index file's
//! `transfer_ids` (`migrate_v6`).
//!
//! Durability ([`Durability`]): the default, `Full`, answers a batch only after
//! an fsync of the WAL that began after its COMMIT (run by a syncer thread, so
//! the writer goes on with the next batch meanwhile): a crash or power loss
//! loses no acknowledged write. `Durability::Normal` answers right after the
//! COMMIT: the database always stays consistent and survives a process crash,
//! but an OS crash or power loss may lose the last acknowledged batches. Reads
//! use a separate connection, which in WAL mode never blocks the writer; they may
//! see a committed batch before its fsync returns, except the log, which is read
//! only up to its last durable entry (the node signs checkpoints over it).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::sync::{mpsc, oneshot};

use crate::domain::*;
pub use crate::sqlite_index::{index_path, INDEX_FLUSH_ROWS};
use crate::sqlite_keys::KeyFilters;
use crate::sqlite_raw::Val;
use crate::sqlite_writer::{checkpoint_loop, open_wal, sync_loop, writer_loop, Ack, Acks, Finish, Job, Shared, SyncWal, WriteConn, Writer};
use crate::{hold_request, posted_request, run_leaf, settle_precheck, settle_request, Leaf, LedgerStore};

/// Most jobs committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Depth of the writer's queue; senders wait (backpressure) when it is full.
pub const CHANNEL_CAPACITY: usize = 8192;
/// Committed batches waiting for the syncer's fsync; the writer waits when it is full.
pub const SYNC_QUEUE_BATCHES: usize = 64;
/// WAL size (pages) past which the writer itself checkpoints (a backstop: the checkpointer
/// thread normally keeps it far smaller); also the size the WAL file is truncated back to.
pub const WAL_BACKSTOP_PAGES: u64 = 16_384;
/// Least time between two WAL checkpoints.
pub const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);
/// Most holds one `expire_holds` call voids (call again if it returns this many).
pub const MAX_EXPIRE_PER_CALL: u64 = 10_000;

const SCHEMA: &str = include_str!("sql/sqlite_schema.sql");
macro_rules! transfer_cols {
    () => {
        "id, idempotency_key, debit_account, credit_account, amount_micros, code, state, \
         hold, timeout_ms, expires_at_ms, created_at_ms, pending_id, key_id"
    };
}
const TRANSFER_COLS: &str = transfer_cols!();
macro_rules! key_cols {
    () => {
        "id, account_id, key_hash, scopes, rpm, tpm, spend_cap_day_micros, created_at_ms, \
         revoked_at_ms, spend_cap_month_micros, pending_micros, spend_day, spend_day_micros, spend_month, spend_month_micros"
    };
}
pub(crate) const KEY_COLS: &str = key_cols!();
/// Columns added to tables an older file already has: by schema version 2 (all but the
/// last) and version 5 (`transfers.log_index`).
const ADDED_COLUMNS: [(&str, &str, &str); 8] = [
    ("transfers", "key_id", "BLOB"),
    ("api_keys", "spend_cap_month_micros", "INTEGER"),
    ("api_keys", "pending_micros", "INTEGER NOT NULL DEFAULT 0 CHECK (pending_micros >= 0)"),
    ("api_keys", "spend_day", "INTEGER NOT NULL DEFAULT 0"),
    ("api_keys", "spend_day_micros", "INTEGER NOT NULL DEFAULT 0"),
    ("api_keys", "spend_month", "INTEGER NOT NULL DEFAULT 0"),
    ("api_keys", "spend_month_micros", "INTEGER NOT NULL DEFAULT 0"),
    ("transfers", "log_index", "INTEGER"),
];

/// Cheap to clone; all clones share the writer thread and read connection.
#[derive(Clone)]
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    reader: Arc<Mutex<Connection>>,
    shared: Arc<Shared>,
}

pub(crate) fn db_err(e: rusqlite::Error) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// How hard a commit tries to reach the disk (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// A batch is answered after an fsync of the WAL that began after its COMMIT (one per
    /// batch, on the syncer thread). Survives power loss.
    #[default]
    Full,
    /// `synchronous=NORMAL` in WAL: survives process crashes, not power loss.
    Normal,
}

impl SqliteStore {
    /// Opens (creating if needed) the ledger file with [`Durability::Full`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, Durability::Full)
    }

    /// Opens the ledger file and starts the writer thread.
    pub fn open_with(path: impl AsRef<Path>, durability: Durability) -> Result<Self> {
        Self::open_syncing(path, durability, Box::new(|wal| wal.sync_data()))
    }

    /// [`open_with`](Self::open_with), with the syncer's fsync of the WAL given.
    pub(crate) fn open_syncing(path: impl AsRef<Path>, durability: Durability, sync: SyncWal) -> Result<Self> {
        Self::open_tuned(path, durability, sync, crate::sqlite_keys::KEY_FILTER_KEYS_MIN)
    }

    /// [`open_syncing`](Self::open_syncing), with the fewest keys a key filter is sized for.
    pub(crate) fn open_tuned(path: impl AsRef<Path>, durability: Durability, sync: SyncWal, key_filter_keys_min: u64) -> Result<Self> {
        let writer = open_conn(path.as_ref())?;
        writer.execute_batch(SCHEMA).map_err(db_err)?;
        migrate(&writer)?;
        create_system_accounts(&writer)?;
        // Copying the WAL back into the database (and its fsync) runs on the checkpointer
        // thread, off the commit path; the writer only checkpoints as a backstop, when the
        // WAL passes `WAL_BACKSTOP_PAGES` (see `checkpoint_loop`).
        // Its commits never fsync either (`synchronous=NORMAL`): with `Durability::Full` the
        // syncer thread fsyncs the WAL after each commit and only then answers the batch.
        writer
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}; PRAGMA journal_size_limit={}; PRAGMA synchronous=NORMAL",
                WAL_BACKSTOP_PAGES * 4096
            ))
            .map_err(db_err)?;
        // Whatever an earlier run left in the WAL is on disk before anything is built on it.
        let wal = open_wal(&writer)?;
        wal.0.sync_data().map_err(|e| LedgerError::Storage(format!("fsync of {}: {e}", wal.1.display())))?;
        // The bulk index file: checked against the ledger, brought up to date (see sqlite_index.rs).
        let indexer = crate::sqlite_index::open(path.as_ref())?;
        let shared = Shared::new(next_log_index(&writer)?, crate::sqlite_index::indexed_upto(&indexer)?);
        let reader = open_conn(path.as_ref())?;
        reader.execute("ATTACH DATABASE ?1 AS ix", [index_path(path.as_ref()).display().to_string()]).map_err(db_err)?;
        let index_reader = Connection::open(index_path(path.as_ref())).map_err(db_err)?;
        index_reader.execute_batch("PRAGMA busy_timeout=10000;").map_err(db_err)?;
        let checkpointer = open_conn(path.as_ref())?;
        let (committed, commits) = std::sync::mpsc::sync_channel(1);
        let (to_index, index_nudges) = std::sync::mpsc::sync_channel(1);
        let (jobs, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(f).map(|_| ()).map_err(|e| LedgerError::Storage(e.to_string()))
        };
        let sh = shared.clone();
        spawn("ledger-sqlite-checkpoint", Box::new(move || checkpoint_loop(checkpointer, commits, CHECKPOINT_INTERVAL, &sh)))?;
        let sh = shared.clone();
        spawn("ledger-sqlite-index", Box::new(move || crate::sqlite_index::index_loop(indexer, index_nudges, &sh)))?;
        let acks = match durability {
            Durability::Normal => Acks::Now,
            Durability::Full => {
                let (to_syncer, batches) = std::sync::mpsc::sync_channel(SYNC_QUEUE_BATCHES);
                let sh = shared.clone();
                spawn("ledger-sqlite-sync", Box::new(move || sync_loop(wal, sync, batches, &sh)))?;
                Acks::AfterSync(to_syncer)
            }
        };
        let keys = KeyFilters::new(path.as_ref().to_path_buf(), key_filter_keys_min);
        let sh = shared.clone();
        // The writer's connection is wrapped on its own thread: its prepared statements stay there.
        spawn(
            "ledger-sqlite-writer",
            Box::new(move || {
                let conn = WriteConn::new(writer, index_reader, sh.clone(), keys);
                writer_loop(Writer { conn, committed, to_index, acks, shared: sh }, rx)
            }),
        )?;
        Ok(SqliteStore { jobs, reader: Arc::new(Mutex::new(reader)), shared })
    }

    /// Whether the writer's idempotency-key filter is built, so that a new key costs no
    /// lookup in the index file from the next batch on (`sqlite_keys.rs`). It is built in
    /// the background after the store opens and again as the ledger grows; until then
    /// every key is looked up.
    /// Whether the store stopped taking writes (a failed sync, checkpoint or index write):
    /// only a restart of the node brings it back.
    pub fn refuses_writes(&self) -> bool {
        self.shared.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn key_filter_ready(&self) -> bool {
        let created = self.shared.key_filters_created.load(std::sync::atomic::Ordering::SeqCst);
        created > 0 && self.shared.key_filters_built.load(std::sync::atomic::Ordering::SeqCst) == created
    }

    fn durable_log_next(&self) -> u64 {
        self.shared.durable_log_next.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs `f` on the writer thread inside the next group-commit batch.
    ///
    /// Jobs run without a per-job SAVEPOINT (the statement journal a
    /// savepoint needs cost about a sixth of the writer's time): every
    /// operation validates everything, leaf closure included, before its first
    /// write, so a failing job normally wrote nothing. As a safety net the
    /// writer compares `total_changes()` around each job: a job that fails
    /// after writing poisons the batch, which is then rolled back whole and
    /// every job in it gets an error (nothing of it is committed).
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteConn) -> Result<T> + Send + 'static,
    {
        self.write_acked(Ack::Durable, f).await
    }

    /// [`write`](Self::write) for an operation whose caller may be answered once its batch
    /// is committed, before the fsync (see [`Ack::OnCommit`]).
    async fn write_on_commit<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteConn) -> Result<T> + Send + 'static,
    {
        self.write_acked(Ack::OnCommit, f).await
    }

    async fn write_acked<T, F>(&self, ack: Ack, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteConn) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let run = Box::new(move |conn: Option<&WriteConn>| {
            let (result, dirty) = match conn {
                Some(conn) => {
                    let before = conn.changes();
                    let result = f(conn);
                    let dirty = result.is_err() && conn.changes() != before;
                    (result, dirty)
                }
                // Not run: the batch's error is the answer.
                None => (Err(LedgerError::Closed), false),
            };
            let finish: Finish = Box::new(move |commit_err| {
                let _ = tx.send(match commit_err {
                    Some(e) => Err(e.clone()),
                    None => result,
                });
            });
            (finish, dirty)
        });
        let job = Job { run, ack };
        self.jobs.send(job).await.map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Runs `f` on the read connection in a blocking task, inside one read transaction.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = reader.lock().map_err(|_| LedgerError::Storage("reader poisoned".into()))?;
            let tx = conn.transaction().map_err(db_err)?;
            let out = f(&tx)?;
            tx.finish().map_err(db_err)?;
            Ok(out)
        })
        .await
        .map_err(|e| LedgerError::Storage(e.to_string()))?
    }
}

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=10000; PRAGMA cache_size=-65536; \
         PRAGMA temp_store=MEMORY;",
    )
    .map_err(db_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// This build's schema version; a file of a later one is refused.
pub const SCHEMA_VERSION: i64 = 6;

/// Brings an older file to version 6, atomically: a version-1 file gets the version-2
/// columns; a version-2 file's `transfers` is rebuilt without its two scattered indexes
/// (the unique idempotency key and account + seq); a version-3 file's bulk index tables
/// (`transfer_keys`, `account_transfers`, `index_head`) are dropped (their entries are
/// rebuilt in the index file, `sqlite_index.rs`, when the store opens); a version-4 file
/// loses the two indexes the commit path filled for `check` alone (see [`migrate_v5`]); a
/// version-5 file's `transfers` is rebuilt without its index on `id` (see [`migrate_v6`]).
fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(db_err)?;
    let result = (|| {
        let version: i64 = conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0)).map_err(db_err)?;
        if version > SCHEMA_VERSION {
            return Err(LedgerError::Storage(format!(
                "ledger file has schema version {version}, newer than this tokenomy's {SCHEMA_VERSION}"
            )));
        }
        for (table, column, decl) in ADDED_COLUMNS {
            let has: bool = conn
                .query_row(&format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"), [column], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n > 0)
                .map_err(db_err)?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}")).map_err(db_err)?;
            }
        }
        if has_unique_index(conn, "transfers", "idempotency_key")? {
            migrate_v3(conn)?;
        }
        conn.execute_batch("DROP TABLE IF EXISTS transfer_keys; DROP TABLE IF EXISTS account_transfers; DROP TABLE IF EXISTS index_head;")
            .map_err(db_err)?;
        migrate_v5(conn)?;
        migrate_v6(conn)?;
        conn.execute_batch(&format!("UPDATE schema_version SET version = {SCHEMA_VERSION}")).map_err(db_err)
    })();
    conn.execute_batch(if result.is_ok() { "COMMIT" } else { "ROLLBACK" }).map_err(db_err)?;
    result
}

/// Whether `table` has an inline `UNIQUE` on `column` (as older versions' `transfers` had on
/// the idempotency key and the id, and `log_entries` on the transfer id).
fn has_unique_index(conn: &Connection, table: &str, column: &str) -> Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) FROM pragma_index_list(?1) l, pragma_index_info(l.name) i WHERE l.origin = 'u' AND i.name = ?2",
        [table, column],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(db_err)
}

fn migrate_v3(conn: &Connection) -> Result<()> {
    let cols = format!("seq, {TRANSFER_COLS}");
    conn.execute_batch(&format!(
        "DROP INDEX IF EXISTS transfers_debit; DROP INDEX IF EXISTS transfers_credit; \
         DROP INDEX IF EXISTS transfers_pending; DROP INDEX IF EXISTS transfers_settlement; \
         ALTER TABLE transfers RENAME TO transfers_v2; \
         {SCHEMA} \
         INSERT INTO transfers ({cols}) SELECT {cols} FROM transfers_v2; \
         DROP TABLE transfers_v2;"
    ))
    .map_err(db_err)
}

/// Version 5: `transfers.log_index` (added with [`ADDED_COLUMNS`]) names each receipted
/// posting's log entry (filled here from the log), and the commit path fills two indexes fewer: `log_entries.transfer_id`
/// is no longer UNIQUE (the table is rebuilt, its triggers with it) and
/// `transfers_settlement` is dropped. Both rules they stated are proven by `check` instead
/// (`SETTLEMENTS_SQL`, `LOG_PAIRS_SQL`). Measured at 64 writers: docs/benchmarks.md,
/// session 13.
fn migrate_v5(conn: &Connection) -> Result<()> {
    if has_unique_index(conn, "log_entries", "transfer_id")? {
        conn.execute_batch(&format!(
            "UPDATE transfers SET log_index = l.log_index FROM log_entries l WHERE l.transfer_id = transfers.id; \
             DROP TRIGGER IF EXISTS log_entries_no_update; DROP TRIGGER IF EXISTS log_entries_no_delete; \
             ALTER TABLE log_entries RENAME TO log_entries_v4; \
             {SCHEMA} \
             INSERT INTO log_entries (log_index, transfer_id, account_id, leaf_bytes) \
                 SELECT log_index, transfer_id, account_id, leaf_bytes FROM log_entries_v4; \
             DROP TABLE log_entries_v4;"
        ))
        .map_err(db_err)?;
    }
    conn.execute_batch("DROP INDEX IF EXISTS transfers_settlement").map_err(db_err)
}

/// Version 6: `transfers.id` loses its UNIQUE index (an entry per transfer on the commit
/// path); the ids are indexed in bulk in the index file (`transfer_ids`, rebuilt there when
/// the store opens), which also proves them unique. The table is rebuilt, its rows copied.
fn migrate_v6(conn: &Connection) -> Result<()> {
    if !has_unique_index(conn, "transfers", "id")? {
        return Ok(());
    }
    let cols = format!("seq, {TRANSFER_COLS}, log_index");
    conn.execute_batch(&format!(
        "DROP INDEX IF EXISTS transfers_pending; ALTER TABLE transfers RENAME TO transfers_v5; {SCHEMA} \
         INSERT INTO transfers ({cols}) SELECT {cols} FROM transfers_v5; DROP TABLE transfers_v5;"
    ))
    .map_err(db_err)
}

fn create_system_accounts(conn: &Connection) -> Result<()> {
    let now = crate::now_ms();
    for (id, name, kind) in [
        (TREASURY, TREASURY_NAME, AccountKind::Treasury),
        (OPERATOR_REVENUE, OPERATOR_REVENUE_NAME, AccountKind::OperatorRevenue),
    ] {
        conn.execute(
            "INSERT OR IGNORE INTO accounts (id, name, kind, balance_micros, pending_micros, created_at_ms) \
             VALUES (?1, ?2, ?3, 0, 0, ?4)",
            params![&id.to_bytes()[..], name, kind.as_i16(), now],
        )
        .map_err(db_err)?;
    }
    Ok(())
}

// ------------------------------------------------------------------ row codecs

fn id_col<T>(row: &Row, i: usize, make: fn(&[u8]) -> Option<T>) -> rusqlite::Result<T> {
    let bytes: Vec<u8> = row.get(i)?;
    make(&bytes).ok_or(rusqlite::Error::InvalidColumnType(i, "id".into(), rusqlite::types::Type::Blob))
}

fn enum_col<T>(row: &Row, i: usize, make: fn(i16) -> Option<T>) -> rusqlite::Result<T> {
    let n: i16 = row.get(i)?;
    make(n).ok_or(rusqlite::Error::IntegralValueOutOfRange(i, n as i64))
}

fn row_account(row: &Row) -> rusqlite::Result<Account> {
    Ok(Account {
        id: id_col(row, 0, AccountId::from_slice)?,
        name: row.get(1)?,
        kind: enum_col(row, 2, AccountKind::from_i16)?,
        balance_micros: row.get(3)?,
        pending_micros: row.get(4)?,
        created_at_ms: row.get(5)?,
    })
}

fn row_transfer(row: &Row) -> rusqlite::Result<Transfer> {
    row_transfer_at(row, 0)
}

/// Decodes `TRANSFER_COLS` starting at column `o`.
fn row_transfer_at(row: &Row, o: usize) -> rusqlite::Result<Transfer> {
    let pending: Option<Vec<u8>> = row.get(o + 11)?;
    let key: Option<Vec<u8>> = row.get(o + 12)?;
    Ok(Transfer {
        id: id_col(row, o, TransferId::from_slice)?,
        idempotency_key: row.get(o + 1)?,
        debit_account: id_col(row, o + 2, AccountId::from_slice)?,
        credit_account: id_col(row, o + 3, AccountId::from_slice)?,
        amount_micros: row.get(o + 4)?,
        code: enum_col(row, o + 5, TransferCode::from_i16)?,
        state: enum_col(row, o + 6, TransferState::from_i16)?,
        hold: row.get(o + 7)?,
        timeout_ms: row.get(o + 8)?,
        expires_at_ms: row.get(o + 9)?,
        created_at_ms: row.get(o + 10)?,
        pending_id: pending.as_deref().and_then(TransferId::from_slice),
        key_id: key.as_deref().and_then(KeyId::from_slice),
    })
}

fn row_key(row: &Row) -> rusqlite::Result<KeyRecord> {
    let hash: Vec<u8> = row.get(2)?;
    let scopes: String = row.get(3)?;
    Ok(KeyRecord {
        id: id_col(row, 0, KeyId::from_slice)?,
        account: id_col(row, 1, AccountId::from_slice)?,
        key_hash: hash.try_into().map_err(|_| rusqlite::Error::IntegralValueOutOfRange(2, 0))?,
        scopes: scopes.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        rpm: row.get(4)?,
        tpm: row.get(5)?,
        caps: SpendCaps { day_micros: row.get(6)?, month_micros: row.get(9)? },
        created_at_ms: row.get(7)?,
        revoked_at_ms: row.get(8)?,
        spend: KeySpend {
            pending_micros: row.get(10)?,
            day: row.get(11)?,
            day_micros: row.get(12)?,
            month: row.get(13)?,
            month_micros: row.get(14)?,
        },
    })
}

// ------------------------------------------------------------------ row access

pub(crate) fn load_account(c: &Connection, id: AccountId) -> Result<Account> {
    c.prepare_cached("SELECT id, name, kind, balance_micros, pending_micros, created_at_ms FROM accounts WHERE id = ?1")
        .and_then(|mut s| s.query_row([&id.to_bytes()[..]], row_account).optional())
        .map_err(db_err)?
        .ok_or(LedgerError::UnknownAccount(id))
}

pub(crate) fn store_account(c: &WriteConn, a: &Account) -> Result<()> {
    check_account(a)?;
    let id = a.id.to_bytes();
    let n = c.run("UPDATE accounts SET balance_micros = ?2, pending_micros = ?3 WHERE id = ?1", &[
        Val::Blob(&id),
        a.balance_micros.into(),
        a.pending_micros.into(),
    ])?;
    assert_eq!(n, 1, "account row vanished");
    Ok(())
}

/// The transfer holding `key` (writer only: the newest keys are in its memory).
fn transfer_by_key(c: &WriteConn, key: &str) -> Result<Option<Transfer>> {
    let Some(seq) = c.seq_of_key(key)? else { return Ok(None) };
    c.prepare_cached(concat!("SELECT ", transfer_cols!(), " FROM transfers WHERE seq = ?1"))
        .and_then(|mut s| s.query_row([seq], row_transfer))
        .map(Some)
        .map_err(db_err)
}

/// The transfer with id `id` and its seq, found through the writer's tail or the index file
/// (`transfers.id` has no index since schema version 6).
fn transfer_by_id(c: &WriteConn, id: TransferId) -> Result<(i64, Transfer)> {
    let seq = c.seq_of_id(id)?.ok_or(LedgerError::UnknownTransfer(id))?;
    Ok((seq, transfer_at(c, seq, id)?))
}

/// The transfer at rowid `seq`, which must have id `id`.
fn transfer_at(c: &Connection, seq: i64, id: TransferId) -> Result<Transfer> {
    let t = c
        .prepare_cached(concat!("SELECT ", transfer_cols!(), " FROM transfers WHERE seq = ?1"))
        .and_then(|mut s| s.query_row([seq], row_transfer))
        .map_err(db_err)?;
    if t.id != id {
        return Err(LedgerError::InvariantViolation(format!("transfer {seq} has id {}, not {id}", t.id)));
    }
    Ok(t)
}

/// Inserts a transfer, with the index of its log entry if it has one; `Ok(None)` when its
/// idempotency key is taken (nothing written), else its seq. A settlement's key is not
/// looked up: it is derived from its hold (`settle_key`), which was pending until this
/// batch ended it (`set_state` refuses a hold that is not), so it is free.
fn insert_transfer(c: &WriteConn, t: &Transfer, log_index: Option<u64>) -> Result<Option<i64>> {
    check_transfer(t).map_err(LedgerError::InvariantViolation)?;
    c.load_tail()?;
    if t.pending_id.is_none() && c.seq_of_key(&t.idempotency_key)?.is_some() {
        return Ok(None);
    }
    let sql = concat!("INSERT INTO transfers (", transfer_cols!(), ", log_index) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)");
    let (id, debit, credit) = (t.id.to_bytes(), t.debit_account.to_bytes(), t.credit_account.to_bytes());
    let pending = t.pending_id.map(|p| p.to_bytes());
    let key = t.key_id.map(|k| k.to_bytes());
    c.run(sql, &[
        Val::Blob(&id),
        Val::Text(&t.idempotency_key),
        Val::Blob(&debit),
        Val::Blob(&credit),
        t.amount_micros.into(),
        i64::from(t.code.as_i16()).into(),
        i64::from(t.state.as_i16()).into(),
        i64::from(t.hold).into(),
        t.timeout_ms.into(),
        t.expires_at_ms.into(),
        t.created_at_ms.into(),
        pending.as_ref().map(|p| &p[..]).into(),
        key.as_ref().map(|k| &k[..]).into(),
        log_index.map(|i| i as i64).into(),
    ])?;
    let seq = c.last_insert_rowid();
    c.inserted(seq, t)?;
    Ok(Some(seq))
}

/// Ends a pending hold, the transfer at rowid `seq`.
fn set_state(c: &WriteConn, t: &mut Transfer, seq: i64, state: TransferState) -> Result<()> {
    debug_assert_eq!(t.state, TransferState::Pending);
    let id = t.id.to_bytes();
    let n = c.run("UPDATE transfers SET state = ?2 WHERE seq = ?1 AND id = ?3 AND state = 0", &[
        seq.into(),
        i64::from(state.as_i16()).into(),
        Val::Blob(&id),
    ])?;
    if n != 1 {
        return Err(LedgerError::InvariantViolation(format!("hold {} was not pending", t.id)));
    }
    t.state = state;
    Ok(())
}

/// A hold and its rowid (when cached), from the writer's cache or the database.
fn hold_by_id(c: &WriteConn, id: TransferId) -> Result<(i64, Transfer)> {
    match c.take_hold(id) {
        Some(cached) => Ok(cached),
        None => transfer_by_id(c, id),
    }
}

/// A failed validation, unless the request is a retry of one already done.
fn replay_or(c: &WriteConn, req: &TransferRequest, e: LedgerError) -> Result<Transfer> {
    match transfer_by_key(c, &req.idempotency_key)? {
        Some(existing) => replay(req, existing),
        None => Err(e),
    }
}

/// The transfer holding `req`'s idempotency key (after an insert found it taken).
fn replay_existing(c: &WriteConn, req: &TransferRequest) -> Result<Transfer> {
    let existing = transfer_by_key(c, &req.idempotency_key)?
        .ok_or_else(|| LedgerError::Storage("idempotency key taken but not found".into()))?;
    replay(req, existing)
}

/// A key's caps and spend counters (the key must be live and belong to `account`
/// when given).
fn load_key_spend(c: &WriteConn, id: KeyId, account: Option<AccountId>) -> Result<(SpendCaps, KeySpend)> {
    let rec = c
        .hot(concat!("SELECT ", key_cols!(), " FROM api_keys WHERE id = ?1"), |s| s.query_row([&id.to_bytes()[..]], row_key).optional())?
        .ok_or(LedgerError::UnknownKey(id))?;
    if account.is_some_and(|a| a != rec.account || rec.revoked_at_ms.is_some()) {
        return Err(LedgerError::UnknownKey(id));
    }
    Ok((rec.caps, rec.spend))
}

fn store_key_spend(c: &WriteConn, id: KeyId, s: &KeySpend) -> Result<()> {
    assert!(s.pending_micros >= 0, "key pending below zero");
    let key = id.to_bytes();
    let n = c.run(
        "UPDATE api_keys SET pending_micros = ?2, spend_day = ?3, spend_day_micros = ?4, spend_month = ?5, \
         spend_month_micros = ?6 WHERE id = ?1",
        &[Val::Blob(&key), s.pending_micros.into(), s.day.into(), s.day_micros.into(), s.month.into(), s.month_micros.into()],
    )?;
    assert_eq!(n, 1, "key row vanished");
    Ok(())
}

/// The next log index (the log is append-only and dense, so MAX + 1).
fn next_log_index(c: &Connection) -> Result<u64> {
    let next: i64 = c
        .prepare_cached("SELECT COALESCE(MAX(log_index) + 1, 0) FROM log_entries")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db_err)?;
    Ok(next as u64)
}

/// Computes a leaf (index and bytes) before any write of its operation, so a
/// failing closure leaves nothing behind.
fn prepare_leaf(c: &WriteConn, leaf: &Option<Leaf>, t: &Transfer) -> Result<Option<(u64, Vec<u8>)>> {
    match leaf {
        Some(leaf) => {
            let index = c.next_log_index(next_log_index)?;
            Ok(Some((index, run_leaf(leaf, index, t)?)))
        }
        None => Ok(None),
    }
}

fn insert_log(c: &WriteConn, index: u64, bytes: &[u8], t: &Transfer) -> Result<u64> {
    let (id, account) = (t.id.to_bytes(), log_account(t).to_bytes());
    c.run("INSERT INTO log_entries (log_index, transfer_id, account_id, leaf_bytes) VALUES (?1,?2,?3,?4)", &[
        (index as i64).into(),
        Val::Blob(&id),
        Val::Blob(&account),
        Val::Blob(bytes),
    ])?;
    c.appended_log(index);
    Ok(index)
}

/// The customer-side account a log entry is filed under.
pub(crate) fn log_account(t: &Transfer) -> AccountId {
    if matches!(t.code, TransferCode::Mint | TransferCode::Refund) {
        t.credit_account
    } else {
        t.debit_account
    }
}

fn log_index_of(c: &WriteConn, id: TransferId) -> Result<Option<u64>> {
    let Some(seq) = c.seq_of_id(id)? else { return Ok(None) };
    c.prepare_cached("SELECT log_index FROM transfers WHERE seq = ?1 AND id = ?2")
        .and_then(|mut s| s.query_row(params![seq, &id.to_bytes()[..]], |r| r.get::<_, Option<i64>>(0)).optional())
        .map(|o| o.flatten().map(|i| i as u64))
        .map_err(db_err)
}

// ------------------------------------------------------------------ operations

fn replay(req: &TransferRequest, existing: Transfer) -> Result<Transfer> {
    if req.replays(&existing) {
        Ok(existing)
    } else {
        Err(LedgerError::IdempotencyConflict { key: req.idempotency_key.clone() })
    }
}

// Every operation validates (from the writer's cache) before its first write. The
// idempotency key is checked by `insert_transfer` just before the transfer's INSERT, the
// first write: a retry finds the key taken, writes nothing and replays. A retry that
// fails validation (the first attempt spent the funds) is looked up the same way.

fn op_posted(c: &WriteConn, req: TransferRequest, leaf: Option<Leaf>, now: i64) -> Result<Transfer> {
    // A retry must not run the leaf closure again (it could fail where the first run
    // succeeded): with a leaf (receipted mints and transfers, rare), look the key up first.
    if leaf.is_some() {
        if let Some(existing) = transfer_by_key(c, &req.idempotency_key)? {
            return replay(&req, existing);
        }
    }
    let checked = (|| {
        let mut debit = c.account(req.debit_account)?;
        let mut credit = c.account(req.credit_account)?;
        check_roles(&debit, &credit, req.code)?;
        apply_posted(&mut debit, &mut credit, req.amount_micros)?;
        Ok((debit, credit))
    })();
    let (debit, credit) = match checked {
        Ok(accounts) => accounts,
        Err(e) => return replay_or(c, &req, e),
    };
    let t = req.clone().into_transfer(now, None);
    check_transfer(&t).map_err(LedgerError::InvariantViolation)?;
    let log = prepare_leaf(c, &leaf, &t)?;
    if insert_transfer(c, &t, log.as_ref().map(|(index, _)| *index))?.is_none() {
        return replay_existing(c, &req);
    }
    c.stage_account(debit)?;
    c.stage_account(credit)?;
    if let Some((index, bytes)) = &log {
        insert_log(c, *index, bytes, &t)?;
    }
    Ok(t)
}

fn op_hold(c: &WriteConn, req: TransferRequest, now: i64) -> Result<Transfer> {
    let checked = (|| {
        let mut debit = c.account(req.debit_account)?;
        let credit = c.account(req.credit_account)?;
        check_roles(&debit, &credit, req.code)?;
        apply_hold(&mut debit, req.amount_micros)?;
        let key = match req.key_id {
            Some(id) => {
                let (caps, mut spend) = load_key_spend(c, id, Some(req.debit_account))?;
                spend.apply_hold(caps, req.amount_micros, now)?;
                Some((id, spend))
            }
            None => None,
        };
        Ok((debit, key))
    })();
    let (debit, key) = match checked {
        Ok(checked) => checked,
        Err(e) => return replay_or(c, &req, e),
    };
    let t = req.clone().into_transfer(now, None);
    let Some(seq) = insert_transfer(c, &t, None)? else {
        return replay_existing(c, &req);
    };
    c.remember_hold(seq, &t);
    c.stage_account(debit)?;
    if let Some((id, spend)) = &key {
        store_key_spend(c, *id, spend)?;
    }
    Ok(t)
}

fn op_settle(c: &WriteConn, hold_id: TransferId, amount: i64, now: i64, leaf: Option<Leaf>) -> Result<Settled> {
    let (seq, mut hold) = hold_by_id(c, hold_id)?;
    let prior = match hold.state {
        TransferState::Posted => transfer_by_key(c, &settle_key(hold.id))?,
        _ => None,
    };
    if settle_precheck(&hold, amount, now, prior.as_ref().map(|t| t.amount_micros))?.is_some() {
        let log_index = match &prior {
            Some(p) => log_index_of(c, p.id)?,
            None => None,
        };
        let released_micros = hold.amount_micros - amount;
        return Ok(Settled { hold, posted: prior, released_micros, log_index });
    }
    let mut debit = c.account(hold.debit_account)?;
    let mut credit = c.account(hold.credit_account)?;
    apply_settle(&mut debit, &mut credit, hold.amount_micros, amount)?;
    check_account(&debit)?;
    check_account(&credit)?;
    let key = match hold.key_id {
        Some(id) => {
            let (_, mut spend) = load_key_spend(c, id, None)?;
            spend.apply_settle(hold.amount_micros, amount, now)?;
            Some((id, spend))
        }
        None => None,
    };
    let state = if amount > 0 { TransferState::Posted } else { TransferState::Voided };
    let released_micros = hold.amount_micros - amount;
    // Everything that can fail is computed before the first write.
    let posted = (amount > 0).then(|| settle_request(&hold, amount).into_transfer(now, Some(hold.id)));
    let log = match &posted {
        Some(p) => {
            check_transfer(p).map_err(LedgerError::InvariantViolation)?;
            prepare_leaf(c, &leaf, p)?
        }
        None => None,
    };
    set_state(c, &mut hold, seq, state)?;
    c.stage_account(debit)?;
    c.stage_account(credit)?;
    if let Some((id, spend)) = &key {
        store_key_spend(c, *id, spend)?;
    }
    let log_index = match &posted {
        Some(p) => {
            // The hold was pending, so its settlement's key is free.
            if insert_transfer(c, p, log.as_ref().map(|(index, _)| *index))?.is_none() {
                return Err(LedgerError::InvariantViolation(format!("settlement of {} already exists", hold.id)));
            }
            match &log {
                Some((index, bytes)) => Some(insert_log(c, *index, bytes, p)?),
                None => None,
            }
        }
        None => None,
    };
    Ok(Settled { hold, posted, released_micros, log_index })
}

fn op_void(c: &WriteConn, hold_id: TransferId) -> Result<Transfer> {
    void_hold(c, hold_by_id(c, hold_id)?)
}

/// Voids `hold`, the transfer at rowid `seq` (or answers a retry of an earlier void).
fn void_hold(c: &WriteConn, (seq, mut hold): (i64, Transfer)) -> Result<Transfer> {
    match (hold.hold, hold.state) {
        (true, TransferState::Voided) => return Ok(hold),
        (true, TransferState::Pending) => {}
        (_, state) => return Err(LedgerError::NotPending { id: hold.id, state }),
    }
    let mut debit = c.account(hold.debit_account)?;
    apply_void(&mut debit, hold.amount_micros)?;
    let key = match hold.key_id {
        Some(id) => {
            let (_, mut spend) = load_key_spend(c, id, None)?;
            spend.apply_void(hold.amount_micros)?;
            Some((id, spend))
        }
        None => None,
    };
    set_state(c, &mut hold, seq, TransferState::Voided)?;
    c.stage_account(debit)?;
    if let Some((id, spend)) = &key {
        store_key_spend(c, *id, spend)?;
    }
    Ok(hold)
}

fn op_expire(c: &WriteConn, now: i64) -> Result<u64> {
    let holds: Vec<(i64, Vec<u8>)> = c
        .prepare_cached(
            "SELECT seq, id FROM transfers WHERE hold = 1 AND state = 0 AND expires_at_ms <= ?1 \
             ORDER BY expires_at_ms LIMIT ?2",
        )
        .and_then(|mut s| s.query_map(params![now, MAX_EXPIRE_PER_CALL as i64], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(db_err)?;
    for (seq, id) in &holds {
        let id = TransferId::from_slice(id).ok_or_else(|| LedgerError::Storage("bad transfer id".into()))?;
        let hold = match c.take_hold(id) {
            Some(cached) => cached,
            None => (*seq, transfer_at(c, *seq, id)?),
        };
        void_hold(c, hold)?;
    }
    Ok(holds.len() as u64)
}

fn op_create_account(c: &Connection, name: String, kind: AccountKind, now: i64) -> Result<Account> {
    let taken = c.prepare_cached("SELECT 1 FROM accounts WHERE name = ?1 LIMIT 1").and_then(|mut s| s.exists([&name])).map_err(db_err)?;
    if taken {
        return Err(LedgerError::NameTaken(name));
    }
    let a = Account { id: AccountId::generate(now), name, kind, balance_micros: 0, pending_micros: 0, created_at_ms: now };
    c.prepare_cached(
        "INSERT INTO accounts (id, name, kind, balance_micros, pending_micros, created_at_ms) VALUES (?1,?2,?3,0,0,?4)",
    )
    .and_then(|mut s| s.execute(params![&a.id.to_bytes()[..], a.name, a.kind.as_i16(), now]))
    .map_err(db_err)?;
    Ok(a)
}

fn op_create_key(c: &Connection, rec: KeyRecord) -> Result<KeyId> {
    load_account(c, rec.account)?;
    let sql = format!("INSERT INTO api_keys ({KEY_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,NULL,?9,0,0,0,0,0)");
    c.prepare_cached(&sql)
        .and_then(|mut s| {
            s.execute(params![
                &rec.id.to_bytes()[..],
                &rec.account.to_bytes()[..],
                &rec.key_hash[..],
                rec.scopes.join(","),
                rec.rpm,
                rec.tpm,
                rec.caps.day_micros,
                rec.created_at_ms,
                rec.caps.month_micros,
            ])
        })
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => LedgerError::InvalidArgument("key hash exists".into()),
            _ => db_err(e),
        })?;
    Ok(rec.id)
}

fn op_revoke_key(c: &Connection, id: KeyId, now: i64) -> Result<()> {
    let n = c
        .prepare_cached("UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE id = ?1")
        .and_then(|mut s| s.execute(params![&id.to_bytes()[..], now]))
        .map_err(db_err)?;
    if n == 0 {
        return Err(LedgerError::UnknownKey(id));
    }
    Ok(())
}

fn op_set_key_limits(c: &Connection, id: KeyId, ch: KeyLimitsChange) -> Result<KeyRecord> {
    let n = c
        .prepare_cached(
            "UPDATE api_keys SET rpm = CASE WHEN ?2 THEN ?3 ELSE rpm END, tpm = CASE WHEN ?4 THEN ?5 ELSE tpm END, \
             spend_cap_day_micros = CASE WHEN ?6 THEN ?7 ELSE spend_cap_day_micros END, \
             spend_cap_month_micros = CASE WHEN ?8 THEN ?9 ELSE spend_cap_month_micros END WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.execute(params![
                &id.to_bytes()[..],
                ch.rpm.is_some(),
                ch.rpm.flatten(),
                ch.tpm.is_some(),
                ch.tpm.flatten(),
                ch.day_micros.is_some(),
                ch.day_micros.flatten(),
                ch.month_micros.is_some(),
                ch.month_micros.flatten()
            ])
        })
        .map_err(db_err)?;
    if n == 0 {
        return Err(LedgerError::UnknownKey(id));
    }
    read_keys(c, "id = ?1", &id.to_bytes())?.pop().ok_or(LedgerError::UnknownKey(id))
}

// ------------------------------------------------------------------ reads

/// The index file's head (attached to the reader as `ix`).
fn indexed_upto(c: &Connection) -> Result<i64> {
    c.prepare_cached("SELECT indexed_upto FROM ix.index_head").and_then(|mut s| s.query_row([], |r| r.get(0))).map_err(db_err)
}

/// A page of `account`'s transfers: from the index file's `account_transfers` up to its head, then
/// from the (bounded) tail of `transfers` past it, in one read transaction.
fn read_statement(c: &Connection, account: AccountId, after: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
    let upto = indexed_upto(c)?;
    let after = after.unwrap_or(0) as i64;
    let id = &account.to_bytes()[..];
    let query = |sql: &str, n: usize, after: i64| -> Result<Vec<(i64, Transfer)>> {
        c.prepare_cached(sql)
            .and_then(|mut s| {
                s.query_map(params![id, after, n as i64], |r| Ok((r.get(0)?, row_transfer_at(r, 1)?)))?.collect()
            })
            .map_err(db_err)
    };
    let indexed = concat!(
        "SELECT t.seq, ", transfer_cols!(), " FROM ix.account_transfers a JOIN transfers t ON t.seq = a.seq \
         WHERE a.account = ?1 AND a.seq > ?2 ORDER BY a.seq LIMIT ?3"
    );
    let tail = concat!(
        "SELECT seq, ", transfer_cols!(), " FROM transfers WHERE seq > ?2 AND (debit_account = ?1 OR credit_account = ?1) \
         ORDER BY seq LIMIT ?3"
    );
    // One row past the page says whether there is a next one (a full last page has none).
    let want = limit as usize + 1;
    let mut rows = if after < upto { query(indexed, want, after)? } else { Vec::new() };
    if rows.len() < want {
        rows.extend(query(tail, want - rows.len(), after.max(upto))?);
    }
    Ok(page_of_rows(rows, limit))
}

/// A page of `account`'s transfers, newest first: from the tail of `transfers` past the index
/// file's head, then from the index file, in one read transaction.
fn read_statement_newest_first(c: &Connection, account: AccountId, before: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
    let upto = indexed_upto(c)?;
    let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let id = &account.to_bytes()[..];
    let query = |sql: &str, n: usize, before: i64| -> Result<Vec<(i64, Transfer)>> {
        c.prepare_cached(sql)
            .and_then(|mut s| {
                s.query_map(params![id, before, n as i64, upto], |r| Ok((r.get(0)?, row_transfer_at(r, 1)?)))?.collect()
            })
            .map_err(db_err)
    };
    let tail = concat!(
        "SELECT seq, ", transfer_cols!(), " FROM transfers WHERE seq < ?2 AND seq > ?4 AND (debit_account = ?1 OR credit_account = ?1) \
         ORDER BY seq DESC LIMIT ?3"
    );
    let indexed = concat!(
        "SELECT t.seq, ", transfer_cols!(), " FROM ix.account_transfers a JOIN transfers t ON t.seq = a.seq \
         WHERE a.account = ?1 AND a.seq < ?2 AND a.seq <= ?4 ORDER BY a.seq DESC LIMIT ?3"
    );
    let want = limit as usize + 1;
    let mut rows = if before > upto + 1 { query(tail, want, before)? } else { Vec::new() };
    if rows.len() < want {
        rows.extend(query(indexed, want - rows.len(), before)?);
    }
    Ok(page_of_rows(rows, limit))
}

/// Up to `limit + 1` rows of `(seq, transfer)` as a page of `limit`, whose cursor (the last
/// seq on it) is there only when the extra row says another page follows.
fn page_of_rows(mut rows: Vec<(i64, Transfer)>, limit: u32) -> Page<Transfer> {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = more.then(|| rows.last().map(|r| r.0 as u64)).flatten();
    Page { items: rows.into_iter().map(|r| r.1).collect(), next_cursor }
}

fn query_i128(c: &Connection, sql: &str) -> Result<i128> {
    c.prepare_cached(sql).and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0))).map(i128::from).map_err(db_err)
}

fn read_totals(c: &Connection) -> Result<HashMap<AccountId, AccountTotals>> {
    let mut totals: HashMap<AccountId, AccountTotals> = HashMap::new();
    let queries: [(&str, TotalsField); 4] = [
        ("SELECT debit_account, SUM(amount_micros) FROM transfers WHERE hold = 0 AND state = 1 GROUP BY 1", |t| {
            &mut t.posted_debits_micros
        }),
        ("SELECT credit_account, SUM(amount_micros) FROM transfers WHERE hold = 0 AND state = 1 GROUP BY 1", |t| {
            &mut t.posted_credits_micros
        }),
        ("SELECT debit_account, SUM(amount_micros) FROM transfers WHERE hold = 1 AND state = 0 GROUP BY 1", |t| {
            &mut t.pending_debits_micros
        }),
        ("SELECT debit_account, SUM(amount_micros) FROM transfers WHERE hold = 0 AND state = 1 AND code = 3 GROUP BY 1", |t| {
            &mut t.refund_debits_micros
        }),
    ];
    for (sql, field) in queries {
        let rows: Vec<(AccountId, i64)> = c
            .prepare_cached(sql)
            .and_then(|mut s| {
                s.query_map([], |r| Ok((id_col(r, 0, AccountId::from_slice)?, r.get(1)?)))?.collect()
            })
            .map_err(db_err)?;
        for (id, sum) in rows {
            *field(totals.entry(id).or_default()) += sum as i128;
        }
    }
    Ok(totals)
}

/// Degenerate transfers, and settlements whose idempotency key is not the one derived from
/// their hold (`settle_key`): with keys unique (`check_bulk_indexes`), that makes at most one
/// settlement per hold.
const BAD_TRANSFERS_SQL: &str = "SELECT COUNT(*) FROM transfers t WHERE t.amount_micros <= 0 \
    OR t.debit_account = t.credit_account OR (t.hold = 1) <> (t.timeout_ms > 0) \
    OR (t.pending_id IS NOT NULL AND t.idempotency_key <> '~post:' || lower(hex(t.pending_id)))";

/// Posted holds, settlements, and the settlements that settle a posted hold (a posted
/// non-hold transfer of at most the hold's amount). With at most one settlement per hold
/// (`BAD_TRANSFERS_SQL`), three equal counts mean every posted hold has exactly one, and
/// every settlement settles one. (`transfers.id` has no index: SQLite builds a transient
/// one for this join.)
const SETTLEMENTS_SQL: &str = "SELECT \
    (SELECT COUNT(*) FROM transfers WHERE hold = 1 AND state = 1), \
    (SELECT COUNT(*) FROM transfers WHERE pending_id IS NOT NULL), \
    (SELECT COUNT(*) FROM transfers p JOIN transfers t ON t.id = p.pending_id \
        WHERE t.hold = 1 AND t.state = 1 AND p.hold = 0 AND p.state = 1 AND p.amount_micros <= t.amount_micros)";

/// Transfers that break a settlement rule (see [`SETTLEMENTS_SQL`]): the posted holds and the
/// settlements that are not matched one to one.
fn unmatched_settlements(c: &Connection) -> Result<u64> {
    let [holds, settlements, matched]: [i64; 3] = c
        .prepare_cached(SETTLEMENTS_SQL)
        .and_then(|mut s| s.query_row([], |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?])))
        .map_err(db_err)?;
    Ok(holds.abs_diff(matched) + settlements.abs_diff(matched))
}

/// Counts that prove the bulk index tables exact (see `check_bulk_indexes`).
const INDEX_COUNTS_SQL: &str = "SELECT \
    (SELECT COUNT(*) FROM transfers WHERE seq <= ?1), \
    (SELECT COUNT(*) FROM ix.transfer_keys), \
    (SELECT COUNT(*) FROM ix.transfer_keys k JOIN transfers t ON t.seq = k.seq \
        WHERE t.idempotency_key = k.idempotency_key AND t.seq <= ?1), \
    (SELECT COUNT(*) FROM ix.account_transfers), \
    (SELECT COUNT(*) FROM ix.account_transfers a JOIN transfers t ON t.seq = a.seq \
        WHERE (a.account = t.debit_account OR a.account = t.credit_account) AND t.seq <= ?1), \
    (SELECT COUNT(*) - COUNT(DISTINCT idempotency_key) FROM transfers WHERE seq > ?1), \
    (SELECT COUNT(*) FROM transfers t WHERE t.seq > ?1 \
        AND EXISTS (SELECT 1 FROM ix.transfer_keys k WHERE k.idempotency_key = t.idempotency_key)), \
    (SELECT COUNT(*) FROM ix.transfer_ids), \
    (SELECT COUNT(*) FROM ix.transfer_ids i JOIN transfers t ON t.seq = i.seq WHERE t.id = i.id AND t.seq <= ?1), \
    (SELECT COUNT(*) - COUNT(DISTINCT id) FROM transfers WHERE seq > ?1), \
    (SELECT COUNT(*) FROM transfers t WHERE t.seq > ?1 AND EXISTS (SELECT 1 FROM ix.transfer_ids i WHERE i.id = t.id))";

/// The bulk index tables hold exactly the transfers up to `indexed_upto`: one key row, one id
/// row and two account rows each, pointing at it (the tables' primary keys make a match unique, so
/// equal counts mean nothing is missing or extra), and no idempotency key or transfer id is
/// used twice.
fn check_bulk_indexes(c: &Connection, report: &mut CheckReport) -> Result<()> {
    let upto = indexed_upto(c)?;
    let n: [i64; 11] = c
        .prepare_cached(INDEX_COUNTS_SQL)
        .and_then(|mut s| {
            s.query_row([upto], |r| {
                let mut n = [0; 11];
                for (i, v) in n.iter_mut().enumerate() {
                    *v = r.get(i)?;
                }
                Ok(n)
            })
        })
        .map_err(db_err)?;
    let [indexed, keys, keys_ok, sides, sides_ok, tail_dups, tail_taken, ids, ids_ok, tail_id_dups, tail_ids_taken] = n;
    if ids != indexed || ids_ok != indexed {
        report.problems.push(format!("transfer_ids has {ids} rows, {ids_ok} matching, for {indexed} transfers up to seq {upto}"));
    }
    if tail_id_dups + tail_ids_taken > 0 {
        report.problems.push(format!("{} transfer ids are used twice", tail_id_dups + tail_ids_taken));
    }
    if keys != indexed || keys_ok != indexed {
        report.problems.push(format!(
            "transfer_keys has {keys} rows, {keys_ok} matching, for {indexed} transfers up to seq {upto}"
        ));
    }
    if sides != 2 * indexed || sides_ok != 2 * indexed {
        report.problems.push(format!(
            "account_transfers has {sides} rows, {sides_ok} matching, for {indexed} transfers up to seq {upto}"
        ));
    }
    if tail_dups + tail_taken > 0 {
        report.problems.push(format!("{} idempotency keys are used twice", tail_dups + tail_taken));
    }
    report.ok = report.problems.is_empty();
    Ok(())
}

/// Log entries, transfers naming a log entry (`transfers.log_index`), and the pairs that
/// agree: a posted non-hold transfer and the entry at its `log_index`, which names it. A
/// transfer names one entry and an entry one transfer (ids are unique: `check_bulk_indexes`),
/// so three equal counts make entries and receipted postings one to one.
const LOG_PAIRS_SQL: &str = "SELECT (SELECT COUNT(*) FROM log_entries), \
    (SELECT COUNT(*) FROM transfers WHERE log_index IS NOT NULL), \
    (SELECT COUNT(*) FROM transfers t JOIN log_entries l ON l.log_index = t.log_index \
        WHERE t.log_index IS NOT NULL AND l.transfer_id = t.id AND t.hold = 0 AND t.state = 1)";

fn read_check(c: &Connection) -> Result<CheckReport> {
    // The index file first: its snapshot is then no newer than the ledger's, so it never holds
    // a transfer the ledger's snapshot lacks (`check_bulk_indexes` counts both).
    indexed_upto(c)?;
    let accounts: Vec<Account> = c
        .prepare_cached("SELECT id, name, kind, balance_micros, pending_micros, created_at_ms FROM accounts")
        .and_then(|mut s| s.query_map([], row_account)?.collect())
        .map_err(db_err)?;
    let totals = read_totals(c)?;
    let transfers = query_i128(c, "SELECT COUNT(*) FROM transfers")? as u64;
    let bad = query_i128(c, BAD_TRANSFERS_SQL)? as u64 + unmatched_settlements(c)?;
    let pending =
        query_i128(c, "SELECT COALESCE(SUM(amount_micros), 0) FROM transfers WHERE hold = 1 AND state = 0")?;
    let log = c
        .prepare_cached("SELECT COUNT(*), MIN(log_index), MAX(log_index) FROM log_entries")
        .and_then(|mut s| {
            s.query_row([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<i64>>(1)?.map(|v| v as u64), r.get::<_, Option<i64>>(2)?.map(|v| v as u64)))
            })
        })
        .map_err(db_err)?;
    let mut report = check_ledger(&accounts, &totals, transfers, bad, pending, log);
    let keys: Vec<(KeyId, i64)> = c
        .prepare_cached("SELECT id, pending_micros FROM api_keys")
        .and_then(|mut s| s.query_map([], |r| Ok((id_col(r, 0, KeyId::from_slice)?, r.get(1)?)))?.collect())
        .map_err(db_err)?;
    let holds: HashMap<KeyId, i128> = c
        .prepare_cached(
            "SELECT key_id, SUM(amount_micros) FROM transfers WHERE hold = 1 AND state = 0 AND key_id IS NOT NULL GROUP BY 1",
        )
        .and_then(|mut s| s.query_map([], |r| Ok((id_col(r, 0, KeyId::from_slice)?, r.get::<_, i64>(1)? as i128)))?.collect())
        .map_err(db_err)?;
    check_key_pending(&keys, &holds, &mut report);
    let [entries, naming, pairs]: [i64; 3] = c
        .prepare_cached(LOG_PAIRS_SQL)
        .and_then(|mut s| s.query_row([], |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?])))
        .map_err(db_err)?;
    check_log_postings(entries.abs_diff(pairs), &mut report);
    let unnamed = naming.abs_diff(pairs);
    if unnamed > 0 {
        report.problems.push(format!("{unnamed} transfers name a log entry that does not name them"));
        report.ok = false;
    }
    check_bulk_indexes(c, &mut report)?;
    Ok(report)
}

fn read_log(c: &Connection, from: u64, limit: u32) -> Result<Vec<LogEntry>> {
    c.prepare_cached(
        "SELECT log_index, transfer_id, account_id, leaf_bytes FROM log_entries \
         WHERE log_index >= ?1 ORDER BY log_index LIMIT ?2",
    )
    .and_then(|mut s| {
        s.query_map(params![from as i64, limit as i64], |r| {
            Ok(LogEntry {
                log_index: r.get::<_, i64>(0)? as u64,
                transfer_id: id_col(r, 1, TransferId::from_slice)?,
                account_id: id_col(r, 2, AccountId::from_slice)?,
                leaf_bytes: r.get(3)?,
            })
        })?
        .collect()
    })
    .map_err(db_err)
}

fn read_keys(c: &Connection, sql_where: &str, arg: &[u8]) -> Result<Vec<KeyRecord>> {
    let sql = format!("SELECT {KEY_COLS} FROM api_keys WHERE {sql_where} ORDER BY created_at_ms, id");
    c.prepare_cached(&sql).and_then(|mut s| s.query_map([arg], row_key)?.collect()).map_err(db_err)
}

// ------------------------------------------------------------------ trait

impl LedgerStore for SqliteStore {
    async fn create_account(&self, name: &str, kind: AccountKind) -> Result<Account> {
        validate_name(name)?;
        validate_new_account_kind(kind)?;
        let (name, now) = (name.to_owned(), crate::now_ms());
        self.write(move |c| op_create_account(c, name, kind, now)).await
    }

    async fn get_account(&self, id: AccountId) -> Result<Account> {
        self.read(move |c| load_account(c, id)).await
    }

    async fn list_accounts(&self, after: Option<AccountId>, limit: u32) -> Result<Vec<Account>> {
        validate_page_limit(limit)?;
        let after = after.map_or(0, |a| a.0).to_be_bytes();
        self.read(move |c| {
            c.prepare_cached("SELECT id, name, kind, balance_micros, pending_micros, created_at_ms FROM accounts WHERE id > ?1 ORDER BY id LIMIT ?2")
                .and_then(|mut s| s.query_map(rusqlite::params![&after[..], limit], row_account)?.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(db_err)
        })
        .await
    }

    async fn mint(&self, account: AccountId, amount_micros: i64, key: &str, leaf: Option<Leaf>) -> Result<Transfer> {
        let req = posted_request(TREASURY, account, amount_micros, key, TransferCode::Mint)?;
        let now = crate::now_ms();
        self.write(move |c| op_posted(c, req, leaf, now)).await
    }

    async fn refund(&self, account: AccountId, amount_micros: i64, key: &str, leaf: Option<Leaf>) -> Result<Transfer> {
        let req = posted_request(OPERATOR_REVENUE, account, amount_micros, key, TransferCode::Refund)?;
        let now = crate::now_ms();
        self.write(move |c| op_posted(c, req, leaf, now)).await
    }

    async fn transfer(
        &self,
        from: AccountId,
        to: AccountId,
        amount_micros: i64,
        key: &str,
        leaf: Option<Leaf>,
    ) -> Result<Transfer> {
        let req = posted_request(from, to, amount_micros, key, TransferCode::Transfer)?;
        let now = crate::now_ms();
        self.write(move |c| op_posted(c, req, leaf, now)).await
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
        self.write_on_commit(move |c| op_hold(c, req, now_ms)).await
    }

    async fn settle(&self, hold_id: TransferId, amount_micros: i64, now_ms: i64, leaf: Option<Leaf>) -> Result<Settled> {
        self.write(move |c| op_settle(c, hold_id, amount_micros, now_ms, leaf)).await
    }

    async fn void(&self, hold_id: TransferId) -> Result<Transfer> {
        self.write_on_commit(move |c| op_void(c, hold_id)).await
    }

    async fn extend_holds(&self, hold_ids: &[TransferId], expires_at_ms: i64) -> Result<u64> {
        let ids = crate::extend_request(hold_ids)?;
        self.write_on_commit(move |c| {
            let mut n = 0;
            for id in ids.iter().filter_map(|id| TransferId::from_slice(id)) {
                let Some(seq) = c.seq_of_hold(id)? else { continue };
                n += c
                    .prepare_cached(
                        "UPDATE transfers SET expires_at_ms = ?1 WHERE seq = ?2 AND id = ?3 AND hold = 1 AND state = 0 \
                         AND expires_at_ms < ?1",
                    )
                    .and_then(|mut st| st.execute(params![expires_at_ms, seq, &id.to_bytes()[..]]))
                    .map_err(db_err)? as u64;
                c.extend_cached_hold(id, expires_at_ms);
            }
            Ok(n)
        })
        .await
    }

    async fn expire_holds(&self, now_ms: i64) -> Result<u64> {
        self.write_on_commit(move |c| op_expire(c, now_ms)).await
    }

    async fn statement(&self, account: AccountId, after_cursor: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
        validate_page_limit(limit)?;
        self.read(move |c| {
            load_account(c, account)?;
            read_statement(c, account, after_cursor, limit)
        })
        .await
    }

    async fn statement_newest_first(&self, account: AccountId, before_cursor: Option<u64>, limit: u32) -> Result<Page<Transfer>> {
        validate_page_limit(limit)?;
        self.read(move |c| {
            load_account(c, account)?;
            read_statement_newest_first(c, account, before_cursor, limit)
        })
        .await
    }

    async fn check(&self) -> Result<CheckReport> {
        self.read(read_check).await
    }

    // The log is read no further than what is on disk (`Shared::durable_log_next`): the node
    // signs checkpoints over what these return.
    async fn log_entries(&self, from_index: u64, limit: u32) -> Result<Vec<LogEntry>> {
        validate_page_limit(limit)?;
        let durable = self.durable_log_next();
        let mut entries = self.read(move |c| read_log(c, from_index, limit)).await?;
        entries.retain(|e| e.log_index < durable);
        Ok(entries)
    }

    async fn log_size(&self) -> Result<u64> {
        let size = self.read(|c| query_i128(c, "SELECT COUNT(*) FROM log_entries").map(|n| n as u64)).await?;
        Ok(size.min(self.durable_log_next()))
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
        self.write(move |c| op_create_key(c, rec)).await
    }

    async fn find_key_by_hash(&self, key_hash: [u8; 32]) -> Result<Option<KeyRecord>> {
        let keys = self.read(move |c| read_keys(c, "key_hash = ?1 AND revoked_at_ms IS NULL", &key_hash)).await?;
        Ok(keys.into_iter().next())
    }

    async fn revoke_key(&self, key_id: KeyId) -> Result<()> {
        let now = crate::now_ms();
        self.write(move |c| op_revoke_key(c, key_id, now)).await
    }

    async fn set_key_limits(&self, key_id: KeyId, change: KeyLimitsChange) -> Result<KeyRecord> {
        change.validate()?;
        self.write(move |c| op_set_key_limits(c, key_id, change)).await
    }

    async fn list_keys(&self, account: AccountId) -> Result<Vec<KeyRecord>> {
        self.read(move |c| read_keys(c, "account_id = ?1", &account.to_bytes())).await
    }

    async fn get_key(&self, key_id: KeyId) -> Result<KeyRecord> {
        self.read(move |c| read_keys(c, "id = ?1", &key_id.to_bytes())?.pop().ok_or(LedgerError::UnknownKey(key_id))).await
    }
}

/// Validates and builds a new key row (shared by both stores).
pub(crate) fn new_key_record(
    account: AccountId,
    key_hash: [u8; 32],
    scopes: &[String],
    rpm: Option<u32>,
    tpm: Option<u32>,
    caps: SpendCaps,
) -> Result<KeyRecord> {
    validate_scopes(scopes)?;
    validate_rates(rpm, tpm)?;
    caps.validate()?;
    let now = crate::now_ms();
    Ok(KeyRecord {
        id: KeyId::generate(now),
        account,
        key_hash,
        scopes: scopes.to_vec(),
        rpm,
        tpm,
        caps,
        created_at_ms: now,
        revoked_at_ms: None,
        spend: KeySpend::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;
    use std::time::Duration;

    #[test]
    fn the_writer_prepares_each_statement_once_and_reuses_it_after_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let conn = open_conn(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let index = Connection::open_in_memory().unwrap();
        let c = WriteConn::new(conn, index, Shared::new(0, 0), KeyFilters::new(path.clone(), 1024));
        let err = c.exec("COMMIT").unwrap_err();
        assert!(err.to_string().contains("no transaction is active"), "{err}");
        create_system_accounts(&c).unwrap();
        for _ in 0..3 {
            c.exec("BEGIN IMMEDIATE").unwrap();
            let mut treasury = load_account(&c, TREASURY).unwrap();
            treasury.balance_micros -= 1;
            store_account(&c, &treasury).unwrap();
            c.exec("COMMIT").unwrap();
        }
        assert_eq!(load_account(&c, TREASURY).unwrap().balance_micros, -3);
        assert_eq!(c.hot_statements(), 3);
    }

    /// Holds the syncer's fsync back while it is closed.
    #[derive(Default)]
    struct Gate {
        closed: Mutex<bool>,
        opened: Condvar,
    }

    impl Gate {
        fn set_closed(&self, closed: bool) {
            *self.closed.lock().unwrap() = closed;
            self.opened.notify_all();
        }

        fn pass(&self) {
            let mut closed = self.closed.lock().unwrap();
            while *closed {
                closed = self.opened.wait(closed).unwrap();
            }
        }
    }

    /// `Ack::OnCommit`: with the WAL's fsync held back, holds, extensions and voids are
    /// still answered (they wait for their COMMIT only), while a settlement and a mint wait
    /// until the fsync has run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holds_are_answered_at_commit_and_settlements_after_the_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        let g = gate.clone();
        let sync: SyncWal = Box::new(move |wal| {
            g.pass();
            wal.sync_data()
        });
        let store = SqliteStore::open_syncing(dir.path().join("ledger.sqlite"), Durability::Full, sync).unwrap();
        let a = store.create_account("a", AccountKind::User).await.unwrap();
        store.mint(a.id, 1_000_000, "fund", None).await.unwrap();

        gate.set_closed(true);
        let answered = Duration::from_secs(30);
        let now = crate::now_ms();
        let h1 = tokio::time::timeout(answered, store.hold(a.id, 1_000, "h1", 60_000, now)).await.expect("hold answered").unwrap();
        let h2 = tokio::time::timeout(answered, store.hold(a.id, 2_000, "h2", 60_000, now)).await.expect("hold answered").unwrap();
        let extended = tokio::time::timeout(answered, store.extend_holds(&[h1.id], now + 120_000)).await.expect("extension answered");
        assert_eq!(extended.unwrap(), 1);
        tokio::time::timeout(answered, store.void(h2.id)).await.expect("void answered").unwrap();

        let settle = store.settle(h1.id, 600, now, None);
        let mint = store.mint(a.id, 5, "more", None);
        let mut both = Box::pin(async { tokio::join!(settle, mint) });
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut both).await.is_err(),
            "a settlement or a mint was answered before its fsync"
        );
        gate.set_closed(false);
        let (settled, minted) = tokio::time::timeout(answered, both).await.expect("answered after the fsync");
        assert_eq!(settled.unwrap().posted.expect("posted").amount_micros, 600);
        minted.unwrap();
        let acct = store.get_account(a.id).await.unwrap();
        assert_eq!((acct.balance_micros, acct.pending_micros), (1_000_000 - 600 + 5, 0));
        assert!(store.check().await.unwrap().ok);
    }

    /// Opens the file with key filters sized for at least 64 keys, and waits until the first
    /// one serves.
    async fn open_with_small_key_filters(path: &Path) -> SqliteStore {
        let store = SqliteStore::open_tuned(path, Durability::Full, Box::new(|wal| wal.sync_data()), 64).unwrap();
        filter_ready(&store).await;
        store
    }

    async fn filter_ready(store: &SqliteStore) {
        for _ in 0..1_000 {
            if store.key_filter_ready() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the key filter was not built within 10 s");
    }

    /// Places and settles `n` charges; returns each hold's key with its settlement.
    async fn charges(store: &SqliteStore, a: AccountId, from: usize, n: usize) -> Vec<(String, Settled)> {
        let mut out = Vec::new();
        for i in from..from + n {
            let key = format!("charge-{i}");
            let h = store.hold(a, 100, &key, 60_000, crate::now_ms()).await.unwrap();
            out.push((key, store.settle(h.id, 1 + i as i64 % 100, crate::now_ms(), None).await.unwrap()));
        }
        out
    }

    /// Every retried hold and settlement returns its first result, and nothing more is charged.
    async fn retries_replay(store: &SqliteStore, a: AccountId, done: &[(String, Settled)]) {
        let before = store.get_account(a).await.unwrap();
        for (key, settled) in done {
            let again = store.hold(a, 100, key, 60_000, crate::now_ms()).await.unwrap();
            assert_eq!(again.id, settled.hold.id, "hold {key} was placed twice");
            let resettled = store.settle(again.id, settled.posted.as_ref().unwrap().amount_micros, crate::now_ms(), None).await.unwrap();
            assert_eq!(resettled.posted.unwrap().id, settled.posted.as_ref().unwrap().id, "hold {key} was settled twice");
        }
        assert_eq!(store.get_account(a).await.unwrap(), before);
    }

    /// The key filter (`sqlite_keys.rs`) across restarts and growth. Its keys come from the
    /// builder's scan (keys written before the store opened) and from the writer's tail, and
    /// a filter is rebuilt twice as large whenever it outgrows its size. In debug builds
    /// every key the filter calls absent is still looked up, and the writer panics if the
    /// index file has it: so every new key below checks the filter's invariant, and every
    /// retry checks that the filter lets it through to its first result.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_key_filter_keeps_every_key_across_restarts_and_growth() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let store = open_with_small_key_filters(&path).await;
        let a = store.create_account("a", AccountKind::User).await.unwrap().id;
        store.mint(a, 1_000_000_000, "fund", None).await.unwrap();
        let mut done = charges(&store, a, 0, 150).await;
        drop(store);

        // Reopened: the 300 keys are in the index file only, and the filter comes from its scan.
        let store = open_with_small_key_filters(&path).await;
        retries_replay(&store, a, &done).await;
        // Past the filter's size (twice the 300 transfers at open): larger ones are built
        // while the last one serves, and then serve in its place. And past
        // `INDEX_FLUSH_ROWS` transfers: the indexer moves keys from the tail to the index file.
        done.extend(charges(&store, a, 150, 1_100).await);
        filter_ready(&store).await;
        retries_replay(&store, a, &done).await;
        drop(store);

        let store = open_with_small_key_filters(&path).await;
        retries_replay(&store, a, &done).await;
        done.extend(charges(&store, a, 1_250, 10).await);
        let report = store.check().await.unwrap();
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!(report.transfers, 1 + 2 * 1_260);
    }
}
