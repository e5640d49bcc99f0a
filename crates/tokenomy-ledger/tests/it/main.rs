//! Single integration-test binary: the conformance suite, run against every store.

mod bulk_index;
mod conformance;
mod tamper;

use std::io::Write;
use std::sync::{Arc, Once};

use tokenomy_ledger::{PgStore, SqliteStore};

pub const PG_ENV: &str = "TOKENOMY_TEST_POSTGRES_URL";

fn sqlite_store() -> (Arc<SqliteStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("ledger.db")).expect("open sqlite");
    (Arc::new(store), dir)
}

/// A PgStore in a fresh schema, or None (with a skip notice) when the URL is unset.
async fn pg_store() -> Option<Arc<PgStore>> {
    let Ok(url) = std::env::var(PG_ENV) else {
        static NOTICE: Once = Once::new();
        NOTICE.call_once(|| {
            // Written to the raw stderr handle so the test harness does not capture it.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: {PG_ENV} is not set; PostgreSQL conformance tests pass vacuously \
                 (run scripts/start-postgres.sh and export the URL it prints)"
            );
        });
        return None;
    };
    let schema = test_schema(&url).await;
    Some(Arc::new(PgStore::open_in_schema(&url, &schema, 8).await.expect("open postgres")))
}

/// A fresh schema name for one test: `tt_<unix seconds>_<random>`. Tests leave their schema
/// behind (a failing one must, to be looked at), so the first call of each run drops those
/// left by runs more than an hour old: the test database stays small however often it runs.
pub async fn test_schema(url: &str) -> String {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    SWEPT
        .get_or_init(|| async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to the test server");
            let conn = tokio::spawn(conn);
            let rows = client.query(r"SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tt\_%'", &[]).await.unwrap();
            for row in rows {
                let name: String = row.get(0);
                let secs = name.split('_').nth(1).and_then(|s| s.parse::<u64>().ok());
                if secs.is_some_and(|secs| secs + 3600 < now_s) {
                    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).await.unwrap();
                }
            }
            drop(client);
            let _ = conn.await;
        })
        .await;
    format!("tt_{now_s}_{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    h.finish()
}

macro_rules! conformance_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let (store, _dir) = crate::sqlite_store();
                    crate::conformance::$name(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(store) = crate::pg_store().await else { return };
                    crate::conformance::$name(store).await;
                }
            )*
        }
    };
}

conformance_suite!(
    system_accounts_exist,
    create_and_get_account,
    mint_and_transfer,
    refunds_reverse_revenue,
    idempotent_retries,
    idempotency_conflicts,
    rejects_bad_requests,
    hold_settle_void,
    settle_edge_cases,
    expire_holds,
    extend_holds,
    concurrent_holds_never_overdraw,
    leaf_appended_atomically,
    statement_pages,
    api_keys,
    mixed_workload_check,
    batch_failures_are_isolated,
    concurrent_pairs_one_account,
    spend_caps,
    spend_cap_holds_under_concurrency,
    key_limits_can_be_changed,
    key_limit_changes_keep_what_they_do_not_name,
    a_hold_placed_as_an_id_says_whose_it_is,
    accounts_are_listed_in_pages,
);

