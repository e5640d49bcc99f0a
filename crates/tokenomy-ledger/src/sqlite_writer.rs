//! The SQLite store's writer thread: group commit, a write-through cache, the syncer and
//! the checkpointer.
//!
//! Why it is shaped this way (measured with `examples/bench_settle`, 64 writers): the
//! writer thread is the ledger's bottleneck, and most of its time went to statements that
//! re-read rows it had written itself a moment before and to copying the WAL back into the
//! database. So:
//!
//! * **One writer owns the file**, hence the accounts it loads, the pending holds it
//!   inserted and the log's next index can be kept in memory ([`WriteConn`]). An account
//!   changed by many operations of one batch is written once, before the batch's COMMIT.
//!   A batch that rolls back drops the whole cache: it is only ever a copy of committed
//!   rows plus this batch's changes.
//! * **Commits do not wait for the disk on the writer thread.** With `Durability::Full`
//!   the writer commits with `synchronous=NORMAL` and passes the batch's answers to the
//!   syncer thread, which fsyncs the WAL and only then answers: no caller is told "done"
//!   before its write is on disk, and the writer meanwhile runs the next batch. (Holds,
//!   voids and extensions are answered at COMMIT: see [`Ack::OnCommit`].)
//! * **The commit path's statements are prepared once** ([`WriteConn::hot`]), not looked
//!   up in rusqlite's statement cache, which hashes the SQL and allocates a copy of it on
//!   every use: 12 % of this thread's instructions per charge (callgrind).
//! * **Checkpoints run on their own thread and connection** (`wal_autocheckpoint=0` on
//!   the writer).
//! * **Scattered indexes are written in bulk.** An index whose entries land all over its
//!   key space (the idempotency key; account + seq for statements) dirties one page per
//!   entry, and every dirty page is written to the WAL and copied back by the checkpoint:
//!   with them in `transfers`, 64 writers settled 15 000 charges/s, without them 32 000
//!   (`Durability::Full`) and 52 000 (`Normal`). So they are plain tables (`transfer_keys`,
//!   `account_transfers`), filled in bulk, in key order. Since schema version 4 they are in
//!   a file of their own, filled by the indexer thread (`sqlite_index.rs`): filling them
//!   took 13–19 % of this thread. The transfers not yet there (the tail, past
//!   `Shared::indexed_upto`) are kept in memory ([`IndexTail`]) and are always re-derivable
//!   from `transfers`, so a rollback or a restart just reloads them.
//! * **A new idempotency key costs no lookup.** Proving a key absent from the index file
//!   (a B-tree on another connection, whose cache every indexer commit invalidates) was the
//!   writer's most costly lookup, and nearly every key is new. So the writer keeps a Bloom
//!   filter of every key the ledger holds (`sqlite_keys.rs`) and looks up only the keys
//!   it may contain.

use std::cell::RefCell;
use std::collections::HashMap;

// Maps keyed by ids this node generates (random, so no caller can aim at one bucket) use
// foldhash; the idempotency keys, which callers choose, keep std's SipHash.
use foldhash::{HashMap as IdMap, HashSet as IdSet};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SendError, SyncSender};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Statement};
use tokio::sync::mpsc;

use crate::domain::*;
use crate::sqlite::{db_err, load_account, store_account, MAX_BATCH};
use crate::sqlite_index::{INDEX_BEHIND_ROWS, INDEX_TAIL_ROWS_MAX};
use crate::sqlite_keys::KeyFilters;
use crate::sqlite_raw::{RawStmt, Val};

/// Most accounts kept in the writer's cache; past it the cache starts over.
pub const CACHED_ACCOUNTS_MAX: usize = 65_536;
/// Most pending holds kept in the writer's cache; past it the cache starts over.
pub const CACHED_HOLDS_MAX: usize = 65_536;

pub(crate) type Finish = Box<dyn FnOnce(Option<&LedgerError>) + Send>;
/// A job runs on the connection (`Some`) or is refused without running (`None`: the batch
/// could not start); it returns its reply and whether it failed after writing (which
/// poisons the batch).
pub(crate) struct Job {
    pub run: Box<dyn FnOnce(Option<&WriteConn>) -> (Finish, bool) + Send>,
    pub ack: Ack,
}

