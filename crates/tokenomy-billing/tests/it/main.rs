//! The charging path against a real SQLite file (and a real PostgreSQL server when
//! `TOKENOMY_TEST_POSTGRES_URL` is set): first run, keys, holds, settlement, receipts that
//! verify offline, and the log surviving a restart.

use tokenomy_billing::{Billing, BillingError, ChargeRequest, OpenOptions, Served};
use tokenomy_core::Usage;
use tokenomy_ledger::LedgerStore;
use tokenomy_receipts::{verify_bundle, verify_consistency_notes, VerifierKey};

fn opts(dir: &std::path::Path, pg: Option<&str>) -> OpenOptions {
    OpenOptions { data_dir: dir.to_path_buf(), database_url: pg.map(str::to_string), origin: Some("test.node/log".into()), env: vec![] }
}

use tokenomy_ledger::testing::{fresh_database as fresh_pg, stores};

/// The ledger of one `stores()` entry: a fresh PostgreSQL database named `db`, or SQLite (`None`).
async fn ledger_url(pg: Option<String>, db: &str) -> Option<String> {
    match pg {
        Some(u) => Some(fresh_pg(&u, db).await),
        None => None,
    }
}

fn req(id: &str, prompt: u64, max: u64) -> ChargeRequest {
    ChargeRequest { request_id: id.into(), model: "smollm2".into(), prompt_tokens: prompt, completion_tokens_max: max, idempotency_key: None }
}