/// A ledger file written by schema version 1 opens as version 2: its rows are
/// kept and the key columns and spend counters are added.
#[tokio::test]
async fn sqlite_file_of_schema_v1_is_migrated() {
    use tokenomy_ledger::*;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(include_str!("../data/sqlite_schema_v1.sql")).unwrap();
        c.execute(
            "INSERT INTO accounts VALUES (?1, 'old', 0, 0, 0, 1)",
            [&AccountId(42 << 64).to_bytes()[..]],
        )
        .unwrap();
        c.execute(
            "INSERT INTO api_keys (id, account_id, key_hash, scopes, spend_cap_day_micros, created_at_ms) \
             VALUES (?1, ?2, ?3, 'inference', 7, 1)",
            rusqlite::params![&KeyId(9).to_bytes()[..], &AccountId(42 << 64).to_bytes()[..], &[3u8; 32][..]],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    let rec = s.find_key_by_hash([3; 32]).await.unwrap().unwrap();
    assert_eq!((rec.caps, rec.spend), (SpendCaps { day_micros: Some(7), month_micros: None }, KeySpend::default()));
    s.mint(AccountId(42 << 64), 100, "m", None).await.unwrap();
    let h = s.hold_for_key(AccountId(42 << 64), KeyId(9), 7, "h", 60_000, now_ms()).await.unwrap();
    assert!(matches!(s.hold_for_key(AccountId(42 << 64), KeyId(9), 1, "h2", 60_000, now_ms()).await, Err(LedgerError::SpendCapExceeded { .. })));
    s.settle(h.id, 5, now_ms(), None).await.unwrap();
    assert!(s.check().await.unwrap().ok);
    drop(s);
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(again.find_key_by_hash([3; 32]).await.unwrap().unwrap().spend.day_micros, 5);
}

/// Two nodes on one PostgreSQL ledger, each placing the hold of one request with the same
/// idempotency key in the same millisecond, over and over: exactly one of each pair gets its
/// own id back (the other is told the key is taken), and each key is held once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_nodes_placing_one_key_at_once_tell_whose_hold_it_is() {
    use tokenomy_ledger::*;
    let Ok(url) = std::env::var(PG_ENV) else { return };
    let schema = test_schema(&url).await;
    let a = Arc::new(PgStore::open_in_schema(&url, &schema, 4).await.unwrap());
    let b = Arc::new(PgStore::open_in_schema(&url, &schema, 4).await.unwrap());
    let acc = a.create_account("agent", AccountKind::User).await.unwrap();
    a.mint(acc.id, 1_000 * MICROS_PER_CREDIT, "fund", None).await.unwrap();
    let now = now_ms();
    for round in 0..40 {
        let key = format!("retry-{round}");
        let place = |s: Arc<PgStore>, key: String| async move {
            let id = FreshTransferId::generate(now);
            let mine = id.id();
            let t = s.hold_as(id, acc.id, None, MICROS_PER_CREDIT, &key, 60_000, now).await.unwrap();
            (t.id == mine, t)
        };
        let (x, y) = tokio::join!(tokio::spawn(place(a.clone(), key.clone())), tokio::spawn(place(b.clone(), key)));
        let ((x_own, x), (y_own, y)) = (x.unwrap(), y.unwrap());
        assert_eq!(x, y, "one hold for the key");
        assert!(x_own ^ y_own, "round {round}: exactly one node placed it ({x_own}, {y_own})");
    }
    assert_eq!(a.get_account(acc.id).await.unwrap().pending_micros, 40 * MICROS_PER_CREDIT);
    assert!(b.check().await.unwrap().ok);
}

/// A key's rate clocks stepped by two nodes at once, 32 steps each: every step sees the one
/// before it (the row lock), so none is lost; a key never stepped reads as zero clocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_key_rate_steps_from_two_nodes_are_never_lost() {
    use tokenomy_ledger::*;
    let Ok(url) = std::env::var(PG_ENV) else { return };
    let schema = test_schema(&url).await;
    let a = Arc::new(PgStore::open_in_schema(&url, &schema, 4).await.unwrap());
    let b = Arc::new(PgStore::open_in_schema(&url, &schema, 4).await.unwrap());
    let key = KeyId(42);
    assert_eq!(a.key_rate(key).await.unwrap(), KeyRate::default());
    let steps = (0..64).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move {
            s.update_key_rate(key, |r| {
                r.requests_tat_us += 1;
                r.tokens_tat_us += 10;
                r.requests_tat_us
            })
            .await
            .unwrap()
        })
    });
    let mut seen: Vec<i64> = Vec::new();
    for s in steps {
        seen.push(s.await.unwrap());
    }
    seen.sort();
    assert_eq!(seen, (1..=64).collect::<Vec<_>>(), "each step saw the one before it");
    assert_eq!(b.key_rate(key).await.unwrap(), KeyRate { requests_tat_us: 64, tokens_tat_us: 640, ..KeyRate::default() });
    // A step that changes nothing writes nothing, and returns what it read.
    assert_eq!(a.update_key_rate(key, |r| r.tokens_tat_us).await.unwrap(), 640);
    // The limits the clocks were stepped under are kept with them.
    a.update_key_rate(key, |r| (r.rpm, r.tpm) = (7, 9)).await.unwrap();
    assert_eq!(b.key_rate(key).await.unwrap(), KeyRate { requests_tat_us: 64, tokens_tat_us: 640, rpm: 7, tpm: 9 });
    assert_eq!(a.key_rate(KeyId(43)).await.unwrap(), KeyRate::default());
}

