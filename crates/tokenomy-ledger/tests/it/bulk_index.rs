//! The SQLite store's bulk index tables (`transfer_keys`, `account_transfers`, in the index
//! file next to the ledger): statements and idempotency keys work the same on both sides of
//! `index_head.indexed_upto`, across a restart, after the index file is lost or no longer
//! matches the ledger, and after a version-2, -3 or -4 file is migrated; `check` notices a
//! tampered table.

use std::sync::Arc;

use rusqlite::Connection;
use tokenomy_ledger::sqlite::{index_path, INDEX_FLUSH_ROWS};
use tokenomy_ledger::*;

const C: i64 = MICROS_PER_CREDIT;

/// Ids of `account`'s transfers, read straight from `transfers` in seq order.
fn ids_in_file(path: &std::path::Path, account: AccountId) -> Vec<TransferId> {
    let c = Connection::open(path).unwrap();
    let mut s = c.prepare("SELECT id FROM transfers WHERE debit_account = ?1 OR credit_account = ?1 ORDER BY seq").unwrap();
    let rows = s.query_map([&account.to_bytes()[..]], |r| r.get::<_, Vec<u8>>(0)).unwrap();
    rows.map(|r| TransferId::from_slice(&r.unwrap()).unwrap()).collect()
}

/// Ids of `account`'s statement, paged `page` at a time, oldest first.
async fn statement_ids<S: LedgerStore>(s: &S, account: AccountId, page: u32) -> Vec<TransferId> {
    paged_ids(account, page, |a, c, n| s.statement(a, c, n)).await
}

/// Ids of `account`'s statement newest first, paged `page` at a time.
async fn newest_first_ids<S: LedgerStore>(s: &S, account: AccountId, page: u32) -> Vec<TransferId> {
    paged_ids(account, page, |a, c, n| s.statement_newest_first(a, c, n)).await
}

async fn paged_ids<F, Fut>(account: AccountId, page: u32, read: F) -> Vec<TransferId>
where
    F: Fn(AccountId, Option<u64>, u32) -> Fut,
    Fut: std::future::Future<Output = Result<Page<Transfer>>>,
{
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let p = read(account, cursor, page).await.unwrap();
        ids.extend(p.items.iter().map(|t| t.id));
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => return ids,
        }
    }
}

/// The index file's head, read beside the store.
fn indexed_upto(path: &std::path::Path) -> i64 {
    Connection::open(index_path(path)).unwrap().query_row("SELECT indexed_upto FROM index_head", [], |r| r.get(0)).unwrap()
}

