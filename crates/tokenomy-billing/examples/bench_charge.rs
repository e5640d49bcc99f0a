//! The charging path's cost per request, against the bare ledger measured in the same run.
//!
//! cargo run --release -p tokenomy-billing --example bench_charge
//! Env: BENCH_WRITERS (64 concurrent requests), BENCH_SECS (5 per phase),
//! TOKENOMY_TEST_POSTGRES_URL (also PostgreSQL; a database `tokenomy_bench` is recreated).
//!
//! Phases, per store:
//! * `ledger`  — reference: `hold` + `settle` on the store, no receipt;
//! * `billing` — `Billing::hold` + `Billing::settle`: prices, worst case, the receipt built,
//!   appended to the log in the settlement's transaction (what every request adds);
//! * `limited` — the same for keys with RPM and TPM limits (set high: nothing is refused):
//!   admission, TPM reservation and its settlement, and the headers' read of the clocks, as
//!   the API runs them; on PostgreSQL the clocks are shared by the ledger's nodes (a locked
//!   row per key), in memory on SQLite. Each request on its own key;
//! * `hot key` — `limited` with every request on one key (its row lock taken in turn);
//! * `bundles` — `GET /v1/receipts/{id}`'s work: catch up, checkpoint, inclusion proof, signature,
//!   for a few receipts (their log tiles stay in memory), then for receipts spread over the log
//!   (most proofs read their tile of 64 entries back from the store);
//! * PostgreSQL only: `publish` — the node's first publication of its receipts (every receipt
//!   of the log signed and stored, then its checkpoint), then a second node opening on the
//!   ledger (reading the whole log) and serving the first node's receipts from what it published.
//!
//! `BENCH_JOIN=1` (after a run with PostgreSQL): only a node joining the ledger that run left,
//! in a fresh process: its start time and the memory its view of the log takes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenomy_billing::{Billing, ChargeRequest, OpenOptions, Principal, Served};
use tokenomy_ledger::{AccountKind, LedgerStore, MICROS_PER_CREDIT};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Stats {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    n: usize,
}

fn stats(mut lat_us: Vec<u32>, secs: f64) -> Stats {
    lat_us.sort_unstable();
    let pct = |p: usize| lat_us.get(lat_us.len().saturating_sub(1) * p / 100).copied().unwrap_or(0) as f64 / 1000.0;
    Stats { per_s: lat_us.len() as f64 / secs, p50_ms: pct(50), p99_ms: pct(99), n: lat_us.len() }
}

