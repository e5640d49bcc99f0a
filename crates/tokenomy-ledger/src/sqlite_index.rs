//! The SQLite store's bulk index: `transfer_keys` (idempotency key → seq), `transfer_ids`
//! (transfer id → seq, since schema version 6) and `account_transfers` (account, seq), in a
//! file of their own next to the ledger file, filled by a thread of their own.
//!
//! Why a second file: every write of the store goes through one writer thread and one
//! connection, and at 64 concurrent writers that thread is the bottleneck (97 % of one core,
//! the other core mostly idle; docs/benchmarks.md, session 10). Filling the key and statement
//! tables took 13–19 % of it (and `transfer_ids`' entries, on the commit path until version 6,
//! cost about an eighth of the store's throughput). They are derived data (rebuilt from `transfers` at any time), and SQLite lets
//! only one connection write a file at a time, so only another file lets another thread fill
//! them while the writer goes on.
//!
//! The contract with the writer (`sqlite_writer.rs`): the indexer indexes committed transfers
//! only (up to `Shared::committed_upto`, which the writer publishes after each COMMIT), in seq
//! order, and publishes `Shared::indexed_upto` after its own commit; the writer keeps every
//! transfer past that in memory (its index tail) and looks keys and ids up there first, then in
//! this file. A key or id is therefore always in one of the two.
//!
//! The file can fall behind the ledger (a crash before the indexer caught up: [`open`] indexes
//! the rest) or, after a power loss that took back the ledger's last commits, run ahead of it:
//! then the transfer at its head is gone or another one, and [`open`] empties it and indexes
//! again.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use rusqlite::{params, Connection, OptionalExtension};

use crate::domain::{LedgerError, Result};
use crate::sqlite::db_err;
use crate::sqlite_raw::{RawStmt, Val};
use crate::sqlite_writer::Shared;

const INDEX_SCHEMA: &str = include_str!("sql/sqlite_index_schema.sql");

/// Transfers the indexer lets pile up before it indexes them (sorted, so each index page is
/// visited once per round rather than once per transfer).
pub const INDEX_FLUSH_ROWS: usize = 2048;
/// Most transfers one round of the indexer (one transaction) takes.
pub const INDEX_ROUND_ROWS_MAX: usize = 8 * INDEX_FLUSH_ROWS;
/// Most transfers the writer keeps in memory, unindexed; past it the writer waits for the
/// indexer before its next batch.
pub const INDEX_TAIL_ROWS_MAX: usize = 32 * INDEX_FLUSH_ROWS;

/// WAL pages of the index file past which its indexer checkpoints (SQLite's default is
/// 1 000). Each checkpoint fsyncs twice, on the disk the ledger's syncer waits on; the file
/// is derived data, so a larger WAL costs only its size.
pub const INDEX_WAL_CHECKPOINT_PAGES: u64 = 16_384;
/// The indexer thread's nice value while it is behind (see [`Background`]).
pub const INDEXER_NICE: i32 = 10;
/// Unindexed transfers past which the indexer leaves `SCHED_IDLE` for [`INDEXER_NICE`]: half
/// the writer's bound, so that a machine whose cores are all busy (an engine generating on
/// every core) still lets it catch up before the writer waits.
pub const INDEX_BEHIND_ROWS: i64 = (INDEX_TAIL_ROWS_MAX / 2) as i64;

/// `ledger.sqlite` → `ledger-index.sqlite`.
pub fn index_path(ledger: &Path) -> PathBuf {
    let mut name = ledger.file_stem().unwrap_or_default().to_os_string();
    name.push("-index");
    if let Some(ext) = ledger.extension() {
        name.push(".");
        name.push(ext);
    }
    ledger.with_file_name(name)
}