/// Waits (up to 30 s) for the indexer thread to index past `seq`.
async fn indexed_past(path: &std::path::Path, seq: i64) -> i64 {
    for _ in 0..3000 {
        let upto = indexed_upto(path);
        if upto > seq {
            return upto;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the index never passed transfer {seq}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_and_retries_span_the_bulk_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let s = Arc::new(SqliteStore::open_with(&path, Durability::Normal).unwrap());
    let mut accounts = Vec::new();
    for i in 0..3 {
        let a = s.create_account(&format!("a{i}"), AccountKind::User).await.unwrap();
        s.mint(a.id, 1_000_000 * C, &format!("m{i}"), None).await.unwrap();
        accounts.push(a.id);
    }
    // Enough hold + settle pairs (two transfers each) for one flush and a tail.
    let pairs = INDEX_FLUSH_ROWS * 3 / 4;
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let (s, accounts) = (s.clone(), accounts.clone());
            tokio::spawn(async move {
                for i in (w..pairs).step_by(16) {
                    let h = s.hold(accounts[i % 3], 100, &format!("h{i}"), 60_000, now_ms()).await.unwrap();
                    s.settle(h.id, 1 + i as i64 % 100, now_ms(), None).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // The indexer thread indexes what the writer committed, once 2 048 transfers wait.
    let upto = indexed_past(&path, 0).await;
    // Transfers after that stay in the writer's tail: fewer than 2 048 wait.
    let first = s.hold(accounts[0], 100, "h0", 60_000, now_ms()).await.unwrap();
    let last_key = format!("h{}", pairs - 1);
    let last = s.hold(accounts[(pairs - 1) % 3], 100, &last_key, 60_000, now_ms()).await.unwrap();
    let (tail_key, tail_hold) = ("tail".to_string(), s.hold(accounts[1], 100, "tail", 60_000, now_ms()).await.unwrap());
    assert_eq!(indexed_upto(&path), upto, "the index holds still while fewer than {INDEX_FLUSH_ROWS} wait");
    assert!(upto < (2 * pairs + 4) as i64, "indexed up to {upto}: some transfers are in the tail");
    for (round, s) in [s.clone(), Arc::new(SqliteStore::open_with(&path, Durability::Normal).unwrap())].into_iter().enumerate() {
        let report = s.check().await.unwrap();
        assert!(report.ok, "round {round}: {:?}", report.problems);
        for a in &accounts {
            let expected = ids_in_file(&path, *a);
            assert_eq!(statement_ids(&*s, *a, 97).await, expected, "round {round}");
            assert_eq!(statement_ids(&*s, *a, 1000).await, expected, "round {round}");
            let reversed: Vec<TransferId> = expected.iter().rev().copied().collect();
            assert_eq!(newest_first_ids(&*s, *a, 97).await, reversed, "round {round}: newest first, across the index's head");
            assert_eq!(newest_first_ids(&*s, *a, 1).await, reversed, "round {round}");
        }
        // A key from the indexed part and one from the tail replay their holds...
        assert_eq!(s.hold(accounts[0], 100, "h0", 60_000, now_ms()).await.unwrap(), first);
        assert_eq!(s.hold(accounts[(pairs - 1) % 3], 100, &last_key, 60_000, now_ms()).await.unwrap(), last);
        assert_eq!(s.hold(accounts[1], 100, &tail_key, 60_000, now_ms()).await.unwrap(), tail_hold);
        // ...and conflict when the parameters differ.
        let err = s.hold(accounts[0], 101, "h0", 60_000, now_ms()).await.unwrap_err();
        assert!(matches!(err, LedgerError::IdempotencyConflict { .. }), "{err:?}");
    }
    // Behind the store's back: one key row deleted.
    let c = Connection::open(index_path(&path)).unwrap();
    c.execute("DELETE FROM transfer_keys WHERE idempotency_key = 'h0'", []).unwrap();
    let report = s.check().await.unwrap();
    assert!(!report.ok);
    assert!(report.problems.iter().any(|p| p.starts_with("transfer_keys has")), "{:?}", report.problems);
}

/// Deletes the index file (and its WAL), once the dropped store's threads have closed it.
async fn remove_index_file(path: &std::path::Path) {
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", index_path(path).display()));
    }
}

/// A store on `path` (FULL durability) with one user account funded with 10 credits.
async fn funded(path: &std::path::Path) -> (SqliteStore, Account) {
    let s = SqliteStore::open(path).unwrap();
    let a = s.create_account("a", AccountKind::User).await.unwrap();
    s.mint(a.id, 10 * C, "m", None).await.unwrap();
    (s, a)
}

/// A settlement can be the first transfer a writer inserts: after a restart, and after
/// another connection's commit made it drop what it knew (found in review: the tail was then
/// loaded after the settlement's INSERT, with the new row already in it).
#[tokio::test]
async fn a_settlement_is_the_first_write_after_a_restart_or_a_foreign_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let (a, h1, h2) = {
        let (s, a) = funded(&path).await;
        let h1 = s.hold(a.id, C, "h1", 60_000, now_ms()).await.unwrap();
        let h2 = s.hold(a.id, C, "h2", 60_000, now_ms()).await.unwrap();
        (a, h1, h2)
    };
    let s = SqliteStore::open(&path).unwrap();
    s.settle(h1.id, C / 2, now_ms(), None).await.unwrap();
    Connection::open(&path).unwrap().execute("UPDATE accounts SET name = 'renamed' WHERE name = 'a'", []).unwrap();
    s.settle(h2.id, C / 4, now_ms(), None).await.unwrap();
    s.hold(a.id, C, "h3", 60_000, now_ms()).await.unwrap();
    let report = s.check().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(statement_ids(&s, a.id, 100).await, ids_in_file(&path, a.id));
}

/// Waits until the store's key filter is built. The writer looks after its filters around
/// batches only, so this sends it writes that change nothing (an expiry sweep).
async fn key_filter_ready(s: &SqliteStore) {
    for _ in 0..500 {
        if s.key_filter_ready() {
            return;
        }
        s.expire_holds(now_ms()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the key filter was not built within 10 s");
}

/// Another process on the same file (here a second and a third store) may index its keys
/// before this store's writer sees them: the writer then drops its key filter, or it would
/// call those keys new (debug builds panic on that; release builds would place a second
/// hold under the key). Found in review of the key filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_another_process_indexed_are_found_after_its_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let (s, a) = funded(&path).await;
    key_filter_ready(&s).await;
    let theirs = {
        let other = SqliteStore::open(&path).unwrap();
        let h = other.hold(a.id, C, "theirs", 60_000, now_ms()).await.unwrap();
        drop(other);
        // A third store's open indexes every committed transfer, "theirs" included.
        drop(SqliteStore::open(&path).unwrap());
        h
    };
    let again = s.hold(a.id, C, "theirs", 60_000, now_ms()).await.unwrap();
    assert_eq!(again.id, theirs.id, "a second hold under the same key");
    key_filter_ready(&s).await;
    assert_eq!(s.hold(a.id, C, "theirs", 60_000, now_ms()).await.unwrap().id, theirs.id);
    s.hold(a.id, C, "mine", 60_000, now_ms()).await.unwrap();
    let report = s.check().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(s.get_account(a.id).await.unwrap().pending_micros, 2 * C);
}

#[tokio::test]
async fn a_key_reused_behind_the_stores_back_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let (s, _) = funded(&path).await;
    let c = Connection::open(&path).unwrap();
    c.execute(
        "INSERT INTO transfers (id, idempotency_key, debit_account, credit_account, amount_micros, code, state, hold, \
         timeout_ms, expires_at_ms, created_at_ms) SELECT ?1, idempotency_key, debit_account, credit_account, \
         amount_micros, code, state, hold, timeout_ms, expires_at_ms, created_at_ms FROM transfers",
        [&TransferId(7).to_bytes()[..]],
    )
    .unwrap();
    let report = s.check().await.unwrap();
    assert!(report.problems.iter().any(|p| p == "1 idempotency keys are used twice"), "{:?}", report.problems);
}

/// A version-2 file (scattered indexes inside `transfers`) opens as version 6: its
/// transfers are in the bulk index tables, statements and retries see them.
#[tokio::test]
async fn sqlite_file_of_schema_v2_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let (a, h, posted) = {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(include_str!("../data/sqlite_schema_v2.sql")).unwrap();
        c.execute_batch("UPDATE schema_version SET version = 2").unwrap();
        drop(c);
        // Version-2 rows, written the way a version-2 build wrote them.
        let (s, a) = funded(&path).await;
        let h = s.hold(a.id, C, "h", 60_000, now_ms()).await.unwrap();
        let posted = s.settle(h.id, C / 2, now_ms(), None).await.unwrap().posted.unwrap();
        drop(s);
        // Put the version-2 table back, as if this build had never opened the file.
        remove_index_file(&path).await;
        let c = Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "ALTER TABLE transfers RENAME TO t3; DROP INDEX transfers_pending; {} \
             INSERT INTO transfers SELECT {V4_TRANSFER_COLS} FROM t3; DROP TABLE t3; UPDATE schema_version SET version = 2;",
            include_str!("../data/sqlite_schema_v2.sql")
        ))
        .unwrap();
        (a, h, posted)
    };
    let s = SqliteStore::open(&path).unwrap();
    let version: i64 = Connection::open(&path).unwrap().query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 6);
    let report = s.check().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert!(indexed_upto(&path) >= 3);
    let ids = statement_ids(&s, a.id, 2).await;
    assert_eq!(ids, ids_in_file(&path, a.id));
    assert_eq!(ids.len(), 3);
    assert_eq!(s.hold(a.id, C, "h", 60_000, now_ms()).await.unwrap().id, h.id);
    assert_eq!(s.settle(h.id, C / 2, now_ms(), None).await.unwrap().posted.unwrap(), posted);
    let h2 = s.hold(a.id, C, "h2", 60_000, now_ms()).await.unwrap();
    s.settle(h2.id, C, now_ms(), None).await.unwrap();
    assert_eq!(statement_ids(&s, a.id, 2).await.len(), 5);
    assert!(s.check().await.unwrap().ok);
}