/// When a job's caller may be answered, with `Durability::Full`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Once an fsync of the WAL that began after its batch's COMMIT has returned.
    Durable,
    /// Right after its batch's COMMIT: for operations whose loss in a power cut is the same
    /// as what recovery does anyway. A hold, a void or an extension of holds taken back by
    /// a power loss leaves the hold absent or pending, and every pending hold of a node that
    /// stopped expires and is voided: either way nothing is charged and the funds are
    /// free. Whatever makes a hold matter (its settlement) is written after it in the WAL,
    /// so it is durable only once the hold is too (WAL frames are kept as a prefix).
    OnCommit,
}

/// The writer's connection and what it knows of the rows it wrote. Derefs to the
/// connection, so read helpers take it as they are.
pub(crate) struct WriteConn {
    /// The commit path's statements, each prepared once ([`hot`](Self::hot)). Declared
    /// before `conn`, so dropped before it.
    hot: RefCell<IdMap<(usize, usize), Statement<'static>>>,
    /// The commit path's writes, bound in place ([`run`](Self::run)); dropped before `conn`.
    raw: RefCell<IdMap<(usize, usize), RawStmt<'static>>>,
    /// Boxed: the statements of `hot` and `raw` point at it, so it must not move.
    conn: Box<Connection>,
    /// The index file (`sqlite_index.rs`), read only: the idempotency keys and ids of
    /// transfers older than the tail. (Not attached to `conn`: `BEGIN IMMEDIATE` would then lock it too.)
    index: Connection,
    shared: Arc<Shared>,
    cache: RefCell<Cache>,
    /// Every idempotency key the ledger holds, once built (`sqlite_keys.rs`); outlives
    /// rollbacks (a key it holds that was rolled back only costs a lookup).
    keys: RefCell<KeyFilters>,
}

#[derive(Default)]
struct Cache {
    /// `PRAGMA data_version` when the cache was last known valid: another connection's
    /// commit changes it, and then nothing cached can be trusted.
    data_version: Option<i64>,
    accounts: IdMap<AccountId, Account>,
    /// Accounts changed in this batch and not yet written.
    dirty: IdSet<AccountId>,
    /// Pending holds this writer inserted, with their rowid (`seq`).
    holds: IdMap<TransferId, (i64, Transfer)>,
    next_log_index: Option<u64>,
    /// Transfers not yet in the bulk index tables; `None` until first needed.
    tail: Option<IndexTail>,
    /// Count of staged changes, so that a job that failed after staging one poisons its batch.
    staged: u64,
}

/// The transfers past the index file's head (`Shared::indexed_upto`), in seq order, with
/// their keys and ids.
#[derive(Default)]
struct IndexTail {
    indexed_upto: i64,
    rows: Vec<TailRow>,
    keys: HashMap<String, i64>,
    ids: IdMap<TransferId, i64>,
}

struct TailRow {
    seq: i64,
    key: String,
    id: TransferId,
}

impl IndexTail {
    /// The transfers past the index file's head, read from `transfers`. (The indexer may
    /// move its head meanwhile: the tail then holds a few indexed transfers too, harmless.)
    fn load(c: &Connection, index: &Connection) -> Result<Self> {
        let upto = crate::sqlite_index::indexed_upto(index)?;
        let mut tail = IndexTail { indexed_upto: upto, ..Default::default() };
        let mut stmt = c
            .prepare_cached("SELECT seq, idempotency_key, id FROM transfers WHERE seq > ?1 ORDER BY seq")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([upto], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?)))
            .map_err(db_err)?;
        for row in rows {
            let (seq, key, id) = row.map_err(db_err)?;
            let id = TransferId::from_slice(&id).ok_or_else(|| LedgerError::Storage(format!("transfer {seq} has a malformed id")))?;
            tail.push(seq, key, id)?;
        }
        Ok(tail)
    }

    fn push(&mut self, seq: i64, key: String, id: TransferId) -> Result<()> {
        if seq <= self.indexed_upto || self.rows.last().is_some_and(|r| r.seq >= seq) {
            return Err(LedgerError::InvariantViolation(format!("transfer {seq} is out of order in the index tail")));
        }
        if self.keys.insert(key.clone(), seq).is_some() {
            return Err(LedgerError::InvariantViolation(format!("idempotency key {key} is used twice")));
        }
        if self.ids.insert(id, seq).is_some() {
            return Err(LedgerError::InvariantViolation(format!("transfer id {id} is used twice")));
        }
        self.rows.push(TailRow { seq, key, id });
        Ok(())
    }

    /// Forgets the transfers the indexer has indexed (up to `upto`).
    fn prune(&mut self, upto: i64) {
        if upto <= self.indexed_upto {
            return;
        }
        let n = self.rows.partition_point(|r| r.seq <= upto);
        for row in self.rows.drain(..n) {
            self.keys.remove(&row.key);
            self.ids.remove(&row.id);
        }
        self.indexed_upto = upto;
    }

    fn last_seq(&self) -> Option<i64> {
        self.rows.last().map(|r| r.seq)
    }
}