/// The indexer's connection: the index file, with the ledger attached read-only as `ledger`
/// (its transactions read the ledger, never write it; see [`in_index_transaction`]).
/// Creates the tables, empties the file if it does not match the ledger, and indexes every
/// committed transfer: the writer then starts with an empty tail.
pub(crate) fn open(ledger: &Path) -> Result<Connection> {
    let c = Connection::open(index_path(ledger)).map_err(db_err)?;
    c.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; \
         PRAGMA wal_autocheckpoint={INDEX_WAL_CHECKPOINT_PAGES}; PRAGMA journal_size_limit={}",
        INDEX_WAL_CHECKPOINT_PAGES * 4096
    ))
    .map_err(db_err)?;
    c.execute_batch(INDEX_SCHEMA).map_err(db_err)?;
    let uri = format!("file:{}?mode=ro", uri_path(ledger));
    c.execute("ATTACH DATABASE ?1 AS ledger", [uri]).map_err(db_err)?;
    if !matches_ledger(&c)? || lacks_ids(&c)? {
        c.execute_batch("BEGIN IMMEDIATE; DELETE FROM transfer_keys; DELETE FROM transfer_ids; DELETE FROM account_transfers; \
                         UPDATE index_head SET indexed_upto = 0, key_at_head = NULL; COMMIT;")
            .map_err(db_err)?;
    }
    let last: i64 = c.query_row("SELECT COALESCE(MAX(seq), 0) FROM ledger.transfers", [], |r| r.get(0)).map_err(db_err)?;
    let mut head = indexed_upto(&c)?;
    while head < last {
        let next = index_round(&c, last)?;
        if next == head {
            break; // (no transfer in the next round's range: the writer's tail holds the rest)
        }
        head = next;
    }
    Ok(c)
}

/// A path as an SQLite URI path: `%`, `?` and `#` escaped.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for ch in path.display().to_string().chars() {
        match ch {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            _ => out.push(ch),
        }
    }
    out
}

