//! `check` finds what a store's own API can never produce: rows written behind its back;
//! the SQLite writer notices another connection's commits; a store reopens with its log.
//! The tampering tests write to a real database behind the store's back (the SQLite file,
//! the PostgreSQL schema) and expect `check` to name the problem.

use std::sync::Arc;

use tokenomy_ledger::*;

const C: i64 = MICROS_PER_CREDIT;

/// A mint with a log entry and a voided hold: the setup both stores tamper with.
async fn voided_hold<S: LedgerStore>(s: &S) -> (Account, Transfer) {
    let a = s.create_account("a", AccountKind::User).await.unwrap();
    let leaf: Leaf = Arc::new(|i: u64, t: &Transfer| [i.to_be_bytes().as_slice(), &t.id.to_bytes()].concat());
    s.mint(a.id, 10 * C, "m", Some(leaf)).await.unwrap();
    let h = s.hold(a.id, C, "h", 60_000, now_ms()).await.unwrap();
    s.void(h.id).await.unwrap();
    let report = s.check().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    (a, h)
}

fn assert_names_orphan(report: &CheckReport) {
    assert!(!report.ok);
    assert!(
        report.problems.iter().any(|p| p == "1 log entries name no posted transfer"),
        "{:?}",
        report.problems
    );
}

#[tokio::test]
async fn sqlite_log_entry_for_a_voided_hold_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let s = SqliteStore::open(&path).unwrap();
    let (a, h) = voided_hold(&s).await;
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute(
        "INSERT INTO log_entries (log_index, transfer_id, account_id, leaf_bytes) VALUES (1, ?1, ?2, x'00')",
        rusqlite::params![h.id.to_bytes().to_vec(), a.id.to_bytes().to_vec()],
    )
    .unwrap();
    assert_names_orphan(&s.check().await.unwrap());
}

/// Since schema version 5 no index on the SQLite file refuses a second settlement of one
/// hold or a second log entry of one posting: `check` must find both, written behind the
/// store's back. (PostgreSQL keeps its unique indexes: such rows cannot be written there.)
#[tokio::test]
async fn sqlite_a_second_settlement_or_log_entry_fails_check() {
    let copy = "INSERT INTO transfers (id, idempotency_key, debit_account, credit_account, amount_micros, code, state, hold, \
         timeout_ms, expires_at_ms, created_at_ms, pending_id, key_id, log_index) SELECT randomblob(16), {key}, debit_account, \
         credit_account, amount_micros, code, state, hold, timeout_ms, expires_at_ms, created_at_ms, pending_id, key_id, NULL \
         FROM transfers WHERE pending_id IS NOT NULL;";
    // The same hold settled twice, under its derived key (then used twice) or another one
    // (a key not derived from its hold, and two settlements for one posted hold).
    let twice = settled_then_tampered(&copy.replace("{key}", "idempotency_key")).await;
    assert!(twice.iter().any(|p| p.contains("idempotency keys are used twice")), "{twice:?}");
    let other_key = settled_then_tampered(&copy.replace("{key}", "'other'")).await;
    assert!(other_key.iter().any(|p| p == "2 unbalanced or degenerate transfers"), "{other_key:?}");
    // A posting's entry appended twice; a posting naming an entry that names another.
    let entry_twice = settled_then_tampered(
        "INSERT INTO log_entries SELECT log_index + 1, transfer_id, account_id, leaf_bytes FROM log_entries WHERE log_index = 0;",
    )
    .await;
    assert!(entry_twice.iter().any(|p| p == "1 log entries name no posted transfer"), "{entry_twice:?}");
    let misnamed = settled_then_tampered("UPDATE transfers SET log_index = 7 WHERE log_index = 0;").await;
    assert!(misnamed.iter().any(|p| p == "1 transfers name a log entry that does not name them"), "{misnamed:?}");
}

