//! Settled charges per second (hold + settle pairs) at N concurrent writers.
//!
//! cargo run --release --example bench_settle
//! ("sqlite" = Durability::Full, "sqlite-n" = Durability::Normal)
//! Env: BENCH_WRITERS (64), BENCH_SECS (5), BENCH_LEAF (1: settle appends a
//! 40-byte log leaf, as the receipts log does; 0: no leaf),
//! TOKENOMY_TEST_POSTGRES_URL (also benchmark PostgreSQL when set),
//! BENCH_STORES (which to run: `sqlite,sqlite-n,postgres`, the default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenomy_ledger::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn writer<S: LedgerStore>(s: Arc<S>, account: AccountId, w: u64, until: Instant, leaf: Option<Leaf>) -> Vec<u32> {
    let mut latencies_us = Vec::with_capacity(100_000);
    let mut i = 0u64;
    while Instant::now() < until {
        let start = Instant::now();
        let now = now_ms();
        let h = s.hold(account, 10_000, &format!("b{w}-{i}"), 60_000, now).await.expect("hold");
        s.settle(h.id, 1 + (i as i64 % 9_999), now, leaf.clone()).await.expect("settle");
        latencies_us.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
        i += 1;
    }
    latencies_us
}

async fn bench<S: LedgerStore>(name: &str, s: Arc<S>, writers: u64, secs: u64, leaf: Option<Leaf>) {
    let mut accounts = Vec::new();
    for w in 0..writers {
        let a = s.create_account(&format!("bench-{w}"), AccountKind::User).await.unwrap();
        s.mint(a.id, 1_000_000 * MICROS_PER_CREDIT, &format!("bench-fund-{}", a.id), None).await.unwrap();
        accounts.push(a.id);
    }
    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = accounts
        .iter()
        .enumerate()
        .map(|(w, a)| tokio::spawn(writer(s.clone(), *a, w as u64, until, leaf.clone())))
        .collect();
    let mut lat: Vec<u32> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: usize| lat.get(lat.len().saturating_sub(1) * p / 100).copied().unwrap_or(0) as f64 / 1000.0;
    let report = s.check().await.unwrap();
    println!(
        "{name:>8}: {:>8.0} settled charges/s ({} pairs in {elapsed:.1}s, {writers} writers, leaf={}) \
         hold+settle latency p50 {:.2} ms p99 {:.2} ms; check ok={} ({} transfers)",
        lat.len() as f64 / elapsed,
        lat.len(),
        leaf.is_some(),
        pct(50),
        pct(99),
        report.ok,
        report.transfers
    );
    assert!(report.ok, "{:?}", report.problems);
}

#[tokio::main]
async fn main() {
    let writers = env_u64("BENCH_WRITERS", 64).clamp(1, 1024);
    let secs = env_u64("BENCH_SECS", 5).clamp(1, 600);
    let leaf: Option<Leaf> = match env_u64("BENCH_LEAF", 1) {
        0 => None,
        _ => Some(Arc::new(|i: u64, t: &Transfer| {
            let mut v = i.to_be_bytes().to_vec();
            v.extend_from_slice(&t.id.to_bytes());
            v.extend_from_slice(&t.amount_micros.to_be_bytes());
            v.extend_from_slice(&t.created_at_ms.to_be_bytes());
            v
        })),
    };
    let stores = std::env::var("BENCH_STORES").unwrap_or_else(|_| "sqlite,sqlite-n,postgres".into());
    let stores: Vec<&str> = stores.split(',').collect();
    let dir = tempfile::tempdir().unwrap();
    for (name, durability) in [("sqlite", Durability::Full), ("sqlite-n", Durability::Normal)] {
        if !stores.contains(&name) {
            continue;
        }
        let path = dir.path().join(format!("{name}.db"));
        let sqlite = Arc::new(SqliteStore::open_with(path, durability).unwrap());
        bench(name, sqlite, writers, secs, leaf.clone()).await;
    }
    match std::env::var("TOKENOMY_TEST_POSTGRES_URL") {
        _ if !stores.contains(&"postgres") => {}
        Ok(url) => {
            let schema = format!("bench_{}", now_ms());
            let pg = Arc::new(PgStore::open_in_schema(&url, &schema, writers.min(64) as usize).await.unwrap());
            bench("postgres", pg, writers, secs, leaf).await;
            // The benchmark's rows are not worth keeping in the test database.
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
        }
        Err(_) => println!("postgres: skipped (TOKENOMY_TEST_POSTGRES_URL not set)"),
    }
}