impl Deref for WriteConn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl WriteConn {
    pub(crate) fn new(conn: Connection, index: Connection, shared: Arc<Shared>, keys: KeyFilters) -> Self {
        WriteConn { hot: RefCell::default(), raw: RefCell::default(), conn: Box::new(conn), index, shared, cache: RefCell::new(Cache::default()), keys: RefCell::new(keys) }
    }

    /// Runs `f` on the statement `sql`, prepared the first time and kept for the
    /// connection's life. For the commit path: rusqlite's statement cache hashes the SQL
    /// and allocates a copy of it on every use, about a tenth of this thread's time.
    /// (`f` must not call `hot` again.)
    pub(crate) fn hot<T>(&self, sql: &'static str, f: impl FnOnce(&mut Statement<'_>) -> rusqlite::Result<T>) -> Result<T> {
        let mut hot = self.hot.borrow_mut();
        f(self.kept(&mut hot, sql, |conn, sql| conn.prepare(sql))?).map_err(db_err)
    }

    /// Runs the write `sql` with `vals`, prepared the first time and kept for the
    /// connection's life, its values bound in place (`sqlite_raw.rs`); returns the rows
    /// it changed.
    pub(crate) fn run(&self, sql: &'static str, vals: &[Val<'_>]) -> Result<usize> {
        let mut raw = self.raw.borrow_mut();
        self.kept(&mut raw, sql, RawStmt::prepare)?.run(vals).map_err(db_err)
    }

    /// The statement of `hot` or `raw` (`kept`) for `sql`, prepared by `prepare` the first
    /// time on the connection under a `'static` lifetime. Only for those two maps: it is
    /// boxed, so it stays where it is for as long as `self` lives, and both maps are dropped
    /// before it (field order); `hot`'s callers only ever see a statement under a lifetime of
    /// their own, and `raw`'s statements never leave `self`.
    fn kept<'m, S>(
        &self,
        kept: &'m mut IdMap<(usize, usize), S>,
        sql: &'static str,
        prepare: impl FnOnce(&'static Connection, &str) -> rusqlite::Result<S>,
    ) -> Result<&'m mut S> {
        match kept.entry((sql.as_ptr() as usize, sql.len())) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                // SAFETY: see above (`kept` is `self.hot` or `self.raw`).
                #[allow(unsafe_code)]
                let conn: &'static Connection = unsafe { &*(&*self.conn as *const Connection) };
                Ok(e.insert(prepare(conn, sql).map_err(db_err)?))
            }
        }
    }

    pub(crate) fn exec(&self, sql: &'static str) -> Result<()> {
        self.hot(sql, |s| s.execute([])).map(|_| ())
    }

    #[cfg(test)]
    pub(crate) fn hot_statements(&self) -> usize {
        self.hot.borrow().len() + self.raw.borrow().len()
    }

    /// Changes made so far (rows written plus changes staged in the cache).
    pub(crate) fn changes(&self) -> u64 {
        self.conn.total_changes() + self.cache.borrow().staged
    }

    /// The account as this batch sees it.
    pub(crate) fn account(&self, id: AccountId) -> Result<Account> {
        if let Some(a) = self.cache.borrow().accounts.get(&id) {
            return Ok(a.clone());
        }
        let a = load_account(&self.conn, id)?;
        self.cache.borrow_mut().accounts.insert(id, a.clone());
        Ok(a)
    }

    /// Stages a changed account; it is written before the batch commits.
    pub(crate) fn stage_account(&self, a: Account) -> Result<()> {
        check_account(&a)?;
        let mut cache = self.cache.borrow_mut();
        cache.dirty.insert(a.id);
        cache.accounts.insert(a.id, a);
        cache.staged += 1;
        Ok(())
    }

    /// A pending hold this writer inserted (with its rowid), taken out of the cache:
    /// the caller is about to change it.
    pub(crate) fn take_hold(&self, id: TransferId) -> Option<(i64, Transfer)> {
        self.cache.borrow_mut().holds.remove(&id)
    }

    /// Remembers a pending hold just inserted at rowid `seq`.
    pub(crate) fn remember_hold(&self, seq: i64, t: &Transfer) {
        debug_assert!(t.hold && t.state == TransferState::Pending);
        let mut cache = self.cache.borrow_mut();
        if cache.holds.len() >= CACHED_HOLDS_MAX {
            cache.holds.clear();
        }
        cache.holds.insert(t.id, (seq, t.clone()));
    }

    /// Mirrors `extend_holds` on the cached copies (the same rule as its UPDATE).
    pub(crate) fn extend_cached_hold(&self, id: TransferId, expires_at_ms: i64) {
        if let Some((_, t)) = self.cache.borrow_mut().holds.get_mut(&id) {
            t.expires_at_ms = t.expires_at_ms.max(expires_at_ms);
        }
    }

    pub(crate) fn next_log_index(&self, load: impl FnOnce(&Connection) -> Result<u64>) -> Result<u64> {
        if let Some(i) = self.cache.borrow().next_log_index {
            return Ok(i);
        }
        let i = load(&self.conn)?;
        self.cache.borrow_mut().next_log_index = Some(i);
        Ok(i)
    }

    pub(crate) fn appended_log(&self, index: u64) {
        self.cache.borrow_mut().next_log_index = Some(index + 1);
    }

    fn with_tail<T>(&self, f: impl FnOnce(&mut IndexTail) -> Result<T>) -> Result<T> {
        let mut cache = self.cache.borrow_mut();
        if cache.tail.is_none() {
            let tail = IndexTail::load(&self.conn, &self.index)?;
            let keys = self.keys.borrow();
            tail.rows.iter().for_each(|r| keys.add(&r.key));
            cache.tail = Some(tail);
        }
        let tail = cache.tail.as_mut().expect("loaded");
        tail.prune(self.shared.indexed_upto.load(Ordering::SeqCst));
        f(tail)
    }

    /// The seq of the transfer holding `key`, if any: the tail first, then the index file's
    /// `transfer_keys` (every committed transfer is in one of the two: the indexer publishes
    /// its head only after its commit, and the tail forgets nothing before that), unless the
    /// key filter proves it absent there.
    pub(crate) fn seq_of_key(&self, key: &str) -> Result<Option<i64>> {
        if let Some(seq) = self.with_tail(|t| Ok(t.keys.get(key).copied()))? {
            return Ok(Some(seq));
        }
        let absent = self.keys.borrow().surely_absent(key);
        if absent && !cfg!(debug_assertions) {
            return Ok(None);
        }
        let seq = self
            .index
            .prepare_cached("SELECT seq FROM transfer_keys WHERE idempotency_key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(db_err)?;
        // Debug builds (the tests) look every key up and hold the filter to its invariant.
        assert!(!(absent && seq.is_some()), "the key filter lacks idempotency key {key:?} of transfer {seq:?}");
        Ok(seq)
    }

    /// The seq of the transfer with id `id`, if any: the tail first, then the index file's
    /// `transfer_ids` (the same reasoning as [`seq_of_key`](Self::seq_of_key)).
    pub(crate) fn seq_of_id(&self, id: TransferId) -> Result<Option<i64>> {
        if let Some(seq) = self.with_tail(|t| Ok(t.ids.get(&id).copied()))? {
            return Ok(Some(seq));
        }
        self.index
            .prepare_cached("SELECT seq FROM transfer_ids WHERE id = ?1")
            .and_then(|mut s| s.query_row([&id.to_bytes()[..]], |r| r.get(0)).optional())
            .map_err(db_err)
    }

    /// The seq of hold `id`: from the holds this writer cached (no lookup), else as
    /// [`seq_of_id`](Self::seq_of_id).
    pub(crate) fn seq_of_hold(&self, id: TransferId) -> Result<Option<i64>> {
        if let Some((seq, _)) = self.cache.borrow().holds.get(&id) {
            return Ok(Some(*seq));
        }
        self.seq_of_id(id)
    }

    /// Loads the index tail if this batch has not yet. Called before a transfer's INSERT:
    /// loaded after it, the tail read from `transfers` would already hold the new row.
    pub(crate) fn load_tail(&self) -> Result<()> {
        self.with_tail(|_| Ok(()))
    }

    /// Records a transfer just inserted at `seq` in the index tail (loaded before the INSERT).
    pub(crate) fn inserted(&self, seq: i64, t: &Transfer) -> Result<()> {
        self.with_tail(|tail| tail.push(seq, t.idempotency_key.clone(), t.id))?;
        self.keys.borrow().add(&t.idempotency_key);
        Ok(())
    }

    /// `PRAGMA data_version`: it changes whenever another connection commits to the file.
    fn data_version(&self) -> Result<i64> {
        self.hot("PRAGMA data_version", |s| s.query_row([], |r| r.get(0)))
    }

    /// Between batches: the key filter's upkeep (`KeyFilters::maintain`).
    fn maintain_key_filter(&self) {
        self.keys.borrow_mut().maintain(&self.shared, || self.data_version());
    }

    /// Writes the staged accounts (each once).
    fn flush(&self) -> Result<()> {
        let mut cache = self.cache.borrow_mut();
        let dirty: Vec<AccountId> = cache.dirty.drain().collect();
        for id in dirty {
            store_account(self, &cache.accounts[&id])?;
        }
        if cache.accounts.len() > CACHED_ACCOUNTS_MAX {
            cache.accounts.clear();
        }
        Ok(())
    }

    /// After a COMMIT: the transfers up to the tail's last one are committed (the indexer
    /// may index them).
    fn publish_committed(&self) {
        if let Some(seq) = self.cache.borrow().tail.as_ref().and_then(IndexTail::last_seq) {
            self.shared.committed_upto.fetch_max(seq, Ordering::SeqCst);
        }
    }

    /// Whether the tail holds more than [`INDEX_TAIL_ROWS_MAX`] transfers (the indexer is
    /// behind: the next batch waits for it).
    fn tail_full(&self) -> bool {
        let indexed = self.shared.indexed_upto.load(Ordering::SeqCst);
        let mut cache = self.cache.borrow_mut();
        cache.tail.as_mut().is_some_and(|t| {
            t.prune(indexed);
            t.rows.len() > INDEX_TAIL_ROWS_MAX
        })
    }

    /// After a rollback: nothing cached can be trusted.
    fn reset(&self) {
        *self.cache.borrow_mut() = Cache::default();
    }

    /// Drops the cache if another connection committed since it was filled (a second
    /// process on the same file, an operator's `sqlite3` shell). Inside the batch's
    /// transaction, so nobody else can commit until it ends.
    fn revalidate(&self) -> Result<()> {
        let version = self.data_version()?;
        let known = self.cache.borrow().data_version;
        if known != Some(version) {
            self.reset();
            self.cache.borrow_mut().data_version = Some(version);
        }
        self.keys.borrow_mut().seen_data_version(version, &self.shared);
        Ok(())
    }

    /// The log's next index as of this batch, when the writer knows it.
    fn log_next(&self) -> Option<u64> {
        self.cache.borrow().next_log_index
    }
}