fn served(prompt: u32, completion: u32) -> Served {
    Served { usage: Usage { prompt_tokens: prompt, completion_tokens: completion, ..Default::default() }, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_run_charge_receipt_and_restart() {
    for (i, pg) in stores().into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let pg = ledger_url(pg, "tokenomy_billing_it").await;
        let (b, first) = Billing::open(opts(dir.path(), pg.as_deref())).await.unwrap();
        let first = first.expect("an empty data dir is a first run");
        for f in ["admin.key", "user.key", "node.key"] {
            let meta = std::fs::metadata(dir.path().join(f)).unwrap();
            #[cfg(unix)]
            assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600, "{f}");
        }
        assert_eq!(std::fs::read_to_string(dir.path().join("user.key")).unwrap().trim(), first.user_key);
        let user = b.authenticate(Some(&first.user_key)).await.unwrap();
        let admin = b.authenticate(Some(&first.admin_key)).await.unwrap();
        assert!(admin.is_admin() && !user.is_admin());
        assert!(matches!(b.authenticate(Some("tk-nope")).await, Err(BillingError::Unauthorized(_))));
        assert!(matches!(b.authenticate(None).await, Err(BillingError::Unauthorized(_))));

        // Hold the worst case, settle the exact cost: the balance drops by exactly the receipt.
        let before = b.account(user.account).await.unwrap();
        assert_eq!(before.balance_micros, first.grant_micros);
        let h = b.hold(&user, &req("r1", 1_000, 9_000)).await.unwrap();
        assert_eq!(h.held_micros, 50_000 / 1000 + 200_000 * 9 / 1000); // smollm2 prices
        assert_eq!(b.account(user.account).await.unwrap().pending_micros, h.held_micros);
        let r = b.settle(h, served(1_000, 10)).await.unwrap().expect("charged");
        assert_eq!(r.amount_micros, 50 + 2); // 1000 × 0.05 + ceil(10 × 0.2)
        let after = b.account(user.account).await.unwrap();
        assert_eq!((after.balance_micros, after.pending_micros), (before.balance_micros - r.amount_micros, 0));

        // A void charges nothing and logs nothing.
        let size = b.store().log_size().await.unwrap();
        let h = b.hold(&user, &req("r2", 10, 10)).await.unwrap();
        b.void(h).await.unwrap();
        assert_eq!(b.store().log_size().await.unwrap(), size);

        // Too expensive: 402 with the shortfall; nothing changes.
        let e = b.hold(&user, &req("r3", 1, 1_000_000_000_000)).await.unwrap_err();
        assert!(matches!(e, BillingError::InsufficientQuota { shortfall_micros, .. } if shortfall_micros > 0), "{e:?}");

        // The receipt verifies offline with only the public key; another account cannot see it.
        let key = VerifierKey::parse(std::fs::read_to_string(dir.path().join("node.pub")).unwrap().trim()).unwrap();
        let bundle = b.receipt_bundle(&r.receipt_id, &user).await.unwrap();
        let v = verify_bundle(&bundle, &key).unwrap();
        assert_eq!(v.receipt.amount_micros, -r.amount_micros);
        assert_eq!(v.receipt.transfer_id, r.transfer_id);
        let other_acc = b.create_account("other", tokenomy_ledger::AccountKind::User).await.unwrap();
        let (_, other_key) = b.create_key(other_acc.id, &["inference".into()], None, None, Default::default()).await.unwrap();
        let other = b.authenticate(Some(&other_key)).await.unwrap();
        assert!(matches!(b.receipt_bundle(&r.receipt_id, &other).await, Err(BillingError::NotFound(_))));
        assert!(b.receipt_bundle(&r.receipt_id, &admin).await.is_ok());
        let old = b.checkpoint().await.unwrap();
        assert_eq!(b.check().await.unwrap().ok, true);
        drop(b);

        // Restart: same key, the log continues consistently; no first run again.
        let (b, again) = Billing::open(opts(dir.path(), pg.as_deref())).await.unwrap();
        assert!(again.is_none());
        let user = b.authenticate(Some(&first.user_key)).await.unwrap();
        let h = b.hold(&user, &req("r4", 5, 5)).await.unwrap();
        b.settle(h, served(5, 5)).await.unwrap().unwrap();
        let new = b.checkpoint().await.unwrap();
        assert!(new.checkpoint.size > old.checkpoint.size, "store {i}");
        let proof = b.consistency(old.checkpoint.size, new.checkpoint.size).await.unwrap();
        verify_consistency_notes(&old.note, &new.note, &proof, &key).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_log_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (b, first) = Billing::open(opts(dir.path(), None)).await.unwrap();
    let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
    let h = b.hold(&user, &req("t1", 5, 5)).await.unwrap();
    b.settle(h, served(5, 5)).await.unwrap();
    b.checkpoint().await.unwrap();
    drop(b);
    // Rewrite history: the checkpoint file now claims a root the log does not have.
    let cp = std::fs::read_to_string(dir.path().join("checkpoint")).unwrap();
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("node.key"), other.path().join("node.key")).unwrap();
    std::fs::write(other.path().join("checkpoint"), cp).unwrap();
    let e = Billing::open(opts(other.path(), None)).await.unwrap_err();
    assert!(e.to_string().contains("entries were lost"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_served_longer_than_the_hold_timeout_is_still_charged() {
    for pg in stores() {
        let dir = tempfile::tempdir().unwrap();
        let pg = ledger_url(pg, "tokenomy_billing_live").await;
        let mut o = opts(dir.path(), pg.as_deref());
        o.env = vec![
            ("TOKENOMY_BILLING__HOLD_TIMEOUT_MS".into(), "1000".into()),
            ("TOKENOMY_BILLING__EXPIRE_INTERVAL_MS".into(), "100".into()),
            ("TOKENOMY_BILLING__CHECKPOINT_INTERVAL_MS".into(), "100".into()),
        ];
        let (b, first) = Billing::open(o).await.unwrap();
        let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
        let _upkeep = b.spawn_upkeep();
        let before = b.account(user.account).await.unwrap().balance_micros;
        let served_long = b.hold(&user, &req("long", 10, 100)).await.unwrap();
        let abandoned = b.hold(&user, &req("gone", 10, 100)).await.unwrap();
        // A hold whose request is gone (dropped without settle or void, as after a panic) is
        // no longer kept alive; the one still being served is, for three timeouts.
        drop(abandoned);
        tokio::time::sleep(std::time::Duration::from_millis(3_000)).await;
        let acc = b.account(user.account).await.unwrap();
        assert_eq!(acc.pending_micros, served_long.held_micros, "only the live hold is still pending");
        let r = b.settle(served_long, served(10, 100)).await.unwrap().expect("charged with a receipt");
        assert!(r.amount_micros > 0);
        let acc = b.account(user.account).await.unwrap();
        assert_eq!((acc.pending_micros, acc.balance_micros), (0, before - r.amount_micros));
        assert!(b.store().check().await.unwrap().ok);
    }
}

/// The first run (admin key, local user, starting grant) happens once per ledger: a data dir
/// that comes to a ledger set up before gets an admin key of its own and mints nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_joining_a_set_up_ledger_gets_an_admin_key_and_mints_nothing() {
    for pg in stores() {
        let first_dir = tempfile::tempdir().unwrap();
        let pg = ledger_url(pg, "tokenomy_billing_join").await;
        let (b, first) = Billing::open(opts(first_dir.path(), pg.as_deref())).await.unwrap();
        assert!(first.is_some());
        let accounts = b.check().await.unwrap().accounts;
        let treasury = b.account(tokenomy_ledger::TREASURY).await.unwrap().balance_micros;
        drop(b);
        // A second node on the same PostgreSQL ledger has a data dir of its own; on SQLite the
        // ledger lives in the data dir, so the case is a lost admin.key.
        let second_dir = tempfile::tempdir().unwrap();
        let dir = match pg {
            Some(_) => second_dir.path(),
            None => {
                std::fs::remove_file(first_dir.path().join("admin.key")).unwrap();
                first_dir.path()
            }
        };
        let (b, again) = Billing::open(opts(dir, pg.as_deref())).await.unwrap();
        assert!(again.is_none(), "no second first run");
        let key = std::fs::read_to_string(dir.join("admin.key")).unwrap();
        assert!(b.authenticate(Some(key.trim())).await.unwrap().is_admin());
        assert_eq!(dir.join("user.key").exists(), pg.is_none(), "a joining data dir gets no user.key");
        let c = b.check().await.unwrap();
        assert!(c.ok);
        assert_eq!(c.accounts, accounts, "no second local user");
        assert_eq!(b.account(tokenomy_ledger::TREASURY).await.unwrap().balance_micros, treasury, "nothing minted");
        drop(b);
        // And it starts as any node does from then on.
        let (_, third) = Billing::open(opts(dir, pg.as_deref())).await.unwrap();
        assert!(third.is_none());
    }
}

/// One process per data dir: a second open of a data dir in use is refused, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = Billing::open(opts(dir.path(), None)).await.unwrap();
    let e = Billing::open(opts(dir.path(), None)).await.unwrap_err();
    assert!(e.to_string().contains("another tokenomy process is using the data dir"), "{e}");
    drop(b);
    let (_, first) = Billing::open(opts(dir.path(), None)).await.unwrap();
    assert!(first.is_none(), "the same ledger, opened again");
}