/// A file of a later schema version than this build's is refused, with a message.
#[tokio::test]
async fn sqlite_file_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    drop(SqliteStore::open(&path).unwrap());
    Connection::open(&path).unwrap().execute_batch("UPDATE schema_version SET version = 7").unwrap();
    let err = SqliteStore::open(&path).err().expect("refused");
    assert!(err.to_string().contains("newer than this tokenomy's 6"), "{err}");
}

/// A store with one account, a settled hold and a pending one; returns what a reopened store
/// must still know: the account, the pending hold, and the settled hold's settlement.
async fn some_transfers(path: &std::path::Path) -> (Account, Transfer, Transfer) {
    let (s, a) = funded(path).await;
    let h = s.hold(a.id, C, "h", 60_000, now_ms()).await.unwrap();
    let posted = s.settle(h.id, C / 2, now_ms(), None).await.unwrap().posted.unwrap();
    let pending = s.hold(a.id, C, "p", 60_000, now_ms()).await.unwrap();
    (a, pending, posted)
}

/// What every reopened store below must show: `check` ok, the index file up to date, the
/// statement complete, and both keys replayed (not used twice).
async fn reopened_store_knows(path: &std::path::Path, a: &Account, pending: &Transfer, posted: &Transfer) {
    let s = SqliteStore::open(path).unwrap();
    let report = s.check().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(indexed_upto(path), 4, "mint, hold, settlement, hold: all indexed at open");
    assert_eq!(statement_ids(&s, a.id, 3).await, ids_in_file(path, a.id));
    assert_eq!(&s.hold(a.id, C, "p", 60_000, now_ms()).await.unwrap(), pending);
    assert_eq!(s.settle(posted.pending_id.unwrap(), C / 2, now_ms(), None).await.unwrap().posted.as_ref(), Some(posted));
    let err = s.mint(a.id, C, "h", None).await.unwrap_err();
    assert!(matches!(err, LedgerError::IdempotencyConflict { .. }), "{err:?}");
}