/// What the writer, the syncer, the checkpointer and the readers share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Set when the WAL could not be synced or checkpointed (or the index file written):
    /// nothing more is acknowledged.
    pub failed: AtomicBool,
    /// Every transfer up to this seq is committed (set by the writer after each COMMIT).
    pub committed_upto: AtomicI64,
    /// Every transfer up to this seq is in the index file (set by the indexer after its commit).
    pub indexed_upto: AtomicI64,
    /// Log entries below this index are on disk. Readers of the log (which sign
    /// checkpoints over it) see no further: an entry a power loss could still take back
    /// must never be signed.
    pub durable_log_next: AtomicU64,
    /// Key filters created and built (numbered from 1): once equal, the newest one is built
    /// and the writer uses it from its next batch.
    pub key_filters_created: AtomicU64,
    pub key_filters_built: AtomicU64,
    /// The indexer thread's scheduling (`sqlite_index.rs`).
    pub indexer: crate::sqlite_index::IndexerPriority,
}

impl Shared {
    pub(crate) fn new(durable_log_next: u64, indexed_upto: i64) -> Arc<Self> {
        Arc::new(Shared {
            failed: AtomicBool::new(false),
            committed_upto: AtomicI64::new(indexed_upto),
            indexed_upto: AtomicI64::new(indexed_upto),
            durable_log_next: AtomicU64::new(durable_log_next),
            key_filters_created: AtomicU64::new(0),
            key_filters_built: AtomicU64::new(0),
            indexer: Default::default(),
        })
    }