/// A receipted settlement, then `sql` run on the file behind the store's back: `check`'s problems.
async fn settled_then_tampered(sql: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let s = SqliteStore::open(&path).unwrap();
    let a = s.create_account("a", AccountKind::User).await.unwrap();
    let leaf: Leaf = Arc::new(|i: u64, t: &Transfer| [i.to_be_bytes().as_slice(), &t.id.to_bytes()].concat());
    s.mint(a.id, 10 * C, "m", None).await.unwrap();
    let h = s.hold(a.id, C, "h", 60_000, now_ms()).await.unwrap();
    assert_eq!(s.settle(h.id, C / 2, now_ms(), Some(leaf)).await.unwrap().log_index, Some(0));
    assert!(s.check().await.unwrap().ok);
    rusqlite::Connection::open(&path).unwrap().execute_batch(sql).unwrap();
    let report = s.check().await.unwrap();
    assert!(!report.ok, "{sql}");
    report.problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_log_entry_for_a_voided_hold_fails_check() {
    let Ok(url) = std::env::var(crate::PG_ENV) else { return };
    let schema = crate::test_schema(&url).await;
    let s = PgStore::open_in_schema(&url, &schema, 2).await.unwrap();
    let (a, h) = voided_hold(&s).await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let sql = format!(
        "INSERT INTO {schema}.log_entries (log_index, transfer_id, account_id, leaf_bytes) VALUES (1, $1, $2, '\\x00'::bytea)"
    );
    client.execute(&sql, &[&h.id.to_bytes().to_vec(), &a.id.to_bytes().to_vec()]).await.unwrap();
    assert_names_orphan(&s.check().await.unwrap());
}

/// PostgreSQL lists pending holds in `pending_holds` (the expiry sweep reads only that): a
/// pending hold missing from it would never expire, so `check` compares the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pending_hold_unlisted_fails_check() {
    let Ok(url) = std::env::var(crate::PG_ENV) else { return };
    let schema = crate::test_schema(&url).await;
    let s = PgStore::open_in_schema(&url, &schema, 2).await.unwrap();
    let a = s.create_account("a", AccountKind::User).await.unwrap();
    s.mint(a.id, 10 * C, "m", None).await.unwrap();
    let h = s.hold(a.id, C, "h", 60_000, now_ms()).await.unwrap();
    assert!(s.check().await.unwrap().ok);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let n = client.execute(&format!("DELETE FROM {schema}.pending_holds WHERE id = $1"), &[&h.id.to_bytes().to_vec()]).await.unwrap();
    assert_eq!(n, 1);
    let report = s.check().await.unwrap();
    assert!(!report.ok);
    assert!(report.problems.iter().any(|p| p == "1 pending holds differ between transfers and pending_holds"), "{:?}", report.problems);
    // Such a hold still settles (its customer's funds are not stuck), which ends the mismatch.
    s.settle(h.id, C / 2, now_ms(), None).await.unwrap();
    assert!(s.check().await.unwrap().ok);
    // A row naming a hold that is no longer pending: reported, and dropped (not voided, not
    // counted) by the expiry sweep once expired.
    client.execute(&format!("INSERT INTO {schema}.pending_holds VALUES ($1, 1)"), &[&h.id.to_bytes().to_vec()]).await.unwrap();
    assert!(!s.check().await.unwrap().ok);
    assert_eq!(s.expire_holds(now_ms()).await.unwrap(), 0);
    assert!(s.check().await.unwrap().ok);
    let left: i64 = client.query_one(&format!("SELECT COUNT(*) FROM {schema}.pending_holds"), &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
}

/// A store closed and opened again (the WAL is gone after a clean close) keeps its data, and
/// its log reads up to its last entry, with either durability.
#[tokio::test]
async fn sqlite_reopens_with_its_log() {
    for durability in [Durability::Full, Durability::Normal] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let leaf: Leaf = Arc::new(|i: u64, t: &Transfer| [i.to_be_bytes().as_slice(), &t.id.to_bytes()].concat());
        let a = {
            let s = SqliteStore::open_with(&path, durability).unwrap();
            let a = s.create_account("a", AccountKind::User).await.unwrap();
            s.mint(a.id, 10 * C, "m", Some(leaf.clone())).await.unwrap();
            let h = s.hold(a.id, C, "h", 60_000, now_ms()).await.unwrap();
            s.settle(h.id, C / 2, now_ms(), Some(leaf.clone())).await.unwrap();
            assert_eq!(s.log_size().await.unwrap(), 2);
            a
        };
        // The threads end once the store is dropped; give them a moment to close the file.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let s = SqliteStore::open_with(&path, durability).unwrap();
        assert_eq!(s.log_size().await.unwrap(), 2, "{durability:?}");
        assert_eq!(s.log_entries(0, 10).await.unwrap().len(), 2);
        assert_eq!(s.get_account(a.id).await.unwrap().balance_micros, 10 * C - C / 2);
        let h = s.hold(a.id, C, "h2", 60_000, now_ms()).await.unwrap();
        assert_eq!(s.settle(h.id, 1, now_ms(), Some(leaf)).await.unwrap().log_index, Some(2));
        assert_eq!(s.log_size().await.unwrap(), 3);
        assert!(s.check().await.unwrap().ok);
    }
}

/// A second writer on the same file (another process, an operator's shell): the first
/// store's writer must not act on the balances it cached before.
#[tokio::test]
async fn sqlite_writer_sees_another_connections_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let first = SqliteStore::open(&path).unwrap();
    let a = first.create_account("a", AccountKind::User).await.unwrap();
    first.mint(a.id, C, "m1", None).await.unwrap();
    first.hold(a.id, C / 2, "h1", 60_000, now_ms()).await.unwrap();
    let second = SqliteStore::open(&path).unwrap();
    second.mint(a.id, 5 * C, "m2", None).await.unwrap();
    // Needs the second mint: a stale cache would refuse it, and then write a stale balance.
    first.hold(a.id, 5 * C, "h2", 60_000, now_ms()).await.unwrap();
    let acc = first.get_account(a.id).await.unwrap();
    assert_eq!((acc.balance_micros, acc.pending_micros), (6 * C, 5 * C + C / 2));
    let report = second.check().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
}