/// The index file is derived data: lost, it is rebuilt from the ledger when the store opens.
#[tokio::test]
async fn a_lost_index_file_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let (a, pending, posted) = some_transfers(&path).await;
    assert_eq!(index_path(&path), dir.path().join("ledger-index.sqlite"));
    remove_index_file(&path).await;
    reopened_store_knows(&path, &a, &pending, &posted).await;
}

/// An index file that no longer matches the ledger (after a power loss took back the ledger's
/// last commits, the index may hold transfers the ledger lost) is emptied and rebuilt.
#[tokio::test]
async fn an_index_file_ahead_of_the_ledger_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let (a, pending, posted) = some_transfers(&path).await;
    // As if it had indexed a fifth transfer, under a key the ledger no longer has.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let c = Connection::open(index_path(&path)).unwrap();
    c.execute_batch(
        "INSERT INTO transfer_keys VALUES ('lost', 5); UPDATE index_head SET indexed_upto = 5, key_at_head = 'lost';",
    )
    .unwrap();
    drop(c);
    reopened_store_knows(&path, &a, &pending, &posted).await;
    let lost: i64 = Connection::open(index_path(&path)).unwrap().query_row("SELECT COUNT(*) FROM transfer_keys WHERE idempotency_key = 'lost'", [], |r| r.get(0)).unwrap();
    assert_eq!(lost, 0);
}

/// `transfers`' columns up to version 4 (version 5 added `log_index`).
const V4_TRANSFER_COLS: &str = "seq, id, idempotency_key, debit_account, credit_account, amount_micros, code, state, hold, \
     timeout_ms, expires_at_ms, created_at_ms, pending_id, key_id";