    fn durable(&self, log_next: Option<u64>) {
        if let Some(n) = log_next {
            self.durable_log_next.fetch_max(n, Ordering::SeqCst);
        }
    }

    pub(crate) fn fail(&self, what: &str) -> LedgerError {
        self.failed.store(true, Ordering::SeqCst);
        eprintln!("tokenomy-ledger: {what}; refusing further writes until restart");
        LedgerError::Storage(format!("{what}; restart the node"))
    }
}

/// The writer thread's state.
pub(crate) struct Writer {
    pub conn: WriteConn,
    /// Tells the checkpointer that the WAL grew.
    pub committed: SyncSender<()>,
    /// Tells the indexer that transfers were committed.
    pub to_index: SyncSender<()>,
    pub acks: Acks,
    pub shared: Arc<Shared>,
}

/// When a committed batch is answered.
pub(crate) enum Acks {
    /// `Durability::Normal`: right after its COMMIT.
    Now,
    /// `Durability::Full`: by the syncer, once an fsync of the WAL that began after the
    /// COMMIT has returned.
    AfterSync(SyncSender<Committed>),
}

/// A committed (or failed) batch waiting for its answers.
pub(crate) struct Committed {
    finishes: Vec<Finish>,
    /// The answers of [`Ack::OnCommit`] jobs (with `Durability::Full`, sent before the fsync).
    on_commit: Vec<Finish>,
    err: Option<LedgerError>,
    /// The log's next index once this batch is durable.
    log_next: Option<u64>,
}