/// A step given up at any point (its caller timed out) leaves no transaction open on a pooled
/// connection and no row locked: another node's next step goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_key_rate_steps_given_up_midway_leave_no_lock_behind() {
    use std::time::Duration;
    use tokenomy_ledger::*;
    let Ok(url) = std::env::var(PG_ENV) else { return };
    let schema = test_schema(&url).await;
    let s = PgStore::open_in_schema(&url, &schema, 2).await.unwrap();
    let other = PgStore::open_in_schema(&url, &schema, 1).await.unwrap();
    let key = KeyId(7);
    let mut done = 0;
    for i in 0..60u64 {
        // Cut off after 0 to 2.95 ms: before, during and after the lock is taken.
        let cut = Duration::from_micros(i * 50);
        if tokio::time::timeout(cut, s.update_key_rate(key, |r| r.requests_tat_us += 1)).await.is_ok() {
            done += 1;
        }
        let after = tokio::time::timeout(Duration::from_secs(5), other.update_key_rate(key, |r| r.tokens_tat_us += 1)).await;
        after.expect("a step after one given up is not blocked").unwrap();
    }
    // ...and neither is one on the same node (no pooled connection is left inside a transaction).
    tokio::time::timeout(Duration::from_secs(5), s.update_key_rate(key, |_| ())).await.unwrap().unwrap();
    let r = s.key_rate(key).await.unwrap();
    assert_eq!(r.tokens_tat_us, 60);
    assert!(r.requests_tat_us >= done && r.requests_tat_us <= 60, "{r:?} {done}");
}

/// A database of a later schema version than this build's is refused, with a message.
#[tokio::test]
async fn postgres_schema_from_a_newer_version_is_refused() {
    use tokenomy_ledger::*;
    let Ok(url) = std::env::var(PG_ENV) else { return };
    let schema = test_schema(&url).await;
    drop(PgStore::open_in_schema(&url, &schema, 1).await.unwrap());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute(&format!("UPDATE {schema}.schema_version SET version = 8")).await.unwrap();
    let err = PgStore::open_in_schema(&url, &schema, 1).await.err().expect("refused");
    assert!(err.to_string().contains("newer than this tokenomy's 7"), "{err}");
}

/// A PostgreSQL schema created by version 1 is brought to the current version (7) on open:
/// key columns added, a hold left pending by the old version listed for the expiry sweep,
/// the keys' rate clocks table created, with the limits they were stepped under, and the
/// tables of what nodes publish (a checkpoint that only grows).
#[tokio::test]
async fn postgres_schema_v1_is_migrated() {
    use tokenomy_ledger::*;
    let Ok(url) = std::env::var(PG_ENV) else { return };
    let schema = test_schema(&url).await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}; SET search_path = {schema}; {}", include_str!("../data/pg_schema_v1.sql")))
        .await
        .unwrap();
    // Version-1 rows: a funded user with an expired pending hold of 10.
    let id = |n: u128| format!("decode('{n:032x}', 'hex')");
    let (treasury, revenue, user) = (id(1), id(2), id(42 << 64));
    client
        .batch_execute(&format!(
            "INSERT INTO accounts VALUES ({treasury}, 'treasury', 3, -100, 0, 1), ({revenue}, 'operator-revenue', 2, 0, 0, 1), \
             ({user}, 'old', 0, 100, 10, 1); \
             INSERT INTO transfers (id, idempotency_key, debit_account, credit_account, amount_micros, code, state, hold, \
             timeout_ms, expires_at_ms, created_at_ms) VALUES \
             ({}, 'mint-old', {treasury}, {user}, 100, 0, 1, false, 0, 0, 1), \
             ({}, 'hold-old', {user}, {revenue}, 10, 1, 0, true, 60000, 2, 1)",
            id(7),
            id(8)
        ))
        .await
        .unwrap();
    let s = PgStore::open_in_schema(&url, &schema, 2).await.unwrap();
    assert!(s.check().await.unwrap().ok);
    assert_eq!(s.expire_holds(now_ms()).await.unwrap(), 1);
    assert_eq!(s.get_account(AccountId(42 << 64)).await.unwrap().pending_micros, 0);
    let version: i32 = client.query_one(&format!("SELECT version FROM {schema}.schema_version"), &[]).await.unwrap().get(0);
    assert_eq!(version, 7);
    s.claim_origin("node/a", "node/a+00000000+key").await.unwrap();
    assert_eq!(s.published_size("node/a").await.unwrap(), None);
    s.publish_checkpoint("node/a", 5, "note of 5").await.unwrap();
    s.publish_checkpoint("node/a", 3, "note of 3").await.unwrap();
    let p = s.published_receipt("node/a", 4).await.unwrap().unwrap();
    assert_eq!((p.checkpoint_size, p.checkpoint_note.as_str(), p.signature), (5, "note of 5", None));
    assert_eq!(s.node_keys().await.unwrap(), [("node/a".to_string(), "node/a+00000000+key".to_string())]);
    s.update_key_rate(KeyId(9), |r| r.rpm = 3).await.unwrap();
    assert_eq!(s.key_rate(KeyId(9)).await.unwrap().rpm, 3);
    let a = s.create_account("a", AccountKind::User).await.unwrap();
    s.mint(a.id, 100, "m", None).await.unwrap();
    let caps = SpendCaps { day_micros: Some(10), month_micros: Some(20) };
    let k = s.create_key(a.id, [4; 32], &[], None, None, caps).await.unwrap();
    let h = s.hold_for_key(a.id, k, 10, "h", 60_000, now_ms()).await.unwrap();
    s.settle(h.id, 4, now_ms(), None).await.unwrap();
    assert_eq!(s.find_key_by_hash([4; 32]).await.unwrap().unwrap().spend.month_micros, 4);
    assert!(s.check().await.unwrap().ok);
}