async fn run_phase<F, Fut>(writers: &[Principal], secs: u64, f: F) -> Stats
where
    F: Fn(Principal, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = writers
        .iter()
        .cloned()
        .map(|p| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0;
                while Instant::now() < until {
                    let t = Instant::now();
                    f(p.clone(), i).await;
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    i += 1;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    stats(all, start.elapsed().as_secs_f64())
}

/// A request id of the API's form (32 hex digits, as its UUIDs): the key's and the request's
/// number. Its receipt is `rcpt_` and the same digits.
fn request_id(p: &Principal, i: u64) -> String {
    format!("{:016x}{i:016x}", p.key_id.0 as u64)
}

/// One request's charge as the API runs it: admission, hold, settlement, and the figures of
/// the response's rate-limit headers (admission and headers cost nothing for a key without
/// limits).
async fn charge(b: &Billing, p: &Principal, request_id: String, i: u64) {
    let admitted = b.admit(p).await.unwrap();
    let req = ChargeRequest { request_id, model: "smollm2".into(), prompt_tokens: 200, completion_tokens_max: 256, idempotency_key: None };
    let h = b.hold(p, &req).await.unwrap();
    let mut s = Served::default();
    s.usage.prompt_tokens = 200;
    s.usage.completion_tokens = 1 + (i % 255) as u32;
    b.settle(h, s).await.unwrap().expect("charged");
    b.allowance_now(p, admitted).await;
}

async fn bench(name: &str, b: Arc<Billing>, writers: u64, secs: u64) {
    let mut principals = Vec::new();
    for w in 0..writers {
        let a = b.create_account(&format!("bench-{w}"), AccountKind::User).await.unwrap();
        b.store().mint(a.id, 1_000_000 * MICROS_PER_CREDIT, &format!("bench-fund-{}", a.id), None).await.unwrap();
        let (_, key) = b.create_key(a.id, &["inference".into()], None, None, Default::default()).await.unwrap();
        principals.push(b.authenticate(Some(&key)).await.unwrap());
    }
    let store = b.store().clone();
    let ledger = run_phase(&principals, secs, move |p, i| {
        let s = store.clone();
        async move {
            let now = tokenomy_ledger::now_ms();
            let h = s.hold(p.account, 10_000, &format!("ref-{}-{i}", p.key_id), 60_000, now).await.unwrap();
            s.settle(h.id, 1 + (i as i64 % 9_999), now, None).await.unwrap();
        }
    })
    .await;
    let bb = b.clone();
    let billing = run_phase(&principals, secs, move |p, i| {
        let b = bb.clone();
        async move { charge(&b, &p, request_id(&p, i), i).await }
    })
    .await;
    let mut limited_keys = Vec::new();
    for p in &principals {
        let (_, key) = b.create_key(p.account, &["inference".into()], Some(1_000_000), Some(1_000_000_000), Default::default()).await.unwrap();
        limited_keys.push(b.authenticate(Some(&key)).await.unwrap());
    }
    // Request ids unique across writers (the hot key's writers share one key).
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let limited_phase = |b: Arc<Billing>| {
        let next_id = next_id.clone();
        move |p: Principal, i: u64| {
            let (b, n) = (b.clone(), next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            async move { charge(&b, &p, format!("{:032x}", (1u128 << 120) | u128::from(n)), i).await }
        }
    };
    let limited = run_phase(&limited_keys, secs, limited_phase(b.clone())).await;
    let hot: Vec<Principal> = limited_keys.iter().map(|_| limited_keys[0].clone()).collect();
    let hot_key = run_phase(&hot, secs, limited_phase(b.clone())).await;
    // Bundles for receipts made in the billing phase.
    let admin = Principal { key_id: principals[0].key_id, account: principals[0].account, scopes: vec!["admin".into()], limits: Default::default(), caps: Default::default(), spend: Default::default() };
    let size = b.checkpoint().await.unwrap().checkpoint.size;
    let ids: Vec<String> = (0..writers.min(8)).map(|w| format!("rcpt_{}", request_id(&principals[w as usize], 0))).collect();
    let (bb, viewer) = (b.clone(), admin.clone());
    let bundles = run_phase(&principals[..ids.len()], secs.min(3), move |p, _| {
        let (b, admin, id) = (bb.clone(), viewer.clone(), format!("rcpt_{}", request_id(&p, 0)));
        async move {
            b.receipt_bundle(&id, &admin).await.unwrap();
        }
    })
    .await;
    // Bundles for receipts spread over the billing phase: each in a tile of the log read back
    // from the store (the log view keeps tiles' leaves only for the last 256 tiles it read).
    let per_writer = (billing.n as u64 / writers).max(2) / 2;
    let (bb, viewer) = (b.clone(), admin.clone());
    let spread = run_phase(&principals[..ids.len()], secs.min(3), move |p, i| {
        let (b, admin, id) = (bb.clone(), viewer.clone(), format!("rcpt_{}", request_id(&p, i * 7_919 % per_writer)));
        async move {
            b.receipt_bundle(&id, &admin).await.unwrap();
        }
    })
    .await;
    let published = match b.store() {
        tokenomy_ledger::AnyStore::Pg(_) => Some(publish_and_serve_elsewhere(&b, &principals[..ids.len()], admin.clone(), secs.min(3)).await),
        _ => None,
    };
    let check = b.check().await.unwrap();
    println!("{name}: {writers} concurrent writers, {secs} s per phase; log size {size}; ledger check ok={}", check.ok);
    println!("  ledger  (reference, no receipt): {:>7.0} settled/s  hold+settle p50 {:>6.2} ms  p99 {:>6.2} ms  ({} pairs)", ledger.per_s, ledger.p50_ms, ledger.p99_ms, ledger.n);
    println!("  billing (charge + receipt):      {:>7.0} settled/s  hold+settle p50 {:>6.2} ms  p99 {:>6.2} ms  ({} pairs)", billing.per_s, billing.p50_ms, billing.p99_ms, billing.n);
    println!(
        "  ratio billing/ledger: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x; receipt path adds p50 {:+.2} ms, p99 {:+.2} ms",
        billing.per_s / ledger.per_s,
        billing.p50_ms / ledger.p50_ms.max(1e-9),
        billing.p99_ms / ledger.p99_ms.max(1e-9),
        billing.p50_ms - ledger.p50_ms,
        billing.p99_ms - ledger.p99_ms
    );
    println!(
        "  limited (RPM + TPM, own keys):    {:>7.0} settled/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} pairs); against billing: throughput {:.2}x, adds p50 {:+.2} ms, p99 {:+.2} ms",
        limited.per_s, limited.p50_ms, limited.p99_ms, limited.n, limited.per_s / billing.per_s, limited.p50_ms - billing.p50_ms, limited.p99_ms - billing.p99_ms
    );
    println!(
        "  hot key (RPM + TPM, one key):     {:>7.0} settled/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} pairs); against billing: throughput {:.2}x",
        hot_key.per_s, hot_key.p50_ms, hot_key.p99_ms, hot_key.n, hot_key.per_s / billing.per_s
    );
    println!("  receipt bundles (proof + signature): {:>7.0}/s  p50 {:.2} ms  p99 {:.2} ms", bundles.per_s, bundles.p50_ms, bundles.p99_ms);
    println!(
        "  receipt bundles spread over the log:  {:>7.0}/s  p50 {:.2} ms  p99 {:.2} ms; against the same few receipts': {:.2}x",
        spread.per_s, spread.p50_ms, spread.p99_ms, spread.per_s / bundles.per_s
    );
    if let Some(p) = published {
        println!(
            "  publish (sign + store every receipt of the log, first time): {} receipts in {:.2} s = {:.0}/s; against billing's settled/s: {:.1}x",
            p.receipts, p.publish_s, p.receipts as f64 / p.publish_s, p.receipts as f64 / p.publish_s / billing.per_s
        );
        println!("  another node joins the ledger (open: reads the whole log): {:.2} s for {} entries", p.open_s, p.receipts);
        println!(
            "  receipt bundles from that node (published signature + proof): {:>7.0}/s  p50 {:.2} ms  p99 {:.2} ms; against the issuing node's: {:.2}x",
            p.bundles.per_s, p.bundles.p50_ms, p.bundles.p99_ms, p.bundles.per_s / bundles.per_s
        );
    }
}

struct Published {
    receipts: u64,
    publish_s: f64,
    open_s: f64,
    bundles: Stats,
}

/// PostgreSQL: the node publishes its receipts (all of the log: its first publication), a
/// second node opens on the ledger, and serves the first node's receipts.
async fn publish_and_serve_elsewhere(b: &Arc<Billing>, principals: &[Principal], admin: Principal, secs: u64) -> Published {
    let t = Instant::now();
    let receipts = b.publish_all().await.unwrap();
    let publish_s = t.elapsed().as_secs_f64();
    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("TOKENOMY_TEST_POSTGRES_URL").unwrap();
    let url = format!("{}/tokenomy_bench", url.rsplit_once('/').unwrap().0);
    let t = Instant::now();
    let opts = OpenOptions { data_dir: dir.path().into(), database_url: Some(url), origin: Some("bench.tokenomy/other".into()), env: vec![] };
    let (other, _) = Billing::open(opts).await.unwrap();
    let open_s = t.elapsed().as_secs_f64();
    let bundles = run_phase(principals, secs, move |p, _| {
        let (b, admin, id) = (other.clone(), admin.clone(), format!("rcpt_{}", request_id(&p, 0)));
        async move {
            b.receipt_bundle(&id, &admin).await.unwrap();
        }
    })
    .await;
    Published { receipts, publish_s, open_s, bundles }
}

/// `BENCH_JOIN=1`: a node joins the PostgreSQL ledger a run left (`tokenomy_bench`) in a fresh
/// process, which reports the time and the resident memory its view of the log takes.
async fn join_only(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/tokenomy_bench", url.rsplit_once('/').unwrap().0);
    let (t, before) = (Instant::now(), rss_bytes());
    let opts = OpenOptions { data_dir: dir.path().into(), database_url: Some(url), origin: None, env: vec![] };
    let (b, _) = Billing::open(opts).await.unwrap();
    let (open_s, grew) = (t.elapsed().as_secs_f64(), rss_bytes().saturating_sub(before));
    let entries = b.checkpoint().await.unwrap().checkpoint.size;
    println!(
        "a node joins a ledger of {entries} log entries: open {open_s:.2} s ({:.0} entries/s); resident memory +{:.1} MiB ({:.0} bytes per entry)",
        entries as f64 / open_s, grew as f64 / 1_048_576.0, grew as f64 / entries.max(1) as f64
    );
}

/// This process's resident memory (Linux), 0 where unknown.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kb.unwrap_or(0) * 1024
}

#[tokio::main]
async fn main() {
    if let (Ok(_), Ok(url)) = (std::env::var("BENCH_JOIN"), std::env::var("TOKENOMY_TEST_POSTGRES_URL")) {
        return join_only(&url).await;
    }
    let writers = env_u64("BENCH_WRITERS", 64);
    let secs = env_u64("BENCH_SECS", 5);
    let dir = tempfile::tempdir().unwrap();
    let opts = |d: &std::path::Path, url: Option<String>| OpenOptions { data_dir: d.into(), database_url: url, origin: Some("bench.tokenomy/log".into()), env: vec![] };
    let (b, _) = Billing::open(opts(dir.path(), None)).await.unwrap();
    bench("sqlite", b, writers, secs).await;
    if let Ok(url) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") {
        let pg = tokenomy_ledger::testing::fresh_database(&url, "tokenomy_bench").await;
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = Billing::open(opts(dir.path(), Some(pg))).await.unwrap();
        bench("postgres", b, writers, secs).await;
    }
}