impl Committed {
    fn answer(self, err: Option<&LedgerError>) {
        let err = self.err.as_ref().or(err);
        self.on_commit.into_iter().chain(self.finishes).for_each(|f| f(err));
    }

    fn refused(batch: Vec<Job>, err: LedgerError) -> Self {
        let finishes = batch.into_iter().map(|j| (j.run)(None).0).collect();
        Committed { finishes, on_commit: Vec::new(), err: Some(err), log_next: None }
    }
}

/// The WAL file of `conn`'s main database, opened for the syncer (kept open: a writeback
/// error is reported once per open file, so a new handle per fsync could miss it).
pub(crate) fn open_wal(conn: &Connection) -> Result<(std::fs::File, std::path::PathBuf)> {
    let db = conn.path().filter(|p| !p.is_empty()).ok_or_else(|| LedgerError::Storage("ledger has no file".into()))?;
    let wal = std::path::PathBuf::from(format!("{db}-wal"));
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&wal).map_err(|e| LedgerError::Storage(format!("{}: {e}", wal.display())))?;
    Ok((file, wal))
}

/// How the syncer makes the WAL durable: `File::sync_data` (tests wrap it to hold it back).
pub(crate) type SyncWal = Box<dyn FnMut(&std::fs::File) -> std::io::Result<()> + Send>;

/// Answers committed batches once their WAL frames are on disk. Every batch queued when an
/// fsync starts shares it. WAL frames only ever count from the start of the file (each
/// frame's checksum chains to the previous one), so a batch the disk kept implies every
/// earlier batch was kept too: later batches, which may have read an earlier one's
/// writes, are never answered before it.
///
/// After a failed fsync the kernel may have dropped the dirty pages, and a later fsync can
/// succeed without them ("fsyncgate"): from then on every batch, queued or not, is answered
/// with an error and the node must restart (recovery then keeps what the disk has).
pub(crate) fn sync_loop(wal: (std::fs::File, std::path::PathBuf), mut sync: SyncWal, batches: Receiver<Committed>, shared: &Shared) {
    let (file, path) = wal;
    while let Ok(first) = batches.recv() {
        let mut ready = vec![first];
        ready.extend(batches.try_iter());
        let err = if shared.failed.load(Ordering::SeqCst) {
            Some(LedgerError::Storage("the ledger's WAL could not be made durable earlier; restart the node".into()))
        } else {
            sync(&file).err().map(|e| shared.fail(&format!("fsync of {} failed: {e}", path.display())))
        };
        for b in ready {
            if err.is_none() {
                shared.durable(b.log_next);
            }
            b.answer(err.as_ref());
        }
    }
}