/// Kept responses on PostgreSQL: read back by id with their owner, bounded per owner and in
/// all (oldest first out, another owner's untouched by one owner's bound), deleted only by
/// their owner (anyone for one without an owner).
#[tokio::test]
async fn postgres_kept_responses_are_bounded_and_scoped() {
    use tokenomy_ledger::*;
    let Ok(url) = std::env::var(PG_ENV) else { return };
    let schema = test_schema(&url).await;
    let s = PgStore::open_in_schema(&url, &schema, 2).await.unwrap();
    let limits = KeptLimits { count_max: 5, bytes_max: 1_000, per_owner_count_max: 3, per_owner_bytes_max: 300 };
    let (a, b) = (Some(AccountId(7 << 64)), Some(AccountId(8 << 64)));
    assert!(s.keep_response("b1", b, b"from b", limits).await.unwrap());
    for i in 0..4 {
        assert!(s.keep_response(&format!("a{i}"), a, format!("doc {i}").as_bytes(), limits).await.unwrap());
    }
    // a's oldest went past its 3; b's is untouched.
    assert_eq!(s.kept_response("a0").await.unwrap(), None);
    assert_eq!(s.kept_response("a3").await.unwrap(), Some(KeptDoc { owner: a, doc: b"doc 3".to_vec() }));
    assert_eq!(s.kept_response("b1").await.unwrap().unwrap().owner, b);
    // A byte bound: one of 296 bytes leaves room for nothing else of a's (5 bytes each).
    assert!(s.keep_response("a-big", a, &[b'x'; 296], limits).await.unwrap());
    assert!(s.kept_response("a2").await.unwrap().is_none() && s.kept_response("a3").await.unwrap().is_none());
    assert!(!s.keep_response("too-big", a, &[b'x'; 301], limits).await.unwrap(), "over the owner's bytes: not kept");
    // Without an owner: only the bounds in all; the oldest of everyone goes first.
    for i in 0..4 {
        assert!(s.keep_response(&format!("n{i}"), None, b"anon", limits).await.unwrap());
    }
    assert_eq!(s.kept_response("b1").await.unwrap(), None, "the oldest in all went past 5");
    assert_eq!(s.kept_response("n3").await.unwrap().unwrap().owner, None);
    // Deleting: not another account's; one without an owner, by anyone.
    assert!(!s.forget_response("a-big", b).await.unwrap());
    assert!(s.forget_response("a-big", a).await.unwrap());
    assert!(!s.forget_response("a-big", a).await.unwrap(), "already gone");
    assert!(s.forget_response("n3", b).await.unwrap());
    assert!(s.kept_response("n3").await.unwrap().is_none());
}

/// A server that accepts connections and answers nothing (hung, or not PostgreSQL) fails the
/// open within the connection timeout, saying so: a node does not wait at start forever.
#[tokio::test]
async fn postgres_that_never_answers_fails_the_open_in_time() {
    use std::time::Duration;
    use tokenomy_ledger::pg::PG_CONNECTION_CREATE_TIMEOUT_MS;
    use tokenomy_ledger::*;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || listener.incoming().take(4).map(|c| c.unwrap()).collect::<Vec<_>>());
    let url = format!("postgres://tokenomy:tokenomy@127.0.0.1:{port}/none");
    let started = std::time::Instant::now();
    let open = tokio::time::timeout(Duration::from_millis(PG_CONNECTION_CREATE_TIMEOUT_MS + 10_000), PgStore::open(&url, 1)).await;
    let err = open.expect("the open gives up by itself").err().expect("refused");
    assert!(err.to_string().contains("did not complete a connection"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(PG_CONNECTION_CREATE_TIMEOUT_MS - 1_000));
    drop(held);
}