/// A version-4 file (`log_entries.transfer_id` UNIQUE, an index on settlements' `pending_id`,
/// no `transfers.log_index`) opens as version 6: both indexes gone, every receipted posting
/// naming its log entry, the log and its append-only triggers kept, retries still answered
/// with their entry, and `check` ok.
#[tokio::test]
async fn sqlite_file_of_schema_v4_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let leaf: Leaf = Arc::new(|i: u64, t: &Transfer| [i.to_be_bytes().as_slice(), &t.id.to_bytes()].concat());
    let (a, h, settled) = {
        let s = SqliteStore::open(&path).unwrap();
        let a = s.create_account("a", AccountKind::User).await.unwrap();
        s.mint(a.id, 10 * C, "m", Some(leaf.clone())).await.unwrap();
        let h = s.hold(a.id, C, "h", 60_000, now_ms()).await.unwrap();
        let settled = s.settle(h.id, C / 2, now_ms(), Some(leaf.clone())).await.unwrap();
        assert_eq!(settled.log_index, Some(1));
        (a, h, settled)
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Make it the file a version-4 build wrote.
    let c = Connection::open(&path).unwrap();
    c.execute_batch(&format!(
        "DROP TRIGGER log_entries_no_update; DROP TRIGGER log_entries_no_delete; \
         ALTER TABLE log_entries RENAME TO l5; ALTER TABLE transfers RENAME TO t5; DROP INDEX transfers_pending; {} \
         INSERT INTO log_entries SELECT * FROM l5; INSERT INTO transfers SELECT {V4_TRANSFER_COLS} FROM t5; \
         DROP TABLE l5; DROP TABLE t5; UPDATE schema_version SET version = 4;",
        include_str!("../data/sqlite_schema_v4.sql")
    ))
    .unwrap();
    let settlement_index: i64 =
        c.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'transfers_settlement'", [], |r| r.get(0)).unwrap();
    assert_eq!(settlement_index, 1, "the version-4 file has the index");
    drop(c);
    let s = SqliteStore::open(&path).unwrap();
    let report = s.check().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    let c = Connection::open(&path).unwrap();
    let (version, settlement_index, unique_log): (i64, i64, i64) = c
        .query_row(
            "SELECT (SELECT version FROM schema_version), \
                    (SELECT COUNT(*) FROM sqlite_master WHERE name = 'transfers_settlement'), \
                    (SELECT COUNT(*) FROM pragma_index_list('log_entries') WHERE origin = 'u')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((version, settlement_index, unique_log), (6, 0, 0));
    let named: Vec<Option<i64>> =
        c.prepare("SELECT log_index FROM transfers ORDER BY seq").unwrap().query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect();
    assert_eq!(named, vec![Some(0), None, Some(1)], "mint, hold, settlement");
    assert!(c.execute("DELETE FROM log_entries", []).is_err(), "the log is still append-only");
    drop(c);
    assert_eq!(s.log_entries(0, 10).await.unwrap().len(), 2);
    assert_eq!(s.settle(h.id, C / 2, now_ms(), Some(leaf.clone())).await.unwrap(), settled, "a retry finds its entry");
    let h2 = s.hold(a.id, C, "h2", 60_000, now_ms()).await.unwrap();
    assert_eq!(s.settle(h2.id, C, now_ms(), Some(leaf)).await.unwrap().log_index, Some(2));
    assert!(s.check().await.unwrap().ok);
}

/// A version-5 file (`transfers.id` UNIQUE, an index file without `transfer_ids`) opens as
/// version 6: no index on `transfers.id`, the index file indexed again with the ids, and
/// holds found by id (a settlement's retry, a void, an extension) through it.
#[tokio::test]
async fn sqlite_file_of_schema_v5_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let (a, pending, posted) = some_transfers(&path).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let c = Connection::open(&path).unwrap();
    c.execute_batch(&format!(
        "ALTER TABLE transfers RENAME TO t6; DROP INDEX transfers_pending; {} \
         INSERT INTO transfers SELECT * FROM t6; DROP TABLE t6; UPDATE schema_version SET version = 5;",
        include_str!("../data/sqlite_schema_v5.sql")
    ))
    .unwrap();
    drop(c);
    // The index file of a version-5 build: indexed, without ids.
    let ix = Connection::open(index_path(&path)).unwrap();
    ix.execute_batch("DELETE FROM transfer_ids").unwrap();
    drop(ix);
    reopened_store_knows(&path, &a, &pending, &posted).await;
    let c = Connection::open(&path).unwrap();
    let (version, unique): (i64, i64) = c
        .query_row(
            "SELECT (SELECT version FROM schema_version), (SELECT COUNT(*) FROM pragma_index_list('transfers') WHERE origin = 'u')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((version, unique), (6, 0));
    let ids: i64 = Connection::open(index_path(&path)).unwrap().query_row("SELECT COUNT(*) FROM transfer_ids", [], |r| r.get(0)).unwrap();
    assert_eq!(ids, 4, "mint, hold, settlement, hold");
    // Found by id after a restart (nothing cached): extended, then voided.
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.extend_holds(&[pending.id], pending.expires_at_ms + 1).await.unwrap(), 1);
    assert_eq!(s.void(pending.id).await.unwrap().state, TransferState::Voided);
    assert!(s.check().await.unwrap().ok);
}