/// Whether the transfer at the file's head is still the one it indexed.
fn matches_ledger(c: &Connection) -> Result<bool> {
    let (head, key): (i64, Option<String>) =
        c.query_row("SELECT indexed_upto, key_at_head FROM index_head", [], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db_err)?;
    if head == 0 {
        return Ok(true);
    }
    let found: Option<String> = c
        .query_row("SELECT idempotency_key FROM ledger.transfers WHERE seq = ?1", [head], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    Ok(found.is_some() && found == key)
}

/// Whether the file was written before `transfer_ids` existed (it indexes transfers, none of
/// their ids): it is then indexed again from the start.
fn lacks_ids(c: &Connection) -> Result<bool> {
    c.query_row(
        "SELECT (SELECT indexed_upto FROM index_head) > 0 AND NOT EXISTS (SELECT 1 FROM transfer_ids)",
        [],
        |r| r.get(0),
    )
    .map_err(db_err)
}

/// The file's head: every transfer up to it is indexed.
pub(crate) fn indexed_upto(c: &Connection) -> Result<i64> {
    c.prepare_cached("SELECT indexed_upto FROM index_head").and_then(|mut s| s.query_row([], |r| r.get(0))).map_err(db_err)
}

/// Indexes the committed transfers past the head, up to `committed_upto` and at most
/// [`INDEX_ROUND_ROWS_MAX`] of them, in one transaction; returns the new head.
///
/// The round's transfers are read from the ledger first, in one short read, and written to
/// this file after it, in a transaction that holds no ledger snapshot: the ledger's is held
/// for that read only, not for the whole round. (A round run at `SCHED_IDLE` on busy cores
/// can take long; a ledger snapshot held meanwhile keeps the ledger's checkpoints from
/// finishing, so its WAL never starts over and keeps growing.)
fn index_round(c: &Connection, committed_upto: i64) -> Result<i64> {
    let head = indexed_upto(c)?;
    let limit = committed_upto.min(head + INDEX_ROUND_ROWS_MAX as i64);
    if limit <= head {
        return Ok(head);
    }
    let rows = read_round(c, head, limit)?;
    let Some(last) = rows.last() else { return Ok(head) };
    in_index_transaction(c, || {
        // Only this thread writes the file, so its head is where the round began.
        let now = indexed_upto(c)?;
        if now != head {
            return Err(LedgerError::InvariantViolation(format!("the index file's head moved from {head} to {now} during a round")));
        }
        write_round(c, &rows).map_err(|e| indexing_error(e, head, last.seq))?;
        c.prepare_cached("UPDATE index_head SET indexed_upto = ?1, key_at_head = ?2")
            .and_then(|mut s| s.execute(params![last.seq, last.key]))
            .map_err(db_err)?;
        Ok(last.seq)
    })
}

/// Runs `f` in a transaction that writes the index file and holds no snapshot of the
/// attached ledger. So a deferred `BEGIN`: `BEGIN IMMEDIATE` begins a transaction on every
/// attached database, a read transaction on the read-only ledger, held to COMMIT. The first
/// write takes the index file's write lock (only this thread writes the file, so no other
/// commit can have come between its first read and that write).
fn in_index_transaction<T>(c: &Connection, f: impl FnOnce() -> Result<T>) -> Result<T> {
    c.execute_batch("BEGIN").map_err(db_err)?;
    match f() {
        Ok(v) => c.execute_batch("COMMIT").map_err(db_err).map(|()| v),
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// One transfer's indexed columns.
struct RoundRow {
    seq: i64,
    key: String,
    id: [u8; 16],
    debit: [u8; 16],
    credit: [u8; 16],
}

/// The committed transfers with seq in `(head, limit]`, in seq order, read outside any
/// transaction of this file (see [`index_round`]).
fn read_round(c: &Connection, head: i64, limit: i64) -> Result<Vec<RoundRow>> {
    let mut stmt = c
        .prepare_cached(
            "SELECT seq, idempotency_key, id, debit_account, credit_account FROM ledger.transfers \
             WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
        )
        .map_err(db_err)?;
    let rows = stmt
        .query_map([head, limit], |r| {
            Ok(RoundRow { seq: r.get(0)?, key: r.get(1)?, id: id_bytes(r, 2)?, debit: id_bytes(r, 3)?, credit: id_bytes(r, 4)? })
        })
        .map_err(|e| LedgerError::Storage(format!("indexing up to transfer {limit}: {e}")))?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| LedgerError::Storage(format!("indexing up to transfer {limit}: {e}")))
}

/// Column `i` of `r`, a 16-byte id.
fn id_bytes(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<[u8; 16]> {
    let blob = r.get_ref(i)?.as_blob()?;
    blob.try_into().map_err(|_| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Blob, format!("an id of {} bytes", blob.len()).into()))
}

/// Inserts a round's entries, each table's in its key order (so each index page is visited
/// once per round, in order).
fn write_round<'r>(c: &Connection, rows: &'r [RoundRow]) -> rusqlite::Result<()> {
    let mut keys: Vec<(&str, i64)> = rows.iter().map(|r| (r.key.as_str(), r.seq)).collect();
    keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
    insert_pairs(c, "transfer_keys (idempotency_key, seq)", keys.into_iter().map(|(key, seq)| (Val::Text(key), seq)))?;
    // (16-byte ids sort as big-endian integers, as SQLite compares their blobs.)
    let mut ids: Vec<(u128, &[u8], i64)> = rows.iter().map(|r| (u128::from_be_bytes(r.id), &r.id[..], r.seq)).collect();
    ids.sort_unstable_by_key(|&(n, _, _)| n);
    insert_pairs(c, "transfer_ids (id, seq)", ids.into_iter().map(|(_, id, seq)| (Val::Blob(id), seq)))?;
    let side = |account: &'r [u8; 16], seq: i64| (u128::from_be_bytes(*account), seq, &account[..]);
    let mut sides: Vec<(u128, i64, &[u8])> = rows.iter().flat_map(|r| [side(&r.debit, r.seq), side(&r.credit, r.seq)]).collect();
    sides.sort_unstable_by_key(|&(n, seq, _)| (n, seq));
    insert_pairs(c, "account_transfers (account, seq)", sides.into_iter().map(|(_, seq, account)| (Val::Blob(account), seq)))
}

/// Rows one INSERT of the indexer writes (one statement per row cost a quarter more).
const INSERT_ROWS_MAX: usize = 128;

/// `INSERT INTO {table} VALUES (?, ?), …` for `rows`, [`INSERT_ROWS_MAX`] at a time.
fn insert_pairs<'a>(c: &Connection, table: &str, rows: impl Iterator<Item = (Val<'a>, i64)>) -> rusqlite::Result<()> {
    let sql = |n: usize| format!("INSERT INTO {table} VALUES {}", vec!["(?, ?)"; n].join(", "));
    let full = RawStmt::prepare(c, &sql(INSERT_ROWS_MAX))?;
    let mut vals: Vec<Val<'a>> = Vec::with_capacity(2 * INSERT_ROWS_MAX);
    for (value, seq) in rows {
        vals.extend([value, Val::Int(seq)]);
        if vals.len() == 2 * INSERT_ROWS_MAX {
            full.run(&vals)?;
            vals.clear();
        }
    }
    if !vals.is_empty() {
        RawStmt::prepare(c, &sql(vals.len() / 2))?.run(&vals)?;
    }
    Ok(())
}