/// Checkpoints the WAL after commits, at most every `interval`; ends when the writer
/// does. PASSIVE never blocks the writer. Under sustained writes a PASSIVE checkpoint
/// rarely catches up with the last frame, so the WAL would never start over: the writer
/// keeps a large `wal_autocheckpoint` as a backstop, which finds most frames already
/// copied. (The checkpointer's connection is `synchronous=FULL`: the WAL is synced before
/// its frames are copied, and the database after.) An I/O error here is fatal like a
/// failed fsync: it may have consumed the error a later fsync of the WAL would report.
pub(crate) fn checkpoint_loop(conn: Connection, commits: Receiver<()>, interval: std::time::Duration, shared: &Shared) {
    while commits.recv().is_ok() {
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Err(rusqlite::Error::SqliteFailure(f, _)) if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {}
            Err(e) => drop(shared.fail(&format!("WAL checkpoint failed: {e}"))),
            Ok(()) => {}
        }
        std::thread::sleep(interval);
    }
}

/// The group-commit loop: one transaction per batch of queued jobs.
pub(crate) fn writer_loop(w: Writer, mut rx: mpsc::Receiver<Job>) {
    w.conn.maintain_key_filter();
    while let Some(first) = rx.blocking_recv() {
        // The indexer fell behind (perhaps idle in the middle of a round on busy cores):
        // give it its nice-10 share now rather than after that round.
        if w.shared.committed_upto.load(Ordering::SeqCst) - w.shared.indexed_upto.load(Ordering::SeqCst) > INDEX_BEHIND_ROWS {
            w.shared.indexer.boost();
        }
        // The indexer is far behind (the tail is bounded): wait for it.
        while w.conn.tail_full() && !w.shared.failed.load(Ordering::SeqCst) {
            let _ = w.to_index.try_send(());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        w.conn.maintain_key_filter();
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut done = if w.shared.failed.load(Ordering::SeqCst) {
            let err = LedgerError::Storage("the ledger's WAL could not be made durable earlier; restart the node".into());
            Committed::refused(batch, err)
        } else {
            commit_batch(&w.conn, batch)
        };
        // A full channel means a checkpoint (an indexing round) is already due: nothing to add.
        let _ = w.committed.try_send(());
        let _ = w.to_index.try_send(());
        match &w.acks {
            Acks::AfterSync(syncer) if done.err.is_none() => {
                std::mem::take(&mut done.on_commit).into_iter().for_each(|f| f(None));
                if let Err(SendError(done)) = syncer.send(done) {
                    let err = w.shared.fail("the ledger's syncer thread is gone");
                    done.answer(Some(&err));
                }
            }
            Acks::AfterSync(_) => done.answer(None),
            Acks::Now => {
                w.shared.durable(done.log_next);
                done.answer(None);
            }
        }
        // (Also here: a batch that dropped the filters gets a new one building at once.)
        w.conn.maintain_key_filter();
    }
}

/// Runs one batch in one transaction. Its answers wait in the returned value.
fn commit_batch(c: &WriteConn, batch: Vec<Job>) -> Committed {
    debug_assert!(!batch.is_empty() && batch.len() <= MAX_BATCH);
    if let Err(e) = c.exec("BEGIN IMMEDIATE").and_then(|()| c.revalidate()) {
        let _ = c.exec("ROLLBACK");
        c.reset();
        return Committed::refused(batch, e);
    }
    let mut poisoned = false;
    let mut finishes: Vec<Finish> = Vec::with_capacity(batch.len());
    let mut on_commit: Vec<Finish> = Vec::new();
    for job in batch {
        let (finish, dirty) = (job.run)(Some(c));
        poisoned |= dirty;
        match job.ack {
            Ack::Durable => finishes.push(finish),
            Ack::OnCommit => on_commit.push(finish),
        }
    }
    let outcome = if poisoned {
        Err(LedgerError::Storage("batch rolled back: an operation failed after writing".into()))
    } else {
        c.flush().and_then(|()| c.exec("COMMIT"))
    };
    if outcome.is_err() {
        let _ = c.exec("ROLLBACK");
        c.reset();
    }
    if outcome.is_ok() {
        c.publish_committed();
    }
    let log_next = if outcome.is_ok() { c.log_next() } else { None };
    Committed { finishes, on_commit, err: outcome.err(), log_next }
}