/// Nothing on the commit path refuses a second transfer with an id already used (ids are 79
/// random bits after a millisecond timestamp): one written behind the store's back stops the
/// index from being built, and the store says why instead of opening on it.
#[tokio::test]
async fn a_transfer_id_used_twice_is_named_when_indexing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let (a, pending, _) = some_transfers(&path).await;
    remove_index_file(&path).await;
    let c = Connection::open(&path).unwrap();
    c.execute(
        "INSERT INTO transfers (id, idempotency_key, debit_account, credit_account, amount_micros, code, state, hold, \
         timeout_ms, expires_at_ms, created_at_ms) VALUES (?1, 'copy', ?2, ?3, 1, 1, 2, 1, 60000, 0, 0)",
        rusqlite::params![&pending.id.to_bytes()[..], &a.id.to_bytes()[..], &OPERATOR_REVENUE.to_bytes()[..]],
    )
    .unwrap();
    drop(c);
    let err = SqliteStore::open(&path).err().expect("refused");
    assert!(err.to_string().contains("share an idempotency key or an id"), "{err}");
}

/// A version-3 file (bulk index tables inside the ledger file) opens as version 6: the tables
/// leave the ledger file and are rebuilt in the index file.
#[tokio::test]
async fn sqlite_file_of_schema_v3_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let (a, pending, posted) = some_transfers(&path).await;
    // Make it the file a version-3 build wrote: its tables, filled, and no index file.
    remove_index_file(&path).await;
    let c = Connection::open(&path).unwrap();
    c.execute_batch(include_str!("../data/sqlite_schema_v3.sql")).unwrap();
    c.execute_batch(
        "INSERT INTO transfer_keys SELECT idempotency_key, seq FROM transfers; \
         INSERT INTO account_transfers SELECT debit_account, seq FROM transfers UNION ALL SELECT credit_account, seq FROM transfers; \
         UPDATE index_head SET indexed_upto = 4; UPDATE schema_version SET version = 3;",
    )
    .unwrap();
    drop(c);
    reopened_store_knows(&path, &a, &pending, &posted).await;
    let c = Connection::open(&path).unwrap();
    let version: i64 = c.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
    let old_tables: i64 = c
        .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name IN ('transfer_keys', 'account_transfers', 'index_head')", [], |r| r.get(0))
        .unwrap();
    assert_eq!((version, old_tables), (6, 0));
}

/// `check` runs while writers commit and the indexer indexes behind them: it must never see
/// the index file ahead of its own view of the ledger (it reads the index file first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_is_consistent_while_the_indexer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let s = Arc::new(SqliteStore::open_with(&path, Durability::Normal).unwrap());
    let a = s.create_account("a", AccountKind::User).await.unwrap();
    s.mint(a.id, 1_000_000 * C, "m", None).await.unwrap();
    let pairs = 2 * INDEX_FLUSH_ROWS;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in (w..pairs).step_by(8) {
                    let h = s.hold(a.id, 100, &format!("h{i}"), 60_000, now_ms()).await.unwrap();
                    s.settle(h.id, 1, now_ms(), None).await.unwrap();
                }
            })
        })
        .collect();
    let mut checks = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        let report = s.check().await.unwrap();
        assert!(report.ok, "check {checks}: {:?}", report.problems);
        checks += 1;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(indexed_past(&path, 0).await > 0, "the indexer ran during the test");
    assert!(s.check().await.unwrap().ok);
    assert!(checks > 1, "{checks} checks");
}