/// A failed bulk insert, named: a primary-key conflict means two transfers share an
/// idempotency key or an id (a key is checked before every insert; an id is 79 random bits
/// after a millisecond timestamp, so only a file written behind the store's back has one),
/// and the ledger needs repair before the index can be built.
fn indexing_error(e: rusqlite::Error, head: i64, upto: i64) -> LedgerError {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => LedgerError::InvariantViolation(
            format!("two transfers in seq {}..={upto} share an idempotency key or an id ({e}); the ledger needs repair", head + 1),
        ),
        e => db_err(e),
    }
}

/// The indexer thread: after each nudge (the writer committed), indexes while at least
/// [`INDEX_FLUSH_ROWS`] committed transfers wait. Ends when the writer does. An error stops
/// the store's writes, as a failed checkpoint does: the writer's tail would otherwise grow
/// until it waits forever.
pub(crate) fn index_loop(c: Connection, nudges: Receiver<()>, shared: &Shared) {
    shared.indexer.register();
    while nudges.recv().is_ok() {
        loop {
            let committed = shared.committed_upto.load(Ordering::SeqCst);
            let behind = committed - shared.indexed_upto.load(Ordering::SeqCst);
            shared.indexer.set_own(if behind > INDEX_BEHIND_ROWS { Background::Behind } else { Background::Idle });
            if behind < INDEX_FLUSH_ROWS as i64 {
                break;
            }
            match index_round(&c, committed) {
                Ok(head) => {
                    if shared.indexed_upto.fetch_max(head, Ordering::SeqCst) >= head {
                        break; // no progress (nothing in range): wait for the next commit
                    }
                }
                Err(e) => {
                    drop(shared.fail(&format!("indexing transfers failed: {e}")));
                    return;
                }
            }
        }
    }
}

/// The indexer thread's scheduling, shared with the writer: the indexer goes idle between
/// rounds when it has caught up, and back to nice 10 when it is behind; the writer moves it
/// to nice 10 itself when the indexer fell behind in the middle of a round (a round of up to
/// [`INDEX_ROUND_ROWS_MAX`] transfers run at `SCHED_IDLE` on cores an engine keeps busy
/// could otherwise take minutes while the writer's tail fills).
#[derive(Debug, Default)]
pub(crate) struct IndexerPriority {
    /// The indexer's thread id (0 until it registers).
    tid: std::sync::atomic::AtomicI32,
    /// Whether it is `SCHED_IDLE` now.
    idle: std::sync::atomic::AtomicBool,
}

impl IndexerPriority {
    /// Called by the indexer thread as it starts: it goes idle.
    pub(crate) fn register(&self) {
        self.tid.store(this_thread_id(), Ordering::SeqCst);
        self.apply_own(Background::Idle);
    }

    /// Called by the indexer thread: schedules it as `p` unless it already is.
    pub(crate) fn set_own(&self, p: Background) {
        if self.idle.load(Ordering::SeqCst) != effective_idle(p) {
            self.apply_own(p);
        }
    }

    fn apply_own(&self, p: Background) {
        set_this_threads_priority(p);
        self.idle.store(effective_idle(p), Ordering::SeqCst);
    }

    /// Called by the writer when the indexer is [`INDEX_BEHIND_ROWS`] behind: moves it to
    /// nice 10 if it is idle.
    pub(crate) fn boost(&self) {
        let tid = self.tid.load(Ordering::SeqCst);
        if tid != 0 && self.idle.swap(false, Ordering::SeqCst) {
            set_priority(tid, false);
        }
    }
}

/// Whether `p` is `SCHED_IDLE` here: `Idle` is nice 10 where it could not be left again.
fn effective_idle(p: Background) -> bool {
    p == Background::Idle && idle_is_reversible()
}

/// How the store's background threads (the indexer, a key filter's builder) are scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Background {
    /// `SCHED_IDLE`: it runs on whatever CPU time no other thread wants, and any thread that
    /// wakes takes its core at once. At 64 writers on two cores the syncer and the callers'
    /// tasks waited 14–33 µs on the run queue per wake-up with the indexer at nice 10, on
    /// the path of every charge (9–19 µs with it idle); as `SCHED_IDLE` it gave 1.07–1.09×
    /// settled charges/s (`Durability::Full`) and 1.08–1.14× (`Normal`) in two alternated
    /// sets (docs/benchmarks.md, session 16).
    Idle,
    /// Nice [`INDEXER_NICE`]: the indexer once it is [`INDEX_BEHIND_ROWS`] behind (moved
    /// there by the writer if it fell behind during a round), so that busy cores cannot
    /// starve it until the writer waits; and a key filter's builder after
    /// `KEY_FILTER_IDLE_SECS_MAX` (starved, it would hold its read snapshots, and no
    /// checkpoint could reset either WAL).
    Behind,
}

