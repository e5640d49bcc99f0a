//! `check` finds what a store's own API can never produce: rows written behind its back.
//! Each test tampers with a real database (the SQLite file, the PostgreSQL schema) and expects
//! `check` to name the problem.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_log_entry_for_a_voided_hold_fails_check() {
    let Ok(url) = std::env::var(crate::PG_ENV) else { return };
    let schema = format!("t_tamper_{:016x}", crate::rand_u64());
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