/// Schedules the calling thread as `p` (Linux: policies and nice values are per thread).
/// `Idle` is nice [`INDEXER_NICE`] instead where this process could not take a thread out of
/// `SCHED_IDLE` again (that needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of at least 10; see
/// [`idle_is_reversible`]): a thread stuck there could be starved by busy cores.
pub(crate) fn set_this_threads_priority(p: Background) {
    set_priority(0, effective_idle(p));
}

/// Schedules thread `tid` (0: the calling one) as `SCHED_IDLE` or as nice [`INDEXER_NICE`];
/// a failure is reported once per process.
fn set_priority(tid: i32, idle: bool) {
    if let Err(e) = set_policy(tid, idle) {
        static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !REPORTED.swap(true, Ordering::SeqCst) {
            eprintln!("tokenomy-ledger: could not set a background thread's priority (idle: {idle}): {e}");
        }
    }
}

/// Nice [`INDEXER_NICE`], then `SCHED_IDLE` or `SCHED_OTHER` (the nice value is kept under
/// `SCHED_IDLE` and applies again after it).
#[cfg(target_os = "linux")]
fn set_policy(tid: i32, idle: bool) -> std::io::Result<()> {
    let policy = if idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: both calls only read their arguments (`param` lives across the call); a `tid`
    // is a thread of this process (0: the calling one).
    #[allow(unsafe_code)]
    let rc = unsafe {
        match libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, INDEXER_NICE) {
            0 => libc::sched_setscheduler(tid, policy, &param),
            rc => rc,
        }
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
fn set_policy(_: i32, _: bool) -> std::io::Result<()> {
    Ok(())
}

/// The calling thread's id (Linux; 0 elsewhere, where nothing is rescheduled).
fn this_thread_id() -> i32 {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid takes no arguments and cannot fail.
    #[allow(unsafe_code)]
    return unsafe { libc::gettid() };
    #[cfg(not(target_os = "linux"))]
    0
}

/// Whether a thread of this process may leave `SCHED_IDLE` for `SCHED_OTHER` at nice
/// [`INDEXER_NICE`]: tried once, on a thread of its own.
#[cfg(target_os = "linux")]
pub(crate) fn idle_is_reversible() -> bool {
    static REVERSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REVERSIBLE.get_or_init(|| {
        std::thread::Builder::new()
            .name("ledger-sched-probe".into())
            .spawn(|| set_policy(0, true).is_ok() && set_policy(0, false).is_ok())
            .ok()
            .and_then(|t| t.join().ok())
            .unwrap_or(false)
    })
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn idle_is_reversible() -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The indexer goes idle as it starts and back to nice 10 by itself; the writer moves it
    /// to nice 10 from its own thread too (the indexer behind in the middle of a round). Where
    /// this process could not leave `SCHED_IDLE` again, `Idle` is nice 10 alone.
    #[test]
    fn the_indexer_is_idle_until_it_is_behind_and_the_writer_can_move_it() {
        let prio = std::sync::Arc::new(IndexerPriority::default());
        // SAFETY: reading a thread's policy and nice value (0: the calling thread).
        #[allow(unsafe_code)]
        let of = |tid: i32| unsafe { (libc::sched_getscheduler(tid), libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)) };
        let idle = if idle_is_reversible() { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
        let (registered_tx, registered) = std::sync::mpsc::channel();
        let (boosted_tx, boosted) = std::sync::mpsc::channel::<()>();
        let p = prio.clone();
        let indexer = std::thread::spawn(move || {
            p.register();
            assert_eq!(of(0), (idle, INDEXER_NICE));
            p.set_own(Background::Behind);
            assert_eq!(of(0), (libc::SCHED_OTHER, INDEXER_NICE));
            p.set_own(Background::Idle);
            registered_tx.send(this_thread_id()).unwrap();
            boosted.recv().unwrap();
            assert_eq!(of(0), (libc::SCHED_OTHER, INDEXER_NICE), "moved by the writer");
        });
        let tid = registered.recv().unwrap();
        assert_eq!(of(tid), (idle, INDEXER_NICE));
        prio.boost();
        boosted_tx.send(()).unwrap();
        indexer.join().unwrap();
    }

    /// A ledger file with `n` more transfers (two accounts, posted mints' shape).
    fn add_transfers(ledger: &Connection, from: i64, n: i64) {
        let mut insert = ledger
            .prepare(
                "INSERT INTO transfers (seq, id, idempotency_key, debit_account, credit_account, amount_micros, code, state, \
                 hold, timeout_ms, expires_at_ms, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, 1, 0, 1, 0, 0, 0, 0)",
            )
            .unwrap();
        for seq in from..from + n {
            let id = (seq as u128 * 0x9E37_79B9_7F4A_7C15).to_be_bytes();
            let (a, b) = ((seq as u128 % 7).to_be_bytes(), (100 + seq as u128 % 5).to_be_bytes());
            insert.execute(params![seq, &id[..], format!("key-{}", seq * 7919 % 100_003), &a[..], &b[..]]).unwrap();
        }
    }

    /// A round reads its transfers and lets go of the ledger before it writes: while its
    /// write transaction is open, the ledger's WAL can be checkpointed to its end and
    /// truncated. (It could not under `BEGIN IMMEDIATE`: that begins a read transaction on
    /// the attached ledger too.) Its entries are then all there.
    #[test]
    fn a_round_holds_no_ledger_snapshot_while_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let ledger = Connection::open(&path).unwrap();
        ledger.execute_batch("PRAGMA journal_mode=WAL;").unwrap();
        ledger.execute_batch(include_str!("sql/sqlite_schema.sql")).unwrap();
        add_transfers(&ledger, 1, 300);
        let c = open(&path).unwrap();
        assert_eq!(indexed_upto(&c).unwrap(), 300);
        add_transfers(&ledger, 301, 2 * INSERT_ROWS_MAX as i64 + 3);
        let last = 300 + 2 * INSERT_ROWS_MAX as i64 + 3;
        let rows = read_round(&c, 300, last).unwrap();
        assert_eq!((rows.len(), rows[0].seq, rows.last().unwrap().seq), (last as usize - 300, 301, last));
        let checkpoint = || -> (i64, i64, i64) {
            ledger.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap()
        };
        // The round's write transaction, open: the ledger is free.
        in_index_transaction(&c, || {
            assert_eq!(indexed_upto(&c)?, 300);
            write_round(&c, &rows[..10]).map_err(db_err)?;
            add_transfers(&ledger, last + 1, 1);
            assert_eq!(checkpoint(), (0, 0, 0), "the ledger's WAL was checkpointed and truncated");
            Err::<(), _>(LedgerError::Storage("rolled back".into()))
        })
        .unwrap_err();
        // The same under BEGIN IMMEDIATE: the checkpoint cannot pass the indexer's snapshot.
        ledger.busy_timeout(std::time::Duration::ZERO).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        add_transfers(&ledger, last + 2, 1);
        assert_eq!(checkpoint().0, 1, "busy");
        c.execute_batch("ROLLBACK").unwrap();
        assert_eq!(index_round(&c, last).unwrap(), last);
        let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(count("SELECT COUNT(*) FROM transfer_keys"), last);
        assert_eq!(count("SELECT COUNT(*) FROM transfer_ids"), last);
        assert_eq!(count("SELECT COUNT(*) FROM account_transfers"), 2 * last);
        let missing = format!(
            "SELECT COUNT(*) FROM ledger.transfers t WHERE t.seq <= {last} AND (NOT EXISTS (SELECT 1 FROM transfer_keys k \
             WHERE k.idempotency_key = t.idempotency_key AND k.seq = t.seq) OR NOT EXISTS (SELECT 1 FROM transfer_ids i \
             WHERE i.id = t.id AND i.seq = t.seq) OR NOT EXISTS (SELECT 1 FROM account_transfers a \
             WHERE a.account = t.credit_account AND a.seq = t.seq))"
        );
        assert_eq!(count(&missing), 0);
        let key_at_head: String = c.query_row("SELECT key_at_head FROM index_head", [], |r| r.get(0)).unwrap();
        assert_eq!(key_at_head, format!("key-{}", last * 7919 % 100_003));
    }
}
